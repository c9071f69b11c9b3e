//! Upgrade and crash semantics in the lab (issue 9, items 3 and 4):
//! - an upgrade (a new agent next to the old one, then SIGTERM to the old
//!   one) under a load of short connections loses none of them, same node
//!   and across nodes (HBONE);
//! - an agent killed mid-transfer surfaces as a reset to the apps on its
//!   side (HBONE or plaintext), never as a clean end of stream;
//! - while two agents overlap, neither takes over nor removes the other's
//!   delivery exemptions in the shared pinned maps.

mod common;

use std::{io, net::SocketAddr, process::Command, time::Duration};

use common::Mesh;
use mesh_agent::datapath::{Datapath, DatapathConfig};
use mesh_lab::{LabChild, LabSpec, NodeSpec, PodSpec, app::ClientReport, lab_app_path};

/// Two nodes: `a` and `b` on node 0, `c` on node 1, all enrolled; echo
/// servers on `b` and `c` (8080). No agent runs yet.
fn two_nodes() -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("a"))
                    .pod(PodSpec::new("b")),
            )
            .node(NodeSpec::new().pod(PodSpec::new("c"))),
    );
    let n0 = mesh.workloads_yaml(0, &[("a", true), ("b", true)], &[("c", true)]);
    let n1 = mesh.workloads_yaml(1, &[("c", true)], &[("a", true), ("b", true)]);
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &n1);
    mesh.echo("b", &[8080]);
    mesh.echo("c", &[8080]);
    mesh
}

/// Admin endpoints of the agent generation `generation`: two agents run at
/// once during an upgrade, so consecutive generations use different ports.
fn endpoints(generation: usize) -> [String; 6] {
    let base = 15100 + 100 * (generation % 2) as u16;
    [
        "--admin-addr".to_owned(),
        format!("127.0.0.1:{base}"),
        "--metrics-addr".to_owned(),
        format!("127.0.0.1:{}", base + 20),
        "--readiness-addr".to_owned(),
        format!("127.0.0.1:{}", base + 21),
    ]
}

/// Starts generation `generation` of node `node`'s agent. Consecutive
/// generations run different numbers of proxy threads (1, 2, 3, 1, ...): during
/// an upgrade both agents' listeners of a port share one reuseport group,
/// whatever each agent's count, and the old agent's queued connections
/// migrate to any of the new one's.
fn start_generation(mesh: &mut Mesh, node: usize, generation: usize) {
    let mut args = endpoints(generation).to_vec();
    args.extend([
        "--proxy-threads".to_owned(),
        (1 + generation % 3).to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    mesh.start_agent_with(node, &args);
}

/// One upgrade of node `node`'s agent: the next generation starts next to
/// the running one (DaemonSet `maxSurge`), then the old one gets SIGTERM and
/// must drain and exit cleanly.
fn upgrade(mesh: &mut Mesh, node: usize, generation: usize) {
    let old = mesh.take_agent(node);
    start_generation(mesh, node, generation);
    old.signal(libc::SIGTERM).expect("SIGTERM");
    let exited = old
        .wait_timeout(Duration::from_secs(40))
        .expect("wait")
        .expect("the old agent exited");
    assert!(exited.success(), "old agent: {}", old.log_tail(30));
    let log = old.log_contents().expect("log");
    assert!(
        !log.contains("drain deadline reached"),
        "the old agent had to cut connections: {}",
        old.log_tail(30)
    );
}

/// A `mesh-lab-app client` in `from` opening short connections to `to`
/// (`concurrency` at a time, 64 B echoed each) until `stop` exists.
fn load(mesh: &Mesh, from: &str, to: &str, concurrency: u32, stop: &std::path::Path) -> LabChild {
    let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
    cmd.args(["client", "--connect", to, "--bytes", "64"])
        .args(["--concurrency", &concurrency.to_string()])
        .arg("--stop-file")
        .arg(stop);
    mesh.lab.spawn_in_pod(from, cmd).expect("spawn client")
}

fn report(child: &LabChild) -> ClientReport {
    common::final_report(child, Duration::from_secs(30))
}

/// Upgrade rounds (each upgrades both nodes' agents).
const UPGRADE_ROUNDS: usize = 4;

#[test]
fn upgrades_under_load_lose_no_connection_same_node_or_across_nodes() {
    let mut mesh = two_nodes();
    start_generation(&mut mesh, 0, 0);
    start_generation(&mut mesh, 1, 0);
    let stop = mesh.lab.scratch_path("stop-load");
    let b = mesh.v4("b", 8080);
    let c = mesh.v4("c", 8080);
    // Short connections all the time: some are always queued in the old
    // agent's listeners, accepted but not yet connected onwards, or opening
    // a stream on a tunnel connection the old agent is closing. (Long-lived
    // connections across an upgrade: datapath.rs,
    // an_upgrade_hands_over_without_cutting_open_connections.)
    let same_node = load(&mesh, "a", &b, 16, &stop);
    let cross_node = load(&mesh, "a", &c, 16, &stop);
    std::thread::sleep(Duration::from_millis(500));
    // Node 0 serves a's outbound (both loads) and b's inbound; node 1
    // serves c's inbound HBONE.
    for generation in 1..=UPGRADE_ROUNDS {
        upgrade(&mut mesh, 0, generation);
        upgrade(&mut mesh, 1, generation);
    }
    std::fs::write(&stop, b"").expect("stop file");
    let reports = [
        ("same node", report(&same_node)),
        ("cross node", report(&cross_node)),
    ];
    for (name, r) in &reports {
        assert!(r.ok > 0, "{name}: no connection went through: {r:?}");
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|(_, r)| r.failed > 0)
        .map(|(name, r)| {
            format!(
                "{name}: {} of {} failed {:?}",
                r.failed,
                r.ok + r.failed,
                r.errors
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "connections failed across {} upgrades: {}",
        2 * UPGRADE_ROUNDS,
        failed.join("; ")
    );
}

/// Waits until data moves through the mesh (the transfer is under way).
fn transfer_under_way() {
    std::thread::sleep(Duration::from_millis(1000));
}

fn assert_reset(what: &str, child: &LabChild) {
    let r = common::flow_report(child);
    assert!(r.bytes > 0, "{what}: no data moved before the kill: {r:?}");
    assert_eq!(
        r.end, "reset",
        "{what}: the agent's death looked like {:?} (after {} bytes), not a reset",
        r.end, r.bytes
    );
}

#[test]
fn a_killed_agent_resets_the_apps_on_its_side_same_node() {
    let mut mesh = two_nodes();
    mesh.start_agent(0);
    let b_sends = mesh.flow("b", &["--listen", "[::]:7001", "--send"]);
    let b_receives = mesh.flow("b", &["--listen", "[::]:7002"]);
    let a_receives = mesh.flow("a", &["--connect", &mesh.v4("b", 7001)]);
    let a_sends = mesh.flow("a", &["--connect", &mesh.v4("b", 7002), "--send"]);
    transfer_under_way();
    let agent = mesh.take_agent(0);
    agent.kill().expect("SIGKILL the agent");
    // Receivers must not take the cut stream for a complete one.
    assert_reset("client app receiving", &a_receives);
    assert_reset("server app receiving", &b_receives);
    for sender in [&b_sends, &a_sends] {
        let r = common::flow_report(sender);
        assert_ne!(r.end, "sent", "a sender finished: {r:?}");
    }
}

#[test]
fn a_killed_agent_resets_the_apps_on_its_side_across_nodes() {
    let mut mesh = two_nodes();
    mesh.start_agent(0);
    mesh.start_agent(1);
    // Server side: c receives from a; node 1's agent dies.
    let c_receives = mesh.flow("c", &["--listen", "[::]:7002"]);
    let a_sends = mesh.flow("a", &["--connect", &mesh.v4("c", 7002), "--send"]);
    transfer_under_way();
    mesh.take_agent(1).kill().expect("SIGKILL node 1's agent");
    assert_reset("server app receiving (its agent killed)", &c_receives);
    let r = common::flow_report(&a_sends);
    assert_ne!(r.end, "sent", "the sender finished: {r:?}");

    // Client side: a receives from c; node 0's agent dies.
    mesh.start_agent(1);
    let c_sends = mesh.flow("c", &["--listen", "[::]:7001", "--send"]);
    let a_receives = mesh.flow("a", &["--connect", &mesh.v4("c", 7001)]);
    transfer_under_way();
    mesh.take_agent(0).kill().expect("SIGKILL node 0's agent");
    assert_reset("client app receiving (its agent killed)", &a_receives);
    let r = common::flow_report(&c_sends);
    assert_ne!(r.end, "sent", "the sender finished: {r:?}");
}

/// During an upgrade both agents write the same pinned maps, each knowing
/// only its own holders. A delivery tuple the old agent exempts (its connect
/// to the app in flight) is not the new agent's: the new agent's attempt on
/// the same tuple fails as a tuple in use, before any SYN, so its delivery
/// takes another port, and the failed attempt leaves the old agent's entry
/// in place (were it removed, the old delivery's retransmitted SYN would be
/// steered back into an agent and reset). Both datapaths are loaded here,
/// on one lab node's pins and cgroup, as two agents load them.
#[test]
fn overlapping_agents_never_remove_each_others_delivery_exemptions() {
    common::require_root();
    let mesh = two_nodes();
    let cfg = DatapathConfig {
        pin_dir: mesh.lab.pin_dir(0),
        cgroup: mesh.lab.node(0).expect("node 0").cgroup_dir().to_owned(),
        object: None,
        kernel_log_level: 0,
    };
    let (old, _) = Datapath::load(&cfg).expect("the old agent's datapath");
    let (new, _) = Datapath::load(&cfg).expect("the new agent's, on the same pins");
    let client: SocketAddr = "10.99.0.2:40000".parse().expect("address");
    let app: SocketAddr = "10.99.0.3:8080".parse().expect("address");
    // Socket cookies far above any real socket's (the kernel counts up from 1).
    let cookie = |n: u64| u64::MAX - n;
    let held = old
        .exempt
        .exempt(cookie(1), Some((client, app)))
        .expect("the old agent exempts its delivery's tuple");
    // Twice: had the first failed attempt removed the entry, the second
    // would have inserted its own and succeeded.
    for n in [2, 3] {
        let Err(e) = new.exempt.exempt(cookie(n), Some((client, app))) else {
            panic!("the new agent took the old agent's delivery tuple (attempt {n})");
        };
        assert_eq!(
            e.kind(),
            io::ErrorKind::AddrNotAvailable,
            "attempt {n}: {e}"
        );
    }
    // The old agent's own second hold of its tuple still works (a retried
    // connect of its own), and its entry goes with its last hold.
    let again = old
        .exempt
        .exempt(cookie(4), Some((client, app)))
        .expect("the old agent holds its own tuple again");
    drop(again);
    assert!(
        new.exempt.exempt(cookie(5), Some((client, app))).is_err(),
        "the old agent's entry went before its last hold"
    );
    drop(held);
    let taken = new
        .exempt
        .exempt(cookie(6), Some((client, app)))
        .expect("once the old delivery is done, its tuple is free for the new agent");
    drop(taken);
    drop((old, new));
}

#[test]
fn a_killed_agent_resets_the_app_of_a_plaintext_delivery() {
    let mut mesh = two_nodes();
    // No agent on node 1: c's connection reaches b's agent in plaintext
    // (PERMISSIVE), which delivers it to b with a plain relay.
    mesh.start_agent(0);
    let b_receives = mesh.flow("b", &["--listen", "[::]:7003"]);
    let c_sends = mesh.flow("c", &["--connect", &mesh.v4("b", 7003), "--send"]);
    transfer_under_way();
    mesh.take_agent(0).kill().expect("SIGKILL node 0's agent");
    assert_reset("server app receiving a plaintext delivery", &b_receives);
    let r = common::flow_report(&c_sends);
    assert_ne!(r.end, "sent", "the sender finished: {r:?}");
}
