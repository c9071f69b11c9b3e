//! Bounds on what peers can make the proxy hold: how many connections it
//! serves at once (all pods, both directions, plaintext and HBONE), how many
//! connections may sit in the HBONE handshake phase, how many HBONE
//! connections and streams one peer identity may hold, and how long an
//! HBONE connection may take to hand-shake, to send its first request, and
//! sit without streams; and how many bytes tunnel peers may send ahead of
//! the apps reading them (the HTTP/2 windows the agent grants), all
//! together and per peer identity.
//!
//! [`Limits`] is the configuration (with defaults sized from the process's
//! file-descriptor limit); [`Bounds`] enforces it with RAII permits (a
//! permit is held while the connection or stream lives; dropping it frees
//! the slot) and counts what it refused and closed, for metrics and
//! `/config_dump`. Over a cap, a connection is refused at once (reset, or
//! HTTP 503 for an HBONE stream), never queued.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

pub use crate::keyed::KeyPermit;
use crate::{identity::SpiffeId, keyed::PerKey, process::FdLimit};

/// File descriptors kept out of the connection budget (listeners, netns
/// handles, maps, the admin servers), at most.
pub const FD_RESERVE: u64 = 4096;
/// Default deadline for the TLS and HTTP/2 handshakes of an HBONE connection.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline for the first CONNECT after the HTTP/2 handshake.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an HBONE connection may carry no stream before it is closed
/// (longer than the client pool's own 30 s idle sweep, so a pooled client
/// connection is normally retired by its owner first).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default concurrent streams per inbound HBONE connection (Istio's).
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;
/// Default concurrent inbound HBONE connections per peer identity.
pub const DEFAULT_CONNECTIONS_PER_PEER: usize = 1024;
/// Upper bound of the default for connections in the handshake phase.
pub const MAX_DEFAULT_HANDSHAKES: usize = 4096;
/// How long a connection closed by a deadline gets to take its GOAWAY.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(5);
/// Default for [`Limits::max_tunnel_window`]: 1 GiB, 64 full (16 MiB)
/// connection windows.
pub const DEFAULT_TUNNEL_WINDOW: u64 = 1 << 30;
/// HTTP/2's initial connection window (RFC 9113 6.9.2): what every tunnel
/// connection grants its peer whatever the budget, as a connection window
/// can only be raised from it.
pub const H2_INITIAL_WINDOW: u32 = 65_535;

/// The limits in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent proxied connections, all pods and listeners together: each
    /// accepted socket (outbound, inbound plaintext, inbound HBONE) and each
    /// inbound HBONE stream holds one.
    pub max_connections: usize,
    /// Inbound HBONE connections in the handshake phase (from accept to the
    /// first CONNECT request), all pods together.
    pub max_handshakes: usize,
    /// Of those, from one source address: a client that opens connections
    /// and never completes them (no certificate needed) cannot take every
    /// handshake slot of the node.
    pub max_handshakes_per_source: usize,
    /// Concurrent inbound HBONE connections per peer identity.
    pub max_connections_per_peer: usize,
    /// Concurrent inbound HBONE streams per peer identity.
    pub max_streams_per_peer: usize,
    /// Concurrent streams per inbound HBONE connection (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Deadline, from accept, for the TLS and HTTP/2 handshakes.
    pub handshake_timeout: Duration,
    /// Deadline, from the end of the HTTP/2 handshake, for the first CONNECT.
    pub first_request_timeout: Duration,
    /// How long an HBONE connection may carry no stream before it is closed.
    pub idle_timeout: Duration,
    /// Bytes all tunnel connections together (inbound, and the pools'
    /// outbound ones) may let their peers send ahead of the apps reading
    /// them: the HTTP/2 connection windows
    /// the agent grants above HTTP/2's own 65,535 bytes (a grant above it
    /// is leased whole; one of 65,535 leases nothing), which is what peers
    /// can make it buffer. A connection is granted the full window
    /// while this budget (and its peer's share) has it, else what is left,
    /// at least 65,535 bytes; the grant returns when the connection ends.
    pub max_tunnel_window: u64,
    /// Of those, to the connections of one share: one identity in one
    /// direction (an inbound tunnel's peer; the identity an outbound
    /// tunnel is counted against). An identity can hold this in each
    /// direction.
    pub max_tunnel_window_per_peer: u64,
}

impl Default for Limits {
    /// The limits for a file-descriptor limit of 65 536.
    fn default() -> Self {
        Self::for_fd_limit(65_536)
    }
}

/// The descriptors of a soft limit of `nofile` kept out of the connection
/// budget: a quarter, at most [`FD_RESERVE`].
fn fd_reserve(nofile: u64) -> u64 {
    (nofile / 4).min(FD_RESERVE)
}

impl Limits {
    /// Defaults sized from the soft `RLIMIT_NOFILE`: a reserve (a quarter, at
    /// most [`FD_RESERVE`]) stays free for listeners and the agent itself,
    /// and every proxied connection is counted as two descriptors (the peer's
    /// socket and the agent's own to the app or upstream).
    pub fn for_fd_limit(nofile: u64) -> Self {
        let usable = nofile.saturating_sub(fd_reserve(nofile));
        let max_connections = usize::try_from(usable / 2).unwrap_or(usize::MAX).max(16);
        let max_handshakes = (max_connections / 4).clamp(4, MAX_DEFAULT_HANDSHAKES);
        Self {
            max_connections,
            max_handshakes,
            // An eighth: a source's pods, or a waypoint dialling every pod
            // of the node at once after a restart, stay well under it.
            max_handshakes_per_source: (max_handshakes / 8).max(2),
            max_connections_per_peer: DEFAULT_CONNECTIONS_PER_PEER.min(max_connections),
            max_streams_per_peer: (max_connections / 2).max(1),
            max_streams_per_connection: DEFAULT_STREAMS_PER_CONNECTION,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_tunnel_window: DEFAULT_TUNNEL_WINDOW,
            // A quarter: one identity filling its connections' windows
            // leaves three quarters to every other peer.
            max_tunnel_window_per_peer: DEFAULT_TUNNEL_WINDOW / 4,
        }
    }

    /// Raises this process's soft file-descriptor limit to the hard one (a
    /// proxy holds two descriptors per connection) and sizes the limits
    /// from it, with `overrides`; and the descriptor limit now in force.
    pub fn for_this_process(overrides: &LimitOverrides) -> (Self, FdLimit) {
        let fd_limit = match crate::process::raise_fd_limit() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "file-descriptor limit not raised");
                crate::process::fd_limit().unwrap_or_default()
            }
        };
        let limits = Self::for_fd_limit(fd_limit.soft).with_overrides(overrides);
        (limits, fd_limit)
    }

    /// These limits with every value `overrides` sets replacing the default.
    pub fn with_overrides(mut self, o: &LimitOverrides) -> Self {
        let set = |v: &mut usize, o: Option<usize>| *v = o.map_or(*v, |n| n.max(1));
        set(&mut self.max_connections, o.max_connections);
        set(&mut self.max_handshakes, o.max_handshakes);
        set(
            &mut self.max_handshakes_per_source,
            o.max_handshakes_per_source,
        );
        set(
            &mut self.max_connections_per_peer,
            o.max_connections_per_peer,
        );
        set(&mut self.max_streams_per_peer, o.max_streams_per_peer);
        if let Some(n) = o.max_streams_per_connection {
            self.max_streams_per_connection = n.max(1);
        }
        self.handshake_timeout = o.handshake_timeout.unwrap_or(self.handshake_timeout);
        self.first_request_timeout = o
            .first_request_timeout
            .unwrap_or(self.first_request_timeout);
        self.idle_timeout = o.idle_timeout.unwrap_or(self.idle_timeout);
        self.max_tunnel_window = o.max_tunnel_window.unwrap_or(self.max_tunnel_window);
        self.max_tunnel_window_per_peer = o
            .max_tunnel_window_per_peer
            .unwrap_or(self.max_tunnel_window_per_peer);
        self
    }

    /// The limits as JSON (`/config_dump`), durations in seconds.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "max_connections": self.max_connections,
            "max_handshakes": self.max_handshakes,
            "max_handshakes_per_source": self.max_handshakes_per_source,
            "max_connections_per_peer": self.max_connections_per_peer,
            "max_streams_per_peer": self.max_streams_per_peer,
            "max_streams_per_connection": self.max_streams_per_connection,
            "handshake_timeout_s": self.handshake_timeout.as_secs_f64(),
            "first_request_timeout_s": self.first_request_timeout.as_secs_f64(),
            "idle_timeout_s": self.idle_timeout.as_secs_f64(),
            "max_tunnel_window_bytes": self.max_tunnel_window,
            "max_tunnel_window_bytes_per_peer": self.max_tunnel_window_per_peer,
        })
    }
}

/// Limits set explicitly (flags, environment); `None` keeps the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    /// See [`Limits::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`Limits::max_handshakes`].
    pub max_handshakes: Option<usize>,
    /// See [`Limits::max_handshakes_per_source`].
    pub max_handshakes_per_source: Option<usize>,
    /// See [`Limits::max_connections_per_peer`].
    pub max_connections_per_peer: Option<usize>,
    /// See [`Limits::max_streams_per_peer`].
    pub max_streams_per_peer: Option<usize>,
    /// See [`Limits::max_streams_per_connection`].
    pub max_streams_per_connection: Option<u32>,
    /// See [`Limits::handshake_timeout`].
    pub handshake_timeout: Option<Duration>,
    /// See [`Limits::first_request_timeout`].
    pub first_request_timeout: Option<Duration>,
    /// See [`Limits::idle_timeout`].
    pub idle_timeout: Option<Duration>,
    /// See [`Limits::max_tunnel_window`].
    pub max_tunnel_window: Option<u64>,
    /// See [`Limits::max_tunnel_window_per_peer`].
    pub max_tunnel_window_per_peer: Option<u64>,
}

/// Which cap refused a connection or stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// [`Limits::max_connections`].
    Connections,
    /// [`Limits::max_handshakes`].
    Handshakes,
    /// [`Limits::max_handshakes_per_source`].
    SourceHandshakes,
    /// [`Limits::max_connections_per_peer`].
    PeerConnections,
    /// [`Limits::max_streams_per_peer`].
    PeerStreams,
}

impl Refusal {
    /// Every refusal, in metric order.
    pub const ALL: [Self; 5] = [
        Self::Connections,
        Self::Handshakes,
        Self::SourceHandshakes,
        Self::PeerConnections,
        Self::PeerStreams,
    ];

    /// The metric label: `connections`, `handshakes`,
    /// `handshakes_per_source`, `peer_connections`, `peer_streams`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Handshakes => "handshakes",
            Self::SourceHandshakes => "handshakes_per_source",
            Self::PeerConnections => "peer_connections",
            Self::PeerStreams => "peer_streams",
        }
    }

    /// The flag that raises this cap (for the operator reading the log).
    pub fn flag(self) -> &'static str {
        match self {
            Self::Connections => "--max-connections",
            Self::Handshakes => "--max-handshakes",
            Self::SourceHandshakes => "--max-handshakes-per-source",
            Self::PeerConnections => "--max-connections-per-peer",
            Self::PeerStreams => "--max-streams-per-peer",
        }
    }
}

/// Which deadline closed an HBONE connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No TLS and HTTP/2 handshake within [`Limits::handshake_timeout`].
    Handshake,
    /// No CONNECT within [`Limits::first_request_timeout`] of the handshake.
    FirstRequest,
    /// No stream for [`Limits::idle_timeout`].
    Idle,
}

impl Expiry {
    /// Every expiry, in metric order.
    pub const ALL: [Self; 3] = [Self::Handshake, Self::FirstRequest, Self::Idle];

    /// The metric label: `handshake_timeout`, `first_request_timeout`, `idle_timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake_timeout",
            Self::FirstRequest => "first_request_timeout",
            Self::Idle => "idle_timeout",
        }
    }
}

/// A counter of slots in use with a maximum.
#[derive(Debug)]
struct Gate {
    in_use: AtomicUsize,
    max: usize,
}

impl Gate {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            in_use: AtomicUsize::new(0),
            max,
        })
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut current = self.in_use.load(Ordering::Acquire);
        loop {
            if current >= self.max {
                return None;
            }
            match self.in_use.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Permit(self.clone())),
                Err(now) => current = now,
            }
        }
    }

    fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }
}

/// One slot of a global cap, freed when dropped.
#[derive(Debug)]
pub struct Permit(Arc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an inbound HBONE connection holds until its first CONNECT: a slot
/// of the handshake cap and one of its source address's.
#[derive(Debug)]
pub struct HandshakePermit {
    _source: KeyPermit<IpAddr>,
    _global: Permit,
}

/// Which side of a tunnel a window share is for: the peer identities of
/// inbound tunnels and the identities outbound ones are counted against
/// have separate shares, so that an identity's traffic in one direction
/// (for the waypoint: the clients calling a destination) cannot use up
/// what the same identity's tunnels in the other direction are granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Inbound,
    Outbound,
}

/// A window share: a side and an identity.
type ShareKey = (Side, SpiffeId);

/// The tunnel window budget: bytes granted in all, and per share (an
/// entry goes with its last grant), and the leases granted less than they
/// asked for, waiting for bytes, per share in arrival order, with the
/// shares in the order of their oldest waiter (`heads`: each waiting
/// share's first waiter's id).
#[derive(Debug, Default)]
struct Windows {
    granted: u64,
    per_peer: HashMap<ShareKey, u64>,
    waiting: HashMap<ShareKey, BTreeMap<u64, Waiting>>,
    heads: BTreeMap<u64, ShareKey>,
    next_waiter: u64,
    /// Wake-ups sent to waiting leases, for tests: one per grant handed.
    wakes: u64,
}

/// A reduced lease's place in the queue: what it still misses, the bytes
/// handed to it (already counted as granted) that it has not taken yet,
/// and its wake-up.
#[derive(Debug)]
struct Waiting {
    missing: u64,
    handed: u64,
    wake: Arc<Notify>,
}

/// The least a waiting lease is handed at once (unless it misses less):
/// freed bytes go to few leases in large steps, not to every reduced
/// connection a byte at a time.
const GROW_STEP: u64 = 256 * 1024;

/// The budget and its limits (total, per share).
#[derive(Debug)]
struct WindowBudget {
    windows: Mutex<Windows>,
    max_total: u64,
    max_share: u64,
}

impl WindowBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Windows {
    /// Queues a reduced lease of `share`; its id.
    fn enqueue(&mut self, share: &ShareKey, waiting: Waiting) -> u64 {
        let id = self.next_waiter;
        self.next_waiter += 1;
        let queue = self.waiting.entry(share.clone()).or_default();
        if queue.is_empty() {
            self.heads.insert(id, share.clone());
        }
        queue.insert(id, waiting);
        id
    }

    /// Takes the lease `id` out of `share`'s queue.
    fn dequeue(&mut self, share: &ShareKey, id: u64) -> Option<Waiting> {
        let queue = self.waiting.get_mut(share)?;
        let entry = queue.remove(&id)?;
        if self.heads.remove(&id).is_some() {
            match queue.first_key_value() {
                Some((next, _)) => {
                    self.heads.insert(*next, share.clone());
                }
                None => {
                    self.waiting.remove(share);
                }
            }
        }
        Some(entry)
    }

    /// Hands the free part of the budget to the waiting leases: shares in
    /// the order of their oldest waiter (no share is always served first),
    /// oldest first within a share, each share within its own limit; wakes
    /// only the leases handed bytes. A share at its limit is passed over
    /// without looking at its queue, so what a lease's return costs grows
    /// with the shares waiting, not the connections: a peer holding
    /// thousands of reduced connections makes nobody else's return walk or
    /// wake them.
    fn hand_out(&mut self, max_total: u64, max_share: u64) {
        let Self {
            granted,
            per_peer,
            waiting,
            heads,
            wakes,
            ..
        } = self;
        for share in heads.values() {
            let free = max_total.saturating_sub(*granted);
            if free == 0 {
                break;
            }
            let held = per_peer.get(share).copied().unwrap_or(0);
            let mut room = free.min(max_share.saturating_sub(held));
            let Some(queue) = waiting.get_mut(share).filter(|_| room > 0) else {
                continue;
            };
            let mut given = 0;
            for w in queue.values_mut() {
                // Handed all it misses, not yet taken by its connection.
                let need = w.missing - w.handed;
                if need == 0 {
                    continue;
                }
                let give = need.min(room);
                if give < need.min(GROW_STEP) {
                    break;
                }
                w.handed += give;
                room -= give;
                given += give;
                *wakes += 1;
                w.wake.notify_one();
            }
            if given > 0 {
                *granted += given;
                *per_peer.entry(share.clone()).or_insert(0) += given;
            }
        }
    }
}

/// An HTTP/2 connection window a tunnel connection grants its peer, leased
/// from the tunnel window budget ([`Limits::max_tunnel_window`]) and
/// returned when dropped: held for the connection's life, by both sides of
/// a tunnel (what a peer can send ahead of the apps reading it is what it
/// can make the agent buffer, whichever side dialled). A lease granted
/// less than it asked for waits in its share's queue and grows back
/// towards it as other leases return their bytes ([`Self::grown`]): a
/// connection opened while the budget was short is not held to HTTP/2's
/// 64 KiB for its whole life.
#[derive(Debug)]
pub struct WindowLease {
    budget: Arc<WindowBudget>,
    peer: ShareKey,
    leased: u64,
    window: u32,
    wanted: u32,
    /// The lease's place in its share's queue while reduced.
    waiting: Option<(u64, Arc<Notify>)>,
}

impl WindowLease {
    /// The connection window to grant the peer (`h2`'s
    /// `initial_connection_window_size`): at least [`H2_INITIAL_WINDOW`].
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Whether the lease holds less than it asked for.
    pub fn reduced(&self) -> bool {
        self.window < self.wanted
    }

    /// Takes the bytes handed to the lease since it last looked; the new
    /// window if it grew. Leaves the queue once it holds what it asked for.
    fn take_handed(&mut self) -> Option<u32> {
        let (id, _) = self.waiting.as_ref()?;
        let id = *id;
        let mut w = self.budget.lock();
        let entry = w.waiting.get_mut(&self.peer)?.get_mut(&id)?;
        let handed = std::mem::take(&mut entry.handed);
        entry.missing -= handed;
        if entry.missing == 0 {
            w.dequeue(&self.peer, id);
            self.waiting = None;
        }
        drop(w);
        if handed == 0 {
            return None;
        }
        self.leased += handed;
        self.window = u32::try_from(self.leased)
            .unwrap_or(u32::MAX)
            .max(H2_INITIAL_WINDOW);
        Some(self.window)
    }

    /// Waits until the lease has grown (other leases returned bytes to the
    /// budget and they were handed to this one); its new window, for
    /// `h2`'s `set_target_window_size`. Pending for ever once the lease
    /// holds what it asked for. Cancel-safe: select on it in the
    /// connection's loop (guarded by [`Self::reduced`]).
    pub async fn grown(&mut self) -> u32 {
        loop {
            let Some((_, wake)) = self.waiting.clone() else {
                return std::future::pending().await;
            };
            if let Some(window) = self.take_handed() {
                return window;
            }
            // A hand-out after the look above left a permit: no wake-up
            // is lost.
            wake.notified().await;
        }
    }
}

impl Drop for WindowLease {
    fn drop(&mut self) {
        let mut w = self.budget.lock();
        // Bytes handed but not taken were granted too.
        let mut back = self.leased;
        let mut left_queue = false;
        if let Some((id, _)) = self.waiting.take()
            && let Some(entry) = w.dequeue(&self.peer, id)
        {
            back += entry.handed;
            left_queue = true;
        }
        if back > 0 {
            w.granted = w.granted.saturating_sub(back);
            if let Some(n) = w.per_peer.get_mut(&self.peer) {
                *n = n.saturating_sub(back);
                if *n == 0 {
                    w.per_peer.remove(&self.peer);
                }
            }
        }
        // A waiter that leaves may have been holding up smaller ones
        // behind it: hand out again even when it returns nothing.
        if back > 0 || left_queue {
            w.hand_out(self.budget.max_total, self.budget.max_share);
        }
    }
}

/// What an inbound HBONE connection holds once its peer is known: a slot of
/// the peer's connection cap and the window it grants ([`WindowLease`]).
#[derive(Debug)]
pub struct TunnelPermit {
    _peer: KeyPermit<SpiffeId>,
    lease: WindowLease,
}

impl TunnelPermit {
    /// The connection window to grant the peer: [`WindowLease::window`].
    pub fn window(&self) -> u32 {
        self.lease.window()
    }

    /// Whether the window is less than asked for: [`WindowLease::reduced`].
    pub fn reduced(&self) -> bool {
        self.lease.reduced()
    }

    /// The window, once grown: [`WindowLease::grown`].
    pub async fn grown(&mut self) -> u32 {
        self.lease.grown().await
    }
}

/// What an inbound HBONE stream holds: its peer's stream slot and a global
/// connection slot.
#[derive(Debug)]
pub struct StreamPermit {
    _peer: KeyPermit<SpiffeId>,
    _global: Permit,
}

/// The limits enforced: permits, usage and the count of refusals and
/// deadline closes.
#[derive(Debug)]
pub struct Bounds {
    limits: Limits,
    fd_limit: FdLimit,
    connections: Arc<Gate>,
    handshakes: Arc<Gate>,
    source_handshakes: Arc<PerKey<IpAddr>>,
    peer_connections: Arc<PerKey<SpiffeId>>,
    peer_streams: Arc<PerKey<SpiffeId>>,
    windows: Arc<WindowBudget>,
    refused: [AtomicU64; Refusal::ALL.len()],
    closed: [AtomicU64; 3],
    /// Tunnel connections granted less than the window they asked for.
    reduced: AtomicU64,
    /// Milliseconds since `epoch` of the last refusal logged, per refusal,
    /// and of the last reduced window logged.
    last_logged: [AtomicU64; Refusal::ALL.len() + 1],
    epoch: Instant,
}

impl Default for Bounds {
    fn default() -> Self {
        Self::new(Limits::default(), FdLimit::default())
    }
}

/// A snapshot of the bounds' usage, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// (limit, in use, maximum): `connections`, `handshakes`, and for the
    /// per-peer caps the most any one peer holds.
    pub in_use: Vec<(&'static str, u64, u64)>,
    /// (limit, refusals so far).
    pub refused: Vec<(&'static str, u64)>,
    /// (deadline, connections closed by it so far).
    pub closed: Vec<(&'static str, u64)>,
    /// (limit, connections granted less than they asked for so far):
    /// `tunnel_window`.
    pub reduced: Vec<(&'static str, u64)>,
    /// Peer identities holding inbound HBONE connections.
    pub peers: u64,
    /// The soft file-descriptor limit.
    pub fd_limit: u64,
}

impl Bounds {
    /// Enforces `limits`; `fd_limit` is reported as it is.
    pub fn new(limits: Limits, fd_limit: FdLimit) -> Self {
        Self {
            connections: Gate::new(limits.max_connections),
            handshakes: Gate::new(limits.max_handshakes),
            source_handshakes: PerKey::new(limits.max_handshakes_per_source),
            peer_connections: PerKey::new(limits.max_connections_per_peer),
            peer_streams: PerKey::new(limits.max_streams_per_peer),
            windows: Arc::new(WindowBudget {
                windows: Mutex::default(),
                max_total: limits.max_tunnel_window,
                max_share: limits.max_tunnel_window_per_peer,
            }),
            limits,
            fd_limit,
            refused: Default::default(),
            closed: Default::default(),
            reduced: AtomicU64::new(0),
            last_logged: Default::default(),
            epoch: Instant::now(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn refuse(&self, r: Refusal) -> Refusal {
        let i = r as usize;
        let n = self.refused[i].fetch_add(1, Ordering::Relaxed) + 1;
        if self.log_due(i, n) {
            tracing::warn!(
                limit = r.as_str(),
                refused_total = n,
                flag = r.flag(),
                "connection refused by a limit"
            );
        }
        r
    }

    /// Whether the `n`-th event of log slot `i` is logged: the first, then
    /// at most one a second (a flood must not flood the log).
    fn log_due(&self, i: usize, n: u64) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_logged[i].load(Ordering::Relaxed);
        (n == 1 || now.saturating_sub(last) >= 1000)
            && self.last_logged[i]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A slot of the global connection cap.
    pub fn connection(&self) -> Result<Permit, Refusal> {
        self.connections
            .try_acquire()
            .ok_or_else(|| self.refuse(Refusal::Connections))
    }

    /// A slot of the handshake-phase cap, and one of `source`'s.
    pub fn handshake(&self, source: IpAddr) -> Result<HandshakePermit, Refusal> {
        let source = self
            .source_handshakes
            .try_acquire(&source)
            .ok_or_else(|| self.refuse(Refusal::SourceHandshakes))?;
        let global = self
            .handshakes
            .try_acquire()
            .ok_or_else(|| self.refuse(Refusal::Handshakes))?;
        Ok(HandshakePermit {
            _source: source,
            _global: global,
        })
    }

    /// What an inbound HBONE connection of `peer` holds for its life: a slot
    /// of the peer's connection cap, and the connection window it grants
    /// ([`Self::window`]).
    pub fn tunnel(&self, peer: &SpiffeId, want: u32) -> Result<TunnelPermit, Refusal> {
        let slot = self
            .peer_connections
            .try_acquire(peer)
            .ok_or_else(|| self.refuse(Refusal::PeerConnections))?;
        Ok(TunnelPermit {
            _peer: slot,
            lease: self.lease((Side::Inbound, peer.clone()), want),
        })
    }

    /// The connection window an outbound tunnel connection grants its
    /// peer, for the connection's life, counted against `share`'s outbound
    /// share (the identity that decides how much of it is used: for the
    /// agent's outbound tunnels the local client's, whose app opens them
    /// and reads them or not; for the waypoint's, the destination's; an
    /// inbound tunnel's is its peer's inbound share, [`Self::tunnel`]):
    /// `want` bytes if the tunnel window budget and that share have them,
    /// else what they have left, at least [`H2_INITIAL_WINDOW`] (counted
    /// and logged as reduced; the lease grows back as bytes return,
    /// [`WindowLease::grown`]). Never refused: HTTP/2's own window is
    /// always granted.
    pub fn window(&self, share: &SpiffeId, want: u32) -> WindowLease {
        self.lease((Side::Outbound, share.clone()), want)
    }

    /// A window lease of `want` bytes against `share`: [`Self::window`].
    fn lease(&self, share: ShareKey, want: u32) -> WindowLease {
        let want = want.max(H2_INITIAL_WINDOW);
        let (leased, window, waiting) = {
            let mut w = self.windows.lock();
            let held = w.per_peer.get(&share).copied().unwrap_or(0);
            let grant = u64::from(want)
                .min(self.windows.max_total.saturating_sub(w.granted))
                .min(self.windows.max_share.saturating_sub(held));
            let (leased, window) = match u32::try_from(grant) {
                Ok(g) if g > H2_INITIAL_WINDOW => {
                    w.granted += grant;
                    *w.per_peer.entry(share.clone()).or_insert(0) += grant;
                    (grant, g)
                }
                _ => (0, H2_INITIAL_WINDOW),
            };
            // Reduced: queue for the bytes returned from now on.
            let waiting = (window < want).then(|| {
                let wake = Arc::new(Notify::new());
                let id = w.enqueue(
                    &share,
                    Waiting {
                        missing: u64::from(want) - leased,
                        handed: 0,
                        wake: wake.clone(),
                    },
                );
                (id, wake)
            });
            (leased, window, waiting)
        };
        if window < want {
            let n = self.reduced.fetch_add(1, Ordering::Relaxed) + 1;
            if self.log_due(Refusal::ALL.len(), n) {
                tracing::warn!(
                    limit = "tunnel_window",
                    share = %share.1,
                    side = ?share.0,
                    window,
                    wanted = want,
                    reduced_total = n,
                    flag = "--max-tunnel-window-bytes, --max-tunnel-window-bytes-per-peer",
                    "tunnel connection granted a reduced window by a limit; it grows back as the budget frees"
                );
            }
        }
        WindowLease {
            budget: self.windows.clone(),
            peer: share,
            leased,
            window,
            wanted: want,
            waiting,
        }
    }

    /// The slots an inbound HBONE stream of `peer` holds: one of the peer's
    /// stream cap and one of the global connection cap.
    pub fn stream(&self, peer: &SpiffeId) -> Result<StreamPermit, Refusal> {
        let peer_slot = self
            .peer_streams
            .try_acquire(peer)
            .ok_or_else(|| self.refuse(Refusal::PeerStreams))?;
        let global = self.connection()?;
        Ok(StreamPermit {
            _peer: peer_slot,
            _global: global,
        })
    }

    /// Counts a connection closed by a deadline.
    pub fn expired(&self, e: Expiry) {
        self.closed[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far by `r`.
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].load(Ordering::Relaxed)
    }

    /// The usage now.
    pub fn usage(&self) -> Usage {
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let (peers, _, most_conns) = self.peer_connections.usage();
        let (_, _, most_streams) = self.peer_streams.usage();
        let (_, _, most_handshakes) = self.source_handshakes.usage();
        let (window_granted, window_most) = {
            let w = self.windows.lock();
            (w.granted, w.per_peer.values().copied().max().unwrap_or(0))
        };
        let l = &self.limits;
        Usage {
            in_use: vec![
                (
                    "connections",
                    as_u64(self.connections.in_use()),
                    as_u64(l.max_connections),
                ),
                (
                    "handshakes",
                    as_u64(self.handshakes.in_use()),
                    as_u64(l.max_handshakes),
                ),
                (
                    "handshakes_per_source",
                    as_u64(most_handshakes),
                    as_u64(l.max_handshakes_per_source),
                ),
                (
                    "peer_connections",
                    as_u64(most_conns),
                    as_u64(l.max_connections_per_peer),
                ),
                (
                    "peer_streams",
                    as_u64(most_streams),
                    as_u64(l.max_streams_per_peer),
                ),
                ("tunnel_window_bytes", window_granted, l.max_tunnel_window),
                (
                    "tunnel_window_bytes_per_peer",
                    window_most,
                    l.max_tunnel_window_per_peer,
                ),
            ],
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.as_str(), self.refused(*r)))
                .collect(),
            closed: Expiry::ALL
                .iter()
                .map(|e| (e.as_str(), self.closed[*e as usize].load(Ordering::Relaxed)))
                .collect(),
            reduced: vec![("tunnel_window", self.reduced.load(Ordering::Relaxed))],
            peers: as_u64(peers),
            fd_limit: self.fd_limit.soft,
        }
    }

    /// How many pipes the plaintext relays may hold open at once
    /// (`super::splice`; two descriptors each): an eighth of the
    /// descriptors [`Limits::for_fd_limit`] keeps out of the connection
    /// budget, so that connections splicing at once cannot take the
    /// listeners' and the agent's own. 256 for a limit of 16 384 or more.
    pub fn max_pipes(&self) -> usize {
        usize::try_from(fd_reserve(self.fd_limit.soft) / 16).unwrap_or(usize::MAX)
    }

    /// The limits, the descriptor limit and the usage, as JSON (`/config_dump`).
    pub fn to_json(&self) -> serde_json::Value {
        let u = self.usage();
        let pairs = |v: &[(&'static str, u64)]| {
            serde_json::Value::Object(
                v.iter()
                    .map(|(k, n)| ((*k).to_owned(), (*n).into()))
                    .collect(),
            )
        };
        serde_json::json!({
            "limits": self.limits.to_json(),
            "fd_limit": self.fd_limit.to_json(),
            "max_pipes": self.max_pipes(),
            "in_use": serde_json::Value::Object(
                u.in_use.iter().map(|(k, n, _)| ((*k).to_owned(), (*n).into())).collect()
            ),
            "peers": u.peers,
            "refused": pairs(&u.refused),
            "closed": pairs(&u.closed),
            "reduced": pairs(&u.reduced),
        })
    }
}

/// How often [`trim_after_bursts`] looks at the connection count.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// Connections that must have closed since the last peak before freed memory
/// is handed back to the OS.
pub const TRIM_AFTER_CLOSED: usize = 1000;

/// Whether freed memory is worth handing back: at least
/// [`TRIM_AFTER_CLOSED`] connections closed since the peak.
fn worth_trimming(peak: usize, now: usize) -> bool {
    peak.saturating_sub(now) >= TRIM_AFTER_CLOSED
}

/// Hands memory freed by closed connections back to the OS after a burst.
///
/// Allocators keep freed memory for reuse: after a burst of thousands of
/// connections the agent's RSS stays near the burst's peak (measured in the
/// lab under glibc's malloc: 31 MB idle, ~80 MB after rounds of 5 000
/// concurrent connections, 37 MB after `malloc_trim(0)`; the memory is
/// reused, not leaked). The agent's jemalloc returns unused pages by itself
/// after its decay time; every [`TRIM_INTERVAL`], if at least
/// [`TRIM_AFTER_CLOSED`] connections closed since the highest count seen,
/// [`crate::process::release_free_memory`] purges them at once (and trims
/// what C code allocated from glibc). Runs until the runtime stops.
pub async fn trim_after_bursts(bounds: Arc<Bounds>) {
    let mut peak = 0usize;
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    loop {
        tick.tick().await;
        let now = bounds.connections.in_use();
        peak = peak.max(now);
        if !worth_trimming(peak, now) {
            continue;
        }
        peak = now;
        let trimmed = tokio::task::spawn_blocking(crate::process::release_free_memory).await;
        tracing::debug!(connections = now, released = ?trimmed.ok(), "returned freed memory to the OS");
    }
}

/// The streams of one inbound HBONE connection, for its idle deadline.
#[derive(Debug)]
pub struct Activity {
    active: AtomicUsize,
    served: AtomicUsize,
    idle_since: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    /// A connection that has carried no stream yet, idle from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            changed: Notify::new(),
        })
    }

    /// Marks a stream open until the guard drops.
    pub fn stream(self: &Arc<Self>) -> ActivityGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    /// When the connection expires if nothing changes, and why: `None` while
    /// a stream is open. Before the first stream the first-request deadline
    /// applies, afterwards the idle timeout.
    pub fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.served.load(Ordering::Acquire) == 0 {
            Some((since + limits.first_request_timeout, Expiry::FirstRequest))
        } else {
            Some((since + limits.idle_timeout, Expiry::Idle))
        }
    }

    /// Resolves when a stream opens or closes (the deadline may have moved).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// An open stream of an [`Activity`].
#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .0
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
        self.0.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(
            TrustDomain::new("cluster.local").expect("td"),
            "default",
            sa,
        )
        .expect("id")
    }

    fn small() -> Limits {
        Limits {
            max_connections: 3,
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            max_connections_per_peer: 2,
            max_streams_per_peer: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn the_global_cap_refuses_beyond_it_counts_and_frees_on_drop() {
        let b = Bounds::new(small(), FdLimit::default());
        let p1 = b.connection().expect("1");
        let _p2 = b.connection().expect("2");
        let _p3 = b.connection().expect("3");
        assert_eq!(b.connection().err(), Some(Refusal::Connections));
        assert_eq!(b.refused(Refusal::Connections), 1);
        drop(p1);
        let _p4 = b.connection().expect("a freed slot is reusable");
        assert_eq!(b.usage().in_use[0], ("connections", 3, 3));
    }

    #[test]
    fn handshakes_have_their_own_caps_overall_and_per_source() {
        let b = Bounds::new(small(), FdLimit::default());
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let (x, y, z) = (ip("198.18.0.1"), ip("198.18.0.2"), ip("2001:db8::3"));
        let _x = [b.handshake(x).expect("x1"), b.handshake(x).expect("x2")];
        // One source cannot take every slot...
        assert_eq!(b.handshake(x).err(), Some(Refusal::SourceHandshakes));
        // ...so another still gets one, until the node's cap is reached.
        let y1 = b.handshake(y).expect("another source is not affected");
        assert_eq!(b.handshake(z).err(), Some(Refusal::Handshakes));
        // The global connection cap is separate.
        let _c = b.connection().expect("connection");
        assert_eq!(b.refused(Refusal::SourceHandshakes), 1);
        assert_eq!(b.refused(Refusal::Handshakes), 1);
        assert_eq!(b.refused(Refusal::Connections), 0);
        // A refusal by the node's cap kept nothing of z's.
        drop(y1);
        let _z = [b.handshake(z).expect("z1")];
        assert_eq!(b.usage().in_use[2], ("handshakes_per_source", 2, 2));
    }

    #[test]
    fn per_peer_caps_are_per_identity_and_the_map_shrinks_back() {
        let b = Bounds::new(small(), FdLimit::default());
        let (a, c) = (id("a"), id("c"));
        let a1 = b.tunnel(&a, H2_INITIAL_WINDOW).expect("a1");
        let a2 = b.tunnel(&a, H2_INITIAL_WINDOW).expect("a2");
        assert_eq!(
            b.tunnel(&a, H2_INITIAL_WINDOW).err(),
            Some(Refusal::PeerConnections)
        );
        let c1 = b
            .tunnel(&c, H2_INITIAL_WINDOW)
            .expect("another peer is not affected");
        assert_eq!(b.usage().peers, 2);
        drop((a1, a2, c1));
        assert_eq!(
            b.usage().peers,
            0,
            "no entry stays for a peer holding nothing"
        );
        assert_eq!(b.peer_streams.usage().0, 0, "the map holds no key");
    }

    #[test]
    fn a_stream_holds_a_peer_slot_and_a_global_slot() {
        let b = Bounds::new(small(), FdLimit::default());
        let a = id("a");
        let s1 = b.stream(&a).expect("s1");
        let _s2 = b.stream(&a).expect("s2");
        assert_eq!(b.stream(&a).err(), Some(Refusal::PeerStreams));
        // Another peer gets the last global slot, then the global cap refuses.
        let _s3 = b.stream(&id("c")).expect("s3");
        assert_eq!(b.stream(&id("d")).err(), Some(Refusal::Connections));
        // A refusal by the global cap leaves no peer slot behind.
        assert_eq!(b.peer_streams.usage(), (2, 3, 2));
        drop(s1);
        assert_eq!(b.peer_streams.usage(), (2, 2, 1));
        let u = b.usage();
        assert_eq!(u.refused[4], ("peer_streams", 1));
        assert_eq!(u.refused[0], ("connections", 1));
    }

    #[test]
    fn defaults_follow_the_descriptor_limit_and_overrides_win() {
        let big = Limits::for_fd_limit(1 << 20);
        assert_eq!(big.max_connections, ((1 << 20) - FD_RESERVE as usize) / 2);
        assert_eq!(big.max_handshakes, MAX_DEFAULT_HANDSHAKES);
        assert_eq!(big.max_streams_per_connection, 100);
        let tiny = Limits::for_fd_limit(1024);
        assert_eq!(tiny.max_connections, (1024 - 256) / 2);
        assert!(tiny.max_handshakes < tiny.max_connections);
        assert!(tiny.max_connections_per_peer <= tiny.max_connections);
        let o = LimitOverrides {
            max_connections: Some(7),
            max_streams_per_connection: Some(0),
            idle_timeout: Some(Duration::from_secs(2)),
            ..LimitOverrides::default()
        };
        let l = tiny.clone().with_overrides(&o);
        assert_eq!(l.max_connections, 7);
        assert_eq!(
            l.max_streams_per_connection, 1,
            "a cap of 0 would refuse everything"
        );
        assert_eq!(l.idle_timeout, Duration::from_secs(2));
        assert_eq!(l.max_handshakes, tiny.max_handshakes);
    }

    #[test]
    fn tunnel_windows_come_from_a_budget_with_a_share_per_peer_and_return_on_drop() {
        const MIB: u32 = 1 << 20;
        let b = Bounds::new(
            Limits {
                max_connections_per_peer: 100,
                max_tunnel_window: 10 * u64::from(MIB),
                max_tunnel_window_per_peer: 6 * u64::from(MIB),
                ..Limits::default()
            },
            FdLimit::default(),
        );
        let (a, c) = (id("a"), id("c"));
        let used = |b: &Bounds| {
            let u = b.usage();
            let get = |name| {
                u.in_use
                    .iter()
                    .find(|(k, _, _)| *k == name)
                    .map(|(_, n, _)| *n)
            };
            (
                get("tunnel_window_bytes"),
                get("tunnel_window_bytes_per_peer"),
                u.reduced[0].1,
            )
        };
        // The peer's share: 4 + 2 MiB, then only HTTP/2's own window.
        let a1 = b.tunnel(&a, 4 * MIB).expect("a1");
        let a2 = b.tunnel(&a, 4 * MIB).expect("a2");
        let a3 = b.tunnel(&a, 4 * MIB).expect("a3");
        assert_eq!(
            [a1.window(), a2.window(), a3.window()],
            [4 * MIB, 2 * MIB, H2_INITIAL_WINDOW]
        );
        assert_eq!(used(&b), (Some(6 << 20), Some(6 << 20), 2));
        // Another peer takes what is left of the budget: 4 MiB.
        let c1 = b.tunnel(&c, 5 * MIB).expect("c1");
        assert_eq!(c1.window(), 4 * MIB);
        assert_eq!(used(&b), (Some(10 << 20), Some(6 << 20), 3));
        // Below HTTP/2's own window nothing is leased, nor counted as reduced.
        let small = b.tunnel(&c, 1000).expect("small");
        assert_eq!(small.window(), H2_INITIAL_WINDOW);
        assert_eq!(used(&b).2, 3);
        // Returned on drop: a's share is free again, the map shrinks back;
        // c1, reduced, was handed the MiB it missed.
        drop((a1, a2, a3));
        assert_eq!(used(&b), (Some(5 << 20), Some(5 << 20), 3));
        assert_eq!(b.tunnel(&a, 4 * MIB).expect("a4").window(), 4 * MIB);
        drop((c1, small));
        assert_eq!(used(&b).0, Some(0));
        assert!(b.windows.lock().per_peer.is_empty());
        assert!(b.windows.lock().waiting.is_empty());
    }

    /// Bounds with a tunnel window budget of `total` MiB, `share` MiB each.
    fn window_budget(total: u64, share: u64) -> Bounds {
        Bounds::new(
            Limits {
                max_tunnel_window: total << 20,
                max_tunnel_window_per_peer: share << 20,
                ..Limits::default()
            },
            FdLimit::default(),
        )
    }

    /// Bytes returned go to the shares in the order their oldest waiter
    /// came, not in the order a hash map keeps them: no share is always
    /// served first.
    #[test]
    fn returned_bytes_go_to_the_shares_oldest_waiter_first() {
        const MIB: u32 = 1 << 20;
        let b = window_budget(4, 4);
        let full = b.window(&id("x"), 4 * MIB);
        let mut waiting: Vec<WindowLease> = (0..20)
            .map(|i| b.window(&id(&format!("s{i}")), MIB))
            .collect();
        drop(full);
        let handed: Vec<bool> = waiting
            .iter_mut()
            .map(|lease| lease.take_handed().is_some())
            .collect();
        let first_four: Vec<bool> = (0..20).map(|i| i < 4).collect();
        assert_eq!(handed, first_four);
    }

    /// A waiter that leaves, even holding nothing, lets the smaller ones
    /// behind it take what is free, at once.
    #[test]
    fn a_waiter_leaving_hands_its_place_on() {
        const KIB: u32 = 1 << 10;
        let b = window_budget(1, 1);
        let a = id("a");
        let held = b.window(&a, 900 * KIB);
        let freed = b.window(&a, 70 * KIB);
        // 54 KiB free: both wait, holding nothing.
        let big = b.window(&a, 1024 * KIB);
        let mut small = b.window(&a, 80 * KIB);
        assert_eq!((big.leased, small.leased), (0, 0));
        // 124 KiB free: less than the big one's step, so the queue waits.
        drop(freed);
        assert_eq!(small.take_handed(), None);
        drop(big);
        assert_eq!(small.take_handed(), Some(80 * KIB));
        drop((held, small));
        let w = b.windows.lock();
        assert_eq!((w.granted, w.waiting.len(), w.heads.len()), (0, 0, 0));
    }

    /// An identity's inbound tunnels and the outbound ones counted against
    /// it have separate shares: the waypoint's clients calling a
    /// destination cannot use up the window of the destination's own
    /// tunnels to the waypoint.
    #[test]
    fn inbound_and_outbound_shares_of_one_identity_are_separate() {
        const MIB: u32 = 1 << 20;
        let b = window_budget(8, 2);
        let a = id("a");
        let outbound = b.window(&a, 2 * MIB);
        let inbound = b.tunnel(&a, 2 * MIB).expect("tunnel");
        assert_eq!([outbound.window(), inbound.window()], [2 * MIB, 2 * MIB]);
        assert!(
            b.window(&a, 2 * MIB).reduced(),
            "the outbound share is full"
        );
        assert!(
            b.tunnel(&a, 2 * MIB).expect("tunnel").lease.reduced(),
            "the inbound share is full"
        );
    }

    /// A lease granted less than it asked for grows as other leases return
    /// bytes, within its share, up to what it asked for, and no further.
    #[tokio::test]
    async fn a_reduced_lease_grows_as_the_budget_frees_within_its_share() {
        const MIB: u32 = 1 << 20;
        let b = window_budget(4, 3);
        let (a, c) = (id("a"), id("c"));
        let a1 = b.window(&a, 2 * MIB);
        let c1 = b.window(&c, 2 * MIB);
        let mut a2 = b.window(&a, 2 * MIB);
        assert_eq!(a2.window(), H2_INITIAL_WINDOW);
        assert!(a2.reduced());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), a2.grown())
                .await
                .is_err(),
            "nothing was freed"
        );
        // 2 MiB free in the budget, 1 MiB left of a's share.
        drop(c1);
        let grown = tokio::time::timeout(Duration::from_secs(1), a2.grown()).await;
        assert_eq!(grown, Ok(MIB));
        // a's share frees: up to what it asked for.
        drop(a1);
        let grown = tokio::time::timeout(Duration::from_secs(1), a2.grown()).await;
        assert_eq!(grown, Ok(2 * MIB));
        assert!(!a2.reduced());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), a2.grown())
                .await
                .is_err(),
            "it holds what it asked for"
        );
        assert_eq!(b.windows.lock().granted, 2 * u64::from(MIB));
        drop(a2);
        assert_eq!(b.windows.lock().granted, 0);
    }

    /// Returned bytes wake only the leases they are handed to, oldest
    /// first, in steps: a share at its limit is neither woken nor walked
    /// however many leases of other shares come and go.
    #[tokio::test]
    async fn returned_bytes_wake_only_the_leases_they_are_handed_to() {
        const MIB: u32 = 1 << 20;
        let b = window_budget(8, 2);
        let (a, c) = (id("a"), id("c"));
        let a_full = b.window(&a, 2 * MIB);
        let mut waiting: Vec<WindowLease> = (0..100).map(|_| b.window(&a, 2 * MIB)).collect();
        assert!(waiting.iter().all(WindowLease::reduced));
        // Another share's connections come and go: a's share is full.
        for _ in 0..200 {
            drop(b.window(&c, 2 * MIB));
        }
        assert_eq!(b.windows.lock().wakes, 0, "nothing a's waiters could take");
        // a's share frees: its 2 MiB go to the oldest waiter, one wake-up.
        drop(a_full);
        assert_eq!(b.windows.lock().wakes, 1);
        let first = tokio::time::timeout(Duration::from_secs(1), waiting[0].grown()).await;
        assert_eq!(first, Ok(2 * MIB));
        for later in &mut waiting[1..4] {
            assert!(
                tokio::time::timeout(Duration::from_millis(10), later.grown())
                    .await
                    .is_err(),
                "only the oldest was handed the bytes"
            );
        }
        // The grown lease returns them: the next waiter, and only it.
        waiting.remove(0);
        assert_eq!(b.windows.lock().wakes, 2);
        let next = tokio::time::timeout(Duration::from_secs(1), waiting[0].grown()).await;
        assert_eq!(next, Ok(2 * MIB));
        // Waiters that go return what they were handed and leave the queue.
        drop(waiting);
        let w = b.windows.lock();
        assert_eq!((w.granted, w.per_peer.len(), w.waiting.len()), (0, 0, 0));
    }

    #[test]
    fn the_idle_deadline_starts_with_the_first_request_and_pauses_while_streams_are_open() {
        let limits = Limits {
            first_request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let a = Activity::new();
        let (at, why) = a
            .deadline(&limits)
            .expect("a deadline before the first stream");
        assert_eq!(why, Expiry::FirstRequest);
        assert!(at <= Instant::now() + Duration::from_secs(5));
        let s = a.stream();
        let s2 = a.stream();
        assert_eq!(a.deadline(&limits), None);
        drop(s);
        assert_eq!(a.deadline(&limits), None, "one stream is still open");
        drop(s2);
        let (at, why) = a.deadline(&limits).expect("idle again");
        assert_eq!(why, Expiry::Idle);
        assert!(at > Instant::now() + Duration::from_secs(30));
    }

    #[tokio::test]
    async fn closing_a_stream_wakes_the_deadline_watcher() {
        let a = Activity::new();
        let s = a.stream();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.changed().await })
        };
        drop(s);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .expect("task");
    }

    #[test]
    fn memory_is_trimmed_only_after_a_burst_closed() {
        assert!(!worth_trimming(0, 0));
        assert!(!worth_trimming(5000, 4500));
        assert!(worth_trimming(5000, 4000));
        assert!(!worth_trimming(10, 20), "growth is no reason");
    }
}
