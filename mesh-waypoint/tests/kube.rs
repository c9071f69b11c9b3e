//! Kubernetes mode end to end, without a cluster: the agent's in-process
//! fake API server serves a Service labelled `istio.io/use-waypoint`, its
//! EndpointSlice and pod, a backend Service and an HTTPRoute; the agent's
//! Kubernetes source (as an observer) feeds the waypoint through
//! `config_from_snapshot` + `follow`, and a request through a real HBONE
//! tunnel is routed by that HTTPRoute. Then the route changes in the API
//! and the waypoint follows.

#[allow(dead_code, missing_docs)]
mod common;
#[allow(dead_code, missing_docs, unreachable_pub)]
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
    let config = mesh_waypoint::kube::config_from_snapshot(&store.current(), &me);
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

/// In a cluster the waypoint's certificate comes from `mesh-agent ca serve`
/// (`--issuer istio-ca`, the shared issuer flags) for its own identity,
/// with its own bound service-account token: a mesh client then completes
/// mTLS with it, verifying the waypoint's SPIFFE identity against the mesh
/// root, and a request is served. A token of another service account gets
/// nothing for the waypoint's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_gets_its_own_certificate_from_ca_serve() {
    use mesh_agent::{
        ca_server::{self, CaServerConfig},
        identity::{
            CA_CERT_FILE, LocalCa, MeshCa, TrustDomain,
            issuer_config::{IssuerArgs, IssuerChoice, Requester},
        },
    };
    const DNS_NAME: &str = "mesh-ca.test.svc";
    let dir = std::env::temp_dir().join(format!("mesh-waypoint-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let td = TrustDomain::default();
    MeshCa::init_dir(&dir.join("ca"), &td, 30).expect("ca init");
    let mesh_ca = Arc::new(MeshCa::load_dir(&dir.join("ca")).expect("ca load"));

    let api = FakeApiServer::start().await;
    // The waypoint's pod (default/waypoint, as WAYPOINT_ID) and a stranger.
    for (name, uid, sa) in [
        ("waypoint-1", "uid-wp", "waypoint"),
        ("web-1", "uid-web", "web"),
    ] {
        api.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"nodeName": "node-a", "serviceAccountName": sa,
                     "containers": [{"name": "app", "image": "registry.example/app:1"}]},
            "status": {"phase": "Running"}}));
        api.add_token(
            sa,
            kube_fake::TokenUser::bound("default", sa, name, uid, Some("node-a"), "istio-ca"),
        );
    }
    let mut cfg = CaServerConfig::new(Arc::clone(&mesh_ca), td.clone());
    cfg.listen = "127.0.0.1:0".parse().expect("address");
    cfg.dns_names = vec![DNS_NAME.into()];
    let server = ca_server::start(cfg, api.client())
        .await
        .expect("CA server");

    let provider_for = |token: &str| {
        let token_file = dir.join(format!("{token}.token"));
        std::fs::write(&token_file, format!("{token}\n")).expect("token");
        IssuerArgs {
            issuer: Some(IssuerChoice::IstioCa),
            ca_address: Some(format!("https://{}", server.local_addr())),
            ca_root_cert: Some(dir.join("ca").join(CA_CERT_FILE)),
            ca_server_name: Some(DNS_NAME.into()),
            ca_token_file: Some(token_file),
            cluster_id: "Kubernetes".into(),
            ..IssuerArgs::default()
        }
        .config()
        .expect("istio-ca flags")
        .provider(&td, Duration::from_secs(3600), Requester::Itself)
        .expect("provider")
    };
    let backend = http_backend("v1").await;
    let config = mesh_waypoint::config::WaypointConfig::parse(&format!(
        "services:\n  - name: web\n    namespace: default\n    addresses: [10.96.0.10]\n    ports: [{{ port: 80, targetPort: {} }}]\n    endpoints: [{{ address: 127.0.0.1 }}]\n",
        backend.port()
    ))
    .expect("config");
    let any = "127.0.0.1:0".parse().expect("addr");
    let waypoint = mesh_waypoint::start(
        SpiffeId::parse(WAYPOINT_ID).expect("id"),
        provider_for("waypoint"),
        &config,
        any,
        any,
    )
    .await
    .expect("waypoint");
    let local = Arc::new(LocalCa::new(Arc::clone(&mesh_ca), td.clone()));
    let client = MeshClient::new(Arc::clone(&local), CLIENT_ID, waypoint.hbone).await;
    let mut http = client
        .http("10.96.0.10:80".parse().expect("vip"), false)
        .await;
    let answer = http.get("/", &[]).await;
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (200, "v1 / 0")
    );
    let issued = waypoint.shared.tls.manager().issue_counts();
    assert!(issued.issued >= 1, "{issued:?}");

    // Another service account's token cannot get the waypoint's identity:
    // that waypoint has no certificate, so no client completes mTLS.
    let impostor = mesh_waypoint::start(
        SpiffeId::parse(WAYPOINT_ID).expect("id"),
        provider_for("web"),
        &config,
        any,
        any,
    )
    .await
    .expect("waypoint");
    let client = MeshClient::new(local, CLIENT_ID, impostor.hbone).await;
    assert!(
        client
            .tunnel("10.96.0.10:80".parse().expect("vip"))
            .await
            .is_err(),
        "a waypoint without a certificate of its identity served a tunnel"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
