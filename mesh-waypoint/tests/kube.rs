//! Kubernetes mode end to end, without a cluster: the agent's in-process
//! fake API server serves a Service labelled `istio.io/use-waypoint`, its
//! EndpointSlice and pod, a backend Service and an HTTPRoute; the agent's
//! Kubernetes source (as an observer) feeds the waypoint through
//! `config_from_snapshot` + `follow`, and a request through a real HBONE
//! tunnel is routed by that HTTPRoute. Then the route changes in the API
//! and the waypoint follows.

mod common;
#[path = "../../mesh-agent/tests/kube_fake/mod.rs"]
mod kube_fake;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{CLIENT_ID, MeshClient, WAYPOINT_ID, http_backend, issuer};
use kube_fake::{FakeApiServer, objects};
use mesh_agent::{
    identity::{CertificateProvider, SpiffeId},
    state::{Store, WaypointRef},
    sync::kube::KubeConfig,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// `ns/name` Service with port 80 → `target`, labelled `labels`.
fn service(name: &str, vip: &str, target: u16, labels: serde_json::Value) -> serde_json::Value {
    let mut s = objects::service("default", name, vip, 80, target);
    s["metadata"]["labels"] = labels;
    s
}

fn route(backend: &str) -> serde_json::Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                    "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_serves_what_the_api_server_says() {
    let (v1, v2) = (http_backend("v1").await, http_backend("v2").await);
    let server = FakeApiServer::start().await;
    server.apply(objects::namespace("default", json!({})));
    // The fronted Service (its own endpoint is v1) and two backends.
    server.apply(service(
        "web",
        "10.96.0.10",
        v1.port(),
        json!({"istio.io/use-waypoint": "waypoint"}),
    ));
    server.apply(service("web-v1", "10.96.0.21", v1.port(), json!({})));
    server.apply(service("web-v2", "10.96.0.22", v2.port(), json!({})));
    for (name, port, pod) in [
        ("web", v1.port(), "web-v1"),
        ("web-v1", v1.port(), "web-v1"),
        ("web-v2", v2.port(), "web-v2"),
    ] {
        server.apply(objects::slice(
            "default",
            &format!("{name}-abc"),
            name,
            port,
            &[("127.0.0.1", true, pod)],
        ));
    }
    for (pod, uid) in [("web-v1", "uid-1"), ("web-v2", "uid-2")] {
        server.apply(objects::pod(
            "default",
            pod,
            uid,
            "node-a",
            &["127.0.0.1"],
            json!({"app": "web", "version": pod.trim_start_matches("web-")}),
        ));
    }
    server.apply(route("web-v2"));

    let store = Store::new();
    let cancel = CancellationToken::new();
    let mut cfg = KubeConfig::observer();
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(400);
    let _source = tokio::time::timeout(
        Duration::from_secs(15),
        mesh_agent::sync::kube::start(server.client(), cfg, store.clone(), cancel.clone()),
    )
    .await
    .expect("first sync in time")
    .expect("source started");
    let me = WaypointRef {
        namespace: "default".into(),
        name: "waypoint".into(),
    };
    let config =
        mesh_waypoint::kube::config_from_snapshot(&store.current(), &me, store.root_namespace());
    let ca = issuer();
    let any = "127.0.0.1:0".parse().expect("addr");
    let running = mesh_waypoint::start(
        SpiffeId::parse(WAYPOINT_ID).expect("id"),
        Arc::clone(&ca) as Arc<dyn CertificateProvider>,
        &config,
        any,
        any,
    )
    .await
    .expect("waypoint");
    tokio::spawn(mesh_waypoint::kube::follow(
        store.clone(),
        Arc::clone(&running.shared),
        me,
        cancel.clone(),
    ));
    let client = MeshClient::new(ca, CLIENT_ID, running.hbone).await;
    let vip = "10.96.0.10:80".parse().expect("vip");

    // The HTTPRoute from the API sends everything to web-v2 (the Service's
    // own endpoint is v1): the answer proves the route was applied.
    let mut http = client.http(vip, false).await;
    let answer = http.get("/hello", &[]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "v2 /hello 0");
    // A backend Service is not a tunnel target (no VIP in the waypoint).
    assert!(
        client
            .tunnel("10.96.0.22:80".parse().expect("vip"))
            .await
            .is_err(),
        "web-v2's VIP is not fronted by this waypoint"
    );

    // The route changes in the API server: the waypoint follows.
    server.apply(route("web-v1"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut http = client.http(vip, false).await;
        let answer = http.get("/again", &[]).await;
        if answer.body == "v1 /again 0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the route change was not applied: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Unlabelling the Service: the waypoint stops fronting it.
    server.apply(service("web", "10.96.0.10", v1.port(), json!({})));
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.tunnel(vip).await.is_ok() {
        assert!(Instant::now() < deadline, "web is still fronted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
}
