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
    /// Gateway API `HTTPRoute` objects, verbatim.
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
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
