//! Bulk plaintext relay directions move their bytes with `splice(2)`
//! through a pipe, socket to pipe to socket, instead of reading them into
//! the agent and writing them out again (issue 13: "plaintext relays via
//! `splice(2)`"). The kernel passes the received pages on by reference, so
//! neither copy between the kernel and the agent is made.
//!
//! [`super::copy`]'s relay switches a direction here after a full read (a
//! bulk transfer); request/response traffic never fills a read and keeps
//! copying, so a short connection makes no pipe. A direction that cannot
//! get a pipe (the process out of file descriptors) keeps copying.
//!
//! A direction holds a pipe only while its socket has bytes: drained, it
//! gives the pipe back, as the copying reader gives back its buffer. Each
//! proxy thread keeps up to [`SPARE_PIPES`] empty pipes for the next; a
//! pipe that still holds bytes when its direction ends (a reset, a revoked
//! connection) is closed with them, never reused.

use std::{cell::RefCell, io, os::fd::OwnedFd};

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

/// A pipe's two ends and its capacity.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        #[cfg(test)]
        if tests::NO_PIPES.get() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // The default is 64 KiB; a larger pipe moves a bulk transfer in
        // fewer calls. Refused the larger size (`pipe-max-size` lowered, a
        // limit on pipe pages), the pipe works at the size it has.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
        Ok(Self {
            read,
            write,
            capacity,
        })
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
    /// An empty pipe: one of this thread's spares, or a new one.
    pub(crate) fn take() -> io::Result<Self> {
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
        /// Set by a test: this thread cannot make pipes (as when the
        /// process is out of file descriptors).
        pub(crate) static NO_PIPES: Cell<bool> = const { Cell::new(false) };
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
