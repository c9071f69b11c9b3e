//! `cargo xtask bench-ztunnel --ztunnel <binary>`: the agent beside Istio's
//! ztunnel in the bench's lab, the comparison issue 13's targets are stated
//! in. Nothing here installs ztunnel: build it yourself with `--features
//! testing`, for its fake CA (the README's comparison with ztunnel says how).
//!
//! Each side gets its own pods on the same two lab nodes, never both at
//! once in a path:
//! - **the agent**: `client`, `local` (node 0) and `remote` (node 1),
//!   enrolled, one agent per node, as `cargo xtask bench` runs them;
//! - **ztunnel**: `zclient`, `zlocal` and `zremote`, one ztunnel per pod in
//!   its dedicated mode (`PROXY_MODE=dedicated`, 2 workers, its default
//!   build's allocator and crypto as built), traffic steered to its outbound
//!   port by an iptables rule in the pod like the one in ztunnel's own
//!   namespaced tests (`scripts/ztunnel-redirect.sh`), HBONE mTLS to the
//!   destination pod's ztunnel with certificates from its fake CA;
//! - **no mesh**: `bare-client`, `bare-local` and `bare-remote`, for the
//!   latency each proxy adds;
//! - **two plain TCP relays**, cross node only: `bare-client` to `relay-a`
//!   (node 0), on to `relay-b` (node 1), on to `bare-remote`, as the
//!   bench's `relay x2` row (`mesh-lab-app forward`: read and write, no TLS,
//!   HTTP/2, policy or telemetry). Any pair of user-space proxies in the
//!   path pays at least what these pay, so their ratio to ztunnel is the
//!   floor of what the agent's can reach on this machine.
//!
//! Rounds alternate which side goes first; each round measures every row
//! with the bench's own `measure` (iperf3 1/8/64 streams with the proxies'
//! CPU per GB, sockperf latency, connection rate with the proxies' CPU per
//! connection) and memory per open connection. The table gives, for each
//! figure, the median over the rounds of the round's agent / ztunnel ratio,
//! with the lowest and highest, and beside the cross-node one the same for
//! the two relays. Numbers, not assertions.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use mesh_lab::{Lab, LabChild, LabSpec, NodeSpec};
use serde::Serialize;

use crate::{
    bench::{self, CONN_SAMPLES, ECHO_PORT, Row},
    labkit::{self, Bins},
};

/// ztunnel's `PACKET_MARK` on its own sockets, which the redirect rule
/// skips (ztunnel's default in-pod mark).
const ZTUNNEL_MARK: u32 = 0x539;

/// ztunnel's outbound (captured) port.
const ZTUNNEL_OUTBOUND_PORT: &str = "15001";

/// ztunnel's readiness endpoint, from inside its pod.
const ZTUNNEL_READY: &str = "http://127.0.0.1:15021/healthz/ready";

/// ztunnel's Prometheus endpoint, from inside its pod.
const ZTUNNEL_METRICS: &str = "http://127.0.0.1:15020/metrics";

/// Which proxies carry a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Side {
    /// No proxy: the bare pods.
    NoMesh,
    /// The agents.
    Agent,
    /// One ztunnel per pod.
    Ztunnel,
    /// Two plain TCP relays, one per node (cross node only).
    Relays,
}

impl Side {
    /// The (client, same-node server, cross-node server) pods of this side.
    /// The relays' client connects to the first relay to reach
    /// `bare-remote`; between pods of one node no relay is in the path, so
    /// their same-node pair is the no-mesh one (not measured as theirs).
    fn pods(self) -> [&'static str; 3] {
        match self {
            Side::NoMesh => ["bare-client", "bare-local", "bare-remote"],
            Side::Agent => ["client", "local", "remote"],
            Side::Ztunnel => ["zclient", "zlocal", "zremote"],
            Side::Relays => ["bare-client", "bare-local", "relay-a"],
        }
    }
}

/// One round's rows.
#[derive(Debug, Serialize)]
struct Round {
    /// Which side went first.
    first: Side,
    /// (side, same-node row, cross-node row).
    rows: Vec<(Side, Row, Row)>,
    /// The two relays' row (cross node).
    relays: Row,
    /// (side, same node, cross node) memory per 1 000 open connections, KiB
    /// (`None`: not resolved by the run).
    memory_kib_per_1000: Vec<(Side, Option<f64>, Option<f64>)>,
}

/// Runs `rounds` rounds and prints the comparison; writes
/// `target_dir/bench-ztunnel.json`.
pub fn run(bins: &Bins, ztunnel: &Path, target_dir: &Path, rounds: usize) -> anyhow::Result<()> {
    if !ztunnel.is_file() {
        bail!(
            "{} is not a file: build ztunnel with `--features testing` (README: how it compares with Istio's ztunnel)",
            ztunnel.display()
        );
    }
    let lab = Lab::new(
        LabSpec::new()
            .node(NodeSpec::with_pods([
                "client",
                "local",
                "zclient",
                "zlocal",
                "bare-client",
                "bare-local",
                "relay-a",
            ]))
            .node(NodeSpec::with_pods([
                "remote",
                "zremote",
                "bare-remote",
                "relay-b",
            ])),
    )?;
    let server_pods: Vec<&str> = [Side::NoMesh, Side::Agent, Side::Ztunnel]
        .iter()
        .flat_map(|side| side.pods()[1..].to_vec())
        .collect();
    let echo_ports = ECHO_PORT..ECHO_PORT + CONN_SAMPLES;
    let servers = bench::serve(&lab, bins, &server_pods, echo_ports.clone())?;
    let ports = bench::relayed_ports(echo_ports);
    let relay_b = labkit::forward(
        &lab,
        bins,
        "relay-b",
        &ports,
        lab.pod("bare-remote")?.ipv4(),
    )?;
    let relay_a = labkit::forward(&lab, bins, "relay-a", &ports, lab.pod("relay-b")?.ipv4())?;
    let relay_pids = [relay_a.pid(), relay_b.pid()];
    let agents = bench::start_meshed(&lab, bins)?;
    let config = write_ztunnel_config(&lab)?;
    let ztunnels = Side::Ztunnel
        .pods()
        .iter()
        .map(|pod| start_ztunnel(&lab, ztunnel, pod, &config))
        .collect::<anyhow::Result<Vec<_>>>()?;
    check_ztunnel_tunnels(&lab, bins)?;

    let agent_pids = [agents[0].pid(), agents[1].pid()];
    // (same node, cross node): the client's ztunnel and the server's.
    let zt_pids = [
        [ztunnels[0].pid(), ztunnels[1].pid()],
        [ztunnels[0].pid(), ztunnels[2].pid()],
    ];
    let mut all = Vec::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [Side::Agent, Side::Ztunnel]
        } else {
            [Side::Ztunnel, Side::Agent]
        };
        eprintln!("==> round {} of {rounds}: {:?} first", r + 1, order[0]);
        let [client, _, first_relay] = Side::Relays.pods();
        let relays = bench::measure(
            &lab,
            bins,
            "two relays, cross node",
            client,
            first_relay,
            &relay_pids,
        )?;
        let mut round = Round {
            first: order[0],
            rows: Vec::new(),
            relays,
            memory_kib_per_1000: Vec::new(),
        };
        for side in [Side::NoMesh, order[0], order[1]] {
            let [client, local, remote] = side.pods();
            let (same_pids, cross_pids): (&[u32], &[u32]) = match side {
                Side::NoMesh => (&[], &[]),
                // (Measured above, cross node only: no relay is in a
                // same-node path.)
                Side::Relays => (&[], &relay_pids),
                Side::Agent => (&agent_pids, &agent_pids),
                Side::Ztunnel => (&zt_pids[0], &zt_pids[1]),
            };
            let same = bench::measure(
                &lab,
                bins,
                &format!("{side:?}, same node"),
                client,
                local,
                same_pids,
            )?;
            let cross = bench::measure(
                &lab,
                bins,
                &format!("{side:?}, cross node"),
                client,
                remote,
                cross_pids,
            )?;
            if side != Side::NoMesh {
                let same_kib =
                    bench::memory_per_1000_connections(&lab, bins, same_pids, client, local)?;
                let cross_kib =
                    bench::memory_per_1000_connections(&lab, bins, cross_pids, client, remote)?;
                round.memory_kib_per_1000.push((side, same_kib, cross_kib));
            }
            round.rows.push((side, same, cross));
        }
        print_round(&round);
        all.push(round);
    }
    for z in ztunnels {
        z.terminate()?;
    }
    for a in agents {
        a.terminate()?;
    }
    drop((relay_a, relay_b, servers));
    lab.close()?;

    print_comparison(&all);
    let path = target_dir.join("bench-ztunnel.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&all)?)?;
    println!("written to {}", path.display());
    Ok(())
}

/// ztunnel's local config (`LOCAL_XDS_PATH`): the three ztunnel pods as
/// HBONE workloads, each its own service account. Returns its path.
fn write_ztunnel_config(lab: &Lab) -> anyhow::Result<PathBuf> {
    let mut text = String::from("workloads:\n");
    for pod in Side::Ztunnel.pods() {
        let ip = lab.pod(pod)?.ipv4();
        let node = node_name(lab, pod)?;
        text.push_str(&format!(
            "- uid: cluster1//v1/Pod/default/{pod}\n  name: {pod}\n  namespace: default\n  serviceAccount: {pod}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n"
        ));
    }
    text.push_str("policies: []\nservices: []\n");
    let path = lab.scratch_path("ztunnel-config.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The name of the lab node `pod` runs on (ztunnel's `NODE_NAME` and its
/// workloads' `node`).
fn node_name<'a>(lab: &'a Lab, pod: &str) -> anyhow::Result<&'a str> {
    Ok(lab.node(lab.pod(pod)?.node())?.name())
}

/// Steers `pod`'s outgoing TCP (but ztunnel's own, by its mark, and
/// loopback) to ztunnel's outbound port, then starts ztunnel in the pod in
/// dedicated mode and waits for it to be ready.
fn start_ztunnel(lab: &Lab, bin: &Path, pod: &str, config: &Path) -> anyhow::Result<LabChild> {
    let skip_marked = format!("{ZTUNNEL_MARK:#x}/0xfff");
    let mut rule = Command::new("iptables");
    rule.args([
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "!",
        "-o",
        "lo",
        "-m",
        "mark",
        "!",
        "--mark",
        &skip_marked,
        "-j",
        "REDIRECT",
        "--to-ports",
        ZTUNNEL_OUTBOUND_PORT,
    ]);
    let out = lab.run_in_pod(pod, rule)?;
    if !out.status.success() {
        bail!(
            "iptables in {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut cmd = Command::new(bin);
    cmd.env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", format!("default/{pod}/{pod}"))
        .env("PACKET_MARK", ZTUNNEL_MARK.to_string())
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", config)
        .env("ENABLE_ORIG_SRC", "false")
        .env("ZTUNNEL_WORKER_THREADS", "2")
        .env("NODE_NAME", node_name(lab, pod)?)
        // No DNS proxy: nothing here resolves names.
        .env("ISTIO_META_DNS_CAPTURE", "false");
    let child = lab.spawn_in_pod(pod, cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if curl(lab, pod, ZTUNNEL_READY).is_ok() {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "ztunnel in {pod} exited ({status}); its log ends:\n{}",
                child.log_tail(20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "ztunnel in {pod} was not ready in 30 s; its log ends:\n{}",
                child.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `curl -sf url` from inside `pod`: the body, or an error.
fn curl(lab: &Lab, pod: &str, url: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "2", url]);
    let out = lab.run_in_pod(pod, cmd)?;
    if !out.status.success() {
        bail!("curl {url} in {pod}: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One connection from `zclient` to each of its servers, then proof from
/// the servers' ztunnels that both arrived over mutual TLS: a comparison
/// against ztunnel passing traffic in the clear would be worth nothing.
fn check_ztunnel_tunnels(lab: &Lab, bins: &Bins) -> anyhow::Result<()> {
    for server in ["zlocal", "zremote"] {
        let outcome = labkit::probe(lab, bins, "zclient", &labkit::addr(lab, server, ECHO_PORT)?)?;
        if outcome != mesh_lab::app::ProbeOutcome::Echoed {
            bail!("zclient could not reach {server} through ztunnel: {outcome:?}");
        }
        let metrics = curl(lab, server, ZTUNNEL_METRICS)?;
        let opened: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if opened < 1.0 {
            bail!("{server}'s ztunnel counted no mutual-TLS connection in:\n{metrics}");
        }
    }
    Ok(())
}

/// One round's absolute figures.
fn print_round(round: &Round) {
    println!("\nround ({:?} first)", round.first);
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>11}",
        "row", "1 stream", "8", "64", "p50 us", "conns/s", "CPU us/c", "CPU s/GB 8"
    );
    let rows = round.rows.iter().flat_map(|(_, same, cross)| [same, cross]);
    for row in rows.chain([&round.relays]) {
        println!(
            "{:<24} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>10.0} {:>10} {:>11}",
            row.scenario,
            row.throughput_gbit_s,
            row.throughput_8_gbit_s,
            row.throughput_64_gbit_s,
            row.latency_p50_us,
            row.connections_per_s,
            row.agent_cpu_us_per_connection
                .map_or("-".into(), |c| format!("{c:.1}")),
            cpu_per_gb(row, 8).map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    for &(side, same, cross) in &round.memory_kib_per_1000 {
        println!(
            "{side:?}: KiB per 1 000 open connections: same node {}, cross node {}",
            bench::kib_per_1000(same),
            bench::kib_per_1000(cross)
        );
    }
}

/// The proxies' CPU seconds per GB of the row's `streams` run.
fn cpu_per_gb(row: &Row, streams: u32) -> Option<f64> {
    row.throughput
        .iter()
        .find(|t| t.streams == streams)?
        .proxy
        .as_ref()
        .map(|c| c.cpu_s_per_gb)
}

/// A figure of one round's row, for one node placement.
type Figure = fn(&Round, Side, bool) -> Option<f64>;

/// The row of `side` in `round`: same node, or cross node (the relays have
/// only the latter).
fn row(round: &Round, side: Side, cross: bool) -> Option<&Row> {
    if side == Side::Relays {
        return cross.then_some(&round.relays);
    }
    round
        .rows
        .iter()
        .find(|(s, _, _)| *s == side)
        .map(|(_, same, x)| if cross { x } else { same })
}

/// The `side` / ztunnel ratio of `figure` in each round: median, lowest,
/// highest.
fn ratios(rounds: &[Round], side: Side, cross: bool, figure: Figure) -> Option<(f64, f64, f64)> {
    let mut r: Vec<f64> = rounds
        .iter()
        .filter_map(|round| {
            let a = figure(round, side, cross)?;
            let z = figure(round, Side::Ztunnel, cross)?;
            (z > 0.0).then_some(a / z)
        })
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    Some((r[r.len() / 2], r[0], r[r.len() - 1]))
}

/// The comparison table's figures, by name.
fn figures() -> [(&'static str, Figure); 10] {
    [
        ("throughput, 1 stream", |r, s, c| {
            row(r, s, c).map(|x| x.throughput_gbit_s)
        }),
        ("throughput, 8 streams", |r, s, c| {
            row(r, s, c).map(|x| x.throughput_8_gbit_s)
        }),
        ("throughput, 64 streams", |r, s, c| {
            row(r, s, c).map(|x| x.throughput_64_gbit_s)
        }),
        ("new connections per second", |r, s, c| {
            row(r, s, c).map(|x| x.connections_per_s)
        }),
        ("proxies' CPU per new connection", |r, s, c| {
            row(r, s, c)?.agent_cpu_us_per_connection
        }),
        ("latency added to a round trip (p50)", |r, s, c| {
            let base = row(r, Side::NoMesh, c)?.latency_p50_us;
            Some((row(r, s, c)?.latency_p50_us - base).max(0.0))
        }),
        ("CPU seconds per GB, 1 stream", |r, s, c| {
            cpu_per_gb(row(r, s, c)?, 1)
        }),
        ("CPU seconds per GB, 8 streams", |r, s, c| {
            cpu_per_gb(row(r, s, c)?, 8)
        }),
        ("CPU seconds per GB, 64 streams", |r, s, c| {
            cpu_per_gb(row(r, s, c)?, 64)
        }),
        ("memory per open connection", |r, s, c| {
            r.memory_kib_per_1000
                .iter()
                .find(|(side, _, _)| *side == s)
                .and_then(|&(_, same, cross)| if c { cross } else { same })
        }),
    ]
}

/// The comparison table: each figure as agent / ztunnel, and beside the
/// cross-node one the two relays / ztunnel (what no pair of user-space
/// proxies gets below on this machine).
fn print_comparison(rounds: &[Round]) {
    println!(
        "\nagent / ztunnel, median of {} rounds' ratios (lowest-highest); last column: two plain TCP relays / ztunnel, cross node",
        rounds.len()
    );
    println!(
        "{:<38} {:>24} {:>24} {:>24}",
        "", "cross node", "same node", "two relays, cross"
    );
    for (name, figure) in figures() {
        let cell = |side: Side, cross: bool| {
            ratios(rounds, side, cross, figure).map_or("-".to_owned(), |(m, lo, hi)| {
                format!("{m:.2}x ({lo:.2}-{hi:.2})")
            })
        };
        println!(
            "{name:<38} {:>24} {:>24} {:>24}",
            cell(Side::Agent, true),
            cell(Side::Agent, false),
            cell(Side::Relays, true)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Figure, Round, Row, Side, figures, ratios};

    fn a_row(conns_per_s: f64, p50: f64) -> Row {
        Row {
            scenario: String::new(),
            throughput_gbit_s: 0.0,
            throughput_8_gbit_s: 0.0,
            throughput_64_gbit_s: 0.0,
            throughput: Vec::new(),
            agent_kib_per_1000_open_connections: None,
            latency_p50_us: p50,
            latency_p99_us: 0.0,
            connections_per_s: conns_per_s,
            connections_per_s_samples: Vec::new(),
            agent_cpu_us_per_connection: None,
        }
    }

    /// A round whose rows, same node and cross node alike, have these
    /// (connections/s, p50) for no mesh, the agent and ztunnel; its two
    /// relays have `relays`.
    fn a_round(none: (f64, f64), agent: (f64, f64), zt: (f64, f64), relays: (f64, f64)) -> Round {
        let side = |s: Side, (c, p): (f64, f64)| (s, a_row(c, p), a_row(c, p));
        Round {
            first: Side::Agent,
            rows: vec![
                side(Side::NoMesh, none),
                side(Side::Agent, agent),
                side(Side::Ztunnel, zt),
            ],
            relays: a_row(relays.0, relays.1),
            memory_kib_per_1000: Vec::new(),
        }
    }

    fn figure(name: &str) -> Figure {
        figures()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .expect("a figure of the table")
    }

    #[test]
    fn each_round_gives_one_ratio_and_the_table_takes_their_median() {
        let relays = (8.0, 170.0);
        let rounds = [
            a_round((10.0, 80.0), (6.0, 180.0), (4.0, 180.0), relays),
            a_round((10.0, 80.0), (5.0, 130.0), (5.0, 180.0), relays),
            a_round((10.0, 80.0), (4.5, 280.0), (3.0, 180.0), relays),
        ];
        let rate = figure("new connections per second");
        assert_eq!(
            ratios(&rounds, Side::Agent, true, rate),
            Some((1.5, 1.0, 1.5))
        );
        // Added latency: each side's p50 less the same round's no-mesh p50
        // (100 µs for ztunnel in each round; the agent adds 100, 50, 200).
        let added = figure("latency added to a round trip (p50)");
        assert_eq!(
            ratios(&rounds, Side::Agent, true, added),
            Some((1.0, 0.5, 2.0))
        );
        // A figure ztunnel lacks gives no ratio rather than a division by 0.
        let none: Figure = |_, _, _| None;
        assert_eq!(ratios(&rounds, Side::Agent, true, none), None);
    }

    #[test]
    fn the_relays_column_is_the_relays_over_ztunnel_cross_node_only() {
        // ztunnel 4, 5, 3 connections/s and 100 µs added in each round; the
        // relays 8/s and 90 µs added, whatever the agent does.
        let rounds = [
            a_round((10.0, 80.0), (6.0, 180.0), (4.0, 180.0), (8.0, 170.0)),
            a_round((10.0, 80.0), (5.0, 130.0), (5.0, 180.0), (8.0, 170.0)),
            a_round((10.0, 80.0), (4.5, 280.0), (3.0, 180.0), (8.0, 170.0)),
        ];
        let rate = figure("new connections per second");
        let (median, lowest, highest) =
            ratios(&rounds, Side::Relays, true, rate).expect("a cross-node ratio");
        assert_eq!(median, 2.0);
        assert_eq!(lowest, 1.6);
        assert!((highest - 8.0 / 3.0).abs() < 1e-9);
        let added = figure("latency added to a round trip (p50)");
        assert_eq!(
            ratios(&rounds, Side::Relays, true, added),
            Some((0.9, 0.9, 0.9))
        );
        // No relay is in a same-node path: no ratio, not the no-mesh row's
        // (which has one: 2.5x).
        assert_eq!(
            ratios(&rounds, Side::NoMesh, false, rate),
            Some((2.5, 2.0, 10.0 / 3.0))
        );
        assert_eq!(ratios(&rounds, Side::Relays, false, rate), None);
    }

    #[test]
    fn a_memory_figure_a_round_could_not_resolve_is_left_out_not_taken_as_zero() {
        let relays = (8.0, 170.0);
        let mut rounds = [
            a_round((10.0, 80.0), (6.0, 180.0), (4.0, 180.0), relays),
            a_round((10.0, 80.0), (6.0, 180.0), (4.0, 180.0), relays),
        ];
        rounds[0].memory_kib_per_1000 = vec![
            (Side::Agent, None, Some(7000.0)),
            (Side::Ztunnel, Some(9000.0), Some(7000.0)),
        ];
        rounds[1].memory_kib_per_1000 = vec![
            (Side::Agent, Some(3000.0), Some(7700.0)),
            (Side::Ztunnel, Some(10000.0), Some(7000.0)),
        ];
        let memory = figure("memory per open connection");
        assert_eq!(
            ratios(&rounds, Side::Agent, false, memory),
            Some((0.3, 0.3, 0.3))
        );
        let (median, lowest, highest) =
            ratios(&rounds, Side::Agent, true, memory).expect("both rounds' ratios");
        assert_eq!(lowest, 1.0);
        assert!((highest - 1.1).abs() < 1e-9 && median == highest);
    }
}
