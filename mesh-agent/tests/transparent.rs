//! Transparent addresses (issue 14): an app behind the mesh sees the real
//! client's address as the source of inbound connections, whichever way
//! the connection came (cross-node or same-node HBONE, plaintext from an
//! un-enrolled pod, IPv4 or IPv6), and the exemption that lets the agent's
//! deliveries through the capture cannot be forged by an app.

mod common;

use std::time::Duration;

use common::{Mesh, delta, rogue};
use mesh_lab::{
    LabSpec, NodeSpec, PodSpec,
    app::{FlowReport, ProbeOutcome},
};

/// Node 0: `a`, `b` (enrolled, dual-stack), `x` (not enrolled) and `z` (in
/// no workload file: an address the mesh does not know); node 1:
/// `c` (enrolled, dual-stack). Echo servers that first tell the client the
/// address they see it from (`--greeting-peer`, the accepted socket's
/// `getpeername()`) on b and c.
fn lab() -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::dual_stack("a"))
                    .pod(PodSpec::dual_stack("b"))
                    .pod(PodSpec::new("x"))
                    .pod(PodSpec::new("z")),
            )
            .node(NodeSpec::new().pod(PodSpec::dual_stack("c"))),
    );
    let n0 = mesh.workloads_yaml(0, &[("a", true), ("b", true), ("x", false)], &[("c", true)]);
    let n1 = mesh.workloads_yaml(1, &[("c", true)], &[("a", true), ("b", true), ("x", false)]);
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &n1);
    mesh.echo_with("b", &[8080], &["--greeting-peer"]);
    mesh.echo_with("c", &[8080], &["--greeting-peer"]);
    mesh.start_agent(0);
    mesh.start_agent(1);
    mesh
}

/// The address part of `ip:port` / `[ip]:port`.
fn ip_of(addr: &str) -> String {
    let sa: std::net::SocketAddr = addr.parse().expect("socket address");
    sa.ip().to_canonical().to_string()
}

/// Connects from `from` to `to` three times (each echoed byte-exact) and
/// checks every address the two apps see: the client's `getpeername()` is
/// the address it dialled, its `getsockname()` and the server's
/// `getpeername()` of the accepted connection are `client_ip`.
fn check_addresses(mesh: &Mesh, from: &str, to: &str, client_ip: &str) {
    let report = mesh.client(
        from,
        to,
        &["--conns", "3", "--bytes", "20000", "--greeting"],
    );
    assert_eq!(
        (report.ok, report.failed),
        (3, 0),
        "{from} -> {to}: {report:?}"
    );
    assert_eq!(
        report.peer_addrs,
        vec![to.to_owned()],
        "client's peer: {report:?}"
    );
    let local: Vec<String> = report.local_addrs.iter().map(|a| ip_of(a)).collect();
    assert!(!local.is_empty(), "{report:?}");
    assert!(
        local.iter().all(|ip| ip == client_ip),
        "client's own address, {from} -> {to}: {report:?}"
    );
    let seen: Vec<String> = report
        .greeting_peers
        .clone()
        .expect("greeting peers")
        .iter()
        .map(|a| ip_of(a))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        seen,
        vec![client_ip.to_owned()],
        "server's view, {from} -> {to}: {report:?}"
    );
}

#[test]
fn apps_see_the_client_pods_address_whichever_way_it_came() {
    common::require_root();
    let mesh = lab();
    let a4 = ip_of(&mesh.v4("a", 1));
    let a6 = ip_of(&mesh.v6("a", 1));
    let x4 = ip_of(&mesh.v4("x", 1));

    // (a) cross-node, enrolled client (HBONE).
    let before = mesh.counters(1);
    check_addresses(&mesh, "a", &mesh.v4("c", 8080), &a4);
    let after = mesh.counters(1);
    // Deliveries were recognised by their tuples, not steered back into the agent.
    assert!(delta(&before, &after, "lookup_bypass_loopback") >= 3);
    // (d) IPv6, cross-node and same-node.
    check_addresses(&mesh, "a", &mesh.v6("c", 8080), &a6);
    check_addresses(&mesh, "a", &mesh.v6("b", 8080), &a6);
    // (b) same node, enrolled client.
    check_addresses(&mesh, "a", &mesh.v4("b", 8080), &a4);
    // (c) un-enrolled client to an enrolled server (plaintext), cross-node
    // and same-node.
    check_addresses(&mesh, "x", &mesh.v4("c", 8080), &x4);
    check_addresses(&mesh, "x", &mesh.v4("b", 8080), &x4);

    // The access log says so.
    mesh.wait_closed(1, 9);
    assert!(mesh.agent_log_count(1, "source_preserved=true") >= 9);
    assert_eq!(mesh.agent_log_count(1, "source_preserved=false"), 0);
    mesh.wait_closed(0, 21);
    assert_eq!(mesh.agent_log_count(0, "source_preserved=false"), 0);
}

#[test]
fn a_large_transfer_comes_back_byte_exact_through_a_transparent_delivery() {
    common::require_root();
    let mesh = lab();
    let report = mesh.bulk_exact("a", &mesh.v4("c", 8080), 256 << 20, 60_000, &["--greeting"]);
    assert_eq!(
        report
            .greeting_peers
            .expect("greeting")
            .iter()
            .map(|a| ip_of(a))
            .collect::<Vec<_>>(),
        vec![ip_of(&mesh.v4("a", 1))]
    );
}

#[test]
fn an_app_cannot_forge_the_agents_exemption() {
    common::require_root();
    let mut mesh = lab();
    mesh.echo("c", &[9090]);
    // App in b (root in the lab: it may set any mark and IP_TRANSPARENT)
    // sets the agent's mark and binds another pod's address transparently,
    // as the agent's delivery sockets do. Its connect is still captured:
    // the connect hooks exempt only the agent's socket cookies, and
    // sk_lookup only tuples the agent filed.
    for (mark, to) in [("1337", mesh.v4("c", 8080)), ("1338", mesh.v4("b", 8080))] {
        let before = mesh.counters(0);
        let outcome = mesh.probe(
            "b",
            &to,
            &[
                "--mark",
                mark,
                "--transparent-from",
                &ip_of(&mesh.v4("a", 1)),
            ],
        );
        let after = mesh.counters(0);
        assert_eq!(
            delta(&before, &after, "connect_bypass_agent"),
            0,
            "{mark} {to}"
        );
        assert_eq!(
            delta(&before, &after, "connect_redirected"),
            1,
            "{mark} {to}: {outcome:?}"
        );
    }
    // The agent's mark alone, from the pod's own address: captured and
    // proxied (echoed through the mesh).
    let before = mesh.counters(0);
    assert_eq!(
        mesh.probe("b", &mesh.v4("c", 9090), &["--mark", "1337"]),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_bypass_agent"), 0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 1);
}

#[test]
fn a_client_address_that_cannot_be_used_falls_back_without_failing_the_connection() {
    common::require_root();
    let mesh = lab();
    // An HBONE peer with a valid mesh identity at an address the mesh does
    // not know (z): its address is not believed as the app's client (it is
    // not a known workload), so the agent delivers from the pod's own
    // address, and says so; the connection itself succeeds.
    let c4 = mesh.lab.pod("c").expect("c").ipv4();
    let z = mesh.lab.pod("z").expect("z").netns_path();
    let cert = rogue::mesh_cert(&mesh, "z");
    let rt = rogue::runtime();
    assert_eq!(
        rt.block_on(rogue::connect(
            &z,
            std::net::SocketAddr::new(c4.into(), 15008),
            &cert,
            std::net::SocketAddr::new(c4.into(), 8080),
        )),
        Ok(200)
    );
    // The rogue client's tunnel lives on its runtime: end it.
    drop(rt);
    mesh.wait_closed(1, 1);
    assert_eq!(
        mesh.agent_log_count(
            1,
            "source_preserved=false source_not_preserved=\"client_not_a_known_workload\""
        ),
        1
    );
    // A known workload through the same agent keeps its address.
    check_addresses(&mesh, "a", &mesh.v4("c", 8080), &ip_of(&mesh.v4("a", 1)));
}

/// An HBONE peer whose certificate is another workload's than its
/// address's (a known workload's address it should not have) is not
/// believed as that address: the app sees the pod's own address, the agent
/// says why, and the connection itself succeeds (policy went by the
/// certificate).
#[test]
fn a_peer_proving_another_identity_than_its_address_is_not_believed() {
    common::require_root();
    let mesh = lab();
    let c4 = mesh.lab.pod("c").expect("c").ipv4();
    let x = mesh.lab.pod("x").expect("x").netns_path();
    // x's address, a's certificate.
    let cert = rogue::mesh_cert(&mesh, "a");
    let rt = rogue::runtime();
    let (status, line) = rt
        .block_on(rogue::connect_read_line(
            &x,
            std::net::SocketAddr::new(c4.into(), 15008),
            &cert,
            std::net::SocketAddr::new(c4.into(), 8080),
            &[],
        ))
        .expect("tunnel");
    assert_eq!(status, 200);
    let seen = line.strip_prefix("peer=").expect("greeting");
    assert_eq!(ip_of(seen), c4.to_string(), "the app saw {seen}");
    drop(rt);
    mesh.wait_closed(1, 1);
    assert_eq!(
        mesh.agent_log_count(
            1,
            "source_preserved=false source_not_preserved=\"identity_mismatch\""
        ),
        1
    );
}

/// Every delivery from one client address leaves a TIME_WAIT socket bound
/// to that address in the server pod. Thousands of short connections from
/// one client all keep its address, and none falls back to the pod's.
/// Why this cannot flake: delivery ports are random over 28 232 ports and
/// a port is retried on a fresh socket while its 4-tuple is in use, up to
/// 16 times; after 3 000 connections at most 3 000 tuples are taken, so
/// the chance that one delivery finds 16 taken in a row is below
/// (3 000 / 28 232)^16 ≈ 3e-16.
#[test]
fn thousands_of_short_connections_from_one_client_all_keep_its_address() {
    common::require_root();
    let mesh = lab();
    let a4 = ip_of(&mesh.v4("a", 1));
    let report = mesh.client(
        "a",
        &mesh.v4("c", 8080),
        &[
            "--conns",
            "3000",
            "--concurrency",
            "16",
            "--bytes",
            "64",
            "--greeting",
        ],
    );
    assert_eq!((report.ok, report.failed), (3000, 0), "{report:?}");
    let seen: std::collections::BTreeSet<String> = report
        .greeting_peers
        .clone()
        .expect("greeting peers")
        .iter()
        .map(|a| ip_of(a))
        .collect();
    assert_eq!(seen, [a4].into(), "{report:?}");
    mesh.wait_closed(1, 3000);
    assert_eq!(mesh.agent_log_count(1, "source_preserved=false"), 0);
}

/// A stream cut by its peer, as the app sees it.
fn was_reset(r: &FlowReport) -> bool {
    r.end == "reset" || r.end == "broken_pipe"
}

#[test]
fn half_closes_and_resets_cross_a_transparent_delivery() {
    common::require_root();
    let mesh = lab();
    const BYTES: u64 = 4 << 20;
    let targets = [
        ("cross node v4", "c", mesh.v4("c", 1)),
        ("same node v4", "b", mesh.v4("b", 1)),
        ("cross node v6", "c", mesh.v6("c", 1)),
    ];
    let mut port = 7100;
    for (what, server, addr) in &targets {
        let ip = ip_of(addr);
        let to = |port: u16| std::net::SocketAddr::new(ip.parse().expect("ip"), port).to_string();
        let mut next = || {
            port += 1;
            port
        };

        // The client's FIN (after all its bytes) reaches the app, which
        // sees every byte and then a clean end of stream.
        let p = next();
        let receiver = mesh.flow(server, &["--listen", &format!("[::]:{p}")]);
        let sender = mesh.flow(
            "a",
            &["--connect", &to(p), "--send", "--bytes", &BYTES.to_string()],
        );
        let (s, r) = (common::flow_report(&sender), common::flow_report(&receiver));
        assert_eq!(
            (s.end.as_str(), s.bytes),
            ("sent", BYTES),
            "{what}: client sending: {s:?}"
        );
        assert_eq!(
            (r.end.as_str(), r.bytes),
            ("eof", BYTES),
            "{what}: app receiving: {r:?}"
        );

        // The app's FIN reaches the client the same way.
        let p = next();
        let sender = mesh.flow(
            server,
            &[
                "--listen",
                &format!("[::]:{p}"),
                "--send",
                "--bytes",
                &BYTES.to_string(),
            ],
        );
        let receiver = mesh.flow("a", &["--connect", &to(p)]);
        let (s, r) = (common::flow_report(&sender), common::flow_report(&receiver));
        assert_eq!(
            (s.end.as_str(), s.bytes),
            ("sent", BYTES),
            "{what}: app sending: {s:?}"
        );
        assert_eq!(
            (r.end.as_str(), r.bytes),
            ("eof", BYTES),
            "{what}: client receiving: {r:?}"
        );

        // The app dies mid-stream: the client sending to it sees a reset,
        // never a completed stream.
        let p = next();
        let receiver = mesh.flow(server, &["--listen", &format!("[::]:{p}")]);
        let sender = mesh.flow("a", &["--connect", &to(p), "--send"]);
        std::thread::sleep(Duration::from_millis(500));
        receiver.kill().expect("SIGKILL the app");
        let s = common::flow_report(&sender);
        assert!(
            s.bytes > 0 && was_reset(&s),
            "{what}: client after the app died: {s:?}"
        );

        // The client dies mid-stream: the app sending to it sees a reset.
        let p = next();
        let sender = mesh.flow(server, &["--listen", &format!("[::]:{p}"), "--send"]);
        let receiver = mesh.flow("a", &["--connect", &to(p)]);
        std::thread::sleep(Duration::from_millis(500));
        receiver.kill().expect("SIGKILL the client");
        let s = common::flow_report(&sender);
        assert!(
            s.bytes > 0 && was_reset(&s),
            "{what}: app after the client died: {s:?}"
        );
    }
    // Every delivery above kept the client's address (none fell back).
    mesh.wait_closed(1, 8);
    assert_eq!(mesh.agent_log_count(1, "source_preserved=false"), 0);
    assert!(mesh.agent_log_count(1, "source_preserved=true") >= 8);
    mesh.wait_closed(0, 4);
    assert_eq!(mesh.agent_log_count(0, "source_preserved=false"), 0);
}

#[test]
fn a_waypoints_forwarded_client_is_believed_and_nobody_elses() {
    common::require_root();
    // Node 1 knows `w` (a pod of node 0, not enrolled) as the pods behind
    // the waypoint `w` that the service `svc` (of `c`) uses; `x` is the pod
    // behind another waypoint, `xw`, of another service (any namespace can
    // make one of its own pods): not `c`'s. Both claim, in `forwarded`, to
    // carry a's connection.
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("a"))
                    .pod(PodSpec::new("w"))
                    .pod(PodSpec::new("x")),
            )
            .node(NodeSpec::new().pod(PodSpec::new("c"))),
    );
    let n0 = mesh.workloads_yaml(
        0,
        &[("a", true), ("w", false), ("x", false)],
        &[("c", true)],
    );
    let mut n1 = mesh.workloads_yaml(
        1,
        &[("c", true)],
        &[("a", true), ("w", false), ("x", false)],
    );
    n1.push_str(
        "services:\n  - name: svc\n    vips: [\"198.18.200.1\"]\n    ports: [{name: tcp, port: 80, targetPort: 8080}]\n    endpoints: [c]\n    labels: {istio.io/use-waypoint: w}\n\
         \x20 - name: w\n    vips: [\"198.18.200.9\"]\n    ports: [{name: mesh, port: 15008}]\n    endpoints: [w]\n\
         \x20 - name: other\n    vips: [\"198.18.200.2\"]\n    ports: [{name: tcp, port: 80, targetPort: 8080}]\n    endpoints: [a]\n    labels: {istio.io/use-waypoint: xw}\n\
         \x20 - name: xw\n    vips: [\"198.18.200.8\"]\n    ports: [{name: mesh, port: 15008}]\n    endpoints: [x]\n",
    );
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &n1);
    mesh.echo_with("c", &[8080], &["--greeting-peer"]);
    mesh.start_agent(0);
    mesh.start_agent(1);

    let a4 = ip_of(&mesh.v4("a", 1));
    let c4 = mesh.lab.pod("c").expect("c").ipv4();
    let forwarded = format!("for=\"{a4}:40000\"");
    let rt = rogue::runtime();
    let seen_from = |pod: &str, forwarded: &str| {
        let netns = mesh.lab.pod(pod).expect("pod").netns_path();
        let cert = rogue::mesh_cert(&mesh, pod);
        let (status, line) = rt
            .block_on(rogue::connect_read_line(
                &netns,
                std::net::SocketAddr::new(c4.into(), 15008),
                &cert,
                std::net::SocketAddr::new(c4.into(), 8080),
                &[("forwarded", forwarded)],
            ))
            .unwrap_or_else(|e| panic!("{pod}: {e}"));
        assert_eq!(status, 200, "{pod}");
        let addr = line
            .strip_prefix("peer=")
            .unwrap_or_else(|| panic!("{pod}: greeting {line:?}"));
        ip_of(addr)
    };
    // The waypoint's client is the app's client.
    assert_eq!(seen_from("w", &forwarded), a4);
    // Anyone else's claim is ignored, another service's waypoint's too:
    // the app sees the peer itself.
    assert_eq!(seen_from("x", &forwarded), ip_of(&mesh.v4("x", 1)));
    // A waypoint naming an address that is no known workload: the peer.
    let w4 = ip_of(&mesh.v4("w", 1));
    assert_eq!(seen_from("w", "for=\"198.18.99.99:1\""), w4);
    drop(rt);
    mesh.wait_closed(1, 3);
    assert_eq!(mesh.agent_log_count(1, "source_preserved=false"), 0);
}
