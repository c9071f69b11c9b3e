//! `cargo xtask demo`: two lab nodes, the real agent with real eBPF on each,
//! traffic between enrolled and un-enrolled pods, and what the mesh did.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, path::Path, time::Duration};

use mesh_lab::{Lab, LabSpec, NodeSpec, PodSpec};

use crate::labkit::{self, Bins};

const COUNTERS_SHOWN: [&str; 7] = [
    "connect_redirected",
    "lookup_steered_hbone",
    "lookup_steered_plaintext",
    "connect_not_enrolled",
    "lookup_bypass_loopback",
    "lookup_bypass_probe",
    "lookup_dropped_no_listener",
];

/// Runs the demo with the binaries in `bin_dir`.
pub fn run(bin_dir: &Path) -> anyhow::Result<()> {
    let bins = Bins::in_dir(bin_dir)?;
    println!(
        "\n== mesh demo: a lab of network namespaces standing in for two nodes and four pods\n"
    );
    let lab = Lab::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::dual_stack("frontend"))
                    .pod(PodSpec::new("backend"))
                    .pod(PodSpec::new("legacy")),
            )
            .node(NodeSpec::new().pod(PodSpec::new("db"))),
    )?;
    for p in lab.pods() {
        println!(
            "  node {}  pod {:<9} {:<15} netns {}",
            p.node(),
            p.name(),
            p.ipv4().to_string(),
            p.netns()
        );
    }
    println!("\n  enrolled in the mesh: frontend, backend, db   (legacy is not)\n");
    let node0 = [("frontend", true), ("backend", true), ("legacy", false)];
    labkit::write_workloads(&lab, 0, &node0, &[("db", true)])?;
    labkit::write_workloads(&lab, 1, &[("db", true)], &node0)?;
    let _apps = [
        labkit::echo(&lab, &bins, "backend", 8080)?,
        labkit::echo(&lab, &bins, "legacy", 8080)?,
        labkit::echo(&lab, &bins, "db", 5432)?,
    ];
    let mut agents = vec![
        labkit::start_agent(&lab, &bins, 0)?,
        labkit::start_agent(&lab, &bins, 1)?,
    ];
    println!("  agents running on both nodes (eBPF programs attached, in-pod listeners open)\n");

    let flows = [
        (
            "frontend",
            "backend",
            8080,
            "same node, both enrolled (no tunnel)",
        ),
        ("frontend", "db", 5432, "cross node, both enrolled"),
        (
            "legacy",
            "backend",
            8080,
            "un-enrolled client -> enrolled server",
        ),
        (
            "frontend",
            "legacy",
            8080,
            "enrolled client -> un-enrolled server",
        ),
        ("legacy", "legacy", 8080, "un-enrolled pod to itself"),
    ];
    println!(
        "  {:<26} {:<40} {:<8} what the kernel programs did",
        "flow", "", "result"
    );
    for (from, to, port, what) in flows {
        let before: Vec<_> = (0..2)
            .map(|n| labkit::counters(&lab, &bins, n))
            .collect::<Result<_, _>>()?;
        let outcome = labkit::probe(&lab, &bins, from, &labkit::addr(&lab, to, port)?)?;
        let after: Vec<_> = (0..2)
            .map(|n| labkit::counters(&lab, &bins, n))
            .collect::<Result<_, _>>()?;
        println!(
            "  {:<26} {:<40} {:<8} {}",
            format!("{from} -> {to}:{port}"),
            what,
            outcome.to_string(),
            describe(&before, &after)
        );
    }

    // Many connections through the mesh.
    let mut cmd = std::process::Command::new(&bins.app);
    cmd.args([
        "client",
        "--connect",
        &labkit::addr(&lab, "db", 5432)?,
        "--conns",
        "200",
        "--concurrency",
        "16",
        "--bytes",
        "16384",
    ]);
    let report = mesh_lab::app::ClientReport::from_output(&lab.run_in_pod("frontend", cmd)?)?;
    println!(
        "\n  frontend -> db: {} connections x 16 KiB echoed byte-exact through both agents ({} failed) in {} ms",
        report.ok, report.failed, report.elapsed_ms
    );

    // Fail closed.
    println!("\n  stopping the agent on node 0 ...");
    let stopped = agents.remove(0);
    stopped.terminate()?;
    let earlier_log = stopped.log_contents()?;
    let down = labkit::probe(&lab, &bins, "frontend", &labkit::addr(&lab, "db", 5432)?)?;
    let down_in = labkit::probe(&lab, &bins, "legacy", &labkit::addr(&lab, "backend", 8080)?)?;
    println!(
        "  with no agent: frontend -> db: {down}; legacy -> backend: {down_in}   (fails closed: no plaintext bypass)"
    );
    agents.insert(0, labkit::start_agent(&lab, &bins, 0)?);
    let up = labkit::probe(&lab, &bins, "frontend", &labkit::addr(&lab, "db", 5432)?)?;
    println!("  agent restarted (re-adopted its pinned programs): frontend -> db: {up}");

    std::thread::sleep(Duration::from_millis(300));
    println!("\n  access log of node 0's agent (one line per connection, last 6):");
    // The first agent's lines (before the restart), then the second's.
    let log = earlier_log + &agents[0].log_contents()?;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed") && !l.contains("bytes_sent=16384"))
        .collect();
    for l in lines.iter().rev().take(6).rev() {
        println!(
            "    {}",
            l.split_once(" INFO ").map_or(*l, |(_, rest)| rest)
        );
    }
    println!("\n  kernel counters:");
    for n in 0..2 {
        let c = labkit::counters(&lab, &bins, n)?;
        let shown: Vec<String> = c
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("    node {n}: {}", shown.join(" "));
    }
    drop(agents);
    lab.close()?;
    println!("\n== lab removed (namespaces, cgroups, pinned programs)\n");
    crate::canary::run(&bins)?;
    crate::demo_l7::run(&bins)
}

fn describe(before: &[BTreeMap<String, u64>], after: &[BTreeMap<String, u64>]) -> String {
    let mut parts = Vec::new();
    for (n, (b, a)) in before.iter().zip(after).enumerate() {
        for name in COUNTERS_SHOWN {
            let d = a.get(name).copied().unwrap_or(0) - b.get(name).copied().unwrap_or(0);
            if d > 0 {
                parts.push(format!("n{n}:{name}+{d}"));
            }
        }
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(" ")
    }
}
