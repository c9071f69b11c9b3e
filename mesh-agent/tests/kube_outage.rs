//! An API-server outage: the last good state stays published (no change,
//! no un-enrollment), the outage is logged once and its end once, and the
//! state converges to what changed meanwhile. Its own test binary so the
//! captured log belongs to this test alone.

mod kube_fake;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use kube_fake::{
    FakeApiServer,
    harness::{self, FakeProc, enrolled, key, wait_for},
    objects,
};
use serde_json::json;

const NODE: &str = "node-a";
const UID_WEB: &str = "11111111-1111-4111-8111-111111111111";
const UID_API: &str = "22222222-2222-4222-8222-222222222222";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_the_last_good_state_and_converges_after() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("mesh_agent=info")
        .init();
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("outage");
        server.apply(objects::namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient"}),
        ));
        server.apply(objects::node(NODE, "192.0.2.1"));
        server.apply(objects::pod(
            "shop",
            "web",
            UID_WEB,
            NODE,
            &["10.1.0.10"],
            json!({}),
        ));
        server.apply(objects::service("shop", "web", "10.96.0.10", 80, 8080));
        server.apply(objects::slice(
            "shop",
            "web-1",
            "web",
            8080,
            &[("10.1.0.10", true, "web")],
        ));
        proc.add_pod_process(201, UID_WEB);
        proc.add_pod_process(202, UID_API);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let good = run.store.current();
        assert!(enrolled(&good, "shop", "web"));

        server.set_outage(true);
        // What changes meanwhile cannot be seen...
        server.apply(objects::pod(
            "shop",
            "api",
            UID_API,
            NODE,
            &["10.1.0.11"],
            json!({}),
        ));
        server.apply(objects::namespace("shop", json!({})));
        server.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-1");
        // ...and the last good state stays, through several failed retries.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during = run.store.current();
        assert_eq!(
            during.generation, good.generation,
            "nothing published during the outage: before {good:#?}\nduring {during:#?}"
        );
        assert!(
            server.count("LIST") + server.count("WATCH") > 8,
            "retries happened"
        );

        server.set_outage(false);
        let snap = wait_for(&run.store, "converged after the outage", |s| {
            s.workloads
                .get(&key("shop", "api"))
                .is_some_and(|w| !w.enrolled)
                && s.workloads
                    .get(&key("shop", "web"))
                    .is_some_and(|w| !w.enrolled)
                && s.services.values().all(|svc| svc.endpoints.is_empty())
        })
        .await;
        assert!(snap.generation > good.generation);
        // Logged once each, whatever the number of failing watches and retries.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = log.text();
            let lost = text.matches("lost the Kubernetes API server").count();
            let back = text
                .matches("Kubernetes API server reachable again")
                .count();
            if lost == 1 && back == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline && lost <= 1 && back <= 1,
                "want one outage line and one recovery line, got {lost} and {back}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = log.text();
        assert!(text.contains("kubernetes source synced"), "{text}");
        assert!(
            text.contains("pod enrollment decided") && text.contains("enroll=false"),
            "enrollment changes are logged:\n{text}"
        );
    })
    .await
    .expect("test exceeded its 60 s bound");
}
