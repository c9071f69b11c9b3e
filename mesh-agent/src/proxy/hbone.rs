//! HBONE, Istio ambient's tunnel: HTTP/2 `CONNECT` to `dst_ip:port` over
//! mutual TLS (TLS 1.3, ALPN `h2`, no SNI) to the destination pod's IP on
//! port 15008, under the source workload's SPIFFE identity.
//!
//! - [`Pool`]: client HTTP/2 connections keyed by (source identity,
//!   destination identity, destination address, source IP), many streams per
//!   connection up to a limit, spread by load over up to one connection per
//!   worker thread of a multi-thread runtime (each connection is driven by
//!   one task: bulk streams on two connections use two cores; the agent's
//!   proxy threads are current-thread runtimes with a pool each, so there a
//!   pool keeps one connection per key), one connection attempt per key at a
//!   time (no storm when many streams start at once), broken connections
//!   replaced without failing the request, idle ones released, PING
//!   keep-alive.
//! - [`server_handshake`]: the server side's HTTP/2 handshake, for one TLS
//!   connection of the in-pod HBONE listener (`proxy::inbound_hbone`
//!   answers each CONNECT as Istio does).
//! - [`relay_h2`]: bytes between a TCP stream and an HTTP/2 stream, with
//!   flow control, half-close and reset propagation.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes};
use h2::{Ping, Reason, RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    copy::{RelayOutcome, RelayResult},
    limits::{Bounds, WindowLease},
};
use crate::{
    identity::{MeshTls, SpiffeId, describe_tls_error, server_name},
    telemetry::{ProxyCounters, ProxyEvent},
};

/// HTTP/2 stream window (Istio's): 4 MiB.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window (Istio's): 16 MiB.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 max frame size (Istio's): 1 MiB.
pub const MAX_FRAME: u32 = 1 << 20;
/// The largest header block (decoded) a tunnel peer may send: 64 KiB, just
/// above Envoy's default of 60 KiB. A `CONNECT` with Istio's headers takes
/// well under 1 KiB; h2's default would let a peer make the agent decode
/// and hold 16 MiB per stream. A larger request is answered 431, and the
/// connection goes on.
pub const MAX_HEADER_LIST: u32 = 64 << 10;
/// Plaintext a tunnel's TLS connection takes ahead of its socket (rustls's
/// default is 64 KiB): two of the largest chunks a relay reads
/// (`copy::Reader`), so HTTP/2 hands a whole DATA frame to rustls in one
/// write while the previous one is still in the socket. With 64 KiB the
/// sender stalled each time the socket filled, and the tunnel sat idle
/// between writes: one stream cross node moved ~6 Gb/s instead of ~8 in
/// `cargo xtask bench`. It is held only while the socket is backed up, and
/// bounds what one tunnel connection buffers.
pub const TLS_SEND_BUFFER: usize = 512 * 1024;

/// Sizes the send buffer of a tunnel's TLS connection (client or server
/// side), before its HTTP/2 handshake: [`TLS_SEND_BUFFER`].
pub fn size_tls_buffer<Data>(tls: &mut rustls::ConnectionCommon<Data>) {
    tls.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// Streams one pooled connection carries at most (or the peer's lower limit).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// How often an idle-looking tunnel connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is closed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts [`Pool::send`] makes to open a stream (the first and the retries).
pub const SEND_ATTEMPTS: usize = 4;
/// How long a connection without streams stays pooled.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams every pooled connection of a key must carry before the pool
/// opens another one for the key (up to [`Pool::spread`] connections): a
/// few streams share a connection (no TLS handshake per short connection,
/// and sequential connections stay on one), more are spread so that their
/// encryption and framing run on several cores.
pub const SPREAD_AT_STREAMS: usize = 4;
/// The most connections per key the pool spreads streams over (the worker
/// threads of the runtime, at most this).
pub const MAX_SPREAD: usize = 8;
/// How long a key gets no extra connection after one failed (the peer may
/// hold us to fewer connections, e.g. its per-peer connection limit): its
/// streams stay on the connections it has, and no dial is repeated per stream.
pub const SPREAD_BACKOFF: Duration = Duration::from_secs(30);

/// HBONE failures, each saying what happened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// TCP connect to the peer's port 15008 failed.
    #[error("cannot reach the peer's HBONE port {addr}: {source}{}", connect_hint(.source))]
    Connect {
        /// The peer address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The TLS handshake failed (identity, root, expiry...).
    #[error("mTLS handshake with {addr} failed: {reason}")]
    Tls {
        /// The peer address.
        addr: SocketAddr,
        /// Why, in words.
        reason: String,
    },
    /// HTTP/2 failed on the tunnel connection.
    #[error("HTTP/2 error on the tunnel to {addr}: {source}")]
    H2 {
        /// The peer address.
        addr: SocketAddr,
        /// The error.
        source: h2::Error,
    },
    /// The peer answered the CONNECT with an error status.
    #[error("the peer refused the tunnel to {target}: HTTP {status}{}", status_hint(*.status))]
    Status {
        /// The CONNECT target.
        target: SocketAddr,
        /// The status.
        status: StatusCode,
    },
}

/// What an operator should check when the peer's port 15008 cannot be
/// reached: refused or silent usually means something between the nodes
/// filters it.
fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::TimedOut
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => {
            " (is the peer's mesh agent running, and is a NetworkPolicy or firewall blocking port 15008?)"
        }
        _ => "",
    }
}

/// What a refusal status from the peer's agent means.
fn status_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => {
            " (an AuthorizationPolicy or STRICT PeerAuthentication on the destination denies this source; see the destination agent's access log)"
        }
        StatusCode::BAD_REQUEST => {
            " (the destination is not that pod, or is one of its agent's own ports)"
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            " (the app is not listening on that port, or the destination agent is at a connection limit)"
        }
        _ => "",
    }
}

/// What identifies a reusable tunnel connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Who we are (the certificate presented).
    pub source: SpiffeId,
    /// Who the peer must be.
    pub destination: SpiffeId,
    /// The peer's HBONE address (`pod_ip:15008`).
    pub address: SocketAddr,
    /// The source pod's IP (the connection leaves from its netns).
    pub source_ip: IpAddr,
}

struct PooledConn {
    id: u64,
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    limit: usize,
    dead: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
    /// Dialled to spread streams while the key had another connection.
    extra: bool,
}

impl PooledConn {
    fn try_reserve(self: &Arc<Self>) -> Option<StreamGuard> {
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        let mut current = self.active.load(Ordering::Acquire);
        loop {
            if current >= self.limit {
                return None;
            }
            match self.active.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(StreamGuard { conn: self.clone() }),
                Err(now) => current = now,
            }
        }
    }
}

/// A stream slot found on a pooled connection.
struct Picked {
    conn: Arc<PooledConn>,
    guard: StreamGuard,
    /// Whether the key wants another connection (all are loaded).
    grow: bool,
}

impl Picked {
    fn into_parts(self) -> (Arc<PooledConn>, StreamGuard) {
        (self.conn, self.guard)
    }
}

/// Holds a stream slot on a pooled connection until dropped.
pub struct StreamGuard {
    conn: Arc<PooledConn>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
    }
}

/// The client-side pool of tunnel connections. It reports the connections
/// it establishes and the stream attempts it retries to the proxy's
/// counters (also the evidence, in tests, that connections are reused);
/// its occupancy is read at scrape time ([`Pool::occupancy`]).
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Keys whose extra connection failed, and until when they get none.
    spread_held: Mutex<HashMap<PoolKey, Instant>>,
    next_id: AtomicU64,
    counters: Arc<ProxyCounters>,
}

/// A freshly established tunnel connection ([`client_handshake`]).
pub struct Established {
    /// The request handle.
    sender: SendRequest<Bytes>,
    /// The future that drives the connection (the pool spawns it).
    connection: h2::client::Connection<Box<dyn IoStream>, Bytes>,
    /// The window the connection grants its peer, held until its driver ends.
    lease: WindowLease,
}

/// The byte stream under a tunnel connection (TLS over TCP).
pub trait IoStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> IoStream for T {}

impl Pool {
    /// An empty pool counting into `counters`.
    pub fn new(counters: Arc<ProxyCounters>) -> Self {
        Self {
            counters,
            ..Self::default()
        }
    }

    /// The counters the pool reports to.
    pub fn counters(&self) -> &ProxyCounters {
        &self.counters
    }

    /// Live connections and the streams they carry, for metrics and config dumps.
    pub fn occupancy(&self) -> (usize, usize) {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let live = conns
            .values()
            .flatten()
            .filter(|c| !c.dead.load(Ordering::Acquire));
        live.fold((0, 0), |(c, s), conn| {
            (c + 1, s + conn.active.load(Ordering::Acquire))
        })
    }

    /// How many connections per key streams are spread over: one per
    /// worker thread of the runtime the pool runs on (at most
    /// [`MAX_SPREAD`]; 1 on a current-thread runtime).
    pub fn spread(&self) -> usize {
        tokio::runtime::Handle::try_current()
            .map_or(1, |h| h.metrics().num_workers())
            .clamp(1, MAX_SPREAD)
    }

    /// The connection window a new tunnel connection for `key` asks for:
    /// Istio's [`CONNECTION_WINDOW`] for the key's first (most keys never
    /// have another, and one connection must not be throttled for a spread
    /// it does not use); an extra one, dialled to spread the key's streams
    /// over the workers, asks for [`connection_window`] of the spread.
    pub fn window_for(&self, key: &PoolKey) -> u32 {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let live = conns
            .get(key)
            .is_some_and(|list| list.iter().any(|c| !c.dead.load(Ordering::Acquire)));
        if live {
            connection_window(self.spread())
        } else {
            CONNECTION_WINDOW
        }
    }

    /// A stream slot on the least-loaded live connection for `key`, and
    /// whether another connection is wanted: all of the key's connections
    /// carry at least [`SPREAD_AT_STREAMS`] streams and there are fewer
    /// than `spread`.
    fn pick(&self, key: &PoolKey, spread: usize) -> Option<Picked> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.dead.load(Ordering::Acquire));
        let mut by_load: Vec<(usize, &Arc<PooledConn>)> = list
            .iter()
            .map(|c| (c.active.load(Ordering::Acquire), c))
            .collect();
        by_load.sort_by_key(|(load, _)| *load);
        let live = by_load.len();
        by_load.into_iter().find_map(|(load, c)| {
            c.try_reserve().map(|guard| Picked {
                conn: c.clone(),
                guard,
                grow: live < spread && load >= SPREAD_AT_STREAMS,
            })
        })
    }

    /// Opens a CONNECT stream for `request` on a pooled connection for `key`,
    /// establishing one with `connect` when none has room. A stream that
    /// failed before it was answered — the connection was found broken or
    /// going away (GOAWAY: the peer is stopping, e.g. upgrading), or the
    /// stream was refused (`REFUSED_STREAM`) — is retried, on another or a
    /// new connection, up to [`SEND_ATTEMPTS`] times in all; unless it
    /// carried early data that the failure leaves in doubt (see
    /// [`Pool::send_early`]).
    pub async fn send<F, Fut>(
        &self,
        key: &PoolKey,
        request: Request<()>,
        connect: F,
    ) -> Result<(Response<RecvStream>, SendStream<Bytes>, StreamGuard), HboneError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Established, HboneError>>,
    {
        self.send_early(key, request, None, connect).await
    }

    /// [`Pool::send`], with the client's first bytes sent on the stream
    /// before the peer answers (see [`EarlyData`]): `early` is the client's
    /// socket and what was read from it so far, kept for the next stream if
    /// this one is retried or fails.
    ///
    /// A stream that failed after carrying the bytes is retried only when
    /// the failure proves the peer never processed it (`REFUSED_STREAM`, or
    /// a graceful GOAWAY below it): after any other failure (the connection
    /// broke, the peer reset the stream otherwise) the peer may already
    /// have delivered them to the app, and sending them again would run the
    /// client's request twice. Such a failure is returned as it is, with
    /// [`EarlyData::in_doubt`] set, and counted
    /// `tunnel_streams_failed_after_early_data`.
    pub async fn send_early<F, Fut>(
        &self,
        key: &PoolKey,
        request: Request<()>,
        mut early: Option<(&TcpStream, &mut EarlyData)>,
        connect: F,
    ) -> Result<(Response<RecvStream>, SendStream<Bytes>, StreamGuard), HboneError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Established, HboneError>>,
    {
        let mut last_error = None;
        for attempt in 1..=SEND_ATTEMPTS {
            // Retries never spread: they take a connection that exists.
            let (conn, guard) = self.checkout(key, &connect, attempt == 1).await?;
            let sent = send_on(
                &conn,
                &request,
                key.address,
                early
                    .as_mut()
                    .map(|(client, data)| (&**client, &mut **data)),
            )
            .await;
            match sent {
                Ok((response, send)) => {
                    if early
                        .as_ref()
                        .is_some_and(|(_, data)| !data.data.is_empty())
                    {
                        self.counters.count(ProxyEvent::StreamEarlyData);
                    }
                    return Ok((response, send, guard));
                }
                Err(e) => {
                    // The connection is going away (GOAWAY), broken, or
                    // refusing streams (REFUSED_STREAM: at its limit or
                    // stopping): no new streams on it; its open streams go
                    // on. The retry takes another connection or a new one.
                    conn.dead.store(true, Ordering::Release);
                    if conn.extra {
                        self.hold_spread(key);
                    }
                    if early.as_ref().is_some_and(|(_, data)| data.in_doubt) {
                        self.counters.count(ProxyEvent::StreamFailedAfterEarlyData);
                        tracing::debug!(conn = conn.id, attempt, error = %e, "tunnel stream failed after carrying the client's first bytes; not retried");
                        return Err(e);
                    }
                    self.counters.count(ProxyEvent::StreamRetried);
                    tracing::debug!(conn = conn.id, attempt, error = %e, "tunnel stream not accepted; retrying on another connection");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or(HboneError::Status {
            target: key.address,
            status: StatusCode::SERVICE_UNAVAILABLE,
        }))
    }

    /// Keeps `key` to the connections it has for [`SPREAD_BACKOFF`].
    fn hold_spread(&self, key: &PoolKey) {
        self.spread_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), Instant::now() + SPREAD_BACKOFF);
    }

    /// How many connections `key` may spread over now.
    fn spread_for(&self, key: &PoolKey, may_spread: bool) -> usize {
        let held = self
            .spread_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .is_some_and(|until| Instant::now() < *until);
        if may_spread && !held {
            self.spread()
        } else {
            1
        }
    }

    async fn checkout<F, Fut>(
        &self,
        key: &PoolKey,
        connect: &F,
        may_spread: bool,
    ) -> Result<(Arc<PooledConn>, StreamGuard), HboneError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Established, HboneError>>,
    {
        let spread = self.spread_for(key, may_spread);
        let found = match self.pick(key, spread) {
            Some(p) if !p.grow => return Ok(p.into_parts()),
            other => other,
        };
        // One connection attempt per key at a time: concurrent callers wait
        // for it and then share it, instead of each dialling (no storm). A
        // caller that already has a slot and only wants to spread does not
        // wait: if another caller is dialling, it keeps its slot.
        let gate = {
            let mut connecting = self
                .connecting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            connecting.entry(key.clone()).or_default().clone()
        };
        let _turn = match found {
            Some(p) => match gate.try_lock() {
                Ok(turn) => {
                    drop(p);
                    turn
                }
                Err(_) => return Ok(p.into_parts()),
            },
            None => gate.lock().await,
        };
        // Under the gate: another caller may have just added a connection.
        let fallback = match self.pick(key, spread) {
            Some(p) if !p.grow => return Ok(p.into_parts()),
            other => other,
        };
        let extra = fallback.is_some();
        match self.dial(key, connect, extra).await {
            Ok(dialled) => Ok(dialled),
            // Spreading is an optimisation: a connection that cannot be
            // added (the peer at its per-peer connection limit, say) leaves
            // the stream on the one it had.
            Err(e) => match fallback {
                Some(p) => {
                    self.hold_spread(key);
                    tracing::debug!(peer = %key.address, error = %e, "extra tunnel connection failed; staying on a pooled one");
                    Ok(p.into_parts())
                }
                None => Err(e),
            },
        }
    }

    /// Establishes a new connection for `key`, spawns its driver, pools it
    /// and reserves a stream on it. Called with the key's gate held.
    async fn dial<F, Fut>(
        &self,
        key: &PoolKey,
        connect: &F,
        extra: bool,
    ) -> Result<(Arc<PooledConn>, StreamGuard), HboneError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Established, HboneError>>,
    {
        let Established {
            sender,
            connection,
            lease,
        } = connect().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let limit = sender
            .current_max_send_streams()
            .clamp(1, MAX_STREAMS_PER_CONNECTION);
        let dead = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(PooledConn {
            id,
            sender,
            active: AtomicUsize::new(0),
            limit,
            dead: dead.clone(),
            idle_since: Mutex::new(Instant::now()),
            extra,
        });
        self.counters.count(ProxyEvent::TunnelOpened);
        tokio::spawn(drive(connection, dead, key.address, id, lease));
        tracing::debug!(conn = id, peer = %key.address, source = %key.source, destination = %key.destination, "tunnel connection established");
        let guard = conn.try_reserve().ok_or(HboneError::Status {
            target: key.address,
            status: StatusCode::SERVICE_UNAVAILABLE,
        })?;
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok((conn, guard))
    }

    /// Drops connections that carried no stream for `IDLE_TIMEOUT` and forgets
    /// dead ones. Run it periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(
                        *c.idle_since.lock().unwrap_or_else(PoisonError::into_inner),
                    ) >= IDLE_TIMEOUT;
                !(idle || c.dead.load(Ordering::Acquire))
            });
        }
        conns.retain(|_, list| !list.is_empty());
        let mut connecting = self
            .connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connecting.retain(|k, gate| conns.contains_key(k) || Arc::strong_count(gate) > 1);
        self.spread_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, until| now < *until);
    }
}

async fn send_on(
    conn: &PooledConn,
    request: &Request<()>,
    addr: SocketAddr,
    early: Option<(&TcpStream, &mut EarlyData)>,
) -> Result<(Response<RecvStream>, SendStream<Bytes>), HboneError> {
    let h2_err = |source| HboneError::H2 { addr, source };
    let mut sender = conn.sender.clone().ready().await.map_err(h2_err)?;
    let mut req = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone());
    for (name, value) in request.headers() {
        req = req.header(name, value);
    }
    let req = req.body(()).map_err(|_| HboneError::Status {
        target: addr,
        status: StatusCode::BAD_REQUEST,
    })?;
    let (response, mut send) = sender.send_request(req, false).map_err(h2_err)?;
    let response = match early {
        Some((client, data)) => data.send_until_answered(client, &mut send, response).await,
        None => response.await,
    }
    .map_err(h2_err)?;
    Ok((response, send))
}

/// The most a captured connection sends on its tunnel stream before the
/// peer has answered: one read, the size of a relay's first read
/// (`copy::Reader`).
const EARLY_DATA_MAX: usize = 16 * 1024;

thread_local! {
    /// Each thread's buffer for the early reads of the connections it
    /// opens. The bytes are copied out at their size, so a connection in
    /// setup holds what its client sent rather than a 16 KiB buffer: in a
    /// burst of new connections (thousands opened at once), that buffer was
    /// most of what each connection held until its tunnel answered.
    static EARLY_READ: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One read of at most [`EARLY_DATA_MAX`] bytes from `client`, copied out
/// at its size; empty at the client's FIN.
fn read_early(client: &TcpStream) -> io::Result<Bytes> {
    EARLY_READ.with_borrow_mut(|buf| {
        buf.clear();
        buf.reserve(EARLY_DATA_MAX);
        let n = client.try_read_buf(&mut (&mut *buf).limit(EARLY_DATA_MAX))?;
        Ok(Bytes::copy_from_slice(&buf[..n]))
    })
}

/// A captured connection's first bytes, sent on its tunnel stream before the
/// peer has answered the `CONNECT` instead of one tunnel round trip later:
/// the first request of a client-speaks-first protocol (HTTP, TLS) reaches
/// the destination that much sooner, and usually in the same TLS record as
/// the `CONNECT`. ztunnel waits for the answer.
///
/// Only towards a node proxy (this agent, ztunnel): its HTTP/2 server holds a
/// stream's data, within the stream's window, until it has authorized the
/// stream and connected to the app. Nothing reaches an app before its
/// policy allows the connection, and a refused stream's data is dropped
/// with it. A waypoint (Envoy, in Istio) gets none.
///
/// At most one read of at most 16 KiB (`EARLY_DATA_MAX`), made only while
/// the stream is unanswered: a server-speaks-first protocol waits for
/// nothing. What was read is kept until the connection has an upstream: a
/// retried stream, or the next endpoint, gets the same bytes first, through
/// a tunnel (`EarlyData::send_until_answered`) or a plain socket
/// ([`EarlyData::replay`]); the relay counts them ([`relay_h2`]). Unless a
/// stream that carried them failed without an answer that settles them
/// ([`EarlyData::in_doubt`]): then no other stream or endpoint gets them,
/// and the connection fails.
#[derive(Debug, Default)]
pub struct EarlyData {
    /// The bytes read.
    data: Bytes,
    /// The client was read (bytes, its FIN, or an error): no second read.
    read: bool,
    /// The read's error: the connection ends with it once it has an
    /// upstream (reset), as if the relay had read it.
    error: Option<io::Error>,
    /// The bytes went out on a stream that was neither answered nor shown
    /// unprocessed: the destination's app may have them.
    in_doubt: bool,
}

impl EarlyData {
    /// Whether a stream that carried the bytes failed in a way that leaves
    /// open whether the destination's app got them (the tunnel broke, or the
    /// peer reset the stream other than with `REFUSED_STREAM`), or was given
    /// up (a connect timeout) before its answer. The connection must then
    /// fail: another stream or endpoint could run the client's request twice.
    pub fn in_doubt(&self) -> bool {
        self.in_doubt
    }

    /// Whether there is anything to replay (bytes or the read's error).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.error.is_none()
    }

    /// Awaits the peer's answer to a stream's `CONNECT`, meanwhile sending on
    /// the stream what was read from `client` before (a retry), or else, if
    /// `client` has bytes before the answer comes, one read of them.
    async fn send_until_answered(
        &mut self,
        client: &TcpStream,
        send: &mut SendStream<Bytes>,
        response: h2::client::ResponseFuture,
    ) -> Result<Response<RecvStream>, h2::Error> {
        if !self.data.is_empty() {
            send.send_data(self.data.clone(), false)?;
            self.in_doubt = true;
        }
        // An error is only ever kept with `read` set.
        if self.read {
            return self.settle(response.await);
        }
        tokio::pin!(response);
        tokio::select! {
            biased;
            answered = &mut response => return self.settle(answered),
            ready = client.readable() => {
                if ready.is_err() {
                    // No readiness to wait on: the relay reads instead.
                    self.read = true;
                    return self.settle(response.await);
                }
            }
        }
        match read_early(client) {
            // The FIN, before any byte: the relay reads it again.
            Ok(data) if data.is_empty() => self.read = true,
            Ok(data) => {
                self.read = true;
                self.data = data;
                send.send_data(self.data.clone(), false)?;
                self.in_doubt = true;
            }
            // Readiness without bytes: the relay reads them.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                self.read = true;
                self.error = Some(e);
            }
        }
        self.settle(response.await)
    }

    /// Settles the bytes sent on a stream by how it was answered: any answer
    /// does (200: the relay goes on; a refusal: the peer did not connect the
    /// app, before which neither this agent's inbound nor ztunnel passes a
    /// stream's data on), and so does an error that proves the peer never
    /// processed the stream (RFC 9113 §8.7): `REFUSED_STREAM`, or a graceful
    /// GOAWAY whose last stream is below this one (h2 reports a GOAWAY's
    /// `NO_ERROR` only to the streams above its last). Any other error
    /// leaves them in doubt.
    fn settle(
        &mut self,
        answered: Result<Response<RecvStream>, h2::Error>,
    ) -> Result<Response<RecvStream>, h2::Error> {
        let unprocessed = |e: &h2::Error| {
            e.is_remote()
                && ((e.is_reset() && e.reason() == Some(Reason::REFUSED_STREAM))
                    || (e.is_go_away() && e.reason() == Some(Reason::NO_ERROR)))
        };
        match &answered {
            Ok(_) => self.in_doubt = false,
            Err(e) if unprocessed(e) => self.in_doubt = false,
            Err(_) => {}
        }
        answered
    }

    /// Writes what was read to `to`, a plain upstream (an endpoint taken
    /// after a tunnel attempt failed), before its relay starts; the bytes
    /// written, or the client's read error.
    pub async fn replay(self, to: &mut TcpStream) -> io::Result<u64> {
        if let Some(e) = self.error {
            return Err(e);
        }
        to.write_all(&self.data).await?;
        Ok(self.data.len() as u64)
    }
}

/// Drives a client connection: the HTTP/2 state machine plus PING keep-alive.
async fn drive(
    mut connection: h2::client::Connection<Box<dyn IoStream>, Bytes>,
    dead: Arc<AtomicBool>,
    peer: SocketAddr,
    id: u64,
    mut lease: WindowLease,
) {
    let ping_pong = connection.ping_pong();
    let keepalive = async move {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::time::sleep(PING_INTERVAL).await;
            match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(conn = id, %peer, error = %e, "tunnel keep-alive failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(conn = id, %peer, "tunnel keep-alive timed out; closing the connection");
                    return;
                }
            }
        }
    };
    tokio::pin!(keepalive);
    loop {
        tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(conn = id, %peer, error = %e, "tunnel connection ended");
                }
                break;
            }
            () = &mut keepalive => break,
            // A window reduced by the budget grows back as it frees.
            window = lease.grown(), if lease.reduced() => connection.set_target_window_size(window),
        }
    }
    dead.store(true, Ordering::Release);
}

/// The client side of an HTTP/2 handshake with Istio's stream window,
/// granting the peer the connection window `lease` holds (Istio's is
/// [`CONNECTION_WINDOW`]; it comes from `limits::Bounds::window`, like an
/// inbound tunnel's): what the peer can make this connection buffer ahead
/// of the streams' readers. The lease is held until the connection ends.
pub async fn client_handshake(
    io: Box<dyn IoStream>,
    addr: SocketAddr,
    lease: WindowLease,
) -> Result<Established, HboneError> {
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(lease.window())
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(0)
        .enable_push(false)
        .handshake(io)
        .await
        .map_err(|source| HboneError::H2 { addr, source })?;
    Ok(Established {
        sender,
        connection,
        lease,
    })
}

/// The connection window an extra outbound tunnel connection asks for when
/// the pool spreads a key's streams over `spread` connections: Istio's
/// [`CONNECTION_WINDOW`] divided among them (the spread is for the workers'
/// parallelism, not for a much larger window to one peer), at least one
/// [`STREAM_WINDOW`] so a stream is never held by its connection's window.
/// A key's first connection asks for the whole [`CONNECTION_WINDOW`]
/// ([`Pool::window_for`]): a key spread over 2 workers asks for 24 MiB in
/// all, over [`MAX_SPREAD`] 44 MiB.
pub fn connection_window(spread: usize) -> u32 {
    let spread = u32::try_from(spread.max(1)).unwrap_or(u32::MAX);
    (CONNECTION_WINDOW / spread).max(STREAM_WINDOW)
}

/// Dials a tunnel connection over `tcp` (connected to `key.address`): mTLS
/// as `key.source`, the server proven to be `key.destination`, then the
/// HTTP/2 handshake granting `window` ([`Pool::window_for`]), leased from
/// `bounds` against `share` ([`Bounds::window`]).
/// The agent's outbound tunnels and the waypoint's upstream ones.
pub async fn dial_tunnel(
    tcp: TcpStream,
    tls: &MeshTls,
    key: &PoolKey,
    bounds: &Bounds,
    share: &SpiffeId,
    window: u32,
) -> Result<Established, HboneError> {
    let config = tls.client_config(&key.source, vec![key.destination.clone()]);
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name(key.address.ip()), tcp)
        .await
        .map_err(|e| HboneError::Tls {
            addr: key.address,
            reason: describe_tls_error(&e),
        })?;
    size_tls_buffer(tls.get_mut().1);
    let lease = bounds.window(share, window);
    client_handshake(Box::new(tls), key.address, lease).await
}

/// The CONNECT request for `target` with the headers Istio sends.
pub fn connect_request(target: SocketAddr, client: SocketAddr, baggage: &str) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for=\"{client}\""))
        .header("traceparent", traceparent());
    if !baggage.is_empty() {
        req = req.header("baggage", baggage);
    }
    // A SocketAddr always renders as a valid authority, and the header values are ASCII.
    req.body(()).unwrap_or_else(|_| Request::new(()))
}

/// Istio's baggage: the source's cluster, namespace, workload and service names.
pub fn baggage(namespace: &str, workload: &str, service: &str) -> String {
    format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={namespace},k8s.deployment.name={workload},service.name={service},service.version=latest"
    )
}

/// A fresh W3C `traceparent` (version 00, sampled).
fn traceparent() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mix = |x: u64| {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let (a, b, c) = (
        mix(seed ^ n),
        mix(seed.rotate_left(17) ^ n),
        mix(n ^ 0xA5A5),
    );
    format!("00-{a:016x}{b:016x}-{:016x}-01", c | 1)
}

/// The server side of an HTTP/2 handshake with Istio's stream window,
/// allowing the client `max_streams` concurrent streams and granting it a
/// connection window of `window` bytes (Istio's is [`CONNECTION_WINDOW`];
/// an inbound tunnel's comes from `limits::Bounds::tunnel`): what the client
/// can make this connection buffer ahead of the streams' readers.
pub async fn server_handshake<T: IoStream>(
    io: T,
    max_streams: u32,
    window: u32,
) -> Result<h2::server::Connection<T, Bytes>, h2::Error> {
    h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(window)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(max_streams)
        .handshake(io)
        .await
}

/// Sends a bodiless response with `status`, ending the stream.
pub fn respond_status(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_else(|_| Response::new(()));
    if let Err(e) = respond.send_response(response, true) {
        tracing::debug!(error = %e, "cannot send HBONE response");
    }
}

/// The CONNECT target of a request: its `:authority` as an address.
pub fn connect_target(req: &Request<RecvStream>) -> Result<SocketAddr, StatusCode> {
    if req.method() != Method::CONNECT {
        return Err(StatusCode::BAD_REQUEST);
    }
    let authority = req.uri().authority().ok_or(StatusCode::BAD_REQUEST)?;
    let addr: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// The client address a `forwarded: for="ip:port"` (or `for=ip`, port 0) header names.
pub fn forwarded_for(req: &Request<RecvStream>) -> Option<SocketAddr> {
    let value = req.headers().get("forwarded")?.to_str().ok()?;
    let for_part = value
        .split(';')
        .flat_map(|p| p.split(','))
        .find_map(|p| p.trim().strip_prefix("for="))?;
    let raw = for_part.trim_matches('"');
    let addr = raw.parse::<SocketAddr>().ok().or_else(|| {
        let ip = raw
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()?;
        Some(SocketAddr::new(ip, 0))
    })?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Relays between a TCP stream and an HTTP/2 stream until both directions
/// are closed; an error on either side resets both (TCP RST, `RST_STREAM`).
///
/// `early`: what was read from `tcp` and sent on `send` before the stream
/// was answered ([`EarlyData`]), counted as sent; its read error ends the
/// relay as a reset.
///
/// `tcp` must have zero linger already, so that an agent death while the
/// relay runs resets the app (see `copy::relay`): a connection accepted on
/// a pod's listener inherits it from the listener; the caller gives it to
/// one the agent made (`copy::abort_on_close`).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in the connection's task"
)]
pub fn relay_h2(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    cancel: &tokio_util::sync::CancellationToken,
    early: EarlyData,
) -> impl Future<Output = RelayResult> + '_ {
    let EarlyData {
        data: early, error, ..
    } = early;
    let early_len = early.len() as u64;
    drop(early);
    async move {
        // `tcp` has `TCP_NODELAY` (accepted from a pod listener or made by
        // `datapath::netns`, both set it) and zero linger (above).
        // Not split: the reader waits on its readability and the writer on its
        // writability (`copy::Reader`, `copy::write_all`).
        let (mut sent, mut received) = (early_len, 0u64);
        let outcome = {
            let up = async {
                if let Some(e) = error {
                    return Err(e);
                }
                let mut reader = super::copy::Reader::new();
                loop {
                    let mut chunk = reader.read(&tcp).await?.freeze();
                    if chunk.is_empty() {
                        send.send_data(Bytes::new(), true)
                            .map_err(io::Error::other)?;
                        return io::Result::Ok(());
                    }
                    sent += chunk.len() as u64;
                    while !chunk.is_empty() {
                        send.reserve_capacity(chunk.len());
                        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                            .await
                            .ok_or_else(|| {
                                io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")
                            })?
                            .map_err(io::Error::other)?;
                        let part = chunk.split_to(granted.min(chunk.len()));
                        send.send_data(part, false).map_err(io::Error::other)?;
                    }
                }
            };
            let down = async {
                while let Some(data) = recv.data().await {
                    let data = data.map_err(io::Error::other)?;
                    let n = data.len();
                    super::copy::write_all(&tcp, &data).await?;
                    received += n as u64;
                    recv.flow_control()
                        .release_capacity(n)
                        .map_err(io::Error::other)?;
                }
                // The peer's FIN: pass it on as a graceful close.
                super::copy::pass_fin(&tcp)
            };
            tokio::pin!(up, down);
            super::copy::both_directions(up, down, cancel).await
        };
        if !matches!(outcome, RelayOutcome::Closed) {
            send.send_reset(Reason::CANCEL);
            // Dropping `tcp` below resets the app.
            super::copy::abort_on_close(&tcp);
        }
        RelayResult {
            sent,
            received,
            outcome,
            splicing: super::copy::Splicing::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::copy::tests::tcp_pair;

    fn test_key() -> PoolKey {
        let td = crate::identity::TrustDomain::new("cluster.local").expect("trust domain");
        PoolKey {
            source: SpiffeId::new(td.clone(), "default", "a").expect("id"),
            destination: SpiffeId::new(td, "default", "c").expect("id"),
            address: "198.18.2.10:15008".parse().expect("addr"),
            source_ip: "198.18.1.10".parse().expect("ip"),
        }
    }

    /// Istio's connection window, leased from a default budget.
    fn test_lease() -> WindowLease {
        crate::proxy::limits::Bounds::default().window(&test_key().destination, CONNECTION_WINDOW)
    }

    /// Streams spread over more connections share one connection window,
    /// never less than a stream's.
    #[test]
    fn the_connection_window_is_shared_by_the_spread() {
        let w: Vec<u32> = [0, 1, 2, 4, 8].into_iter().map(connection_window).collect();
        assert_eq!(
            w,
            [
                CONNECTION_WINDOW,
                CONNECTION_WINDOW,
                CONNECTION_WINDOW / 2,
                STREAM_WINDOW,
                STREAM_WINDOW
            ]
        );
    }

    /// The client side grants its peer the window its lease holds, never
    /// more (a destination node can make the agent buffer no more than the
    /// budget lets it), and the lease returns when the connection ends; a
    /// connection granted less grows its window when the budget frees.
    #[tokio::test]
    async fn a_client_connection_grants_the_leased_window_grows_it_and_returns_it() {
        // Under h2's send buffer (400 KiB), which also caps what the
        // server side can reserve.
        const SHARE: u32 = 256 << 10;
        let bounds = crate::proxy::limits::Bounds::new(
            crate::proxy::limits::Limits {
                max_tunnel_window: 4 * u64::from(SHARE),
                max_tunnel_window_per_peer: u64::from(SHARE),
                ..crate::proxy::limits::Limits::default()
            },
            crate::process::FdLimit::default(),
        );
        let windows_in_use = |b: &crate::proxy::limits::Bounds| {
            b.usage()
                .in_use
                .iter()
                .find(|(k, _, _)| *k == "tunnel_window_bytes")
                .map(|(_, n, _)| *n)
        };
        // What the server may send on one stream: at most the stream's
        // window (4 MiB) and the connection's.
        let sendable = |window: u32| {
            let bounds = &bounds;
            async move {
                let lease = bounds.window(&test_key().destination, window);
                let (client_io, server_io) = tokio::io::duplex(1 << 20);
                let server = tokio::spawn(async move {
                    let mut conn = server_handshake(server_io, 100, CONNECTION_WINDOW)
                        .await
                        .expect("server handshake");
                    let (_req, mut respond) =
                        conn.accept().await.expect("a stream").expect("a request");
                    let mut send = respond
                        .send_response(Response::new(()), false)
                        .expect("response");
                    send.reserve_capacity(2 * SHARE as usize);
                    let capacity = std::future::poll_fn(|cx| {
                        // Drives the connection until the capacity is assigned.
                        let _ = conn.poll_closed(cx);
                        send.poll_capacity(cx)
                    })
                    .await;
                    (capacity.and_then(Result::ok), conn, send)
                });
                let established = client_handshake(Box::new(client_io), test_key().address, lease)
                    .await
                    .expect("client handshake");
                let Established {
                    sender,
                    connection,
                    lease,
                } = established;
                let driver = tokio::spawn(drive(
                    connection,
                    Arc::default(),
                    test_key().address,
                    1,
                    lease,
                ));
                let mut sender = sender.ready().await.expect("ready");
                let request = connect_request(
                    "198.18.2.10:8080".parse().expect("addr"),
                    "198.18.1.10:40000".parse().expect("addr"),
                    "",
                );
                // The client's stream stays open as long as the server's.
                let client = sender.send_request(request, false).expect("request");
                let (capacity, conn, send) = server.await.expect("server task");
                (capacity, conn, (send, client), driver)
            }
        };
        // The peer's share of the 16 MiB asked for.
        let (first, conn1, _send1, driver1) = sendable(CONNECTION_WINDOW).await;
        assert_eq!(first, Some(SHARE as usize));
        assert_eq!(windows_in_use(&bounds), Some(u64::from(SHARE)));
        // Nothing left of the share: HTTP/2's own window.
        let (second, mut conn2, (mut send2, client2), driver2) = sendable(CONNECTION_WINDOW).await;
        assert_eq!(
            second,
            Some(crate::proxy::limits::H2_INITIAL_WINDOW as usize)
        );
        // The first connection ends: its lease returns, and the second
        // connection's grows into the share (a WINDOW_UPDATE its peer sees).
        drop(conn1);
        tokio::time::timeout(Duration::from_secs(10), driver1)
            .await
            .expect("the driver ends with its connection")
            .expect("driver task");
        let grown = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| {
                let _ = conn2.poll_closed(cx);
                loop {
                    match send2.poll_capacity(cx) {
                        std::task::Poll::Ready(Some(Ok(c))) if c < SHARE as usize => continue,
                        std::task::Poll::Ready(c) => {
                            return std::task::Poll::Ready(c.and_then(Result::ok));
                        }
                        std::task::Poll::Pending => return std::task::Poll::Pending,
                    }
                }
            }),
        )
        .await
        .expect("the reduced window grew once the budget freed");
        assert_eq!(grown, Some(SHARE as usize));
        assert_eq!(windows_in_use(&bounds), Some(u64::from(SHARE)));
        // The leases return when the connections end.
        drop((conn2, send2, client2));
        tokio::time::timeout(Duration::from_secs(10), driver2)
            .await
            .expect("the driver ends with its connection")
            .expect("driver task");
        assert_eq!(windows_in_use(&bounds), Some(0));
    }

    /// How a test server treats the streams of its connection.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Answers every stream with `REFUSED_STREAM`.
        Refuse,
        /// Sends a GOAWAY (last stream 0) and closes: streams are not processed.
        GoAway,
        /// Answers 200.
        Serve,
    }

    /// An in-memory tunnel connection whose server side acts as `behaviour`.
    async fn connect_to(behaviour: Behaviour) -> Result<Established, HboneError> {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let Ok(mut conn) = server_handshake(server_io, 100, CONNECTION_WINDOW).await else {
                return;
            };
            if let Behaviour::GoAway = behaviour {
                conn.abrupt_shutdown(Reason::NO_ERROR);
            }
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                match behaviour {
                    Behaviour::Refuse => respond.send_reset(Reason::REFUSED_STREAM),
                    _ => respond_status(&mut respond, StatusCode::OK),
                }
            }
        });
        client_handshake(Box::new(client_io), test_key().address, test_lease()).await
    }

    /// Sends one CONNECT through a fresh pool whose n-th connection behaves
    /// as `plan[n]` (the last entry for any further one); returns the
    /// response status (or the error) and the connections opened.
    async fn send_with(plan: &[Behaviour]) -> (Result<StatusCode, String>, u64, u64) {
        let pool = Pool::default();
        let dialled = AtomicUsize::new(0);
        let connect = || {
            let n = dialled.fetch_add(1, Ordering::SeqCst);
            connect_to(plan[n.min(plan.len() - 1)])
        };
        let target: SocketAddr = "198.18.2.10:8080".parse().expect("addr");
        let client: SocketAddr = "198.18.1.10:40000".parse().expect("addr");
        let request = connect_request(target, client, "");
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            pool.send(&test_key(), request, connect),
        )
        .await
        .expect("the pool answered in time");
        let status = result
            .map(|(response, _, _)| response.status())
            .map_err(|e| e.to_string());
        let counters = pool.counters();
        (
            status,
            counters.get(ProxyEvent::TunnelOpened),
            counters.get(ProxyEvent::StreamRetried),
        )
    }

    /// Opens `n` streams one after another on `pool` (all to servers that
    /// answer 200), holding each unless `release`.
    async fn open_streams(
        pool: &Pool,
        n: usize,
        release: bool,
    ) -> Vec<(SendStream<Bytes>, StreamGuard)> {
        let target: SocketAddr = "198.18.2.10:8080".parse().expect("addr");
        let client: SocketAddr = "198.18.1.10:40000".parse().expect("addr");
        let mut held = Vec::new();
        for _ in 0..n {
            let request = connect_request(target, client, "");
            let (response, send, guard) = pool
                .send(&test_key(), request, || connect_to(Behaviour::Serve))
                .await
                .expect("stream opened");
            assert_eq!(response.status(), StatusCode::OK);
            if !release {
                held.push((send, guard));
            }
        }
        held
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loaded_streams_spread_over_one_connection_per_worker() {
        let pool = Pool::default();
        assert_eq!(pool.spread(), 2);
        // The key's first connection asks for Istio's whole window.
        assert_eq!(pool.window_for(&test_key()), CONNECTION_WINDOW);
        // The first SPREAD_AT_STREAMS streams share one connection; the next
        // one opens a second, and the least-loaded takes the rest.
        let mut held = open_streams(&pool, SPREAD_AT_STREAMS, false).await;
        assert_eq!(pool.occupancy(), (1, SPREAD_AT_STREAMS));
        // An extra one, to spread over the workers, asks for its part.
        assert_eq!(pool.window_for(&test_key()), CONNECTION_WINDOW / 2);
        held.extend(open_streams(&pool, SPREAD_AT_STREAMS, false).await);
        assert_eq!(pool.occupancy(), (2, 2 * SPREAD_AT_STREAMS));
        // Never more connections than worker threads, however many streams.
        held.extend(open_streams(&pool, 4 * SPREAD_AT_STREAMS, false).await);
        assert_eq!(pool.occupancy(), (2, 6 * SPREAD_AT_STREAMS));
        assert_eq!(pool.counters().get(ProxyEvent::TunnelOpened), 2);
        drop(held);
        assert_eq!(pool.occupancy(), (2, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_extra_connection_leaves_streams_where_they_are() {
        // The peer takes one connection and sends the next one away (as an
        // agent at its per-peer connection limit closes it).
        let pool = Pool::default();
        let dialled = AtomicUsize::new(0);
        let connect = || {
            let first = dialled.fetch_add(1, Ordering::SeqCst) == 0;
            connect_to(if first {
                Behaviour::Serve
            } else {
                Behaviour::GoAway
            })
        };
        let target: SocketAddr = "198.18.2.10:8080".parse().expect("addr");
        let client: SocketAddr = "198.18.1.10:40000".parse().expect("addr");
        let mut held = Vec::new();
        for _ in 0..3 * SPREAD_AT_STREAMS {
            let request = connect_request(target, client, "");
            let (response, send, guard) = pool
                .send(&test_key(), request, connect)
                .await
                .expect("every stream is served on the first connection");
            assert_eq!(response.status(), StatusCode::OK);
            held.push((send, guard));
        }
        // One extra dial, then no more dials. The GOAWAY either reaches the
        // client during the handshake (the dial fails) or after the stream
        // was sent on it (one retry): either way the stream stays served.
        assert_eq!(pool.counters().get(ProxyEvent::TunnelOpened), 2);
        assert!(pool.counters().get(ProxyEvent::StreamRetried) <= 1);
        assert_eq!(pool.occupancy(), (1, 3 * SPREAD_AT_STREAMS));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_streams_stay_on_one_connection() {
        let pool = Pool::default();
        open_streams(&pool, 20, true).await;
        assert_eq!(pool.counters().get(ProxyEvent::TunnelOpened), 1);
    }

    #[tokio::test]
    async fn a_current_thread_runtime_keeps_one_connection() {
        let pool = Pool::default();
        assert_eq!(pool.spread(), 1);
        let held = open_streams(&pool, 3 * SPREAD_AT_STREAMS, false).await;
        assert_eq!(pool.occupancy(), (1, 3 * SPREAD_AT_STREAMS));
        drop(held);
    }

    /// What a gated test server saw of one stream.
    #[derive(Debug, PartialEq)]
    enum Seen {
        /// The stream's first DATA, received before any answer.
        Early(Bytes),
        /// The rest of the stream's data, up to its end (answered streams).
        Rest(Vec<u8>),
    }

    /// What a gated server does once a stream's first DATA has arrived.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Gate {
        /// Answers 200, then reads the rest of the stream and ends its side.
        Answer,
        /// Resets the stream with `REFUSED_STREAM`.
        Refuse,
        /// Drops the whole connection without an answer: the tunnel breaks
        /// after the bytes arrived.
        Break,
    }

    /// An in-memory tunnel connection whose server answers a stream only
    /// once the stream's first DATA has arrived (so a client that waits for
    /// the answer before sending waits forever), reporting what it saw on
    /// `seen`, then acting as `gate`.
    async fn connect_gated(
        seen: tokio::sync::mpsc::UnboundedSender<Seen>,
        gate: Gate,
    ) -> Result<Established, HboneError> {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let Ok(mut conn) = server_handshake(server_io, 100, CONNECTION_WINDOW).await else {
                return;
            };
            let broken = Arc::new(tokio::sync::Notify::new());
            loop {
                let (req, mut respond) = tokio::select! {
                    next = conn.accept() => match next {
                        Some(Ok(stream)) => stream,
                        _ => return,
                    },
                    // Drops the connection and its I/O.
                    () = broken.notified() => return,
                };
                let (seen, broken) = (seen.clone(), broken.clone());
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let first = body.data().await.and_then(Result::ok).unwrap_or_default();
                    let _ = body.flow_control().release_capacity(first.len());
                    let _ = seen.send(Seen::Early(first));
                    match gate {
                        Gate::Refuse => return respond.send_reset(Reason::REFUSED_STREAM),
                        Gate::Break => return broken.notify_one(),
                        Gate::Answer => {}
                    }
                    let Ok(mut send) = respond.send_response(Response::new(()), false) else {
                        return;
                    };
                    let mut rest = Vec::new();
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        rest.extend_from_slice(&data);
                    }
                    let _ = seen.send(Seen::Rest(rest));
                    let _ = send.send_data(Bytes::new(), true);
                });
            }
        });
        client_handshake(Box::new(client_io), test_key().address, test_lease()).await
    }

    /// Opens one stream on `pool` with `agent`'s early bytes (the server
    /// may wait for them before it answers), within 10 s.
    async fn open_early<F, Fut>(
        pool: &Pool,
        agent: &TcpStream,
        early: &mut EarlyData,
        connect: F,
    ) -> (Response<RecvStream>, SendStream<Bytes>, StreamGuard)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Established, HboneError>>,
    {
        let target: SocketAddr = "198.18.2.10:8080".parse().expect("addr");
        let request = connect_request(target, "198.18.1.10:40000".parse().expect("addr"), "");
        tokio::time::timeout(
            Duration::from_secs(10),
            pool.send_early(&test_key(), request, Some((agent, early)), connect),
        )
        .await
        .expect("answered in time")
        .expect("stream opened")
    }

    #[tokio::test]
    async fn a_clients_first_bytes_go_before_the_answer_and_count_as_sent() {
        let (mut app, agent) = tcp_pair().await;
        let first = b"GET / HTTP/1.1\r\nhost: c\r\n\r\n";
        app.write_all(first).await.expect("write");
        let pool = Pool::default();
        let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let mut early = EarlyData::default();
        // The server answers only once the first bytes have come.
        let (response, send, _guard) = open_early(&pool, &agent, &mut early, || {
            connect_gated(tx.clone(), Gate::Answer)
        })
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            seen.recv().await,
            Some(Seen::Early(Bytes::from_static(first)))
        );
        assert_eq!(pool.counters().get(ProxyEvent::StreamEarlyData), 1);
        // The relay goes on after them, and counts them as sent.
        let cancel = tokio_util::sync::CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay_h2(agent, send, response.into_body(), &cancel, early).await
        });
        app.write_all(b"more").await.expect("write");
        app.shutdown().await.expect("shutdown");
        assert_eq!(seen.recv().await, Some(Seen::Rest(b"more".to_vec())));
        let r = relay.await.expect("relay");
        assert!(matches!(r.outcome, RelayOutcome::Closed), "{:?}", r.outcome);
        assert_eq!(r.sent, (first.len() + 4) as u64);
    }

    #[tokio::test]
    async fn an_early_read_holds_only_the_bytes_it_read() {
        let (mut app, agent) = tcp_pair().await;
        let first = b"GET / HTTP/1.1\r\nhost: c\r\n\r\n";
        app.write_all(first).await.expect("write");
        agent.readable().await.expect("readable");
        let data = read_early(&agent).expect("read");
        assert_eq!(&data[..], first);
        // Its own allocation, of its size: not a 16 KiB read buffer.
        let held = data.try_into_mut().expect("not shared").capacity();
        assert_eq!(held, first.len());
        // At most EARLY_DATA_MAX per read; the rest stays for the relay.
        let big = vec![7u8; EARLY_DATA_MAX + 4096];
        app.write_all(&big).await.expect("write");
        let mut got = 0;
        while got < big.len() {
            agent.readable().await.expect("readable");
            match read_early(&agent) {
                Ok(d) => {
                    assert!(!d.is_empty() && d.len() <= EARLY_DATA_MAX, "{}", d.len());
                    assert!(d.iter().all(|b| *b == 7));
                    got += d.len();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(got, big.len());
        // The client's FIN: nothing.
        app.shutdown().await.expect("shutdown");
        agent.readable().await.expect("readable");
        assert!(read_early(&agent).expect("fin").is_empty());
    }

    #[tokio::test]
    async fn a_tunnel_that_breaks_after_the_first_bytes_is_not_retried() {
        // The peer may have passed the bytes to its app before the tunnel
        // broke: a retry would run the client's request twice.
        let (mut app, agent) = tcp_pair().await;
        app.write_all(b"POST /pay").await.expect("write");
        let pool = Pool::default();
        let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let dialled = AtomicUsize::new(0);
        let mut early = EarlyData::default();
        let target: SocketAddr = "198.18.2.10:8080".parse().expect("addr");
        let request = connect_request(target, "198.18.1.10:40000".parse().expect("addr"), "");
        let connect = || {
            dialled.fetch_add(1, Ordering::SeqCst);
            connect_gated(tx.clone(), Gate::Break)
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            pool.send_early(&test_key(), request, Some((&agent, &mut early)), connect),
        )
        .await
        .expect("failed in time");
        assert!(sent.is_err(), "the broken stream was answered");
        assert!(early.in_doubt(), "the bytes' fate is unknown");
        assert_eq!(
            seen.recv().await,
            Some(Seen::Early(Bytes::from_static(b"POST /pay")))
        );
        drop(tx);
        assert_eq!(seen.recv().await, None, "the bytes were sent again");
        assert_eq!(dialled.load(Ordering::SeqCst), 1);
        assert_eq!(pool.counters().get(ProxyEvent::StreamRetried), 0);
        assert_eq!(
            pool.counters().get(ProxyEvent::StreamFailedAfterEarlyData),
            1
        );
    }

    /// Opens a stream with the early bytes `hello` whose first connection
    /// turns it away unprocessed (`refuse`: `REFUSED_STREAM` once its data
    /// has come; else a graceful GOAWAY, as from an upgrading peer), and
    /// whose second answers only once the bytes have come again: the retry
    /// gets them, settled.
    async fn retried_with_the_first_bytes(refuse: bool) {
        let (mut app, agent) = tcp_pair().await;
        app.write_all(b"hello").await.expect("write");
        let pool = Pool::default();
        let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let dialled = AtomicUsize::new(0);
        let mut early = EarlyData::default();
        let (response, _send, _guard) = open_early(&pool, &agent, &mut early, || {
            let first = dialled.fetch_add(1, Ordering::SeqCst) == 0;
            let tx = tx.clone();
            async move {
                match (first, refuse) {
                    (true, true) => connect_gated(tx, Gate::Refuse).await,
                    (true, false) => connect_to(Behaviour::GoAway).await,
                    (false, _) => connect_gated(tx, Gate::Answer).await,
                }
            }
        })
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!early.in_doubt());
        let hello = Some(Seen::Early(Bytes::from_static(b"hello")));
        if refuse {
            assert_eq!(seen.recv().await, hello, "the refusing server's");
        }
        assert_eq!(seen.recv().await, hello);
        let count = |event| pool.counters().get(event);
        assert_eq!(count(ProxyEvent::StreamRetried), 1);
        assert_eq!(count(ProxyEvent::StreamEarlyData), 1);
        assert_eq!(count(ProxyEvent::StreamFailedAfterEarlyData), 0);
    }

    #[tokio::test]
    async fn a_refused_stream_gets_the_clients_first_bytes_again() {
        retried_with_the_first_bytes(true).await;
    }

    #[tokio::test]
    async fn a_graceful_goaway_leaves_the_first_bytes_for_the_next_connection() {
        retried_with_the_first_bytes(false).await;
    }

    #[tokio::test]
    async fn an_answer_before_the_client_speaks_takes_nothing_from_it() {
        let (_app, agent) = tcp_pair().await;
        let pool = Pool::default();
        let mut early = EarlyData::default();
        let (response, _send, _guard) =
            open_early(&pool, &agent, &mut early, || connect_to(Behaviour::Serve)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(early.data.is_empty() && !early.read && early.error.is_none());
        assert_eq!(pool.counters().get(ProxyEvent::StreamEarlyData), 0);
    }

    #[tokio::test]
    async fn early_bytes_are_replayed_to_a_plain_upstream_or_end_it() {
        let (mut server, mut upstream) = tcp_pair().await;
        let early = EarlyData {
            data: Bytes::from_static(b"first"),
            read: true,
            ..EarlyData::default()
        };
        assert_eq!(early.replay(&mut upstream).await.expect("replayed"), 5);
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut got)
            .await
            .expect("read");
        assert_eq!(&got, b"first");
        let failed = EarlyData {
            read: true,
            error: Some(io::ErrorKind::ConnectionReset.into()),
            ..EarlyData::default()
        };
        let e = failed
            .replay(&mut upstream)
            .await
            .expect_err("the client's error");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn an_oversized_header_block_is_refused_and_the_connection_goes_on() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let Ok(mut conn) = server_handshake(server_io, 100, CONNECTION_WINDOW).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let _ = accepted_tx.send(req.headers().len());
                respond_status(&mut respond, StatusCode::OK);
            }
        });
        // A raw client: ours would never send such a request.
        let (client, conn) = h2::client::handshake(client_io).await.expect("handshake");
        tokio::spawn(conn);
        let connect = |extra: usize| {
            Request::builder()
                .method(Method::CONNECT)
                .uri("198.18.2.10:8080")
                .header("x-padding", "x".repeat(extra))
                .body(())
                .expect("request")
        };
        let mut client = client.ready().await.expect("ready");
        let (big, _) = client
            .send_request(connect(MAX_HEADER_LIST as usize + 1), true)
            .expect("sent");
        let status = big.await.map(|r| r.status());
        assert!(
            matches!(status, Ok(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)),
            "{status:?}"
        );
        let mut client = client.ready().await.expect("the connection goes on");
        let (small, _) = client.send_request(connect(100), true).expect("sent");
        assert_eq!(small.await.expect("answered").status(), StatusCode::OK);
        // Only the small request reached the server's code.
        assert_eq!(accepted.recv().await, Some(1));
        assert!(accepted.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_refused_stream_is_retried_on_a_new_connection() {
        let (status, opened, retried) = send_with(&[Behaviour::Refuse, Behaviour::Serve]).await;
        assert_eq!(status, Ok(StatusCode::OK));
        assert_eq!((opened, retried), (2, 1));
    }

    #[tokio::test]
    async fn streams_cut_by_goaway_twice_are_retried_on_a_third_connection() {
        // An upgrade: the stopping agent's connections all go away.
        let plan = [Behaviour::GoAway, Behaviour::GoAway, Behaviour::Serve];
        let (status, opened, retried) = send_with(&plan).await;
        assert_eq!(status, Ok(StatusCode::OK));
        assert_eq!((opened, retried), (3, 2));
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let (status, opened, retried) = send_with(&[Behaviour::Refuse]).await;
        assert!(status.is_err(), "{status:?}");
        assert_eq!(opened, SEND_ATTEMPTS as u64);
        assert_eq!(retried, SEND_ATTEMPTS as u64);
    }

    #[test]
    fn traceparent_is_w3c_shaped_and_unique() {
        let a = traceparent();
        let b = traceparent();
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4, "{a}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
        assert!(
            parts[1]
                .chars()
                .chain(parts[2].chars())
                .all(|c| c.is_ascii_hexdigit())
        );
    }

    #[test]
    fn connect_request_carries_istio_headers() {
        let target: SocketAddr = "198.18.2.10:5432".parse().expect("addr");
        let client: SocketAddr = "198.18.1.10:40000".parse().expect("addr");
        let req = connect_request(target, client, &baggage("default", "web", "web"));
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "198.18.2.10:5432");
        assert_eq!(req.headers()["forwarded"], "for=\"198.18.1.10:40000\"");
        assert!(
            req.headers()["baggage"]
                .to_str()
                .expect("ascii")
                .contains("k8s.namespace.name=default")
        );
    }
}
