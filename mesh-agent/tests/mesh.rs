//! Mutual TLS between nodes in the lab: HBONE tunnels across two agents,
//! large transfers, what the wire shows, rejected peers, rotation, pooling.

mod common;

use std::{
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::{
    Mesh, delta,
    rogue::{client_config, connect as rogue_connect, runtime, tcp_from},
};
use mesh_agent::identity::{LocalCa, MeshCa, SpiffeId, TrustDomain, WorkloadCert};
use mesh_lab::{
    LabSpec, NodeSpec, PodSpec,
    app::{HoldReport, Pattern, ProbeOutcome},
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two nodes: `a` (enrolled) and `x` (not) on node 0; `c` (enrolled) and
/// `u` (not) on node 1. Echo servers on c and u. Agents on both nodes.
fn two_nodes(extra_agent_args: &[&str]) -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::dual_stack("a"))
                    .pod(PodSpec::new("x")),
            )
            .node(
                NodeSpec::new()
                    .pod(PodSpec::dual_stack("c"))
                    .pod(PodSpec::new("u")),
            ),
    );
    let n0 = mesh.workloads_yaml(
        0,
        &[("a", true), ("x", false)],
        &[("c", true), ("u", false)],
    );
    let n1 = mesh.workloads_yaml(
        1,
        &[("c", true), ("u", false)],
        &[("a", true), ("x", false)],
    );
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &n1);
    mesh.echo("c", &[8080]);
    mesh.echo("u", &[8080]);
    mesh.start_agent_with(0, extra_agent_args);
    mesh.start_agent_with(1, extra_agent_args);
    mesh
}

#[test]
fn cross_node_connections_are_tunnelled_and_pooled() {
    // One proxy thread: each thread has its own pool (see the next test).
    let mesh = two_nodes(&["--proxy-threads", "1"]);
    let before = mesh.counters(1);
    let c = mesh.v4("c", 8080);
    let sequential = mesh.client("a", &c, &["--conns", "20", "--bytes", "10000"]);
    assert_eq!(
        (sequential.ok, sequential.failed),
        (20, 0),
        "{sequential:?}"
    );
    let after = mesh.counters(1);
    // Twenty connections, one TLS connection on the wire (one sk_lookup hit on c's 15008).
    assert_eq!(delta(&before, &after, "lookup_steered_hbone"), 1);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 0);

    let concurrent = mesh.client(
        "a",
        &c,
        &["--conns", "300", "--concurrency", "48", "--bytes", "32768"],
    );
    assert_eq!(
        (concurrent.ok, concurrent.failed),
        (300, 0),
        "{concurrent:?}"
    );
    let v6 = mesh.client(
        "a",
        &mesh.v6("c", 8080),
        &["--conns", "10", "--concurrency", "5"],
    );
    assert_eq!((v6.ok, v6.failed), (10, 0), "{v6:?}");
    mesh.wait_closed(1, 330);
    assert!(
        mesh.agent_log_count(1, "src.identity=\"spiffe://cluster.local/ns/default/sa/a\"") >= 330
    );
    let log = mesh.agent(1).log_contents().expect("log");
    assert!(log.contains("dst.workload=\"c\"") && log.contains("security=\"mutual_tls\""));
}

/// The value of the unlabelled gauge `name` in a `/metrics` text.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn loaded_streams_spread_over_pooled_tunnel_connections() {
    // Two proxy threads per agent, each with its own listeners (one
    // SO_REUSEPORT group per port: the kernel picks a thread per connection
    // by a hash of its 4-tuple) and its own pool: a thread's streams to a
    // peer share one TLS connection (its runtime has one thread, so the pool
    // does not spread), and streams spread over the threads.
    let mesh = two_nodes(&["--proxy-threads", "2"]);
    let dump = mesh.config_dump(0);
    assert_eq!(dump["agent"]["proxy_threads"], 2, "{dump}");
    let c = mesh.v4("c", 8080);
    let before = mesh.counters(1);
    // 24 long-lived connections at once. All of them hash to one thread
    // with probability 2 * 2^-24 (about 1 in 8 million), the one way this
    // test could fail with the agent right.
    const STREAMS: u64 = 24;
    const THREADS: u64 = 2;
    let held: Vec<_> = (0..STREAMS)
        .map(|_| {
            let hold = mesh.hold_command(&c, 10_000, &[]);
            mesh.lab.spawn_in_pod("a", hold).expect("hold")
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (connections, streams) = loop {
        let text = mesh.metrics_text(0);
        let streams = gauge(&text, "mesh_pool_streams").unwrap_or(0);
        let connections = gauge(&text, "mesh_pool_connections").unwrap_or(0);
        if (streams >= STREAMS && connections >= THREADS) || std::time::Instant::now() > deadline {
            break (connections, streams);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(streams, STREAMS, "all held streams are pooled");
    assert_eq!(connections, THREADS, "one TLS connection per proxy thread");
    // Each of them leased the window it grants the destination node (Istio's
    // 16 MiB) from node 0's tunnel window budget: what a destination can
    // make the agent buffer is bounded on the client side too.
    assert_eq!(
        mesh.metric(0, "mesh_limit_in_use", &["limit=\"tunnel_window_bytes\""]),
        THREADS << 24,
        "node 0's outbound tunnels' windows"
    );
    // The destination saw as many TLS connections (sk_lookup hits on c's 15008).
    assert_eq!(
        delta(&before, &mesh.counters(1), "lookup_steered_hbone"),
        THREADS
    );
    // The destination agent serves them on different threads: it hands a
    // new tunnel connection to its least-loaded thread (a hash would put
    // both on one thread half the time).
    let dump = mesh.config_dump(1);
    assert_eq!(
        dump["proxy_threads"]["inbound_tunnels"],
        serde_json::json!([1, 1]),
        "{}",
        dump["proxy_threads"]
    );
    for child in held {
        let report: HoldReport = {
            assert!(
                child
                    .wait_timeout(Duration::from_secs(40))
                    .expect("wait")
                    .is_some(),
                "hold did not finish"
            );
            let log = child.log_contents().expect("log");
            let line = log
                .lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .expect("report");
            serde_json::from_str(line).expect("hold report")
        };
        assert!(report.error.is_none(), "{report:?}");
    }
}

#[test]
fn a_gibibyte_crosses_nodes_byte_exact() {
    let mesh = two_nodes(&[]);
    mesh.bulk_exact("a", &mesh.v4("c", 8080), 1 << 30, 60_000, &[]);
}

/// Runs tcpdump on the inter-node wire while `traffic` runs; returns the capture.
fn capture(mesh: &Mesh, name: &str, traffic: impl FnOnce()) -> Vec<u8> {
    let pcap = mesh.lab.scratch_path(name);
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-i", "br0", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("tcp");
    let dump = mesh.lab.spawn_in_wire(cmd).expect("tcpdump");
    dump.wait_for_log("listening on", Duration::from_secs(10))
        .expect("tcpdump listening");
    traffic();
    std::thread::sleep(Duration::from_millis(300));
    let _ = dump.terminate();
    std::fs::read(&pcap).expect("read capture")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_wire_between_nodes_carries_only_tls() {
    let mesh = two_nodes(&[]);
    let payload = Pattern::bytes(0, 200_000);
    let needles: Vec<&[u8]> = (0..8)
        .map(|i| &payload[10_000 + i * 20_000..10_000 + i * 20_000 + 24])
        .collect();

    let meshed = capture(&mesh, "mesh.pcap", || {
        let r = mesh.client("a", &mesh.v4("c", 8080), &["--bytes", "200000"]);
        assert_eq!(r.ok, 1, "{r:?}");
    });
    assert!(
        meshed.len() > 200_000,
        "capture too small ({} bytes): did traffic cross the wire?",
        meshed.len()
    );
    for n in &needles {
        assert!(
            !contains(&meshed, n),
            "payload bytes seen in clear on the wire"
        );
    }
    // TLS records (application data, 0x17 0x03 0x03) are there.
    assert!(
        contains(&meshed, &[0x17, 0x03, 0x03]),
        "no TLS application-data records in the capture"
    );

    // Control: the same payload between two pods outside the mesh is seen in clear.
    let plain = capture(&mesh, "plain.pcap", || {
        let r = mesh.client("x", &mesh.v4("u", 8080), &["--bytes", "200000"]);
        assert_eq!(r.ok, 1, "{r:?}");
    });
    assert!(
        needles.iter().any(|n| contains(&plain, n)),
        "the control capture does not show the payload: the search is broken"
    );
}

#[test]
fn bad_peers_are_rejected_with_a_clear_reason() {
    let mesh = two_nodes(&[]);
    let rt = runtime();
    let x_netns = mesh.lab.pod("x").expect("x").netns_path();
    let c_ip = mesh.lab.pod("c").expect("c").ipv4();
    let hbone = SocketAddr::new(c_ip.into(), 15008);
    let target = SocketAddr::new(c_ip.into(), 8080);
    let td = TrustDomain::new("cluster.local").expect("td");
    let mesh_ca = Arc::new(MeshCa::load_dir(&mesh.ca_dir()).expect("lab CA"));
    let real = LocalCa::new(mesh_ca, td.clone());
    let x_id = SpiffeId::new(td.clone(), "default", "x").expect("id");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // Positive control: a valid mesh identity gets its tunnel.
    let valid = real
        .issue_valid_between(&x_id, now - hour, now + hour)
        .expect("valid");
    assert_eq!(
        rt.block_on(rogue_connect(&x_netns, hbone, &valid, target)),
        Ok(200)
    );

    // A CONNECT to an address that is not the pod's: 400.
    let elsewhere = SocketAddr::new(mesh.lab.pod("u").expect("u").ipv4().into(), 8080);
    assert_eq!(
        rt.block_on(rogue_connect(&x_netns, hbone, &valid, elsewhere)),
        Ok(400)
    );
    // The 400 is sent after the refusal is logged.
    assert!(mesh.agent_log_count(1, "is not this pod") >= 1);

    let rejected = |label: &str, cert: &WorkloadCert, reason: &str, count: usize| {
        let r = rt.block_on(rogue_connect(&x_netns, hbone, cert, target));
        assert!(
            r.is_err() || r == Ok(0),
            "{label}: the tunnel was accepted ({r:?})"
        );
        // The rejection is logged before the handshake slot is given back.
        mesh.wait_handshakes_done(1);
        assert!(mesh.agent_log_count(1, "HBONE handshake rejected") >= count);
        let log = mesh.agent(1).log_contents().expect("log");
        let line = log
            .lines()
            .rfind(|l| l.contains("HBONE handshake rejected"))
            .expect("line");
        assert!(line.contains(reason), "{label}: want {reason:?} in {line}");
    };
    // Another root (a CA of the same trust domain that the mesh does not trust).
    let other = MeshCa::generate(&td, 1).expect("other CA");
    let other = Arc::new(
        MeshCa::from_pem(other.cert_pem.as_bytes(), other.key_pem.as_bytes(), None).expect("load"),
    );
    let foreign_root = LocalCa::new(other, td.clone())
        .issue_valid_between(&x_id, now - hour, now + hour)
        .expect("issue");
    rejected(
        "other root",
        &foreign_root,
        "not signed by the mesh root",
        1,
    );
    // Another trust domain, signed by the real root.
    let evil = SpiffeId::new(
        TrustDomain::new("evil.example").expect("td"),
        "default",
        "x",
    )
    .expect("id");
    let foreign_td = real
        .issue_valid_between(&evil, now - hour, now + hour)
        .expect("issue");
    rejected("other trust domain", &foreign_td, "evil.example", 2);
    // Expired.
    let expired = real
        .issue_valid_between(&x_id, now - 2 * hour, now - hour)
        .expect("issue");
    rejected("expired", &expired, "expired", 3);

    // Not TLS at all.
    rt.block_on(async {
        let mut tcp = tcp_from(&x_netns, hbone);
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    });
    mesh.wait_handshakes_done(1);
    assert!(mesh.agent_log_count(1, "HBONE handshake rejected") >= 4);
}

#[test]
fn certificates_rotate_under_a_long_connection() {
    let mesh = two_nodes(&["--cert-ttl", "4s"]);
    // A long connection across several rotations (half-life 2 s).
    let hold = mesh.hold_command(&mesh.v4("c", 8080), 9000, &[]);
    let rt = runtime();
    let c_ip = mesh.lab.pod("c").expect("c").ipv4();
    let x_netns = mesh.lab.pod("x").expect("x").netns_path();
    let td = TrustDomain::new("cluster.local").expect("td");
    let real = LocalCa::new(
        Arc::new(MeshCa::load_dir(&mesh.ca_dir()).expect("CA")),
        td.clone(),
    );
    let now = SystemTime::now();
    let valid = real
        .issue_valid_between(
            &SpiffeId::new(td, "default", "x").expect("id"),
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        )
        .expect("cert");
    let serial_seen = |rt: &tokio::runtime::Runtime| -> Vec<u8> {
        let (config, verifier) = client_config(&valid);
        rt.block_on(async {
            let tcp = tcp_from(&x_netns, SocketAddr::new(c_ip.into(), 15008));
            let _tls = tokio_rustls::TlsConnector::from(config)
                .connect(
                    ServerName::IpAddress(std::net::IpAddr::from(c_ip).into()),
                    tcp,
                )
                .await
                .expect("handshake");
        });
        let der = verifier
            .seen
            .lock()
            .expect("lock")
            .clone()
            .expect("server cert");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        cert.raw_serial().to_vec()
    };
    let first = serial_seen(&rt);
    let out = mesh.lab.run_in_pod("a", hold).expect("hold");
    let report = HoldReport::from_output(&out).expect("report");
    assert_eq!(
        report.error, None,
        "the long connection was cut: {report:?}"
    );
    assert!(report.rounds_ok >= 60, "{report:?}");
    let second = serial_seen(&rt);
    assert_ne!(
        first, second,
        "a new handshake after rotation still got the old certificate"
    );
    let log = mesh.agent(1).log_contents().expect("log");
    let rotations = log
        .lines()
        .filter(|l| l.contains("sa/c") && l.contains("rotated=true"))
        .count();
    assert!(
        rotations >= 2,
        "c's certificate rotated {rotations} times in 9 s with a 4 s TTL:\n{log}"
    );
    // New connections keep working with the rotated certificates.
    assert_eq!(
        mesh.probe("a", &mesh.v4("c", 8080), &[]),
        ProbeOutcome::Echoed
    );
}

#[test]
fn a_service_vip_is_balanced_over_its_endpoints_and_skips_one_that_refuses() {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(NodeSpec::new().pod(PodSpec::new("a")))
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("e1"))
                    .pod(PodSpec::new("e2")),
            ),
    );
    let service = "services:\n  - name: web\n    namespace: default\n    vips: [\"198.18.200.1\"]\n    ports: [{name: http, port: 80, targetPort: 8080}]\n    endpoints: [e1, e2]\n";
    let n0 = mesh.workloads_yaml(0, &[("a", true)], &[("e1", true), ("e2", true)]) + service;
    let n1 = mesh.workloads_yaml(1, &[("e1", true), ("e2", true)], &[("a", true)]) + service;
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &n1);
    mesh.echo("e1", &[8080]);
    mesh.start_agent(0);
    mesh.start_agent(1);

    // e2 has no app on 8080: its agent answers 503 and the client's agent tries e1.
    let report = mesh.client(
        "a",
        "198.18.200.1:80",
        &["--conns", "20", "--concurrency", "4"],
    );
    assert_eq!((report.ok, report.failed), (20, 0), "{report:?}");
    assert_eq!(
        report.peer_addrs,
        vec!["198.18.200.1:80".to_owned()],
        "{report:?}"
    );
    mesh.wait_closed(0, 20);
    assert!(mesh.agent_log_count(0, "dst.workload=\"e1\"") >= 20);
    assert_eq!(mesh.agent_log_count(0, "dst.workload=\"e2\""), 0);

    // With both endpoints up, the connections spread over both.
    mesh.echo("e2", &[8080]);
    let report = mesh.client("a", "198.18.200.1:80", &["--conns", "20"]);
    assert_eq!((report.ok, report.failed), (20, 0), "{report:?}");
    mesh.wait_closed(0, 40);
    assert!(mesh.agent_log_count(0, "dst.workload=\"e2\"") >= 5);
    let log = mesh.agent(0).log_contents().expect("log");
    assert!(
        log.contains("dst.service=\"web.default.svc.cluster.local\""),
        "{log}"
    );
}

#[test]
fn a_broken_tunnel_connection_is_replaced_without_failing_the_next_connection() {
    // One proxy thread: "pooled again" below means one tunnel for all the
    // client's connections. With more, each thread pools its own, and four
    // probes leave a thread without one an eighth of the time (2 * 2^-4).
    let mut mesh = two_nodes(&["--proxy-threads", "1"]);
    let c = mesh.v4("c", 8080);
    assert_eq!(mesh.probe("a", &c, &[]), ProbeOutcome::Echoed);
    // The peer agent goes away and comes back: the pooled connection to it is dead.
    let old = mesh.take_agent(1);
    old.kill().expect("kill the peer agent");
    mesh.start_agent(1);
    // The very next connection succeeds (on a new tunnel connection).
    for _ in 0..3 {
        assert_eq!(mesh.probe("a", &c, &[]), ProbeOutcome::Echoed);
    }
    let before = mesh.counters(1);
    let r = mesh.client("a", &c, &["--conns", "10"]);
    assert_eq!((r.ok, r.failed), (10, 0), "{r:?}");
    // And it is pooled again: no new TLS connection for those ten.
    assert_eq!(delta(&before, &mesh.counters(1), "lookup_steered_hbone"), 0);
}
