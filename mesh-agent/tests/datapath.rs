//! The datapath in the lab, on the running kernel: capture, steering,
//! exclusions, fail-closed behaviour, re-adoption after restart, file reloads.
//! Each test builds its own lab (unique names) and removes it, even on failure.

mod common;

use common::{Mesh, delta};
use mesh_lab::{LabSpec, NodeSpec, PodSpec, app::ProbeOutcome};

/// One node: `a` and `b` enrolled (dual-stack), `c` and `d` not. Echo servers
/// on `b` (8080, 9191, 9292) and `d` (8080). The agent is running.
fn one_node() -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::dual_stack("a"))
                .pod(PodSpec::dual_stack("b"))
                .pod(PodSpec::new("c"))
                .pod(PodSpec::new("d")),
        ),
    );
    mesh.write_workloads(0, &[("a", true), ("b", true), ("c", false), ("d", false)]);
    mesh.echo("b", &[8080, 9191, 9292]);
    mesh.echo("d", &[8080]);
    mesh.start_agent(0);
    mesh
}

#[test]
fn pod_to_pod_on_one_node_goes_through_the_agent_both_ways() {
    let mesh = one_node();
    let before = mesh.counters(0);
    let b = mesh.v4("b", 8080);
    let report = mesh.client("a", &b, &["--conns", "3", "--bytes", "100000"]);
    assert_eq!((report.ok, report.failed), (3, 0), "{report:?}");
    assert_eq!(report.bytes_received, 300_000);
    // The client sees the address it dialled, not the agent's listener.
    assert_eq!(report.peer_addrs, vec![b.clone()], "{report:?}");
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 3);
    assert_eq!(delta(&before, &after, "sockops_recorded"), 3);
    assert_eq!(delta(&before, &after, "peername_restored"), 3);
    // Both pods are this agent's: the same-node fast path delivers into b
    // directly (no tunnel to itself), never as plaintext through b's
    // inbound listener. (Tunnels between pods: the two-node tests, and
    // `same_node.rs` with the fast path off.)
    assert_eq!(delta(&before, &after, "lookup_steered_hbone"), 0);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 0);
    assert_eq!(mesh.proxy_stats(0)["same_node_fast_path"], 3);
    // The agent recovered the original destination on both sides and relayed every byte.
    // Three connections, each seen outbound and inbound, all closed and logged.
    mesh.wait_closed(0, 6);
    assert!(mesh.agent_log_count(0, "direction=\"outbound\"") >= 3);
    let log = mesh.agent(0).log_contents().expect("agent log");
    let outbound = log
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains("direction=\"outbound\""));
    for line in outbound {
        assert!(
            line.contains(&format!("dst.addr={b}")) && line.contains("bytes_sent=100000"),
            "{line}"
        );
        assert!(line.contains("src.workload=\"a\""), "{line}");
        assert!(
            line.contains("security=\"mutual_tls\"")
                && line.contains("dst.identity=\"spiffe://cluster.local/ns/default/sa/b\""),
            "{line}"
        );
    }
    let inbound = log
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains("direction=\"inbound\""))
        .count();
    assert_eq!(inbound, 3, "{log}");
}

#[test]
fn ipv6_pod_to_pod_goes_through_the_agent() {
    let mesh = one_node();
    let before = mesh.counters(0);
    let b = mesh.v6("b", 8080);
    let report = mesh.client("a", &b, &["--conns", "3", "--bytes", "65536"]);
    assert_eq!((report.ok, report.failed), (3, 0), "{report:?}");
    assert_eq!(report.peer_addrs, vec![b.clone()], "{report:?}");
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 3);
    assert_eq!(delta(&before, &after, "peername_restored"), 3);
    // The same-node fast path: no tunnel, no plaintext steering.
    assert_eq!(delta(&before, &after, "lookup_steered_hbone"), 0);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 0);
    assert_eq!(mesh.proxy_stats(0)["same_node_fast_path"], 3);
    mesh.wait_closed(0, 6);
    assert!(mesh.agent_log_count(0, &format!("dst.addr={b}")) >= 6);
}

#[test]
fn inbound_on_any_port_is_steered_and_a_closed_port_is_refused_not_hung() {
    let mesh = one_node();
    let before = mesh.counters(0);
    // From an un-enrolled pod: only b's inbound side involves the agent.
    for port in [8080, 9191] {
        assert_eq!(
            mesh.probe("c", &mesh.v4("b", port), &[]),
            ProbeOutcome::Echoed,
            "port {port}"
        );
    }
    let closed = mesh.probe("c", &mesh.v4("b", 7777), &["--timeout-ms", "5000"]);
    assert!(
        matches!(closed, ProbeOutcome::Reset | ProbeOutcome::Refused),
        "closed port gave {closed}"
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 3);
    assert_eq!(delta(&before, &after, "connect_redirected"), 0);
    assert_eq!(delta(&before, &after, "connect_not_enrolled"), 3);
}

/// The other plaintext relays splice their bulk transfers too (issue 13):
/// passthrough from an enrolled pod to one outside the mesh, and plaintext
/// inbound from outside the mesh to an enrolled pod. 64 MiB each way,
/// byte-exact, both directions spliced.
#[test]
fn passthrough_and_plaintext_inbound_splice_their_bulk_transfers() {
    let mesh = one_node();
    let spliced = || mesh.proxy_stats(0)["relay_directions_spliced"].as_u64();
    assert_eq!(spliced(), Some(0));
    for (from, to) in [("a", "d"), ("c", "b")] {
        mesh.bulk_exact(from, &mesh.v4(to, 8080), 64 << 20, 30_000, &[]);
    }
    mesh.wait_closed(0, 2);
    assert_eq!(spliced(), Some(4));
    assert_eq!(
        mesh.proxy_stats(0)["relay_directions_without_pipe"].as_u64(),
        Some(0)
    );
    assert_eq!(mesh.proxy_stats(0)["same_node_fast_path"], 0);
}

#[test]
fn unenrolled_pods_are_untouched() {
    let mesh = one_node();
    let before = mesh.counters(0);
    assert_eq!(
        mesh.probe("c", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_not_enrolled"), 1);
    for name in [
        "connect_redirected",
        "sockops_recorded",
        "lookup_steered_plaintext",
        "lookup_dropped_no_listener",
    ] {
        assert_eq!(delta(&before, &after, name), 0, "{name}");
    }
    let log = mesh.agent(0).log_contents().expect("agent log");
    assert!(
        !log.contains("connection closed"),
        "the agent saw a connection:\n{log}"
    );
}

#[test]
fn excluded_ports_marked_sockets_and_probe_sources_are_not_captured() {
    let mesh = one_node();
    let mut text = mesh
        .lab
        .workload_file_yaml(0, &[("a", true), ("b", true), ("c", false), ("d", false)]);
    // a excludes outbound 9191; b excludes inbound 9292.
    let a_netns = format!(
        "netns: {}\n",
        mesh.lab.pod("a").expect("a").netns_path().display()
    );
    let b_netns = format!(
        "netns: {}\n",
        mesh.lab.pod("b").expect("b").netns_path().display()
    );
    text = text.replace(
        &a_netns,
        &format!("{a_netns}    excludeOutboundPorts: [9191]\n"),
    );
    text = text.replace(
        &b_netns,
        &format!("{b_netns}    excludeInboundPorts: [9292]\n"),
    );
    mesh.write_workload_text_applied(0, &text);
    // Changed pods are updated in place: capture never lapses.
    assert!(mesh.agent_log_count(0, "pod updated") >= 2);
    assert_eq!(mesh.agent_log_count(0, "pod unenrolled"), 0);

    let before = mesh.counters(0);
    // Outbound exclusion: a's connect to 9191 is not redirected (b's inbound still is).
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 9191), &[]),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_bypass_port"), 1);
    assert_eq!(delta(&before, &after, "connect_redirected"), 0);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 1);

    // Inbound exclusion: c -> b:9292 reaches the app directly.
    let before = after;
    assert_eq!(
        mesh.probe("c", &mesh.v4("b", 9292), &[]),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "lookup_bypass_port"), 1);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 0);

    // The agent's mark exempts nothing: an app in an enrolled pod (root in
    // the lab, so it may set any mark) whose socket carries 0x539 is still
    // captured and proxied. Only the agent's socket cookies exempt.
    let before = after;
    assert_eq!(
        mesh.probe("a", &mesh.v4("d", 8080), &["--mark", "1337"]),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_bypass_agent"), 0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 1);

    // Loopback destinations are left alone.
    let before = after;
    let _ = mesh.probe("a", "127.0.0.1:9", &[]);
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_bypass_loopback"), 1);
    assert_eq!(delta(&before, &after, "connect_redirected"), 0);

    // Probes from the node's address (kubelet) pass untouched.
    let before = after;
    assert_eq!(
        mesh.probe_from_node(0, &mesh.v4("b", 8080)),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "lookup_bypass_probe"), 1);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 0);
}

#[test]
fn with_the_agent_stopped_enrolled_pods_fail_closed_and_a_restart_recovers() {
    let mut mesh = one_node();
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    let log = mesh.stop_agent(0);
    assert!(log.contains("datapath left pinned"), "{log}");

    let before = mesh.counters(0);
    // Outbound: the connect is still redirected, to a listener that is gone.
    let out = mesh.probe("a", &mesh.v4("d", 8080), &[]);
    assert!(
        matches!(out, ProbeOutcome::Refused | ProbeOutcome::Reset),
        "outbound with agent down: {out}"
    );
    // Inbound: dropped in sk_lookup, never delivered to the app in plaintext.
    let inb = mesh.probe("c", &mesh.v4("b", 8080), &[]);
    assert!(
        matches!(inb, ProbeOutcome::Refused | ProbeOutcome::Reset),
        "inbound with agent down: {inb}"
    );
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 1);
    assert_eq!(delta(&before, &after, "lookup_dropped_no_listener"), 1);

    // A new agent re-adopts the pinned links and maps; no manual clean-up.
    mesh.start_agent(0);
    let log = mesh.agent(0).log_contents().expect("log");
    assert!(log.contains("redirect_connect4(re-adopted)"), "{log}");
    assert_eq!(
        mesh.probe("a", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(
        mesh.probe("c", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
}

#[test]
fn removing_a_pod_from_the_file_restores_direct_traffic() {
    let mesh = one_node();
    assert_eq!(
        mesh.probe("c", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    mesh.write_workloads_applied(0, &[("a", true), ("c", false), ("d", false)]);
    assert!(mesh.agent_log_count(0, "pod unenrolled") >= 1);

    let before = mesh.counters(0);
    // Inbound to b: no sk_lookup on b any more.
    assert_eq!(
        mesh.probe("c", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    // Outbound from b: b's netns is no longer enrolled.
    assert_eq!(
        mesh.probe("b", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    let after = mesh.counters(0);
    for name in [
        "lookup_steered_plaintext",
        "lookup_dropped_no_listener",
        "connect_redirected",
    ] {
        assert_eq!(delta(&before, &after, name), 0, "{name}");
    }
    assert_eq!(delta(&before, &after, "connect_not_enrolled"), 2);
    // a stays enrolled: its traffic is still captured.
    assert_eq!(
        mesh.probe("a", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(delta(&after, &mesh.counters(0), "connect_redirected"), 1);
    // Putting b back enrolls it again.
    mesh.write_workloads_applied(0, &[("a", true), ("b", true), ("c", false), ("d", false)]);
    let before = mesh.counters(0);
    assert_eq!(
        mesh.probe("c", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(
        delta(&before, &mesh.counters(0), "lookup_steered_plaintext"),
        1
    );
}

#[test]
fn a_thousand_connections_are_all_redirected_and_echoed_byte_exact() {
    let mesh = one_node();
    let before = mesh.counters(0);
    let b = mesh.v4("b", 8080);
    let sequential = mesh.client(
        "a",
        &b,
        &["--conns", "500", "--concurrency", "1", "--bytes", "1024"],
    );
    assert_eq!(
        (sequential.ok, sequential.failed),
        (500, 0),
        "{sequential:?}"
    );
    let concurrent = mesh.client(
        "a",
        &b,
        &["--conns", "500", "--concurrency", "32", "--bytes", "4096"],
    );
    assert_eq!(
        (concurrent.ok, concurrent.failed),
        (500, 0),
        "{concurrent:?}"
    );
    assert_eq!(concurrent.bytes_received, 500 * 4096);
    let after = mesh.counters(0);
    for name in [
        "connect_redirected",
        "sockops_recorded",
        "peername_restored",
    ] {
        assert_eq!(delta(&before, &after, name), 1000, "{name}");
    }
    // All 1000 went the same-node fast path: no tunnel, no plaintext steering.
    assert_eq!(delta(&before, &after, "lookup_steered_hbone"), 0);
    assert_eq!(delta(&before, &after, "lookup_steered_plaintext"), 0);
    assert_eq!(mesh.proxy_stats(0)["same_node_fast_path"], 1000);
    for name in [
        "connect_record_failed",
        "sockops_record_failed",
        "lookup_dropped_no_listener",
    ] {
        assert_eq!(delta(&before, &after, name), 0, "{name}");
    }
    mesh.wait_closed(0, 2000);
    assert!(mesh.agent_log_count(0, "outcome=\"closed\"") >= 2000);
    assert_eq!(mesh.agent_log_count(0, "no original destination"), 0);
}

#[test]
fn bad_workload_files_are_rejected_clearly_and_do_not_disturb_enrolled_pods() {
    let mesh = one_node();
    let good = mesh
        .lab
        .workload_file_yaml(0, &[("a", true), ("b", true), ("c", false), ("d", false)]);
    let a_ip = mesh.lab.pod("a").expect("a").ipv4().to_string();
    let bad = [
        ("not yaml: [", "does not parse"),
        (
            &good.replacen(&format!("\"{a_ip}\""), "\"300.1.2.3\"", 1) as &str,
            "pods[0].ips[0]",
        ),
        (
            &good.replacen(
                "    enrolled: true",
                "    enrolled: true\n    colour: red",
                1,
            ),
            "unknown field `colour`",
        ),
        (
            &good.replacen("namespace: default", "namespace: Default!", 1),
            "pods[0].namespace",
        ),
        (&good.replacen("- name: b", "- name: a", 1), "listed twice"),
    ];
    let mut rejected = 0;
    for (text, want) in bad {
        // `check` names the field.
        let path = mesh.lab.scratch_path("bad.yaml");
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(common::agent_bin())
            .args(["check", "--workloads"])
            .arg(&path)
            .output()
            .expect("mesh-agent check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(want),
            "check: want {want:?} in {stderr:?}"
        );
        // The running agent rejects it and keeps its state.
        mesh.write_workload_text(0, text);
        rejected += 1;
        mesh.wait_rejected(0, rejected);
        let log = mesh.agent(0).log_contents().expect("log");
        let line = log
            .lines()
            .rfind(|l| l.contains("workload file rejected"))
            .expect("line");
        assert!(line.contains(want), "want {want:?} in {line}");
        assert_eq!(
            mesh.probe("c", &mesh.v4("b", 8080), &[]),
            ProbeOutcome::Echoed
        );
        assert_eq!(
            mesh.probe("a", &mesh.v4("b", 8080), &[]),
            ProbeOutcome::Echoed
        );
    }
    assert_eq!(mesh.agent_log_count(0, "pod unenrolled"), 0);

    // A pod whose netns is gone fails alone, with the reason; the others stay.
    let ghost = good.replacen(
        &mesh
            .lab
            .pod("c")
            .expect("c")
            .netns_path()
            .display()
            .to_string(),
        "/var/run/netns/no-such-pod",
        1,
    );
    let ghost = ghost.replacen("    enrolled: false", "    enrolled: true", 1);
    mesh.write_workload_text_applied(0, &ghost);
    mesh.wait_workload_status(0, &[("c", "failed"), ("a", "enrolled"), ("b", "enrolled")]);
    assert!(mesh.agent_log_count(0, "pod enrollment failed") >= 1);
    let log = mesh.agent(0).log_contents().expect("log");
    assert!(log.contains("is the pod still running"), "{log}");
    assert_eq!(
        mesh.probe("d", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );

    // Starting with a bad file fails at once, with the reason.
    let path = mesh.lab.scratch_path("bad-start.yaml");
    std::fs::write(
        &path,
        "node: {name: x}\npods:\n  - name: a\n    ips: [1.2.3.4]\n    netns: relative\n",
    )
    .expect("write");
    let out = std::process::Command::new(common::agent_bin())
        .args([
            "run",
            "--pin-dir",
            "/sys/fs/bpf/unused-by-this-test",
            "--workloads",
        ])
        .arg(&path)
        .output()
        .expect("mesh-agent run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pods[0].netns"),
        "{stderr}"
    );
    assert!(!std::path::Path::new("/sys/fs/bpf/unused-by-this-test").exists());
}

#[test]
fn without_privileges_the_agent_says_what_it_lacks() {
    common::require_root();
    let dir = std::env::temp_dir().join(format!("mesh-noroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("w.yaml");
    std::fs::write(&file, "node: {name: n}\npods: []\n").expect("write");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(common::agent_bin())
        .args([
            "run",
            "--pin-dir",
            "/sys/fs/bpf/mesh-noroot-test",
            "--cgroup",
            "/sys/fs/cgroup",
            "--workloads",
        ])
        .arg(&file)
        .output()
        .expect("setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("run it as root"),
        "{stderr}"
    );
}

#[test]
fn an_upgrade_hands_over_without_cutting_open_connections() {
    let mut mesh = one_node();
    // A long connection through the first agent.
    let hold = mesh.hold_command(&mesh.v4("b", 8080), 6000, &[]);
    let held = mesh.lab.spawn_in_pod("a", hold).expect("hold");
    std::thread::sleep(std::time::Duration::from_millis(800));
    // The new agent starts next to the old one (DaemonSet maxSurge), then the
    // old one is told to stop: it drains, the new one takes new connections.
    let old = mesh.take_agent(0);
    mesh.start_agent_with(
        0,
        &[
            "--admin-addr",
            "127.0.0.1:15100",
            "--metrics-addr",
            "0.0.0.0:15120",
            "--readiness-addr",
            "0.0.0.0:15121",
        ],
    );
    old.signal(libc::SIGTERM).expect("SIGTERM");
    // The old agent drains once its listeners are closed.
    mesh.wait_listeners_closed(&old, &["a", "b"]);
    for _ in 0..5 {
        assert_eq!(
            mesh.probe("a", &mesh.v4("b", 8080), &[]),
            ProbeOutcome::Echoed
        );
        assert_eq!(
            mesh.probe("c", &mesh.v4("b", 9191), &[]),
            ProbeOutcome::Echoed
        );
    }
    let status = held
        .wait_timeout(std::time::Duration::from_secs(20))
        .expect("wait")
        .expect("hold ended");
    let out = held.log_contents().expect("hold output");
    assert!(
        status.success(),
        "the open connection was cut during the upgrade: {out}"
    );
    let exited = old
        .wait_timeout(std::time::Duration::from_secs(20))
        .expect("wait")
        .expect("old agent exited");
    assert!(exited.success(), "{}", old.log_tail(20));
    assert!(
        !old.log_contents()
            .expect("log")
            .contains("drain deadline reached")
    );
    // The new agent served the probes.
    mesh.wait_closed(0, 10);
    assert!(mesh.agent_log_count(0, "outcome=\"closed\"") >= 10);
}

#[test]
fn a_pod_vanishing_mid_connection_ends_that_connection_and_nothing_else() {
    let mut mesh = one_node();
    let hold = mesh.hold_command(&mesh.v4("b", 8080), 20000, &["--timeout-ms", "2000"]);
    let held = mesh.lab.spawn_in_pod("a", hold).expect("hold");
    std::thread::sleep(std::time::Duration::from_millis(800));
    // b goes away: its app dies, its netns is deleted, it leaves the file.
    let b_netns = mesh.lab.pod("b").expect("b").netns().to_owned();
    mesh.apps.remove(0); // the echo server of b (started first in one_node)
    let out = std::process::Command::new("ip")
        .args(["netns", "del", &b_netns])
        .output()
        .expect("ip netns del");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mesh.write_workloads_applied(0, &[("a", true), ("c", false), ("d", false)]);
    assert!(mesh.agent_log_count(0, "pod unenrolled") >= 1);
    // The held connection ends (it does not hang), with an error.
    let status = held
        .wait_timeout(std::time::Duration::from_secs(15))
        .expect("wait")
        .expect("hold ended");
    assert!(
        !status.success(),
        "the connection to a vanished pod kept going: {}",
        held.log_tail(5)
    );
    // The agent is fine and the rest of the mesh works.
    assert!(
        mesh.agent(0).try_wait().expect("try_wait").is_none(),
        "the agent died"
    );
    assert_eq!(
        mesh.probe("a", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(
        mesh.probe("c", &mesh.v4("d", 8080), &[]),
        ProbeOutcome::Echoed
    );
    let log = mesh.agent(0).log_contents().expect("log");
    assert!(!log.contains("panicked"), "{log}");
}
