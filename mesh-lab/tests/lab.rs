//! Lab integration tests. They need root: without it they fail, loudly.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_lab::app::{ClientReport, HoldReport, ProbeOutcome};
use mesh_lab::{Lab, LabSpec, NodeSpec, PodSpec};

const APP: &str = env!("CARGO_BIN_EXE_mesh-lab-app");
const WAIT: Duration = Duration::from_secs(10);
/// Set (to a file path) when this test binary runs as the helper of the
/// signal and sweep tests.
const HELPER_ENV: &str = "MESH_LAB_TEST_HELPER_OUT";

fn assert_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the mesh-lab integration tests need root (network namespaces, cgroups, bpffs); \
         run them as root — they are not skipped"
    );
}

fn app(args: &[&str]) -> Command {
    let mut cmd = Command::new(APP);
    cmd.args(args);
    cmd
}

fn two_node_spec() -> LabSpec {
    LabSpec::new()
        .node(
            NodeSpec::new()
                .pod(PodSpec::new("a"))
                .pod(PodSpec::dual_stack("b")),
        )
        .node(NodeSpec::new().pod(PodSpec::dual_stack("c")))
}

/// Root-netns interface names: the lab must never add one.
fn root_links() -> Result<BTreeSet<String>> {
    let out = Command::new("ip").args(["-o", "link", "show"]).output()?;
    ensure!(out.status.success(), "ip link failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .collect())
}

/// Host (root netns) sysctls the lab sets inside its own namespaces only.
fn host_sysctls() -> Result<Vec<String>> {
    [
        "net/ipv4/ip_forward",
        "net/ipv6/conf/all/forwarding",
        "net/ipv6/conf/default/accept_dad",
        "net/ipv4/conf/default/rp_filter",
    ]
    .iter()
    .map(|k| fs::read_to_string(format!("/proc/sys/{k}")).with_context(|| format!("reading {k}")))
    .collect()
}

/// Whether process `pid` is in the network namespace bound at `netns`.
fn same_netns(pid: u32, netns: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let proc_ns = fs::metadata(format!("/proc/{pid}/ns/net"))?;
    let file = fs::metadata(netns)?;
    Ok(proc_ns.dev() == file.dev() && proc_ns.ino() == file.ino())
}

/// Bytes received so far on node `node`'s inter-node link.
fn link_rx_bytes(lab: &Lab, node: usize) -> Result<u64> {
    let iface = lab.node(node)?.link_iface().to_owned();
    let out = lab.exec_in_node(node, &["ip", "-s", "-j", "link", "show", &iface])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j output: {}", String::from_utf8_lossy(&out.stdout)))?;
    v[0]["stats64"]["rx"]["bytes"]
        .as_u64()
        .context("no rx byte counter in `ip -s -j link`")
}

/// Every path a lab is known to own.
fn owned_paths(lab: &Lab) -> Vec<PathBuf> {
    let mut paths = vec![
        lab.lab_cgroup_dir().to_owned(),
        lab.scratch_dir().to_owned(),
        lab.wire_netns_path(),
    ];
    for node in lab.nodes() {
        paths.push(node.netns_path());
        paths.push(node.cgroup_dir().to_owned());
        paths.push(node.pin_dir().to_owned());
    }
    for pod in lab.pods() {
        paths.push(pod.netns_path());
        paths.push(pod.cgroup_dir().to_owned());
    }
    paths
}

fn assert_gone(paths: &[PathBuf]) {
    let left: Vec<&PathBuf> = paths.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left behind after cleanup: {left:?}");
}

fn run_client(lab: &Lab, pod: &str, target: SocketAddr, extra: &[&str]) -> Result<ClientReport> {
    let target = target.to_string();
    let mut args = vec![
        "client",
        "--connect",
        &target,
        "--conns",
        "20",
        "--concurrency",
        "4",
        "--bytes",
        "200000",
    ];
    args.extend_from_slice(extra);
    let out = lab.run_in_pod(pod, app(&args))?;
    let report = ClientReport::from_output(&out)?;
    ensure!(
        out.status.success() && report.failed == 0 && report.ok == 20,
        "client in {pod} -> {target}: {report:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        report.bytes_sent == 20 * 200_000 && report.bytes_received == report.bytes_sent,
        "client in {pod} -> {target}: byte counts {report:?}"
    );
    ensure!(
        report.peer_addrs == [target.clone()],
        "client in {pod} -> {target}: peers {:?}",
        report.peer_addrs
    );
    Ok(report)
}

fn probe(lab: &Lab, pod: &str, target: &str) -> Result<ProbeOutcome> {
    let out = lab.run_in_pod(
        pod,
        app(&["probe", "--connect", target, "--timeout-ms", "2000"]),
    )?;
    ensure!(out.status.success(), "probe exits 0 always");
    ProbeOutcome::from_output(&out)
}

#[test]
fn two_nodes_echo_then_everything_is_removed() -> Result<()> {
    assert_root();
    let links_before = root_links()?;
    let sysctls_before = host_sysctls()?;
    let lab = Lab::new(two_node_spec())?;
    assert_eq!(
        root_links()?,
        links_before,
        "the lab changed the root netns"
    );
    assert_eq!(
        host_sysctls()?,
        sysctls_before,
        "the lab changed host sysctls"
    );
    let fwd = lab.exec_in_node(1, &["cat", "/proc/sys/net/ipv4/ip_forward"])?;
    assert_eq!(
        String::from_utf8_lossy(&fwd.stdout).trim(),
        "1",
        "forwarding in the node netns"
    );

    let (a, b, c) = (lab.pod("a")?, lab.pod("b")?, lab.pod("c")?);
    assert_eq!(a.ipv4().to_string(), "198.18.1.10");
    assert_eq!(a.ipv6(), None);
    assert_eq!(b.ipv4().to_string(), "198.18.1.11");
    assert_eq!(
        b.ipv6().map(|ip| ip.to_string()).as_deref(),
        Some("fd18:1::11")
    );
    assert_eq!(c.ipv4().to_string(), "198.18.2.10");
    assert_eq!(lab.node(1)?.link_v4().to_string(), "198.19.0.2");
    assert_eq!(lab.node(1)?.link_iface(), "eth0");
    assert!(lab.lab_cgroup_dir().is_dir());
    assert!(c.cgroup_dir().starts_with(lab.lab_cgroup_dir()));

    let v4: SocketAddr = format!("{}:7000", b.ipv4()).parse()?;
    let v6: SocketAddr = format!("[{}]:7000", b.ipv6().context("b has ipv6")?).parse()?;
    let greet: SocketAddr = format!("{}:7001", b.ipv4()).parse()?;
    let server = lab.spawn_in_pod(
        "b",
        app(&[
            "echo",
            "--listen",
            &v4.to_string(),
            "--listen",
            &v6.to_string(),
        ]),
    )?;
    server.wait_for_log(&format!("listening {v4}"), WAIT)?;
    server.wait_for_log(&format!("listening {v6}"), WAIT)?;
    let greeter = lab.spawn_in_pod(
        "b",
        app(&["echo", "--listen", &greet.to_string(), "--greeting-peer"]),
    )?;
    greeter.wait_for_log("listening", WAIT)?;

    // The servers sit in pod b's cgroup.
    let procs = fs::read_to_string(b.cgroup_dir().join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|l| l == server.pid().to_string()),
        "server {} not in {}: {procs}",
        server.pid(),
        b.cgroup_dir().display()
    );

    assert!(
        same_netns(server.pid(), &b.netns_path())?,
        "server is in pod b's netns"
    );
    let rx_before = link_rx_bytes(&lab, 1)?;

    // Same node, cross node v4, cross node v6.
    let same = run_client(&lab, "a", v4, &[])?;
    assert!(
        same.local_addrs
            .iter()
            .all(|l| l.starts_with("198.18.1.10:"))
    );
    let cross = run_client(&lab, "c", v4, &[])?;
    assert!(
        cross
            .local_addrs
            .iter()
            .all(|l| l.starts_with("198.18.2.10:"))
    );
    let cross6 = run_client(&lab, "c", v6, &["--hold-ms", "50"])?;
    assert!(
        cross6
            .local_addrs
            .iter()
            .all(|l| l.starts_with("[fd18:2::10]:")),
        "{cross6:?}"
    );

    // The server sees the client's own address (no NAT in the lab).
    let greeted = run_client(&lab, "c", greet, &["--greeting"])?;
    let seen = greeted.greeting_peers.context("greeting peers reported")?;
    assert!(
        !seen.is_empty() && seen.iter().all(|p| p.starts_with("198.18.2.10:")),
        "{seen:?}"
    );

    assert_eq!(probe(&lab, "c", &v4.to_string())?, ProbeOutcome::Echoed);
    assert_eq!(
        probe(&lab, "a", &format!("{}:7999", b.ipv4()))?,
        ProbeOutcome::Refused
    );
    // a has no IPv6 at all.
    assert!(matches!(
        probe(&lab, "a", &v6.to_string())?,
        ProbeOutcome::Error(_)
    ));

    let out = lab.run_in_pod(
        "c",
        app(&[
            "hold",
            "--connect",
            &v6.to_string(),
            "--interval-ms",
            "50",
            "--duration-ms",
            "400",
        ]),
    )?;
    let hold = HoldReport::from_output(&out)?;
    assert_eq!(hold.error, None, "{hold:?}");
    assert!(hold.rounds_ok >= 6, "{hold:?}");

    // The cross-node clients' bytes went over node 1's inter-node link.
    let crossed = link_rx_bytes(&lab, 1)? - rx_before;
    assert!(
        crossed > 3 * 20 * 200_000,
        "only {crossed} bytes crossed node 1's link"
    );

    // Node netns: the bridge address is there; routes to the other node's pods.
    let addrs = lab.exec_in_node(0, &["ip", "-br", "addr"])?;
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        addrs.contains("198.18.1.1/24") && addrs.contains("198.19.0.1/24"),
        "{addrs}"
    );
    let routes = lab.exec_in_node(0, &["ip", "route"])?;
    assert!(String::from_utf8_lossy(&routes.stdout).contains("198.18.2.0/24 via 198.19.0.2"));
    let yaml = lab.workload_file_yaml(0, &[("a", false), ("b", true)]);
    assert!(
        yaml.contains(&format!("netns: {}", b.netns_path().display())),
        "{yaml}"
    );

    // Something for cleanup to remove: an agent's pin dir with a subdir.
    let pin = lab.pin_dir(0);
    fs::create_dir_all(pin.join("links"))?;

    let paths = owned_paths(&lab);
    let server_pid = server.pid();
    drop(lab);
    assert_gone(&paths);
    assert!(
        server.try_wait()?.is_some(),
        "lab cleanup must kill child {server_pid}"
    );
    assert_eq!(
        root_links()?,
        links_before,
        "the lab changed the root netns"
    );
    Ok(())
}

/// `mesh-lab-app forward` (the bench's plain relay rows) relays each
/// connection byte for byte, both ways, across nodes.
#[test]
fn forward_relays_byte_for_byte() -> Result<()> {
    assert_root();
    let lab = Lab::new(two_node_spec())?;
    let (b, c) = (lab.pod("b")?.ipv4(), lab.pod("c")?.ipv4());
    let server = lab.spawn_in_pod("c", app(&["echo", "--listen", &format!("{c}:7100")]))?;
    server.wait_for_log("listening", WAIT)?;
    let relay = lab.spawn_in_pod(
        "b",
        app(&[
            "forward",
            "--listen",
            &format!("{b}:7100"),
            "--to",
            &c.to_string(),
        ]),
    )?;
    relay.wait_for_log(&format!("listening {b}:7100"), WAIT)?;
    run_client(&lab, "a", format!("{b}:7100").parse()?, &[])?;
    lab.close()
}

#[test]
fn two_labs_at_once_are_isolated() -> Result<()> {
    assert_root();
    let spec = || {
        LabSpec::new()
            .node(NodeSpec::with_pods(["srv", "cli"]))
            .node(NodeSpec::with_pods(["far"]))
    };
    let (one, two) = thread::scope(|s| {
        let h1 = s.spawn(|| Lab::new(spec()));
        let h2 = s.spawn(|| Lab::new(spec()));
        (h1.join(), h2.join())
    });
    let (Ok(one), Ok(two)) = (one, two) else {
        bail!("a Lab::new thread panicked");
    };
    let (one, two) = (one?, two?);
    assert_ne!(one.id(), two.id());
    assert_ne!(one.pod("srv")?.netns(), two.pod("srv")?.netns());

    // Same addresses in both labs; only lab one has a server.
    let target = format!("{}:7100", one.pod("srv")?.ipv4());
    let server = one.spawn_in_pod("srv", app(&["echo", "--listen", &target]))?;
    server.wait_for_log("listening", WAIT)?;
    assert_eq!(probe(&one, "far", &target)?, ProbeOutcome::Echoed);
    assert_eq!(probe(&two, "far", &target)?, ProbeOutcome::Refused);

    let paths_two = owned_paths(&two);
    two.close()?;
    assert_gone(&paths_two);
    // Lab one is untouched by lab two's cleanup.
    assert_eq!(probe(&one, "cli", &target)?, ProbeOutcome::Echoed);
    let paths_one = owned_paths(&one);
    drop(server);
    drop(one);
    assert_gone(&paths_one);
    Ok(())
}

#[test]
fn children_logs_timeouts_and_node_processes() -> Result<()> {
    assert_root();
    let lab = Lab::new(LabSpec::new().node(NodeSpec::with_pods(["p"])))?;

    let mut sh = Command::new("sh");
    sh.args(["-c", "echo starting; echo oops >&2; exit 3"]);
    let quick = lab.spawn_in_pod("p", sh)?;
    let err = quick
        .wait_for_log("never printed", WAIT)
        .expect_err("the process exits without the line");
    assert!(format!("{err:#}").contains("exited"), "{err:#}");
    assert!(
        quick.log_contents()?.contains("oops"),
        "stderr goes to the log too"
    );
    assert_eq!(quick.try_wait()?.and_then(|s| s.code()), Some(3));

    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let err = lab
        .run_in_pod_timeout("p", sleep, Duration::from_millis(300))
        .expect_err("sleep 30 must time out");
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");

    // A node process is in the node netns but not in the lab cgroup.
    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let node_child = lab.spawn_in_node(0, sleep)?;
    assert!(same_netns(node_child.pid(), &lab.node(0)?.netns_path())?);
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", node_child.pid()))?;
    assert!(
        !cgroup.contains(lab.id()),
        "node child joined a lab cgroup: {cgroup}"
    );
    let started = Instant::now();
    let status = node_child.terminate()?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "sleep dies on SIGTERM"
    );
    assert!(!status.success());

    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let wire_child = lab.spawn_in_wire(sleep)?;
    assert!(same_netns(wire_child.pid(), &lab.wire_netns_path())?);
    // Dropped (and so terminated) at the end of the test, before the lab.

    // The pod's `ip` sees only the pod's own interfaces.
    let out = lab.run_in_pod("p", {
        let mut c = Command::new("ip");
        c.args(["-o", "link"]);
        c
    })?;
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(links.lines().count(), 2, "lo and eth0 only: {links}");

    assert_eq!(
        mesh_lab::lab_app_path()?.canonicalize()?,
        Path::new(APP).canonicalize()?
    );
    Ok(())
}

/// Runs this test binary as a helper that makes a lab with a pod process and
/// then sleeps; returns the helper and the lab id it wrote.
fn start_helper(out: &Path) -> Result<(std::process::Child, String)> {
    let _ = fs::remove_file(out);
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args([
            "--exact",
            "helper_lab_then_sleep",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = fs::read_to_string(out)
            && let Some(line) = text.lines().next()
            && text.ends_with('\n')
        {
            return Ok((child, line.to_owned()));
        }
        ensure!(
            Instant::now() < deadline,
            "the helper did not report its lab"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Paths named after `id` that a helper's lab creates.
fn helper_paths(id: &str) -> Result<Vec<PathBuf>> {
    let cg = mesh_lab::cgroup2_root()?;
    Ok(vec![
        cg.join(id),
        Path::new("/var/run/netns").join(format!("{id}-n0")),
        Path::new("/var/run/netns").join(format!("{id}-n0-p")),
        Path::new("/var/run/netns").join(format!("{id}-wire")),
        Path::new("/sys/fs/bpf").join(format!("{id}-n0")),
        std::env::temp_dir().join(format!("mesh-lab-{id}")),
    ])
}

/// Not a test on its own: the helper process of the tests below.
#[test]
#[ignore = "helper process for the signal and sweep tests"]
fn helper_lab_then_sleep() -> Result<()> {
    let Some(out) = std::env::var_os(HELPER_ENV) else {
        return Ok(());
    };
    let lab = Lab::new(LabSpec::new().node(NodeSpec::with_pods(["p"])))?;
    fs::create_dir_all(lab.pin_dir(0))?;
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let child = lab.spawn_in_pod("p", sleep)?;
    fs::write(&out, format!("{}\n{}\n", lab.id(), child.pid()))?;
    thread::sleep(Duration::from_secs(600));
    Ok(())
}

#[test]
fn sigterm_cleans_up_and_exits_143() -> Result<()> {
    assert_root();
    let out = std::env::temp_dir().join(format!("mesh-lab-test-term-{}", std::process::id()));
    let (mut helper, id) = start_helper(&out)?;
    let paths = helper_paths(&id)?;
    assert!(
        paths.iter().take(5).all(|p| p.exists()),
        "helper lab exists: {paths:?}"
    );
    let pid = libc::pid_t::try_from(helper.id())?;
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = helper.wait()?;
    let _ = fs::remove_file(&out);
    assert_eq!(status.code(), Some(143), "exit status after SIGTERM");
    assert_gone(&paths);
    Ok(())
}

#[test]
fn sigkilled_leftovers_are_swept() -> Result<()> {
    assert_root();
    let out = std::env::temp_dir().join(format!("mesh-lab-test-kill-{}", std::process::id()));
    let (mut helper, id) = start_helper(&out)?;
    let pod_child: libc::pid_t = fs::read_to_string(&out)?
        .lines()
        .nth(1)
        .context("helper wrote the pod pid")?
        .parse()?;
    let _ = fs::remove_file(&out);
    let paths = helper_paths(&id)?;
    assert!(
        paths.iter().take(5).all(|p| p.exists()),
        "helper lab exists: {paths:?}"
    );
    helper.kill()?;
    helper.wait()?;
    // The pod process died with its parent (PR_SET_PDEATHSIG).
    let deadline = Instant::now() + WAIT;
    while Path::new(&format!("/proc/{pod_child}")).exists()
        && fs::read_to_string(format!("/proc/{pod_child}/cgroup")).is_ok_and(|c| c.contains(&id))
    {
        ensure!(
            Instant::now() < deadline,
            "pod process {pod_child} outlived its lab owner"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Another test's Lab::new (in this or a parallel process) may sweep first.
    mesh_lab::sweep_stale()?;
    assert_gone(&paths);
    Ok(())
}
