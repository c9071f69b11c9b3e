//! Processes started inside lab pods and nodes, and their handles.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::sys;

/// How long [`LabChild::terminate`] and lab cleanup wait after SIGTERM before SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(5);

const POLL: Duration = Duration::from_millis(10);

/// Where a spawned process's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogMode {
    /// Both into one log file in the lab's scratch dir ([`LabChild::log_path`]);
    /// stdin is `/dev/null`. The default.
    #[default]
    File,
    /// Keep whatever stdio the caller set on the `Command` (inherited if none);
    /// the child then has no log file.
    Caller,
}

/// Where a child goes between `fork` and `exec`. The files are opened before
/// the fork; the child only uses their descriptors.
pub(crate) struct Placement {
    /// The netns file to `setns(CLONE_NEWNET)` into.
    pub netns: File,
    /// `cgroup.procs` of the cgroup to join first, if any.
    pub cgroup_procs: Option<File>,
    /// `PR_SET_PDEATHSIG` signal.
    pub death_signal: libc::c_int,
}

type SpawnJob = (Command, SyncSender<io::Result<Child>>);

/// All lab children are forked by one long-lived thread: `PR_SET_PDEATHSIG`
/// fires when the *thread* that forked a child exits, so forking from a test's
/// or a runtime's short-lived thread would kill the child too early.
fn spawner() -> &'static Sender<SpawnJob> {
    static SPAWNER: OnceLock<Sender<SpawnJob>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        // If the thread cannot start, every spawn reports it (the receiver is gone).
        let _ = thread::Builder::new()
            .name("mesh-lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        tx
    })
}

/// Spawns `cmd` placed in a cgroup and netns, in its own process group.
pub(crate) fn spawn_placed(mut cmd: Command, placement: Placement) -> Result<Child> {
    let parent = libc::pid_t::try_from(std::process::id()).context("pid out of range")?;
    let Placement {
        netns,
        cgroup_procs,
        death_signal,
    } = placement;
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (write, setns, prctl, getppid) on
    // descriptors opened before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &cgroup_procs {
                // Writing "0" moves the writing process. Join the cgroup before
                // the netns (datapath-spike pitfall 8).
                let n = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if n != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then no signal would come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    spawner()
        .send((cmd, reply_tx))
        .map_err(|_| anyhow!("the mesh-lab spawner thread is not running"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| anyhow!("the mesh-lab spawner thread did not answer"))??;
    Ok(child)
}

/// The part of a child the lab and the [`LabChild`] share.
pub(crate) struct ChildShared {
    pid: u32,
    label: String,
    child: Mutex<Child>,
}

impl ChildShared {
    pub(crate) fn new(child: Child, label: String) -> Self {
        Self {
            pid: child.id(),
            label,
            child: Mutex::new(child),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.lock().try_wait()
    }

    /// Signals the child's process group while the child is not yet reaped
    /// (so its pid, which is the group id, cannot have been reused).
    pub(crate) fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        let mut child = self.lock();
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid).map_err(io::Error::other)?;
        // Once only (a second SIGTERM may mean "force" to the child); the
        // child alone if it has left its group.
        // SAFETY: kill(2) has no memory arguments.
        if unsafe { libc::kill(-pid, sig) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
        sys::send_signal(pid, sig)
    }

    /// Polls until the child exits or `deadline` passes.
    pub(crate) fn wait_until(&self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and reap.
    pub(crate) fn terminate(&self, grace: Duration) -> io::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_until(Instant::now() + grace)? {
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&self) -> io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.lock().wait()
    }
}

/// A process running in a lab pod or node. Dropping it terminates the process
/// (SIGTERM to its process group, up to [`TERMINATE_GRACE`], then SIGKILL); lab
/// cleanup does the same for children still alive.
pub struct LabChild {
    shared: Arc<ChildShared>,
    log: Option<PathBuf>,
    /// Run before the log is read ([`LabChild::set_log_sync`]).
    log_sync: Option<LogSync>,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
}

impl std::fmt::Debug for LabChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabChild")
            .field("pid", &self.shared.pid)
            .field("label", &self.shared.label)
            .field("log", &self.log)
            .finish()
    }
}

/// What makes a child write out the log lines it holds back (see
/// [`LabChild::set_log_sync`]).
pub type LogSync = Box<dyn Fn() + Send + Sync>;

impl LabChild {
    pub(crate) fn new(shared: Arc<ChildShared>, pipes: Pipes, log: Option<PathBuf>) -> Self {
        Self {
            shared,
            log,
            log_sync: None,
            stdin: pipes.stdin,
            stdout: pipes.stdout,
            stderr: pipes.stderr,
        }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// What the child was started as: `<pod or node>/<program>`.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// The log file holding stdout and stderr ([`LogMode::File`]), if any.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Has [`LabChild::log_contents`] first call `sync`: for a program that
    /// holds some lines back (the agent batches its access-log lines on its
    /// proxy threads), `sync` asks it to write them out, so that a line
    /// logged before an effect the test has seen is in the log read after.
    /// Its failures (a child that has exited) are its own to ignore.
    pub fn set_log_sync(&mut self, sync: LogSync) {
        self.log_sync = Some(sync);
    }

    /// The whole log so far (lossy UTF-8), after the child has written out
    /// what it held back ([`LabChild::set_log_sync`]).
    pub fn log_contents(&self) -> Result<String> {
        let path = self.require_log()?;
        if let Some(sync) = &self.log_sync {
            sync();
        }
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn require_log(&self) -> Result<&Path> {
        self.log.as_deref().with_context(|| {
            format!(
                "{} has no log file: it was spawned with LogMode::Caller",
                self.shared.label
            )
        })
    }

    /// Polls the log until a line contains `needle` and returns that line.
    /// Fails at `timeout`, or as soon as the process has exited without
    /// printing it; the error shows the end of the log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let path = self.require_log()?;
        let deadline = Instant::now() + timeout;
        let mut scanned = 0u64;
        let mut pending = Vec::new();
        loop {
            // Check for exit first, then read: a line logged just before exit is still seen.
            let exited = self.try_wait()?;
            let mut file =
                File::open(path).with_context(|| format!("opening {}", path.display()))?;
            file.seek(SeekFrom::Start(scanned))?;
            let mut fresh = Vec::new();
            file.read_to_end(&mut fresh)
                .with_context(|| format!("reading {}", path.display()))?;
            scanned += fresh.len() as u64;
            pending.extend_from_slice(&fresh);
            if let Some(line) = take_matching_line(&mut pending, needle, exited.is_some()) {
                return Ok(line);
            }
            if let Some(status) = exited {
                bail!(
                    "{} exited ({status}) without logging {needle:?}; log tail:\n{}",
                    self.shared.label,
                    self.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log tail:\n{}",
                    self.shared.label,
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of the log (for error messages); empty without a log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_contents().unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The exit status if the process has exited (reaps it), without blocking.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.shared
            .try_wait()
            .with_context(|| format!("waiting for {}", self.shared.label))
    }

    /// Waits for the process to exit on its own, up to `timeout`; `None` if it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.shared
            .wait_until(Instant::now() + timeout)
            .with_context(|| format!("waiting for {}", self.shared.label))
    }

    /// Sends `sig` (for example `libc::SIGHUP`) to the process group.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        self.shared
            .signal(sig)
            .with_context(|| format!("sending signal {sig} to {}", self.shared.label))
    }

    /// SIGTERM, wait up to [`TERMINATE_GRACE`], then SIGKILL; returns how it ended.
    pub fn terminate(&self) -> Result<ExitStatus> {
        self.terminate_timeout(TERMINATE_GRACE)
    }

    /// Like [`LabChild::terminate`] with another grace period.
    pub fn terminate_timeout(&self, grace: Duration) -> Result<ExitStatus> {
        self.shared
            .terminate(grace)
            .with_context(|| format!("terminating {}", self.shared.label))
    }

    /// SIGKILL to the process group and reap.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.shared
            .kill()
            .with_context(|| format!("killing {}", self.shared.label))
    }

    /// The stdin pipe, if the caller asked for one ([`LogMode::Caller`] with `Stdio::piped()`).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// The stdout pipe, if the caller asked for one.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.stdout.take()
    }

    /// The stderr pipe, if the caller asked for one.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.stderr.take()
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        if let Err(e) = self.shared.terminate(TERMINATE_GRACE) {
            eprintln!("mesh-lab: terminating {}: {e}", self.shared.label);
        }
    }
}

/// The pipes taken out of a `std::process::Child` before it is shared.
#[derive(Default)]
pub(crate) struct Pipes {
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl Pipes {
    pub(crate) fn take_from(child: &mut Child) -> Self {
        Self {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
        }
    }
}

/// Finds the first complete line in `pending` containing `needle` (or the
/// unterminated last line when `final_read`); drops the lines scanned.
fn take_matching_line(pending: &mut Vec<u8>, needle: &str, final_read: bool) -> Option<String> {
    let complete = pending
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let scan_len = if final_read { pending.len() } else { complete };
    let found = pending[..scan_len]
        .split(|&b| b == b'\n')
        .map(String::from_utf8_lossy)
        .find(|line| line.contains(needle))
        .map(|line| line.trim_end_matches('\r').to_owned());
    pending.drain(..complete);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_line_waits_for_newline() {
        let mut buf = b"first\nlistening 1.2".to_vec();
        assert_eq!(take_matching_line(&mut buf, "listening", false), None);
        assert_eq!(buf, b"listening 1.2");
        buf.extend_from_slice(b".3.4:80\nmore\n");
        assert_eq!(
            take_matching_line(&mut buf, "listening", false).as_deref(),
            Some("listening 1.2.3.4:80")
        );
        assert!(buf.is_empty());
        let mut tail = b"no newline at exit".to_vec();
        assert_eq!(
            take_matching_line(&mut tail, "exit", true).as_deref(),
            Some("no newline at exit")
        );
    }
}
