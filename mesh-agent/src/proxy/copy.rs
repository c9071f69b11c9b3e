//! The byte relay: both directions at once, with half-close (a FIN on one side
//! becomes a FIN on the other) and reset propagation (an error on either side
//! resets both). Each direction reads through a [`Reader`]: no buffer while
//! idle, larger reads during bulk transfers.

use std::{io, time::Duration};

use bytes::BytesMut;

use tokio_util::sync::CancellationToken;

use tokio::net::TcpStream;

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// How a relayed connection ended.
#[derive(Debug)]
pub enum RelayOutcome {
    /// Both sides closed cleanly.
    Closed,
    /// One side failed (reset, timeout); both were reset.
    Reset(io::Error),
    /// The relay was cancelled (a policy change denies the connection);
    /// both sides were reset.
    Revoked,
}

/// Bytes moved and how it ended.
#[derive(Debug)]
pub struct RelayResult {
    /// Bytes from `client` to `server`.
    pub sent: u64,
    /// Bytes from `server` to `client`.
    pub received: u64,
    /// How it ended.
    pub outcome: RelayOutcome,
}

/// The read side of one relay direction, shared by the plaintext relay and
/// the HBONE relay (`hbone::relay_h2`). It takes a buffer only once its
/// socket is readable and gives it back when the socket is drained, so an
/// idle direction holds none; it reads into the buffer's spare capacity,
/// never zeroed first; and it doubles the buffer after full reads, up to
/// [`MAX_BUFFER`], so bulk transfers move large chunks with fewer wake-ups.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: BytesMut,
    cap: usize,
}

impl Reader {
    pub(crate) fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            cap: INITIAL_BUFFER,
        }
    }

    /// The next bytes `from` has, at least one; none at its FIN.
    ///
    /// It waits for readiness with `poll_read_ready`, whose waker lives in
    /// the socket's registration, not in the future: a connection task
    /// keeps no readiness future of its own (issue 13, memory per
    /// connection). Only this direction's reader may wait for `from`'s
    /// readability.
    pub(crate) async fn read(&mut self, from: &TcpStream) -> io::Result<BytesMut> {
        loop {
            if self.buf.capacity() > 0 {
                // A buffer is held: the socket had data last time; more may
                // be waiting. (Reclaims the buffer once its last chunk is
                // dropped.)
                self.buf.reserve(self.cap);
                match from.try_read_buf(&mut self.buf) {
                    Ok(n) => {
                        if n >= self.cap && self.cap < MAX_BUFFER {
                            self.cap *= 2;
                        }
                        return Ok(self.buf.split());
                    }
                    // Drained: hold no buffer while the direction is idle.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = BytesMut::new(),
                    Err(e) => return Err(e),
                }
            }
            std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
            self.buf.reserve(self.cap);
        }
    }
}

/// Writes all of `buf` to `to`, waiting for writability with
/// `poll_write_ready` (as [`Reader::read`] waits to read: no readiness
/// future kept). Only one writer may wait for `to`'s writability.
pub(crate) async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
        match to.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            // Not writable after all: readiness is cleared, wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes a FIN on to `to` (half-close), as a graceful close (normal
/// linger) from here on.
pub(crate) fn pass_fin(to: &TcpStream) -> io::Result<()> {
    restore_linger(to);
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)
}

/// Runs a relay's two directions until both are done (`Closed`), either
/// fails (`Reset`) or `cancel` fires (`Revoked`). The caller keeps them
/// pinned where they are, so they are not moved into this future too.
pub(crate) async fn both_directions(
    mut up: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
    mut down: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
    cancel: &CancellationToken,
) -> RelayOutcome {
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let r = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r }
            r = &mut down, if !down_done => { down_done = true; r }
            _ = cancel.cancelled() => return RelayOutcome::Revoked,
        };
        if let Err(e) = r {
            return RelayOutcome::Reset(e);
        }
        if up_done && down_done {
            return RelayOutcome::Closed;
        }
    }
}

async fn pump(from: &TcpStream, to: &TcpStream, moved: &mut u64) -> io::Result<()> {
    let mut reader = Reader::new();
    loop {
        let chunk = reader.read(from).await?;
        if chunk.is_empty() {
            return pass_fin(to);
        }
        write_all(to, &chunk).await?;
        *moved += chunk.len() as u64;
    }
}

/// Relays between `client` and `server` until both directions are closed, or
/// resets both when either fails.
///
/// While the relay runs, a close of either socket is an abort: if the agent
/// dies, the kernel closes them with an RST, so neither app takes a cut
/// stream for a complete one. So both must have zero linger already:
/// `client` is a connection accepted on a pod's outbound or plaintext
/// listener, which inherited it (and `TCP_NODELAY`) from the listener
/// (`pods::proxy_seam::open_set`); `server` is one the agent made
/// (`TCP_NODELAY` from `datapath::netns`), given it by the caller with
/// `abort_on_close` when the agent's use of it began. Each side gets
/// normal linger back when the relay passes a FIN to it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in the connection's task"
)]
pub fn relay(
    client: TcpStream,
    server: TcpStream,
    cancel: &CancellationToken,
) -> impl Future<Output = RelayResult> + '_ {
    async move {
        // Not split: each direction reads one socket and writes the other
        // through shared references, waiting on the sockets' own readiness.
        let (mut sent, mut received) = (0u64, 0u64);
        let outcome = {
            let up = pump(&client, &server, &mut sent);
            let down = pump(&server, &client, &mut received);
            tokio::pin!(up, down);
            both_directions(up, down, cancel).await
        };
        if !matches!(outcome, RelayOutcome::Closed) {
            // Reset both sides: linger 0 turns the close (when they are dropped
            // below) into an RST.
            abort_on_close(&client);
            abort_on_close(&server);
        }
        RelayResult {
            sent,
            received,
            outcome,
        }
    }
}

/// Zero linger: closing the socket (the agent exiting or dying included)
/// sends an RST, not a FIN.
pub(crate) fn abort_on_close(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set zero linger on a relayed socket");
    }
}

/// Normal linger: closing the socket is a graceful close (FIN).
pub(crate) fn restore_linger(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(None) {
        tracing::debug!(error = %e, "cannot restore linger on a relayed socket");
    }
}
