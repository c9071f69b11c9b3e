//! The mesh test lab: Linux network namespaces, veths and cgroups standing in
//! for Kubernetes nodes and pods, for integration tests, `cargo xtask demo` and
//! `cargo xtask bench`. Needs root.
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//! use mesh_lab::{Lab, LabSpec, NodeSpec, PodSpec, lab_app_path};
//!
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::new(
//!     LabSpec::new()
//!         .node(NodeSpec::new().pod(PodSpec::new("a")).pod(PodSpec::dual_stack("b")))
//!         .node(NodeSpec::with_pods(["c"])),
//! )?;
//! let app = lab_app_path()?;
//! let b = lab.pod("b")?;
//! let mut echo = Command::new(&app);
//! echo.args(["echo", "--listen", &format!("{}:8080", b.ipv4())]);
//! let server = lab.spawn_in_pod("b", echo)?;
//! server.wait_for_log("listening", Duration::from_secs(5))?;
//! let mut client = Command::new(&app);
//! client.args(["client", "--connect", &format!("{}:8080", b.ipv4())]);
//! let out = lab.run_in_pod("c", client)?;
//! let report = mesh_lab::app::ClientReport::from_output(&out)?;
//! assert_eq!(report.failed, 0);
//! # Ok(()) }
//! ```
//!
//! # What a lab creates
//!
//! A lab has an id `ml<pid>x<seq>` (owner pid, per-process counter). For node
//! `i` (0-based) and its pod `k` (0-based, in spec order):
//!
//! | what | name / address |
//! |---|---|
//! | node netns | `<id>-n<i>` (`/var/run/netns/<id>-n<i>`), `ip_forward=1`, IPv6 `forwarding=1` |
//! | node bridge `br0` | `198.18.<i+1>.1/24`, `fd18:<i+1>::1/64` (pods' gateway, probe source) |
//! | node link `eth0` | `198.19.0.<i+1>/24`, `fd19::<i+1>/64`; routes to every other node's `198.18.<j+1>.0/24` and `fd18:<j+1>::/64` via `198.19.0.<j+1>` / `fd19::<j+1>` |
//! | wire netns | `<id>-wire`: bridge `br0` with port `n<i>` = the other end of node `i`'s `eth0` |
//! | pod netns | `<id>-n<i>-<pod>` |
//! | pod `eth0` | `198.18.<i+1>.<10+k>/24` (and `fd18:<i+1>::<10+k>/64` if `ipv6`), default routes via the bridge |
//! | pod veth, node end | `pv<k>` in the node netns, port of `br0` |
//! | cgroups | `<cgroup2 mount>/<id>` (lab), `<id>/n<i>` (node), `<id>/n<i>/<pod>` (pod) |
//! | bpffs pin dir | `/sys/fs/bpf/<id>-n<i>` — not created by the lab (the agent does), removed at cleanup |
//! | scratch dir | `$TMPDIR/mesh-lab-<id>`: logs and files, removed at cleanup unless `MESH_LAB_KEEP=1` |
//!
//! IPv6 groups are written with the decimal digits of the IPv4 octet
//! (`198.18.2.11` ↔ `fd18:2::11`). Every lab netns has DAD off (`nodad`
//! addresses, usable at once) and `rp_filter=0`. Nothing is created in the
//! root netns: veths are created directly inside the namespaces
//! (`ip -n NS link add … peer name eth0 netns OTHER`) and sysctls are written
//! by a thread that joined the lab netns. The only host-wide change: bpffs is
//! mounted on `/sys/fs/bpf` if nothing is mounted there (and left mounted).
//! The cgroup2 mount is found in `/proc/mounts` (`/sys/fs/cgroup/unified` on a
//! hybrid host).
//!
//! # Processes
//!
//! [`Lab::spawn_in_pod`] joins the pod's cgroup, then its netns (descriptors
//! opened before `fork`, joined in `pre_exec`, no `ip netns exec`, so `/sys`
//! and the cgroup mount stay the host's), with `PR_SET_PDEATHSIG(SIGKILL)`.
//! [`Lab::spawn_in_node`] joins only the node netns and stays in the caller's
//! cgroup, with `PR_SET_PDEATHSIG(SIGTERM)`: that is how an agent runs.
//! [`Lab::spawn_in_wire`] runs a capture where every inter-node packet passes.
//! Children run in their own process group, are forked by one long-lived
//! thread (so the death signal means "this process died", not "the calling
//! thread ended"), and log stdout and stderr to a file in the scratch dir
//! ([`LabChild::log_path`]) unless [`LogMode::Caller`]. A [`LabChild`]
//! terminates its process on drop (SIGTERM, 5 s, SIGKILL). [`Lab::run_in_pod`],
//! [`Lab::run_in_node`] and [`Lab::exec_in_node`] run to completion with a
//! timeout (60 s by default) and return the `Output`.
//!
//! # Cleanup
//!
//! Always, in this order: terminate tracked children; delete pod, node and
//! wire netns; kill what is left in the lab cgroup (`cgroup.kill`) and `rmdir`
//! the cgroups leaf-first; remove `/sys/fs/bpf/<id>-*` (unpinning the agent's
//! links detaches its programs); remove the scratch dir. It runs on drop (also
//! while a panic unwinds), on [`Lab::close`], and on SIGINT/SIGTERM: the first
//! `Lab::new` of a process starts a thread that cleans up every live lab and
//! exits with 130/143. What a SIGKILLed process left is swept by the next
//! `Lab::new` (and by [`sweep_stale`]): every name carries the owner pid, and
//! resources of dead owners are removed. Cleanup is idempotent and prints its
//! errors instead of panicking.
//!
//! # The application
//!
//! The `mesh-lab-app` binary of this crate is the workload inside pods:
//! `echo`, `client`, `probe` and `hold` subcommands; [`app`] holds the report
//! types to parse their output. Find it with [`lab_app_path`].

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod app;
mod child;
mod lab;
mod registry;
mod spec;
mod sys;
mod topology;
mod workload;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

pub use child::{LabChild, LogMode, LogSync, TERMINATE_GRACE};
pub use lab::{DEFAULT_RUN_TIMEOUT, KEEP_ENV, Lab};
pub use registry::{SweepReport, sweep_stale};
pub use spec::{LabSpec, MAX_NODES, MAX_POD_NAME_LEN, MAX_PODS_PER_NODE, NodeSpec, PodSpec};
pub use sys::{BPFFS_DIR, NETNS_DIR, cgroup2_root};
pub use topology::{
    NodeInfo, PodInfo, node_bridge_v4, node_bridge_v6, node_link_v4, node_link_v6, pod_subnet_v4,
    pod_subnet_v6, pod_v4, pod_v6,
};
pub use workload::render_workload_yaml;

/// The environment variable that overrides [`lab_app_path`].
pub const LAB_APP_ENV: &str = "MESH_LAB_APP";

/// The name of the lab application binary.
pub const LAB_APP_NAME: &str = "mesh-lab-app";

/// Where the `mesh-lab-app` binary is: `$MESH_LAB_APP` if set, else next to
/// the running executable's target dir (a test runs as
/// `target/<profile>/deps/<name>`, so `target/<profile>/mesh-lab-app`; a binary
/// in `target/<profile>/` looks beside itself).
pub fn lab_app_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(LAB_APP_ENV) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{LAB_APP_ENV}={} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("finding the current executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(LAB_APP_NAME))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "{LAB_APP_NAME} not found (looked at {}); build it with \
                 `cargo build -p mesh-lab --bins` (make test does), or set {LAB_APP_ENV}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::Lab>();
        check::<crate::LabChild>();
    }
}
