//! The admin routes in process (no socket), and one round trip through
//! real sockets with the CLI's client.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use hyper::{Method, StatusCode};
use tracing_subscriber::{EnvFilter, reload};

use super::{
    kernel::{KernelPodAddr, MapOccupancy},
    server::{admin_route, metrics_route, query_param, readiness_route},
    *,
};
use crate::{
    datapath::DatapathError,
    pods::ReconcileReport,
    state::{NodeInfo, Workload},
    telemetry::{Connection, Direction, Outcome, Peer, SecurityPolicy, metrics},
};

#[derive(Debug)]
struct FakeKernel;

impl KernelSource for FakeKernel {
    fn counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        Ok(vec![("connect_redirected", 7)])
    }
    fn occupancy(&self) -> Vec<MapOccupancy> {
        Vec::new()
    }
    fn pod_addrs(&self) -> Result<Vec<KernelPodAddr>, DatapathError> {
        Ok(vec![KernelPodAddr {
            ip: "198.18.1.10".parse().expect("ip"),
            slot: 1023,
            netns_cookie: 4097,
        }])
    }
}

fn workload(name: &str, ip: &str, enrolled: bool) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: "default".into(),
        ips: vec![ip.parse().expect("ip")],
        netns: PathBuf::from(format!("/var/run/netns/{name}")),
        enrolled,
        ..Default::default()
    }
}

/// An admin with a store of four pods: `a` enrolled in the kernel, `b`
/// failed, `c` pending, `d` not enrolled.
fn admin() -> (Admin, Store) {
    let admin = Admin::with_kernel(Some(Arc::new(FakeKernel)));
    let store = Store::new();
    let pods = [
        workload("a", "198.18.1.10", true),
        workload("b", "198.18.1.11", true),
        workload("c", "198.18.1.12", true),
        workload("d", "198.18.1.13", false),
    ];
    store.publish(
        NodeInfo {
            name: "n0".into(),
            probe_sources: vec!["198.18.1.1".parse().expect("ip")],
        },
        pods.into_iter()
            .map(|w| (w.key(), w))
            .collect::<BTreeMap<_, _>>(),
    );
    admin.register_store(&store);
    (admin, store)
}

fn get(admin: &Admin, path: &str) -> (StatusCode, serde_json::Value) {
    let reply = admin_route(admin.state(), &Method::GET, path, None);
    let value = serde_json::from_str(&reply.body).expect("JSON body");
    (reply.status, value)
}

#[test]
fn config_dump_lists_workloads_with_their_enrollment() {
    let (admin, store) = admin();
    let mut hooks = admin.enrollment_hooks();
    hooks.applied(
        store.current().generation,
        &ReconcileReport {
            enrolled: 1,
            failed: vec![(
                workload("b", "198.18.1.11", true).key(),
                "cannot enter netns".into(),
            )],
            ..Default::default()
        },
    );
    let (status, dump) = get(&admin, "/config_dump");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dump["node"]["name"], "n0");
    let rows: Vec<(String, String)> = dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_owned(),
                w["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expect = |n: &str, s: &str| (n.to_owned(), s.to_owned());
    assert_eq!(
        rows,
        [
            expect("a", "enrolled"),
            expect("b", "failed"),
            expect("c", "pending"),
            expect("d", "not enrolled")
        ]
    );
    assert_eq!(dump["workloads"][0]["slot"], 1023);
    assert_eq!(dump["workloads"][0]["netns_cookie"], 4097);
    assert_eq!(dump["workloads"][1]["error"], "cannot enter netns");
    assert_eq!(dump["enrollment"]["enrolled"], 1);
    assert_eq!(dump["agent"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(dump["certificates"], serde_json::json!([]));
    assert_eq!(
        dump["policies"],
        serde_json::json!({"authorization": [], "peer_authentication": [], "errors": [], "warnings": []})
    );
    // A policy not honoured as written is listed with its finding (the
    // log names a new one once).
    let bad: serde_json::Value = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {"action": "NOPE"},
    });
    let mut next = (*store.current()).clone();
    next.policies.authorization = vec![bad];
    store.publish_snapshot(next);
    let (_, dump) = get(&admin, "/config_dump");
    let errors = dump["policies"]["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{dump}");
    assert!(
        errors[0].as_str().is_some_and(|e| e.contains("bad")),
        "{dump}"
    );
    // The enrolled-pods gauge follows the pass.
    let metrics = metrics_route(admin.state(), &Method::GET, "/metrics", None);
    assert!(
        metrics.body.contains("\nmesh_enrolled_pods 1\n"),
        "{}",
        metrics.body
    );
}

#[test]
fn config_dump_shows_routing_objects_and_missing_kinds() {
    let (admin, store) = admin();
    let (_, dump) = get(&admin, "/config_dump");
    assert_eq!(
        dump["routing_objects"]["counts"],
        serde_json::json!({"destination_rules": 0, "virtual_services": 0, "tcp_routes": 0, "http_routes": 0})
    );
    assert_eq!(dump["sources"]["missing_kinds"], serde_json::json!([]));
    let dr = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "shop"}, "spec": {"host": "web"}});
    let vs = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "shop"}, "spec": {"hosts": ["web"]}});
    let mut next = (*store.current()).clone();
    next.routing = crate::state::RoutingObjects {
        destination_rules: vec![dr.clone()],
        virtual_services: vec![vs.clone(), vs.clone()],
        tcp_routes: Vec::new(),
        http_routes: Vec::new(),
    };
    store.publish_snapshot(next);
    store.set_missing_kinds(vec![crate::state::MissingKind {
        resource: "tcproutes.gateway.networking.k8s.io".into(),
        reason: crate::state::MissingReason::NotServed,
    }]);
    let (_, dump) = get(&admin, "/config_dump");
    let r = &dump["routing_objects"];
    assert_eq!(
        r["counts"],
        serde_json::json!({"destination_rules": 1, "virtual_services": 2, "tcp_routes": 0, "http_routes": 0})
    );
    assert_eq!(r["destination_rules"], serde_json::json!([dr]));
    assert_eq!(r["virtual_services"][1], vs);
    assert_eq!(
        dump["sources"]["missing_kinds"],
        serde_json::json!([{"kind": "tcproutes.gateway.networking.k8s.io", "reason": "not_served"}])
    );
}

#[test]
fn readiness_waits_for_every_block() {
    let (admin, _) = admin();
    let datapath = admin.readiness().block("datapath");
    let mut hooks = admin.enrollment_hooks();
    let ready = |a: &Admin| readiness_route(a.state(), &Method::GET, "/healthz/ready", None);
    let r = ready(&admin);
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, "not ready: waiting for datapath, workloads\n");
    datapath.release();
    assert_eq!(ready(&admin).status, StatusCode::SERVICE_UNAVAILABLE);
    hooks.applied(1, &ReconcileReport::default());
    let r = ready(&admin);
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ready\n"));
    // The admin server answers the same.
    assert_eq!(
        admin_route(admin.state(), &Method::GET, "/healthz/ready", None).status,
        StatusCode::OK
    );
    admin.readiness().shutting_down();
    assert_eq!(ready(&admin).status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&admin, "/config_dump").1["agent"]["ready"], false);
}

#[test]
fn logging_reads_and_changes_the_filter() {
    let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
    let _subscriber =
        tracing_subscriber::layer::SubscriberExt::with(tracing_subscriber::registry(), filter);
    let (admin, _) = admin();
    let admin = admin.with_log(logging::LogControl::new(handle));
    let (status, v) = get(&admin, "/logging");
    assert_eq!(
        (status, v["level"].as_str()),
        (StatusCode::OK, Some("info"))
    );
    let r = admin_route(
        admin.state(),
        &Method::POST,
        "/logging",
        Some("level=debug%2Cmesh_agent%3A%3Aproxy%3Dtrace"),
    );
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        get(&admin, "/logging").1["level"],
        "mesh_agent::proxy=trace,debug"
    );
    let r = admin_route(admin.state(), &Method::PUT, "/logging", Some("level=info"));
    assert_eq!(r.status, StatusCode::OK);
    let r = admin_route(
        admin.state(),
        &Method::POST,
        "/logging",
        Some("level=mesh_agent%3Dloud"),
    );
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("invalid log level"), "{}", r.body);
    let r = admin_route(admin.state(), &Method::POST, "/logging", None);
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(get(&admin, "/logging").1["level"], "info");
}

#[test]
fn logging_flush_writes_out_the_gathered_access_lines_on_post_only() {
    // flush_all would write out the batches other tests look at.
    let _serial = crate::telemetry::log_batch::serial();
    let (admin, _store) = admin();
    let r = admin_route(admin.state(), &Method::POST, "/logging/flush", None);
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert!(v["flushed_bytes"].is_u64(), "{v}");
    let r = admin_route(admin.state(), &Method::GET, "/logging/flush", None);
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.body);
}

#[test]
fn stats_connections_and_unknown_paths() {
    let (admin, _) = admin();
    let (status, stats) = get(&admin, "/stats");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["kernel"]["connect_redirected"], 7);
    assert_eq!(stats["proxy"]["completed"], 0);
    assert_eq!(stats["connections"]["open"], 0);
    let tracker = admin.telemetry().open(Connection {
        direction: Direction::Inbound,
        src: Peer::unknown(Some("198.18.2.10:5000".parse().expect("addr"))),
        dst: Peer::from_workload(
            Some("198.18.1.10:8080".parse().expect("addr")),
            &workload("a", "198.18.1.10", true),
            Some("spiffe://cluster.local/ns/default/sa/default"),
        ),
        dst_service: None,
        security_policy: SecurityPolicy::MutualTls,
    });
    let (_, conns) = get(&admin, "/connections");
    assert_eq!(conns[0]["direction"], "inbound");
    assert_eq!(conns[0]["dst"]["workload"], "a");
    assert_eq!(
        conns[0]["dst"]["identity"],
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(conns[0]["security_policy"], "mutual_tls");
    tracker.close(1, 2, Outcome::Closed);
    assert_eq!(get(&admin, "/connections").1, serde_json::json!([]));
    // The proxy part of /stats is derived from what telemetry was told.
    let proxy = &get(&admin, "/stats").1["proxy"];
    assert_eq!(
        (
            &proxy["completed"],
            &proxy["bytes_sent"],
            &proxy["bytes_received"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(2)
        )
    );
    assert_eq!(get(&admin, "/nope").0, StatusCode::NOT_FOUND);
    assert_eq!(
        admin_route(admin.state(), &Method::DELETE, "/config_dump", None).status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let m = metrics_route(admin.state(), &Method::GET, "/metrics", None);
    assert_eq!(m.content_type, metrics::CONTENT_TYPE);
    assert!(
        m.body
            .contains("mesh_ebpf_decisions_total{decision=\"connect_redirected\"} 7")
    );
    assert!(m.body.ends_with("# EOF\n"));
    assert_eq!(
        metrics_route(admin.state(), &Method::GET, "/stats/prometheus", None).status,
        StatusCode::OK
    );
}

#[test]
fn default_addresses_match_their_constants() {
    let d = AdminConfig::default();
    assert_eq!(d.admin_addr.to_string(), DEFAULT_ADMIN_ADDR);
    assert_eq!(d.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
    assert_eq!(d.readiness_addr.to_string(), DEFAULT_READINESS_ADDR);
}

#[test]
fn query_params_are_percent_decoded() {
    assert_eq!(
        query_param("level=debug", "level").as_deref(),
        Some("debug")
    );
    assert_eq!(
        query_param("a=1&level=info%2Cx%3Ddebug", "level").as_deref(),
        Some("info,x=debug")
    );
    assert_eq!(query_param("level=a+b", "level").as_deref(), Some("a b"));
    assert_eq!(query_param("other=1", "level"), None);
    assert_eq!(query_param("level=%zz", "level"), None);
}

/// The three listeners started on loopback ports of their own.
fn on_loopback(admin: &Admin, handle: &tokio::runtime::Handle) -> Listeners {
    let loopback = "127.0.0.1:0".parse().expect("addr");
    admin
        .start(
            &AdminConfig {
                admin_addr: loopback,
                metrics_addr: loopback,
                readiness_addr: loopback,
            },
            handle,
        )
        .expect("start")
}

#[test]
fn servers_answer_over_http_and_the_cli_reads_them() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (admin, _store) = admin();
    let listeners = on_loopback(&admin, runtime.handle());
    // A second agent on the same addresses fails with the flag to change.
    let err = admin
        .start(
            &AdminConfig {
                admin_addr: listeners.admin,
                ..AdminConfig::default()
            },
            runtime.handle(),
        )
        .expect_err("address in use");
    assert!(err.to_string().contains("--admin-addr"), "{err}");

    let block = admin.readiness().block("datapath");
    let (status, body) =
        crate::cli::client::get(listeners.readiness, "/healthz/ready").expect("readiness");
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: waiting for datapath\n")
    );
    drop(block);
    let (status, _) =
        crate::cli::client::get(listeners.readiness, "/healthz/ready").expect("ready");
    assert_eq!(status, 200);
    let (status, text) = crate::cli::client::get(listeners.metrics, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE mesh_enrolled_pods gauge"), "{text}");

    let target = crate::cli::query::Target {
        admin_addr: listeners.admin.to_string(),
        json: true,
    };
    let out =
        crate::cli::query::output(&crate::cli::query::QueryCommand::Workloads(target.clone()))
            .expect("workloads");
    let parsed: serde_json::Value = serde_json::from_str(&out).expect("--json parses");
    assert_eq!(parsed[0]["name"], "a");
    let out = crate::cli::query::output(&crate::cli::query::QueryCommand::Status(
        crate::cli::query::Target {
            json: false,
            ..target
        },
    ))
    .expect("status");
    assert!(out.contains("Node:         n0\n"), "{out}");
    assert!(out.contains(&format!("admin {}", listeners.admin)), "{out}");
    let (status, body) =
        crate::cli::client::request(listeners.admin, "POST", "/logging").expect("logging");
    assert_eq!(status, 400, "{body}");
    runtime.shutdown_background();
}

/// A flood of connections to an admin listener takes at most its slots:
/// one beyond is closed at once, a freed slot serves again.
#[tokio::test]
async fn an_admin_listener_holds_at_most_its_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (admin, _store) = admin();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(super::server::serve(
        listener,
        admin.state().clone(),
        metrics_route,
        super::server::ListenerCaps::ADMIN,
    ));
    let mut held = Vec::new();
    for _ in 0..super::server::MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // Each held connection has its task before the next is accepted.
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 64];
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(3), extra.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    held.pop();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut reply))
            .await;
        if reply.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the freed slot never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The agent's readiness listener holds 4 connections per source address
/// (a fifth is closed at once) and answers the others: one pod cannot keep
/// the kubelet's probe out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_listener_caps_each_source_address() {
    use tokio::io::AsyncReadExt;
    let (admin, _store) = admin();
    let listeners = on_loopback(&admin, &tokio::runtime::Handle::current());
    let from = |source: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from((source, 0)))
            .expect("bind a loopback source");
        socket.connect(listeners.readiness).await.expect("connect")
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(from([127, 0, 3, 1]).await);
    }
    let mut fifth = from([127, 0, 3, 1]).await;
    let mut buf = [0u8; 1];
    // Well inside the 2 s request-head deadline that closes idle ones.
    let closed =
        tokio::time::timeout(std::time::Duration::from_millis(300), fifth.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    let (status, body) = tokio::task::spawn_blocking(move || {
        crate::cli::client::get(listeners.readiness, "/healthz/ready")
    })
    .await
    .expect("join")
    .expect("readiness");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    drop(held);
}
