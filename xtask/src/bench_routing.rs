//! The routing row of `cargo xtask bench` (issue 11): the new-connection
//! rate to a plain service (round robin over two endpoints) and to the same
//! endpoints behind a DestinationRule (two subsets) and a VirtualService
//! splitting 50/50, measured alternately in one lab so that both see the
//! same machine. The route decision is per connection; this shows what it
//! costs end to end (the micro-benchmark shows the decision alone).
#![forbid(unsafe_code)]

use mesh_lab::{Lab, LabSpec, NodeSpec, PodSpec};
use serde::Serialize;
use serde_json::json;

use crate::labkit::{self, Bins};

const PLAIN: &str = "198.18.201.1:80";
const SPLIT: &str = "198.18.201.2:80";
const CONNS: &str = "2000";
const ROUNDS: usize = 3;

/// Connections per second to each service (the median of the rounds).
#[derive(Debug, Serialize)]
pub struct RoutingRow {
    /// To the plain service.
    pub plain_per_s: f64,
    /// To the 50/50 split service.
    pub split_per_s: f64,
    /// Every round's rates, plain then split.
    pub rounds: Vec<(f64, f64)>,
}

/// Runs the measurement with `bins`.
pub fn measure(bins: &Bins) -> anyhow::Result<RoutingRow> {
    eprintln!("==> mesh, cross node, plain service vs 50/50 split service");
    let lab = Lab::new(
        LabSpec::new()
            .node(NodeSpec::new().pod(PodSpec::new("client")))
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("b1"))
                    .pod(PodSpec::new("b2")),
            ),
    )?;
    write_node0(&lab)?;
    labkit::write_workloads(&lab, 1, &[("b1", true), ("b2", true)], &[("client", true)])?;
    let _apps = [
        labkit::echo(&lab, bins, "b1", 8080)?,
        labkit::echo(&lab, bins, "b2", 8080)?,
    ];
    let _agents = [
        labkit::start_agent(&lab, bins, 0)?,
        labkit::start_agent(&lab, bins, 1)?,
    ];
    wait_split(&lab, bins)?;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let plain = labkit::new_conns_per_s(&lab, bins, "client", PLAIN, CONNS)?;
        let split = labkit::new_conns_per_s(&lab, bins, "client", SPLIT, CONNS)?;
        rounds.push((plain, split));
    }
    lab.close()?;
    let median = |v: Vec<f64>| labkit::median_by(v, |r| *r).unwrap_or(0.0);
    Ok(RoutingRow {
        plain_per_s: median(rounds.iter().map(|r| r.0).collect()),
        split_per_s: median(rounds.iter().map(|r| r.1).collect()),
        rounds,
    })
}

/// Node 0's workload file: the client, the two backends (remote, labelled
/// v1 and v2), the two services over them, and the routing objects of the
/// split one.
fn write_node0(lab: &Lab) -> anyhow::Result<()> {
    let mut text =
        lab.workload_file_yaml_with_remote(0, &[("client", true)], &[("b1", true), ("b2", true)]);
    for (pod, v) in [("b1", "v1"), ("b2", "v2")] {
        text = text.replace(
            &format!("  - name: {pod}\n"),
            &format!("  - name: {pod}\n    labels: {{app: b, version: {v}}}\n"),
        );
    }
    text.push_str("services:\n");
    for (name, vip) in [("plain", PLAIN), ("split", SPLIT)] {
        let ip = vip.trim_end_matches(":80");
        text.push_str(&format!(
            "  - name: {name}\n    namespace: default\n    vips: [\"{ip}\"]\n    ports: [{{name: tcp, port: 80, targetPort: 8080}}]\n    endpoints: [b1, b2]\n"
        ));
    }
    let dr = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "split", "namespace": "default"},
        "spec": {"host": "split", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}}]}});
    let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "split", "namespace": "default"},
        "spec": {"hosts": ["split"], "tcp": [{"route": [
            {"destination": {"host": "split", "subset": "v1"}, "weight": 50},
            {"destination": {"host": "split", "subset": "v2"}, "weight": 50}]}]}});
    text.push_str(&format!("resources:\n  - {dr}\n  - {vs}\n"));
    labkit::write_workload_text(lab, 0, &text)?;
    Ok(())
}

/// Waits until node 0's agent routes the split service 50/50.
fn wait_split(lab: &Lab, bins: &Bins) -> anyhow::Result<()> {
    labkit::wait_routes(lab, bins, 0, "route the split service 50/50", |routes| {
        routes["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"].as_str().is_some_and(|n| n.ends_with("/split")))
            .is_some_and(|s| s["routes"][0]["rules"][0][1]["weight"] == 50)
    })
}
