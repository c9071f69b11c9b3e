//! The L4 proxy: the in-pod outbound listener (captured connects), the in-pod
//! inbound listeners (steered by `sk_lookup`: HBONE on 15008, plaintext on
//! every other port), and the byte relays between them and the sockets the
//! agent opens from inside the pod's netns.
//!
//! Outbound to a mesh workload goes through an HBONE tunnel (mTLS HTTP/2
//! CONNECT) under the source pod's identity; outbound to anything else is
//! passed through in plaintext.
#![forbid(unsafe_code)]

pub mod authz;
mod copy;
mod error;
pub mod hbone;
mod inbound;
mod inbound_hbone;
pub mod limits;
mod outbound;
mod same_node;
mod splice;
pub mod threads;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpStream, runtime::Handle};
use tokio_util::sync::CancellationToken;

pub use copy::{RelayOutcome, RelayResult, Splice, Splicing, relay};
pub use error::Error;

use crate::{
    datapath::{DeliveryExemption, Exemptions, OrigDstTable, ReplyRoutes, netns::NetnsWorker},
    identity::{MeshTls, SpiffeId},
    state::{Store, WorkloadKey},
    telemetry::{ConnectionTracker, PolicyDecision, Telemetry},
};

/// How long the agent waits for an upstream or delivery connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Transparent delivery sockets tried (each on a random port) before a
/// delivery falls back to the pod's own address.
const DELIVERY_TRIES: usize = 16;

/// The ports the agent listens on inside every enrolled pod's netns
/// (outbound capture, inbound plaintext, inbound HBONE). A connection the
/// agent makes from the pod's netns to one of them would reach the agent
/// itself, not an app: see [`PodContext::is_agent_listener`].
pub const AGENT_POD_PORTS: [u16; 3] = [
    mesh_common::OUTBOUND_PORT,
    mesh_common::INBOUND_PLAINTEXT_PORT,
    mesh_common::INBOUND_HBONE_PORT,
];

/// What the proxy knows of an enrolled pod.
pub struct PodContext {
    /// The pod.
    pub key: WorkloadKey,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Cookie of the pod's netns.
    pub netns_cookie: u64,
    /// Creates sockets inside the pod's netns.
    pub worker: Arc<NetnsWorker>,
    /// The pod's SPIFFE identity.
    pub identity: SpiffeId,
    /// The pod's service account (baggage, logs).
    pub service_account: String,
    /// The pod's labels (policy selectors).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The agent's sockets the kernel programs leave alone.
    pub exempt: Arc<Exemptions>,
    /// Which families' replies the pod routes back to a transparent delivery.
    pub reply_routes: ReplyRoutes,
}

/// A connection the agent opened to an app inside its pod
/// ([`PodContext::deliver`]). One made from the client's address keeps its
/// tuple exempt from `sk_lookup` while this lives (see `datapath::exempt`):
/// keep it for the connection's life, and move only `stream` into the
/// relay.
pub struct AppConnection {
    /// The connection.
    pub stream: TcpStream,
    _tuple: Option<DeliveryExemption>,
}

impl PodContext {
    /// Whether a connection made from this pod's netns to `dst` would land
    /// on one of the agent's own listeners in the pod (a port of
    /// [`AGENT_POD_PORTS`] on the pod's addresses, loopback or the
    /// unspecified address). The agent must never dial such an address: the
    /// delivery would be accepted by the agent again and again (a loop).
    /// Outbound (captured connects), inbound plaintext and inbound HBONE
    /// CONNECT targets all refuse on this one check.
    pub fn is_agent_listener(&self, dst: SocketAddr) -> bool {
        is_agent_listener(&self.ips, dst)
    }

    /// Connects to `dst` from a socket created inside the pod's netns,
    /// exempt from capture (its cookie in the agent's exemption map).
    pub async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        Ok(self.connect_from_pod(dst).await?.stream)
    }

    /// [`PodContext::connect`], as a delivery from the pod's own address
    /// (nothing is held past the connect).
    async fn connect_from_pod(&self, dst: SocketAddr) -> std::io::Result<AppConnection> {
        let (sock, _) = self.worker.connect_socket(dst, None).await?;
        self.connect_exempt(sock, dst, None).await
    }

    /// Whether the app at `dst` can be delivered a connection from the
    /// client address `client`: `Ok(Some(client))` to bind it
    /// transparently, `Ok(None)` when it is one of the pod's own addresses
    /// (nothing to bind: the kernel picks it), or why not.
    pub fn delivery_source(
        &self,
        client: IpAddr,
        dst: SocketAddr,
    ) -> Result<Option<IpAddr>, &'static str> {
        let client = client.to_canonical();
        if client.is_ipv4() != dst.ip().to_canonical().is_ipv4() {
            return Err("client_family_differs");
        }
        if client.is_unspecified() || client.is_loopback() || client.is_multicast() {
            return Err("client_address_unusable");
        }
        if self.ips.contains(&client) {
            return Ok(None);
        }
        let routed = if client.is_ipv4() {
            self.reply_routes.v4
        } else {
            self.reply_routes.v6
        };
        if !routed {
            return Err("no_reply_route_in_pod");
        }
        Ok(Some(client))
    }

    /// Delivers a connection to the app at `dst` (inside the pod's netns)
    /// from the client address `source` decided by
    /// [`PodContext::delivery_source`] (`Err`: from the pod's own address).
    /// A transparent socket that cannot be set up falls back to the pod's
    /// address, never failing the connection for it. Returns the connection
    /// and whether the client's address was used (or why not).
    pub async fn deliver(
        &self,
        dst: SocketAddr,
        source: Result<Option<IpAddr>, &'static str>,
    ) -> (std::io::Result<AppConnection>, Result<(), &'static str>) {
        let preserved = match source {
            Ok(None) => return (self.connect_from_pod(dst).await, Ok(())),
            Err(why) => return (self.connect_from_pod(dst).await, Err(why)),
            Ok(Some(client)) => client,
        };
        for _ in 0..DELIVERY_TRIES {
            let opened = self.worker.connect_socket(dst, Some(preserved)).await;
            match opened {
                Ok((sock, bound)) => match self.connect_exempt(sock, dst, bound).await {
                    // The random port's 4-tuple is in use (a TIME_WAIT of an
                    // earlier delivery to the same app, or exempted by the
                    // other agent of an upgrade's overlap): another port.
                    Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                        tracing::debug!(pod = %self.key, client = %preserved, "delivery tuple in use; another port");
                    }
                    connected => return (connected, Ok(())),
                },
                Err(e) => {
                    tracing::debug!(pod = %self.key, client = %preserved, error = %e, "cannot bind the client's address for delivery; delivering from the pod's");
                    return (
                        self.connect_from_pod(dst).await,
                        Err("transparent_bind_failed"),
                    );
                }
            }
        }
        (
            self.connect_from_pod(dst).await,
            Err("transparent_port_in_use"),
        )
    }

    /// Connects `sock` to `dst` with its cookie exempt from capture for the
    /// connect's duration and, bound to `from`, its delivery tuple exempt
    /// from `sk_lookup` for the connection's life.
    async fn connect_exempt(
        &self,
        sock: socket2::Socket,
        dst: SocketAddr,
        from: Option<SocketAddr>,
    ) -> std::io::Result<AppConnection> {
        let cookie = sock.cookie()?;
        let exempt = self.exempt.exempt(cookie, from.map(|f| (f, dst)))?;
        let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ));
            }
        };
        Ok(AppConnection {
            stream,
            _tuple: exempt.into_delivery(),
        })
    }
}

/// [`PodContext::is_agent_listener`] for a pod with addresses `pod_ips`.
fn is_agent_listener(pod_ips: &[IpAddr], dst: SocketAddr) -> bool {
    let ip = dst.ip().to_canonical();
    AGENT_POD_PORTS.contains(&dst.port())
        && (ip.is_loopback() || ip.is_unspecified() || pod_ips.contains(&ip))
}

/// One proxy thread's listeners of a pod's ports.
pub struct ListenerSet {
    /// Outbound capture: `127.0.0.1:15001` and, if the pod has IPv6, `[::1]:15001`.
    pub outbound: Vec<std::net::TcpListener>,
    /// Inbound plaintext (the `sk_lookup` target), dual-stack where possible.
    pub inbound_plaintext: std::net::TcpListener,
    /// Inbound HBONE (the `sk_lookup` target for port 15008), dual-stack where possible.
    pub inbound_hbone: std::net::TcpListener,
}

impl ListenerSet {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            outbound: self
                .outbound
                .iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<std::io::Result<_>>()?,
            inbound_plaintext: self.inbound_plaintext.try_clone()?,
            inbound_hbone: self.inbound_hbone.try_clone()?,
        })
    }

    fn iter(&self) -> impl Iterator<Item = &std::net::TcpListener> {
        self.outbound
            .iter()
            .chain([&self.inbound_plaintext, &self.inbound_hbone])
    }
}

/// The listeners opened inside a pod's netns: one [`ListenerSet`] per proxy
/// thread (see [`threads`]), each port's sockets in one `SO_REUSEPORT`
/// group, so the kernel spreads the pod's connections over the threads.
pub struct PodListeners {
    /// The first thread's set; its inbound sockets are the ones put in the
    /// `sk_lookup` sockmap (the kernel's reuseport selection then picks
    /// among the group).
    pub first: ListenerSet,
    /// The other threads' sets, in thread order.
    pub more: Vec<ListenerSet>,
    /// The pod's reply path for transparent delivery, as set up at enrollment.
    pub reply_routes: ReplyRoutes,
}

impl PodListeners {
    /// Duplicates every descriptor (the same sockets).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            first: self.first.try_clone()?,
            more: self
                .more
                .iter()
                .map(ListenerSet::try_clone)
                .collect::<std::io::Result<_>>()?,
            reply_routes: self.reply_routes.clone(),
        })
    }

    /// Every listening socket of the pod.
    pub fn iter(&self) -> impl Iterator<Item = &std::net::TcpListener> {
        std::iter::once(&self.first)
            .chain(&self.more)
            .flat_map(ListenerSet::iter)
    }
}

/// A seed for the balancer's random draws, different per agent (std's
/// randomly keyed hasher: no extra dependency; not for cryptography).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// What every connection handler shares.
pub struct Shared {
    /// The kernel's original destinations.
    pub orig_dst: Arc<OrigDstTable>,
    /// The agent's sockets the kernel programs leave alone.
    pub exempt: Arc<Exemptions>,
    /// The state store (who is in the mesh).
    pub store: Store,
    /// Certificates and TLS configurations.
    pub tls: Arc<MeshTls>,
    /// Tunnel connections, one pool per proxy thread.
    pub pools: Pools,
    /// The proxy threads (the inbound HBONE listener balances tunnel
    /// connections over them).
    pub threads: Arc<threads::ProxyThreads>,
    /// Authorization of inbound connections.
    pub authz: Arc<authz::Authz>,
    /// Metrics, access log, the open-connection list and the proxy's
    /// counters: everything the proxy counts, it reports here.
    pub telemetry: Telemetry,
    /// Endpoint choice state of routed service connections (connection
    /// counts, outlier ejections, cursors), kept across route-table changes.
    pub balancer: Arc<crate::routing::Balancer>,
    /// Connection tasks from accept to their end (what a stopping agent drains).
    pub in_flight: Arc<InFlight>,
    /// Connection, stream and handshake caps and deadlines.
    pub limits: Arc<limits::Bounds>,
    /// The pods this agent serves, by address (the same-node fast path).
    pub local: same_node::LocalPods,
    /// Whether connections between two of [`Shared::local`]'s pods are
    /// delivered directly rather than through an HBONE tunnel.
    pub same_node_fast_path: AtomicBool,
    /// Whether a client's first bytes go on its tunnel stream before the
    /// destination's node proxy answers (`hbone::EarlyData`).
    pub tunnel_early_data: AtomicBool,
    /// Whether plaintext relays move bulk transfers by `splice(2)`
    /// (`splice`), rather than copying them through the agent.
    pub relay_splice: AtomicBool,
}

impl Shared {
    /// Spawns a connection task counted in [`Shared::in_flight`] until it ends,
    /// so a stopping agent waits for it (connections it accepted but has not
    /// yet connected onwards included), not only for the open relays.
    /// `held` (the connection's limit permits) is released when it ends.
    ///
    /// The task is wrapped with `map`, not awaited inside an `async` block:
    /// a block that owns a future and awaits it stores it twice (rustc keeps
    /// the captured future and the awaited one apart), which doubled every
    /// connection task's size (measured: 23 KiB for an outbound connection
    /// whose future is 5.6 KiB).
    pub fn spawn_tracked<F, H>(&self, task: F, held: H)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
        H: Send + 'static,
    {
        tokio::spawn(self.tracked(threads::current().unwrap_or(0), task, held));
    }

    /// [`Shared::spawn_tracked`] on proxy thread `index`.
    pub fn spawn_tracked_on<F, H>(&self, index: usize, task: F, held: H)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
        H: Send + 'static,
    {
        let task = self.tracked(index, task, held);
        self.threads.handle(index).spawn(task);
    }

    /// `task`, counted in [`Shared::in_flight`] and on proxy thread `index`
    /// until it ends, then dropping `held`.
    fn tracked<F, H>(
        &self,
        index: usize,
        task: F,
        held: H,
    ) -> impl std::future::Future<Output = ()> + Send + use<F, H>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
        H: Send + 'static,
    {
        use futures::FutureExt as _;
        let guard = self.in_flight.enter();
        let load = self.threads.hold(index);
        task.map(move |()| drop((guard, load, held)))
    }
}

/// The tunnel pools, one per proxy thread: a thread dials and uses only its
/// own, so a tunnel connection's driver runs on the thread whose relays feed
/// it (see [`threads`]). On a current-thread runtime a pool keeps one
/// connection per key (`hbone::Pool::spread`): the proxy threads, not the
/// pools, spread a peer's streams over the cores.
pub struct Pools(Vec<Arc<hbone::Pool>>);

impl Pools {
    /// `count` empty pools (at least one) counting into `counters`.
    fn new(count: usize, counters: &Arc<crate::telemetry::ProxyCounters>) -> Self {
        Self(
            (0..count.max(1))
                .map(|_| Arc::new(hbone::Pool::new(counters.clone())))
                .collect(),
        )
    }

    /// The calling proxy thread's pool (the first one on any other thread).
    pub fn current(&self) -> &hbone::Pool {
        &self.0[threads::current().unwrap_or(0) % self.0.len()]
    }

    /// Live connections and the streams they carry, over all pools.
    pub fn occupancy(&self) -> (usize, usize) {
        self.0.iter().fold((0, 0), |(c, s), pool| {
            let (pc, ps) = pool.occupancy();
            (c + pc, s + ps)
        })
    }

    fn sweep(&self) {
        for pool in &self.0 {
            pool.sweep();
        }
    }
}

/// Counts the connection tasks of the proxy (accepted connections, tunnel
/// connections and their streams) that have not finished.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    /// Tasks not finished.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }
}

/// One counted task; uncounted on drop.
struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The proxy: serves the listeners of every enrolled pod.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    /// The agent's main runtime: policy re-checks, the pools' sweep,
    /// certificate prefetches.
    handle: Handle,
}

impl Proxy {
    /// The agent's exemption maps (for the pods' contexts).
    pub fn exemptions(&self) -> Arc<Exemptions> {
        self.shared.exempt.clone()
    }

    /// The balancer state of routed service connections (for `/config_dump`).
    pub fn balancer(&self) -> Arc<crate::routing::Balancer> {
        self.shared.balancer.clone()
    }

    /// A proxy serving pods on `threads`, its background tasks on `handle`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        orig_dst: Arc<OrigDstTable>,
        exempt: Arc<Exemptions>,
        store: Store,
        tls: Arc<MeshTls>,
        telemetry: Telemetry,
        limits: Arc<limits::Bounds>,
        handle: Handle,
        threads: Arc<threads::ProxyThreads>,
    ) -> Self {
        let authz = Arc::new(authz::Authz::new(store.clone()));
        splice::bound_pipes(limits.max_pipes());
        let shared = Arc::new(Shared {
            orig_dst,
            exempt,
            store: store.clone(),
            tls,
            pools: Pools::new(threads.len(), &telemetry.counters),
            threads,
            authz: authz.clone(),
            telemetry,
            balancer: Arc::new(crate::routing::Balancer::with_seed(random_seed())),
            in_flight: Arc::default(),
            limits,
            local: same_node::LocalPods::default(),
            same_node_fast_path: AtomicBool::new(true),
            tunnel_early_data: AtomicBool::new(true),
            relay_splice: AtomicBool::new(true),
        });
        // Policy changes apply to new connections at once (decisions read
        // the snapshot's compiled policies); open ones are re-checked here,
        // and so are those of a pod whose labels changed.
        let mut changes = store.subscribe();
        handle.spawn(async move {
            while changes.changed().await.is_ok() {
                let snapshot = changes.borrow_and_update().clone();
                authz.recheck(&snapshot);
            }
        });
        let swept = shared.clone();
        handle.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                swept.pools.sweep();
            }
        });
        Self { shared, handle }
    }

    /// Forgets certificates and TLS configurations of identities not in `keep`,
    /// and starts issuing certificates for the new ones (so that a pod's first
    /// connection does not wait for the CA).
    pub fn retain_identities(&self, keep: &[SpiffeId]) {
        self.shared.tls.retain(keep.iter());
        let _enter = self.handle.enter();
        self.shared.tls.manager().prefetch(keep.iter());
    }

    /// Turns the same-node fast path on or off (on by default): with it,
    /// a connection from one of this agent's pods to another is delivered
    /// directly, with the same identity, policy and telemetry as over an
    /// HBONE tunnel, and without TLS and HTTP/2 to the agent itself.
    pub fn set_same_node_fast_path(&self, on: bool) {
        self.shared.same_node_fast_path.store(on, Ordering::Relaxed);
    }

    /// Turns early data on tunnel streams on or off (on by default): with
    /// it, a client's first bytes go on its stream to a destination pod's
    /// node proxy before that proxy answers the `CONNECT`
    /// (`hbone::EarlyData`); without it the agent waits for the answer, as
    /// ztunnel does.
    pub fn set_tunnel_early_data(&self, on: bool) {
        self.shared.tunnel_early_data.store(on, Ordering::Relaxed);
    }

    /// Turns splicing in plaintext relays on or off (on by default): with
    /// it, a direction's bulk transfer moves socket to pipe to socket
    /// (`splice`); without it every byte is copied through the agent.
    pub fn set_relay_splice(&self, on: bool) {
        self.shared.relay_splice.store(on, Ordering::Relaxed);
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> crate::identity::TrustDomain {
        self.shared.tls.trust_domain().clone()
    }

    /// Live tunnel connections and the streams they carry (all threads' pools).
    pub fn pool_occupancy(&self) -> (usize, usize) {
        self.shared.pools.occupancy()
    }

    /// How many proxy threads serve the pods (each pod has one
    /// [`ListenerSet`] per thread).
    pub fn threads(&self) -> usize {
        self.shared.threads.len()
    }

    /// The limits the proxy enforces, and their usage.
    pub fn limits(&self) -> Arc<limits::Bounds> {
        self.shared.limits.clone()
    }

    /// The proxy's unfinished connection tasks.
    pub fn in_flight(&self) -> Arc<InFlight> {
        self.shared.in_flight.clone()
    }

    /// Starts accepting on a pod's listeners until `cancel` fires: each
    /// [`ListenerSet`] on its proxy thread.
    pub fn serve_pod(
        &self,
        ctx: Arc<PodContext>,
        listeners: PodListeners,
        cancel: CancellationToken,
    ) {
        // Reachable by the same-node fast path while its listeners serve.
        self.shared.local.insert(&ctx);
        {
            let (shared, ctx, cancel) = (self.shared.clone(), ctx.clone(), cancel.clone());
            self.handle.spawn(async move {
                cancel.cancelled().await;
                shared.local.remove(&ctx);
            });
        }
        let sets = std::iter::once(listeners.first).chain(listeners.more);
        for (index, set) in sets.enumerate() {
            self.serve_set(self.shared.threads.handle(index), &ctx, set, &cancel);
        }
    }

    /// Serves one set of a pod's listeners on the runtime `handle`.
    fn serve_set(
        &self,
        handle: &Handle,
        ctx: &Arc<PodContext>,
        set: ListenerSet,
        cancel: &CancellationToken,
    ) {
        // Registering a listener with the reactor needs its runtime.
        let _guard = handle.enter();
        let shared = || self.shared.clone();
        for l in set.outbound {
            match into_tokio(l) {
                Ok(l) => {
                    handle.spawn(outbound::serve(ctx.clone(), l, shared(), cancel.clone()));
                }
                Err(e) => {
                    tracing::error!(pod = %ctx.key, error = %e, "cannot serve outbound listener")
                }
            }
        }
        match into_tokio(set.inbound_plaintext) {
            Ok(l) => {
                handle.spawn(inbound::serve(ctx.clone(), l, shared(), cancel.clone()));
            }
            Err(e) => tracing::error!(pod = %ctx.key, error = %e, "cannot serve inbound listener"),
        }
        match into_tokio(set.inbound_hbone) {
            Ok(l) => {
                handle.spawn(inbound_hbone::serve(
                    ctx.clone(),
                    l,
                    shared(),
                    cancel.clone(),
                ));
            }
            Err(e) => tracing::error!(pod = %ctx.key, error = %e, "cannot serve HBONE listener"),
        }
    }
}

/// Decides an inbound connection: reports the decision; a denied one is
/// closed in telemetry with the policy's reason and the caller refuses it
/// (with the returned HBONE status); an allowed one is registered for
/// re-checks when policies change.
fn authorize(
    shared: &Shared,
    subject: authz::Subject,
    tracker: ConnectionTracker,
) -> Result<(authz::Tracked, ConnectionTracker), http::StatusCode> {
    let checked = shared.authz.check(&subject);
    if let Some(reason) = checked.decision.deny_reason() {
        shared
            .telemetry
            .metrics
            .policy_decision(PolicyDecision::Deny);
        let denied = Error::Denied(reason.clone());
        let status = denied.connect_status();
        tracker.close(0, 0, denied.into());
        return Err(status);
    }
    shared
        .telemetry
        .metrics
        .policy_decision(PolicyDecision::Allow);
    Ok((shared.authz.track(subject, checked), tracker))
}

/// The telemetry view of a peer: its workload (if the state knows the
/// address, and the peer's verified identity, if any, is that workload's)
/// and its verified identity, which is reported even when the address is
/// not a known workload's. A peer proving another identity than its
/// address's workload (an address it should not have) is reported as an
/// unknown workload: only its certificate is believed.
fn peer(
    snapshot: &crate::state::Snapshot,
    addr: SocketAddr,
    identity: Option<&SpiffeId>,
) -> crate::telemetry::Peer {
    let workload = snapshot
        .workload_by_ip(addr.ip())
        .filter(|w| identity.is_none_or(|id| w.has_identity(id)));
    match workload {
        Some(w) => {
            let labels = PeerLabelCache::get(snapshot.generation, addr.ip(), identity, || {
                let principal = identity.map(ToString::to_string);
                crate::telemetry::PeerLabels::from_workload(w, principal.as_deref())
            });
            crate::telemetry::Peer::with_labels(Some(addr), w, labels)
        }
        None => {
            let identity = identity.map(ToString::to_string);
            crate::telemetry::Peer::unknown_with_identity(Some(addr), identity.as_deref())
        }
    }
}

/// The calling proxy thread's peer labels of the current snapshot's
/// workloads, by address and verified identity: built once per workload
/// and snapshot, shared by its connections' trackers. Emptied when the
/// snapshot changes (labels, names, identities), so it holds at most two
/// entries (with and without an identity) per workload connected with.
#[derive(Default)]
struct PeerLabelCache {
    generation: u64,
    by_ip: std::collections::HashMap<IpAddr, Vec<CachedLabels>>,
}

/// A workload's labels as seen with one verified identity (or none).
type CachedLabels = (Option<SpiffeId>, Arc<crate::telemetry::PeerLabels>);

thread_local! {
    static PEER_LABELS: std::cell::RefCell<PeerLabelCache> = std::cell::RefCell::default();
}

impl PeerLabelCache {
    /// The labels of the workload at `ip` seen with `identity`, built by
    /// `build` unless this thread has them for snapshot `generation`.
    fn get(
        generation: u64,
        ip: IpAddr,
        identity: Option<&SpiffeId>,
        build: impl FnOnce() -> crate::telemetry::PeerLabels,
    ) -> Arc<crate::telemetry::PeerLabels> {
        let cached = PEER_LABELS.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.generation != generation {
                cache.generation = generation;
                cache.by_ip.clear();
            }
            let entries = cache.by_ip.get(&ip)?;
            let (_, labels) = entries.iter().find(|(id, _)| id.as_ref() == identity)?;
            Some(labels.clone())
        });
        if let Ok(Some(labels)) = cached {
            return labels;
        }
        let labels = Arc::new(build());
        // Not kept while the thread ends.
        let _ = PEER_LABELS.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            let entries = cache.by_ip.entry(ip).or_default();
            entries.push((identity.cloned(), labels.clone()));
        });
        labels
    }
}

/// Accepts on one of a pod's listeners until `cancel` fires, handing each
/// connection to `handle` (which spawns its task) with its slot of the
/// global connection cap; beyond the cap a connection is reset at once (not
/// left in the backlog). Accept errors (for example running out of file
/// descriptors) are logged and retried after a short pause rather than
/// ending the listener.
async fn accept_loop(
    ctx: &PodContext,
    listener: tokio::net::TcpListener,
    cancel: &CancellationToken,
    listener_kind: &'static str,
    limits: &limits::Bounds,
    mut handle: impl FnMut(TcpStream, SocketAddr, limits::Permit),
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => match limits.connection() {
                Ok(permit) => handle(stream, peer, permit),
                Err(_) => reset(stream),
            },
            Err(e) => {
                tracing::warn!(pod = %ctx.key, listener = listener_kind, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn into_tokio(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// A connection task in two steps: `open` (boxed by the caller) decides and
/// opens the connection, reporting and resetting it itself when it gives
/// up; then `relay` relays what it opened. A task is as large as its
/// largest state for its whole life, and opening (routing, attempts,
/// handshakes, policy, delivery) takes more than an open connection needs
/// (issue 13: memory per connection), so the box is freed before the relay;
/// and the relay's future is made once the box is gone, so that what `open`
/// returned is not kept beside it.
async fn open_then_relay<T, R: std::future::Future<Output = ()>>(
    open: std::pin::Pin<Box<impl std::future::Future<Output = Option<T>>>>,
    relay: impl FnOnce(T) -> R,
) {
    let relay = {
        let Some(opened) = open.await else {
            return;
        };
        relay(opened)
    };
    relay.await;
}

/// Resets a connection (RST, not FIN): what the client of a failed or
/// refused proxied connection sees, as it would without the mesh.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// The size of the future an async fn of four arguments returns.
    fn future_size4<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        size_of::<F>()
    }

    /// The size of the future an async fn of six arguments returns.
    fn future_size6<A, B, C, D, E, G, F: std::future::Future>(
        _: fn(A, B, C, D, E, G) -> F,
    ) -> usize {
        size_of::<F>()
    }

    /// A connection's task keeps its largest state for its whole life:
    /// what opens a connection (routing, attempts, handshakes, the
    /// decision) is boxed and freed before the relay, so an open connection
    /// holds little more than its relay's state and its tracker (whose
    /// metric labels are shared, `telemetry::metrics::TcpSeries`); and the
    /// relays keep no readiness futures (`copy::Reader`, `copy::write_all`)
    /// nor their arguments twice. The bounds leave room over the sizes
    /// measured then (rustc 1.99, test profile: 1 584 and 1 432 bytes);
    /// before the relays' change they were 1 848 and 1 544, and before the
    /// boxed set-up 4 184 and 3 384.
    #[test]
    fn connection_tasks_keep_little_more_than_their_relay() {
        let outbound = future_size4(outbound::handle as fn(_, _, _, _) -> _);
        let inbound = future_size6(inbound_hbone::stream as fn(_, _, _, _, _, _) -> _);
        assert!(outbound <= 1664, "outbound task: {outbound} bytes");
        assert!(
            inbound <= 1504,
            "inbound tunnel stream task: {inbound} bytes"
        );
    }

    /// A workload's labels are built once per thread, snapshot and
    /// identity, and shared by its connections after that.
    #[test]
    fn peer_labels_are_built_once_per_snapshot_and_identity() {
        let td = crate::identity::TrustDomain::new("cluster.local").expect("trust domain");
        let id = SpiffeId::new(td, "default", "a").expect("id");
        let ip: IpAddr = "198.18.1.10".parse().expect("ip");
        let built = std::cell::Cell::new(0);
        let get = |generation: u64, identity: Option<&SpiffeId>| {
            PeerLabelCache::get(generation, ip, identity, || {
                built.set(built.get() + 1);
                crate::telemetry::PeerLabels::unknown()
            })
        };
        let first = get(7, Some(&id));
        assert!(Arc::ptr_eq(&first, &get(7, Some(&id))));
        assert_eq!(built.get(), 1);
        // Without the identity: labels of their own (no principal).
        assert!(!Arc::ptr_eq(&first, &get(7, None)));
        assert_eq!(built.get(), 2);
        // A new snapshot may have changed the workload: built again.
        assert!(!Arc::ptr_eq(&first, &get(8, Some(&id))));
        assert_eq!(built.get(), 3);
    }

    #[test]
    fn each_proxy_thread_uses_its_own_pool() {
        let counters = Arc::new(crate::telemetry::ProxyCounters::default());
        let pools = Arc::new(Pools::new(2, &counters));
        let threads = threads::ProxyThreads::start(2).expect("threads");
        for i in 0..2 {
            let (tx, rx) = std::sync::mpsc::channel();
            let p = pools.clone();
            threads.handle(i).spawn(async move {
                let _ = tx.send(std::ptr::from_ref(p.current()) as usize);
            });
            let used = rx.recv_timeout(Duration::from_secs(5)).expect("thread ran");
            assert_eq!(used, Arc::as_ptr(&pools.0[i]) as usize, "thread {i}");
        }
        // Any other thread gets the first pool.
        assert!(std::ptr::eq(pools.current(), &*pools.0[0]));
        assert_eq!(pools.occupancy(), (0, 0));
        threads.stop(Duration::from_secs(5));
    }

    #[test]
    fn agent_listeners_are_the_agent_ports_on_the_pods_own_addresses() {
        let ips: Vec<IpAddr> = vec![
            "198.18.2.10".parse().expect("ip"),
            "fd00:198:18:2::10".parse().expect("ip"),
        ];
        for own in [
            "198.18.2.10:15006",
            "198.18.2.10:15008",
            "198.18.2.10:15001",
            "[::ffff:198.18.2.10]:15006",
            "[fd00:198:18:2::10]:15006",
            "127.0.0.1:15001",
            "[::1]:15006",
            "0.0.0.0:15008",
        ] {
            assert!(is_agent_listener(&ips, addr(own)), "{own}");
        }
        for other in [
            "198.18.2.10:8080",
            "198.18.2.10:15000",
            "198.18.2.10:15020",
            "198.18.2.11:15006",
            "[fd00:198:18:2::11]:15008",
        ] {
            assert!(!is_agent_listener(&ips, addr(other)), "{other}");
        }
    }

    #[test]
    fn a_peer_at_an_unknown_address_keeps_its_verified_identity() {
        let snapshot = crate::state::Snapshot::default();
        let td = crate::identity::TrustDomain::new("cluster.local").expect("trust domain");
        let id = SpiffeId::new(td, "default", "intruder").expect("identity");
        let p = peer(&snapshot, addr("198.18.9.9:40000"), Some(&id));
        assert_eq!(
            p.labels.principal,
            "spiffe://cluster.local/ns/default/sa/intruder"
        );
        assert_eq!(p.labels.workload, crate::telemetry::metrics::UNKNOWN);
        assert_eq!(p.pod, None);
        // Without a verified identity (plaintext) there is nothing to report.
        let p = peer(&snapshot, addr("198.18.9.9:40000"), None);
        assert_eq!(p.labels.principal, crate::telemetry::metrics::UNKNOWN);
    }

    #[test]
    fn a_peer_proving_another_identity_than_its_addresss_workload_is_not_that_workload() {
        use crate::state::{NodeInfo, Store, Workload};
        let web = Workload {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            ips: vec!["198.18.9.9".parse().expect("ip")],
            ..Workload::default()
        };
        let store = Store::new();
        store.publish(NodeInfo::default(), [(web.key(), web)].into());
        let snapshot = store.current();
        let td = crate::identity::TrustDomain::new("cluster.local").expect("trust domain");
        let own = SpiffeId::new(td.clone(), "shop", "web").expect("identity");
        let other = SpiffeId::new(td, "shop", "intruder").expect("identity");
        let at = addr("198.18.9.9:40000");
        assert_eq!(peer(&snapshot, at, Some(&own)).labels.workload, "web-0");
        let p = peer(&snapshot, at, Some(&other));
        assert_eq!(p.labels.workload, crate::telemetry::metrics::UNKNOWN);
        assert_eq!(
            p.labels.principal,
            "spiffe://cluster.local/ns/shop/sa/intruder"
        );
        // Plaintext: the address is all there is.
        assert_eq!(peer(&snapshot, at, None).labels.workload, "web-0");
    }
}
