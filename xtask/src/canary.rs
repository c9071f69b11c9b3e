//! The canary part of `cargo xtask demo` (issue 11): a service `web` with
//! pods of versions v1 and v2, an Istio DestinationRule (subsets by the
//! `version` label) and a VirtualService whose `tcp:` weights go 90/10,
//! then 50/50, then 0/100 — applied by the node proxy, no waypoint — with
//! what each version received read from the agent's metrics.
#![forbid(unsafe_code)]

use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};
use mesh_lab::{Lab, LabSpec, NodeSpec, PodSpec, app::ClientReport};
use serde_json::json;

use crate::labkit::{self, Bins};

const VIP: &str = "198.18.200.1:80";
const CONNS: u64 = 200;

/// Runs the canary demo with `bins`.
pub fn run(bins: &Bins) -> anyhow::Result<()> {
    println!("\n== canary: weighted TCP routing in the node proxy (no waypoint)\n");
    let lab = Lab::new(
        LabSpec::new()
            .node(NodeSpec::new().pod(PodSpec::new("shop")))
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("web-v1"))
                    .pod(PodSpec::new("web-v2")),
            ),
    )?;
    let web = [("web-v1", true), ("web-v2", true)];
    write_node0(&lab, 90, 10)?;
    labkit::write_workloads(&lab, 1, &web, &[("shop", true)])?;
    let _apps = [
        labkit::echo(&lab, bins, "web-v1", 8080)?,
        labkit::echo(&lab, bins, "web-v2", 8080)?,
    ];
    let _agents = [
        labkit::start_agent(&lab, bins, 0)?,
        labkit::start_agent(&lab, bins, 1)?,
    ];
    println!("  service web ({VIP}) over web-v1 (version: v1) and web-v2 (version: v2);");
    println!(
        "  DestinationRule web: subsets v1, v2; VirtualService web: tcp route weights below\n"
    );
    println!(
        "  {:<10} {:>14} {:>14}",
        "weights", "v1 received", "v2 received"
    );
    for (w1, w2) in [(90, 10), (50, 50), (0, 100)] {
        write_node0(&lab, w1, w2)?;
        wait_weights(&lab, bins, w1, w2)?;
        let before = received(&lab, bins)?;
        let mut cmd = Command::new(&bins.app);
        cmd.args([
            "client",
            "--connect",
            VIP,
            "--conns",
            &CONNS.to_string(),
            "--concurrency",
            "8",
        ]);
        let report = ClientReport::from_output(&lab.run_in_pod("shop", cmd)?)?;
        if report.failed > 0 {
            bail!("{} of {CONNS} connections failed", report.failed);
        }
        let after = wait_received(&lab, bins, before.0 + before.1 + CONNS)?;
        println!(
            "  {:<10} {:>14} {:>14}",
            format!("{w1}/{w2}"),
            after.0 - before.0,
            after.1 - before.1
        );
    }
    println!(
        "\n  (counted by the client's agent: istio_tcp_connections_opened_total by destination_version)"
    );
    let mut cmd = Command::new(&bins.agent);
    cmd.arg("routes");
    let out = lab.run_in_node(0, cmd)?;
    println!("\n  mesh-agent routes (node 0):");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    lab.close()?;
    println!("\n== canary lab removed\n");
    Ok(())
}

/// Node 0's workload file: the client pod, the two versions (remote, with
/// their labels), the service, and the routing objects as `kubectl get -o
/// yaml` would print them (here as one-line JSON, which is YAML).
fn write_node0(lab: &Lab, w1: u32, w2: u32) -> anyhow::Result<()> {
    let mut text = lab.workload_file_yaml_with_remote(
        0,
        &[("shop", true)],
        &[("web-v1", true), ("web-v2", true)],
    );
    for v in ["v1", "v2"] {
        text = text.replace(
            &format!("  - name: web-{v}\n"),
            &format!("  - name: web-{v}\n    labels: {{app: web, version: {v}}}\n"),
        );
    }
    text.push_str("services:\n  - name: web\n    namespace: default\n    vips: [\"198.18.200.1\"]\n    ports: [{name: tcp, port: 80, targetPort: 8080}]\n    endpoints: [web-v1, web-v2]\n");
    let dr = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"host": "web", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}}]}});
    let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"hosts": ["web"], "tcp": [{"route": [
            {"destination": {"host": "web", "subset": "v1"}, "weight": w1},
            {"destination": {"host": "web", "subset": "v2"}, "weight": w2}]}]}});
    text.push_str(&format!("resources:\n  - {dr}\n  - {vs}\n"));
    labkit::write_workload_text(lab, 0, &text)?;
    Ok(())
}

/// Waits until node 0's agent routes with weights `w1`/`w2` (`mesh-agent routes --json`).
fn wait_weights(lab: &Lab, bins: &Bins, w1: u32, w2: u32) -> anyhow::Result<()> {
    labkit::wait_routes(
        lab,
        bins,
        0,
        &format!("apply weights {w1}/{w2}"),
        |routes| {
            let rule = &routes["services"][0]["routes"][0]["rules"][0];
            rule[0]["weight"] == w1 && rule[1]["weight"] == w2
        },
    )
}

/// Connections node 0's agent opened to v1 and to v2 so far, from its metrics.
fn received(lab: &Lab, bins: &Bins) -> anyhow::Result<(u64, u64)> {
    let mut cmd = Command::new(&bins.app);
    cmd.args(["get", "--connect", "127.0.0.1:15020", "--path", "/metrics"]);
    let out = lab.run_in_node(0, cmd).context("read node 0's metrics")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |version: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("reporter=\"source\"")
                    && l.contains(&format!("destination_version=\"{version}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    Ok((count("v1"), count("v2")))
}

/// Waits until node 0's agent has opened `total` connections to v1 and v2.
fn wait_received(lab: &Lab, bins: &Bins, total: u64) -> anyhow::Result<(u64, u64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = received(lab, bins)?;
        if r.0 + r.1 >= total {
            return Ok(r);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "node 0's agent counted {} of {total} connections",
                r.0 + r.1
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
