//! The data path's rows of `cargo xtask bench` (issue 13): throughput on 1,
//! 8 and 64 parallel streams, and what the agents spent moving it — CPU
//! seconds, page faults and context switches per GB, cores busy — read
//! from `/proc/<agent pid>` before and after each run. Numbers, not
//! assertions.
#![forbid(unsafe_code)]

use std::{process::Command, time::Duration};

use anyhow::Context as _;
use mesh_lab::Lab;
use serde::Serialize;

use crate::labkit;

/// Parallel stream counts of the throughput runs (iperf3 `-P`).
pub const STREAMS: [u32; 3] = [1, 8, 64];

/// Runs per stream count; a row reports the median one. Single runs of the
/// same row were far apart here (no mesh, cross node, 8 streams: 19.5 to
/// 43.7 Gb/s in four runs of the bench; it runs at about 18 or about
/// 40 Gb/s, seldom between). The goals are measured apart, in paired
/// rounds (`bench_goals`).
pub const RUNS: usize = 3;

/// The kernel's clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`,
/// 100 on every Linux ABI the lab runs on).
const USER_HZ: f64 = 100.0;

/// One throughput run (for a row: its median run).
#[derive(Debug, Serialize)]
pub struct Throughput {
    /// Parallel streams.
    pub streams: u32,
    /// Received by the server, all streams together.
    pub gbit_s: f64,
    /// What the proxies spent (both nodes' agents together, or a relay
    /// row's relays); `None` without either.
    pub proxy: Option<Cost>,
    /// Every run's `gbit_s`, in order (for a row's median run).
    pub runs_gbit_s: Vec<f64>,
}

/// [`RUNS`] runs of each of [`STREAMS`], interleaved (1, 8, 64, 1, 8, 64, …)
/// so that a slow spell of the machine falls on every count alike; for each
/// count, the run with the median throughput.
pub fn throughput(
    lab: &Lab,
    client: &str,
    ip: &str,
    seconds: &str,
    agents: &[u32],
) -> anyhow::Result<Vec<Throughput>> {
    let mut runs: Vec<Vec<Throughput>> = STREAMS.iter().map(|_| Vec::new()).collect();
    for _ in 0..RUNS {
        for (i, &n) in STREAMS.iter().enumerate() {
            runs[i].push(iperf(lab, client, ip, n, seconds, agents)?);
        }
    }
    runs.into_iter()
        .map(|of_count| {
            let all: Vec<f64> = of_count.iter().map(|t| t.gbit_s).collect();
            let mut median =
                labkit::median_by(of_count, |t| t.gbit_s).context("no throughput runs")?;
            median.runs_gbit_s = all;
            Ok(median)
        })
        .collect()
}

/// One iperf3 run of `streams` parallel streams from `client` to `ip`:
/// what the server received, in Gb/s.
pub fn gbit_s(
    lab: &Lab,
    client: &str,
    ip: &str,
    streams: u32,
    seconds: &str,
) -> anyhow::Result<f64> {
    Ok(iperf(lab, client, ip, streams, seconds, &[])?.gbit_s)
}

/// The agents' cost of one run, per GB (10^9 bytes) received by the server.
#[derive(Debug, Serialize)]
pub struct Cost {
    /// User + system CPU seconds.
    pub cpu_s_per_gb: f64,
    /// Minor page faults (`minflt`).
    pub page_faults_per_gb: f64,
    /// Voluntary + involuntary context switches of the agents' threads.
    pub context_switches_per_gb: f64,
    /// CPU seconds per wall-clock second: how many cores the agents kept busy.
    pub cores_busy: f64,
}

/// What `/proc` says a process has used so far.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_ticks: u64,
    minflt: u64,
    ctxsw: u64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            cpu_ticks: self.cpu_ticks.saturating_sub(o.cpu_ticks),
            minflt: self.minflt.saturating_sub(o.minflt),
            ctxsw: self.ctxsw.saturating_sub(o.ctxsw),
        }
    }
}

/// `utime + stime` and `minflt` of the whole process (`/proc/<pid>/stat`),
/// and the context switches of its live threads (`/proc/<pid>/task/*/status`).
fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> anyhow::Result<u64> {
        rest.get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {n} of /proc/{pid}/stat: {stat}"))
    };
    let mut ctxsw = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        ctxsw += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(Usage {
        cpu_ticks: field(14)? + field(15)?,
        minflt: field(10)?,
        ctxsw,
    })
}

/// The CPU seconds (user + system) that the processes `pids` have used so far.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    Ok(total(pids)?.cpu_ticks as f64 / USER_HZ)
}

fn total(pids: &[u32]) -> anyhow::Result<Usage> {
    pids.iter().try_fold(Usage::default(), |acc, &pid| {
        let u = usage(pid)?;
        Ok(Usage {
            cpu_ticks: acc.cpu_ticks + u.cpu_ticks,
            minflt: acc.minflt + u.minflt,
            ctxsw: acc.ctxsw + u.ctxsw,
        })
    })
}

/// Runs `iperf3 -P streams` for `seconds` from `client` to `ip:5201` and
/// measures `agents` (their pids; empty without the mesh) meanwhile.
fn iperf(
    lab: &Lab,
    client: &str,
    ip: &str,
    streams: u32,
    seconds: &str,
    agents: &[u32],
) -> anyhow::Result<Throughput> {
    let mut cmd = Command::new("iperf3");
    let p = streams.to_string();
    cmd.args(["-c", ip, "-p", "5201", "-t", seconds, "-P", &p, "-J"]);
    let before = total(agents)?;
    let started = std::time::Instant::now();
    let out = lab.run_in_pod_timeout(client, cmd, Duration::from_secs(60))?;
    let wall = started.elapsed().as_secs_f64();
    let used = total(agents)? - before;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let received = &json["end"]["sum_received"];
    let (bps, bytes) = received["bits_per_second"]
        .as_f64()
        .zip(received["bytes"].as_f64())
        .with_context(|| {
            format!(
                "iperf3 -P {streams} gave no result: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
    let gb = (bytes / 1e9).max(1e-9);
    let cpu_s = used.cpu_ticks as f64 / USER_HZ;
    let proxy = (!agents.is_empty()).then(|| Cost {
        cpu_s_per_gb: cpu_s / gb,
        page_faults_per_gb: used.minflt as f64 / gb,
        context_switches_per_gb: used.ctxsw as f64 / gb,
        cores_busy: cpu_s / wall.max(1e-3),
    });
    Ok(Throughput {
        streams,
        gbit_s: bps / 1e9,
        proxy,
        runs_gbit_s: Vec::new(),
    })
}

/// Prints the cost table of the meshed rows.
pub fn print_costs<'a>(rows: impl Iterator<Item = (&'a str, &'a [Throughput])>) {
    println!(
        "\n{:<22} {:>7} {:>10} {:>10} {:>14} {:>14} {:>10}",
        "proxies' cost", "streams", "Gb/s", "CPU s/GB", "faults/GB", "ctx sw/GB", "cores"
    );
    for (scenario, runs) in rows {
        for t in runs {
            let Some(c) = &t.proxy else { continue };
            println!(
                "{:<22} {:>7} {:>10.2} {:>10.2} {:>14.0} {:>14.0} {:>10.2}",
                scenario,
                t.streams,
                t.gbit_s,
                c.cpu_s_per_gb,
                c.page_faults_per_gb,
                c.context_switches_per_gb,
                c.cores_busy
            );
        }
    }
}
