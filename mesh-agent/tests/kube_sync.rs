//! The Kubernetes source against a fake API server that speaks the real
//! list/watch protocol (see `kube_fake`), with the real kube client: initial
//! list, add/update/delete of every kind (the policies and the
//! traffic-management objects too), enrollment by label, dropped watches,
//! `410 Gone`, slow and absent resources (absent CRDs listed as missing in
//! the store). Every wait is bounded.

mod kube_fake;

use std::{net::IpAddr, time::Duration};

use kube_fake::{
    FakeApiServer, Res,
    harness::{self, FakeProc, enrolled, key, present_unenrolled, wait_for},
    objects,
};
use mesh_agent::state::{MissingReason, ServiceKey};
use serde_json::json;

const NODE: &str = "node-a";
const UID_WEB: &str = "11111111-1111-4111-8111-111111111111";
const UID_DB: &str = "22222222-2222-4222-8222-222222222222";
const UID_REMOTE: &str = "33333333-3333-4333-8333-333333333333";
const UID_PLAIN: &str = "44444444-4444-4444-8444-444444444444";
const UID_LATE: &str = "55555555-5555-4555-8555-555555555555";

fn ambient() -> serde_json::Value {
    json!({"istio.io/dataplane-mode": "ambient"})
}

/// A cluster: namespace `shop` (ambient) with local pods `web` and `db`
/// (db opted out) and a remote pod; namespace `plain` (no label) with a
/// local pod; a service with a slice; the node; one policy of each kind.
fn seed(server: &FakeApiServer, proc: &FakeProc) {
    server.apply(objects::namespace("shop", ambient()));
    server.apply(objects::namespace("plain", json!({})));
    server.apply(objects::namespace("kube-system", ambient()));
    server.apply(objects::node(NODE, "192.0.2.1"));
    server.apply(objects::node("node-b", "192.0.2.2"));
    server.apply(objects::pod(
        "shop",
        "web",
        UID_WEB,
        NODE,
        &["10.1.0.10", "fd00:1::10"],
        json!({"app": "web"}),
    ));
    server.apply(objects::pod(
        "shop",
        "db",
        UID_DB,
        NODE,
        &["10.1.0.11"],
        json!({"app": "db", "istio.io/dataplane-mode": "none"}),
    ));
    server.apply(objects::pod(
        "shop",
        "remote",
        UID_REMOTE,
        "node-b",
        &["10.2.0.10"],
        json!({"app": "web"}),
    ));
    server.apply(objects::pod(
        "plain",
        "plain",
        UID_PLAIN,
        NODE,
        &["10.1.0.12"],
        json!({}),
    ));
    server.apply(objects::service("shop", "web", "10.96.0.10", 80, 8080));
    server.apply(objects::slice(
        "shop",
        "web-abcde",
        "web",
        8080,
        &[("10.1.0.10", true, "web"), ("10.2.0.10", false, "remote")],
    ));
    server.apply(objects::authorization_policy("shop", "allow-cart", "ALLOW"));
    server.apply(objects::peer_authentication("shop", "strict", "STRICT"));
    for (pid, uid) in [
        (101, UID_WEB),
        (102, UID_DB),
        (103, UID_REMOTE),
        (104, UID_PLAIN),
    ] {
        proc.add_pod_process(pid, uid);
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test exceeded its 60 s bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_builds_the_whole_snapshot() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("initial");
        seed(&server, &proc);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let snap = run.store.current();
        assert!(snap.generation >= 1);
        assert_eq!(snap.node.name, NODE);
        assert_eq!(
            snap.node.probe_sources,
            vec!["192.0.2.1".parse::<IpAddr>().expect("ip")],
            "this node's InternalIP only"
        );
        let names: Vec<String> = snap.workloads.keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["plain/plain", "shop/db", "shop/remote", "shop/web"]);
        // A pod of another node: its addresses and identity, never located here.
        let remote = &snap.workloads[&key("shop", "remote")];
        assert_eq!(remote.node.as_deref(), Some("node-b"));
        assert!(remote.enrolled, "in the mesh (on its own node)");
        assert_eq!(remote.netns, std::path::PathBuf::new(), "no netns here");
        assert_eq!(remote.cgroup, None);
        assert_eq!(
            snap.workloads.values().filter(|w| w.node.is_none()).count(),
            3,
            "local pods"
        );
        let web = &snap.workloads[&key("shop", "web")];
        assert!(web.enrolled, "namespace label enrolls");
        assert_eq!(web.node, None, "a local pod");
        assert_eq!(web.netns, proc.netns(101));
        assert_eq!(
            web.cgroup.as_deref(),
            Some(std::path::Path::new(&format!(
                "/sys/fs/cgroup/kubepods/burstable/pod{UID_WEB}"
            )))
        );
        assert_eq!(web.service_account, "web-sa");
        assert_eq!(web.uid.as_deref(), Some(UID_WEB));
        assert_eq!(web.ips.len(), 2);
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
        assert!(present_unenrolled(&snap, "shop", "db"), "pod opt-out");
        assert!(present_unenrolled(&snap, "plain", "plain"), "no label");
        // Services: VIP -> ready endpoints.
        let svc = snap
            .service_by_vip("10.96.0.10".parse().expect("ip"))
            .expect("service by VIP");
        let targets: Vec<String> = svc.targets(80).iter().map(|t| t.to_string()).collect();
        assert_eq!(targets, ["10.1.0.10:8080"], "not-ready endpoint left out");
        // Policies, raw, without managedFields.
        assert_eq!(snap.policies.authorization.len(), 1);
        assert_eq!(snap.policies.authorization[0]["spec"]["action"], "ALLOW");
        assert_eq!(snap.policies.peer_authentication.len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_follow_adds_updates_deletes_and_labels() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("pods");
        seed(&server, &proc);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let store = &run.store;

        // Enroll by pod label in an unlabelled namespace.
        server.apply(objects::pod(
            "plain",
            "plain",
            UID_PLAIN,
            NODE,
            &["10.1.0.12"],
            json!({"istio.io/dataplane-mode": "ambient"}),
        ));
        wait_for(store, "pod label enrolls", |s| {
            enrolled(s, "plain", "plain")
        })
        .await;
        // Un-label: un-enrolled.
        server.apply(objects::pod(
            "plain",
            "plain",
            UID_PLAIN,
            NODE,
            &["10.1.0.12"],
            json!({}),
        ));
        wait_for(store, "un-label un-enrolls", |s| {
            present_unenrolled(s, "plain", "plain")
        })
        .await;
        // Namespace label enrolls every pod of it; removing it un-enrolls them.
        server.apply(objects::namespace("plain", ambient()));
        wait_for(store, "namespace label enrolls", |s| {
            enrolled(s, "plain", "plain")
        })
        .await;
        server.apply(objects::namespace("plain", json!({})));
        wait_for(store, "namespace un-label", |s| {
            present_unenrolled(s, "plain", "plain")
        })
        .await;
        // Opting the enrolled pod out.
        server.apply(objects::pod(
            "shop",
            "web",
            UID_WEB,
            NODE,
            &["10.1.0.10"],
            json!({"istio.io/dataplane-mode": "none"}),
        ));
        wait_for(store, "opt-out", |s| present_unenrolled(s, "shop", "web")).await;
        // An opted-out pod opting back in.
        server.apply(objects::pod(
            "shop",
            "db",
            UID_DB,
            NODE,
            &["10.1.0.11"],
            json!({"app": "db"}),
        ));
        wait_for(store, "opt back in", |s| enrolled(s, "shop", "db")).await;

        // A new local pod whose processes are not on the node yet: left out,
        // then enrolled once its process appears (rediscovery).
        server.apply(objects::pod(
            "shop",
            "late",
            UID_LATE,
            NODE,
            &["10.1.0.13"],
            json!({}),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !run.store
                .current()
                .workloads
                .contains_key(&key("shop", "late")),
            "enrolled pod without a process is left out"
        );
        proc.add_pod_process(105, UID_LATE);
        let snap = wait_for(store, "late pod found", |s| enrolled(s, "shop", "late")).await;
        assert_eq!(snap.workloads[&key("shop", "late")].netns, proc.netns(105));
        // Its sandbox is re-created (new process): the new netns is published.
        proc.remove(105);
        proc.add_pod_process(106, UID_LATE);
        wait_for(store, "re-created sandbox", |s| {
            s.workloads
                .get(&key("shop", "late"))
                .is_some_and(|w| w.netns == proc.netns(106))
        })
        .await;

        // A pod now reported on another node (re-created there under the same
        // name) becomes a remote pod, not located here; another is deleted.
        server.apply(objects::pod(
            "shop",
            "db",
            UID_DB,
            "node-b",
            &["10.1.0.11"],
            json!({}),
        ));
        let snap = wait_for(store, "pod on another node", |s| {
            s.workloads
                .get(&key("shop", "db"))
                .is_some_and(|w| w.node.as_deref() == Some("node-b"))
        })
        .await;
        assert_eq!(
            snap.workloads[&key("shop", "db")].netns,
            std::path::PathBuf::new()
        );
        server.delete("v1", "Pod", "shop", "late");
        wait_for(store, "pod deleted", |s| {
            !s.workloads.contains_key(&key("shop", "late"))
        })
        .await;
        // A finished pod and a hostNetwork pod are never enrolled.
        let mut done = objects::pod(
            "shop",
            "job",
            "66666666-0000-4000-8000-000000000006",
            NODE,
            &["10.1.0.14"],
            json!({}),
        );
        done["status"]["phase"] = json!("Succeeded");
        server.apply(done);
        let mut host = objects::pod(
            "shop",
            "hostnet",
            "77777777-0000-4000-8000-000000000007",
            NODE,
            &["192.0.2.1"],
            json!({}),
        );
        host["spec"]["hostNetwork"] = json!(true);
        server.apply(host);
        // A pod in kube-system (labelled ambient there) is never enrolled.
        server.apply(objects::pod(
            "kube-system",
            "coredns",
            "88888888-0000-4000-8000-000000000008",
            NODE,
            &["10.1.0.15"],
            json!({}),
        ));
        proc.add_pod_process(108, "88888888-0000-4000-8000-000000000008");
        let snap = wait_for(store, "kube-system pod seen", |s| {
            s.workloads.contains_key(&key("kube-system", "coredns"))
        })
        .await;
        assert!(present_unenrolled(&snap, "kube-system", "coredns"));
        assert!(!snap.workloads.contains_key(&key("shop", "job")));
        assert!(!snap.workloads.contains_key(&key("shop", "hostnet")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_slices_nodes_and_policies_follow_changes() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("services");
        seed(&server, &proc);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let store = &run.store;
        let web = ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let targets = |s: &mesh_agent::state::Snapshot, k: &ServiceKey, port: u16| -> Vec<String> {
            s.services
                .get(k)
                .map(|svc| svc.targets(port).iter().map(|t| t.to_string()).collect())
                .unwrap_or_default()
        };
        // An endpoint becomes ready.
        server.apply(objects::slice(
            "shop",
            "web-abcde",
            "web",
            8080,
            &[("10.1.0.10", true, "web"), ("10.2.0.10", true, "remote")],
        ));
        wait_for(store, "second endpoint ready", |s| {
            targets(s, &web, 80) == ["10.1.0.10:8080", "10.2.0.10:8080"]
        })
        .await;
        // A second slice of the same service adds endpoints.
        server.apply(objects::slice(
            "shop",
            "web-fghij",
            "web",
            8080,
            &[("10.3.0.10", true, "web-3")],
        ));
        wait_for(store, "second slice", |s| targets(s, &web, 80).len() == 3).await;
        server.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-abcde");
        wait_for(store, "slice deleted", |s| {
            targets(s, &web, 80) == ["10.3.0.10:8080"]
        })
        .await;
        // The service's port changes, then a new service appears, then it goes.
        server.apply(objects::service("shop", "web", "10.96.0.10", 8000, 8080));
        wait_for(store, "port changed", |s| {
            targets(s, &web, 8000).len() == 1 && targets(s, &web, 80).is_empty()
        })
        .await;
        let api = ServiceKey {
            namespace: "plain".into(),
            name: "api".into(),
        };
        server.apply(objects::service("plain", "api", "10.96.0.20", 443, 8443));
        wait_for(store, "service added", |s| {
            s.service_by_vip("10.96.0.20".parse().expect("ip"))
                .is_some_and(|svc| svc.name == "api")
        })
        .await;
        server.delete("v1", "Service", "plain", "api");
        wait_for(store, "service deleted", |s| !s.services.contains_key(&api)).await;
        // The node's address changes.
        server.apply(objects::node(NODE, "192.0.2.9"));
        wait_for(store, "node address", |s| {
            s.node.probe_sources == vec!["192.0.2.9".parse::<IpAddr>().expect("ip")]
        })
        .await;
        // Policies: update, add, delete.
        server.apply(objects::authorization_policy("shop", "allow-cart", "DENY"));
        wait_for(store, "policy updated", |s| {
            s.policies
                .authorization
                .first()
                .is_some_and(|p| p["spec"]["action"] == "DENY")
        })
        .await;
        server.apply(objects::authorization_policy("plain", "audit", "AUDIT"));
        wait_for(store, "policy added", |s| {
            s.policies.authorization.len() == 2
        })
        .await;
        server.delete(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "shop",
            "allow-cart",
        );
        server.delete(
            "security.istio.io/v1",
            "PeerAuthentication",
            "shop",
            "strict",
        );
        wait_for(store, "policies deleted", |s| {
            s.policies.authorization.len() == 1 && s.policies.peer_authentication.is_empty()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_resumes_from_its_resource_version() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("dropped");
        seed(&server, &proc);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let lists_before = server.count("LIST /api/v1/pods");
        let watches_before = server.count("WATCH /api/v1/pods");
        server.drop_watches();
        server.apply(objects::pod(
            "plain",
            "plain",
            UID_PLAIN,
            NODE,
            &["10.1.0.12"],
            json!({"istio.io/dataplane-mode": "ambient"}),
        ));
        wait_for(&run.store, "change after the dropped watch", |s| {
            enrolled(s, "plain", "plain")
        })
        .await;
        assert!(server.count("WATCH /api/v1/pods") > watches_before);
        assert_eq!(
            server.count("LIST /api/v1/pods"),
            lists_before,
            "a dropped watch resumes without a relist: {:?}",
            server.requests()
        );
        // The resumed watch asked from a real resourceVersion, not from scratch.
        let last = server
            .requests()
            .into_iter()
            .rfind(|r| r.starts_with("WATCH /api/v1/pods"))
            .expect("a pods watch");
        assert!(!last.ends_with("rv=") && !last.ends_with("rv=0"), "{last}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_forces_a_relist_that_drops_what_was_deleted_meanwhile() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("gone");
        seed(&server, &proc);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let lists_before = server.count("LIST /api/v1/pods");
        // While the watches are down, a pod is deleted, another labelled,
        // and the server's history is compacted: resuming gets 410 Gone.
        server.set_outage(true);
        server.delete("v1", "Pod", "shop", "web");
        server.apply(objects::pod(
            "plain",
            "plain",
            UID_PLAIN,
            NODE,
            &["10.1.0.12"],
            json!({"istio.io/dataplane-mode": "ambient"}),
        ));
        server.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-abcde");
        server.compact();
        server.set_outage(false);
        // Pods and slices relisted: what was deleted during the gap is gone.
        wait_for(&run.store, "relist converged", |s| {
            !s.workloads.contains_key(&key("shop", "web"))
                && enrolled(s, "plain", "plain")
                && s.services.values().all(|svc| svc.endpoints.is_empty())
        })
        .await;
        let requests = server.requests();
        let gone = requests
            .iter()
            .position(|r| r.starts_with("GONE /api/v1/pods"))
            .unwrap_or_else(|| panic!("the pods watch resumed into a 410: {requests:?}"));
        assert!(
            requests[gone..].iter().any(|r| r == "LIST /api/v1/pods"),
            "410 must cause a relist: {requests:?}"
        );
        assert!(server.count("LIST /api/v1/pods") > lists_before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_crds_count_as_empty_and_are_picked_up_once_installed() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("crds");
        seed(&server, &proc);
        server.set_missing(Res::AuthorizationPolicies, true);
        server.set_missing(Res::PeerAuthentications, true);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let snap = run.store.current();
        assert!(snap.policies.authorization.is_empty());
        assert!(
            enrolled(&snap, "shop", "web"),
            "start-up not blocked by the CRDs"
        );
        wait_missing(&run.store, "the policy kinds reported missing", |m| {
            m.iter()
                .filter(|(_, r)| *r == MissingReason::NotServed)
                .count()
                == 2
        })
        .await;
        server.set_missing(Res::AuthorizationPolicies, false);
        wait_for(&run.store, "CRD installed later", |s| {
            s.policies.authorization.len() == 1
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_a_slow_or_absent_server_and_publishes_nothing_before() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("startup");
        seed(&server, &proc);
        server.set_outage(true);
        let store = mesh_agent::state::Store::new();
        let cancel = tokio_util::sync::CancellationToken::new();
        let start = tokio::spawn(mesh_agent::sync::kube::start(
            server.client(),
            harness::config(NODE, &proc.root),
            store.clone(),
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!start.is_finished(), "no first sync while the server fails");
        assert_eq!(store.current().generation, 0, "nothing published yet");
        // Back, but slow: start-up completes once the lists arrive.
        server.set_delay(Duration::from_millis(300));
        server.set_outage(false);
        let source = tokio::time::timeout(harness::CONVERGE, start)
            .await
            .expect("start-up within the timeout")
            .expect("join")
            .expect("started");
        assert!(enrolled(&store.current(), "shop", "web"));
        cancel.cancel();
        drop(source);
    })
    .await;
}

/// The resource names of the kinds the store reports missing, with why.
fn missing(store: &mesh_agent::state::Store) -> Vec<(String, MissingReason)> {
    store
        .missing_kinds()
        .into_iter()
        .map(|m| (m.resource, m.reason))
        .collect()
}

/// Polls the store's missing kinds (they are not part of the snapshot)
/// until `cond` holds; panics with the last value after the convergence bound.
async fn wait_missing(
    store: &mesh_agent::state::Store,
    what: &str,
    cond: impl Fn(&[(String, MissingReason)]) -> bool,
) {
    let deadline = std::time::Instant::now() + harness::CONVERGE;
    loop {
        let now = missing(store);
        if cond(&now) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; missing kinds: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names(objects: &[serde_json::Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_objects_arrive_and_follow_changes_and_deletes() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("routing");
        seed(&server, &proc);
        server.apply(objects::destination_rule(
            "shop",
            "web",
            "web",
            "ROUND_ROBIN",
        ));
        server.apply(objects::destination_rule(
            "plain",
            "api",
            "api.plain.svc.cluster.local",
            "LEAST_REQUEST",
        ));
        server.apply(objects::virtual_service("shop", "web", "web", 80, 20));
        server.apply(objects::tcp_route(
            "shop",
            "web",
            "web",
            &[("web-v1", 80, 90), ("web-v2", 80, 10)],
        ));
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let store = &run.store;
        let snap = store.current();
        let routing = &snap.routing;
        // Raw, as served, sorted by namespace and name, managedFields dropped.
        assert_eq!(names(&routing.destination_rules), ["plain/api", "shop/web"]);
        let dr = &routing.destination_rules[1];
        assert_eq!(dr["apiVersion"], "networking.istio.io/v1");
        assert_eq!(dr["kind"], "DestinationRule");
        assert_eq!(dr["spec"]["host"], "web");
        assert_eq!(dr["spec"]["subsets"][1]["labels"]["version"], "v2");
        assert!(dr["metadata"].get("managedFields").is_none(), "{dr}");
        assert!(dr["metadata"]["resourceVersion"].is_string());
        assert_eq!(names(&routing.virtual_services), ["shop/web"]);
        assert_eq!(
            routing.virtual_services[0]["spec"]["tcp"][0]["route"][0]["weight"],
            80
        );
        assert_eq!(names(&routing.tcp_routes), ["shop/web"]);
        let route = &routing.tcp_routes[0];
        assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1alpha2");
        assert_eq!(route["spec"]["parentRefs"][0]["kind"], "Service");
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 10);
        assert!(missing(store).is_empty(), "{:?}", missing(store));

        // A changed weight arrives.
        server.apply(objects::virtual_service("shop", "web", "web", 0, 100));
        wait_for(store, "weights changed", |s| {
            s.routing.virtual_services.first().is_some_and(|vs| {
                vs["spec"]["tcp"][0]["route"][0]["weight"] == 0
                    && vs["spec"]["tcp"][0]["route"][1]["weight"] == 100
            })
        })
        .await;
        // A changed load-balancing policy and a new rule in between the others.
        server.apply(objects::destination_rule("shop", "web", "web", "RANDOM"));
        server.apply(objects::destination_rule("shop", "db", "db", "PASSTHROUGH"));
        let snap = wait_for(store, "rule changed and added", |s| {
            names(&s.routing.destination_rules) == ["plain/api", "shop/db", "shop/web"]
                && s.routing.destination_rules[2]["spec"]["trafficPolicy"]["loadBalancer"]["simple"]
                    == "RANDOM"
        })
        .await;
        assert_eq!(names(&snap.routing.tcp_routes), ["shop/web"], "untouched");
        // Deletes of every kind.
        server.delete("networking.istio.io/v1", "DestinationRule", "plain", "api");
        server.delete("networking.istio.io/v1", "VirtualService", "shop", "web");
        server.delete(
            "gateway.networking.k8s.io/v1alpha2",
            "TCPRoute",
            "shop",
            "web",
        );
        let snap = wait_for(store, "routing objects deleted", |s| {
            names(&s.routing.destination_rules) == ["shop/db", "shop/web"]
                && s.routing.virtual_services.is_empty()
                && s.routing.tcp_routes.is_empty()
        })
        .await;
        // The policies were not disturbed by any of it.
        assert_eq!(snap.policies.authorization.len(), 1);
        assert!(enrolled(&snap, "shop", "web"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_routing_crds_are_tolerated_reported_and_picked_up_once_installed() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("routing-crds");
        seed(&server, &proc);
        server.apply(objects::destination_rule(
            "shop",
            "web",
            "web",
            "ROUND_ROBIN",
        ));
        server.apply(objects::tcp_route(
            "shop",
            "web",
            "web",
            &[("web-v2", 80, 1)],
        ));
        for res in [Res::DestinationRules, Res::VirtualServices, Res::TcpRoutes] {
            server.set_missing(res, true);
        }
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let store = &run.store;
        let snap = store.current();
        assert!(
            enrolled(&snap, "shop", "web"),
            "start-up not blocked by the routing CRDs"
        );
        assert_eq!(snap.policies.authorization.len(), 1, "policies still read");
        assert_eq!(snap.routing, mesh_agent::state::RoutingObjects::default());
        // Reported, not only logged: each absent kind with its reason.
        let not_served = |r: &str| (r.to_owned(), MissingReason::NotServed);
        wait_missing(store, "the three kinds reported missing", |m| {
            m == [
                not_served("destinationrules.networking.istio.io"),
                not_served("tcproutes.gateway.networking.k8s.io"),
                not_served("virtualservices.networking.istio.io"),
            ]
        })
        .await;
        // The Gateway API is installed later: its routes arrive, and it is
        // no longer reported; the Istio kinds still are.
        server.set_missing(Res::TcpRoutes, false);
        wait_for(store, "TCPRoute CRD installed later", |s| {
            names(&s.routing.tcp_routes) == ["shop/web"]
        })
        .await;
        wait_missing(store, "TCPRoute no longer missing", |m| {
            m == [
                not_served("destinationrules.networking.istio.io"),
                not_served("virtualservices.networking.istio.io"),
            ]
        })
        .await;
        assert!(store.current().routing.destination_rules.is_empty());
        // Uninstalled again (its objects go with the CRD): the next watch
        // gets 404, the routes are gone and the kind is reported again.
        server.set_missing(Res::TcpRoutes, true);
        server.drop_watches();
        wait_for(store, "TCPRoute CRD uninstalled", |s| {
            s.routing.tcp_routes.is_empty()
        })
        .await;
        wait_missing(store, "TCPRoute missing again", |m| {
            m.contains(&not_served("tcproutes.gateway.networking.k8s.io"))
        })
        .await;
        // And the agent kept working meanwhile: a pod change still arrives.
        server.apply(objects::pod(
            "plain",
            "plain",
            UID_PLAIN,
            NODE,
            &["10.1.0.12"],
            json!({"istio.io/dataplane-mode": "ambient"}),
        ));
        wait_for(store, "pods still followed", |s| {
            enrolled(s, "plain", "plain")
        })
        .await;
    })
    .await;
}

/// `istio.io/use-waypoint` on the namespace and the service arrive with
/// Istio's precedence, and the waypoint resolves to its Service's pod and
/// that pod's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_labels_arrive_follow_changes_and_resolve_to_the_waypoint_pod() {
    use mesh_agent::{
        identity::TrustDomain,
        state::{WaypointRef, WaypointSource},
    };
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("waypoints");
        seed(&server, &proc);
        // The waypoint: its pod on another node, its Service on 15008.
        server.apply(objects::pod(
            "shop",
            "wp-0",
            "66666666-6666-4666-8666-666666666666",
            "node-b",
            &["10.2.0.20"],
            json!({"gateway.networking.k8s.io/gateway-name": "wp"}),
        ));
        server.apply(objects::service("shop", "wp", "10.96.0.30", 15008, 15008));
        server.apply(objects::slice(
            "shop",
            "wp-abcde",
            "wp",
            15008,
            &[("10.2.0.20", true, "wp-0")],
        ));
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let store = &run.store;
        let web = ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let waypoint = |s: &mesh_agent::state::Snapshot| {
            s.services
                .get(&web)
                .and_then(|svc| svc.waypoint.as_ref())
                .map(|w| (w.reference.to_string(), w.from))
        };
        wait_for(store, "web in the snapshot", |s| {
            s.services.contains_key(&web)
        })
        .await;
        assert_eq!(waypoint(&store.current()), None, "no label yet");

        // The namespace names the waypoint.
        server.apply(objects::namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
        ));
        wait_for(store, "namespace waypoint", |s| {
            waypoint(s) == Some(("shop/wp".into(), WaypointSource::Namespace))
        })
        .await;
        let snap = store.current();
        let wp_ref = WaypointRef {
            namespace: "shop".into(),
            name: "wp".into(),
        };
        let td = TrustDomain::new("cluster.local").expect("td");
        let eps = snap.waypoint_endpoints(&wp_ref, &td).expect("resolves");
        let eps: Vec<(String, String)> = eps
            .iter()
            .map(|e| (e.addr.to_string(), e.identity.to_string()))
            .collect();
        assert_eq!(
            eps,
            [(
                "10.2.0.20:15008".to_owned(),
                "spiffe://cluster.local/ns/shop/sa/wp-0-sa".to_owned()
            )]
        );
        // The waypoint's own Service never goes through itself.
        assert!(snap.services[&wp_ref.service_key()].waypoint.is_none());

        // The service's own `none` opts it out.
        let mut svc = objects::service("shop", "web", "10.96.0.10", 80, 8080);
        svc["metadata"]["labels"] = json!({"istio.io/use-waypoint": "none"});
        server.apply(svc.clone());
        wait_for(store, "service opted out", |s| {
            s.services.contains_key(&web) && waypoint(s).is_none()
        })
        .await;
        // The service's own waypoint, in another namespace, wins over the namespace's.
        svc["metadata"]["labels"] = json!({"istio.io/use-waypoint": "edge",
                                          "istio.io/use-waypoint-namespace": "infra"});
        server.apply(svc);
        wait_for(store, "service waypoint", |s| {
            waypoint(s) == Some(("infra/edge".into(), WaypointSource::Service))
        })
        .await;
        // That waypoint does not exist: it does not resolve (the proxy fails closed).
        let edge = WaypointRef {
            namespace: "infra".into(),
            name: "edge".into(),
        };
        assert!(matches!(
            store.current().waypoint_endpoints(&edge, &td),
            Err(mesh_agent::state::WaypointError::Missing(_))
        ));
        // Across namespaces, and infra/edge has no Gateway allowing shop:
        // the binding is refused (no waypoint) and reported.
        let in_force = |s: &mesh_agent::state::Snapshot| {
            s.services
                .get(&web)
                .is_some_and(|svc| s.service_waypoint_in_force(svc).is_some())
        };
        assert!(!in_force(&store.current()), "no Gateway: refused");
        assert_eq!(
            store
                .current()
                .refused_waypoint_bindings()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["service shop/web -> infra/edge"]
        );
        // The Gateway is read: its HBONE listener allows every namespace.
        server.apply(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"namespace": "infra", "name": "edge"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh",
                "port": 15008, "protocol": "HBONE", "allowedRoutes": {"namespaces": {"from": "All"}}}]}
        }));
        wait_for(store, "the Gateway allows shop", in_force).await;
        assert!(store.current().refused_waypoint_bindings().is_empty());
        // A pod's own label (traffic to its IP) names a waypoint that takes
        // service traffic only (no istio.io/waypoint-for): listed as ignored.
        server.apply(objects::pod(
            "shop",
            "remote",
            UID_REMOTE,
            "node-b",
            &["10.2.0.10"],
            json!({"app": "web", "istio.io/use-waypoint": "wp"}),
        ));
        let remote = key("shop", "remote");
        wait_for(store, "pod waypoint label ignored", |s| {
            s.ignored_pod_waypoints() == [remote.clone()]
        })
        .await;
        // The waypoint takes workload traffic too (`all`, on its Service):
        // the pod's label is in force, the service keeps its waypoint.
        let mut wp_svc = objects::service("shop", "wp", "10.96.0.30", 15008, 15008);
        wp_svc["metadata"]["labels"] = json!({"istio.io/waypoint-for": "all"});
        server.apply(wp_svc.clone());
        wait_for(store, "pod waypoint in force", |s| {
            s.ignored_pod_waypoints().is_empty()
                && s.workloads.get(&remote).is_some_and(|p| {
                    s.pod_waypoint_in_force(p)
                        .is_some_and(|w| w.reference.to_string() == "shop/wp")
                })
        })
        .await;
        // `workload` only: the service (back on its namespace's waypoint)
        // no longer goes through it.
        wp_svc["metadata"]["labels"] = json!({"istio.io/waypoint-for": "workload"});
        server.apply(wp_svc);
        server.apply(objects::service("shop", "web", "10.96.0.10", 80, 8080));
        wait_for(store, "service waypoint not in force", |s| {
            s.services.get(&web).is_some_and(|svc| {
                svc.waypoint.is_some() && s.service_waypoint_in_force(svc).is_none()
            })
        })
        .await;
        // Labels removed: no waypoint.
        server.apply(objects::service("shop", "web", "10.96.0.10", 80, 8080));
        server.apply(objects::namespace("shop", ambient()));
        wait_for(store, "labels removed", |s| {
            s.services.contains_key(&web) && waypoint(s).is_none()
        })
        .await;
    })
    .await;
}

/// A tenant updating an object in a loop (here every 20 ms for 0.6 s)
/// makes the node rebuild its state (compile every policy and route,
/// re-decide open connections) a few times, not once per update: changes
/// are published after 100 ms without another, at most 1 s after the
/// first, as istiod debounces its pushes. The last update is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_updates_is_published_a_few_times_not_once_each() {
    bounded(async {
        let server = FakeApiServer::start().await;
        let proc = FakeProc::new("debounce");
        seed(&server, &proc);
        let run = harness::start(&server, harness::config(NODE, &proc.root)).await;
        let store = &run.store;
        let before = store.current().generation;
        for i in 0..30 {
            let action = if i % 2 == 0 { "DENY" } else { "AUDIT" };
            server.apply(objects::authorization_policy("shop", "allow-cart", action));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.apply(objects::authorization_policy("shop", "allow-cart", "ALLOW"));
        let action = |s: &mesh_agent::state::Snapshot| {
            s.policies
                .authorization
                .first()
                .map(|p| p["spec"]["action"].clone())
        };
        let snap = wait_for(store, "the last update published", |s| {
            s.generation > before && action(s) == Some(json!("ALLOW"))
        })
        .await;
        let publications = snap.generation - before;
        // 30 without the debounce; a loaded machine may leave a few
        // gaps over 100 ms between the updates.
        assert!(
            publications < 15,
            "{publications} publications for 31 updates"
        );
    })
    .await;
}
