//! The harness of the lab tests: a lab (network namespaces, veths, cgroups,
//! made and removed by `mesh-lab`) with a real `mesh-agent` per node, real
//! eBPF, and `mesh-lab-app` processes as the pods' apps.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod rogue;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use mesh_lab::{
    Lab, LabChild, LabSpec,
    app::{ClientReport, ProbeOutcome},
    lab_app_path,
};

/// How long to wait for the agent's start-up and reload log lines.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent binary under test (built by cargo for this test run).
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mesh-agent"))
}

/// Fails the test loudly unless running as root: lab tests must not skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "lab tests need root (network namespaces, cgroups, eBPF); run them as root"
    );
}

/// Kernel counters as `mesh-agent stats --json` prints them.
pub type Counters = BTreeMap<String, u64>;

/// A lab with an agent per node.
pub struct Mesh {
    /// The lab (dropped last: it removes everything).
    pub lab: Lab,
    agents: Vec<Option<LabChild>>,
    /// Children the test started (apps), stopped before the lab goes.
    pub apps: Vec<LabChild>,
}

impl Mesh {
    /// A lab from `spec`; nothing runs yet.
    pub fn new(spec: LabSpec) -> Self {
        require_root();
        let lab = Lab::new(spec).expect("lab");
        let agents = (0..lab.nodes().len()).map(|_| None).collect();
        Self {
            lab,
            agents,
            apps: Vec::new(),
        }
    }

    /// Path of node `node`'s workload file.
    pub fn workload_path(&self, node: usize) -> PathBuf {
        self.lab.scratch_path(&format!("workloads-n{node}.yaml"))
    }

    /// Writes node `node`'s workload file listing `pods` (name, enrolled).
    pub fn write_workloads(&self, node: usize, pods: &[(&str, bool)]) {
        self.write_workload_text(node, &self.lab.workload_file_yaml(node, pods));
    }

    /// Node `node`'s workload YAML: its own pods (`local`, with enrollment),
    /// and pods of other nodes it must know to tunnel to them (`remote`).
    pub fn workloads_yaml(
        &self,
        node: usize,
        local: &[(&str, bool)],
        remote: &[(&str, bool)],
    ) -> String {
        self.lab.workload_file_yaml_with_remote(node, local, remote)
    }

    /// Appends `policies:` (YAML list items, indented by two spaces) to a workload YAML.
    pub fn with_policies(text: &str, policies: &str) -> String {
        format!("{text}policies:\n{policies}")
    }

    /// Writes node `node`'s workload file verbatim (atomically, by rename).
    pub fn write_workload_text(&self, node: usize, text: &str) {
        let path = self.workload_path(node);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write workload file");
        std::fs::rename(&tmp, &path).expect("rename workload file");
    }

    /// Starts node `node`'s agent and waits until it reports ready.
    pub fn start_agent(&mut self, node: usize) {
        self.start_agent_with(node, &[]);
    }

    /// The lab's mesh CA directory (made on first use with `mesh-agent ca init`).
    pub fn ca_dir(&self) -> PathBuf {
        let dir = self.lab.scratch_path("ca");
        if !dir.join("ca.crt").exists() {
            let out = Command::new(agent_bin())
                .args(["ca", "init", "--out"])
                .arg(&dir)
                .output()
                .expect("ca init");
            assert!(
                out.status.success(),
                "mesh-agent ca init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir
    }

    /// Starts node `node`'s agent with extra arguments and waits until ready.
    pub fn start_agent_with(&mut self, node: usize, extra: &[&str]) {
        let ca_dir = self.ca_dir();
        let n = self.lab.node(node).expect("node");
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--workloads")
            .arg(self.workload_path(node))
            .arg("--pin-dir")
            .arg(n.pin_dir())
            .arg("--cgroup")
            .arg(n.cgroup_dir())
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--reload-interval-ms", "100"])
            .args(extra)
            .env("MESH_LOG", "info");
        let agent = self.lab.spawn_in_node(node, cmd).expect("spawn agent");
        if let Err(e) = agent.wait_for_log("agent ready", AGENT_TIMEOUT) {
            panic!(
                "agent on node {node} did not become ready: {e:#}\n{}",
                agent.log_contents().unwrap_or_default()
            );
        }
        self.agents[node] = Some(agent);
    }

    /// Stops node `node`'s agent (SIGTERM) and checks it exited cleanly.
    pub fn stop_agent(&mut self, node: usize) -> String {
        let agent = self.agents[node].take().expect("agent running");
        let status = agent.terminate().expect("terminate agent");
        let log = agent.log_contents().unwrap_or_default();
        assert!(status.success(), "agent exited with {status}:\n{log}");
        log
    }

    /// Takes node `node`'s agent out of the harness (to run a second one next to it).
    pub fn take_agent(&mut self, node: usize) -> LabChild {
        self.agents[node].take().expect("agent running")
    }

    /// Node `node`'s agent.
    pub fn agent(&self, node: usize) -> &LabChild {
        self.agents[node].as_ref().expect("agent running")
    }

    /// Waits for `needle` in node `node`'s agent log, after `skip` occurrences.
    pub fn wait_agent_log_count(&self, node: usize, needle: &str, count: usize) {
        let agent = self.agent(node);
        let deadline = std::time::Instant::now() + AGENT_TIMEOUT;
        loop {
            let log = agent.log_contents().unwrap_or_default();
            if log.matches(needle).count() >= count {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {count}x {needle:?} in agent log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of `needle` occurrences in node `node`'s agent log so far.
    pub fn agent_log_count(&self, node: usize, needle: &str) -> usize {
        self.agent(node)
            .log_contents()
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// The kernel counters of node `node`'s datapath (from the pinned map).
    pub fn counters(&self, node: usize) -> Counters {
        let n = self.lab.node(node).expect("node");
        let out = Command::new(agent_bin())
            .args(["stats", "--json", "--pin-dir"])
            .arg(n.pin_dir())
            .output()
            .expect("mesh-agent stats");
        assert!(
            out.status.success(),
            "mesh-agent stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    /// Starts an echo server in `pod` on `[::]:port` for each port (both families).
    pub fn echo(&mut self, pod: &str, ports: &[u16]) {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.arg("echo");
        for p in ports {
            cmd.args(["--listen", &format!("[::]:{p}")]);
        }
        let child = self.lab.spawn_in_pod(pod, cmd).expect("spawn echo");
        for _ in ports {
            child
                .wait_for_log("listening", Duration::from_secs(10))
                .expect("echo listening");
        }
        self.wait_listening(pod, ports.len(), &child);
        self.apps.push(child);
    }

    fn wait_listening(&self, _pod: &str, n: usize, child: &LabChild) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while child
            .log_contents()
            .unwrap_or_default()
            .matches("listening")
            .count()
            < n
        {
            assert!(
                std::time::Instant::now() < deadline,
                "echo server did not listen:\n{}",
                child.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `mesh-lab-app client` in `from` against `to` with extra arguments.
    pub fn client(&self, from: &str, to: &str, args: &[&str]) -> ClientReport {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.args(["client", "--connect", to]).args(args);
        let out = self.lab.run_in_pod(from, cmd).expect("run client");
        ClientReport::from_output(&out).expect("client report")
    }

    /// A `mesh-lab-app hold` command: one connection to `to`, a message
    /// every 100 ms for `duration_ms`, plus `extra` arguments.
    pub fn hold_command(&self, to: &str, duration_ms: u64, extra: &[&str]) -> Command {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.args([
            "hold",
            "--connect",
            to,
            "--interval-ms",
            "100",
            "--duration-ms",
            &duration_ms.to_string(),
        ])
        .args(extra);
        cmd
    }

    /// Runs `mesh-lab-app probe` in `from` against `to`.
    pub fn probe(&self, from: &str, to: &str, args: &[&str]) -> ProbeOutcome {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.args(["probe", "--connect", to]).args(args);
        let out: Output = self.lab.run_in_pod(from, cmd).expect("run probe");
        ProbeOutcome::from_output(&out).expect("probe outcome")
    }

    /// Runs `mesh-lab-app probe` in node `node`'s netns (a kubelet-like probe).
    pub fn probe_from_node(&self, node: usize, to: &str) -> ProbeOutcome {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.args(["probe", "--connect", to]);
        let out = self.lab.run_in_node(node, cmd).expect("run probe");
        ProbeOutcome::from_output(&out).expect("probe outcome")
    }

    /// `ip:port` of `pod`'s IPv4 address.
    pub fn v4(&self, pod: &str, port: u16) -> String {
        format!("{}:{port}", self.lab.pod(pod).expect("pod").ipv4())
    }

    /// `[ip]:port` of `pod`'s IPv6 address.
    pub fn v6(&self, pod: &str, port: u16) -> String {
        format!(
            "[{}]:{port}",
            self.lab
                .pod(pod)
                .expect("pod")
                .ipv6()
                .expect("pod has IPv6")
        )
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, a) in self.agents.iter().enumerate() {
                if let Some(a) = a {
                    eprintln!("--- agent n{i} log (last 60 lines):\n{}", a.log_tail(60));
                }
            }
        }
        self.apps.clear();
        for a in &mut self.agents {
            a.take();
        }
    }
}

/// `after - before` for each counter named.
pub fn delta(before: &Counters, after: &Counters, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}
