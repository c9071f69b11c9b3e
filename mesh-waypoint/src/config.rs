//! The waypoint's configuration file (YAML): the services it fronts (VIPs,
//! ports, endpoints with labels) and the routes, given as Gateway API
//! `HTTPRoute` objects (`gateway.networking.k8s.io/v1`) exactly as a user
//! applies them to a cluster.
//!
//! Every level of an `HTTPRoute` keeps the fields this waypoint does not
//! know in `other`; [`crate::l7::route`] reports each of them (log and
//! `/config_dump`) instead of dropping it silently.
//!
//! ```yaml
//! services:
//!   - name: reviews
//!     namespace: default
//!     addresses: [10.96.0.10]
//!     ports: [{ port: 9080, targetPort: 8080 }]
//!     endpoints:
//!       - { address: 10.0.0.5, workload: reviews-v1, labels: { app: reviews, version: v1 } }
//! routes:
//!   - apiVersion: gateway.networking.k8s.io/v1
//!     kind: HTTPRoute
//!     metadata: { name: reviews, namespace: default }
//!     spec:
//!       parentRefs: [{ group: "", kind: Service, name: reviews, port: 9080 }]
//!       rules:
//!         - backendRefs: [{ name: reviews-v1, port: 9080, weight: 90 }, { name: reviews-v2, port: 9080, weight: 10 }]
//! ```

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Fields of an object this waypoint does not interpret (reported, never ignored silently).
pub type Other = BTreeMap<String, serde_yaml::Value>;

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the waypoint configuration {path}: {source}; check the --config path")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the expected YAML.
    #[error(
        "the waypoint configuration {path} is not valid: {source} (see the mesh-waypoint README for the format)"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        source: serde_yaml::Error,
    },
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointConfig {
    /// The services whose traffic this waypoint handles, and the backends
    /// routes may send to.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// The pods whose workload traffic (addressed to the pod's own IP)
    /// this waypoint takes (`istio.io/use-waypoint` on the pod or its
    /// namespace, the waypoint's `istio.io/waypoint-for` `workload` or
    /// `all`).
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Route objects, verbatim: Gateway API `HTTPRoute`s and Istio
    /// `VirtualService`s (read by [`WaypointConfig::route_objects`]).
    #[serde(default)]
    pub routes: Vec<serde_yaml::Value>,
    /// Istio `AuthorizationPolicy` objects, verbatim; those attached with
    /// `targetRefs` to this waypoint's Gateway, to a Service it fronts or
    /// to the `istio-waypoint` GatewayClass (root namespace) are enforced
    /// per request. The others are the node agents'.
    #[serde(default)]
    pub policies: Vec<serde_yaml::Value>,
    /// The Gateway this waypoint is (`targetRefs` of kind Gateway name
    /// it); by default the name and namespace of its identity's service
    /// account, as Istio names a waypoint's.
    #[serde(default)]
    pub gateway: Option<GatewayRef>,
    /// Istio's root namespace (`istio-system`): its policies targeting the
    /// `istio-waypoint` GatewayClass apply to every waypoint.
    #[serde(default)]
    pub root_namespace: Option<String>,
}

/// A Gateway by name and namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRef {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// One entry of `routes:`, by its `kind`.
#[derive(Clone, Debug)]
pub enum RouteObject {
    /// A Gateway API `HTTPRoute`.
    Http(Box<HttpRoute>),
    /// An Istio `VirtualService`.
    Virtual(Box<VirtualService>),
    /// An Istio `DestinationRule`, as served (compiled by the routing
    /// engine, `mesh-routing`, as the node agent's are).
    Destination(Box<serde_json::Value>),
    /// An object that is neither, or does not parse (reported, not used).
    Invalid {
        /// `namespace/name` as far as it can be read.
        name: String,
        /// Why.
        reason: String,
    },
}

impl WaypointConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The route objects by kind; an object of another kind or that does
    /// not parse is [`RouteObject::Invalid`] (reported by the route table).
    pub fn route_objects(&self) -> Vec<RouteObject> {
        self.routes
            .iter()
            .map(|v| {
                let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
                let meta = |k: &str| {
                    v.get("metadata")
                        .and_then(|m| m.get(k))
                        .and_then(|x| x.as_str())
                        .unwrap_or("")
                        .to_owned()
                };
                let ns = Some(meta("namespace")).filter(|n| !n.is_empty());
                let name = format!("{}/{}", ns.as_deref().unwrap_or("default"), meta("name"));
                let invalid = |reason: String| RouteObject::Invalid {
                    name: name.clone(),
                    reason,
                };
                match (text("apiVersion"), text("kind")) {
                    (
                        "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1",
                        "HTTPRoute",
                    ) => serde_yaml::from_value(v.clone())
                        .map(|r| RouteObject::Http(Box::new(r)))
                        .unwrap_or_else(|e| invalid(e.to_string())),
                    (
                        "networking.istio.io/v1"
                        | "networking.istio.io/v1beta1"
                        | "networking.istio.io/v1alpha3",
                        "VirtualService",
                    ) => serde_yaml::from_value(v.clone())
                        .map(|r| RouteObject::Virtual(Box::new(r)))
                        .unwrap_or_else(|e| invalid(e.to_string())),
                    (
                        "networking.istio.io/v1"
                        | "networking.istio.io/v1beta1"
                        | "networking.istio.io/v1alpha3",
                        "DestinationRule",
                    ) => serde_json::to_value(v)
                        .map(|r| RouteObject::Destination(Box::new(r)))
                        .unwrap_or_else(|e| invalid(e.to_string())),
                    (api, kind) => invalid(format!(
                        "{api} {kind} is not a route this waypoint reads (HTTPRoute, VirtualService, DestinationRule)"
                    )),
                }
            })
            .collect()
    }

    /// The DestinationRules among the route objects, as served.
    pub fn destination_rules(&self) -> Vec<serde_json::Value> {
        self.route_objects()
            .into_iter()
            .filter_map(|r| match r {
                RouteObject::Destination(dr) => Some(*dr),
                _ => None,
            })
            .collect()
    }

    /// Parses the YAML text of a configuration.
    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}

/// A Kubernetes Service as the waypoint needs it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    /// The Service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its cluster IPs (the VIPs clients CONNECT to through the waypoint).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Its ready endpoints (pods).
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

/// How the waypoint treats the traffic of one service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// Detect HTTP/1.1 or HTTP/2 (prior knowledge) from the first bytes;
    /// anything else, or a client that sends nothing first, is TCP.
    #[default]
    Auto,
    /// HTTP (either version, detected).
    Http,
    /// HTTP whose backends speak HTTP/2 (prior knowledge, `h2c`): the
    /// waypoint sends them HTTP/2 (`appProtocol` `http2`, `grpc`,
    /// `kubernetes.io/h2c`). Clients may use either version.
    #[serde(alias = "grpc", alias = "h2c")]
    Http2,
    /// Opaque TCP: never parsed.
    Tcp,
}

/// One port of a service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The service port.
    pub port: u16,
    /// The endpoints' port (the service port when absent).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// The port's protocol (Kubernetes `appProtocol`, simplified).
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// One endpoint (pod) of a service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    /// The pod's IP.
    pub address: IpAddr,
    /// The pod's port for every service port (overrides `targetPort`; for
    /// several endpoints on one address, as in tests).
    #[serde(default)]
    pub port: Option<u16>,
    /// The workload's name (its Deployment's), for telemetry.
    #[serde(default)]
    pub workload: Option<String>,
    /// The pod's service account (its principal), for telemetry.
    #[serde(default)]
    pub service_account: Option<String>,
    /// The pod's labels (`app`, `version` for telemetry).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How the waypoint reaches the pod: `hbone` (mTLS through the pod's
    /// node agent, expecting the pod's SPIFFE identity) or `none` (plaintext).
    #[serde(default)]
    pub tunnel: TunnelProtocol,
    /// The HBONE port of the pod's address (15008).
    #[serde(default)]
    pub hbone_port: Option<u16>,
}

/// A pod whose workload traffic the waypoint takes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The pod's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its IPs (the addresses clients CONNECT to through the waypoint).
    pub addresses: Vec<IpAddr>,
    /// The workload's name (its Deployment's), for telemetry; the pod's
    /// name when absent.
    #[serde(default)]
    pub workload: Option<String>,
    /// The pod's service account (its principal).
    #[serde(default)]
    pub service_account: Option<String>,
    /// The pod's labels (`app`, `version` for telemetry).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How the waypoint reaches the pod (as for an endpoint).
    #[serde(default)]
    pub tunnel: TunnelProtocol,
    /// The HBONE port of the pod's address (15008).
    #[serde(default)]
    pub hbone_port: Option<u16>,
    /// How the waypoint treats the pod's ports (detected by default).
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// How an endpoint is reached (Istio's workload `tunnelProtocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProtocol {
    /// Plaintext TCP to the pod.
    #[default]
    None,
    /// HBONE: mTLS HTTP/2 CONNECT to the pod's port 15008.
    Hbone,
}

/// Object metadata (name and namespace; the rest is not used).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ObjectMeta {
    /// The object's name.
    #[serde(default)]
    pub name: String,
    /// Its namespace (`default` when absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels, annotations, ...: not used for routing.
    #[serde(flatten)]
    pub other: Other,
}

/// A Gateway API `HTTPRoute`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// `gateway.networking.k8s.io/v1` (or `v1beta1`).
    pub api_version: String,
    /// `HTTPRoute`.
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The route.
    pub spec: HttpRouteSpec,
    /// `status` and anything else at the top level.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRoute.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// The Services (GAMMA) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// `hostnames` (not used for Service parents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
    /// Unknown fields.
    #[serde(flatten)]
    pub other: Other,
}

/// A `parentRef`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// `""` (core) for a Service.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` for GAMMA (`Gateway` is not for a waypoint's routes).
    #[serde(default)]
    pub kind: Option<String>,
    /// The parent's name.
    pub name: String,
    /// Its namespace (the route's when absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service port the route applies to (every port when absent).
    #[serde(default)]
    pub port: Option<u16>,
    /// `sectionName` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// One rule of a route.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// The rule's optional name.
    #[serde(default)]
    pub name: Option<String>,
    /// The rule applies if any match does (a `/` prefix when empty).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied to matching requests.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Where the requests go.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// `timeouts.request` (`backendRequest` is reported).
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// `retry`, `sessionPersistence` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRouteMatch`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// The path match.
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    /// Header matches (all must hold).
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    /// Query parameter matches (all must hold).
    #[serde(default)]
    pub query_params: Vec<ValueMatchSpec>,
    /// The method.
    #[serde(default)]
    pub method: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPPathMatch`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatchSpec {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The value (`/` by default).
    #[serde(default)]
    pub value: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPHeaderMatch` and `HTTPQueryParamMatch`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatchSpec {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The header or parameter name.
    pub name: String,
    /// The value.
    pub value: String,
    /// Unknown fields.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRouteFilter`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// The filter type.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    /// The configuration of other filter types.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPHeaderFilter`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifierSpec {
    /// Headers to set (replacing).
    #[serde(default)]
    pub set: Vec<HeaderValueSpec>,
    /// Headers to add (appending).
    #[serde(default)]
    pub add: Vec<HeaderValueSpec>,
    /// Header names to remove.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub other: Other,
}

/// A header name and value.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HeaderValueSpec {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// `HTTPBackendRef`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// `""` (core) for a Service.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (default).
    #[serde(default)]
    pub kind: Option<String>,
    /// The Service's name.
    pub name: String,
    /// Its namespace (the route's when absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service port.
    #[serde(default)]
    pub port: Option<u16>,
    /// The relative weight (1 by default).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Per-backend `filters` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRouteTimeouts`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, as a Gateway API duration (`10s`, `500ms`, `1h30m`).
    #[serde(default)]
    pub request: Option<String>,
    /// `backendRequest` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// An Istio `VirtualService` (`networking.istio.io`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    /// `networking.istio.io/v1` (or `v1beta1`, `v1alpha3`).
    pub api_version: String,
    /// `VirtualService`.
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The routes.
    pub spec: VirtualServiceSpec,
    /// `status` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// The services the routes apply to (short names, `name.namespace`, or FQDNs).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Absent or `mesh` for a waypoint.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// The HTTP routes, first match wins.
    #[serde(default)]
    pub http: Vec<VsHttpRoute>,
    /// The namespaces whose clients see the routes (`.` its own, `*` or
    /// absent: all).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// `tcp`, `tls` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRoute` of a VirtualService.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsHttpRoute {
    /// The route's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Any match selects the route (every request when empty).
    #[serde(default, rename = "match")]
    pub matches: Vec<VsMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<VsRouteDestination>,
    /// The whole request's timeout (`10s`, `0.5s`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// The retry policy.
    #[serde(default)]
    pub retries: Option<VsRetries>,
    /// Header operations for every destination.
    #[serde(default)]
    pub headers: Option<VsHeaders>,
    /// Fault injection (delay, abort).
    #[serde(default)]
    pub fault: Option<VsFault>,
    /// A destination receiving copies of the requests.
    #[serde(default)]
    pub mirror: Option<VsDestination>,
    /// The share mirrored (all when unset).
    #[serde(default)]
    pub mirror_percentage: Option<VsPercent>,
    /// Path (or matched prefix) and authority rewrite.
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    /// A redirect answered by the waypoint.
    #[serde(default)]
    pub redirect: Option<VsRedirect>,
    /// `mirror`, `rewrite`, `redirect`, ...
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPMatchRequest`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsMatch {
    /// The match's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// Headers (all must hold).
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameters (all must hold).
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// The method.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// `ignoreUriCase`, `port`, `sourceLabels`, `withoutHeaders`, ...
    #[serde(flatten)]
    pub other: Other,
}

/// Istio's `StringMatch` (one of).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct StringMatch {
    /// Exact.
    #[serde(default)]
    pub exact: Option<String>,
    /// Prefix (a string prefix).
    #[serde(default)]
    pub prefix: Option<String>,
    /// RE2 regular expression, whole string.
    #[serde(default)]
    pub regex: Option<String>,
    /// Anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRouteDestination`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRouteDestination {
    /// Where.
    pub destination: VsDestination,
    /// The share (percent; 100 for a single destination).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Header operations for this destination.
    #[serde(default)]
    pub headers: Option<VsHeaders>,
    /// Anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `Destination`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsDestination {
    /// The service (short name, `name.namespace`, or FQDN).
    pub host: String,
    /// A DestinationRule subset (not supported yet: reported).
    #[serde(default)]
    pub subset: Option<String>,
    /// The service port.
    #[serde(default)]
    pub port: Option<VsPort>,
    /// Anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `PortSelector`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct VsPort {
    /// The port number.
    pub number: u16,
}

/// `HTTPRetry`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRetries {
    /// Retries allowed (0 disables them).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// The timeout of each try.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Comma-separated conditions (`5xx`, `gateway-error`, `connect-failure`, `reset`, status codes, ...).
    #[serde(default)]
    pub retry_on: Option<String>,
    /// `retryRemoteLocalities`, `backoff` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `Headers`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct VsHeaders {
    /// Operations on the request.
    #[serde(default)]
    pub request: Option<VsHeaderOps>,
    /// Operations on the response.
    #[serde(default)]
    pub response: Option<VsHeaderOps>,
}

/// `HeaderOperations`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct VsHeaderOps {
    /// Set (replace).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `HTTPFaultInjection`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct VsFault {
    /// Delay a share of the requests.
    #[serde(default)]
    pub delay: Option<VsDelay>,
    /// Abort a share of the requests.
    #[serde(default)]
    pub abort: Option<VsAbort>,
    /// Anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPFaultInjection.Delay`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsDelay {
    /// The delay (`5s`).
    #[serde(default)]
    pub fixed_delay: Option<String>,
    /// The share of requests delayed (none when unset).
    #[serde(default)]
    pub percentage: Option<VsPercent>,
    /// The deprecated integer share.
    #[serde(default)]
    pub percent: Option<u32>,
    /// `exponentialDelay` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPFaultInjection.Abort`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsAbort {
    /// The status to answer.
    #[serde(default)]
    pub http_status: Option<u16>,
    /// The share of requests aborted (none when unset).
    #[serde(default)]
    pub percentage: Option<VsPercent>,
    /// `grpcStatus`, `http2Error` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `Percent`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct VsPercent {
    /// 0 to 100.
    #[serde(default)]
    pub value: f64,
}

/// `HTTPRewrite`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct VsRewrite {
    /// The new path, or the replacement of the matched `prefix`.
    #[serde(default)]
    pub uri: Option<String>,
    /// The new authority (Host).
    #[serde(default)]
    pub authority: Option<String>,
    /// `uriRegexRewrite` and anything else.
    #[serde(flatten)]
    pub other: Other,
}

/// `HTTPRedirect`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRedirect {
    /// The new path.
    #[serde(default)]
    pub uri: Option<String>,
    /// The new authority.
    #[serde(default)]
    pub authority: Option<String>,
    /// The new scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// The new port.
    #[serde(default)]
    pub port: Option<u16>,
    /// The status (301 by default).
    #[serde(default)]
    pub redirect_code: Option<u16>,
    /// `derivePort` and anything else.
    #[serde(flatten)]
    pub other: Other,
}
