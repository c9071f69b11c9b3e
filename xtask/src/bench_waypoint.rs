//! The waypoint rows of `cargo xtask bench` (issue 12): keep-alive HTTP/1.1
//! requests per second and latency from a client pod to the same backend
//! pod, through the waypoint (service `web`, `istio.io/use-waypoint`) and
//! directly (service `web-direct`: the node proxies' L4 path only), in one
//! lab ([`WaypointLab`]), alternating rounds so both see the same machine;
//! and the waypoint's resident memory per 1 000 open tunnel connections.
//! Numbers only: nothing here is asserted.
#![forbid(unsafe_code)]

use std::{process::Command, time::Duration};

use anyhow::Context as _;
use mesh_lab::app::HttpLoadReport;
use serde::Serialize;

use crate::{
    demo_l7::{DIRECT_VIP, WEB_VIP, WaypointLab},
    labkit::{self, Bins},
};

const REQUESTS: u64 = 5000;
const CONCURRENCY: u64 = 16;
const ROUNDS: usize = 3;
const OPEN_TUNNELS: u64 = 1000;

/// One path's numbers (the round with the median rate).
#[derive(Debug, Serialize)]
pub struct HttpRow {
    /// Answered requests per second.
    pub requests_per_s: f64,
    /// Median latency, in microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, in microseconds.
    pub p99_us: u64,
    /// Requests without a 200 in that round.
    pub not_ok: u64,
}

/// The waypoint rows.
#[derive(Debug, Serialize)]
pub struct WaypointRow {
    /// Client pod -> agent -> agent -> backend pod (no waypoint).
    pub direct: HttpRow,
    /// Client pod -> agent -> waypoint -> agent -> backend pod.
    pub waypoint: HttpRow,
    /// Every round's rates, direct then waypoint.
    pub rounds: Vec<(f64, f64)>,
    /// The waypoint's RSS before the connections were opened, in KiB.
    pub waypoint_rss_idle_kib: Option<u64>,
    /// Tunnel connections held open (of [`OPEN_TUNNELS`] attempted).
    pub tunnels_held: u64,
    /// The waypoint's RSS growth per 1 000 of them, in KiB.
    pub waypoint_kib_per_1000_tunnels: Option<f64>,
}

fn row(r: &HttpLoadReport) -> HttpRow {
    HttpRow {
        requests_per_s: r.per_s,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        not_ok: r.requests - r.status(200),
    }
}

/// Runs the measurement with `bins`.
pub fn measure(bins: &Bins) -> anyhow::Result<WaypointRow> {
    eprintln!("==> waypoint: keep-alive HTTP through the waypoint vs direct, cross node");
    // Access logging off (warn), as in Istio's default waypoint.
    let w = WaypointLab::start(bins, "warn", 0)?;
    // Warm-up: connections, pools, certificates.
    w.load(DIRECT_VIP, 500, CONCURRENCY)?;
    w.load(WEB_VIP, 500, CONCURRENCY)?;
    let mut reports = Vec::new();
    for _ in 0..ROUNDS {
        let direct = w.load(DIRECT_VIP, REQUESTS, CONCURRENCY)?;
        let through = w.load(WEB_VIP, REQUESTS, CONCURRENCY)?;
        reports.push((direct, through));
    }
    let rounds: Vec<(f64, f64)> = reports.iter().map(|(d, t)| (d.per_s, t.per_s)).collect();
    let median = |pick: fn(&(HttpLoadReport, HttpLoadReport)) -> &HttpLoadReport| {
        labkit::median_by(reports.iter().map(pick).collect(), |r| r.per_s)
            .map(row)
            .context("no waypoint rounds")
    };
    let (direct, waypoint) = (median(|r| &r.0)?, median(|r| &r.1)?);

    let idle = w.waypoint_rss_kib();
    let mut hold = Command::new("sh");
    // 1 000 sockets need more than the default 1 024 descriptors' headroom.
    hold.arg("-c")
        .arg(format!(
            "ulimit -n 8192 && exec \"$0\" hold --connect {WEB_VIP} --conns {OPEN_TUNNELS} --hold-ms 120000"
        ))
        .arg(bins.app.with_file_name("mesh-lab-http"));
    let holder = w.lab.spawn_in_pod("shop", hold)?;
    let line = holder
        .wait_for_log("holding", Duration::from_secs(180))
        .context("the tunnel holder did not report")?;
    let held: u64 = line
        .split_whitespace()
        .skip_while(|t| *t != "holding")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // Let the waypoint settle (buffers of the last handshakes).
    std::thread::sleep(Duration::from_millis(500));
    let loaded = w.waypoint_rss_kib();
    let per_1000 = match (idle, loaded) {
        (Some(i), Some(l)) if held > 0 => Some((l as f64 - i as f64) * 1000.0 / held as f64),
        _ => None,
    };
    drop(holder);
    w.close()?;
    Ok(WaypointRow {
        direct,
        waypoint,
        rounds,
        waypoint_rss_idle_kib: idle,
        tunnels_held: held,
        waypoint_kib_per_1000_tunnels: per_1000,
    })
}

/// Prints the rows under the bench table.
pub fn print(r: &WaypointRow) {
    println!(
        "\n{:<30} {:>12} {:>14} {:>14} {:>8}",
        "HTTP/1.1 keep-alive", "requests/s", "latency p50", "latency p99", "not 200"
    );
    for (name, h) in [
        ("direct (node proxies, L4)", &r.direct),
        ("through the waypoint (L7)", &r.waypoint),
    ] {
        println!(
            "{:<30} {:>10.0}/s {:>11} us {:>11} us {:>8}",
            name, h.requests_per_s, h.p50_us, h.p99_us, h.not_ok
        );
    }
    println!(
        "  ({REQUESTS} GETs over {CONCURRENCY} connections, cross node; median of {ROUNDS} alternating rounds, direct/waypoint req/s: {})",
        r.rounds
            .iter()
            .map(|(d, w)| format!("{d:.0}/{w:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "waypoint memory: idle {} KiB; per 1 000 open tunnel connections {} ({} of {OPEN_TUNNELS} held, one request answered on each)",
        r.waypoint_rss_idle_kib
            .map_or("?".to_owned(), |k| k.to_string()),
        r.waypoint_kib_per_1000_tunnels
            .map_or("?".to_owned(), |k| format!("{k:.0} KiB")),
        r.tunnels_held
    );
}
