//! The same traffic-management objects reach the routing engine the same
//! way from either source (issue 11): through the Kubernetes source (the
//! fake API server speaking list/watch, the real kube client) and through
//! the workload file's `resources:` key. Both stores compile them into the
//! same effective routing (the `routes` part of `/config_dump`) and make
//! the same decisions. No root needed (listed in xtask's `ROOT_FREE_TESTS`).

mod kube_fake;

use std::{collections::BTreeMap, path::Path, time::Duration};

use kube_fake::{
    FakeApiServer,
    harness::{self, FakeProc, wait_for},
    objects,
};
use mesh_agent::{
    admin::routes::routes_json,
    routing::{Balancer, Request},
    state::Store,
    sync::file,
};
use serde_json::{Value, json};

const NODE: &str = "node-a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_objects_from_the_api_server_and_the_workload_file_route_the_same() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let http_only = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "web-http", "namespace": "shop"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web", "subset": "v2"}}]}]}});
        let resources = [
            objects::destination_rule("shop", "web", "web", "ROUND_ROBIN"),
            objects::virtual_service("shop", "web", "web.shop.svc.cluster.local", 80, 20),
            http_only,
        ];

        // From the API server.
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("routing-sources");
        server.apply(objects::namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient"}),
        ));
        server.apply(objects::node(NODE, "192.0.2.1"));
        for (pid, name, uid, ip, version) in [
            (201, "web-v1", "61616161-0001-4000-8000-000000000001", "10.1.0.21", "v1"),
            (202, "web-v2", "61616161-0002-4000-8000-000000000002", "10.1.0.22", "v2"),
        ] {
            // Running on this node (found by discovery), so in the snapshot
            // with their labels, which the subsets select on.
            proc.add_pod_process(pid, uid);
            server.apply(objects::pod(
                "shop",
                name,
                uid,
                NODE,
                &[ip],
                json!({"app": "web", "version": version}),
            ));
        }
        server.apply(objects::service("shop", "web", "10.96.0.10", 80, 8080));
        server.apply(objects::slice(
            "shop",
            "web-1",
            "web",
            8080,
            &[("10.1.0.21", true, "web-v1"), ("10.1.0.22", true, "web-v2")],
        ));
        for r in &resources {
            server.apply(r.clone());
        }
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let kube = wait_for(&run.store, "routing objects and endpoints", |s| {
            s.routing.destination_rules.len() == 1
                && s.routing.virtual_services.len() == 2
                && s.services.values().any(|svc| svc.endpoints.len() == 2)
                && s.workloads.len() == 2
        })
        .await;

        // From a workload file.
        let mut text = format!(
            "node: {{name: {NODE}}}\npods:\n\
             - {{name: web-v1, namespace: shop, node: node-b, ips: [\"10.1.0.21\"], labels: {{app: web, version: v1}}}}\n\
             - {{name: web-v2, namespace: shop, node: node-b, ips: [\"10.1.0.22\"], labels: {{app: web, version: v2}}}}\n\
             services:\n\
             - {{name: web, namespace: shop, vips: [\"10.96.0.10\"], ports: [{{name: http, port: 80, targetPort: 8080}}], endpoints: [web-v1, web-v2]}}\n\
             resources:\n"
        );
        for r in &resources {
            text.push_str(&format!("- {r}\n"));
        }
        let parsed = file::parse(Path::new("routing.yaml"), &text).expect("the file parses");
        let store = Store::new();
        file::publish(&store, parsed);
        let from_file = store.current();

        // The same effective routing and report...
        let now = std::time::Instant::now();
        let (a, b) = (
            routes_json(&kube.routes, &Balancer::with_seed(0), now),
            routes_json(&from_file.routes, &Balancer::with_seed(0), now),
        );
        assert_eq!(a["services"], b["services"], "kube:\n{a:#}\nfile:\n{b:#}");
        assert_eq!(a["objects"], b["objects"]);
        let statuses: Vec<&Value> = a["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .map(|o| &o["status"])
            .collect();
        assert_eq!(statuses, [&json!("applied"), &json!("applied"), &json!("needs_l7")]);
        // ...and the same decisions for the same draws.
        let labels = BTreeMap::new();
        let req = Request {
            destination: "10.96.0.10:80".parse().expect("addr"),
            source: "10.1.0.9".parse().expect("addr"),
            source_namespace: "shop",
            source_labels: &labels,
        };
        let (ra, rb) = (Balancer::with_seed(11), Balancer::with_seed(11));
        let mut v2 = 0;
        for _ in 0..200 {
            let x = kube.routes.route(&req, ra.random()).expect("a service").expect("routed");
            let y = from_file.routes.route(&req, rb.random()).expect("a service").expect("routed");
            assert_eq!((&x.route, &x.dest.key), (&y.route, &y.dest.key));
            assert_eq!(x.dest.endpoints, y.dest.endpoints);
            if x.dest.subset.as_deref() == Some("v2") {
                v2 += 1;
            }
        }
        assert!(v2 > 0 && v2 < 200, "both subsets drawn: {v2}");
        run.cancel.cancel();
    })
    .await
    .expect("test exceeded its 60 s bound");
}
