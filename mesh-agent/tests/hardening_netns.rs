//! Hardening (issue 9, items 6 and 7): a workload's netns path is not trusted
//! blindly (never the agent's or the host's netns, never one netns for two
//! pods), the metrics endpoint is not exposed to pods or the node link by
//! default, and the agent refuses to start with an expired mesh CA.

mod common;
mod kube_fake;

use std::{path::Path, process::Command};

use common::{Mesh, agent_bin, delta, in_netns, listener_in_netns};
use mesh_agent::cli::client;
use mesh_lab::{LabSpec, NodeSpec, PodSpec, app::ProbeOutcome, lab_app_path};
use serde_json::Value;

const ADMIN: &str = "127.0.0.1:15000";

/// The agent's workloads (`mesh-agent workloads --json`, run in the node),
/// by pod name: (status, error).
fn workloads(mesh: &Mesh) -> std::collections::BTreeMap<String, (String, String)> {
    let mut cmd = Command::new(agent_bin());
    cmd.args(["workloads", "--json", "--admin-addr", ADMIN]);
    let out = mesh.lab.run_in_node(0, cmd).expect("mesh-agent workloads");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).expect("workloads JSON");
    rows.as_array()
        .expect("array")
        .iter()
        .map(|w| {
            let s = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
            (s("name"), (s("status"), s("error")))
        })
        .collect()
}

/// A workload-file entry for pod `name` claiming the netns at `netns`.
fn pod_entry(name: &str, ip: &str, netns: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: default\n    serviceAccount: {name}\n    \
         ips: [\"{ip}\"]\n    netns: {netns}\n    enrolled: true\n"
    )
}

fn one_node() -> Mesh {
    Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new("a"))
                .pod(PodSpec::new("b"))
                .pod(PodSpec::new("c"))
                .pod(PodSpec::new("d")),
        ),
    )
}

#[test]
fn a_pod_claiming_the_agents_or_the_nodes_netns_is_refused_and_node_traffic_is_not_captured() {
    let mut mesh = one_node();
    let node_netns = mesh.lab.node(0).expect("node").netns_path();
    let mut text = mesh
        .lab
        .workload_file_yaml(0, &[("a", true), ("b", true), ("c", false), ("d", false)]);
    text.push_str(&pod_entry("self-ns", "192.0.2.10", "/proc/self/ns/net"));
    text.push_str(&pod_entry(
        "node-ns",
        "192.0.2.11",
        &node_netns.display().to_string(),
    ));
    mesh.write_workload_text(0, &text);
    mesh.echo("b", &[8080]);
    mesh.echo("c", &[8080]);
    mesh.start_agent(0);

    // Both are refused, with the reason; the real pods are enrolled.
    let rows = workloads(&mesh);
    for name in ["self-ns", "node-ns"] {
        let (status, error) = &rows[name];
        assert_eq!(status, "failed", "{name}: {rows:?}");
        assert!(
            error.contains("the agent's own network namespace")
                && error.contains("refusing to enroll it"),
            "{name}: {error}"
        );
    }
    assert_eq!(rows["a"].0, "enrolled", "{rows:?}");
    assert_eq!(rows["b"].0, "enrolled", "{rows:?}");
    let (_, metrics) = get_from(&node_netns, "127.0.0.1:15020".into(), "/metrics");
    assert!(
        metrics.contains("\nmesh_enrolled_pods 2\n")
            && metrics.contains("\nmesh_enrollment_failed_pods 2\n"),
        "{metrics}"
    );
    let log = mesh.agent(0).log_contents().expect("log");
    assert!(
        log.contains("pod enrollment failed") && log.contains("pod=default/self-ns"),
        "{log}"
    );

    // A process of the node (in the cgroup the programs cover, in the node's
    // netns) connecting out is not captured: it reaches c directly.
    let before = mesh.counters(0);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node_netns.display()))
        .arg(lab_app_path().expect("mesh-lab-app"))
        .args(["probe", "--connect", &mesh.v4("c", 8080)]);
    let out = mesh.lab.run_in_pod("c", cmd).expect("probe from the node");
    assert_eq!(
        ProbeOutcome::from_output(&out).expect("probe outcome"),
        ProbeOutcome::Echoed,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 0);
    assert!(
        delta(&before, &after, "connect_not_enrolled") >= 1,
        "the probe did not go through the connect program: {before:?} -> {after:?}"
    );
    // The enrolled pods still work.
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    mesh.stop_agent(0);
}

#[test]
fn two_pods_sharing_one_netns_the_second_is_refused_and_the_first_keeps_working() {
    let mut mesh = one_node();
    let base = mesh
        .lab
        .workload_file_yaml(0, &[("a", true), ("b", true), ("c", false), ("d", false)]);
    mesh.write_workload_text(0, &base);
    mesh.echo("b", &[8080]);
    mesh.echo("d", &[8080]);
    mesh.start_agent(0);
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );

    // b-twin claims the netns of b (enrolled); x and y arrive together,
    // both claiming the netns of d. Each through another path than its
    // sibling's (the file source already refuses the same path twice): the
    // netns of the pod's process, as the Kubernetes source finds it.
    let proc_netns = |app: usize| format!("/proc/{}/ns/net", mesh.apps[app].pid());
    let d_netns = mesh
        .lab
        .pod("d")
        .expect("pod")
        .netns_path()
        .display()
        .to_string();
    let mut text = base.clone();
    text.push_str(&pod_entry("b-twin", "192.0.2.20", &proc_netns(0)));
    text.push_str(&pod_entry("x", "192.0.2.21", &d_netns));
    text.push_str(&pod_entry("y", "192.0.2.22", &proc_netns(1)));
    mesh.write_workload_text_applied(0, &text);

    let rows = workloads(&mesh);
    for (pod, other) in [
        ("b-twin", "default/b"),
        ("x", "default/y"),
        ("y", "default/x"),
    ] {
        let (status, error) = &rows[pod];
        assert_eq!(status, "failed", "{pod}: {rows:?}");
        assert!(
            error.contains(&format!("also claimed by pod {other}")),
            "{pod}: {error}"
        );
    }
    assert_eq!(rows["b"].0, "enrolled", "{rows:?}");
    // b keeps working, through the agent.
    let before = mesh.counters(0);
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(delta(&before, &mesh.counters(0), "connect_redirected"), 1);
    // d was never enrolled (neither claimant won): reached directly.
    assert_eq!(
        mesh.probe("c", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    // The status and the reason are in `mesh-agent status` too.
    let mut cmd = Command::new(agent_bin());
    cmd.args(["status", "--admin-addr", ADMIN]);
    let out = mesh.lab.run_in_node(0, cmd).expect("status");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("3 failed"), "{status}");
    // And in the metrics (on the node's loopback).
    let node = mesh.lab.node(0).expect("node").netns_path();
    let (_, metrics) = get_from(&node, "127.0.0.1:15020".into(), "/metrics");
    assert!(
        metrics.contains("\nmesh_enrollment_failed_pods 3\n"),
        "{metrics}"
    );
    mesh.stop_agent(0);
}

/// `GET path` on `addr` from the netns at `netns`.
fn get_from(netns: &Path, addr: String, path: &str) -> (u16, String) {
    let addr = addr.parse().expect("addr");
    in_netns(netns, || client::get(addr, path)).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

/// Whether a connection to `addr` from the netns at `netns` is refused
/// (the address is reachable, nothing listens there for that peer).
fn refused(netns: &Path, addr: String) -> bool {
    let addr = addr.parse().expect("addr");
    let connect = in_netns(netns, || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
    });
    match connect {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => true,
        Err(e) => panic!("connect to {addr}: {e} (the address should be reachable)"),
    }
}

#[test]
fn metrics_are_not_served_to_pods_or_the_node_link_by_default() {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("a"))
                    .pod(PodSpec::new("b"))
                    .pod(PodSpec::new("c")),
            )
            .node(NodeSpec::new().pod(PodSpec::new("e"))),
    );
    mesh.write_workloads(0, &[("a", true), ("b", true), ("c", false)]);
    // The lab's CA, made to expire in 10 days: the agent warns at start.
    let out = Command::new(agent_bin())
        .args(["ca", "init", "--days", "10", "--out"])
        .arg(mesh.lab.scratch_path("ca"))
        .output()
        .expect("ca init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mesh.start_agent(0);
    // The warning is the subject, and only the log carries it (the
    // `mesh_ca_expiring` gauge is computed at each scrape, not by the check).
    // The first check runs before the agent reports ready: no wait.
    assert_eq!(mesh.agent_log_count(0, "the mesh CA expires soon"), 1);
    let node = mesh.lab.node(0).expect("node").clone();
    let pod_c = mesh.lab.pod("c").expect("c").netns_path();
    // Another node on the node link.
    let peer = mesh.lab.node(1).expect("node 1").netns_path();
    let (bridge, link) = (node.bridge_v4(), node.link_v4());

    // Readiness stays reachable for the kubelet (from a pod, through its
    // gateway, the node's bridge address; from the node link) and says
    // nothing else.
    for (from, addr) in [(&pod_c, bridge), (&peer, link)] {
        assert_eq!(
            get_from(from, format!("{addr}:15021"), "/healthz/ready"),
            (200, "ready\n".to_owned())
        );
        for path in [
            "/metrics",
            "/stats/prometheus",
            "/config_dump",
            "/stats",
            "/connections",
        ] {
            let (status, _) = get_from(from, format!("{addr}:15021"), path);
            assert_eq!(status, 404, "{path} on the readiness port");
        }
    }
    // Metrics: not from a pod, not from the node link.
    assert!(refused(&pod_c, format!("{bridge}:15020")));
    assert!(refused(&peer, format!("{link}:15020")));
    // On the node's loopback, with the workloads' identities.
    let (status, body) = get_from(&node.netns_path(), "127.0.0.1:15020".into(), "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("mesh_enrolled_pods 2"), "{body}");
    assert!(body.contains("\nmesh_ca_expiring 1\n"), "{body}");
    mesh.stop_agent(0);

    // With a pod IP (here the node link's address), metrics are served
    // there, and only there.
    mesh.start_agent_with(0, &["--pod-ip", &link.to_string()]);
    let (status, body) = get_from(&peer, format!("{link}:15020"), "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("mesh_enrolled_pods 2"), "{body}");
    assert!(refused(&pod_c, format!("{bridge}:15020")));
    assert!(
        mesh.agent(0)
            .log_contents()
            .expect("log")
            .contains(&format!("metrics={link}:15020")),
        "the start-up line names the metrics address"
    );
    mesh.stop_agent(0);

    // --metrics-loopback wins over the pod IP.
    mesh.start_agent_with(0, &["--pod-ip", &link.to_string(), "--metrics-loopback"]);
    assert!(refused(&peer, format!("{link}:15020")));
    let (status, _) = get_from(&node.netns_path(), "127.0.0.1:15020".into(), "/metrics");
    assert_eq!(status, 200);
    mesh.stop_agent(0);
}

/// A self-signed CA (`ca.crt`, `ca.key`) valid between the two instants, in a new directory.
fn ca_dir_valid_between(
    name: &str,
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let dir = std::env::temp_dir().join(format!("mesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(dir.join("ca.crt"), cert.pem()).expect("write ca.crt");
    std::fs::write(dir.join("ca.key"), key.serialize_pem()).expect("write ca.key");
    std::fs::write(dir.join("workloads.yaml"), "node:\n  name: n0\npods: []\n")
        .expect("write workloads");
    dir
}

#[test]
fn the_agent_refuses_to_start_with_an_expired_or_not_yet_valid_ca() {
    common::require_root();
    let day = std::time::Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    for (name, not_before, not_after, want) in [
        ("expired-ca", now - 30 * day, now - day, "expired at"),
        (
            "future-ca",
            now + day,
            now + 30 * day,
            "is not valid before",
        ),
    ] {
        let dir = ca_dir_valid_between(name, not_before, not_after);
        let out = Command::new(agent_bin())
            .args([
                "run",
                "--pin-dir",
                "/sys/fs/bpf/mesh-expired-ca-test",
                "--ca-dir",
            ])
            .arg(&dir)
            .arg("--workloads")
            .arg(dir.join("workloads.yaml"))
            .output()
            .expect("mesh-agent run");
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the agent started: {stderr}");
        assert!(
            stderr.contains("error: the CA certificate in") && stderr.contains(want),
            "{name}: {stderr}"
        );
        assert!(
            !std::path::Path::new("/sys/fs/bpf/mesh-expired-ca-test").exists(),
            "{name}: the datapath was loaded before the CA was checked"
        );
    }
}

#[test]
fn in_kubernetes_mode_a_pod_whose_process_is_in_the_node_netns_is_refused() {
    use kube_fake::{FakeApiServer, objects};
    use serde_json::json;
    const UID_GOOD: &str = "9006d0-0001";
    const UID_HOST: &str = "4057e7-0002";
    let (good, host) = (format!("pod{UID_GOOD}"), format!("pod{UID_HOST}"));
    let mut mesh = Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new(good.as_str()))
                .pod(PodSpec::new(host.as_str())),
        ),
    );
    let node = mesh.lab.node(0).expect("node").clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = listener_in_netns(&node.netns_path());
    let api = runtime.block_on(FakeApiServer::start_on(listener));
    api.apply(objects::namespace(
        "shop",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    api.apply(objects::node(node.name(), &node.bridge_v4().to_string()));
    for (name, uid, lab_pod) in [("good", UID_GOOD, &good), ("host", UID_HOST, &host)] {
        let ip = mesh.lab.pod(lab_pod).expect("pod").ipv4().to_string();
        api.apply(objects::pod(
            "shop",
            name,
            uid,
            node.name(),
            &[&ip],
            json!({}),
        ));
    }
    // good's process is in its own netns; host's process is in its pod's
    // cgroup but in the node's netns (as a hostNetwork pod's would be): the
    // /proc discovery finds the node's netns for it.
    mesh.echo(&good, &[8080]);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.netns_path().display()))
        .arg(lab_app_path().expect("mesh-lab-app"))
        .args(["echo", "--listen", "127.0.0.1:18080"]);
    let child = mesh.lab.spawn_in_pod(&host, cmd).expect("spawn host app");
    child
        .wait_for_log("listening", std::time::Duration::from_secs(10))
        .expect("host app listening");
    mesh.apps.push(child);

    mesh.write_workloads(0, &[]); // not read in --kube mode
    let url = api.url();
    mesh.start_agent_with(
        0,
        &["--kube", "--api-server", &url, "--node-name", node.name()],
    );
    mesh.wait_workload_status(0, &[("good", "enrolled"), ("host", "failed")]);
    let rows = workloads(&mesh);
    assert_eq!(rows["good"].0, "enrolled", "{rows:?}");
    let (status, error) = &rows["host"];
    assert_eq!(status, "failed", "{rows:?}");
    assert!(
        error.contains("the agent's own network namespace") && error.contains("/ns/net"),
        "{error}"
    );
    mesh.stop_agent(0);
    drop(api);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
}

/// The sockets a pod's worker makes ahead (so that a connection does not
/// wait for a hop to the worker's thread) are made inside the pod's netns,
/// never the agent's, whether spare or made on demand; a pod keeps no more
/// than the bound per family, and they are refilled after a burst.
#[test]
fn sockets_made_ahead_for_a_pod_are_made_in_its_netns_and_bounded() {
    use mesh_agent::datapath::netns::{self, NetnsWorker, SPARE_REFILL_AT, SPARE_SOCKETS};
    use socket2::Domain;
    common::require_root();
    let mesh = Mesh::new(LabSpec::new().node(NodeSpec::new().pod(PodSpec::dual_stack("a"))));
    let path = mesh.lab.pod("a").expect("pod a").netns_path();
    let worker = NetnsWorker::spawn("a", &path).expect("worker in the pod's netns");
    let cookie_of = |s: &socket2::Socket| netns::netns_cookie(s).expect("netns cookie");
    let pod_cookie = worker
        .run_blocking(|| {
            let s = netns::tcp_socket(&"0.0.0.0:0".parse().expect("addr"), 0)?;
            netns::netns_cookie(&s)
        })
        .expect("worker")
        .expect("cookie in the pod");
    let own = netns::tcp_socket(&"0.0.0.0:0".parse().expect("addr"), 0).expect("socket");
    assert_ne!(pod_cookie, cookie_of(&own), "the pod has its own netns");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut held = Vec::new();
    rt.block_on(async {
        for domain in [Domain::IPV4, Domain::IPV6] {
            for _ in 0..3 * SPARE_SOCKETS {
                let s = worker.socket(domain).await.expect("socket");
                assert_eq!(
                    cookie_of(&s),
                    pod_cookie,
                    "a socket outside the pod's netns"
                );
                let spares = worker.spares();
                assert!(spares.iter().all(|n| *n <= SPARE_SOCKETS), "{spares:?}");
                held.push(s);
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // Refilled after the burst: between the refill mark and the bound.
    while worker.spares().iter().any(|n| *n <= SPARE_REFILL_AT) {
        assert!(
            std::time::Instant::now() < deadline,
            "spares not refilled: {:?}",
            worker.spares()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A spare socket connects from the pod: a listener on the pod's
    // loopback, which only the pod's netns reaches, accepts it.
    let listener = listener_in_netns(&path);
    let to = listener.local_addr().expect("addr");
    let s = rt
        .block_on(worker.socket(Domain::IPV4))
        .expect("spare socket");
    s.set_nonblocking(false).expect("blocking");
    s.connect(&to.into())
        .expect("connect to the pod's loopback from a spare socket");
    let (_accepted, from) = listener.accept().expect("accept");
    assert!(from.ip().is_loopback(), "{from}");
}
