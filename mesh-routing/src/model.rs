//! The objects as the API server serves them (camelCase JSON), for the
//! fields the engine reads. Every spec type keeps the fields it does not know
//! in `other`, so that an unsupported field (an L7 one, a newer one) is
//! reported by name instead of silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// Fields the engine does not read, by name (reported as warnings).
pub type Other = BTreeMap<String, Value>;

/// `metadata` (only what routing needs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// `metadata.name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `metadata.namespace` (`default` when absent, as `kubectl apply` does).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A whole object: `apiVersion`, `kind`, `metadata`, `spec` (status and
/// the rest are ignored: they are not configuration).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S> {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata`.
    #[serde(default)]
    pub metadata: Metadata,
    /// `spec`.
    pub spec: S,
}

/// `networking.istio.io` `DestinationRule.spec`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service the rule is for (short, `name.namespace` or FQDN).
    pub host: String,
    /// The policy for every subset (overridden per subset and port).
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named groups of endpoints, by pod labels.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Namespaces the rule is visible to (`*` all, `.` its own).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Everything else (`workloadSelector`, ...): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// A subset of a DestinationRule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// The subset's name (what routes refer to).
    pub name: String,
    /// Pod labels every endpoint of the subset has.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides of the rule's policy for this subset.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Everything else: reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `trafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection limits and timeouts.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Per-port overrides (replacing the four settings as a whole).
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Everything else (`tls`, `proxyProtocol`, `tunnel`, ...): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// One `portLevelSettings` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The destination service port it applies to.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection limits and timeouts.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Everything else (`tls`): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `{number: N}`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct PortSelector {
    /// The port.
    pub number: u32,
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// A standard algorithm.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    /// Hash-based affinity.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Everything else (`localityLbSetting`, `warmupDurationSecs`, ...): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `loadBalancer.simple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Istio picks: LEAST_REQUEST.
    Unspecified,
    /// Deprecated alias of LEAST_REQUEST.
    LeastConn,
    /// Uniformly random.
    Random,
    /// The address the client dialled, without endpoint choice.
    Passthrough,
    /// In turn.
    RoundRobin,
    /// Fewest active connections.
    LeastRequest,
}

/// `loadBalancer.consistentHash`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash on the client's address (the one L4 key).
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// Everything else (`httpHeaderName`, `httpCookie`,
    /// `httpQueryParameterName`: L7; `ringHash`, `maglev`,
    /// `minimumRingSize`: tuning): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `connectionPool`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// TCP settings.
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    /// Everything else (`http`: L7): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Most concurrent connections to the destination.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Connect deadline (Go-style duration: `500ms`, `10s`, `1m`).
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Everything else (`tcpKeepalive`, `maxConnectionDuration`, `idleTimeout`): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `outlierDetection`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive gateway errors (at L4: connect failures, tunnel 503s) before ejection; 0 disables.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive 5xx errors (at L4: the same failures) before ejection; 0 disables; default 5.
    #[serde(default)]
    pub consecutive_5xx_errors: Option<u32>,
    /// Deprecated alias of `consecutive5xxErrors`.
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    /// Analysis sweep interval (default 10s).
    #[serde(default)]
    pub interval: Option<String>,
    /// Minimum ejection duration, multiplied by the times ejected (default 30s).
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Most endpoints of a pool ejected at once, percent (default 10; at least one).
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
    /// Everything else (`minHealthPercent`, `splitExternalLocalOriginErrors`, ...): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `networking.istio.io` `VirtualService.spec`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// The services the routes apply to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Where the routes apply: `mesh` (the default) or gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// L4 routes.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces the service is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Everything else (`http`, `tls`: L7 / SNI routes): reported.
    #[serde(flatten)]
    pub other: Other,
}

/// One `tcp:` route.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Any one matching selects the route; none: every connection.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    /// Everything else: reported.
    #[serde(flatten)]
    pub other: Other,
}

/// An L4 match.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    /// The destination addresses (CIDR or address) the client dialled.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// The service port the client dialled.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels the client pod has.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// The client pod's namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Where the match applies (`mesh` or gateways).
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Everything else: reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `route[]`: a destination and its weight.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    /// Where to.
    pub destination: Destination,
    /// Relative share (100 when it is the only destination).
    #[serde(default)]
    pub weight: Option<i64>,
    /// Everything else: reported.
    #[serde(flatten)]
    pub other: Other,
}

/// `destination`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The service.
    pub host: String,
    /// A subset of a DestinationRule for the host.
    #[serde(default)]
    pub subset: Option<String>,
    /// The service port (needed when the service has several and none matches the dialled one).
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// `gateway.networking.k8s.io` `TCPRoute.spec`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteSpec {
    /// What the route attaches to (a `Service`: the mesh).
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// The rules (one is supported; it has no matches at L4).
    #[serde(default)]
    pub rules: Vec<TcpRouteRule>,
    /// Everything else: reported.
    #[serde(flatten)]
    pub other: Other,
}

/// A `parentRef`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// API group (`""` or `core` for a Service).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (default `Gateway`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only this port of the parent.
    #[serde(default)]
    pub port: Option<u32>,
    /// A listener of a Gateway.
    #[serde(default)]
    pub section_name: Option<String>,
}

/// A TCPRoute rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteRule {
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Everything else (`name`): reported when unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// A `backendRef`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// API group (`""` or `core` for a Service).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (default `Service`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Namespace (default: the route's; another one needs a ReferenceGrant).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service port (required for a Service).
    #[serde(default)]
    pub port: Option<u32>,
    /// Relative share (default 1).
    #[serde(default)]
    pub weight: Option<i64>,
}
