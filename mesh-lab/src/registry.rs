//! Process-wide lab bookkeeping: lab ids, the live-lab list the signal thread
//! cleans up, and sweeping what dead processes left behind.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;

use anyhow::{Result, bail};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::sys::{self, BPFFS_DIR, NETNS_DIR};

/// Marker file in a scratch dir kept with `MESH_LAB_KEEP`: sweeps leave such dirs alone.
pub(crate) const KEPT_MARKER: &str = "KEPT";

/// Prefix of every scratch dir in `std::env::temp_dir()`.
pub(crate) const SCRATCH_PREFIX: &str = "mesh-lab-";

/// A live lab as the registry sees it: something to clean up on a signal.
pub(crate) trait Live: Send + Sync {
    /// The lab's id (for messages).
    fn id(&self) -> &str;
    /// Removes everything the lab made; returns what could not be removed.
    fn cleanup(&self) -> Vec<String>;
}

static LIVE: Mutex<Vec<Arc<dyn Live>>> = Mutex::new(Vec::new());
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh lab id: `ml<pid>x<seq>`.
pub(crate) fn next_id() -> String {
    format!(
        "ml{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed) + 1
    )
}

pub(crate) fn register(lab: Arc<dyn Live>) {
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(lab);
}

pub(crate) fn unregister(id: &str) {
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|l| l.id() != id);
}

/// Before a lab is made: sweep leftovers of dead processes. The first call in
/// a process, before any lab id is handed out, also sweeps those of an earlier
/// process that had this same pid, and starts the signal thread.
pub(crate) fn prepare() {
    static INIT: OnceLock<()> = OnceLock::new();
    let mut first = false;
    INIT.get_or_init(|| {
        first = true;
        if let Err(e) = sweep(true) {
            eprintln!("mesh-lab: sweeping stale labs: {e:#}");
        }
        if let Err(e) = install_signal_cleanup() {
            eprintln!("mesh-lab: no SIGINT/SIGTERM cleanup: {e:#}");
        }
    });
    if !first && let Err(e) = sweep(false) {
        eprintln!("mesh-lab: sweeping stale labs: {e:#}");
    }
}

/// Starts a thread that, on SIGINT or SIGTERM, cleans up every live lab of the
/// process and exits with 128 + the signal number (130, 143).
fn install_signal_cleanup() -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    thread::Builder::new()
        .name("mesh-lab-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let labs: Vec<Arc<dyn Live>> =
                    LIVE.lock().unwrap_or_else(PoisonError::into_inner).clone();
                eprintln!(
                    "mesh-lab: got signal {sig}, cleaning up {} lab(s) before exiting",
                    labs.len()
                );
                for lab in labs {
                    for e in lab.cleanup() {
                        eprintln!("mesh-lab: cleaning up {}: {e}", lab.id());
                    }
                }
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

/// What [`sweep_stale`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Every netns file, cgroup dir, pin dir and scratch dir removed.
    pub removed: Vec<PathBuf>,
}

/// Removes the leftovers of labs whose owner process is dead (for example
/// SIGKILLed): netns files `/var/run/netns/ml<pid>x<n>-*`, cgroup dirs
/// `<cgroup2>/ml<pid>x<n>`, pin dirs `/sys/fs/bpf/ml<pid>x<n>-*` and scratch
/// dirs (except those kept with `MESH_LAB_KEEP=1`). Labs of live processes,
/// this one included, are never touched. [`crate::Lab::new`] calls it too.
pub fn sweep_stale() -> Result<SweepReport> {
    sweep(false)
}

/// Parses `ml<pid>x<seq>` at the start of `name`, followed by the end or `-`.
/// Returns the owner pid and the lab id.
pub(crate) fn parse_owner(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("ml")?;
    let pid_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after_pid = rest[pid_len..].strip_prefix('x')?;
    let seq_len = after_pid.bytes().take_while(u8::is_ascii_digit).count();
    if pid_len == 0 || seq_len == 0 {
        return None;
    }
    let tail = &after_pid[seq_len..];
    if !(tail.is_empty() || tail.starts_with('-')) {
        return None;
    }
    let pid = rest[..pid_len].parse().ok()?;
    let id_len = 2 + pid_len + 1 + seq_len;
    Some((pid, &name[..id_len]))
}

/// Sweeps labs of dead owners; with `include_own`, also labs named after this
/// process's pid (only safe before this process made any lab).
pub(crate) fn sweep(include_own: bool) -> Result<SweepReport> {
    let own = std::process::id();
    let stale = |name: &str| -> Option<String> {
        let (pid, id) = parse_owner(name)?;
        let dead = if pid == own {
            include_own
        } else {
            !sys::pid_alive(pid)
        };
        dead.then(|| id.to_owned())
    };
    let mut report = SweepReport::default();
    let mut errors = Vec::new();

    for name in sys::entries_with_prefix(Path::new(NETNS_DIR), "ml") {
        if name.contains('-') && stale(&name).is_some() {
            let path = Path::new(NETNS_DIR).join(&name);
            match sys::delete_netns(&path) {
                Ok(true) => report.removed.push(path),
                Ok(false) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if let Ok(root) = sys::cgroup2_root() {
        for name in sys::entries_with_prefix(&root, "ml") {
            if stale(&name).is_some_and(|id| id == name) {
                let path = root.join(&name);
                match sys::remove_cgroup_tree(&path, &format!("/{name}")) {
                    Ok(()) => report.removed.push(path),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    for name in sys::entries_with_prefix(Path::new(BPFFS_DIR), "ml") {
        if name.contains('-') && stale(&name).is_some() {
            let path = Path::new(BPFFS_DIR).join(&name);
            match sys::remove_path(&path) {
                Ok(true) => report.removed.push(path),
                Ok(false) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    let tmp = std::env::temp_dir();
    for name in sys::entries_with_prefix(&tmp, SCRATCH_PREFIX) {
        let Some(id) = name.strip_prefix(SCRATCH_PREFIX) else {
            continue;
        };
        let path = tmp.join(&name);
        if stale(id).is_some_and(|lab| lab == id) && !path.join(KEPT_MARKER).exists() {
            match sys::remove_path(&path) {
                Ok(true) => report.removed.push(path),
                Ok(false) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if !errors.is_empty() {
        bail!("sweeping stale labs:\n  {}", errors.join("\n  "));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_parsing() {
        assert_eq!(parse_owner("ml123x4"), Some((123, "ml123x4")));
        assert_eq!(parse_owner("ml123x4-n0-a"), Some((123, "ml123x4")));
        assert_eq!(parse_owner("ml123x4-wire"), Some((123, "ml123x4")));
        assert_eq!(parse_owner("ml123x"), None);
        assert_eq!(parse_owner("mlx4"), None);
        assert_eq!(parse_owner("ml12y4"), None);
        assert_eq!(parse_owner("ml12x4b"), None);
        assert_eq!(parse_owner("other"), None);
    }

    #[test]
    fn ids_are_unique_and_parse() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
        assert_eq!(
            parse_owner(&a).map(|(pid, _)| pid),
            Some(std::process::id())
        );
    }
}
