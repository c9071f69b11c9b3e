//! Waypoint enrollment (issue 12, the node-agent side) in the lab: real
//! kernels, real agents, real HBONE. The client pod `a` runs on node 0; the
//! service `web` (VIP 198.18.200.1:80, target port 8080) has its endpoint
//! `web` on node 1; the waypoint `wp` (Service `wp`, port 15008) is a pod of
//! node 1 that is NOT enrolled, where the test itself serves HBONE as a
//! fake waypoint (the agent's own TLS and HBONE code, a waypoint identity
//! from the lab CA): it records each `CONNECT` target and the client's
//! identity, and echoes the stream. Where traffic landed is read from the
//! fake's record and from node 1's agent (`istio_tcp_connections_opened_total`
//! as the destination reports it), never from the sending agent's choice.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use common::{Mesh, in_netns};
use mesh_agent::{
    admin::DEFAULT_ADMIN_ADDR,
    cli::client,
    identity::{CertManager, LocalCa, MeshCa, MeshTls, SpiffeId, TrustDomain, peer_identity},
    proxy::hbone::{connect_target, respond_status, server_handshake},
};
use mesh_lab::{LabSpec, NodeSpec, PodSpec};
use tokio::task::JoinSet;

const VIP: &str = "198.18.200.1:80";

/// What the fake waypoint saw: each `CONNECT` target with the client's
/// SPIFFE identity.
type Seen = Arc<Mutex<Vec<(SocketAddr, String)>>>;

/// A fake waypoint serving HBONE on `[::]:15008`... in `pod`'s netns, as
/// `spiffe://cluster.local/ns/default/sa/<pod>`; dropping it (or
/// [`FakeWaypoint::stop`]) closes the listener and every connection.
struct FakeWaypoint {
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl FakeWaypoint {
    fn start(rt: &tokio::runtime::Runtime, mesh: &Mesh, pod: &str) -> Self {
        let netns = mesh.lab.pod(pod).expect("pod").netns_path();
        let listener = in_netns(&netns, || {
            std::net::TcpListener::bind("0.0.0.0:15008").expect("bind 15008 in the waypoint pod")
        });
        listener.set_nonblocking(true).expect("nonblocking");
        let td = TrustDomain::new("cluster.local").expect("td");
        let ca = LocalCa::new(
            Arc::new(MeshCa::load_dir(&mesh.ca_dir()).expect("lab CA")),
            td.clone(),
        );
        let tls = MeshTls::new(Arc::new(CertManager::new(Arc::new(ca)))).expect("mesh TLS");
        let id = SpiffeId::new(td, "default", pod).expect("waypoint id");
        let seen: Seen = Arc::default();
        let record = seen.clone();
        // The certificate first, so that the server answers from its first connection.
        rt.block_on(tls.manager().fetch(&id))
            .expect("waypoint certificate");
        let task = rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config(&id));
            // Aborting this task drops the set: every connection goes with it.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen) = (acceptor.clone(), record.clone());
                conns.spawn(serve(acceptor, tcp, seen));
            }
        });
        Self { seen, task }
    }

    fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().expect("lock").clone()
    }

    /// Stops serving: the listener closes (connects are refused) and open
    /// tunnels are cut.
    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for FakeWaypoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HBONE connection: mTLS, then each `CONNECT` recorded and echoed.
async fn serve(acceptor: tokio_rustls::TlsAcceptor, tcp: tokio::net::TcpStream, seen: Seen) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| peer_identity(c).ok())
        .map(|id| id.to_string())
        .unwrap_or_default();
    let Ok(mut h2) = server_handshake(tls, 100, mesh_agent::proxy::hbone::CONNECTION_WINDOW).await
    else {
        return;
    };
    let mut streams = JoinSet::new();
    while let Some(Ok((req, mut respond))) = h2.accept().await {
        let target = match connect_target(&req) {
            Ok(t) => t,
            Err(status) => {
                respond_status(&mut respond, status);
                continue;
            }
        };
        seen.lock().expect("lock").push((target, peer.clone()));
        streams.spawn(echo(req.into_body(), respond));
    }
}

/// Answers 200 and sends back every byte of the stream.
async fn echo(mut body: h2::RecvStream, mut respond: h2::server::SendResponse<Bytes>) {
    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// `a` on node 0; `web` (enrolled, echo on 8080) and `wp` (not enrolled)
/// on node 1; agents on both. Node 0's file: the namespace `default`
/// labelled `istio.io/use-waypoint: wp`, the service `web` with
/// `web_labels`, the waypoint's Service `wp` (port 15008, endpoints `wp_endpoints`).
fn node0_file(mesh: &Mesh, web_labels: &str, wp_endpoints: &str) -> String {
    let mut text = mesh.workloads_yaml(0, &[("a", true)], &[("web", true), ("wp", false)]);
    text.push_str(&format!(
        "namespaces:\n  - name: default\n    labels: {{istio.io/use-waypoint: wp}}\n\
         services:\n  - name: web\n    vips: [\"198.18.200.1\"]\n    ports: [{{name: tcp, port: 80, targetPort: 8080}}]\n    endpoints: [web]\n    labels: {{{web_labels}}}\n\
         \x20 - name: wp\n    vips: [\"198.18.200.9\"]\n    ports: [{{name: mesh, port: 15008}}]\n    endpoints: [{wp_endpoints}]\n"
    ));
    text
}

fn mesh() -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(NodeSpec::new().pod(PodSpec::new("a")))
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("web"))
                    .pod(PodSpec::new("wp")),
            ),
    );
    mesh.write_workload_text(0, &node0_file(&mesh, "", "wp"));
    let n1 = mesh.workloads_yaml(1, &[("web", true), ("wp", false)], &[("a", true)]);
    mesh.write_workload_text(1, &n1);
    mesh.echo("web", &[8080]);
    mesh.start_agent(0);
    mesh.start_agent(1);
    mesh
}

fn runtime() -> tokio::runtime::Runtime {
    common::rogue::multi_thread_runtime()
}

/// Connections node 1's agent delivered to `web` (as the destination reports them).
fn landed_on_web(mesh: &Mesh) -> u64 {
    mesh.metrics_text(1)
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
        .filter(|l| {
            l.contains("reporter=\"destination\"") && l.contains("destination_workload=\"web\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Node `node`'s proxy counter `name` (`/stats`).
fn proxy_counter(mesh: &Mesh, node: usize, name: &str) -> u64 {
    let netns = mesh.lab.node(node).expect("node").netns_path();
    let addr = DEFAULT_ADMIN_ADDR.parse().expect("admin address");
    let stats = in_netns(&netns, || client::get_json(addr, "/stats")).expect("GET /stats");
    stats["proxy"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no proxy counter {name}: {stats:#}"))
}

/// The access-log lines of node 0's agent that contain every `needle`.
fn access_lines(mesh: &Mesh, needles: &[&str]) -> Vec<String> {
    mesh.agent(0)
        .log_contents()
        .expect("agent log")
        .lines()
        .filter(|l| l.contains("access: connection closed"))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_service_in_a_waypoint_namespace_is_reached_through_its_waypoint_and_fails_closed_without_it() {
    let rt = runtime();
    let mesh = mesh();
    let waypoint = FakeWaypoint::start(&rt, &mesh, "wp");

    // The namespace's label gives `web` its waypoint (config_dump says whose).
    let dump = mesh.config_dump(0);
    let web = dump["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == "web")
        .cloned()
        .expect("web in the dump");
    assert_eq!(
        web["waypoint"],
        serde_json::json!({"namespace": "default", "name": "wp", "from": "namespace"}),
        "{web:#}"
    );
    assert_eq!(
        dump["routes"]["waypoints"],
        serde_json::json!([{"service": "default/web", "waypoint": "default/wp", "from": "namespace"}]),
        "mesh-agent routes says the waypoint routes web"
    );

    // Through the waypoint: CONNECT to the VIP:port itself, under a's identity.
    let r = mesh.client("a", VIP, &["--conns", "3"]);
    assert_eq!((r.ok, r.failed), (3, 0), "{r:?}");
    let vip: SocketAddr = VIP.parse().expect("vip");
    assert_eq!(
        waypoint.seen(),
        vec![(vip, "spiffe://cluster.local/ns/default/sa/a".to_owned()); 3],
        "the waypoint saw every connection, addressed to the service"
    );
    assert_eq!(landed_on_web(&mesh), 0, "nothing went around the waypoint");
    assert_eq!(
        access_lines(
            &mesh,
            &[
                "direction=\"outbound\"",
                "waypoint=\"default/wp\"",
                "dst.identity=\"spiffe://cluster.local/ns/default/sa/wp\"",
                "outcome=\"closed\"",
            ]
        )
        .len(),
        3
    );

    // `none` on the service opts it out of its namespace's waypoint: straight to the endpoint.
    mesh.write_workload_text_applied(0, &node0_file(&mesh, "istio.io/use-waypoint: none", "wp"));
    let r = mesh.client("a", VIP, &["--conns", "2"]);
    assert_eq!((r.ok, r.failed), (2, 0), "{r:?}");
    assert_eq!(landed_on_web(&mesh), 2);
    assert_eq!(waypoint.seen().len(), 3, "the waypoint saw nothing more");

    // Back through the waypoint, which is now down: refused, counted,
    // logged with the reason, and never sent to the endpoint.
    mesh.write_workload_text_applied(0, &node0_file(&mesh, "", "wp"));
    waypoint.stop();
    let before = proxy_counter(&mesh, 0, "waypoint_unavailable");
    let r = mesh.client("a", VIP, &["--conns", "2"]);
    assert_eq!((r.ok, r.failed), (0, 2), "{r:?}");
    assert_eq!(proxy_counter(&mesh, 0, "waypoint_unavailable") - before, 2);
    assert_eq!(
        landed_on_web(&mesh),
        2,
        "fail closed: no bypass to the endpoint"
    );
    assert_eq!(waypoint.seen().len(), 3);
    let refused = access_lines(
        &mesh,
        &[
            "waypoint=\"default/wp\"",
            "outcome=\"connect_failed\"",
            "waypoint default/wp unavailable",
        ],
    );
    assert_eq!(refused.len(), 2, "{refused:#?}");

    // A waypoint with no ready pod: the same, with the reason.
    mesh.write_workload_text_applied(0, &node0_file(&mesh, "", ""));
    let r = mesh.client("a", VIP, &["--conns", "1"]);
    assert_eq!((r.ok, r.failed), (0, 1), "{r:?}");
    assert_eq!(proxy_counter(&mesh, 0, "waypoint_unavailable") - before, 3);
    assert_eq!(landed_on_web(&mesh), 2);
    assert_eq!(
        access_lines(&mesh, &["waypoint=\"default/wp\"", "has no ready endpoint"]).len(),
        1
    );

    // The waypoint's second hop: a CONNECT to the endpoint pod's own
    // address:port under the waypoint's identity is accepted by the
    // destination agent as any mesh peer's.
    let wp_netns = mesh.lab.pod("wp").expect("wp").netns_path();
    let web_ip = mesh.lab.pod("web").expect("web").ipv4();
    let status = rt.block_on(common::rogue::connect(
        &wp_netns,
        SocketAddr::new(web_ip.into(), 15008),
        &common::rogue::mesh_cert(&mesh, "wp"),
        SocketAddr::new(web_ip.into(), 8080),
    ));
    assert_eq!(status, Ok(200));
}

/// Istio's workload-addressed traffic: a connection to a pod's own
/// address goes through the pod's waypoint (here its namespace's) only
/// when the waypoint takes workload traffic (`istio.io/waypoint-for` on
/// its Service): a CONNECT to the pod's address itself, and fail closed
/// when the waypoint is down.
#[test]
fn a_pod_addressed_by_its_own_ip_goes_through_a_waypoint_that_takes_workload_traffic() {
    let rt = runtime();
    let mesh = mesh();
    let waypoint = FakeWaypoint::start(&rt, &mesh, "wp");
    let web_ip = mesh.lab.pod("web").expect("web").ipv4();
    let pod = SocketAddr::new(web_ip.into(), 8080);

    // The waypoint takes service traffic only (no label): straight to the pod.
    let r = mesh.client("a", &pod.to_string(), &["--conns", "2"]);
    assert_eq!((r.ok, r.failed), (2, 0), "{r:?}");
    assert_eq!(landed_on_web(&mesh), 2);
    assert!(waypoint.seen().is_empty(), "{:?}", waypoint.seen());

    // `istio.io/waypoint-for: all`: the pod's traffic goes through it,
    // addressed to the pod itself (the waypoint's own pod does not).
    let scoped = |mesh: &Mesh| {
        node0_file(mesh, "", "wp").replace(
            "  - name: wp\n    vips:",
            "  - name: wp\n    labels: {istio.io/waypoint-for: all}\n    vips:",
        )
    };
    mesh.write_workload_text_applied(0, &scoped(&mesh));
    let dump = mesh.config_dump(0);
    assert_eq!(
        dump["routes"]["waypoints"],
        serde_json::json!([
            {"service": "default/web", "waypoint": "default/wp", "from": "namespace"},
            {"pod": "default/a", "waypoint": "default/wp", "from": "namespace"},
            {"pod": "default/web", "waypoint": "default/wp", "from": "namespace"},
        ]),
        "{:#}",
        dump["routes"]
    );
    let r = mesh.client("a", &pod.to_string(), &["--conns", "3"]);
    assert_eq!((r.ok, r.failed), (3, 0), "{r:?}");
    assert_eq!(
        waypoint.seen(),
        vec![(pod, "spiffe://cluster.local/ns/default/sa/a".to_owned()); 3],
        "the waypoint saw every connection, addressed to the pod"
    );
    assert_eq!(landed_on_web(&mesh), 2, "nothing went around the waypoint");

    // The waypoint down: the pod's connections fail closed, counted.
    waypoint.stop();
    let before = proxy_counter(&mesh, 0, "waypoint_unavailable");
    let r = mesh.client("a", &pod.to_string(), &["--conns", "1"]);
    assert_eq!((r.ok, r.failed), (0, 1), "{r:?}");
    assert_eq!(proxy_counter(&mesh, 0, "waypoint_unavailable") - before, 1);
    assert_eq!(landed_on_web(&mesh), 2, "fail closed: no bypass to the pod");
}

/// The real `mesh-waypoint` binary, built next to the agent (`cargo build
/// --workspace --bins`, as `cargo xtask test` does before the lab tests).
fn waypoint_bin() -> std::path::PathBuf {
    let bin = common::agent_bin().with_file_name("mesh-waypoint");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p mesh-waypoint` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Both halves of issue 12 together: the client's agent sends the service's
/// traffic to the REAL waypoint binary (in the non-enrolled pod `wp`, its
/// certificate from the lab CA), which routes the HTTP request by an
/// HTTPRoute and reaches the endpoint over HBONE through the destination
/// agent, under the waypoint's identity.
#[test]
fn the_real_waypoint_routes_http_between_two_agents_over_hbone() {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(NodeSpec::new().pod(PodSpec::new("a")))
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("web"))
                    .pod(PodSpec::new("wp")),
            ),
    );
    // Node 0: `default` uses waypoint `wp`; service web (VIP:80 -> 8081).
    let mut n0 = mesh.workloads_yaml(0, &[("a", true)], &[("web", true), ("wp", false)]);
    n0.push_str(
        "namespaces:\n  - name: default\n    labels: {istio.io/use-waypoint: wp}\n\
         services:\n  - name: web\n    vips: [\"198.18.200.1\"]\n    ports: [{name: http, port: 80, targetPort: 8081}]\n    endpoints: [web]\n\
         \x20 - name: wp\n    labels: {istio.io/waypoint-for: all}\n    vips: [\"198.18.200.9\"]\n    ports: [{name: mesh, port: 15008}]\n    endpoints: [wp]\n",
    );
    mesh.write_workload_text(0, &n0);
    let n1 = mesh.workloads_yaml(1, &[("web", true), ("wp", false)], &[("a", true)]);
    mesh.write_workload_text(1, &n1);

    // web serves a file over HTTP/1.1 on 8081.
    let web_ip = mesh.lab.pod("web").expect("web").ips()[0];
    let docroot = mesh.lab.scratch_path("web-docroot");
    std::fs::create_dir_all(&docroot).expect("docroot");
    std::fs::write(docroot.join("hello.txt"), "served by web\n").expect("file");
    let mut http = std::process::Command::new("python3");
    http.args(["-m", "http.server", "8081", "--bind", &web_ip.to_string()])
        .arg("--directory")
        .arg(&docroot);
    let _http = mesh.lab.spawn_in_pod("web", http).expect("http server");

    // The waypoint: service web, its endpoint over HBONE, and an HTTPRoute
    // (GAMMA: parentRef the Service) that the waypoint must accept.
    let ca_dir = mesh.ca_dir();
    let wp_ip = mesh.lab.pod("wp").expect("wp").ips()[0];
    let config = mesh.lab.scratch_path("waypoint.yaml");
    std::fs::write(
        &config,
        format!(
            "services:\n  - name: web\n    namespace: default\n    addresses: [198.18.200.1]\n    ports: [{{ port: 80, targetPort: 8081, protocol: http }}]\n    endpoints:\n      - {{ address: {web_ip}, tunnel: hbone, workload: web, serviceAccount: web }}\n\
             workloads:\n  - {{ name: web, namespace: default, addresses: [{web_ip}], tunnel: hbone, serviceAccount: web }}\n\
             routes:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    metadata: {{ name: web, namespace: default }}\n    spec:\n      parentRefs: [{{ group: \"\", kind: Service, name: web, port: 80 }}]\n      rules:\n        - filters: [{{ type: ResponseHeaderModifier, responseHeaderModifier: {{ add: [{{ name: x-routed-by, value: waypoint }}] }} }}]\n          backendRefs: [{{ name: web, port: 80 }}]\n\
             policies:\n  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{ name: no-secrets, namespace: default }}\n    spec:\n      targetRefs: [{{ kind: Service, group: \"\", name: web }}]\n      action: DENY\n      rules: [{{ to: [{{ operation: {{ paths: [\"/secret*\"] }} }}] }}]\n"
        ),
    )
    .expect("waypoint config");
    let mut wp = std::process::Command::new(waypoint_bin());
    wp.args(["run", "--listen", &format!("{wp_ip}:15008")])
        .args(["--admin", "127.0.0.1:15020"])
        .args(["--identity", "spiffe://cluster.local/ns/default/sa/wp"])
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--config")
        .arg(&config)
        .env("MESH_LOG", "info");
    let waypoint = mesh.lab.spawn_in_pod("wp", wp).expect("waypoint");
    mesh.start_agent(0);
    mesh.start_agent(1);

    // Until the waypoint listens, the client's connections fail closed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        let mut get = std::process::Command::new(mesh_lab::lab_app_path().expect("mesh-lab-app"));
        get.args(["get", "--connect", VIP, "--path", "/hello.txt"]);
        let out = mesh.lab.run_in_pod("a", get).expect("get");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 200 through the waypoint: {}\nwaypoint log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            waypoint.log_contents().unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(body, "served by web\n");
    // An L7 policy attached to the service (targetRefs) is the waypoint's
    // to enforce: the path is denied there with Envoy's 403, even spelled
    // with a dot segment.
    std::fs::write(docroot.join("secret.txt"), "secret\n").expect("file");
    for path in ["/secret.txt", "/x/../secret.txt"] {
        let mut get = std::process::Command::new(mesh_lab::lab_app_path().expect("mesh-lab-app"));
        get.args(["get", "--connect", VIP, "--path", path]);
        let out = mesh.lab.run_in_pod("a", get).expect("get");
        assert!(!out.status.success(), "{path} was served");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "RBAC: access denied",
            "{path}"
        );
    }

    // The pod's own address (the waypoint takes workload traffic too):
    // through the waypoint, which sends it to the pod itself.
    let direct = SocketAddr::new(web_ip, 8081).to_string();
    let mut get = std::process::Command::new(mesh_lab::lab_app_path().expect("mesh-lab-app"));
    get.args(["get", "--connect", &direct, "--path", "/hello.txt"]);
    let out = mesh.lab.run_in_pod("a", get).expect("get");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "served by web\n");

    // The waypoint counted the request (reporter="waypoint", 200, the
    // client's identity as the source) ...
    let wp_netns = mesh.lab.pod("wp").expect("wp").netns_path();
    let admin: SocketAddr = "127.0.0.1:15020".parse().expect("addr");
    let (status, metrics) =
        in_netns(&wp_netns, || client::get(admin, "/metrics")).expect("waypoint metrics");
    assert_eq!(status, 200);
    let served: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| {
            l.contains("reporter=\"waypoint\"")
                && l.contains("response_code=\"200\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/a\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(served >= 1, "{metrics}");
    // ... the pod-addressed one with no destination service, the pod as
    // the destination ...
    let to_pod: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| {
            l.contains("reporter=\"waypoint\"")
                && l.contains("response_code=\"200\"")
                && l.contains("destination_service=\"unknown\"")
                && l.contains("destination_workload=\"web\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(to_pod, 1, "{metrics}");
    let denied: u64 = metrics
        .lines()
        .filter(|l| {
            // An RBAC denial as Istio counts it: 403, no response flag.
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"waypoint\"")
                && l.contains("response_code=\"403\"")
                && l.contains("response_flags=\"-\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/a\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(denied, 2, "{metrics}");
    let (_, dump) =
        in_netns(&wp_netns, || client::get(admin, "/config_dump")).expect("waypoint dump");
    assert!(
        dump.contains("\"default/web\""),
        "the HTTPRoute is in use: {dump}"
    );
    // ... and the destination agent delivered it from the waypoint's
    // identity (the second hop), not the client's.
    let log = mesh.agent(1).log_contents().expect("node 1 log");
    assert!(
        log.lines().any(|l| l.contains("access: connection closed")
            && l.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/wp\"")
            && l.contains("dst.workload=\"web\"")),
        "{log}"
    );
}
