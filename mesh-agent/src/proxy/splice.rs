//! Bulk plaintext relay directions move their bytes with `splice(2)`
//! through a pipe, socket to pipe to socket, instead of reading them into
//! the agent and writing them out again (issue 13: "plaintext relays via
//! `splice(2)`"). The kernel passes the received pages on by reference, so
//! neither copy between the kernel and the agent is made.
//!
//! [`super::copy`]'s relay switches a direction here after a full read (a
//! bulk transfer); request/response traffic never fills a read and keeps
//! copying, so a short connection makes no pipe. A direction that cannot
//! get a pipe keeps copying: the agent's pipes are bounded
//! (`limits::Bounds::max_pipes`, an eighth of the descriptors kept out of
//! the connection budget), and the process may be out of descriptors.
//!
//! A direction holds a pipe only while its socket has bytes: drained, it
//! gives the pipe back, as the copying reader gives back its buffer. Each
//! proxy thread keeps up to [`SPARE_PIPES`] empty pipes for the next; a
//! pipe that still holds bytes when its direction ends (a reset, a revoked
//! connection) is closed with them, never reused.

use std::{
    cell::RefCell,
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicUsize, Ordering},
};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::{io::Interest, net::TcpStream};

/// A pipe's capacity: what one `splice` moves at most, and what a busy
/// direction may hold between its sockets (pages the receiving socket held
/// before). 1 MiB, the kernel's default `pipe-max-size`: measured on one
/// same-node stream, 256 KiB (the copying relay's largest read) took a
/// quarter more CPU per GB, and 64 KiB (a pipe's default) more again.
const PIPE_SIZE: usize = 1024 * 1024;

/// Empty pipes a thread keeps for its next bulk directions (two file
/// descriptors each).
const SPARE_PIPES: usize = 16;

/// `SPLICE_F_MOVE` asks to move pages rather than copy them;
/// `SPLICE_F_NONBLOCK` keeps the pipe side from blocking (the sockets are
/// non-blocking already).
const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

thread_local! {
    static SPARE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Pipes open in the process, in use or spare.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// How many pipes may be open at once ([`bound_pipes`]; until then, what
/// `limits::Bounds::max_pipes` gives for 16 384 descriptors or more).
static MAX_PIPES: AtomicUsize = AtomicUsize::new(256);

/// Sets how many pipes the process may hold open at once
/// (`limits::Bounds::max_pipes`).
pub(crate) fn bound_pipes(max: usize) {
    MAX_PIPES.store(max, Ordering::Relaxed);
}

fn max_pipes() -> usize {
    #[cfg(test)]
    if let Some(max) = tests::MAX_PIPES.get() {
        return max;
    }
    MAX_PIPES.load(Ordering::Relaxed)
}

/// Why a direction has no pipe (it keeps copying).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoPipe {
    /// The agent holds as many pipes as its bound allows.
    #[error("the agent holds its {0} pipes already; raise the file-descriptor limit for more")]
    Bound(usize),
    /// The kernel refused one.
    #[error("cannot make a pipe: {0}; is the process out of file descriptors?")]
    Os(#[from] io::Error),
}

/// A pipe's two ends and its capacity.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A new pipe, if fewer than [`max_pipes`] are open.
    fn new() -> Result<Self, NoPipe> {
        let max = max_pipes();
        if OPEN.fetch_add(1, Ordering::Relaxed) >= max {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return Err(NoPipe::Bound(max));
        }
        Self::open().inspect_err(|_| {
            OPEN.fetch_sub(1, Ordering::Relaxed);
        })
    }

    fn open() -> Result<Self, NoPipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(io::Error::from)?;
        // The default is 64 KiB; a larger pipe moves a bulk transfer in
        // fewer calls. Refused the larger size (`pipe-max-size` lowered, a
        // limit on pipe pages), the pipe works at the size it has.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .map_err(io::Error::from)?;
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pipe in use by one direction, and how many bytes it holds. Dropped
/// empty, its pipe goes back to the thread's spares (up to
/// [`SPARE_PIPES`]).
#[derive(Debug)]
pub(crate) struct Lease {
    pipe: Option<Pipe>,
    held: usize,
}

impl Lease {
    /// An empty pipe: one of this thread's spares, or a new one if the
    /// process holds fewer than its bound.
    pub(crate) fn take() -> Result<Self, NoPipe> {
        let pipe = match SPARE.with(|s| s.borrow_mut().pop()) {
            Some(pipe) => pipe,
            None => Pipe::new()?,
        };
        Ok(Self {
            pipe: Some(pipe),
            held: 0,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.held > 0 {
            return; // bytes of a direction that failed: closed with them
        }
        if let Some(pipe) = self.pipe.take() {
            SPARE.with(|s| {
                let mut spare = s.borrow_mut();
                if spare.len() < SPARE_PIPES {
                    spare.push(pipe);
                }
            });
        }
    }
}

/// Where a spliced stretch of a direction ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Spliced {
    /// `from` has no bytes for now; the pipe is empty and back with the
    /// thread's spares, so an idle direction holds none.
    Drained,
    /// `from`'s FIN, passed on to `to`.
    Fin,
}

/// Moves `from`'s bytes to `to` through `lease`'s pipe until `from` is
/// drained or sends its FIN (passed on); counts each byte in `moved` once
/// `to` has it. The same contract as the copying direction: only this
/// direction reads `from` and writes `to`.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    mut lease: Lease,
    moved: &mut u64,
) -> io::Result<Spliced> {
    let Lease { pipe, held } = &mut lease;
    let Some(pipe) = pipe else {
        return Err(io::ErrorKind::BrokenPipe.into());
    };
    loop {
        // The pipe is empty here, so a `WouldBlock` is the socket's: it has
        // no bytes (and `try_io` clears its readiness).
        let n = match from.try_io(Interest::READABLE, || {
            Ok(rustix::pipe::splice(
                from,
                None,
                &pipe.write,
                None,
                pipe.capacity,
                FLAGS,
            )?)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Spliced::Drained),
            Err(e) => return Err(e),
        };
        if n == 0 {
            super::copy::pass_fin(to)?;
            return Ok(Spliced::Fin);
        }
        *held = n;
        // The pipe holds bytes here, so a `WouldBlock` is the socket's: it
        // has no room.
        while *held > 0 {
            match to.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &pipe.read, None, to, None, *held, FLAGS,
                )?)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    *held -= k;
                    *moved += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// Set by a test: this thread's bound on pipes, in place of the
        /// process's (which other tests share).
        pub(crate) static MAX_PIPES: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// How many empty pipes this thread keeps.
    pub(crate) fn spare_pipes() -> usize {
        super::SPARE.with(|s| s.borrow().len())
    }

    /// A pipe given back empty is kept for the next direction (up to
    /// `SPARE_PIPES`); one given back holding bytes (its direction failed)
    /// is closed, so no direction ever starts with another's bytes.
    #[test]
    fn only_empty_pipes_are_kept() {
        // No new pipe beyond the bound.
        MAX_PIPES.set(Some(0));
        assert!(matches!(super::Lease::take(), Err(super::NoPipe::Bound(0))));
        MAX_PIPES.set(None);
        let leases: Vec<_> = (0..super::SPARE_PIPES + 2)
            .map(|_| super::Lease::take().expect("pipe"))
            .collect();
        assert_eq!(spare_pipes(), 0);
        drop(leases);
        assert_eq!(spare_pipes(), super::SPARE_PIPES);
        let mut lease = super::Lease::take().expect("pipe");
        assert_eq!(spare_pipes(), super::SPARE_PIPES - 1);
        lease.held = 1;
        drop(lease);
        assert_eq!(spare_pipes(), super::SPARE_PIPES - 1);
    }
}
