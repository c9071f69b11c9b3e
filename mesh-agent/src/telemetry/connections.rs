//! What the proxy reports about each connection, through one handle:
//! [`Telemetry::open`] when a connection is accepted and its destination
//! known, [`ConnectionTracker::close`] when it ends. Between the two the
//! connection is listed by `/connections` (`mesh-agent connections`); at
//! open and close the `istio_tcp_*` metrics count it; at close the access
//! log writes its line.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use super::unix;
use super::{
    access_log::{self, ConnectionRecord, Direction, Endpoint, Failure, FailureKind, Outcome},
    counters::{ProxyCounters, ProxyEvent},
    metrics::{
        ConnectionLabels, Metrics, PeerLabels, Reporter, ResponseFlags, RouteEvent, SecurityPolicy,
        ServiceLabels, TcpSeries, UNKNOWN,
    },
};
use crate::state::Workload;

/// One side of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its address (for the destination: what the client dialled).
    pub addr: Option<SocketAddr>,
    /// The pod's name, when the address is a known workload's.
    pub pod: Option<String>,
    /// Metric labels (workload, namespace, principal, app, …), shared by
    /// the connections of one peer (`proxy::peer` keeps them per thread
    /// and snapshot): an open connection holds a pointer, not some ten
    /// strings of its own.
    pub labels: Arc<PeerLabels>,
}

/// The labels of a peer the agent knows nothing about, shared.
static UNKNOWN_PEER: std::sync::LazyLock<Arc<PeerLabels>> =
    std::sync::LazyLock::new(|| Arc::new(PeerLabels::unknown()));

impl Peer {
    /// A peer known only by its address (every label `unknown`).
    pub fn unknown(addr: Option<SocketAddr>) -> Self {
        Self {
            addr,
            pod: None,
            labels: UNKNOWN_PEER.clone(),
        }
    }

    /// A peer whose address is not a known workload's but whose identity
    /// was verified (an mTLS client certificate): every label `unknown`
    /// except the principal, so the access log and metrics still name who
    /// it was. `None` is [`Peer::unknown`].
    pub fn unknown_with_identity(addr: Option<SocketAddr>, identity: Option<&str>) -> Self {
        let mut peer = Self::unknown(addr);
        if let Some(id) = identity {
            let mut labels = PeerLabels::unknown();
            labels.principal = id.to_owned();
            peer.labels = Arc::new(labels);
        }
        peer
    }

    /// A known workload at `addr`, with its authenticated identity if any.
    pub fn from_workload(addr: Option<SocketAddr>, w: &Workload, identity: Option<&str>) -> Self {
        Self::with_labels(addr, w, Arc::new(PeerLabels::from_workload(w, identity)))
    }

    /// A known workload at `addr` whose labels (from
    /// [`PeerLabels::from_workload`]) are already built.
    pub fn with_labels(addr: Option<SocketAddr>, w: &Workload, labels: Arc<PeerLabels>) -> Self {
        Self {
            addr,
            pod: Some(w.name.clone()),
            labels,
        }
    }

    fn endpoint(&self) -> Endpoint {
        let known = |s: &String| (s != UNKNOWN).then(|| s.clone());
        Endpoint {
            addr: self.addr,
            workload: self.pod.clone(),
            namespace: known(&self.labels.namespace),
            identity: known(&self.labels.principal),
        }
    }
}

/// A connection as the proxy knows it once its destination is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Outbound (`reporter="source"`) or inbound (`reporter="destination"`).
    pub direction: Direction,
    /// The client.
    pub src: Peer,
    /// The server.
    pub dst: Peer,
    /// The service the client dialled, if it dialled a service address.
    pub dst_service: Option<ServiceLabels>,
    /// mTLS or plaintext.
    pub security_policy: SecurityPolicy,
}

impl Connection {
    /// The labels of the series the connection is counted in when it opens:
    /// no response flags yet (a connection that ends badly moves to its
    /// flags' series then, `Metrics::close_series`).
    fn opened_labels(&self) -> ConnectionLabels<'_> {
        ConnectionLabels {
            reporter: match self.direction {
                Direction::Outbound => Reporter::Source,
                Direction::Inbound => Reporter::Destination,
            },
            source: &self.src.labels,
            destination: &self.dst.labels,
            destination_service: self.dst_service.as_ref(),
            security_policy: self.security_policy,
            response_flags: ResponseFlags::None,
        }
    }
}

/// An open connection as `/connections` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenConnection {
    /// Registry-assigned id, unique for the agent's life.
    pub id: u64,
    /// Outbound or inbound.
    pub direction: Direction,
    /// The client.
    pub src: Endpoint,
    /// The server.
    pub dst: Endpoint,
    /// The service the client dialled, if any.
    pub dst_service: Option<String>,
    /// `mutual_tls` or `none`.
    pub security_policy: String,
    /// When it opened, Unix seconds.
    pub opened_at: i64,
    /// How long it has been open, milliseconds.
    pub age_ms: u64,
}

/// An open connection: the tracker's own [`Connection`], shared, so that
/// listing it costs the connection nothing; `/connections` builds its
/// [`OpenConnection`] when asked.
struct Entry {
    conn: Arc<Connection>,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: BTreeMap<u64, Entry>,
}

/// The connections open now.
#[derive(Clone, Default)]
pub struct ConnectionRegistry {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for ConnectionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRegistry")
            .field("open", &self.len())
            .finish()
    }
}

impl ConnectionRegistry {
    /// Lists `conn` until the returned guard drops.
    pub fn track(&self, conn: &Arc<Connection>) -> ConnectionGuard {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.open.insert(
            id,
            Entry {
                conn: Arc::clone(conn),
                since: Instant::now(),
            },
        );
        ConnectionGuard {
            registry: self.clone(),
            id,
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open connections, oldest first.
    pub fn list(&self) -> Vec<OpenConnection> {
        let now = SystemTime::now();
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .open
            .iter()
            .map(|(&id, e)| {
                let age = e.since.elapsed();
                let conn = &e.conn;
                OpenConnection {
                    id,
                    direction: conn.direction,
                    src: conn.src.endpoint(),
                    dst: conn.dst.endpoint(),
                    dst_service: conn.dst_service.as_ref().map(|s| s.host.clone()),
                    security_policy: conn.security_policy.as_str().to_owned(),
                    opened_at: unix(now.checked_sub(age).unwrap_or(UNIX_EPOCH)),
                    age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect()
    }
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    registry: ConnectionRegistry,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(&self.id);
    }
}

/// What the proxy reports through: metrics, the open-connection registry,
/// the proxy's counters and the access log. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Telemetry {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The open connections.
    pub connections: ConnectionRegistry,
    /// The proxy's counters.
    pub counters: Arc<ProxyCounters>,
}

impl Telemetry {
    /// Reports through `metrics`, a fresh connection registry and fresh
    /// counters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            connections: ConnectionRegistry::default(),
            counters: Arc::default(),
        }
    }

    /// Counts `event`.
    pub fn count(&self, event: ProxyEvent) {
        self.counters.count(event);
    }

    /// A connection was refused before it was tracked (no original
    /// destination, not addressed to the pod, a bad tunnel request): counts
    /// it as failed, and the counter of `why` if it has one.
    pub fn refused(&self, why: &dyn Failure) {
        self.counters.failed();
        if let Some(event) = why.event() {
            self.counters.count(event);
        }
    }

    /// A connection opened: counts it (`istio_tcp_connections_opened_total`)
    /// and lists it until the tracker is closed or dropped.
    pub fn open(&self, conn: Connection) -> ConnectionTracker {
        let series = self.metrics.open_series(conn.opened_labels());
        let conn = Arc::new(conn);
        ConnectionTracker {
            guard: Some(self.connections.track(&conn)),
            series: Some(series),
            telemetry: self.clone(),
            conn,
            start: Instant::now(),
            forwarded_for: None,
            source_preserved: None,
            route: None,
            subset: None,
            waypoint: None,
        }
    }

    /// Counts a routing event (`mesh_route_*`).
    pub fn route_event(&self, event: RouteEvent<'_>) {
        self.metrics.route_event(event);
    }
}

/// An open connection being reported; [`close`](Self::close) it with its
/// byte counts and outcome. Dropped without closing (a task cancelled at
/// shutdown), it is reported closed with outcome `error`.
#[derive(Debug)]
pub struct ConnectionTracker {
    telemetry: Telemetry,
    conn: Arc<Connection>,
    start: Instant,
    guard: Option<ConnectionGuard>,
    /// Its `istio_tcp_*` labels, built once when it opened.
    series: Option<TcpSeries>,
    forwarded_for: Option<String>,
    source_preserved: Option<(bool, Option<&'static str>)>,
    route: Option<String>,
    subset: Option<String>,
    waypoint: Option<String>,
}

impl ConnectionTracker {
    /// Records the waypoint (`namespace/name`) the connection was sent
    /// through (or meant to be): the access log's `waypoint`.
    pub fn set_waypoint(&mut self, waypoint: &dyn std::fmt::Display) {
        self.waypoint = Some(waypoint.to_string());
    }

    /// Counts `event` for this connection (`/stats`).
    pub fn count(&self, event: ProxyEvent) {
        self.telemetry.count(event);
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Records the client address a peer claimed (an HBONE `forwarded`
    /// header): written to the access log as `forwarded_for`, for
    /// information only. Nothing the peer chooses is used for policy or for
    /// the source's attribution (`src.*`, which is the tunnel's TCP peer).
    pub fn set_forwarded_for(&mut self, claimed: Option<SocketAddr>) {
        self.forwarded_for = claimed.map(|a| a.to_string());
    }

    /// Records whether an inbound delivery to the app came from the
    /// client's address (`source_preserved=true`) or, falling back, from the
    /// pod's own (`false`, with `reason` in `source_not_preserved`): the
    /// access log's `source_preserved`.
    pub fn set_source_preserved(&mut self, preserved: bool, reason: Option<&'static str>) {
        self.source_preserved = Some((preserved, reason));
    }

    /// Records the route that chose the connection's destination (for the
    /// access log's `route` and `subset`) and counts it
    /// (`mesh_route_connections_total`).
    pub fn set_route(&mut self, route: Option<&str>, destination: &str, subset: Option<&str>) {
        self.telemetry.route_event(RouteEvent::Connection {
            route,
            destination,
            subset,
        });
        self.route = route.map(str::to_owned);
        self.subset = subset.map(str::to_owned);
    }

    /// The connection closed after relaying `sent` bytes from the client to
    /// the server and `received` back: counts it (Istio metrics, the
    /// proxy's counters), writes its access-log line and unlists it.
    pub fn close(mut self, sent: u64, received: u64, outcome: Outcome) {
        self.finish(sent, received, outcome);
    }

    fn finish(&mut self, sent: u64, received: u64, outcome: Outcome) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        if let Some(series) = self.series.take() {
            self.telemetry
                .metrics
                .close_series(series, outcome.response_flags(), sent, received);
        }
        let counters = &self.telemetry.counters;
        counters.closed(matches!(outcome, Outcome::Closed), sent, received);
        if let Outcome::Failed(f) = &outcome
            && let Some(event) = f.event()
        {
            counters.count(event);
        }
        access_log::log_connection(&ConnectionRecord {
            direction: self.conn.direction,
            src: self.conn.src.endpoint(),
            dst: self.conn.dst.endpoint(),
            dst_service: self.conn.dst_service.as_ref().map(|s| s.host.clone()),
            security: Some(self.conn.security_policy),
            bytes_sent: sent,
            bytes_received: received,
            duration: self.start.elapsed(),
            outcome,
            forwarded_for: self.forwarded_for.take(),
            source_preserved: self.source_preserved.map(|(p, _)| p),
            source_not_preserved: self.source_preserved.and_then(|(_, r)| r),
            route: self.route.take(),
            subset: self.subset.take(),
            waypoint: self.waypoint.take(),
        });
        drop(guard);
    }
}

impl Drop for ConnectionTracker {
    fn drop(&mut self) {
        if self.guard.is_some() {
            self.finish(0, 0, Outcome::failed(Dropped));
        }
    }
}

/// A tracker dropped without being closed (its task was cancelled).
#[derive(Debug, thiserror::Error)]
#[error("dropped before it was closed")]
struct Dropped;

impl Failure for Dropped {
    fn kind(&self) -> FailureKind {
        FailureKind::Error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        }
    }

    #[test]
    fn tracker_lists_until_closed_and_counts_once() {
        let telemetry = Telemetry::new(Arc::new(Metrics::new()));
        let conn = Connection {
            direction: Direction::Outbound,
            src: Peer::from_workload(
                Some("198.18.1.10:40000".parse().expect("addr")),
                &workload("a"),
                None,
            ),
            dst: Peer::unknown(Some("198.18.9.9:80".parse().expect("addr"))),
            dst_service: None,
            security_policy: SecurityPolicy::None,
        };
        let t = telemetry.open(conn.clone());
        let listed = telemetry.connections.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].src.workload.as_deref(), Some("a"));
        assert_eq!(listed[0].src.namespace.as_deref(), Some("default"));
        assert_eq!(listed[0].src.identity, None);
        assert_eq!(listed[0].dst.workload, None);
        assert_eq!(listed[0].security_policy, "none");
        assert_eq!(listed[0].dst.addr, conn.dst.addr);
        let now = unix(SystemTime::now());
        assert!(
            (now - 2..=now).contains(&listed[0].opened_at),
            "opened at {}, now {now}",
            listed[0].opened_at
        );
        t.close(10, 20, Outcome::Closed);
        assert!(telemetry.connections.is_empty());
        let text = telemetry.metrics.encode().expect("encode");
        assert!(text.contains("istio_tcp_connections_closed_total{reporter=\"source\""));
        // Dropped without close: still counted once, as closed.
        drop(telemetry.open(conn));
        assert!(telemetry.connections.is_empty());
        let closed: u64 = telemetry
            .metrics
            .encode()
            .expect("encode")
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(closed, 2);
        // The proxy's counters are derived from the same two reports.
        let counters: std::collections::BTreeMap<_, _> =
            telemetry.counters.snapshot().into_iter().collect();
        assert_eq!(
            (
                counters["completed"],
                counters["failed"],
                counters["bytes_sent"],
                counters["bytes_received"]
            ),
            (1, 1, 10, 20)
        );
    }

    #[test]
    fn a_verified_identity_at_an_unknown_address_is_the_source_principal() {
        let telemetry = Telemetry::new(Arc::new(Metrics::new()));
        let principal = "spiffe://cluster.local/ns/default/sa/intruder";
        let conn = Connection {
            direction: Direction::Inbound,
            src: Peer::unknown_with_identity(
                Some("198.18.9.9:40000".parse().expect("addr")),
                Some(principal),
            ),
            dst: Peer::from_workload(
                Some("198.18.2.10:8080".parse().expect("addr")),
                &workload("c"),
                Some("spiffe://cluster.local/ns/default/sa/c"),
            ),
            dst_service: None,
            security_policy: SecurityPolicy::MutualTls,
        };
        let t = telemetry.open(conn);
        let listed = telemetry.connections.list();
        assert_eq!(listed[0].src.identity.as_deref(), Some(principal));
        assert_eq!(listed[0].src.workload, None);
        t.close(0, 0, Outcome::Closed);
        let text = telemetry.metrics.encode().expect("encode");
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_closed_total{"))
            .expect("closed series");
        assert!(
            line.contains(&format!("source_principal=\"{principal}\""))
                && line.contains("source_workload=\"unknown\""),
            "{line}"
        );
    }
}
