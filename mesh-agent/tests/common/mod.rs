//! The harness of the lab tests: a lab (network namespaces, veths, cgroups,
//! made and removed by `mesh-lab`) with a real `mesh-agent` per node, real
//! eBPF, and `mesh-lab-app` processes as the pods' apps.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod rogue;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use mesh_agent::cli::client::{self, ClientError};

use mesh_lab::{
    Lab, LabChild, LabSpec,
    app::{ClientReport, FlowReport, ProbeOutcome},
    lab_app_path,
};

/// How long to wait for the agent to become ready or to apply a change.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the waits below ask the agent's endpoints.
const POLL: Duration = Duration::from_millis(50);

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
    /// Where each node's agent serves its endpoints (from its flags).
    endpoints: Vec<Endpoints>,
    /// Children the test started (apps), stopped before the lab goes.
    pub apps: Vec<LabChild>,
}

impl Mesh {
    /// A lab from `spec`; nothing runs yet.
    pub fn new(spec: LabSpec) -> Self {
        require_root();
        let lab = Lab::new(spec).expect("lab");
        let agents = (0..lab.nodes().len()).map(|_| None).collect();
        let endpoints = (0..lab.nodes().len())
            .map(|_| Endpoints::from_flags(&[]))
            .collect();
        Self {
            lab,
            agents,
            endpoints,
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

    /// Writes node `node`'s workload file verbatim (like
    /// [`Mesh::write_workload_text`]) and waits until the running agent has
    /// published it (the file source bumps the generation on each accepted
    /// write) and enrolled by it.
    pub fn write_workload_text_applied(&self, node: usize, text: &str) {
        let before = self.published_generation(node);
        self.write_workload_text(node, text);
        self.wait_dump(node, &format!("a generation after {before}"), |dump| {
            let published = generation(dump, "node");
            published > before && generation(dump, "enrollment") >= published
        });
    }

    /// Writes node `node`'s workload file listing `pods` and waits until the
    /// running agent applied it (see [`Mesh::write_workload_text_applied`]).
    pub fn write_workloads_applied(&self, node: usize, pods: &[(&str, bool)]) {
        self.write_workload_text_applied(node, &self.lab.workload_file_yaml(node, pods));
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
        let mut agent = self.lab.spawn_in_node(node, cmd).expect("spawn agent");
        self.sync_agent_log(node, &mut agent, extra);
        self.endpoints[node] = Endpoints::from_flags(extra);
        self.agents[node] = Some(agent);
        self.wait_ready(node);
    }

    /// Waits until node `node`'s agent answers 200 on `/healthz/ready` (its
    /// first enrollment pass is done); panics with its log if it does not
    /// within [`AGENT_TIMEOUT`] or exits first.
    pub fn wait_ready(&self, node: usize) {
        self.wait_agent_ready(node, self.agent(node), self.endpoints[node].readiness);
    }

    /// Makes every read of `agent`'s log (an agent in node `node`, started
    /// with `flags`) first ask it to write out the access-log lines its
    /// proxy threads gather (`POST /logging/flush` on its admin endpoint):
    /// a test that saw a connection counted as closed then finds its line.
    pub fn sync_agent_log(&self, node: usize, agent: &mut LabChild, flags: &[&str]) {
        let netns = self.lab.node(node).expect("node").netns_path();
        let admin = Endpoints::from_flags(flags).admin;
        agent.set_log_sync(Box::new(move || {
            // An agent that has exited holds nothing back.
            let _ = try_in_netns(&netns, || client::request(admin, "POST", "/logging/flush"));
        }));
    }

    /// Waits until `agent`, an agent the test started itself in node `node`
    /// with `flags`, answers 200 on `/healthz/ready` (see [`Mesh::wait_ready`]).
    pub fn wait_started_agent_ready(&self, node: usize, agent: &LabChild, flags: &[&str]) {
        self.wait_agent_ready(node, agent, Endpoints::from_flags(flags).readiness);
    }

    fn wait_agent_ready(&self, node: usize, agent: &LabChild, addr: SocketAddr) {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let answer = self.get_in_node(node, addr, "/healthz/ready");
            if matches!(answer, Ok((200, _))) {
                return;
            }
            let exited = agent.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "agent on node {node} did not become ready (exit: {exited:?}, \
                     last answer on {addr}: {answer:?}):\n{}",
                    agent.log_contents().unwrap_or_default()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `GET path` on `addr` from a thread inside node `node`'s netns.
    pub fn get_in_node(
        &self,
        node: usize,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), ClientError> {
        let netns = self.lab.node(node).expect("node").netns_path();
        in_netns(&netns, || client::get(addr, path))
    }

    /// `GET path` on node `node`'s agent's admin endpoint, as JSON (must answer 200).
    pub fn admin_json(&self, node: usize, path: &str) -> serde_json::Value {
        let addr = self.endpoints[node].admin;
        let (status, body) = self
            .get_in_node(node, addr, path)
            .unwrap_or_else(|e| panic!("GET {path} on {addr} in node {node}: {e}"));
        assert_eq!(status, 200, "GET {path} on {addr} in node {node}: {body}");
        serde_json::from_str(&body).expect("admin endpoint JSON")
    }

    /// Node `node`'s agent's `/config_dump`.
    pub fn config_dump(&self, node: usize) -> serde_json::Value {
        self.admin_json(node, "/config_dump")
    }

    /// The snapshot generation node `node`'s agent has published (its config dump's `node.generation`).
    pub fn published_generation(&self, node: usize) -> u64 {
        generation(&self.config_dump(node), "node")
    }

    /// The snapshot generation node `node`'s agent last enrolled by (its
    /// config dump's `enrollment.generation`).
    pub fn applied_generation(&self, node: usize) -> u64 {
        generation(&self.config_dump(node), "enrollment")
    }

    /// Waits until node `node`'s agent has enrolled by snapshot `generation` or a later one.
    pub fn wait_applied(&self, node: usize, generation_at_least: u64) {
        self.wait_dump(
            node,
            &format!("enrollment by generation {generation_at_least}"),
            |dump| generation(dump, "enrollment") >= generation_at_least,
        );
    }

    /// Polls node `node`'s config dump until `done` holds; panics, naming
    /// `what` and showing the dump and the agent's log, after [`AGENT_TIMEOUT`].
    pub fn wait_dump(
        &self,
        node: usize,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_dump_within(node, what, AGENT_TIMEOUT, done)
    }

    /// [`Mesh::wait_dump`] with its own deadline, for waits on the agent's
    /// own timers (certificate rotation) that can take longer than
    /// [`AGENT_TIMEOUT`] by design.
    pub fn wait_dump_within(
        &self,
        node: usize,
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let dump = self.config_dump(node);
            if done(&dump) {
                return dump;
            }
            if Instant::now() >= deadline {
                panic!(
                    "node {node}'s agent: no {what} in its config dump:\n{dump:#}\nlog:\n{}",
                    self.agent(node).log_contents().unwrap_or_default()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until node `node`'s agent holds no inbound HBONE handshake
    /// (its config dump's `limits.in_use.handshakes` is 0): a rejected
    /// handshake is logged before its slot is given back.
    pub fn wait_handshakes_done(&self, node: usize) {
        self.wait_dump(node, "handshakes in use = 0", |dump| {
            dump["limits"]["in_use"]["handshakes"].as_u64() == Some(0)
        });
    }

    /// Waits until node `node`'s agent's last enrollment pass left exactly
    /// `count` pods enrolled (its config dump's `enrollment.enrolled`).
    pub fn wait_enrolled(&self, node: usize, count: u64) {
        self.wait_dump(node, &format!("{count} pods enrolled"), |dump| {
            dump["enrollment"]["enrolled"].as_u64() == Some(count)
        });
    }

    /// Waits until `agent` (an agent taken out of the harness and told to
    /// stop) holds no listening socket in any of `pods`' network namespaces:
    /// new connections then reach its successor only.
    pub fn wait_listeners_closed(&self, agent: &LabChild, pods: &[&str]) {
        let owner = format!("pid={},", agent.pid());
        let deadline = Instant::now() + AGENT_TIMEOUT;
        for pod in pods {
            loop {
                let mut cmd = Command::new("ss");
                cmd.args(["-Hltnp"]);
                let out = self.lab.run_in_pod(pod, cmd).expect("ss");
                assert!(
                    out.status.success(),
                    "ss: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let sockets = String::from_utf8_lossy(&out.stdout).into_owned();
                if !sockets.contains(&owner) {
                    break;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "{} still listens in {pod}:\n{sockets}\n{}",
                        agent.label(),
                        agent.log_tail(30)
                    );
                }
                std::thread::sleep(POLL);
            }
        }
    }

    /// The status (`enrolled`, `failed`, `pending`, `not enrolled`) of each
    /// workload node `node`'s agent knows, by name.
    pub fn workload_status(&self, node: usize) -> BTreeMap<String, String> {
        statuses(&self.config_dump(node))
    }

    /// Waits until node `node`'s agent reports `pods` (name, status) in its config dump.
    pub fn wait_workload_status(&self, node: usize, pods: &[(&str, &str)]) {
        self.wait_dump(node, &format!("workloads {pods:?}"), |dump| {
            let now = statuses(dump);
            pods.iter()
                .all(|(name, status)| now.get(*name).map(String::as_str) == Some(*status))
        });
    }

    /// Node `node`'s agent's `/metrics` text.
    pub fn metrics_text(&self, node: usize) -> String {
        let addr = self.endpoints[node].metrics;
        let (status, text) = self
            .get_in_node(node, addr, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics on {addr} in node {node}: {e}"));
        assert_eq!(status, 200, "/metrics: {text}");
        text
    }

    /// The proxy counters of node `node`'s agent (`/stats` on its admin
    /// endpoint, `proxy`).
    pub fn proxy_stats(&self, node: usize) -> serde_json::Value {
        self.admin_json(node, "/stats")["proxy"].clone()
    }

    /// The sum of `family`'s series on node `node` whose labels include
    /// every one of `labels`.
    pub fn metric(&self, node: usize, family: &str, labels: &[&str]) -> u64 {
        self.metrics_text(node)
            .lines()
            .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Istio's `istio_tcp_connections_closed_total` on node `node`'s agent,
    /// summed over its series.
    pub fn closed_connections(&self, node: usize) -> u64 {
        let addr = self.endpoints[node].metrics;
        let (status, text) = self
            .get_in_node(node, addr, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics on {addr} in node {node}: {e}"));
        assert_eq!(status, 200, "/metrics: {text}");
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until node `node`'s agent has closed at least `count` connections
    /// in all and has none open: each closed connection is counted, then
    /// access-logged, then unlisted, so its access-log line is then written.
    pub fn wait_closed(&self, node: usize, count: u64) {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let closed = self.closed_connections(node);
            let open = self.admin_json(node, "/connections");
            let open = open.as_array().map_or(0, Vec::len);
            if closed >= count && open == 0 {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "node {node}'s agent closed {closed} connections (wanted {count}), {open} open:\n{}",
                    self.agent(node).log_contents().unwrap_or_default()
                );
            }
            std::thread::sleep(POLL);
        }
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

    /// Waits until node `node`'s agent has refused at least `count`
    /// workload files (its config dump's `sources.rejected`): a refused file
    /// changes no state, so this is the endpoint that shows it. The refusal
    /// is logged before it is counted.
    pub fn wait_rejected(&self, node: usize, count: u64) {
        self.wait_dump(node, &format!("{count} refused workload file(s)"), |dump| {
            dump["sources"]["rejected"].as_u64().unwrap_or(0) >= count
        });
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
        self.echo_with(pod, ports, &[]);
    }

    /// An echo server in `pod` with extra `mesh-lab-app echo` arguments
    /// (for example `--greeting-peer`).
    pub fn echo_with(&mut self, pod: &str, ports: &[u16], extra: &[&str]) {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.arg("echo").args(extra);
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

    /// One bulk connection from `from` to `to`'s echo server: sends `bytes`
    /// (and `extra` client arguments) within `timeout_ms`, and asserts that
    /// it succeeded and every byte came back.
    pub fn bulk_exact(
        &self,
        from: &str,
        to: &str,
        bytes: u64,
        timeout_ms: u64,
        extra: &[&str],
    ) -> ClientReport {
        let (bytes_arg, timeout_arg) = (bytes.to_string(), timeout_ms.to_string());
        let mut args = vec!["--bytes", &bytes_arg, "--timeout-ms", &timeout_arg];
        args.extend_from_slice(extra);
        let report = self.client(from, to, &args);
        assert_eq!(
            (report.ok, report.failed),
            (1, 0),
            "{from} to {to}: {report:?}"
        );
        assert_eq!(report.bytes_received, bytes, "{from} to {to}");
        report
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

    /// Starts `mesh-lab-app flow args…` in `pod` (a long-lived stream that
    /// reports how it ended; see [`flow_report`]). With `--listen` it
    /// returns once the app listens.
    pub fn flow(&self, pod: &str, args: &[&str]) -> LabChild {
        let mut cmd = Command::new(lab_app_path().expect("mesh-lab-app"));
        cmd.arg("flow").args(args);
        let child = self.lab.spawn_in_pod(pod, cmd).expect("spawn flow");
        if args.contains(&"--listen") {
            child
                .wait_for_log("listening", Duration::from_secs(10))
                .expect("flow app listening");
        }
        child
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

/// Where an agent serves its endpoints, as its `run` flags set them.
#[derive(Clone, Copy, Debug)]
struct Endpoints {
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

impl Endpoints {
    /// The addresses to query from the node's netns for an agent run with
    /// `flags` (the defaults unless set; an unspecified address is asked on loopback).
    fn from_flags(flags: &[&str]) -> Self {
        let flag = |name: &str| {
            flags
                .windows(2)
                .find(|w| w[0] == name)
                .map(|w| w[1].parse::<SocketAddr>().expect("address flag"))
        };
        let local = |mut a: SocketAddr| {
            if a.ip().is_unspecified() {
                a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            a
        };
        let metrics_default = match flag_value(flags, "--pod-ip") {
            Some(ip) if !flags.contains(&"--metrics-loopback") => {
                SocketAddr::new(ip.parse().expect("--pod-ip"), 15020)
            }
            _ => "127.0.0.1:15020".parse().expect("addr"),
        };
        Self {
            admin: local(flag("--admin-addr").unwrap_or(([127, 0, 0, 1], 15000).into())),
            metrics: local(flag("--metrics-addr").unwrap_or(metrics_default)),
            readiness: local(flag("--readiness-addr").unwrap_or(([0, 0, 0, 0], 15021).into())),
        }
    }
}

fn flag_value<'a>(flags: &[&'a str], name: &str) -> Option<&'a str> {
    flags.windows(2).find(|w| w[0] == name).map(|w| w[1])
}

/// The `generation` of the config dump's part `part` (`node`: published;
/// `enrollment`: the one the agent last enrolled by).
fn generation(dump: &serde_json::Value, part: &str) -> u64 {
    dump[part]["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {part}.generation in the config dump: {dump:#}"))
}

fn statuses(dump: &serde_json::Value) -> BTreeMap<String, String> {
    dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let s = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
            (s("name"), s("status"))
        })
        .collect()
}

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    run_in_netns(netns, f).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `f` on a thread inside the network namespace at `netns`; `None` if
/// that namespace cannot be entered (gone with its lab), without panicking.
pub fn try_in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Option<T> {
    run_in_netns(netns, f).ok()
}

/// [`in_netns`] and [`try_in_netns`]: what failed, if `f` did not run.
fn run_in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let ns = File::open(netns).map_err(|e| format!("open netns {}: {e}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a valid netns fd; only this scoped thread moves.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| "the thread in the netns panicked".to_owned())?
    })
}

/// Binds `127.0.0.1:0` inside the netns at `netns` (a lab node's, where the
/// agent runs: the fake API server listens there).
pub fn listener_in_netns(netns: &Path) -> std::net::TcpListener {
    in_netns(netns, || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind in the node netns")
    })
}

/// Waits (up to `within`) until `child` (a `mesh-lab-app` run) exits and
/// parses the last JSON line it printed: its report.
pub fn final_report<T: serde::de::DeserializeOwned>(child: &LabChild, within: Duration) -> T {
    child
        .wait_timeout(within)
        .expect("wait")
        .unwrap_or_else(|| panic!("{} did not end within {within:?}", child.label()));
    let log = child.log_contents().expect("output");
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report from {}: {log}", child.label()));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("report {line}: {e}"))
}

/// The report of a [`Mesh::flow`] app, once it has ended (within 30 s).
pub fn flow_report(child: &LabChild) -> FlowReport {
    final_report(child, Duration::from_secs(30))
}

/// `after - before` for each counter named.
pub fn delta(before: &Counters, after: &Counters, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}
