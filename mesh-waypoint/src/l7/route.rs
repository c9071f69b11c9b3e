//! The route model: Gateway API `HTTPRoute`s compiled into per service port
//! tables of matches in Gateway API precedence order, and the choice of a
//! rule and a weighted backend for a request.
//!
//! Pure (no I/O): it depends only on the configuration types, `http` and
//! `regex`, so that it can move into a shared routing crate later.
//!
//! Semantics (Gateway API v1, GAMMA):
//! - A route attaches to the Services its `parentRefs` name (`kind: Service`,
//!   group `""`), on `port` or on every port of the Service.
//! - A request takes the first matching (rule, match) of its service port in
//!   this order: an `Exact` path, then a `RegularExpression` path
//!   (implementation-specific in the spec; Istio ranks it there too), then the
//!   longest `PathPrefix`; then a method match; then the most header matches;
//!   then the most query matches; then the oldest route (`creationTimestamp`),
//!   then `namespace/name` alphabetically, then rule order.
//! - A service port with routes but no matching rule answers 404; one
//!   without routes goes to the service itself.
//! - A rule with a filter or a match this waypoint cannot evaluate answers
//!   500 (the spec forbids skipping a filter; skipping a match would widen
//!   the rule); a backend that cannot be resolved answers 500 for its share
//!   of the weight. Both are listed in [`RouteTable::unsupported`].

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use mesh_routing::Export;
use regex::Regex;
use serde::Serialize;

use crate::config::{
    BackendRef, HeaderModifierSpec, HttpRoute, HttpRouteMatch, HttpRouteRule, Other, ServiceConfig,
    ValueMatchSpec,
};

/// A Service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the waypoint does about a field it does not support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// The field has no effect (safe to leave out: nothing is widened).
    Ignored,
    /// The rule answers 500 (a filter or match that cannot be skipped).
    RuleFails,
    /// The backend's share of the rule answers 500.
    BackendFails,
    /// The parent reference is not attached.
    ParentNotAttached,
    /// The whole route is not used.
    RouteRejected,
}

/// A field of a route the waypoint does not support, and what it does instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unsupported {
    /// `namespace/name` of the route.
    pub route: String,
    /// The field's path in the object (`spec.rules[0].filters[1]`).
    pub field: String,
    /// Why.
    pub reason: String,
    /// What happens instead.
    pub effect: Effect,
}

/// A header modification (`RequestHeaderModifier`, `ResponseHeaderModifier`).
#[derive(Clone, Debug, Default)]
pub struct HeaderModifier {
    pub(crate) set: Vec<(HeaderName, HeaderValue)>,
    pub(crate) add: Vec<(HeaderName, HeaderValue)>,
    pub(crate) remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Applies the modification to `headers`: set, then add, then remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// A backend of a rule: a service port, or a reference that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A known Service's port.
    Service {
        /// The Service.
        service: ServiceKey,
        /// Its port.
        port: u16,
        /// Only the endpoints of this DestinationRule subset (resolved
        /// per request by the routing engine: the rule visible to the
        /// client's namespace).
        subset: Option<Arc<str>>,
    },
    /// A reference that does not resolve (answers 500).
    Invalid(String),
}

/// One weighted backend.
#[derive(Clone, Debug)]
pub struct WeightedBackend {
    /// Where.
    pub backend: Backend,
    /// Its relative weight.
    pub weight: u32,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of its route.
    pub route: String,
    /// Its index in the route's `rules`.
    pub index: usize,
    /// Where requests go.
    pub backends: Vec<WeightedBackend>,
    /// `timeouts.request`.
    pub timeout: Option<Duration>,
    /// `RequestHeaderModifier`.
    pub request_headers: HeaderModifier,
    /// `ResponseHeaderModifier`.
    pub response_headers: HeaderModifier,
    /// Retries (Istio's default policy when the route sets none).
    pub retry: RetryPolicy,
    /// Fault injection (VirtualService `fault`).
    pub fault: Fault,
    /// URL rewrite.
    pub rewrite: Rewrite,
    /// A redirect instead of a backend.
    pub redirect: Option<Redirect>,
    /// Copies of the requests sent to these backends (responses ignored),
    /// each for a share (0 to 1) of the requests.
    pub mirrors: Vec<(Backend, f64)>,
    /// Why the rule answers 500, if it does.
    pub broken: Option<String>,
}

/// How a rule rewrites the request before it goes to the backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// The new Host (authority).
    pub hostname: Option<HeaderValue>,
    /// The new path.
    pub path: Option<PathRewrite>,
}

/// A path rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRewrite {
    /// The whole path (the query is kept).
    Full(String),
    /// The matched prefix (the longest of the rule's prefixes the path has)
    /// replaced; `elements`: Gateway API prefixes (whole path elements),
    /// else Istio's string prefixes.
    Prefix {
        /// The rule's prefixes.
        prefixes: Vec<String>,
        /// Gateway API semantics.
        elements: bool,
        /// The replacement.
        replacement: String,
    },
}

impl Rewrite {
    /// The rewritten `path` (without its query).
    pub fn path(&self, path: &str) -> Option<String> {
        match self.path.as_ref()? {
            PathRewrite::Full(p) => Some(p.clone()),
            PathRewrite::Prefix {
                prefixes,
                elements,
                replacement,
            } => {
                let matched = prefixes
                    .iter()
                    .filter(|p| {
                        if *elements {
                            let p = p.trim_end_matches('/');
                            p.is_empty()
                                || path == p
                                || (path.starts_with(p)
                                    && path.as_bytes().get(p.len()) == Some(&b'/'))
                        } else {
                            path.starts_with(p.as_str())
                        }
                    })
                    .max_by_key(|p| p.len())?;
                let matched = if *elements {
                    matched.trim_end_matches('/')
                } else {
                    matched.as_str()
                };
                let rest = &path[matched.len()..];
                if !*elements {
                    return Some(format!("{replacement}{rest}"));
                }
                // Gateway API: `/foo` -> `/xyz` turns `/foo/bar` into
                // `/xyz/bar`; a `/` replacement gives `/bar`.
                let base = replacement.trim_end_matches('/');
                let out = format!("{base}{rest}");
                Some(if out.is_empty() { "/".to_owned() } else { out })
            }
        }
    }
}

/// A redirect answered by the waypoint (no backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The status (`302` by default for Gateway API, `301` for Istio).
    pub status: http::StatusCode,
    /// The new scheme.
    pub scheme: Option<String>,
    /// The new host name.
    pub hostname: Option<String>,
    /// The new port.
    pub port: Option<u16>,
    /// The new path.
    pub path: Option<PathRewrite>,
}

impl Redirect {
    /// The `Location` for a request to `host` (its `Host`, a port is dropped)
    /// at `path` with `query`.
    pub fn location(&self, host: &str, path: &str, query: Option<&str>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = self.hostname.clone().unwrap_or_else(|| {
            host.rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(host, |(h, _)| h)
                .to_owned()
        });
        let port = match (self.port, scheme) {
            (Some(80), "http") | (Some(443), "https") | (None, _) => String::new(),
            (Some(p), _) => format!(":{p}"),
        };
        let rewrite = Rewrite {
            hostname: None,
            path: self.path.clone(),
        };
        let path = rewrite.path(path).unwrap_or_else(|| path.to_owned());
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{host}{port}{path}{query}")
    }
}

/// Faults injected into a share of a rule's requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// Delay by this long, with this probability (0 to 1).
    pub delay: Option<(Duration, f64)>,
    /// Answer this status without a backend, with this probability.
    pub abort: Option<(http::StatusCode, f64)>,
}

/// When a failed try is retried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, a reset, or a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504 or a per-try timeout.
    pub gateway_error: bool,
    /// `connect-failure`: the backend could not be reached.
    pub connect_failure: bool,
    /// `reset`, `refused-stream`: the backend reset before a response.
    pub reset: bool,
    /// `retriable-status-codes` and bare codes: these statuses.
    pub codes: Vec<u16>,
    /// gRPC conditions (`cancelled` 1, `deadline-exceeded` 4,
    /// `resource-exhausted` 8, `internal` 13, `unavailable` 14): these
    /// `grpc-status` codes in the response headers (a trailers-only gRPC
    /// response, as Envoy reads them).
    pub grpc: Vec<u32>,
}

/// The `grpc-status` in `headers` (a response's, or its trailers), if any
/// and a number.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl RetryOn {
    /// Whether a response with `status` is retried.
    pub fn status(&self, status: u16) -> bool {
        (self.server_error && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || self.codes.contains(&status)
    }

    /// Whether a response with these headers is retried for its
    /// `grpc-status` (a gRPC error answered without a body).
    pub fn grpc_status(&self, headers: &http::HeaderMap) -> bool {
        !self.grpc.is_empty() && grpc_status(headers).is_some_and(|code| self.grpc.contains(&code))
    }

    /// Whether a per-try timeout is retried.
    pub fn timeout(&self) -> bool {
        self.server_error || self.gateway_error
    }

    /// Whether a connection failure is retried.
    pub fn connect(&self) -> bool {
        self.connect_failure || self.server_error || self.gateway_error
    }

    /// Whether a reset before the response is retried.
    pub fn reset(&self) -> bool {
        self.reset || self.server_error
    }
}

/// A rule's retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    /// Each try's timeout.
    pub per_try_timeout: Option<Duration>,
    /// When to retry.
    pub on: RetryOn,
    /// The base backoff between tries (Envoy's 25 ms when unset).
    pub backoff: Option<Duration>,
}

impl Default for RetryPolicy {
    /// Istio's default (`meshConfig.defaultHttpRetryPolicy` unset): 2
    /// retries on `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` (503).
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                reset: true,
                codes: vec![503],
                grpc: vec![GRPC_UNAVAILABLE, GRPC_CANCELLED],
                ..RetryOn::default()
            },
            backoff: None,
        }
    }
}

/// gRPC status `CANCELLED`.
const GRPC_CANCELLED: u32 = 1;
/// gRPC status `UNAVAILABLE`.
const GRPC_UNAVAILABLE: u32 = 14;

/// Parses Istio's `retryOn`; returns the conditions and the ones not supported.
pub fn parse_retry_on(s: &str) -> (RetryOn, Vec<String>) {
    let mut on = RetryOn::default();
    let mut unsupported = Vec::new();
    for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token {
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "connect-failure" => on.connect_failure = true,
            "reset" | "refused-stream" => on.reset = true,
            // The status codes come as bare numbers in Istio's retryOn.
            "retriable-status-codes" => {}
            "cancelled" => on.grpc.push(GRPC_CANCELLED),
            "deadline-exceeded" => on.grpc.push(4),
            "resource-exhausted" => on.grpc.push(8),
            "internal" => on.grpc.push(13),
            "unavailable" => on.grpc.push(GRPC_UNAVAILABLE),
            t => match t.parse::<u16>() {
                Ok(code) if (100..600).contains(&code) => on.codes.push(code),
                _ => unsupported.push(t.to_owned()),
            },
        }
    }
    (on, unsupported)
}

impl Rule {
    /// Picks a backend by weight with `pick(total)` returning a number in
    /// `0..total`; None when every weight is 0 (the spec's 500).
    pub fn choose(&self, pick: impl FnOnce(u32) -> u32) -> Option<&Backend> {
        let total: u32 = self
            .backends
            .iter()
            .map(|b| b.weight)
            .fold(0, u32::saturating_add);
        if total == 0 {
            return None;
        }
        let mut n = pick(total);
        for b in &self.backends {
            if n < b.weight {
                return Some(&b.backend);
            }
            n -= b.weight;
        }
        None
    }
}

/// A path match.
#[derive(Debug)]
pub(crate) enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Gateway API `PathPrefix`: whole path elements (stored without a trailing `/`).
    Prefix(String),
    /// Istio's `prefix`: a string prefix.
    StringPrefix(String),
    /// The whole path.
    Regex(Regex),
}

/// A header or query value match.
#[derive(Debug)]
pub(crate) enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// Present with any value (Istio's empty `StringMatch`).
    Present,
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(v),
            Self::Present => true,
        }
    }
}

/// One match of a rule (all its parts must hold).
#[derive(Debug)]
pub(crate) struct Match {
    pub(crate) path: PathMatch,
    pub(crate) headers: Vec<(HeaderName, ValueMatch)>,
    pub(crate) query: Vec<(String, ValueMatch)>,
    pub(crate) method: Option<Method>,
}

impl Match {
    /// Every request.
    pub(crate) fn any() -> Self {
        Self {
            path: PathMatch::Prefix(String::new()),
            headers: Vec::new(),
            query: Vec::new(),
            method: None,
        }
    }
}

impl Match {
    fn matches(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap) -> bool {
        let path = uri.path();
        let path_ok = match &self.path {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p.is_empty()
                    || path == p
                    || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            PathMatch::StringPrefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        };
        if !path_ok || self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|(name, m)| {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            !values.is_empty() && m.matches(&values.join(","))
        });
        headers_ok
            && self.query.iter().all(|(name, m)| {
                uri.query()
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                    .is_some_and(|v| m.matches(v))
            })
    }

    /// Larger sorts first (Gateway API precedence within one port).
    pub(crate) fn rank(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (2, p.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
            PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => (0, p.len()),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) m: Match,
    pub(crate) rule: Arc<Rule>,
    /// The route's namespace.
    pub(crate) namespace: String,
    /// The clients' namespaces that see it: all for a producer route (in
    /// the Service's namespace), the route's own for a consumer route
    /// (GAMMA); a VirtualService's `exportTo`.
    pub(crate) visible: Export,
    /// (creationTimestamp, namespace/name, rule index): ascending wins ties.
    pub(crate) tie: (String, String, usize),
}

/// The `entries` clients of `client_ns` see, in order: only their own
/// namespace's if it has any; `None` if they see none.
fn visible_to<'a, 'n>(
    entries: Option<&'a Vec<Entry>>,
    client_ns: &'n str,
) -> Option<std::iter::Peekable<impl Iterator<Item = &'a Entry> + use<'a, 'n>>> {
    let entries = entries?;
    let seen = move |e: &&Entry| e.visible.visible_to(client_ns);
    let own = entries
        .iter()
        .filter(seen)
        .any(|e| e.namespace == client_ns);
    let mut visible = entries
        .iter()
        .filter(seen)
        .filter(move |e| !own || e.namespace == client_ns)
        .peekable();
    visible.peek()?;
    Some(visible)
}

/// What a request gets from the routes of its service port.
#[derive(Debug)]
pub enum Selection<'a> {
    /// No route attached: the service itself.
    Default,
    /// The first matching rule.
    Rule(&'a Arc<Rule>),
    /// Routes are attached but none matches (404).
    NoMatch,
}

/// The compiled routes of every service port.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub(crate) ports: HashMap<(ServiceKey, u16), Vec<Entry>>,
    /// VirtualService rules: first match in order, no precedence sort.
    pub(crate) ordered: HashMap<(ServiceKey, u16), Vec<Entry>>,
    /// Routes in use (`namespace/name`).
    pub accepted: Vec<String>,
    /// Fields not supported, with their effect.
    pub unsupported: Vec<Unsupported>,
}

impl RouteTable {
    /// The routing decision for a request to `service`:`port` from a client
    /// of namespace `client_ns` (from its verified identity). Only routes
    /// the client sees count: a consumer route (GAMMA: in another namespace
    /// than the Service) routes its own namespace's clients only, and a
    /// VirtualService the namespaces of its `exportTo`. Where the client's
    /// own namespace has routes for the port, they replace the others for
    /// it (as a consumer route overrides the producer's, and as Istio
    /// prefers the client's namespace's VirtualService).
    pub fn select(
        &self,
        service: &ServiceKey,
        port: u16,
        client_ns: &str,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Selection<'_> {
        let key = (service.clone(), port);
        // HTTPRoutes the client sees, else VirtualServices it sees (they do
        // not merge), else the service itself.
        let Some(mut visible) = visible_to(self.ports.get(&key), client_ns)
            .or_else(|| visible_to(self.ordered.get(&key), client_ns))
        else {
            return Selection::Default;
        };
        visible
            .find(|e| e.m.matches(method, uri, headers))
            .map_or(Selection::NoMatch, |e| Selection::Rule(&e.rule))
    }

    /// The service ports with attached routes, and their rule count.
    pub fn attached(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .ports
            .iter()
            .chain(self.ordered.iter())
            .map(|((s, p), e)| (format!("{s}:{p}"), e.len()))
            .collect();
        v.sort();
        v
    }

    pub(crate) fn report(
        &mut self,
        route: &str,
        field: String,
        reason: impl Into<String>,
        effect: Effect,
    ) {
        let reason = reason.into();
        tracing::warn!(route, field = %field, reason = %reason, effect = ?effect, "unsupported route field");
        self.unsupported.push(Unsupported {
            route: route.to_owned(),
            field,
            reason,
            effect,
        });
    }

    pub(crate) fn report_other(&mut self, route: &str, at: &str, other: &Other, effect: Effect) {
        for key in other.keys() {
            let field = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            self.report(route, field, "not supported by this waypoint", effect);
        }
    }

    pub(crate) fn add_route(&mut self, services: &[ServiceConfig], route: &HttpRoute) {
        let namespace = route
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let id = format!("{namespace}/{}", route.metadata.name);
        let version_ok = matches!(
            route.api_version.as_str(),
            "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1"
        );
        if !version_ok || route.kind != "HTTPRoute" {
            let reason = format!(
                "{} {} is not a Gateway API HTTPRoute",
                route.api_version, route.kind
            );
            return self.report(&id, "kind".into(), reason, Effect::RouteRejected);
        }
        let top: Other = route
            .other
            .iter()
            .filter(|(k, _)| k.as_str() != "status")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.report_other(&id, "", &top, Effect::Ignored);
        self.report_other(&id, "spec", &route.spec.other, Effect::Ignored);
        if !route.spec.hostnames.is_empty() {
            self.report(
                &id,
                "spec.hostnames".into(),
                "hostnames are not used for Service parents (GAMMA)",
                Effect::Ignored,
            );
        }
        let created = route
            .metadata
            .other
            .get("creationTimestamp")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        // The service ports the route attaches to.
        let mut parents = Vec::new();
        for (i, parent) in route.spec.parent_refs.iter().enumerate() {
            let at = format!("spec.parentRefs[{i}]");
            let group = parent
                .group
                .as_deref()
                .unwrap_or("gateway.networking.k8s.io");
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            if !matches!(group, "" | "core") || kind != "Service" {
                self.report(
                    &id,
                    at,
                    format!("parent {group}/{kind} is not a Service; a waypoint serves Service parents (GAMMA)"),
                    Effect::ParentNotAttached,
                );
                continue;
            }
            if !parent.other.is_empty() {
                self.report_other(&id, &at, &parent.other, Effect::ParentNotAttached);
                continue;
            }
            let key = ServiceKey {
                namespace: parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone()),
                name: parent.name.clone(),
            };
            let Some(svc) = find(services, &key) else {
                self.report(
                    &id,
                    at,
                    format!("Service {key} is not one this waypoint serves"),
                    Effect::ParentNotAttached,
                );
                continue;
            };
            // GAMMA: a route in the Service's namespace (producer) routes
            // every client; one in another namespace (consumer), the
            // clients of its own namespace only.
            let visible = if key.namespace == namespace {
                Export::All
            } else {
                Export::only(&namespace)
            };
            match parent.port {
                Some(p) if svc.ports.iter().any(|sp| sp.port == p) => {
                    parents.push((key, p, visible));
                }
                Some(p) => self.report(
                    &id,
                    at,
                    format!("Service {key} has no port {p}"),
                    Effect::ParentNotAttached,
                ),
                None => parents.extend(
                    svc.ports
                        .iter()
                        .map(|sp| (key.clone(), sp.port, visible.clone())),
                ),
            }
        }
        if parents.is_empty() {
            return self.report(
                &id,
                "spec.parentRefs".into(),
                "no parent Service of this waypoint",
                Effect::RouteRejected,
            );
        }
        self.accepted.push(id.clone());
        for (index, spec) in route.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{index}]");
            let (rule, matches) = self.compile_rule(services, &id, &namespace, &at, index, spec);
            let rule = Arc::new(rule);
            for m in &matches {
                for (service, port, visible) in &parents {
                    let entry = Entry {
                        m: match_clone(m),
                        rule: Arc::clone(&rule),
                        namespace: namespace.clone(),
                        visible: visible.clone(),
                        tie: (created.clone(), id.clone(), index),
                    };
                    let at = (service.clone(), *port);
                    self.ports.entry(at).or_default().push(entry);
                }
            }
        }
    }

    /// Gateway API `retry` (GEP-1731): `attempts`, `codes`, `backoff`;
    /// connection failures and resets are retried too (Istio's translation).
    fn http_route_retry(&mut self, id: &str, at: &str, r: &serde_yaml::Value) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        if let Some(map) = r.as_mapping() {
            for k in map.keys().filter_map(|k| k.as_str()) {
                if !matches!(k, "attempts" | "codes" | "backoff") {
                    let field = format!("{at}.{k}");
                    self.report(id, field, "not supported by this waypoint", Effect::Ignored);
                }
            }
        }
        if let Some(n) = r.get("attempts").and_then(serde_yaml::Value::as_u64) {
            policy.attempts = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(codes) = r.get("codes").and_then(serde_yaml::Value::as_sequence) {
            policy.on.codes = codes
                .iter()
                .filter_map(serde_yaml::Value::as_u64)
                .filter_map(|c| u16::try_from(c).ok())
                .collect();
        }
        if let Some(b) = r.get("backoff").and_then(serde_yaml::Value::as_str) {
            match parse_duration(b) {
                Some(d) => policy.backoff = Some(d),
                None => {
                    let reason = format!("backoff {b:?} is not a Gateway API duration");
                    self.report(id, format!("{at}.backoff"), reason, Effect::Ignored);
                }
            }
        }
        policy
    }

    fn compile_rule(
        &mut self,
        services: &[ServiceConfig],
        id: &str,
        namespace: &str,
        at: &str,
        index: usize,
        spec: &HttpRouteRule,
    ) -> (Rule, Vec<Match>) {
        let mut broken: Vec<String> = Vec::new();
        let keys: Other = spec
            .other
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "name" | "retry"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.report_other(id, at, &keys, Effect::Ignored);
        let retry = match spec.other.get("retry") {
            None => RetryPolicy::default(),
            Some(r) => self.http_route_retry(id, &format!("{at}.retry"), r),
        };
        let mut matches = Vec::new();
        let specs: Vec<HttpRouteMatch> = if spec.matches.is_empty() {
            vec![HttpRouteMatch::default()]
        } else {
            spec.matches.clone()
        };
        for (i, m) in specs.iter().enumerate() {
            let mat = format!("{at}.matches[{i}]");
            match compile_match(m) {
                Ok(m) => matches.push(m),
                Err(reason) => {
                    self.report(id, mat, reason.clone(), Effect::RuleFails);
                    broken.push(reason);
                    // Still attached (at its most general), so that the
                    // rule's traffic gets the 500 instead of another rule.
                    matches.push(Match {
                        path: PathMatch::Prefix(String::new()),
                        headers: Vec::new(),
                        query: Vec::new(),
                        method: None,
                    });
                }
            }
        }
        let (mut request_headers, mut response_headers) = (None, None);
        let mut mirrors = Vec::new();
        let mut rewrite = Rewrite::default();
        let mut redirect = None;
        for (i, f) in spec.filters.iter().enumerate() {
            let fat = format!("{at}.filters[{i}]");
            let result = match f.kind.as_str() {
                "RequestHeaderModifier" => f
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| "requestHeaderModifier is missing".to_owned())
                    .and_then(header_modifier)
                    .map(|h| request_headers = Some(h)),
                "ResponseHeaderModifier" => f
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| "responseHeaderModifier is missing".to_owned())
                    .and_then(header_modifier)
                    .map(|h| response_headers = Some(h)),
                "RequestMirror" => {
                    request_mirror(services, namespace, &f.other).map(|m| mirrors.push(m))
                }
                "URLRewrite" => url_rewrite(&f.other, &specs, "urlRewrite").map(|r| rewrite = r),
                "RequestRedirect" => request_redirect(&f.other, &specs).map(|r| redirect = Some(r)),
                other => Err(format!("filter {other} is not supported by this waypoint")),
            };
            if let Err(reason) = result {
                self.report(id, fat, reason.clone(), Effect::RuleFails);
                broken.push(reason);
            }
        }
        let mut timeout = None;
        if let Some(t) = &spec.timeouts {
            self.report_other(id, &format!("{at}.timeouts"), &t.other, Effect::Ignored);
            if let Some(request) = &t.request {
                match parse_duration(request) {
                    Some(d) if d.is_zero() => {} // 0s: no timeout (the spec's meaning)
                    Some(d) => timeout = Some(d),
                    None => {
                        let reason = format!(
                            "timeouts.request {request:?} is not a Gateway API duration (e.g. 10s, 500ms, 1h30m)"
                        );
                        self.report(
                            id,
                            format!("{at}.timeouts.request"),
                            reason.clone(),
                            Effect::RuleFails,
                        );
                        broken.push(reason);
                    }
                }
            }
        }
        let mut backends = Vec::new();
        for (i, b) in spec.backend_refs.iter().enumerate() {
            let bat = format!("{at}.backendRefs[{i}]");
            let weight = b.weight.unwrap_or(1);
            let backend = match resolve_backend(services, namespace, b) {
                Ok(backend) => backend,
                Err(reason) => {
                    self.report(id, bat, reason.clone(), Effect::BackendFails);
                    Backend::Invalid(reason)
                }
            };
            backends.push(WeightedBackend { backend, weight });
        }
        if backends.is_empty() && redirect.is_none() {
            // The spec: a rule without backendRefs answers 500.
            broken.push("the rule has no backendRefs".to_owned());
        }
        let rule = Rule {
            route: id.to_owned(),
            index,
            backends,
            timeout,
            request_headers: request_headers.unwrap_or_default(),
            response_headers: response_headers.unwrap_or_default(),
            retry,
            fault: Fault::default(),
            rewrite,
            redirect,
            mirrors,
            broken: (!broken.is_empty()).then(|| broken.join("; ")),
        };
        (rule, matches)
    }
}

/// A `URLRewrite` filter (`hostname`, `path` `ReplaceFullPath` or
/// `ReplacePrefixMatch` — the latter only with `PathPrefix` matches).
fn url_rewrite(other: &Other, matches: &[HttpRouteMatch], field: &str) -> Result<Rewrite, String> {
    let spec = other
        .get(field)
        .ok_or_else(|| format!("{field} is missing"))?;
    let mut rewrite = Rewrite::default();
    let known: &[&str] = if field == "urlRewrite" {
        &["hostname", "path"]
    } else {
        &["hostname", "path", "scheme", "port", "statusCode"]
    };
    if let Some(map) = spec.as_mapping()
        && let Some(k) = map
            .keys()
            .filter_map(|k| k.as_str())
            .find(|k| !known.contains(k))
    {
        return Err(format!("{field}.{k} is not supported"));
    }
    if let Some(h) = spec.get("hostname").and_then(serde_yaml::Value::as_str) {
        let v = HeaderValue::from_str(h).map_err(|_| format!("hostname {h:?} is not valid"))?;
        rewrite.hostname = Some(v);
    }
    if let Some(p) = spec.get("path") {
        let text = |k: &str| {
            p.get(k)
                .and_then(serde_yaml::Value::as_str)
                .map(str::to_owned)
        };
        rewrite.path = Some(match text("type").as_deref() {
            Some("ReplaceFullPath") => {
                PathRewrite::Full(text("replaceFullPath").ok_or("replaceFullPath is missing")?)
            }
            Some("ReplacePrefixMatch") => {
                let mut prefixes = Vec::new();
                for m in matches {
                    match &m.path {
                        Some(p) if p.kind.as_deref().unwrap_or("PathPrefix") == "PathPrefix" => {
                            prefixes.push(p.value.clone().unwrap_or_else(|| "/".to_owned()));
                        }
                        None => prefixes.push("/".to_owned()),
                        Some(_) => {
                            return Err("ReplacePrefixMatch needs PathPrefix matches".to_owned());
                        }
                    }
                }
                PathRewrite::Prefix {
                    prefixes,
                    elements: true,
                    replacement: text("replacePrefixMatch")
                        .ok_or("replacePrefixMatch is missing")?,
                }
            }
            other => return Err(format!("urlRewrite.path type {other:?} is not supported")),
        });
    }
    Ok(rewrite)
}

/// A `RequestRedirect` filter (`scheme`, `hostname`, `path`, `port`,
/// `statusCode` 301 or 302, 302 by default).
fn request_redirect(other: &Other, matches: &[HttpRouteMatch]) -> Result<Redirect, String> {
    let parts = url_rewrite(other, matches, "requestRedirect")?;
    let spec = other
        .get("requestRedirect")
        .ok_or_else(|| "requestRedirect is missing".to_owned())?;
    let code = spec
        .get("statusCode")
        .and_then(serde_yaml::Value::as_u64)
        .unwrap_or(302);
    let status = match code {
        301 => http::StatusCode::MOVED_PERMANENTLY,
        302 => http::StatusCode::FOUND,
        other => {
            return Err(format!(
                "requestRedirect.statusCode {other} is not 301 or 302"
            ));
        }
    };
    Ok(Redirect {
        status,
        scheme: spec
            .get("scheme")
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_owned),
        hostname: parts
            .hostname
            .and_then(|h| h.to_str().ok().map(str::to_owned)),
        port: spec
            .get("port")
            .and_then(serde_yaml::Value::as_u64)
            .and_then(|p| u16::try_from(p).ok()),
        path: parts.path,
    })
}

/// A `RequestMirror` filter's backend and share (`percent` or `fraction`;
/// all requests by default).
fn request_mirror(
    services: &[ServiceConfig],
    namespace: &str,
    other: &Other,
) -> Result<(Backend, f64), String> {
    let spec = other
        .get("requestMirror")
        .ok_or_else(|| "requestMirror is missing".to_owned())?;
    let known = ["backendRef", "percent", "fraction"];
    if let Some(map) = spec.as_mapping()
        && let Some(k) = map
            .keys()
            .filter_map(|k| k.as_str())
            .find(|k| !known.contains(k))
    {
        return Err(format!("requestMirror.{k} is not supported"));
    }
    let backend_ref: BackendRef = spec
        .get("backendRef")
        .cloned()
        .map(serde_yaml::from_value)
        .transpose()
        .map_err(|e| format!("requestMirror.backendRef: {e}"))?
        .ok_or_else(|| "requestMirror.backendRef is missing".to_owned())?;
    let backend = resolve_backend(services, namespace, &backend_ref)?;
    let share = if let Some(p) = spec.get("percent").and_then(serde_yaml::Value::as_f64) {
        p / 100.0
    } else if let Some(f) = spec.get("fraction") {
        let num = f
            .get("numerator")
            .and_then(serde_yaml::Value::as_f64)
            .unwrap_or(0.0);
        let den = f
            .get("denominator")
            .and_then(serde_yaml::Value::as_f64)
            .unwrap_or(100.0);
        if den <= 0.0 {
            return Err("requestMirror.fraction.denominator must be positive".to_owned());
        }
        num / den
    } else {
        1.0
    };
    Ok((backend, share.clamp(0.0, 1.0)))
}

pub(crate) fn find<'a>(
    services: &'a [ServiceConfig],
    key: &ServiceKey,
) -> Option<&'a ServiceConfig> {
    services
        .iter()
        .find(|s| s.name == key.name && s.namespace == key.namespace)
}

/// Matches are shared by every parent port; the regexes clone cheaply.
pub(crate) fn match_clone(m: &Match) -> Match {
    let value = |v: &ValueMatch| match v {
        ValueMatch::Exact(s) => ValueMatch::Exact(s.clone()),
        ValueMatch::Prefix(s) => ValueMatch::Prefix(s.clone()),
        ValueMatch::Regex(r) => ValueMatch::Regex(r.clone()),
        ValueMatch::Present => ValueMatch::Present,
    };
    Match {
        path: match &m.path {
            PathMatch::Exact(p) => PathMatch::Exact(p.clone()),
            PathMatch::Prefix(p) => PathMatch::Prefix(p.clone()),
            PathMatch::StringPrefix(p) => PathMatch::StringPrefix(p.clone()),
            PathMatch::Regex(r) => PathMatch::Regex(r.clone()),
        },
        headers: m
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), value(v)))
            .collect(),
        query: m.query.iter().map(|(n, v)| (n.clone(), value(v))).collect(),
        method: m.method.clone(),
    }
}

pub(crate) fn full_regex(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("regular expression {re:?}: {e}"))
}

fn compile_value(m: &ValueMatchSpec, what: &str) -> Result<ValueMatch, String> {
    if let Some(k) = m.other.keys().next() {
        return Err(format!("{what} match field {k} is not supported"));
    }
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(m.value.clone())),
        "RegularExpression" => full_regex(&m.value).map(ValueMatch::Regex),
        other => Err(format!("{what} match type {other} is not supported")),
    }
}

fn compile_match(m: &HttpRouteMatch) -> Result<Match, String> {
    if let Some(k) = m.other.keys().next() {
        return Err(format!("match field {k} is not supported"));
    }
    let path = match &m.path {
        None => PathMatch::Prefix(String::new()),
        Some(p) => {
            if let Some(k) = p.other.keys().next() {
                return Err(format!("path match field {k} is not supported"));
            }
            let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => {
                    if !value.starts_with('/') {
                        return Err(format!("path prefix {value:?} does not start with /"));
                    }
                    PathMatch::Prefix(value.trim_end_matches('/').to_owned())
                }
                "RegularExpression" => PathMatch::Regex(full_regex(&value)?),
                other => return Err(format!("path match type {other} is not supported")),
            }
        }
    };
    let mut headers = Vec::new();
    for h in &m.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("header name {:?} is not valid", h.name))?;
        // The spec: of entries with equivalent names, only the first counts.
        if headers.iter().all(|(n, _)| *n != name) {
            headers.push((name, compile_value(h, "header")?));
        }
    }
    let mut query = Vec::new();
    for q in &m.query_params {
        if query.iter().all(|(n, _)| n != &q.name) {
            query.push((q.name.clone(), compile_value(q, "query parameter")?));
        }
    }
    let method = m
        .method
        .as_deref()
        .map(|s| Method::from_bytes(s.as_bytes()).map_err(|_| format!("method {s:?} is not valid")))
        .transpose()?;
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

fn header_modifier(spec: &HeaderModifierSpec) -> Result<HeaderModifier, String> {
    if let Some(k) = spec.other.keys().next() {
        return Err(format!("header modifier field {k} is not supported"));
    }
    let pair = |name: &str, value: &str| {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not valid"))?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("header value {value:?} of {name} is not valid"))?;
        Ok::<_, String>((n, v))
    };
    let h = HeaderModifier {
        set: spec
            .set
            .iter()
            .map(|h| pair(&h.name, &h.value))
            .collect::<Result<_, _>>()?,
        add: spec
            .add
            .iter()
            .map(|h| pair(&h.name, &h.value))
            .collect::<Result<_, _>>()?,
        remove: spec
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("header name {n:?} is not valid"))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(h)
}

pub(crate) fn resolve_backend(
    services: &[ServiceConfig],
    namespace: &str,
    b: &BackendRef,
) -> Result<Backend, String> {
    if let Some(k) = b.other.keys().next() {
        return Err(format!("backendRef field {k} is not supported"));
    }
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        return Err(format!("backend {group}/{kind} is not a Service"));
    }
    let key = ServiceKey {
        namespace: b.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
        name: b.name.clone(),
    };
    // Gateway API: a backend in another namespace than the route's needs
    // that namespace's ReferenceGrant, which this waypoint does not read:
    // refused, so no route can send traffic into a namespace uninvited.
    if key.namespace != namespace {
        return Err(format!(
            "backend Service {key} is in another namespace than the route: that needs a ReferenceGrant, which this waypoint does not support"
        ));
    }
    let Some(port) = b.port else {
        return Err(format!(
            "backendRef to Service {key} has no port (required for a Service)"
        ));
    };
    let Some(svc) = find(services, &key) else {
        return Err(format!(
            "backend Service {key} is not known to this waypoint"
        ));
    };
    if !svc.ports.iter().any(|p| p.port == port) {
        return Err(format!("backend Service {key} has no port {port}"));
    }
    Ok(Backend::Service {
        service: key,
        port,
        subset: None,
    })
}

/// Parses a Gateway API duration (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).ok()?;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_retry_conditions_read_the_grpc_status_of_a_trailers_only_response() {
        let (on, unsupported) = parse_retry_on("unavailable, deadline-exceeded,5xx");
        assert!(unsupported.is_empty(), "{unsupported:?}");
        assert_eq!(on.grpc, vec![14, 4]);
        let headers = |status: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", status.parse().expect("value"));
            h
        };
        assert!(on.grpc_status(&headers("14")));
        assert!(on.grpc_status(&headers("4")));
        assert!(!on.grpc_status(&headers("0")), "OK is not retried");
        assert!(
            !on.grpc_status(&headers("13")),
            "internal was not asked for"
        );
        assert!(!on.grpc_status(&http::HeaderMap::new()));
        let (all, _) =
            parse_retry_on("cancelled,deadline-exceeded,resource-exhausted,internal,unavailable");
        assert_eq!(all.grpc, vec![1, 4, 8, 13, 14]);
        // Istio's default policy retries unavailable and cancelled.
        assert_eq!(RetryPolicy::default().on.grpc, vec![14, 1]);
        assert!(!parse_retry_on("5xx").0.grpc_status(&headers("14")));
    }

    /// The engine's destinations without DestinationRules (these tests use none).
    fn no_destination_rules() -> mesh_routing::RouteTable {
        mesh_routing::compile(
            mesh_routing::Objects::default(),
            Vec::new(),
            &mesh_routing::Options::default(),
        )
    }
    use crate::config::WaypointConfig;

    const CONFIG: &str = r#"
services:
  - { name: web, namespace: default, addresses: [10.96.0.1], ports: [{port: 80}] }
  - { name: v1, namespace: default, ports: [{port: 80}] }
  - { name: v2, namespace: default, ports: [{port: 80}] }
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: web, namespace: default }
    spec:
      parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /api } }]
          backendRefs: [{ name: v2, port: 80 }]
        - matches: [{ path: { type: Exact, value: /api/exact } }]
          backendRefs: [{ name: v1, port: 80 }]
        - matches: [{ headers: [{ name: x-canary, value: "true" }] }]
          backendRefs: [{ name: v2, port: 80 }]
        - matches: [{ path: { type: PathPrefix, value: / } }]
          backendRefs: [{ name: v1, port: 80, weight: 90 }, { name: v2, port: 80, weight: 10 }]
        - matches: [{ path: { type: PathPrefix, value: /mirror } }]
          filters: [{ type: ExtensionRef, extensionRef: { group: example.com, kind: Filter, name: x } }]
          backendRefs: [{ name: v1, port: 80 }]
          retry: { attempts: 3, codes: [502], backoff: 10ms }
          sessionPersistence: { type: Cookie }
"#;

    fn table() -> RouteTable {
        let c = WaypointConfig::parse(CONFIG).expect("config");
        RouteTable::build(
            &c.services,
            &no_destination_rules(),
            &c.route_objects(),
            &["*".into()],
        )
    }

    fn pick<'a>(t: &'a RouteTable, path: &str, headers: &[(&str, &str)]) -> Selection<'a> {
        let web = ServiceKey {
            namespace: "default".into(),
            name: "web".into(),
        };
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        t.select(
            &web,
            80,
            "default",
            &Method::GET,
            &path.parse().expect("uri"),
            &h,
        )
    }

    fn index(s: Selection<'_>) -> usize {
        match s {
            Selection::Rule(r) => r.index,
            other => panic!("no rule: {other:?}"),
        }
    }

    #[test]
    fn precedence_exact_then_longest_prefix_then_headers() {
        let t = table();
        assert_eq!(index(pick(&t, "/api/exact", &[])), 1);
        assert_eq!(index(pick(&t, "/api/x?y=1", &[])), 0);
        assert_eq!(index(pick(&t, "/api", &[])), 0);
        // Prefixes match whole path elements.
        assert_eq!(index(pick(&t, "/apix", &[])), 3);
        assert_eq!(index(pick(&t, "/other", &[("x-canary", "true")])), 2);
        assert_eq!(index(pick(&t, "/other", &[("x-canary", "false")])), 3);
    }

    #[test]
    fn unsupported_filters_fail_the_rule_and_are_reported() {
        let t = table();
        let Selection::Rule(rule) = pick(&t, "/mirror/a", &[]) else {
            panic!("no rule")
        };
        assert!(
            rule.broken
                .as_deref()
                .is_some_and(|b| b.contains("ExtensionRef"))
        );
        let fields: Vec<(&str, Effect)> = t
            .unsupported
            .iter()
            .map(|u| (u.field.as_str(), u.effect))
            .collect();
        assert!(
            fields.contains(&("spec.rules[4].filters[0]", Effect::RuleFails)),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("spec.rules[4].sessionPersistence", Effect::Ignored)),
            "{fields:?}"
        );
    }

    #[test]
    fn request_mirror_filters_name_a_backend_and_a_share() {
        let c = WaypointConfig::parse(&CONFIG.replace(
            "- matches: [{ path: { type: Exact, value: /api/exact } }]",
            "- matches: [{ path: { type: Exact, value: /api/exact } }]\n          filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: v2, port: 80 }, percent: 25 } }]",
        ))
        .expect("config");
        let t = RouteTable::build(
            &c.services,
            &no_destination_rules(),
            &c.route_objects(),
            &["*".into()],
        );
        let Selection::Rule(rule) = pick(&t, "/api/exact", &[]) else {
            panic!("no rule")
        };
        assert_eq!(rule.broken, None);
        let v2 = Backend::Service {
            service: ServiceKey {
                namespace: "default".into(),
                name: "v2".into(),
            },
            port: 80,
            subset: None,
        };
        assert_eq!(rule.mirrors, vec![(v2, 0.25)]);
    }

    /// A VirtualService without `exportTo` takes the default
    /// (`--default-virtual-service-export-to`): `*` routes every namespace's
    /// clients, `.` only its own namespace's (a tenant's VirtualService for
    /// another namespace's service then routes the tenant's clients only).
    #[test]
    fn a_virtual_service_without_export_to_takes_the_default() {
        let c = WaypointConfig::parse(
            r#"
services:
  - { name: web, namespace: default, addresses: [10.96.0.1], ports: [{port: 80}] }
  - { name: v2, namespace: default, ports: [{port: 80}] }
routes:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: { name: mine, namespace: tenant }
    spec:
      hosts: [web.default.svc.cluster.local]
      http:
        - route: [{ destination: { host: v2.default.svc.cluster.local } }]
"#,
        )
        .expect("config");
        let web = ServiceKey {
            namespace: "default".into(),
            name: "web".into(),
        };
        let uri: http::Uri = "/".parse().expect("uri");
        let routed = |default: &str, client: &str| {
            let t = RouteTable::build(
                &c.services,
                &no_destination_rules(),
                &c.route_objects(),
                &[default.to_owned()],
            );
            matches!(
                t.select(&web, 80, client, &Method::GET, &uri, &HeaderMap::new()),
                Selection::Rule(_)
            )
        };
        assert!(routed("*", "default"));
        assert!(routed("*", "tenant"));
        assert!(!routed(".", "default"), "another namespace's clients");
        assert!(routed(".", "tenant"));
    }

    #[test]
    fn http_route_retry_sets_attempts_codes_and_backoff() {
        let t = table();
        let Selection::Rule(rule) = pick(&t, "/mirror/a", &[]) else {
            panic!("no rule")
        };
        assert_eq!(rule.retry.attempts, 3);
        assert_eq!(rule.retry.on.codes, vec![502]);
        assert!(rule.retry.on.connect());
        assert_eq!(rule.retry.backoff, Some(Duration::from_millis(10)));
        // Rules without `retry` get Istio's default.
        let Selection::Rule(rule) = pick(&t, "/api/x", &[]) else {
            panic!("no rule")
        };
        assert_eq!(rule.retry, RetryPolicy::default());
    }

    #[test]
    fn weights_pick_by_share() {
        let t = table();
        let Selection::Rule(rule) = pick(&t, "/", &[]) else {
            panic!("no rule")
        };
        let name = |n: u32| match rule.choose(|_| n) {
            Some(Backend::Service { service, .. }) => service.name.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(name(0), "v1");
        assert_eq!(name(89), "v1");
        assert_eq!(name(90), "v2");
        assert_eq!(name(99), "v2");
    }

    #[test]
    fn a_port_without_routes_goes_to_its_service_and_no_match_is_404() {
        let t = table();
        let web = ServiceKey {
            namespace: "default".into(),
            name: "web".into(),
        };
        let h = HeaderMap::new();
        let uri: http::Uri = "/".parse().expect("uri");
        assert!(matches!(
            t.select(&web, 81, "default", &Method::GET, &uri, &h),
            Selection::Default
        ));
        let c = WaypointConfig::parse(&CONFIG.replace(
            "- matches: [{ path: { type: PathPrefix, value: / } }]",
            "- matches: [{ path: { type: PathPrefix, value: /x } }]",
        ))
        .expect("config");
        let t = RouteTable::build(
            &c.services,
            &no_destination_rules(),
            &c.route_objects(),
            &["*".into()],
        );
        assert!(matches!(pick(&t, "/nothing", &[]), Selection::NoMatch));
    }

    #[test]
    fn gateway_prefix_rewrites_replace_whole_elements() {
        let r = |replacement: &str| Rewrite {
            hostname: None,
            path: Some(PathRewrite::Prefix {
                prefixes: vec!["/foo".into(), "/foo/bar".into()],
                elements: true,
                replacement: replacement.into(),
            }),
        };
        assert_eq!(r("/xyz").path("/foo/x").as_deref(), Some("/xyz/x"));
        assert_eq!(r("/xyz").path("/foo").as_deref(), Some("/xyz"));
        assert_eq!(r("/xyz/").path("/foo/x").as_deref(), Some("/xyz/x"));
        assert_eq!(r("/").path("/foo/x").as_deref(), Some("/x"));
        assert_eq!(r("/").path("/foo").as_deref(), Some("/"));
        // The longest matching prefix is the one replaced.
        assert_eq!(r("/z").path("/foo/bar/baz").as_deref(), Some("/z/baz"));
        assert_eq!(r("/z").path("/foobar"), None);
        let istio = Rewrite {
            hostname: None,
            path: Some(PathRewrite::Prefix {
                prefixes: vec!["/legacy".into()],
                elements: false,
                replacement: "/v2".into(),
            }),
        };
        assert_eq!(istio.path("/legacyx").as_deref(), Some("/v2x"));
    }

    #[test]
    fn redirect_locations() {
        let r = Redirect {
            status: http::StatusCode::FOUND,
            scheme: None,
            hostname: None,
            port: None,
            path: None,
        };
        assert_eq!(
            r.location("web:8080", "/a", Some("b=1")),
            "http://web/a?b=1"
        );
        let r = Redirect {
            scheme: Some("https".into()),
            port: Some(8443),
            path: Some(PathRewrite::Full("/x".into())),
            ..r
        };
        assert_eq!(r.location("web", "/a", None), "https://web:8443/x");
        let r = Redirect {
            port: Some(443),
            ..r
        };
        assert_eq!(r.location("web", "/a", None), "https://web/x");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("123456s"), None);
        assert_eq!(parse_duration(""), None);
    }
}
