//! What the demo and the benchmarks share: agents and apps in a lab.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_lab::{Lab, LabChild, app::ProbeOutcome};

/// Binaries the lab runs.
pub struct Bins {
    /// `mesh-agent`.
    pub agent: PathBuf,
    /// `mesh-lab-app`.
    pub app: PathBuf,
}

impl Bins {
    /// The binaries in `dir` (a cargo profile directory).
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let bins = Self {
            agent: dir.join("mesh-agent"),
            app: dir.join("mesh-lab-app"),
        };
        for b in [&bins.agent, &bins.app] {
            if !b.is_file() {
                bail!("{} is missing: build the workspace first", b.display());
            }
        }
        Ok(bins)
    }
}

/// Writes node `node`'s workload file listing its `pods` and the `remote`
/// pods of other nodes (to tunnel to them); returns its path.
pub fn write_workloads(
    lab: &Lab,
    node: usize,
    pods: &[(&str, bool)],
    remote: &[(&str, bool)],
) -> anyhow::Result<PathBuf> {
    write_workload_text(
        lab,
        node,
        &lab.workload_file_yaml_with_remote(node, pods, remote),
    )
}

/// Writes node `node`'s workload file verbatim (atomically, by rename);
/// returns its path.
pub fn write_workload_text(lab: &Lab, node: usize, text: &str) -> anyhow::Result<PathBuf> {
    let path = lab.scratch_path(&format!("workloads-n{node}.yaml"));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// New connections per second from `from` to `to` (`CONNS` connections,
/// 16 at a time, 64 B echoed each); fails if any connection failed.
pub fn new_conns_per_s(
    lab: &Lab,
    bins: &Bins,
    from: &str,
    to: &str,
    conns: &str,
) -> anyhow::Result<f64> {
    let mut client = Command::new(&bins.app);
    client.args([
        "client",
        "--connect",
        to,
        "--conns",
        conns,
        "--concurrency",
        "16",
        "--bytes",
        "64",
    ]);
    let report = mesh_lab::app::ClientReport::from_output(&lab.run_in_pod_timeout(
        from,
        client,
        Duration::from_secs(60),
    )?)?;
    if report.failed > 0 {
        anyhow::bail!(
            "{to}: {} of {conns} connections failed: {:?}",
            report.failed,
            report.errors
        );
    }
    Ok(report.ok as f64 / (report.elapsed_ms.max(1) as f64 / 1000.0))
}

/// The element of `values` whose `key` is the median (the upper middle
/// one of an even count); `None` for none. The benches report the median
/// of their rounds with it.
pub fn median_by<T>(mut values: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    values.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = values.len() / 2;
    (!values.is_empty()).then(|| values.swap_remove(middle))
}

/// Polls node `node`'s `mesh-agent routes --json` until `done` holds (20 s at most).
pub fn wait_routes(
    lab: &Lab,
    bins: &Bins,
    node: usize,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut cmd = Command::new(&bins.agent);
        cmd.args(["routes", "--json"]);
        let out = lab.run_in_node(node, cmd)?;
        let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if done(&routes) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("node {node}'s agent did not {what}: {routes}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lab's mesh CA directory, made with `mesh-agent ca init` on first use.
pub fn ca_dir(lab: &Lab, bins: &Bins) -> anyhow::Result<PathBuf> {
    let dir = lab.scratch_path("ca");
    if !dir.join("ca.crt").exists() {
        let out = Command::new(&bins.agent)
            .args(["ca", "init", "--out"])
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "mesh-agent ca init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(dir)
}

/// Starts node `node`'s agent on its workload file and waits until it is ready.
pub fn start_agent(lab: &Lab, bins: &Bins, node: usize) -> anyhow::Result<LabChild> {
    start_agent_with(lab, bins, node, &[])
}

/// Starts another agent on node `node` with `extra` arguments (e.g. other
/// admin ports, for a second agent next to a running one during an upgrade)
/// and waits until it is ready.
pub fn start_agent_with(
    lab: &Lab,
    bins: &Bins,
    node: usize,
    extra: &[String],
) -> anyhow::Result<LabChild> {
    let ca = ca_dir(lab, bins)?;
    let n = lab.node(node)?;
    let mut cmd = Command::new(&bins.agent);
    cmd.arg("run")
        .arg("--workloads")
        .arg(lab.scratch_path(&format!("workloads-n{node}.yaml")))
        .arg("--pin-dir")
        .arg(n.pin_dir())
        .arg("--cgroup")
        .arg(n.cgroup_dir())
        .arg("--ca-dir")
        .arg(&ca)
        .args(["--reload-interval-ms", "200"])
        .args(extra);
    let agent = lab.spawn_in_node(node, cmd)?;
    agent
        .wait_for_log("agent ready", Duration::from_secs(20))
        .with_context(|| format!("agent on node {node} did not start"))?;
    Ok(agent)
}

/// The kernel counters of node `node`'s agent.
pub fn counters(lab: &Lab, bins: &Bins, node: usize) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = Command::new(&bins.agent)
        .args(["stats", "--json", "--pin-dir"])
        .arg(lab.node(node)?.pin_dir())
        .output()?;
    if !out.status.success() {
        bail!("mesh-agent stats: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Starts an echo server in `pod` on `[::]:port`.
pub fn echo(lab: &Lab, bins: &Bins, pod: &str, port: u16) -> anyhow::Result<LabChild> {
    let mut cmd = Command::new(&bins.app);
    cmd.args(["echo", "--listen", &format!("[::]:{port}")]);
    let child = lab.spawn_in_pod(pod, cmd)?;
    child.wait_for_log("listening", Duration::from_secs(10))?;
    Ok(child)
}

/// A plain TCP relay (`mesh-lab-app forward`) in `pod`: each of `ports` of
/// the pod's IPv4 address to the same port of `to`. Returns once it listens
/// on all of them.
pub fn forward(
    lab: &Lab,
    bins: &Bins,
    pod: &str,
    ports: &[u16],
    to: std::net::Ipv4Addr,
) -> anyhow::Result<LabChild> {
    let ip = lab.pod(pod)?.ipv4();
    let mut cmd = Command::new(&bins.app);
    cmd.arg("forward");
    for port in ports {
        cmd.arg("--listen").arg(format!("{ip}:{port}"));
    }
    cmd.arg("--to").arg(to.to_string());
    let child = lab.spawn_in_pod(pod, cmd)?;
    if let Some(last) = ports.last() {
        child.wait_for_log(&format!("listening {ip}:{last}"), Duration::from_secs(10))?;
    }
    Ok(child)
}

/// One probe connection from `from` to `to`.
pub fn probe(lab: &Lab, bins: &Bins, from: &str, to: &str) -> anyhow::Result<ProbeOutcome> {
    let mut cmd = Command::new(&bins.app);
    cmd.args(["probe", "--connect", to]);
    ProbeOutcome::from_output(&lab.run_in_pod(from, cmd)?)
}

/// `ip:port` of `pod`'s IPv4 address.
pub fn addr(lab: &Lab, pod: &str, port: u16) -> anyhow::Result<String> {
    Ok(format!("{}:{port}", lab.pod(pod)?.ipv4()))
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::median_by;

    #[test]
    fn the_median_is_the_middle_element_by_key() {
        assert_eq!(median_by(vec![3.0, 1.0, 2.0], |v| *v), Some(2.0));
        // An even count: the upper middle one.
        assert_eq!(median_by(vec![4.0, 1.0, 3.0, 2.0], |v| *v), Some(3.0));
        assert_eq!(median_by(Vec::<f64>::new(), |v| *v), None);
        // The element itself, picked by its key.
        let runs = vec![("a", 9.0), ("b", 7.0), ("c", 8.0)];
        assert_eq!(median_by(runs, |r| r.1), Some(("c", 8.0)));
    }
}
