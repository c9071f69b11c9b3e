//! Small wrappers over the kernel interfaces the lab uses: mounts, netns files,
//! cgroup directories, sysctls, `ip -batch`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Where `ip netns add` puts the named network namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Where bpffs is (or gets) mounted; pin dirs live below it.
pub const BPFFS_DIR: &str = "/sys/fs/bpf";

/// One line of `/proc/self/mounts`: (mount point, file system type).
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some((
                PathBuf::from(unescape_mount_field(target)),
                fstype.to_owned(),
            ))
        })
        .collect())
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && oct.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = oct
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup2 hierarchy, found in `/proc/self/mounts`
/// (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(root) = ROOT.get() {
        return Ok(root.clone());
    }
    let root = mounts()?
        .into_iter()
        .find(|(_, fstype)| fstype == "cgroup2")
        .map(|(target, _)| target)
        .context("no cgroup2 file system is mounted (see /proc/self/mounts); the lab needs one")?;
    Ok(ROOT.get_or_init(|| root).clone())
}

/// This process's cgroup2 path relative to the hierarchy root (`0::<path>` in `/proc/self/cgroup`).
pub fn own_cgroup2_path() -> Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .context("no cgroup2 entry in /proc/self/cgroup")
}

fn bpffs_mounted() -> Result<bool> {
    Ok(mounts()?
        .iter()
        .any(|(target, fstype)| target == Path::new(BPFFS_DIR) && fstype == "bpf"))
}

/// Mounts bpffs on `/sys/fs/bpf` unless one is there already. The check and the
/// mount run under an exclusive `flock` on the directory so that two processes
/// starting at once do not stack two mounts. The mount is left in place.
pub fn ensure_bpffs() -> Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    if !bpffs_mounted()? {
        let _lock = lock_dir(Path::new(BPFFS_DIR))?;
        if !bpffs_mounted()? {
            let target = cstring(Path::new(BPFFS_DIR))?;
            // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
            let rc = unsafe {
                libc::mount(
                    c"bpffs".as_ptr(),
                    target.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    c"mode=0700".as_ptr().cast(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("mounting bpffs on /sys/fs/bpf");
            }
        }
    }
    let _ = DONE.set(());
    Ok(())
}

/// An exclusive `flock` on a directory, released on drop. Locking a directory
/// creates no file; it serialises one-time set-up between processes.
fn lock_dir(dir: &Path) -> Result<File> {
    let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("flock on {}", dir.display()));
    }
    Ok(file)
}

/// Creates named network namespaces (`ip netns add`). The very first one on a
/// machine also makes `/var/run/netns` a shared mount; that step is serialised
/// between processes so that two of them do not stack two mounts.
pub fn add_netns(names: &[String]) -> Result<()> {
    let lines: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
    let dir_is_mount = fs::canonicalize(NETNS_DIR)
        .ok()
        .is_some_and(|dir| mounts().is_ok_and(|m| m.iter().any(|(target, _)| *target == dir)));
    let _lock = if dir_is_mount {
        None
    } else {
        Some(lock_dir(
            Path::new(NETNS_DIR).parent().unwrap_or(Path::new("/")),
        )?)
    };
    ip_batch(None, &lines).context("creating the network namespaces")
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// Runs `ip [-n NETNS] -batch -` with the given lines; fails with `ip`'s message.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("running `ip` (iproute2 must be installed and on PATH)")?;
    let script = lines.join("\n") + "\n";
    {
        let mut stdin = child.stdin.take().context("ip: no stdin pipe")?;
        stdin
            .write_all(script.as_bytes())
            .context("writing the batch to ip")?;
    }
    let out = child.wait_with_output().context("waiting for ip")?;
    if !out.status.success() {
        bail!(
            "ip{} -batch failed ({}): {}\nbatch:\n{}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            script.trim_end()
        );
    }
    Ok(())
}

/// Runs `f` on a short-lived thread that has joined the network namespace at
/// `netns_path` (only that thread changes namespace; it ends afterwards).
pub fn in_netns<T, F>(netns_path: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let ns = File::open(netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
    thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a valid netns fd; it changes only this (scoped) thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", netns_path.display()));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread inside {} panicked", netns_path.display()))?
    })
}

/// Writes a sysctl (dotted name) of the calling thread's network namespace.
pub fn write_sysctl(name: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    fs::write(&path, value).with_context(|| format!("sysctl {name}={value} ({path})"))
}

/// Removes a named netns the way `ip netns del` does: detach the bind mount, unlink
/// the file. Returns whether there was anything to remove.
pub fn delete_netns(path: &Path) -> Result<bool> {
    let c = cstring(path)?;
    // SAFETY: valid NUL-terminated path; MNT_DETACH never blocks.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let umount_err = (rc != 0).then(io::Error::last_os_error);
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| {
            format!(
                "removing netns file {} (umount: {})",
                path.display(),
                umount_err.map_or_else(|| "ok".to_owned(), |e| e.to_string())
            )
        }),
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid_t, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // `/proc/<pid>/stat` is "pid (comm) S ..."; comm may hold spaces or parens.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_ascii_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        // Gone between the two checks, or /proc hidden: trust kill().
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// Sends a signal; "no such process" is not an error.
pub fn send_signal(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) has no memory arguments.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}

/// Reads the pids listed in a cgroup's `cgroup.procs`.
pub fn cgroup_pids(dir: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes a cgroup directory tree: kills everything in it (`cgroup.kill`, then
/// SIGKILL to the pids still listed), then `rmdir`s leaf-first, retrying while
/// a directory is busy. Refuses if this very process is inside the tree.
pub fn remove_cgroup_tree(dir: &Path, rel: &str) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(own) = own_cgroup2_path()
        && (own == rel || own.starts_with(&format!("{rel}/")))
    {
        bail!(
            "not removing cgroup {}: this process ({}) is inside it",
            dir.display(),
            std::process::id()
        );
    }
    // cgroup.kill (5.14+) kills the whole subtree at once; older kernels lack the file.
    if let Err(e) = fs::write(dir.join("cgroup.kill"), "1")
        && e.kind() != io::ErrorKind::NotFound
    {
        eprintln!("mesh-lab: cgroup.kill in {}: {e}", dir.display());
    }
    let mut dirs = Vec::new();
    collect_dirs_post_order(dir, &mut dirs)?;
    for d in dirs {
        rmdir_retry(&d)?;
    }
    Ok(())
}

fn collect_dirs_post_order(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs_post_order(&entry.path(), out)?;
        }
    }
    out.push(dir.to_owned());
    Ok(())
}

fn rmdir_retry(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let own = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let pids = cgroup_pids(dir);
                if Instant::now() >= deadline {
                    bail!("cgroup {} stays busy (pids {pids:?}): {e}", dir.display());
                }
                for pid in pids.into_iter().filter(|&p| p != own) {
                    let _ = send_signal(pid, libc::SIGKILL);
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// Removes a file or a directory tree; "not found" is not an error.
pub fn remove_path(path: &Path) -> Result<bool> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    let res = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Opens a file for writing only (no create, no truncate), as `cgroup.procs` needs.
pub fn open_write(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))
}

/// Names of the entries in a directory that start with `prefix` (empty if the
/// directory is missing).
pub fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_field_unescape() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
        assert_eq!(unescape_mount_field("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mount_field("/end\\04"), "/end\\04");
    }

    #[test]
    fn own_pid_is_alive_and_bogus_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
