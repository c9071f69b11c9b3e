//! The byte relay: both directions at once, with half-close (a FIN on one side
//! becomes a FIN on the other) and reset propagation (an error on either side
//! resets both). Each direction reads through a [`Reader`]: no buffer while
//! idle, larger reads during bulk transfers; a plaintext direction's bulk
//! transfer moves by `splice(2)` (`super::splice`).

use std::{io, time::Duration};

use bytes::BytesMut;

use tokio_util::sync::CancellationToken;

use tokio::net::TcpStream;

use super::splice::{Lease, Spliced};
use crate::telemetry::{ConnectionTracker, ProxyEvent};

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
    /// How its directions moved their bulk transfers.
    pub splicing: Splicing,
}

/// How a plaintext relay's directions moved their bulk transfers (none
/// for a tunnel relay, whose bytes go through TLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Splicing {
    /// Directions that moved by `splice(2)`, through a pipe.
    pub spliced: u8,
    /// Bulk directions that could not get a pipe and kept copying.
    pub without_pipe: u8,
}

impl Splicing {
    /// Counts them in `/stats` (`relay_directions_spliced`,
    /// `relay_directions_without_pipe`) as `tracker`'s connection's.
    pub(crate) fn count(self, tracker: &ConnectionTracker) {
        for _ in 0..self.spliced {
            tracker.count(ProxyEvent::RelaySpliced);
        }
        for _ in 0..self.without_pipe {
            tracker.count(ProxyEvent::RelayWithoutPipe);
        }
    }

    fn of(directions: [&Moved; 2]) -> Self {
        let count = |f: fn(&Moved) -> bool| directions.iter().filter(|d| f(d)).count() as u8;
        Self {
            spliced: count(|d| d.spliced),
            without_pipe: count(|d| d.without_pipe),
        }
    }
}

/// Whether a plaintext relay's bulk transfers move by `splice(2)`
/// (`--relay-splice`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splice {
    /// A direction's bulk transfer moves socket to pipe to socket, while
    /// the agent's pipes are under their bound (`limits::Bounds::max_pipes`).
    Bulk,
    /// Every byte is copied through the agent.
    Never,
}

impl Splice {
    /// The agent's setting, as `shared` has it now.
    pub(crate) fn from_setting(shared: &super::Shared) -> Self {
        if shared
            .relay_splice
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            Self::Bulk
        } else {
            Self::Never
        }
    }
}

/// What one direction moved, and how.
#[derive(Debug, Default)]
struct Moved {
    bytes: u64,
    spliced: bool,
    without_pipe: bool,
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

async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    moved: &mut Moved,
    splice: Splice,
) -> io::Result<()> {
    let mut reader = Reader::new();
    // After a full read (a bulk transfer), the direction moves by splice(2),
    // without copying through the agent, unless it cannot get a pipe.
    let (mut bulk, mut may_splice) = (false, splice == Splice::Bulk);
    loop {
        if bulk && may_splice {
            match Lease::take() {
                Ok(lease) => {
                    moved.spliced = true;
                    // Boxed: only bulk directions pay for its state, not
                    // every connection's task (issue 13, memory).
                    let spliced = super::splice::pump(from, to, lease, &mut moved.bytes);
                    match Box::pin(spliced).await? {
                        Spliced::Fin => return Ok(()),
                        Spliced::Drained => {
                            std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
                            continue;
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "no pipe for a bulk relay direction; it keeps copying");
                    moved.without_pipe = true;
                    may_splice = false;
                }
            }
        }
        let chunk = reader.read(from).await?;
        if chunk.is_empty() {
            return pass_fin(to);
        }
        write_all(to, &chunk).await?;
        moved.bytes += chunk.len() as u64;
        if !bulk && chunk.len() >= INITIAL_BUFFER {
            bulk = true;
            if may_splice {
                // Its buffer is not needed while the direction splices.
                reader = Reader::new();
            }
        }
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
    splice: Splice,
) -> impl Future<Output = RelayResult> + '_ {
    async move {
        // Not split: each direction reads one socket and writes the other
        // through shared references, waiting on the sockets' own readiness.
        let (mut sent, mut received) = (Moved::default(), Moved::default());
        let outcome = {
            let up = pump(&client, &server, &mut sent, splice);
            let down = pump(&server, &client, &mut received, splice);
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
            sent: sent.bytes,
            received: received.bytes,
            outcome,
            splicing: Splicing::of([&sent, &received]),
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

#[cfg(test)]
pub(crate) mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::proxy::splice::tests::{MAX_PIPES, spare_pipes};

    /// `len` bytes of a pattern that repeats only every 251 bytes, so a
    /// lost, repeated or reordered chunk shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i % 251) as u8).wrapping_add(seed))
            .collect()
    }

    /// A loopback TCP connection: (the app's end, the agent's end).
    pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = TcpStream::connect(addr).await.expect("connect");
        let (agent, _) = listener.accept().await.expect("accept");
        (app, agent)
    }

    /// Two loopback connections: (the client's end, the relay's client
    /// side) and (the relay's server side, the server's end).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let (client_end, client_side) = tcp_pair().await;
        let (server_end, server_side) = tcp_pair().await;
        ((client_end, client_side), (server_side, server_end))
    }

    /// Sends `up` bytes from the client's end and `down` bytes from the
    /// server's end at the same time, each followed by its FIN; each end
    /// reads the other's bytes to their FIN and checks every byte.
    async fn transfer(up: usize, down: usize, splice: Splice) -> RelayResult {
        let ((client_end, client_side), (server_side, server_end)) = pairs().await;
        let cancel = CancellationToken::new();
        let (result, (), ()) = tokio::join!(
            relay(client_side, server_side, &cancel, splice),
            exchange(client_end, (up, 1), (down, 2)),
            exchange(server_end, (down, 2), (up, 1)),
        );
        result
    }

    /// Writes `send`'s pattern and a FIN while reading to the peer's FIN,
    /// which must bring `expect`'s pattern.
    async fn exchange(end: TcpStream, send: (usize, u8), expect: (usize, u8)) {
        let (mut read, mut write) = end.into_split();
        let writing = async move {
            write
                .write_all(&pattern(send.0, send.1))
                .await
                .expect("send");
            write.shutdown().await.expect("FIN");
        };
        let reading = async move {
            let mut got = Vec::new();
            read.read_to_end(&mut got).await.expect("read");
            assert!(
                got == pattern(expect.0, expect.1),
                "bytes differ ({} received)",
                got.len()
            );
        };
        tokio::join!(writing, reading);
    }

    /// A bulk transfer each way moves by splice(2) after its first full
    /// read, with every byte in order and each FIN passed on after the
    /// bytes before it; the pipes are this thread's spares afterwards, so
    /// they were made, used and left empty.
    #[tokio::test]
    async fn a_bulk_relay_moves_by_splice_and_keeps_every_byte() {
        assert_eq!(spare_pipes(), 0);
        let result = transfer(24 << 20, 9 << 20, Splice::Bulk).await;
        assert!(matches!(result.outcome, RelayOutcome::Closed), "{result:?}");
        assert_eq!((result.sent, result.received), (24 << 20, 9 << 20));
        let both = Splicing {
            spliced: 2,
            without_pipe: 0,
        };
        assert_eq!(result.splicing, both);
        // One pipe per direction at most; fewer when a drained direction
        // gave its pipe back before the other took one.
        let made = spare_pipes();
        assert!((1..=2).contains(&made), "{made} pipes");
        // The next bulk relay on this thread takes the spares.
        let result = transfer(1 << 20, 1 << 20, Splice::Bulk).await;
        assert!(matches!(result.outcome, RelayOutcome::Closed), "{result:?}");
        assert!(
            (made..=2).contains(&spare_pipes()),
            "{} pipes",
            spare_pipes()
        );
    }

    /// Small exchanges never fill a read: no pipe is made for them.
    #[tokio::test]
    async fn a_short_exchange_makes_no_pipe() {
        let result = transfer(64, 200, Splice::Bulk).await;
        assert!(matches!(result.outcome, RelayOutcome::Closed), "{result:?}");
        assert_eq!((result.sent, result.received), (64, 200));
        assert_eq!(result.splicing, Splicing::default());
        assert_eq!(spare_pipes(), 0);
    }

    /// Without pipes (the agent's bound on them reached) a bulk relay
    /// keeps copying, and still loses nothing.
    #[tokio::test]
    async fn without_pipes_a_bulk_relay_keeps_copying() {
        MAX_PIPES.set(Some(0));
        let result = transfer(8 << 20, 3 << 20, Splice::Bulk).await;
        MAX_PIPES.set(None);
        assert!(matches!(result.outcome, RelayOutcome::Closed), "{result:?}");
        assert_eq!((result.sent, result.received), (8 << 20, 3 << 20));
        let neither = Splicing {
            spliced: 0,
            without_pipe: 2,
        };
        assert_eq!(result.splicing, neither);
        assert_eq!(spare_pipes(), 0);
    }

    /// With splicing off (`--relay-splice=false`) a bulk relay copies
    /// every byte, and makes no pipe.
    #[tokio::test]
    async fn with_splicing_off_a_bulk_relay_copies() {
        let result = transfer(8 << 20, 3 << 20, Splice::Never).await;
        assert!(matches!(result.outcome, RelayOutcome::Closed), "{result:?}");
        assert_eq!((result.sent, result.received), (8 << 20, 3 << 20));
        assert_eq!(result.splicing, Splicing::default());
        assert_eq!(spare_pipes(), 0);
    }

    /// A reset of the server's end in the middle of a spliced transfer
    /// resets the relay and the client's end.
    #[tokio::test]
    async fn a_reset_during_a_spliced_transfer_resets_the_client() {
        let ((mut client_end, client_side), (server_side, mut server_end)) = pairs().await;
        let cancel = CancellationToken::new();
        let client = async move {
            let chunk = pattern(1 << 20, 1);
            // Sends until the relay's reset reaches it.
            for _ in 0..1024 {
                if client_end.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            panic!("the client's end was never reset");
        };
        let server = async move {
            let mut buf = vec![0; 1 << 20];
            let mut got = 0;
            while got < 4 << 20 {
                got += server_end.read(&mut buf).await.expect("bytes");
            }
            socket2::SockRef::from(&server_end)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
            drop(server_end);
        };
        let (result, (), ()) = tokio::join!(
            relay(client_side, server_side, &cancel, Splice::Bulk),
            client,
            server
        );
        assert!(
            matches!(result.outcome, RelayOutcome::Reset(_)),
            "{result:?}"
        );
        assert!(result.sent >= 4 << 20, "{result:?}");
    }
}
