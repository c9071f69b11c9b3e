//! Issue 13's goals in `cargo xtask bench`: each a meshed figure as a share
//! of the same figure without the mesh, measured in *paired rounds*.
//!
//! The rows of the bench's table are measured minutes apart, and on this
//! 2-core machine a no-mesh figure moved by ±8 % (new connections) to ±40 %
//! (8 streams cross node) from one run to the next: a goal read off two rows
//! was met or not by the baseline's luck. Here both sides of a goal are
//! measured back to back, [`ROUNDS`] times, while the agents run: the
//! meshed pods, and pods on the same nodes that are not enrolled (the
//! agents leave them alone), in an order that alternates from round to
//! round so that a drift of the machine falls on both alike. (The bare
//! pods' connects still meet the agents' connect hooks, which leave an
//! unenrolled pod's socket alone after one map lookup.) A goal's
//! figure is the median of its rounds' ratios; the lowest and highest are
//! printed beside it.
//!
//! The cross-node goals also get a *floor*: the same ratio for two plain
//! TCP relays (`mesh-lab-app forward`, one per node, no TLS, no HTTP/2, no
//! policy, no telemetry) between the unenrolled pods. What the relays reach
//! is what any node proxy on each side leaves of the no-mesh figure on this
//! machine, whatever its own work.
#![forbid(unsafe_code)]

use mesh_lab::Lab;
use serde::Serialize;

use crate::{
    bench_datapath,
    labkit::{self, Bins},
};

/// Paired rounds per goal.
pub const ROUNDS: u16 = 5;

/// Where a goal's pods are: the client on node 0, the server on `node`.
#[derive(Clone, Copy, Debug)]
enum Node {
    Same,
    Cross,
}

/// What a goal measures.
#[derive(Clone, Copy, Debug)]
enum Figure {
    /// iperf3 with this many parallel streams, Gb/s.
    Streams(u32),
    /// Connections per second (`labkit::new_conns_per_s`).
    NewConns,
}

/// One goal of issue 13.
struct Spec {
    what: &'static str,
    node: Node,
    figure: Figure,
    at_least_percent: f64,
}

const SPECS: [Spec; 5] = [
    Spec {
        what: "cross node, 1 stream",
        node: Node::Cross,
        figure: Figure::Streams(1),
        at_least_percent: 50.0,
    },
    Spec {
        what: "cross node, 8 streams",
        node: Node::Cross,
        figure: Figure::Streams(8),
        at_least_percent: 35.0,
    },
    Spec {
        what: "same node, 1 stream",
        node: Node::Same,
        figure: Figure::Streams(1),
        at_least_percent: 70.0,
    },
    Spec {
        what: "same node, new conns",
        node: Node::Same,
        figure: Figure::NewConns,
        at_least_percent: 75.0,
    },
    Spec {
        what: "cross node, new conns",
        node: Node::Cross,
        figure: Figure::NewConns,
        at_least_percent: 75.0,
    },
];

/// The pods of the paired rounds.
pub struct Pods<'a> {
    /// Enrolled: the client, and the servers on node 0 and node 1.
    pub meshed: [&'a str; 3],
    /// Not enrolled, on the same nodes.
    pub bare: [&'a str; 3],
    /// The relay in front of the bare cross-node server that the bare
    /// client dials for a floor (it relays on to the other node's relay).
    pub relay: &'a str,
    /// The echo port of round `r` is `first_echo_port + r` (one port per
    /// round: a round's connections leave their ports in TIME_WAIT).
    pub first_echo_port: u16,
    /// iperf3's run length, seconds.
    pub seconds: &'a str,
    /// Connections per connection-rate run.
    pub conns: &'a str,
}

/// A goal's outcome.
#[derive(Debug, Serialize)]
pub struct Goal {
    what: &'static str,
    /// Meshed / not meshed, in percent: the median of `rounds_percent`.
    percent: f64,
    /// Each round's meshed / not meshed, in percent, in order.
    rounds_percent: Vec<f64>,
    /// The goal, in percent.
    at_least_percent: f64,
    met: bool,
    /// The two relays' figure / not meshed, in percent (median of the
    /// rounds; cross-node goals only).
    relays_percent: Option<f64>,
    /// Each round's figures (Gb/s or connections/s), in order.
    rounds: Vec<Round>,
}

/// One paired round's figures of a goal (Gb/s or connections/s).
#[derive(Debug, Serialize)]
struct Round {
    bare: f64,
    meshed: f64,
    /// The two relays' (cross-node goals).
    relays: Option<f64>,
}

/// Measures every goal in [`ROUNDS`] paired rounds (module docs).
pub fn measure(lab: &Lab, bins: &Bins, pods: &Pods<'_>) -> anyhow::Result<Vec<Goal>> {
    eprintln!("==> goals: {ROUNDS} paired rounds");
    let mut measured: Vec<Vec<Round>> = SPECS.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        let port = pods.first_echo_port + round;
        for (i, spec) in SPECS.iter().enumerate() {
            let server = match spec.node {
                Node::Same => 1,
                Node::Cross => 2,
            };
            let run = |client: &str, server: &str| -> anyhow::Result<f64> {
                let ip = lab.pod(server)?.ipv4().to_string();
                match spec.figure {
                    Figure::Streams(n) => bench_datapath::gbit_s(lab, client, &ip, n, pods.seconds),
                    Figure::NewConns => labkit::new_conns_per_s(
                        lab,
                        bins,
                        client,
                        &format!("{ip}:{port}"),
                        pods.conns,
                    ),
                }
            };
            let relayed = matches!(spec.node, Node::Cross);
            // Alternating order: bare first in even rounds, last in odd ones.
            let (bare, meshed, relays) = if round % 2 == 0 {
                let bare = run(pods.bare[0], pods.bare[server])?;
                let meshed = run(pods.meshed[0], pods.meshed[server])?;
                let relays = relayed.then(|| run(pods.bare[0], pods.relay)).transpose()?;
                (bare, meshed, relays)
            } else {
                let relays = relayed.then(|| run(pods.bare[0], pods.relay)).transpose()?;
                let meshed = run(pods.meshed[0], pods.meshed[server])?;
                let bare = run(pods.bare[0], pods.bare[server])?;
                (bare, meshed, relays)
            };
            measured[i].push(Round {
                bare,
                meshed,
                relays,
            });
        }
    }
    Ok(SPECS
        .iter()
        .zip(measured)
        .map(|(spec, rounds)| summarize(spec, rounds))
        .collect())
}

/// A goal from its rounds: each round's meshed / bare (and relays / bare),
/// and the median of those ratios. Each ratio is taken within its round:
/// the median of ratios, not the ratio of medians, so that a round's bare
/// figure only ever divides its own meshed one.
fn summarize(spec: &Spec, rounds: Vec<Round>) -> Goal {
    let share = |x: f64, bare: f64| x / bare.max(f64::MIN_POSITIVE) * 100.0;
    let ratios: Vec<f64> = rounds.iter().map(|r| share(r.meshed, r.bare)).collect();
    let floors: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.relays.map(|x| share(x, r.bare)))
        .collect();
    let percent = labkit::median_by(ratios.clone(), |p| *p).unwrap_or(0.0);
    Goal {
        what: spec.what,
        percent,
        rounds_percent: ratios,
        at_least_percent: spec.at_least_percent,
        met: percent >= spec.at_least_percent,
        relays_percent: labkit::median_by(floors, |p| *p),
        rounds,
    }
}

/// Prints [`measure`]'s outcome.
pub fn print(goals: &[Goal]) {
    println!(
        "\ngoals, meshed as a share of no mesh: median of {ROUNDS} paired rounds (lowest-highest round); two plain TCP relays' share beside the cross-node ones:"
    );
    let range = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    for g in goals {
        let (lo, hi) = range(&mut g.rounds_percent.iter().copied());
        let relays = g
            .relays_percent
            .map_or(String::new(), |r| format!("; relays {r:.1} %"));
        println!(
            "  {:<24} {:>5.1} %  ({lo:.1}-{hi:.1} %; goal >= {:.0} %: {}{relays})",
            g.what,
            g.percent,
            g.at_least_percent,
            if g.met { "met" } else { "not met" },
        );
    }
    // What moved between rounds: a baseline with two speeds (no mesh, 8
    // streams cross node, runs at about 18 or about 40 Gb/s) shows here.
    println!("  the rounds' figures (no mesh / meshed, lowest-highest):");
    for g in goals {
        let (b_lo, b_hi) = range(&mut g.rounds.iter().map(|r| r.bare));
        let (m_lo, m_hi) = range(&mut g.rounds.iter().map(|r| r.meshed));
        println!(
            "    {:<24} {b_lo:.1}-{b_hi:.1} / {m_lo:.1}-{m_hi:.1}",
            g.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(bare: f64, meshed: f64, relays: Option<f64>) -> Round {
        Round {
            bare,
            meshed,
            relays,
        }
    }

    #[test]
    fn a_goal_is_the_median_of_its_rounds_ratios() {
        // A baseline with two speeds (about 18 and about 40 Gb/s), the
        // meshed figure steady: each round's ratio is its own meshed / bare,
        // and the goal is their median.
        let rounds = vec![
            round(40.0, 9.5, Some(9.0)),
            round(18.0, 9.6, Some(9.4)),
            round(40.0, 9.7, Some(9.6)),
            round(18.0, 9.4, Some(9.2)),
            round(19.0, 9.5, Some(9.5)),
        ];
        let goal = summarize(&SPECS[1], rounds);
        assert_eq!(goal.what, "cross node, 8 streams");
        let want = [23.75, 53.333, 24.25, 52.222, 50.0];
        for (got, want) in goal.rounds_percent.iter().zip(want) {
            assert!((got - want).abs() < 0.01, "{got} against {want}");
        }
        assert!((goal.percent - 50.0).abs() < 1e-9, "{}", goal.percent);
        assert!(goal.met, "50 % against a goal of 35 %");
        // Relays: 22.5, 52.2, 24.0, 51.1, 50.0 -> the median is 50.0.
        let relays = goal.relays_percent.expect("cross node has relays");
        assert!((relays - 50.0).abs() < 1e-9, "{relays}");
    }

    #[test]
    fn a_goal_below_its_share_is_not_met_and_same_node_has_no_relays() {
        let rounds = vec![
            round(12_000.0, 8_400.0, None),
            round(11_000.0, 8_100.0, None),
            round(12_500.0, 8_300.0, None),
        ];
        let goal = summarize(&SPECS[3], rounds);
        assert_eq!(goal.what, "same node, new conns");
        // 70.0, 73.6, 66.4 -> 70.0.
        assert!((goal.percent - 70.0).abs() < 1e-9, "{}", goal.percent);
        assert!(!goal.met);
        assert_eq!(goal.relays_percent, None);
    }
}
