//! [`Lab`]: creating, using and removing one lab.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::child::{
    ChildShared, LabChild, LogMode, Pipes, Placement, TERMINATE_GRACE, spawn_placed,
};
use crate::registry::{self, KEPT_MARKER, SCRATCH_PREFIX};
use crate::spec::LabSpec;
use crate::sys::{self, BPFFS_DIR, NETNS_DIR};
use crate::topology::{NodeInfo, PodInfo, Topology, node_name};
use crate::workload::render_workload_yaml;

/// How long [`Lab::run_in_pod`] and [`Lab::exec_in_node`] wait before killing the command.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Set to `1` to keep each lab's scratch dir (logs) after cleanup.
pub const KEEP_ENV: &str = "MESH_LAB_KEEP";

/// Sysctls set in every lab netns: no duplicate address detection (addresses
/// usable at once, link-local included) and no reverse-path filter whatever the
/// host's defaults are.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.all.rp_filter", "0"),
];

/// Sysctls set in node netns only: nodes route between pods and nodes.
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
];

/// A running lab: nodes and pods as network namespaces, veths and cgroups.
/// Everything is removed when it is dropped (see the crate docs).
pub struct Lab {
    inner: Arc<LabInner>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.inner.id)
            .field("nodes", &self.inner.topo.nodes)
            .field("pods", &self.inner.topo.pods)
            .finish()
    }
}

/// The lab state shared with the signal handler's registry.
pub(crate) struct LabInner {
    pub(crate) id: String,
    topo: Topology,
    scratch: PathBuf,
    /// Tracked children; `closed` refuses new ones once cleanup started.
    children: Mutex<Children>,
    file_seq: AtomicU64,
    /// Held for the whole cleanup; `true` once a cleanup finished without errors.
    cleaned: Mutex<bool>,
}

impl registry::Live for LabInner {
    fn id(&self) -> &str {
        &self.id
    }

    fn cleanup(&self) -> Vec<String> {
        LabInner::cleanup(self)
    }
}

#[derive(Default)]
struct Children {
    closed: bool,
    list: Vec<Weak<ChildShared>>,
}

impl Lab {
    /// Creates a lab as `spec` describes. Needs root. Sweeps leftovers of dead
    /// processes first and, on the first call in a process, installs the
    /// SIGINT/SIGTERM cleanup thread. On error everything created so far is removed.
    pub fn new(spec: LabSpec) -> Result<Self> {
        require_root()?;
        spec.validate()?;
        registry::prepare();
        let cgroup2 = sys::cgroup2_root()?;
        let id = registry::next_id();
        let topo = Topology::plan(&id, &spec, &cgroup2);
        let inner = Arc::new(LabInner {
            scratch: std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{id}")),
            id,
            topo,
            children: Mutex::new(Children::default()),
            file_seq: AtomicU64::new(0),
            cleaned: Mutex::new(false),
        });
        registry::register(inner.clone());
        // From here on, dropping `lab` (also on error) removes what was made.
        let lab = Self { inner };
        lab.inner
            .build()
            .with_context(|| format!("creating lab {}", lab.inner.id))?;
        Ok(lab)
    }

    /// The lab id, `ml<pid>x<seq>`: the prefix of every name the lab creates.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// All nodes, in spec order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.inner.topo.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> Result<&NodeInfo> {
        self.inner
            .topo
            .nodes
            .get(i)
            .with_context(|| format!("lab {} has no node {i}", self.inner.id))
    }

    /// All pods of all nodes, node by node in spec order.
    pub fn pods(&self) -> &[PodInfo] {
        &self.inner.topo.pods
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Result<&PodInfo> {
        self.inner.pod(name)
    }

    /// The pods on node `i`, in spec order (empty for an unknown node).
    pub fn pods_on(&self, i: usize) -> Vec<&PodInfo> {
        self.inner
            .topo
            .pods
            .iter()
            .filter(|p| p.node == i)
            .collect()
    }

    /// The lab cgroup, `<cgroup2 mount>/<id>`: it covers every pod of every node.
    pub fn lab_cgroup_dir(&self) -> &Path {
        &self.inner.topo.lab_cgroup
    }

    /// The per-lab scratch dir for files and logs, under `std::env::temp_dir()`.
    /// Removed at cleanup unless `MESH_LAB_KEEP=1`.
    pub fn scratch_dir(&self) -> &Path {
        &self.inner.scratch
    }

    /// The netns holding the bridge that joins the nodes: `<id>-wire`.
    pub fn wire_netns(&self) -> &str {
        &self.inner.topo.wire_netns
    }

    /// The wire netns file, `/var/run/netns/<id>-wire`.
    pub fn wire_netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.inner.topo.wire_netns)
    }

    /// The bpffs pin dir for node `node`'s agent: `/sys/fs/bpf/<id>-n<node>`.
    /// The lab does not create it; cleanup removes it recursively.
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        Path::new(BPFFS_DIR).join(node_name(&self.inner.id, node))
    }

    /// A path for a new file in the scratch dir: `<scratch>/<name>`.
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.inner.scratch.join(name)
    }

    /// The agent's workload YAML for `node` (see [`render_workload_yaml`]),
    /// listing the named pods with their enrolment flag.
    ///
    /// # Panics
    ///
    /// If `node` or a pod name is not in the lab: that is a bug in the test.
    pub fn workload_file_yaml(&self, node: usize, pods: &[(&str, bool)]) -> String {
        let node_info = self
            .node(node)
            .unwrap_or_else(|e| panic!("workload_file_yaml: {e}"));
        let rows: Vec<(&PodInfo, bool)> = pods
            .iter()
            .map(|&(name, enrolled)| {
                let pod = self
                    .pod(name)
                    .unwrap_or_else(|e| panic!("workload_file_yaml: {e}"));
                (pod, enrolled)
            })
            .collect();
        render_workload_yaml(node_info, &rows)
    }

    /// [`Lab::workload_file_yaml`] plus pods of other nodes that the agent of
    /// `node` must know to tunnel to them (`remote`: name, enrolled), listed
    /// with their node's name and addresses and no netns.
    ///
    /// # Panics
    ///
    /// If `node` or a pod name is not in the lab: that is a bug in the test.
    pub fn workload_file_yaml_with_remote(
        &self,
        node: usize,
        local: &[(&str, bool)],
        remote: &[(&str, bool)],
    ) -> String {
        let mut text = self.workload_file_yaml(node, local);
        if local.is_empty() && !remote.is_empty() {
            text = text.replace("pods: []\n", "pods:\n");
        }
        for (name, enrolled) in remote {
            let pod = self
                .pod(name)
                .unwrap_or_else(|e| panic!("workload_file_yaml_with_remote: {e}"));
            let other = self
                .node(pod.node())
                .unwrap_or_else(|e| panic!("workload_file_yaml_with_remote: {e}"));
            let ips: Vec<String> = pod.ips().iter().map(|ip| format!("\"{ip}\"")).collect();
            text.push_str(&format!(
                "  - name: {name}\n    namespace: default\n    serviceAccount: {name}\n    node: {}\n    ips: [{}]\n    enrolled: {enrolled}\n",
                other.name(),
                ips.join(", ")
            ));
        }
        text
    }

    /// Starts `cmd` in pod `pod`: in its cgroup and netns, with
    /// `PR_SET_PDEATHSIG(SIGKILL)`, stdout and stderr to a log file.
    pub fn spawn_in_pod(&self, pod: &str, cmd: Command) -> Result<LabChild> {
        self.spawn_in_pod_with(pod, cmd, LogMode::File)
    }

    /// [`Lab::spawn_in_pod`] choosing where stdout and stderr go.
    pub fn spawn_in_pod_with(&self, pod: &str, cmd: Command, log: LogMode) -> Result<LabChild> {
        let p = self.inner.pod(pod)?;
        let placement = Placement {
            netns: open_netns(&p.netns_path())?,
            cgroup_procs: Some(sys::open_write(&p.cgroup_dir.join("cgroup.procs"))?),
            death_signal: libc::SIGKILL,
        };
        self.inner.spawn(cmd, placement, &p.name, log)
    }

    /// Starts `cmd` in node `node`'s netns (it stays in the caller's cgroup,
    /// outside the lab cgroup), with `PR_SET_PDEATHSIG(SIGTERM)`, stdout and
    /// stderr to a log file. This is how an agent runs.
    pub fn spawn_in_node(&self, node: usize, cmd: Command) -> Result<LabChild> {
        self.spawn_in_node_with(node, cmd, LogMode::File)
    }

    /// [`Lab::spawn_in_node`] choosing where stdout and stderr go.
    pub fn spawn_in_node_with(&self, node: usize, cmd: Command, log: LogMode) -> Result<LabChild> {
        let n = self.node(node)?;
        let placement = Placement {
            netns: open_netns(&n.netns_path())?,
            cgroup_procs: None,
            death_signal: libc::SIGTERM,
        };
        self.inner.spawn(cmd, placement, &n.netns, log)
    }

    /// Starts `cmd` in the wire netns, which sees every packet between nodes
    /// (for example `tcpdump -i br0`), with `PR_SET_PDEATHSIG(SIGTERM)`.
    pub fn spawn_in_wire(&self, cmd: Command) -> Result<LabChild> {
        let placement = Placement {
            netns: open_netns(&self.wire_netns_path())?,
            cgroup_procs: None,
            death_signal: libc::SIGTERM,
        };
        self.inner
            .spawn(cmd, placement, &self.inner.topo.wire_netns, LogMode::File)
    }

    /// Runs `cmd` in pod `pod` to completion and returns its output; kills it
    /// and fails after [`DEFAULT_RUN_TIMEOUT`]. A non-zero exit is not an error.
    pub fn run_in_pod(&self, pod: &str, cmd: Command) -> Result<Output> {
        self.run_in_pod_timeout(pod, cmd, DEFAULT_RUN_TIMEOUT)
    }

    /// [`Lab::run_in_pod`] with another timeout.
    pub fn run_in_pod_timeout(
        &self,
        pod: &str,
        mut cmd: Command,
        timeout: Duration,
    ) -> Result<Output> {
        let capture = Capture::attach(&self.inner, &mut cmd)?;
        let child = self.spawn_in_pod_with(pod, cmd, LogMode::Caller)?;
        capture.finish(&child, timeout)
    }

    /// Runs `cmd` in node `node`'s netns to completion (see [`Lab::run_in_pod`]).
    pub fn run_in_node(&self, node: usize, cmd: Command) -> Result<Output> {
        self.run_in_node_timeout(node, cmd, DEFAULT_RUN_TIMEOUT)
    }

    /// [`Lab::run_in_node`] with another timeout.
    pub fn run_in_node_timeout(
        &self,
        node: usize,
        mut cmd: Command,
        timeout: Duration,
    ) -> Result<Output> {
        let capture = Capture::attach(&self.inner, &mut cmd)?;
        let child = self.spawn_in_node_with(node, cmd, LogMode::Caller)?;
        capture.finish(&child, timeout)
    }

    /// Runs `args` (program and arguments, for example
    /// `["ip", "-br", "addr"]`) in node `node`'s netns, like `ip netns exec`
    /// but without its private mount namespace (the host's `/sys` stays
    /// visible). Non-zero exit is not an error: check `status`.
    pub fn exec_in_node(&self, node: usize, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .context("exec_in_node: no program given")?;
        let mut cmd = Command::new(program);
        cmd.args(rest);
        self.run_in_node(node, cmd)
    }

    /// Removes the lab now and reports what failed (dropping also cleans up,
    /// printing errors instead).
    pub fn close(self) -> Result<()> {
        let errors = self.inner.cleanup();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "cleaning up lab {}:\n  {}",
                self.inner.id,
                errors.join("\n  ")
            ))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in self.inner.cleanup() {
            eprintln!("mesh-lab: cleaning up {}: {e}", self.inner.id);
        }
        registry::unregister(&self.inner.id);
    }
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "mesh-lab needs root (it creates network namespaces, cgroups and bpffs mounts); \
         run the tests as root (euid is {euid})"
    );
    Ok(())
}

fn open_netns(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("opening netns {}", path.display()))
}

impl LabInner {
    fn pod(&self, name: &str) -> Result<&PodInfo> {
        self.topo
            .pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("lab {} has no pod {name:?}", self.id))
    }

    fn next_file_seq(&self) -> u64 {
        self.file_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn lock_children(&self) -> MutexGuard<'_, Children> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates every resource of the topology.
    fn build(&self) -> Result<()> {
        fs::create_dir_all(&self.scratch)
            .with_context(|| format!("creating scratch dir {}", self.scratch.display()))?;
        sys::ensure_bpffs()?;

        let t = &self.topo;
        fs::create_dir(&t.lab_cgroup)
            .with_context(|| format!("creating lab cgroup {}", t.lab_cgroup.display()))?;
        for node in &t.nodes {
            fs::create_dir(&node.cgroup_dir)
                .with_context(|| format!("creating {}", node.cgroup_dir.display()))?;
        }
        for pod in &t.pods {
            fs::create_dir(&pod.cgroup_dir)
                .with_context(|| format!("creating {}", pod.cgroup_dir.display()))?;
        }

        let names = t.netns_names();
        sys::add_netns(&names)?;
        let node_names: Vec<&str> = t.nodes.iter().map(|n| n.netns.as_str()).collect();
        for name in &names {
            let is_node = node_names.contains(&name.as_str());
            sys::in_netns(&Path::new(NETNS_DIR).join(name), || {
                for (key, value) in
                    COMMON_SYSCTLS
                        .iter()
                        .chain(if is_node { NODE_SYSCTLS } else { &[] })
                {
                    sys::write_sysctl(key, value)?;
                }
                Ok(())
            })
            .with_context(|| format!("setting sysctls in netns {name}"))?;
        }

        // Links: the wire creates each node's eth0, each node creates its pods' eth0.
        sys::ip_batch(Some(&t.wire_netns), &t.wire_batch())?;
        parallel(
            t.nodes
                .iter()
                .map(|n| (n.netns.as_str(), t.node_batch(n.index))),
        )?;
        parallel(
            t.pods
                .iter()
                .enumerate()
                .map(|(i, p)| (p.netns.as_str(), t.pod_batch(i))),
        )?;
        Ok(())
    }

    fn spawn(
        &self,
        mut cmd: Command,
        placement: Placement,
        owner: &str,
        log: LogMode,
    ) -> Result<LabChild> {
        let program = Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(OsStr::new("cmd"))
            .to_string_lossy()
            .into_owned();
        let label = format!("{owner}/{program}");
        let mut children = self.lock_children();
        if children.closed {
            bail!("lab {} is cleaned up: cannot start {label}", self.id);
        }
        let log_path = match log {
            LogMode::File => {
                let path = self
                    .scratch
                    .join(format!("{owner}.{program}.{}.log", self.next_file_seq()));
                let file = File::create(&path)
                    .with_context(|| format!("creating log file {}", path.display()))?;
                cmd.stdin(Stdio::null())
                    .stdout(
                        file.try_clone()
                            .context("duplicating the log file handle")?,
                    )
                    .stderr(file);
                Some(path)
            }
            LogMode::Caller => None,
        };
        let mut child =
            spawn_placed(cmd, placement).with_context(|| format!("starting {label}"))?;
        let pipes = Pipes::take_from(&mut child);
        let shared = Arc::new(ChildShared::new(child, label));
        children.list.retain(|w| w.strong_count() > 0);
        children.list.push(Arc::downgrade(&shared));
        Ok(LabChild::new(shared, pipes, log_path))
    }

    /// Removes everything the lab made; idempotent; returns the errors.
    pub(crate) fn cleanup(&self) -> Vec<String> {
        let mut cleaned = self.cleaned.lock().unwrap_or_else(PoisonError::into_inner);
        if *cleaned {
            return Vec::new();
        }
        let mut errors = Vec::new();

        // 1. Children first: SIGTERM all, one shared grace period, then SIGKILL.
        let children: Vec<Arc<ChildShared>> = {
            let mut c = self.lock_children();
            c.closed = true;
            c.list.iter().filter_map(Weak::upgrade).collect()
        };
        for child in &children {
            if let Err(e) = child.signal(libc::SIGTERM) {
                errors.push(format!("SIGTERM to a child: {e}"));
            }
        }
        let deadline = Instant::now() + TERMINATE_GRACE;
        for child in &children {
            let done = matches!(child.wait_until(deadline), Ok(Some(_)));
            if !done && let Err(e) = child.kill() {
                errors.push(format!("killing a child: {e}"));
            }
        }

        // 2. Network namespaces: every name with the lab's prefix.
        let prefix = format!("{}-", self.id);
        for name in sys::entries_with_prefix(Path::new(NETNS_DIR), &prefix) {
            if let Err(e) = sys::delete_netns(&Path::new(NETNS_DIR).join(&name)) {
                errors.push(format!("{e:#}"));
            }
        }

        // 3. Cgroups, leaf first.
        if let Err(e) = sys::remove_cgroup_tree(&self.topo.lab_cgroup, &format!("/{}", self.id)) {
            errors.push(format!("{e:#}"));
        }

        // 4. Pin dirs (unpinning links detaches their programs).
        for name in sys::entries_with_prefix(Path::new(BPFFS_DIR), &prefix) {
            if let Err(e) = sys::remove_path(&Path::new(BPFFS_DIR).join(name)) {
                errors.push(format!("{e:#}"));
            }
        }

        // 5. Scratch dir.
        if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            if self.scratch.exists() {
                if let Err(e) = fs::write(self.scratch.join(KEPT_MARKER), "") {
                    errors.push(format!("marking {} as kept: {e}", self.scratch.display()));
                }
                eprintln!("mesh-lab: kept {} ({KEEP_ENV}=1)", self.scratch.display());
            }
        } else if let Err(e) = sys::remove_path(&self.scratch) {
            errors.push(format!("{e:#}"));
        }

        *cleaned = errors.is_empty();
        errors
    }
}

/// Runs one `ip -n NS -batch` per entry, all at once.
fn parallel<'a>(jobs: impl Iterator<Item = (&'a str, Vec<String>)>) -> Result<()> {
    let jobs: Vec<_> = jobs.collect();
    thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(ns, lines)| s.spawn(move || sys::ip_batch(Some(ns), lines)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow!("an `ip -batch` thread panicked"))?
        })
    })
}

/// stdout/stderr files for a run-to-completion command.
struct Capture {
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Capture {
    fn attach(lab: &LabInner, cmd: &mut Command) -> Result<Self> {
        let n = lab.next_file_seq();
        let capture = Self {
            stdout: lab.scratch.join(format!("run-{n}.stdout")),
            stderr: lab.scratch.join(format!("run-{n}.stderr")),
        };
        let out = File::create(&capture.stdout)
            .with_context(|| format!("creating {}", capture.stdout.display()))?;
        let err = File::create(&capture.stderr)
            .with_context(|| format!("creating {}", capture.stderr.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Ok(capture)
    }

    fn finish(self, child: &LabChild, timeout: Duration) -> Result<Output> {
        let status = child.wait_timeout(timeout)?;
        let status = match status {
            Some(s) => s,
            None => {
                let killed = child.kill();
                let (out, err) = (self.read(&self.stdout), self.read(&self.stderr));
                bail!(
                    "{} did not finish within {timeout:?} and was killed ({killed:?})\n\
                     stdout:\n{}\nstderr:\n{}",
                    child.label(),
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
        };
        Ok(Output {
            status,
            stdout: self.read(&self.stdout),
            stderr: self.read(&self.stderr),
        })
    }

    fn read(&self, path: &Path) -> Vec<u8> {
        fs::read(path).unwrap_or_else(|e| format!("<reading {}: {e}>", path.display()).into_bytes())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
    }
}
