//! `cargo xtask bench`: throughput (iperf3, 1/8/64 streams, with the agents'
//! CPU, page faults and context switches per GB: `bench_datapath`),
//! request/response latency at a fixed rate (sockperf ping-pong),
//! new-connection rate (mesh-lab-app) and the agent's memory per open
//! connection, for the same pods without the mesh (baseline) and through it,
//! same node and cross node, and for plain TCP relays in the mesh's place
//! (what any proxy pays); issue 13's goals in paired rounds
//! (`bench_goals`). Prints a table; writes `target/bench.json`.
//! Numbers, not assertions: nothing here fails on speed.
#![forbid(unsafe_code)]

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use mesh_lab::{
    Lab, LabChild, LabSpec, NodeSpec,
    app::{ClientReport, HoldReport},
};
use serde::Serialize;

use crate::{
    bench_datapath::{self, Throughput},
    bench_goals,
    labkit::{self, Bins},
};

const SECONDS: &str = "4";
const LATENCY_RATE: &str = "2000";
const CONNS: &str = "2000";
/// Connection-rate runs per row; the row reports their median. One run of
/// `CONNS` connections lasts 0.15–0.35 s here, and single runs of the same
/// row were seen 6 % apart. Run *i* dials echo port `ECHO_PORT + i`: every
/// run leaves its client ports in TIME_WAIT for a minute, and Linux picks
/// a connect's port from about 14 000 per destination address and port
/// before it has to search them; one port for all runs would make the
/// meshed rows, which come later, pay for that search.
pub(crate) const CONN_SAMPLES: u16 = 3;
/// The first echo server's port (also the memory measurement's).
pub(crate) const ECHO_PORT: u16 = 8080;
/// The row of one plain TCP relay on the server's node (no mesh).
const RELAY_ONE: &str = "relay, cross node";
/// The row of two plain TCP relays, one on each node (no mesh).
const RELAY_TWO: &str = "relay x2, cross node";

/// The echo servers' ports: the rows' connection-rate runs, then the
/// goals' paired rounds, one port per run.
fn echo_ports() -> std::ops::Range<u16> {
    ECHO_PORT..ECHO_PORT + CONN_SAMPLES + bench_goals::ROUNDS
}

/// The ports a relay row's relays relay: iperf3, sockperf and the echo
/// servers on `echo`.
pub(crate) fn relayed_ports(echo: std::ops::Range<u16>) -> Vec<u16> {
    [5201, 11111].into_iter().chain(echo).collect()
}

#[derive(Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    /// One stream.
    pub(crate) throughput_gbit_s: f64,
    pub(crate) throughput_8_gbit_s: f64,
    pub(crate) throughput_64_gbit_s: f64,
    /// Every stream count, with the proxies' cost per GB (the agents', or a
    /// relay row's relays').
    pub(crate) throughput: Vec<Throughput>,
    /// Both agents' RSS growth per 1 000 idle connections held (meshed rows).
    pub(crate) agent_kib_per_1000_open_connections: Option<f64>,
    pub(crate) latency_p50_us: f64,
    pub(crate) latency_p99_us: f64,
    /// The median of `connections_per_s_samples`.
    pub(crate) connections_per_s: f64,
    /// Every connection-rate run of the row, in order.
    pub(crate) connections_per_s_samples: Vec<f64>,
    /// The proxies' CPU time (both agents, or a relay row's relays; user +
    /// system) per connection over all of the row's connection-rate runs,
    /// in microseconds (meshed and relay rows; the name is kept for
    /// `bench.json`'s readers).
    /// What a connection costs the proxies, apart from how fast the load
    /// generator, which shares the cores, can open them.
    pub(crate) agent_cpu_us_per_connection: Option<f64>,
}

/// Runs the suite with the binaries in `bin_dir`; writes JSON into
/// `target_dir`. `datapath_only`: the throughput, latency, connection-rate
/// and memory rows only (no upgrades, routing or micro-benchmarks).
pub fn run(bin_dir: &Path, target_dir: &Path, datapath_only: bool) -> anyhow::Result<()> {
    let bins = Bins::in_dir(bin_dir)?;
    let lab = Lab::new(
        LabSpec::new()
            .node(NodeSpec::with_pods([
                "client",
                "local",
                "relay-a",
                "bare-client",
                "bare-local",
            ]))
            .node(NodeSpec::with_pods(["remote", "relay-b", "bare-remote"])),
    )?;
    // The bare pods are never enrolled: the goals' paired rounds measure
    // them beside the meshed ones while the agents run (`bench_goals`).
    let servers = serve(
        &lab,
        &bins,
        &["local", "remote", "bare-local", "bare-remote"],
        echo_ports(),
    )?;

    let mut rows = Vec::new();
    labkit::write_workloads(
        &lab,
        0,
        &[("client", false), ("local", false)],
        &[("remote", false)],
    )?;
    labkit::write_workloads(
        &lab,
        1,
        &[("remote", false)],
        &[("client", false), ("local", false)],
    )?;
    rows.push(measure(
        &lab,
        &bins,
        "no mesh, same node",
        "client",
        "local",
        &[],
    )?);
    rows.push(measure(
        &lab,
        &bins,
        "no mesh, cross node",
        "client",
        "remote",
        &[],
    )?);
    // What any proxy pays, with nothing of the mesh: plain TCP relays
    // (`mesh-lab-app forward`) between pods that are never enrolled, one on
    // the server's node, then one on each node. They stay up for the goals'
    // paired rounds.
    let ports = relayed_ports(echo_ports());
    let relay_b = labkit::forward(
        &lab,
        &bins,
        "relay-b",
        &ports,
        lab.pod("bare-remote")?.ipv4(),
    )?;
    rows.push(measure(
        &lab,
        &bins,
        RELAY_ONE,
        "bare-client",
        "relay-b",
        &[relay_b.pid()],
    )?);
    let relay_a = labkit::forward(&lab, &bins, "relay-a", &ports, lab.pod("relay-b")?.ipv4())?;
    rows.push(measure(
        &lab,
        &bins,
        RELAY_TWO,
        "bare-client",
        "relay-a",
        &[relay_a.pid(), relay_b.pid()],
    )?);

    let mut agents = start_meshed(&lab, &bins)?;
    let idle_rss = labkit::rss_kib(agents[0].pid());
    let pids = [agents[0].pid(), agents[1].pid()];
    rows.push(measure(
        &lab,
        &bins,
        "mesh, same node",
        "client",
        "local",
        &pids,
    )?);
    rows.push(measure(
        &lab,
        &bins,
        "mesh, cross node",
        "client",
        "remote",
        &pids,
    )?);
    let same_1000 = memory_per_1000_connections(&lab, &bins, &pids, "client", "local")?;
    let per_1000 = memory_per_1000_connections(&lab, &bins, &pids, "client", "remote")?;
    for r in &mut rows {
        if r.scenario == "mesh, same node" {
            r.agent_kib_per_1000_open_connections = same_1000;
        } else if r.scenario == "mesh, cross node" {
            r.agent_kib_per_1000_open_connections = per_1000;
        }
    }
    // The same pods through an HBONE tunnel to the agent itself (the
    // same-node fast path off): what the fast path saves, in this run.
    agents[0].terminate()?;
    agents[0] =
        labkit::start_agent_with(&lab, &bins, 0, &["--same-node-fast-path=false".to_owned()])?;
    let tunnel_pids = [agents[0].pid(), agents[1].pid()];
    rows.push(measure(
        &lab,
        &bins,
        "mesh, same node, tunnel",
        "client",
        "local",
        &tunnel_pids,
    )?);
    agents[0].terminate()?;
    agents[0] = labkit::start_agent(&lab, &bins, 0)?;
    let rss: Vec<Option<u64>> = agents.iter().map(|a| labkit::rss_kib(a.pid())).collect();
    let redirected = labkit::counters(&lab, &bins, 0)?
        .get("connect_redirected")
        .copied()
        .unwrap_or(0);
    let goals = bench_goals::measure(
        &lab,
        &bins,
        &bench_goals::Pods {
            meshed: ["client", "local", "remote"],
            bare: ["bare-client", "bare-local", "bare-remote"],
            relay: "relay-a",
            first_echo_port: ECHO_PORT + CONN_SAMPLES,
            seconds: SECONDS,
            conns: CONNS,
        },
    )?;
    drop((relay_a, relay_b));
    if datapath_only {
        for agent in agents {
            agent.terminate()?;
        }
        drop(servers);
        lab.close()?;
        print_rows(&rows);
        bench_goals::print(&goals);
        let json = serde_json::json!({ "rows": rows, "goals": goals, "agent_rss_kib": { "idle": idle_rss, "node0": rss[0], "node1": rss[1] }, "agent_kib_per_1000_open_connections": per_1000 });
        let path = target_dir.join("bench.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
        println!("written to {} (data path rows only)", path.display());
        return Ok(());
    }
    let upgrade = measure_upgrades(&lab, &bins, agents)?;
    drop(servers);
    lab.close()?;
    let routing = crate::bench_routing::measure(&bins)?;
    let waypoint = crate::bench_waypoint::measure(&bins)?;

    print_rows(&rows);
    bench_goals::print(&goals);
    let kib =
        |v: Option<u64>| v.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "\nagent memory (RSS): idle {}, after the runs node 0 {} / node 1 {}; node 0 redirected {redirected} connects",
        kib(idle_rss),
        kib(rss[0]),
        kib(rss[1])
    );
    println!(
        "agent memory per 1 000 open connections (both agents): same node {} KiB, cross node {} KiB ({OPEN_CONNS} idle connections held)",
        kib_per_1000(same_1000),
        kib_per_1000(per_1000)
    );
    println!(
        "routing: new conns to a plain service {:.0}/s, to a 50/50 split service (DestinationRule + VirtualService) {:.0}/s ({:+.1} %; medians of {} alternating rounds: {})",
        routing.plain_per_s,
        routing.split_per_s,
        (routing.split_per_s / routing.plain_per_s.max(1.0) - 1.0) * 100.0,
        routing.rounds.len(),
        routing
            .rounds
            .iter()
            .map(|(p, s)| format!("{p:.0}/{s:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    print_upgrades(&upgrade);
    crate::bench_waypoint::print(&waypoint);
    // The decision micro-benchmarks, built with optimizations like the
    // agent (xtask itself is a debug build).
    let policy_lines = micro_bench("mesh-policy", "policy evaluation (AuthorizationPolicy, L4)")?;
    let routing_lines = micro_bench(
        "mesh-routing",
        "routing decision (VirtualService 80/20 + DestinationRule, L4)",
    )?;
    let json = serde_json::json!({ "routing_decision": routing_lines.lines().collect::<Vec<_>>(), "policy_evaluation": policy_lines.lines().collect::<Vec<_>>(), "rows": rows, "goals": goals, "agent_rss_kib": { "idle": idle_rss, "node0": rss[0], "node1": rss[1] }, "agent_kib_per_1000_open_connections": per_1000, "upgrade": upgrade, "routing_connection_rates": routing, "waypoint": waypoint });
    let path = target_dir.join("bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    println!("written to {}", path.display());
    Ok(())
}

/// The servers every row measures against, in each of `pods`: iperf3 on
/// 5201, sockperf on 11111 and an echo server on each of `echo_ports`.
pub(crate) fn serve(
    lab: &Lab,
    bins: &Bins,
    pods: &[&str],
    echo_ports: std::ops::Range<u16>,
) -> anyhow::Result<Vec<LabChild>> {
    let mut servers = Vec::new();
    for &pod in pods {
        let ip = lab.pod(pod)?.ipv4().to_string();
        let mut iperf = Command::new("iperf3");
        iperf.args(["-s", "-p", "5201", "-B", &ip]);
        servers.push(lab.spawn_in_pod(pod, iperf)?);
        let mut sockperf = Command::new("sockperf");
        sockperf.args(["server", "--tcp", "-i", &ip, "-p", "11111"]);
        servers.push(lab.spawn_in_pod(pod, sockperf)?);
        for port in echo_ports.clone() {
            servers.push(labkit::echo(lab, bins, pod, port)?);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(servers)
}

/// Enrols `client` and `local` (node 0) and `remote` (node 1), and starts
/// both nodes' agents.
pub(crate) fn start_meshed(lab: &Lab, bins: &Bins) -> anyhow::Result<[LabChild; 2]> {
    labkit::write_workloads(
        lab,
        0,
        &[("client", true), ("local", true)],
        &[("remote", true)],
    )?;
    labkit::write_workloads(
        lab,
        1,
        &[("remote", true)],
        &[("client", true), ("local", true)],
    )?;
    Ok([
        labkit::start_agent(lab, bins, 0)?,
        labkit::start_agent(lab, bins, 1)?,
    ])
}

/// Prints the throughput/latency/connection table and the agents' cost table.
fn print_rows(rows: &[Row]) {
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>12} {:>12} {:>11} {:>9}",
        "scenario",
        "1 stream",
        "8 streams",
        "64 streams",
        "latency p50",
        "latency p99",
        "new conns",
        "KiB/1000c"
    );
    for r in rows {
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>9.1} us {:>9.1} us {:>9.0}/s {:>9}",
            r.scenario,
            format!("{:.2} Gb/s", r.throughput_gbit_s),
            format!("{:.2} Gb/s", r.throughput_8_gbit_s),
            format!("{:.2} Gb/s", r.throughput_64_gbit_s),
            r.latency_p50_us,
            r.latency_p99_us,
            r.connections_per_s,
            kib_per_1000(r.agent_kib_per_1000_open_connections)
        );
    }
    bench_datapath::print_costs(
        rows.iter()
            .map(|r| (r.scenario.as_str(), r.throughput.as_slice())),
    );
    println!(
        "\nproxies' CPU per new connection (both agents, or the relays of a relay row; user + system, over every connection of the row's {CONN_SAMPLES} rate runs):"
    );
    for r in rows {
        if let Some(us) = r.agent_cpu_us_per_connection {
            println!("  {:<24} {us:>7.1} us", r.scenario);
        }
    }
    let runs = bench_datapath::RUNS;
    println!(
        "latency: sockperf TCP ping-pong at {LATENCY_RATE} msg/s for {SECONDS} s, round trip; throughput: iperf3 -P 1/8/64 for {SECONDS} s each, the median of {runs} runs, the proxies' cost from /proc/<pid> (both agents, or a relay row's relays, per GB received); new conns: {CONNS} connections, 16 at a time, 64 B echoed each, the median of {CONN_SAMPLES} runs (to echo ports {ECHO_PORT}..)"
    );
}

/// Runs `crate`'s `bench` example in release mode, prints its lines under
/// `title` and returns them.
fn micro_bench(krate: &str, title: &str) -> anyhow::Result<String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            krate,
            "--example",
            "bench",
        ])
        .output()
        .with_context(|| format!("{krate} micro-benchmark"))?;
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{title}:");
    for line in lines.lines() {
        println!("  {line}");
    }
    Ok(lines)
}

/// One row: `from` to `server`, with `proxies` (pids: the agents, or a
/// relay row's relays; empty without either) measured during the
/// throughput and connection-rate runs.
pub(crate) fn measure(
    lab: &Lab,
    bins: &Bins,
    scenario: &str,
    from: &str,
    server: &str,
    proxies: &[u32],
) -> anyhow::Result<Row> {
    eprintln!("==> {scenario}");
    let ip = lab.pod(server)?.ipv4().to_string();
    let timeout = Duration::from_secs(60);

    let throughput = bench_datapath::throughput(lab, from, &ip, SECONDS, proxies)?;
    let gbit = |streams: u32| {
        throughput
            .iter()
            .find(|t| t.streams == streams)
            .map_or(0.0, |t| t.gbit_s)
    };

    let mut sockperf = Command::new("sockperf");
    sockperf.args([
        "ping-pong",
        "--tcp",
        "-i",
        &ip,
        "-p",
        "11111",
        "-t",
        SECONDS,
        "--mps",
        LATENCY_RATE,
        "--full-rtt",
    ]);
    let out = lab.run_in_pod_timeout(from, sockperf, timeout)?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let p50 = percentile(&text, "50.000")?;
    let p99 = percentile(&text, "99.000")?;

    let cpu_before = bench_datapath::cpu_seconds(proxies)?;
    let samples = (ECHO_PORT..ECHO_PORT + CONN_SAMPLES)
        .map(|port| {
            labkit::new_conns_per_s(lab, bins, from, &format!("{ip}:{port}"), CONNS)
                .with_context(|| scenario.to_owned())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cpu = bench_datapath::cpu_seconds(proxies)? - cpu_before;
    // Every connection of the runs succeeded (`new_conns_per_s` fails otherwise).
    let conns = f64::from(CONN_SAMPLES) * CONNS.parse::<f64>()?;
    let agent_cpu_us_per_connection = (!proxies.is_empty()).then_some(cpu * 1e6 / conns);
    let rate = labkit::median_by(samples.clone(), |r| *r).unwrap_or(0.0);
    Ok(Row {
        scenario: scenario.to_owned(),
        throughput_gbit_s: gbit(1),
        throughput_8_gbit_s: gbit(8),
        throughput_64_gbit_s: gbit(64),
        throughput,
        agent_kib_per_1000_open_connections: None,
        latency_p50_us: p50,
        latency_p99_us: p99,
        connections_per_s: rate,
        connections_per_s_samples: samples,
        agent_cpu_us_per_connection,
    })
}

/// A [`memory_per_1000_connections`] figure for a table: "-" when the run
/// could not resolve it.
pub(crate) fn kib_per_1000(kib: Option<f64>) -> String {
    kib.map_or("-".to_owned(), |k| format!("{k:.0}"))
}

/// Idle connections held open for the memory measurement.
const OPEN_CONNS: u64 = 2000;

/// Memory per 1 000 open connections: the RSS growth of the `proxies`
/// (both nodes' agents: each connection crosses both) while `OPEN_CONNS`
/// idle connections from `from` to `to`'s echo server are held open
/// through the mesh, divided by the number of connections, times 1 000.
/// In KiB; `None` when the RSS did not grow: the proxies held the
/// connections in memory their allocators kept from earlier runs, which
/// this run cannot tell apart (a 0 would read as "free").
pub(crate) fn memory_per_1000_connections(
    lab: &Lab,
    bins: &Bins,
    proxies: &[u32],
    from: &str,
    to: &str,
) -> anyhow::Result<Option<f64>> {
    eprintln!("==> memory per 1 000 open connections");
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let rss_total = || -> anyhow::Result<u64> {
        proxies
            .iter()
            .map(|&pid| labkit::rss_kib(pid).context("proxy RSS"))
            .sum()
    };
    // Settle first: the previous runs' connections are gone.
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_total()?;
    let fds_before: usize = proxies.iter().map(|&pid| fds(pid)).sum();
    let mut client = Command::new(&bins.app);
    client
        .args(["client", "--connect", &labkit::addr(lab, to, ECHO_PORT)?])
        .args(mesh_lab::app::held_burst_args(OPEN_CONNS, 15_000));
    let child = lab.spawn_in_pod(from, client)?;
    // Held: each connection is at least one descriptor in each agent. The
    // spare sockets the agents keep in the destination pods' netns (at most
    // 8 per family per pod, refilled when 2 are left) come and go between
    // the two counts, so the count allows for those of the two destination
    // pods.
    const SPARE_SOCKETS_SLACK: usize = 2 * 2 * 8;
    let want = (fds_before + 2 * usize::try_from(OPEN_CONNS)?).saturating_sub(SPARE_SOCKETS_SLACK);
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while proxies.iter().map(|&pid| fds(pid)).sum::<usize>() < want {
        if std::time::Instant::now() > deadline {
            bail!("the {OPEN_CONNS} connections did not all open through the mesh");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let held = rss_total()?;
    if child.wait_timeout(Duration::from_secs(60))?.is_none() {
        bail!("the memory client did not finish");
    }
    Ok((held > before).then(|| (held - before) as f64 / OPEN_CONNS as f64 * 1000.0))
}

/// `---> percentile 99.000 =   62.318` from sockperf's output, in microseconds.
fn percentile(text: &str, which: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| {
            let rest = l.split_once(&format!("percentile {which} ="))?.1;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no percentile {which} in sockperf output:\n{text}"))
}

// ---------------------------------------------------------------- upgrades

/// Upgrades of both nodes' agents under load.
const UPGRADES: usize = 3;
/// Long-lived connections per destination held across the upgrades.
const LONG_LIVED: usize = 2;

/// Connections attempted and failed across [`UPGRADES`] upgrade rounds
/// (target: 0 failed).
#[derive(Debug, Serialize)]
struct UpgradeRow {
    /// Upgrade rounds (each upgrades node 0's then node 1's agent).
    rounds: usize,
    /// Short connections attempted (same node and cross node).
    short_attempted: u64,
    /// Short connections that failed.
    short_failed: u64,
    /// Short connection failures by kind.
    short_errors: std::collections::BTreeMap<String, u64>,
    /// Long-lived connections held across all the upgrades.
    long_attempted: u64,
    /// Long-lived connections cut.
    long_failed: u64,
}

/// Generation `generation`'s admin endpoints: every agent generation gets
/// its own ports (an old one drains while the next ones start).
fn generation_endpoints(generation: usize) -> Vec<String> {
    let base = 15100 + 100 * generation;
    [
        ("--admin-addr", base),
        ("--metrics-addr", base + 20),
        ("--readiness-addr", base + 21),
    ]
    .iter()
    .flat_map(|(flag, port)| [(*flag).to_owned(), format!("127.0.0.1:{port}")])
    .collect()
}

/// Runs short connections (same node and cross node, 16 in flight each)
/// and a few long-lived ones from `client` while both nodes' agents are
/// upgraded [`UPGRADES`] times (the new agent starts next to the old one,
/// then the old one gets SIGTERM and drains); counts what failed. Consumes
/// the running agents and stops the last generation.
fn measure_upgrades(lab: &Lab, bins: &Bins, agents: [LabChild; 2]) -> anyhow::Result<UpgradeRow> {
    eprintln!("==> upgrades under load");
    let stop = lab.scratch_path("bench-upgrade-stop");
    let targets = [
        labkit::addr(lab, "local", ECHO_PORT)?,
        labkit::addr(lab, "remote", ECHO_PORT)?,
    ];
    let mut short = Vec::new();
    for to in &targets {
        let mut cmd = Command::new(&bins.app);
        cmd.args(["client", "--connect", to, "--bytes", "64"])
            .args(["--concurrency", "16", "--stop-file"])
            .arg(&stop);
        short.push(lab.spawn_in_pod("client", cmd)?);
    }
    // Long enough to span every upgrade, short enough for the drain (30 s).
    let mut long = Vec::new();
    for to in &targets {
        for _ in 0..LONG_LIVED {
            let mut cmd = Command::new(&bins.app);
            cmd.args(["hold", "--connect", to, "--duration-ms", "15000"]);
            long.push(lab.spawn_in_pod("client", cmd)?);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let [mut current0, mut current1] = agents;
    let mut retired = Vec::new();
    for round in 1..=UPGRADES {
        for (node, current) in [(0, &mut current0), (1, &mut current1)] {
            let next = labkit::start_agent_with(lab, bins, node, &generation_endpoints(round))?;
            let old = std::mem::replace(current, next);
            old.signal(libc::SIGTERM)?;
            retired.push(old);
        }
    }
    std::fs::write(&stop, b"")?;
    let mut row = UpgradeRow {
        rounds: UPGRADES,
        short_attempted: 0,
        short_failed: 0,
        short_errors: Default::default(),
        long_attempted: 0,
        long_failed: 0,
    };
    for child in &short {
        let report: ClientReport = last_json(child, Duration::from_secs(60))?;
        row.short_attempted += report.ok + report.failed;
        row.short_failed += report.failed;
        for (kind, n) in report.errors {
            *row.short_errors.entry(kind).or_default() += n;
        }
    }
    for child in &long {
        let report: HoldReport = last_json(child, Duration::from_secs(60))?;
        row.long_attempted += 1;
        row.long_failed += u64::from(report.error.is_some());
    }
    for old in &retired {
        if old.wait_timeout(Duration::from_secs(40))?.is_none() {
            old.kill()?;
        }
    }
    for agent in [current0, current1] {
        agent.terminate()?;
    }
    Ok(row)
}

/// Waits for `child` to exit and parses the last JSON line of its output.
fn last_json<T: serde::de::DeserializeOwned>(
    child: &LabChild,
    timeout: Duration,
) -> anyhow::Result<T> {
    if child.wait_timeout(timeout)?.is_none() {
        child.kill()?;
        bail!("{} did not finish", child.label());
    }
    let log = child.log_contents()?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON report from {}: {log}", child.label()))?;
    Ok(serde_json::from_str(line)?)
}

fn print_upgrades(row: &UpgradeRow) {
    println!(
        "upgrades under load: {} rounds (both nodes each): short connections {} failed of {}{}; long-lived {} cut of {}",
        row.rounds,
        row.short_failed,
        row.short_attempted,
        if row.short_errors.is_empty() {
            String::new()
        } else {
            format!(" {:?}", row.short_errors)
        },
        row.long_failed,
        row.long_attempted
    );
}
