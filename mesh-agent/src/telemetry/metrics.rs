//! Prometheus metrics (`:15020/metrics`, OpenMetrics text).
//!
//! - Istio's TCP metrics with Istio's standard labels, as ztunnel reports
//!   them at L4: `istio_tcp_connections_opened_total`,
//!   `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`
//!   (server to client, "sent during response") and
//!   `istio_tcp_received_bytes_total` (client to server, "received during
//!   request"). Labels carry workload names, namespaces, principals, app and
//!   version labels and services — never addresses or ports — and `unknown`
//!   for what the agent does not know, so cardinality stays bounded by the
//!   number of workloads and services.
//! - The agent's own: `mesh_enrolled_pods`, `mesh_enrollment_failed_pods`,
//!   `mesh_pool_connections`, `mesh_pool_streams`,
//!   `mesh_policy_decisions_total{result}`.
//! - The proxy's limits, read at scrape time once the agent registers them:
//!   `mesh_limit_in_use{limit}`, `mesh_limit_max{limit}`,
//!   `mesh_limit_refused_total{limit}`, `mesh_limit_closed_total{reason}`,
//!   `mesh_limit_reduced_total{limit}`,
//!   `mesh_limit_peers` and `mesh_fd_limit` (the soft `RLIMIT_NOFILE`).
//! - Whatever else [`Metrics::register_collector`] adds: `admin` registers
//!   the certificates' (`mesh_certificates`, `mesh_ca_expiry_seconds`, …)
//!   and the kernel's (`mesh_ebpf_*`), read at scrape time.

use std::{
    fmt,
    sync::{Arc, PoisonError, RwLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

use crate::state::{Service, Workload};

/// The `Content-Type` of the encoded metrics.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label value of anything the agent does not know.
pub const UNKNOWN: &str = "unknown";

/// The cluster's DNS domain, for service host names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Which proxy reports: the client's side or the server's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The outbound side (the client pod's node).
    Source,
    /// The inbound side (the server pod's node).
    Destination,
}

impl Reporter {
    /// `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// Whether the connection was mutually authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// Mutual TLS (HBONE).
    MutualTls,
    /// Plaintext.
    None,
}

impl SecurityPolicy {
    /// `mutual_tls` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
        }
    }
}

/// Why a connection ended abnormally, as ztunnel reports `response_flags`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    /// Nothing abnormal (`-`).
    #[default]
    None,
    /// Refused by an authorization policy (`DENY`).
    Denied,
    /// The destination could not be reached (`CONNECT`).
    ConnectFailure,
}

impl ResponseFlags {
    /// `-`, `DENY` or `CONNECT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Denied => "DENY",
            Self::ConnectFailure => "CONNECT",
        }
    }
}

/// The result of an authorization decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyDecision {
    /// The connection may proceed.
    Allow,
    /// The connection is refused.
    Deny,
}

impl PolicyDecision {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// The labels of one side of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerLabels {
    /// The workload's name (the Deployment's for its pods, else the pod's).
    pub workload: String,
    /// The workload's namespace.
    pub namespace: String,
    /// The peer's identity (SPIFFE ID) when authenticated.
    pub principal: String,
    /// The `app` label.
    pub app: String,
    /// The `version` label.
    pub version: String,
    /// Istio's canonical service.
    pub canonical_service: String,
    /// Istio's canonical revision.
    pub canonical_revision: String,
}

impl Default for PeerLabels {
    fn default() -> Self {
        Self::unknown()
    }
}

impl PeerLabels {
    /// A peer the agent knows nothing about: every label `unknown`.
    pub fn unknown() -> Self {
        let u = || UNKNOWN.to_owned();
        Self {
            workload: u(),
            namespace: u(),
            principal: u(),
            app: u(),
            version: u(),
            canonical_service: u(),
            canonical_revision: u(),
        }
    }

    /// The labels of a known workload; `principal` is its authenticated
    /// identity, if any (`unknown` otherwise, as Istio reports plaintext peers).
    pub fn from_workload(w: &Workload, principal: Option<&str>) -> Self {
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()))
                .cloned()
        };
        let workload = workload_name(w);
        Self {
            app: label(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            workload,
            namespace: w.namespace.clone(),
            principal: principal.unwrap_or(UNKNOWN).to_owned(),
        }
    }
}

/// The workload name Istio would report for a pod: its Deployment's name
/// for a pod of a ReplicaSet (`<deployment>-<pod-template-hash>-<suffix>`),
/// else the pod's name.
pub fn workload_name(w: &Workload) -> String {
    if let Some(hash) = w.labels.get("pod-template-hash")
        && let Some((prefix, _)) = w.name.rsplit_once('-')
        && let Some(deployment) = prefix
            .strip_suffix(hash.as_str())
            .and_then(|p| p.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return deployment.to_owned();
    }
    w.name.clone()
}

/// The destination service of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    /// `name.namespace.svc.cluster.local`.
    pub host: String,
    /// The service's name.
    pub name: String,
    /// The service's namespace.
    pub namespace: String,
}

impl ServiceLabels {
    /// The labels of `s`.
    pub fn from_service(s: &Service) -> Self {
        Self {
            host: format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.name, s.namespace),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }
    }
}

/// Everything the TCP metrics of one connection are labelled with,
/// borrowed from the connection: finding its shared series copies nothing
/// ([`Metrics::open_series`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLabels<'a> {
    /// Which side reports.
    pub reporter: Reporter,
    /// The client.
    pub source: &'a PeerLabels,
    /// The server.
    pub destination: &'a PeerLabels,
    /// The service the client dialled, if it dialled a service address.
    pub destination_service: Option<&'a ServiceLabels>,
    /// mTLS or plaintext.
    pub security_policy: SecurityPolicy,
    /// Why it ended abnormally, if it did.
    pub response_flags: ResponseFlags,
}

/// The values of an `istio_tcp_*` label set in its encoding's order: what
/// the shared series are hashed and compared by, whether the labels are
/// borrowed ([`ConnectionLabels::values`]) or a series' own
/// ([`TcpLabels::values`]).
type TcpLabelValues<'a> = [&'a str; 21];

impl<'a> ConnectionLabels<'a> {
    /// The label values [`TcpLabels`] made from these would have.
    fn values(&self) -> TcpLabelValues<'a> {
        let (s, d) = (self.source, self.destination);
        let (service, service_name, service_namespace) = match self.destination_service {
            Some(svc) => (svc.host.as_str(), svc.name.as_str(), svc.namespace.as_str()),
            None => (UNKNOWN, UNKNOWN, UNKNOWN),
        };
        [
            self.reporter.as_str(),
            &s.workload,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            &s.canonical_service,
            &s.canonical_revision,
            &d.workload,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            service,
            service_name,
            service_namespace,
            &d.canonical_service,
            &d.canonical_revision,
            TCP_PROTOCOL,
            self.response_flags.as_str(),
            self.security_policy.as_str(),
        ]
    }
}

/// The labels every Istio standard metric carries, in Istio's names and
/// order: the reporter, the source and destination workloads, the
/// destination service. The TCP metrics here and the waypoint's request
/// metrics flatten it into their own label sets, ahead of what is theirs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioPeerLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
}

impl IstioPeerLabels {
    /// The labels of a connection or request from `s` to `d`, addressed to
    /// `svc` (`unknown` service labels without one), as `reporter` reports it.
    pub fn new(
        reporter: &'static str,
        s: &PeerLabels,
        d: &PeerLabels,
        svc: Option<&ServiceLabels>,
    ) -> Self {
        let (service, service_name, service_namespace) = match svc {
            Some(svc) => (svc.host.clone(), svc.name.clone(), svc.namespace.clone()),
            None => (UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()),
        };
        Self {
            reporter,
            source_workload: s.workload.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: s.principal.clone(),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            destination_workload: d.workload.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: d.principal.clone(),
            destination_app: d.app.clone(),
            destination_version: d.version.clone(),
            destination_service: service,
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
        }
    }
}

/// The encoded label set of the `istio_tcp_*` metrics (Istio's names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    #[prometheus(flatten)]
    peers: IstioPeerLabels,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// The `request_protocol` of every `istio_tcp_*` series.
const TCP_PROTOCOL: &str = "tcp";

impl From<ConnectionLabels<'_>> for TcpLabels {
    fn from(l: ConnectionLabels<'_>) -> Self {
        Self {
            peers: IstioPeerLabels::new(
                l.reporter.as_str(),
                l.source,
                l.destination,
                l.destination_service,
            ),
            request_protocol: TCP_PROTOCOL,
            response_flags: l.response_flags.as_str(),
            connection_security_policy: l.security_policy.as_str(),
        }
    }
}

impl TcpLabels {
    /// Its values, in the order [`ConnectionLabels::values`] gives them.
    fn values(&self) -> TcpLabelValues<'_> {
        let p = &self.peers;
        [
            p.reporter,
            &p.source_workload,
            &p.source_workload_namespace,
            &p.source_principal,
            &p.source_app,
            &p.source_version,
            &p.source_canonical_service,
            &p.source_canonical_revision,
            &p.destination_workload,
            &p.destination_workload_namespace,
            &p.destination_principal,
            &p.destination_app,
            &p.destination_version,
            &p.destination_service,
            &p.destination_service_name,
            &p.destination_service_namespace,
            &p.destination_canonical_service,
            &p.destination_canonical_revision,
            self.request_protocol,
            self.response_flags,
            self.connection_security_policy,
        ]
    }
}

/// The `istio_tcp_*` series of one connection, found when it opens and
/// kept by its tracker until it closes. Connections with the same labels
/// share it ([`Metrics::open_series`]): a label set is some twenty
/// strings, so an open connection keeps a pointer instead of its own copy
/// (issue 13: memory per connection), and a clean close counts through the
/// handles without hashing the labels again.
#[derive(Debug)]
pub struct TcpSeries(Arc<TcpCounters>);

/// The counters of one `istio_tcp_*` label set without response flags.
#[derive(Debug)]
struct TcpCounters {
    labels: TcpLabels,
    opened: Counter,
    /// `closed`, `received` and `sent`: made at the first clean close, so
    /// that a label set shows closes and bytes once one has closed, as
    /// before the series were shared.
    closed: std::sync::OnceLock<[Counter; 3]>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Labels of the `mesh_route_*` families: the route (`-` for a service's
/// default), the destination (`namespace/name:port`) and the subset (`-`: none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    destination: String,
    subset: String,
}

/// Something the routing of a service connection did (issue 11), counted
/// in the `mesh_route_*` families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteEvent<'a> {
    /// A connection was routed to `destination` (and `subset`) by `route`.
    Connection {
        /// The route (`None`: the service's default).
        route: Option<&'a str>,
        /// `namespace/name:port`.
        destination: &'a str,
        /// The subset.
        subset: Option<&'a str>,
    },
    /// Outlier detection ejected an endpoint of the destination.
    Ejection {
        /// The route.
        route: Option<&'a str>,
        /// `namespace/name:port`.
        destination: &'a str,
        /// The subset.
        subset: Option<&'a str>,
    },
    /// A connection was refused: the destination was at its `maxConnections`.
    Overflow {
        /// The route.
        route: Option<&'a str>,
        /// `namespace/name:port`.
        destination: &'a str,
        /// The subset.
        subset: Option<&'a str>,
    },
}

/// Decrements its gauge when dropped (an open pool connection or stream).
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads the pool's (connections, streams) at scrape time.
pub type PoolSource = dyn Fn() -> (u64, u64) + Send + Sync;

/// The proxy's limits at scrape time (see `proxy::limits`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsReading {
    /// (limit, in use, maximum).
    pub in_use: Vec<(&'static str, u64, u64)>,
    /// (limit, connections refused so far).
    pub refused: Vec<(&'static str, u64)>,
    /// (deadline, connections closed by it so far).
    pub closed: Vec<(&'static str, u64)>,
    /// (limit, connections granted less than they asked for so far).
    pub reduced: Vec<(&'static str, u64)>,
    /// Peer identities holding inbound HBONE connections.
    pub peers: u64,
    /// The soft file-descriptor limit.
    pub fd_limit: u64,
}

/// Reads the proxy's limits at scrape time.
pub type LimitsSource = dyn Fn() -> LimitsReading + Send + Sync;

type SharedLimitsSource = Arc<RwLock<Option<Arc<LimitsSource>>>>;

/// The agent's metrics registry and the handles its parts update.
pub struct Metrics {
    registry: Registry,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    /// Every label set's shared series, hashed by its label values with
    /// [`Self::series_hasher`] (as many as the families above have label
    /// sets: nothing is ever removed from either). A table, not a map: a
    /// connection looks its series up by borrowed labels, and each series
    /// keeps its labels once.
    tcp_series: RwLock<hashbrown::HashTable<Arc<TcpCounters>>>,
    series_hasher: std::hash::RandomState,
    enrolled_pods: Gauge,
    enrollment_failed: Gauge,
    pool_connections: Gauge,
    pool_streams: Gauge,
    policy_decisions: Family<ResultLabel, Counter>,
    route_connections: Family<RouteLabels, Counter>,
    route_ejections: Family<RouteLabels, Counter>,
    route_overflows: Family<RouteLabels, Counter>,
    pool_source: RwLock<Option<Arc<PoolSource>>>,
    limits_source: SharedLimitsSource,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric of the proxy and the agent's gauges;
    /// add the collectors read at scrape time with
    /// [`Self::register_collector`].
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total number of TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total number of TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Total bytes sent during response of TCP connections (server to client)",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Total bytes received during request of TCP connections (client to server)",
            tcp_received.clone(),
        );
        let enrolled_pods = Gauge::default();
        registry.register(
            "mesh_enrolled_pods",
            "Pods whose traffic this agent captures",
            enrolled_pods.clone(),
        );
        let enrollment_failed = Gauge::default();
        registry.register(
            "mesh_enrollment_failed_pods",
            "Pods that should be enrolled but are not (refused or failing; see the config dump for why)",
            enrollment_failed.clone(),
        );
        let pool_connections = Gauge::default();
        registry.register(
            "mesh_pool_connections",
            "Open connections in the agent's upstream connection pool",
            pool_connections.clone(),
        );
        let pool_streams = Gauge::default();
        registry.register(
            "mesh_pool_streams",
            "Streams open on the agent's pooled connections",
            pool_streams.clone(),
        );
        let policy_decisions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "mesh_policy_decisions",
            "Authorization decisions by result",
            policy_decisions.clone(),
        );
        let route_connections = Family::<RouteLabels, Counter>::default();
        registry.register(
            "mesh_route_connections",
            "Service connections by route, destination and subset (issue 11 routing)",
            route_connections.clone(),
        );
        let route_ejections = Family::<RouteLabels, Counter>::default();
        registry.register(
            "mesh_route_ejections",
            "Endpoints ejected by outlier detection, by route, destination and subset",
            route_ejections.clone(),
        );
        let route_overflows = Family::<RouteLabels, Counter>::default();
        registry.register(
            "mesh_route_overflows",
            "Connections refused because the destination was at its connectionPool.tcp.maxConnections",
            route_overflows.clone(),
        );
        let limits_source = SharedLimitsSource::default();
        registry.register_collector(Box::new(LimitsCollector(limits_source.clone())));
        Self {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            tcp_series: RwLock::default(),
            series_hasher: std::hash::RandomState::new(),
            enrolled_pods,
            enrollment_failed,
            pool_connections,
            pool_streams,
            policy_decisions,
            route_connections,
            route_ejections,
            route_overflows,
            pool_source: RwLock::new(None),
            limits_source,
        }
    }

    /// Adds a collector read at every scrape (after the metrics above).
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// Counts an opened connection labelled `l`; the series is to be given
    /// to [`Self::close_series`] when it closes. Labels are copied only for
    /// a label set seen for the first time.
    pub fn open_series(&self, l: ConnectionLabels<'_>) -> TcpSeries {
        use std::hash::BuildHasher as _;
        let values = l.values();
        let hash = self.series_hasher.hash_one(values);
        let same = |c: &Arc<TcpCounters>| c.labels.values() == values;
        let shared = self
            .tcp_series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .find(hash, same)
            .cloned();
        let series = shared.unwrap_or_else(|| {
            let mut all = self
                .tcp_series
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let rehash = |c: &Arc<TcpCounters>| self.series_hasher.hash_one(c.labels.values());
            match all.entry(hash, same, rehash) {
                hashbrown::hash_table::Entry::Occupied(found) => found.get().clone(),
                hashbrown::hash_table::Entry::Vacant(slot) => {
                    let labels = TcpLabels::from(l);
                    let opened = self.tcp_opened.get_or_create(&labels).clone();
                    let counters = Arc::new(TcpCounters {
                        labels,
                        opened,
                        closed: std::sync::OnceLock::new(),
                    });
                    slot.insert(counters).get().clone()
                }
            }
        });
        series.opened.inc();
        TcpSeries(series)
    }

    /// Counts the connection [`Self::open_series`] returned `series` for as
    /// closed, with `response_flags`, and its bytes: `sent` from the client
    /// to the server (`istio_tcp_received_bytes_total`, as Istio counts it
    /// from the server's view), `received` from the server to the client
    /// (`istio_tcp_sent_bytes_total`). These are the relay's `sent` and
    /// `received`.
    pub fn close_series(
        &self,
        series: TcpSeries,
        response_flags: ResponseFlags,
        sent: u64,
        received: u64,
    ) {
        let counters = |labels: &TcpLabels| {
            // Always create both byte series, so a connection that moved no
            // bytes still shows up as 0 next to its open/close counts.
            [
                self.tcp_closed.get_or_create(labels).clone(),
                self.tcp_received.get_or_create(labels).clone(),
                self.tcp_sent.get_or_create(labels).clone(),
            ]
        };
        let count = |[closed, received_bytes, sent_bytes]: &[Counter; 3]| {
            closed.inc();
            received_bytes.inc_by(sent);
            sent_bytes.inc_by(received);
        };
        let series = &series.0;
        if response_flags.as_str() == series.labels.response_flags {
            count(series.closed.get_or_init(|| counters(&series.labels)));
        } else {
            let mut labels = series.labels.clone();
            labels.response_flags = response_flags.as_str();
            count(&counters(&labels));
        }
    }

    /// Sets the number of enrolled pods.
    pub fn set_enrolled_pods(&self, n: usize) {
        self.enrolled_pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the number of pods whose enrollment failed or was refused.
    pub fn set_enrollment_failed(&self, n: usize) {
        self.enrollment_failed
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a routing event.
    pub fn route_event(&self, event: RouteEvent<'_>) {
        let (family, route, destination, subset) = match event {
            RouteEvent::Connection {
                route,
                destination,
                subset,
            } => (&self.route_connections, route, destination, subset),
            RouteEvent::Ejection {
                route,
                destination,
                subset,
            } => (&self.route_ejections, route, destination, subset),
            RouteEvent::Overflow {
                route,
                destination,
                subset,
            } => (&self.route_overflows, route, destination, subset),
        };
        family
            .get_or_create(&RouteLabels {
                route: route.unwrap_or("-").to_owned(),
                destination: destination.to_owned(),
                subset: subset.unwrap_or("-").to_owned(),
            })
            .inc();
    }

    /// Counts an authorization decision.
    pub fn policy_decision(&self, decision: PolicyDecision) {
        self.policy_decisions
            .get_or_create(&ResultLabel {
                result: decision.as_str(),
            })
            .inc();
    }

    /// Sets the pool gauges outright.
    pub fn set_pool(&self, connections: u64, streams: u64) {
        self.pool_connections
            .set(i64::try_from(connections).unwrap_or(i64::MAX));
        self.pool_streams
            .set(i64::try_from(streams).unwrap_or(i64::MAX));
    }

    /// Reads the pool gauges from `source` at every scrape (instead of
    /// [`Self::set_pool`] or the guards), for a pool that counts itself.
    pub fn set_pool_source(&self, source: impl Fn() -> (u64, u64) + Send + Sync + 'static) {
        *self
            .pool_source
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(source));
    }

    /// Reads the `mesh_limit_*` and `mesh_fd_limit` metrics from `source` at
    /// every scrape (none are reported before).
    pub fn set_limits_source(&self, source: impl Fn() -> LimitsReading + Send + Sync + 'static) {
        *self
            .limits_source
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(source));
    }

    /// Counts a pooled connection open until the guard drops.
    pub fn pool_connection(&self) -> GaugeGuard {
        self.pool_connections.inc();
        GaugeGuard(self.pool_connections.clone())
    }

    /// Counts a pooled stream open until the guard drops.
    pub fn pool_stream(&self) -> GaugeGuard {
        self.pool_streams.inc();
        GaugeGuard(self.pool_streams.clone())
    }

    /// Every metric, in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let source = self
            .pool_source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(source) = source {
            let (connections, streams) = source();
            self.set_pool(connections, streams);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The proxy's limits, read at scrape time; nothing until a source is set.
struct LimitsCollector(SharedLimitsSource);

impl fmt::Debug for LimitsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitsCollector").finish_non_exhaustive()
    }
}

impl Collector for LimitsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let source = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(source) = source else {
            return Ok(());
        };
        let r = source();
        let gauge = |n: u64| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        let mut m = encoder.encode_descriptor(
            "mesh_limit_in_use",
            "Slots of each connection limit in use (per-peer limits: the most any peer holds).",
            None,
            MetricType::Gauge,
        )?;
        for (limit, used, _) in &r.in_use {
            gauge(*used).encode(m.encode_family(&[("limit", *limit)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "mesh_limit_max",
            "The maximum of each connection limit.",
            None,
            MetricType::Gauge,
        )?;
        for (limit, _, max) in &r.in_use {
            gauge(*max).encode(m.encode_family(&[("limit", *limit)])?)?;
        }
        let counters = [
            (
                "mesh_limit_refused",
                "Connections and streams refused by a limit, by limit.",
                "limit",
                &r.refused,
            ),
            (
                "mesh_limit_closed",
                "HBONE connections closed by a deadline, by deadline.",
                "reason",
                &r.closed,
            ),
            (
                "mesh_limit_reduced",
                "Inbound tunnel connections granted a smaller HTTP/2 window than they asked for, by limit.",
                "limit",
                &r.reduced,
            ),
        ];
        for (name, help, label, values) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (value, n) in values {
                ConstCounter::new(*n).encode(m.encode_family(&[(label, *value)])?)?;
            }
        }
        let m = encoder.encode_descriptor(
            "mesh_limit_peers",
            "Peer identities holding inbound HBONE connections.",
            None,
            MetricType::Gauge,
        )?;
        gauge(r.peers).encode(m)?;
        let m = encoder.encode_descriptor(
            "mesh_fd_limit",
            "The agent's soft file-descriptor limit (RLIMIT_NOFILE), raised to the hard limit at start.",
            None,
            MetricType::Gauge,
        )?;
        gauge(r.fd_limit).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    /// The peers and service of [`labels`].
    struct Owned {
        source: PeerLabels,
        destination: PeerLabels,
        service: ServiceLabels,
    }

    fn owned() -> Owned {
        Owned {
            source: PeerLabels::from_workload(&pod("a", &[]), None),
            destination: PeerLabels::from_workload(
                &pod(
                    "web-5d9c7b8f6d-x2x7q",
                    &[
                        ("pod-template-hash", "5d9c7b8f6d"),
                        ("app", "web"),
                        ("version", "v2"),
                    ],
                ),
                Some("spiffe://cluster.local/ns/default/sa/web"),
            ),
            service: ServiceLabels {
                host: "web.default.svc.cluster.local".into(),
                name: "web".into(),
                namespace: "default".into(),
            },
        }
    }

    fn labels(o: &Owned) -> ConnectionLabels<'_> {
        ConnectionLabels {
            reporter: Reporter::Source,
            source: &o.source,
            destination: &o.destination,
            destination_service: Some(&o.service),
            security_policy: SecurityPolicy::MutualTls,
            response_flags: ResponseFlags::None,
        }
    }

    const SERIES: &str = "{reporter=\"source\",source_workload=\"a\",source_workload_namespace=\"default\",\
source_principal=\"unknown\",source_app=\"unknown\",source_version=\"unknown\",source_canonical_service=\"a\",\
source_canonical_revision=\"latest\",destination_workload=\"web\",destination_workload_namespace=\"default\",\
destination_principal=\"spiffe://cluster.local/ns/default/sa/web\",destination_app=\"web\",destination_version=\"v2\",\
destination_service=\"web.default.svc.cluster.local\",destination_service_name=\"web\",\
destination_service_namespace=\"default\",destination_canonical_service=\"web\",destination_canonical_revision=\"v2\",\
request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}";

    #[test]
    fn encodes_a_known_sequence_exactly() {
        // admin::collectors checks what its collectors add after this.
        let m = Metrics::new();
        let o = owned();
        let l = labels(&o);
        let (a, b) = (m.open_series(l), m.open_series(l));
        m.close_series(a, ResponseFlags::None, 100, 2048);
        m.close_series(b, ResponseFlags::None, 5, 0);
        m.set_enrolled_pods(2);
        m.policy_decision(PolicyDecision::Deny);
        let stream = m.pool_stream();
        let _conn = m.pool_connection();
        let _stream2 = m.pool_stream();
        drop(stream);
        let expected = format!(
            "# HELP istio_tcp_connections_opened Total number of TCP connections opened.\n\
# TYPE istio_tcp_connections_opened counter\n\
istio_tcp_connections_opened_total{SERIES} 2\n\
# HELP istio_tcp_connections_closed Total number of TCP connections closed.\n\
# TYPE istio_tcp_connections_closed counter\n\
istio_tcp_connections_closed_total{SERIES} 2\n\
# HELP istio_tcp_sent_bytes Total bytes sent during response of TCP connections (server to client).\n\
# TYPE istio_tcp_sent_bytes counter\n\
istio_tcp_sent_bytes_total{SERIES} 2048\n\
# HELP istio_tcp_received_bytes Total bytes received during request of TCP connections (client to server).\n\
# TYPE istio_tcp_received_bytes counter\n\
istio_tcp_received_bytes_total{SERIES} 105\n\
# HELP mesh_enrolled_pods Pods whose traffic this agent captures.\n\
# TYPE mesh_enrolled_pods gauge\n\
mesh_enrolled_pods 2\n\
# HELP mesh_enrollment_failed_pods Pods that should be enrolled but are not (refused or failing; see the config dump for why).\n\
# TYPE mesh_enrollment_failed_pods gauge\n\
mesh_enrollment_failed_pods 0\n\
# HELP mesh_pool_connections Open connections in the agent's upstream connection pool.\n\
# TYPE mesh_pool_connections gauge\n\
mesh_pool_connections 1\n\
# HELP mesh_pool_streams Streams open on the agent's pooled connections.\n\
# TYPE mesh_pool_streams gauge\n\
mesh_pool_streams 1\n\
# HELP mesh_policy_decisions Authorization decisions by result.\n\
# TYPE mesh_policy_decisions counter\n\
mesh_policy_decisions_total{{result=\"deny\"}} 1\n\
# EOF\n"
        );
        assert_eq!(m.encode().expect("encode"), expected);
    }

    #[test]
    fn connections_with_the_same_labels_share_one_series() {
        let m = Metrics::new();
        let o = owned();
        let (a, b) = (m.open_series(labels(&o)), m.open_series(labels(&o)));
        assert!(Arc::ptr_eq(&a.0, &b.0), "one shared series");
        let closed = |text: &str, flags: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("istio_tcp_connections_closed_total")
                        && l.contains(&format!("response_flags=\"{flags}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
        };
        // Open only: opened counts both, and no close or byte series shows.
        let text = m.encode().expect("encode");
        assert!(text.contains(&format!("istio_tcp_connections_opened_total{SERIES} 2")));
        assert_eq!(closed(&text, "-"), None, "{text}");
        assert!(!text.contains("istio_tcp_sent_bytes_total{"), "{text}");
        // A denied close counts in its own series, not the shared one's.
        m.close_series(a, ResponseFlags::Denied, 0, 0);
        let text = m.encode().expect("encode");
        assert_eq!(closed(&text, "DENY").as_deref(), Some("1"), "{text}");
        assert_eq!(closed(&text, "-"), None, "{text}");
        // A clean close counts through the shared handles.
        m.close_series(b, ResponseFlags::None, 7, 9);
        let c = m.open_series(labels(&o));
        m.close_series(c, ResponseFlags::None, 1, 1);
        let text = m.encode().expect("encode");
        assert_eq!(closed(&text, "-").as_deref(), Some("2"), "{text}");
        assert!(text.contains(&format!("istio_tcp_received_bytes_total{SERIES} 8")));
        assert!(text.contains(&format!("istio_tcp_sent_bytes_total{SERIES} 10")));
        assert!(text.contains(&format!("istio_tcp_connections_opened_total{SERIES} 3")));
    }

    /// Field `i` of seven.
    fn peer_field(p: &mut PeerLabels, i: usize) -> &mut String {
        match i {
            0 => &mut p.workload,
            1 => &mut p.namespace,
            2 => &mut p.principal,
            3 => &mut p.app,
            4 => &mut p.version,
            5 => &mut p.canonical_service,
            _ => &mut p.canonical_revision,
        }
    }

    #[test]
    fn series_are_found_by_borrowed_labels_and_each_label_tells_them_apart() {
        // Label sets that differ from `labels` in one value each: every
        // peer label, every service label, no service, the reporter, the
        // security policy and the response flags.
        let mut owned_sets = Vec::new();
        for i in 0..7 {
            for source in [true, false] {
                let mut o = owned();
                let p = if source {
                    &mut o.source
                } else {
                    &mut o.destination
                };
                peer_field(p, i).push_str("-x");
                owned_sets.push(o);
            }
        }
        for i in 0..3 {
            let mut o = owned();
            let svc = &mut o.service;
            [&mut svc.host, &mut svc.name, &mut svc.namespace][i].push_str("-x");
            owned_sets.push(o);
        }
        let base_owned = owned();
        let base = labels(&base_owned);
        let mut sets: Vec<ConnectionLabels<'_>> = owned_sets.iter().map(labels).collect();
        sets.push(ConnectionLabels {
            destination_service: None,
            ..base
        });
        sets.push(ConnectionLabels {
            reporter: Reporter::Destination,
            ..base
        });
        sets.push(ConnectionLabels {
            security_policy: SecurityPolicy::None,
            ..base
        });
        sets.push(ConnectionLabels {
            response_flags: ResponseFlags::Denied,
            ..base
        });
        sets.push(base);

        let m = Metrics::new();
        let mut series: Vec<TcpSeries> = Vec::new();
        for l in &sets {
            // The borrowed values are the ones the series keeps.
            assert_eq!(TcpLabels::from(*l).values(), l.values(), "{l:?}");
            let s = m.open_series(*l);
            assert!(
                series.iter().all(|other| !Arc::ptr_eq(&other.0, &s.0)),
                "{l:?} found another set's series"
            );
            series.push(s);
        }
        // Each set finds its own series again.
        for (l, s) in sets.iter().zip(&series) {
            assert!(Arc::ptr_eq(&m.open_series(*l).0, &s.0), "{l:?}");
        }
        let text = m.encode().expect("encode");
        let opened = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .collect::<Vec<_>>();
        assert_eq!(opened.len(), sets.len(), "{text}");
        assert!(opened.iter().all(|l| l.ends_with(" 2")), "{text}");
    }

    #[test]
    fn response_flags_and_reporter_make_separate_series() {
        let m = Metrics::new();
        let o = owned();
        let mut l = labels(&o);
        m.close_series(m.open_series(l), ResponseFlags::None, 0, 0);
        l.reporter = Reporter::Destination;
        l.security_policy = SecurityPolicy::None;
        l.destination_service = None;
        m.close_series(m.open_series(l), ResponseFlags::Denied, 0, 0);
        let text = m.encode().expect("encode");
        let closed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total"))
            .collect();
        assert_eq!(closed.len(), 2, "{text}");
        let denied = closed
            .iter()
            .find(|l| l.contains("response_flags=\"DENY\""))
            .expect("denied series");
        assert!(denied.contains("reporter=\"destination\""), "{denied}");
        assert!(
            denied.contains("destination_service=\"unknown\""),
            "{denied}"
        );
        assert!(
            denied.contains("connection_security_policy=\"none\""),
            "{denied}"
        );
        // A connection without bytes still has (zero) byte series.
        assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"destination\""));
    }

    #[test]
    fn pool_gauges_follow_a_source_at_scrape_time() {
        let m = Metrics::new();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(3));
        let seen = n.clone();
        m.set_pool_source(move || (seen.load(std::sync::atomic::Ordering::Relaxed), 7));
        let text = m.encode().expect("encode");
        assert!(text.contains("\nmesh_pool_connections 3\n"), "{text}");
        assert!(text.contains("\nmesh_pool_streams 7\n"), "{text}");
        n.store(1, std::sync::atomic::Ordering::Relaxed);
        assert!(
            m.encode()
                .expect("encode")
                .contains("\nmesh_pool_connections 1\n")
        );
    }

    #[test]
    fn limit_metrics_appear_once_a_source_is_set() {
        let m = Metrics::new();
        assert!(!m.encode().expect("encode").contains("mesh_limit"));
        m.set_limits_source(|| LimitsReading {
            in_use: vec![("connections", 3, 10)],
            refused: vec![("connections", 2), ("peer_streams", 1)],
            closed: vec![("idle_timeout", 4)],
            reduced: vec![("tunnel_window", 5)],
            peers: 1,
            fd_limit: 20000,
        });
        let text = m.encode().expect("encode");
        for line in [
            "mesh_limit_in_use{limit=\"connections\"} 3\n",
            "mesh_limit_max{limit=\"connections\"} 10\n",
            "mesh_limit_refused_total{limit=\"connections\"} 2\n",
            "mesh_limit_refused_total{limit=\"peer_streams\"} 1\n",
            "mesh_limit_closed_total{reason=\"idle_timeout\"} 4\n",
            "mesh_limit_reduced_total{limit=\"tunnel_window\"} 5\n",
            "mesh_limit_peers 1\n",
            "mesh_fd_limit 20000\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
    }

    #[test]
    fn workload_names_follow_deployments_and_stay_pod_names_otherwise() {
        let p = |name: &str, hash: Option<&str>| {
            let labels: Vec<(&str, &str)> =
                hash.map(|h| ("pod-template-hash", h)).into_iter().collect();
            workload_name(&pod(name, &labels))
        };
        assert_eq!(p("web-5d9c7b8f6d-x2x7q", Some("5d9c7b8f6d")), "web");
        assert_eq!(
            p("my-web-app-5d9c7b8f6d-x2x7q", Some("5d9c7b8f6d")),
            "my-web-app"
        );
        assert_eq!(p("web-0", None), "web-0");
        assert_eq!(p("web-abc-x2x7q", Some("5d9c7b8f6d")), "web-abc-x2x7q");
        assert_eq!(
            p("5d9c7b8f6d-x2x7q", Some("5d9c7b8f6d")),
            "5d9c7b8f6d-x2x7q"
        );
        let unknown = PeerLabels::unknown();
        assert_eq!(unknown.workload, "unknown");
        assert_eq!(unknown.principal, "unknown");
    }
}
