//! The objects the workload file's `resources:` list takes, verbatim as
//! `kubectl get -o yaml` prints them: which kinds the agent reads
//! ([`ResourceKind`], recognised by `apiVersion` and `kind`) and, for the
//! traffic-management objects, the checks the API server (the CRD schema)
//! applies before it stores one ([`admit_routing`]), so that a file source
//! without an API server in front of it refuses what a cluster would
//! refuse and stores what a cluster would serve (storage version, schema
//! defaults). The policies' own checks are `mesh-policy`'s
//! `admission::check_object`.
//!
//! Deep semantic validation of a routing object (durations, weights,
//! subsets named by routes…) belongs to the routing engine; it plugs in at
//! [`validate_routing_object`], the one place every routing object of the
//! file passes through after the schema checks.
#![forbid(unsafe_code)]

use std::fmt;

use serde_json::{Map, Value};

/// An object kind the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `gateway.networking.k8s.io` TCPRoute.
    TcpRoute,
    /// `gateway.networking.k8s.io` Gateway (read for who may bind to a
    /// waypoint: its HBONE listener's `allowedRoutes`).
    Gateway,
}

impl ResourceKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [ResourceKind; 6] = [
        ResourceKind::AuthorizationPolicy,
        ResourceKind::PeerAuthentication,
        ResourceKind::DestinationRule,
        ResourceKind::VirtualService,
        ResourceKind::TcpRoute,
        ResourceKind::Gateway,
    ];

    /// The object's `kind`.
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::AuthorizationPolicy => "AuthorizationPolicy",
            ResourceKind::PeerAuthentication => "PeerAuthentication",
            ResourceKind::DestinationRule => "DestinationRule",
            ResourceKind::VirtualService => "VirtualService",
            ResourceKind::TcpRoute => "TCPRoute",
            ResourceKind::Gateway => "Gateway",
        }
    }

    /// The API group.
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::AuthorizationPolicy | ResourceKind::PeerAuthentication => {
                "security.istio.io"
            }
            ResourceKind::DestinationRule | ResourceKind::VirtualService => "networking.istio.io",
            ResourceKind::TcpRoute | ResourceKind::Gateway => "gateway.networking.k8s.io",
        }
    }

    /// The versions the API server serves (as Istio's and the Gateway
    /// API's CRDs do), the storage version first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            ResourceKind::AuthorizationPolicy | ResourceKind::PeerAuthentication => {
                &["v1", "v1beta1"]
            }
            ResourceKind::DestinationRule | ResourceKind::VirtualService => {
                &["v1", "v1beta1", "v1alpha3"]
            }
            ResourceKind::TcpRoute => &["v1alpha2"],
            ResourceKind::Gateway => &["v1", "v1beta1"],
        }
    }

    /// `group/version` of the storage version: what the Kubernetes source
    /// watches and the snapshot carries.
    pub fn storage_api_version(self) -> String {
        format!("{}/{}", self.group(), self.versions()[0])
    }

    /// Whether it is a traffic-management object (`Snapshot.routing`) or a
    /// Gateway (`Snapshot.waypoint_gateways`): admitted by [`admit_routing`].
    pub fn is_routing(self) -> bool {
        matches!(
            self,
            ResourceKind::DestinationRule
                | ResourceKind::VirtualService
                | ResourceKind::TcpRoute
                | ResourceKind::Gateway
        )
    }

    fn accepted_versions(self) -> String {
        let (first, rest) = self.versions().split_at(1);
        let mut s = format!("{}/{}", self.group(), first[0]);
        if !rest.is_empty() {
            s.push_str(&format!(" (or {})", rest.join(", ")));
        }
        s
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an object is refused: the field from the object's root
/// (`metadata.name`, `spec.rules[0].backendRefs`, or `(root)`) and what to
/// write instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Field path from the object's root.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl Problem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn kind_list() -> String {
    ResourceKind::ALL
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which kind `object` is, by its `kind` and `apiVersion`. An object of
/// another kind, or of a version the API server would not serve, is
/// refused (the field is `kind` or `apiVersion`).
pub fn recognise(object: &serde_yaml::Value) -> Result<ResourceKind, Problem> {
    if !object.is_mapping() {
        return Err(Problem::new(
            "(root)",
            format!(
                "expected a Kubernetes object (apiVersion, kind, metadata, spec) of a kind the \
                 agent reads: {}",
                kind_list()
            ),
        ));
    }
    let kind = match object.get("kind") {
        None | Some(serde_yaml::Value::Null) => {
            return Err(Problem::new(
                "kind",
                format!("missing: write one of {}", kind_list()),
            ));
        }
        Some(k) => k
            .as_str()
            .ok_or_else(|| Problem::new("kind", "expected a string"))?,
    };
    let Some(found) = ResourceKind::ALL.into_iter().find(|k| k.name() == kind) else {
        return Err(Problem::new(
            "kind",
            format!(
                "{kind:?} is not an object the agent reads: write one of {}",
                kind_list()
            ),
        ));
    };
    match object.get("apiVersion").and_then(serde_yaml::Value::as_str) {
        None => Err(Problem::new(
            "apiVersion",
            format!("missing: write {}", found.accepted_versions()),
        )),
        Some(v)
            if v.split_once('/')
                .is_some_and(|(g, ver)| g == found.group() && found.versions().contains(&ver)) =>
        {
            Ok(found)
        }
        Some(v) => Err(Problem::new(
            "apiVersion",
            format!(
                "unsupported apiVersion {v:?} for {found}: expected {}",
                found.accepted_versions()
            ),
        )),
    }
}

/// The most objects of one list a route may hold, as the Gateway API's CRD
/// bounds them (`maxItems`).
const TCPROUTE_MAX_RULES: usize = 16;
const TCPROUTE_MAX_BACKENDS: usize = 16;
const TCPROUTE_MAX_PARENTS: usize = 32;
/// The largest `weight` of a TCPRoute backend (the CRD's `maximum`).
const TCPROUTE_MAX_WEIGHT: u64 = 1_000_000;

/// The namespace an object without `metadata.namespace` lands in, as
/// `kubectl apply` in the default context puts it.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Admits a traffic-management object of `kind` (recognised by
/// [`recognise`]) as the API server would store and serve it: refused
/// when the server would refuse it (name, namespace, `spec` an object,
/// the fields the CRD schema requires, the Gateway API's list bounds);
/// otherwise returned with `apiVersion` the storage version (the
/// versions' schemas are the same), `metadata.managedFields` dropped (as
/// the Kubernetes source drops them), `metadata.namespace` set
/// ([`DEFAULT_NAMESPACE`] when absent) and the schema's defaults filled in
/// (TCPRoute `parentRefs` group/kind, `backendRefs` group/kind/weight).
/// Then [`validate_routing_object`] runs.
pub fn admit_routing(kind: ResourceKind, mut object: Value) -> Result<Value, Problem> {
    let Some(obj) = object.as_object_mut() else {
        return Err(Problem::new("(root)", "expected an object"));
    };
    obj.insert("apiVersion".into(), kind.storage_api_version().into());
    let metadata = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if metadata.is_null() {
        *metadata = Value::Object(Map::new());
    }
    let Some(metadata) = metadata.as_object_mut() else {
        return Err(Problem::new("metadata", "expected an object"));
    };
    // Kept as the Kubernetes source keeps objects: without the field
    // managers' bookkeeping (`kubectl get -o yaml --show-managed-fields`).
    metadata.remove("managedFields");
    match metadata.get("name") {
        None | Some(Value::Null) => {
            return Err(Problem::new(
                "metadata.name",
                format!(
                    "missing: every {kind} needs a name (the API server refuses an object without one)"
                ),
            ));
        }
        Some(Value::String(n)) if is_dns_subdomain(n) => {}
        Some(Value::String(n)) => {
            return Err(Problem::new(
                "metadata.name",
                format!(
                    "{n:?} is not a valid name: lowercase letters, digits, '-' and '.', starting \
                     and ending with a letter or digit, at most 253 characters"
                ),
            ));
        }
        Some(_) => return Err(Problem::new("metadata.name", "expected a string")),
    }
    match metadata.get("namespace") {
        None | Some(Value::Null) => {
            metadata.insert("namespace".into(), DEFAULT_NAMESPACE.into());
        }
        Some(Value::String(n)) if is_dns_label(n) => {}
        Some(Value::String(n)) => {
            return Err(Problem::new(
                "metadata.namespace",
                format!(
                    "{n:?} is not a valid namespace: lowercase letters, digits and '-', starting \
                     and ending with a letter or digit, at most 63 characters"
                ),
            ));
        }
        Some(_) => return Err(Problem::new("metadata.namespace", "expected a string")),
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(Problem::new(
            "spec",
            format!("missing or not an object: a {kind} needs its spec"),
        ));
    };
    match kind {
        ResourceKind::DestinationRule => destination_rule_schema(spec)?,
        ResourceKind::VirtualService => virtual_service_schema(spec)?,
        ResourceKind::TcpRoute => tcp_route_schema(spec)?,
        // Only its listeners' allowedRoutes are read, leniently.
        ResourceKind::Gateway => return Ok(object),
        ResourceKind::AuthorizationPolicy | ResourceKind::PeerAuthentication => {
            return Err(Problem::new(
                "kind",
                format!("{kind} is a policy, not a traffic-management object"),
            ));
        }
    }
    validate_routing_object(kind, &object)?;
    Ok(object)
}

/// The per-object validation of a traffic-management object beyond the
/// API server's schema: the hook for the routing engine's own checks
/// (`mesh-routing`), run on every routing object of a workload file after
/// [`admit_routing`]'s schema checks, on the object as it will be served.
/// A problem rejects the file with the object's field path; the last good
/// state stays in force. (The Kubernetes source cannot refuse what the API
/// server stored: there the same problems show in the route report.)
pub fn validate_routing_object(kind: ResourceKind, object: &Value) -> Result<(), Problem> {
    // mesh-routing reads the kind from the object (as served it has one).
    let named;
    let object = if object.get("kind").is_some() {
        object
    } else {
        let mut copy = object.clone();
        if let Some(map) = copy.as_object_mut() {
            map.insert("kind".into(), Value::from(kind.to_string()));
        }
        named = copy;
        &named
    };
    crate::routing::validate(object).map_err(|e| Problem::new(e.field, e.reason))
}

/// `spec.host` (required), `spec.subsets[].name` (required).
fn destination_rule_schema(spec: &Map<String, Value>) -> Result<(), Problem> {
    match spec.get("host") {
        Some(Value::String(h)) if !h.is_empty() => {}
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(Problem::new(
                "spec.host",
                "missing: the service the rule applies to (name, name.namespace or FQDN)",
            ));
        }
        Some(_) => return Err(Problem::new("spec.host", "expected a string")),
    }
    for (i, subset) in array(spec, "subsets", "spec.subsets")?.iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        let subset = subset
            .as_object()
            .ok_or_else(|| Problem::new(&at, "expected an object"))?;
        if !subset.get("name").is_some_and(Value::is_string) {
            return Err(Problem::new(
                format!("{at}.name"),
                "missing: every subset needs a name (routes refer to it)",
            ));
        }
    }
    Ok(())
}

/// `spec.hosts` strings; every `http`/`tls`/`tcp` route's `destination.host`
/// (required).
fn virtual_service_schema(spec: &Map<String, Value>) -> Result<(), Problem> {
    for (i, host) in array(spec, "hosts", "spec.hosts")?.iter().enumerate() {
        if !host.is_string() {
            return Err(Problem::new(
                format!("spec.hosts[{i}]"),
                "expected a string",
            ));
        }
    }
    for section in ["http", "tls", "tcp"] {
        let at = format!("spec.{section}");
        for (j, rule) in array(spec, section, &at)?.iter().enumerate() {
            let at = format!("{at}[{j}]");
            let rule = rule
                .as_object()
                .ok_or_else(|| Problem::new(&at, "expected an object"))?;
            let routes_at = format!("{at}.route");
            for (k, route) in array(rule, "route", &routes_at)?.iter().enumerate() {
                let at = format!("{routes_at}[{k}]");
                let host = route
                    .get("destination")
                    .and_then(|d| d.get("host"))
                    .and_then(Value::as_str);
                if host.is_none_or(str::is_empty) {
                    return Err(Problem::new(
                        format!("{at}.destination.host"),
                        "missing: every route needs a destination host",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `spec.rules` (1..=16, required), each rule's `backendRefs` (1..=16 when
/// given; `name` required; `port` 1..=65535, required for a Service;
/// `weight` 0..=1000000) and `spec.parentRefs` (at most 32; `name`
/// required; `port` 1..=65535), with the schema's defaults filled in.
fn tcp_route_schema(spec: &mut Map<String, Value>) -> Result<(), Problem> {
    let parents = spec.get_mut("parentRefs");
    if let Some(parents) = parents.filter(|p| !p.is_null()) {
        let list = parents
            .as_array_mut()
            .ok_or_else(|| Problem::new("spec.parentRefs", "expected a list"))?;
        if list.len() > TCPROUTE_MAX_PARENTS {
            return Err(Problem::new(
                "spec.parentRefs",
                format!("at most {TCPROUTE_MAX_PARENTS} parents"),
            ));
        }
        for (i, parent) in list.iter_mut().enumerate() {
            let at = format!("spec.parentRefs[{i}]");
            let parent = reference(parent, &at)?;
            port(parent, &at, false)?;
            parent
                .entry("group")
                .or_insert_with(|| "gateway.networking.k8s.io".into());
            parent.entry("kind").or_insert_with(|| "Gateway".into());
        }
    }
    let rules = match spec.get_mut("rules") {
        Some(Value::Array(rules)) if !rules.is_empty() => rules,
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            return Err(Problem::new(
                "spec.rules",
                "missing: a TCPRoute needs at least one rule (with its backendRefs)",
            ));
        }
        Some(_) => return Err(Problem::new("spec.rules", "expected a list")),
    };
    if rules.len() > TCPROUTE_MAX_RULES {
        return Err(Problem::new(
            "spec.rules",
            format!("at most {TCPROUTE_MAX_RULES} rules"),
        ));
    }
    for (i, rule) in rules.iter_mut().enumerate() {
        let at = format!("spec.rules[{i}]");
        let rule = rule
            .as_object_mut()
            .ok_or_else(|| Problem::new(&at, "expected an object"))?;
        let at = format!("{at}.backendRefs");
        let Some(backends) = rule.get_mut("backendRefs").filter(|b| !b.is_null()) else {
            continue;
        };
        let list = backends
            .as_array_mut()
            .ok_or_else(|| Problem::new(&at, "expected a list"))?;
        if list.is_empty() || list.len() > TCPROUTE_MAX_BACKENDS {
            return Err(Problem::new(
                &at,
                format!(
                    "1 to {TCPROUTE_MAX_BACKENDS} backends (leave it out to refuse connections)"
                ),
            ));
        }
        for (j, backend) in list.iter_mut().enumerate() {
            let at = format!("{at}[{j}]");
            let backend = reference(backend, &at)?;
            let group = backend.entry("group").or_insert_with(|| "".into());
            let core = group.as_str().is_some_and(str::is_empty);
            let kind = backend.entry("kind").or_insert_with(|| "Service".into());
            let service = core && kind.as_str() == Some("Service");
            port(backend, &at, service)?;
            match backend.entry("weight").or_insert_with(|| 1.into()) {
                Value::Number(n) if n.as_u64().is_some_and(|w| w <= TCPROUTE_MAX_WEIGHT) => {}
                _ => {
                    return Err(Problem::new(
                        format!("{at}.weight"),
                        format!("a whole number from 0 to {TCPROUTE_MAX_WEIGHT}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A Gateway API reference at `at`: an object with a `name`.
fn reference<'a>(v: &'a mut Value, at: &str) -> Result<&'a mut Map<String, Value>, Problem> {
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Problem::new(at, "expected an object"))?;
    match obj.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() && n.len() <= 253 => Ok(obj),
        _ => Err(Problem::new(
            format!("{at}.name"),
            "missing: the name of the object referred to",
        )),
    }
}

/// `port` of a reference: 1..=65535 when given; required when `required`.
fn port(obj: &Map<String, Value>, at: &str, required: bool) -> Result<(), Problem> {
    match obj.get("port") {
        None | Some(Value::Null) if required => Err(Problem::new(
            format!("{at}.port"),
            "missing: a Service backend needs the service port",
        )),
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|p| (1..=65535).contains(&p)) => Ok(()),
        Some(_) => Err(Problem::new(
            format!("{at}.port"),
            "a port number from 1 to 65535",
        )),
    }
}

/// The list at `obj[key]` (empty when absent or null); `at` names it.
fn array<'a>(obj: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a [Value], Problem> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(Problem::new(at, "expected a list")),
    }
}

// Object names as the API server checks them: one definition, in mesh-policy.
use crate::policy::admission::{is_dns_label, is_dns_subdomain};

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).expect("test YAML")
    }

    #[test]
    fn kinds_are_recognised_by_api_version_and_kind() {
        let ok = [
            (
                "networking.istio.io/v1",
                "DestinationRule",
                ResourceKind::DestinationRule,
            ),
            (
                "networking.istio.io/v1beta1",
                "VirtualService",
                ResourceKind::VirtualService,
            ),
            (
                "networking.istio.io/v1alpha3",
                "DestinationRule",
                ResourceKind::DestinationRule,
            ),
            (
                "gateway.networking.k8s.io/v1alpha2",
                "TCPRoute",
                ResourceKind::TcpRoute,
            ),
            (
                "security.istio.io/v1",
                "AuthorizationPolicy",
                ResourceKind::AuthorizationPolicy,
            ),
            (
                "security.istio.io/v1beta1",
                "PeerAuthentication",
                ResourceKind::PeerAuthentication,
            ),
        ];
        for (api, kind, want) in ok {
            let v = yaml(&format!("{{apiVersion: {api}, kind: {kind}}}"));
            assert_eq!(recognise(&v), Ok(want), "{api} {kind}");
        }
        let refused = [
            (
                "{apiVersion: networking.istio.io/v1, kind: Sidecar}",
                "kind",
                "\"Sidecar\" is not an object the agent reads",
            ),
            (
                "{apiVersion: v1}",
                "kind",
                "missing: write one of AuthorizationPolicy",
            ),
            (
                "{apiVersion: networking.istio.io/v2, kind: VirtualService}",
                "apiVersion",
                "expected networking.istio.io/v1 (or v1beta1, v1alpha3)",
            ),
            (
                "{apiVersion: gateway.networking.k8s.io/v1, kind: TCPRoute}",
                "apiVersion",
                "expected gateway.networking.k8s.io/v1alpha2",
            ),
            (
                "{apiVersion: security.istio.io/v1, kind: DestinationRule}",
                "apiVersion",
                "unsupported apiVersion",
            ),
            ("{kind: TCPRoute}", "apiVersion", "missing"),
            ("[a]", "(root)", "expected a Kubernetes object"),
        ];
        for (text, field, message) in refused {
            let p = recognise(&yaml(text)).expect_err(text);
            assert_eq!(p.field, field, "{text}: {p}");
            assert!(p.message.contains(message), "{text}: {p}");
        }
    }

    #[test]
    fn routing_objects_are_stored_as_served() {
        let dr = admit_routing(
            ResourceKind::DestinationRule,
            json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
                   "metadata": {"name": "web", "managedFields": [{"manager": "kubectl"}]},
                   "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}),
        )
        .expect("valid rule");
        assert_eq!(
            dr["apiVersion"], "networking.istio.io/v1",
            "storage version"
        );
        assert_eq!(
            dr["metadata"],
            json!({"name": "web", "namespace": "default"}),
            "namespace set, managedFields dropped"
        );
        assert_eq!(dr["spec"]["subsets"][0]["labels"]["version"], "v1");
        let route = admit_routing(
            ResourceKind::TcpRoute,
            json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
                   "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}, {"name": "gw"}],
                            "rules": [{"backendRefs": [{"name": "web-v1", "port": 80},
                                                       {"name": "web-v2", "port": 80, "weight": 0}]}]}}),
        )
        .expect("valid route");
        assert_eq!(
            route["spec"]["parentRefs"][1],
            json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}),
            "the CRD's defaults"
        );
        assert_eq!(route["spec"]["parentRefs"][0]["kind"], "Service");
        assert_eq!(
            route["spec"]["rules"][0]["backendRefs"][0],
            json!({"group": "", "kind": "Service", "name": "web-v1", "port": 80, "weight": 1})
        );
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 0);
        let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                        "metadata": {"name": "web", "namespace": "shop"},
                        "spec": {"hosts": ["web"], "tcp": [{"route": [{"destination": {"host": "web", "subset": "v1"}, "weight": 100}]}]}});
        assert_eq!(
            admit_routing(ResourceKind::VirtualService, vs.clone()),
            Ok(vs),
            "a served object is kept as it is"
        );
    }

    #[test]
    fn what_the_api_server_refuses_is_refused_with_its_field() {
        let meta = json!({"name": "web", "namespace": "shop"});
        let cases = [
            (
                ResourceKind::DestinationRule,
                json!({"metadata": {"namespace": "shop"}, "spec": {"host": "web"}}),
                "metadata.name",
            ),
            (
                ResourceKind::DestinationRule,
                json!({"metadata": {"name": "Web"}, "spec": {"host": "web"}}),
                "metadata.name",
            ),
            (
                ResourceKind::DestinationRule,
                json!({"metadata": {"name": "web", "namespace": "a.b"}, "spec": {"host": "web"}}),
                "metadata.namespace",
            ),
            (
                ResourceKind::DestinationRule,
                json!({"metadata": meta, "spec": "host: web"}),
                "spec",
            ),
            (
                ResourceKind::DestinationRule,
                json!({"metadata": meta}),
                "spec",
            ),
            (
                ResourceKind::DestinationRule,
                json!({"metadata": meta, "spec": {}}),
                "spec.host",
            ),
            (
                ResourceKind::DestinationRule,
                json!({"metadata": meta, "spec": {"host": "web", "subsets": [{"labels": {}}]}}),
                "spec.subsets[0].name",
            ),
            (
                ResourceKind::VirtualService,
                json!({"metadata": meta, "spec": {"hosts": "web"}}),
                "spec.hosts",
            ),
            (
                ResourceKind::VirtualService,
                json!({"metadata": meta, "spec": {"tcp": [{"route": [{"weight": 1}]}]}}),
                "spec.tcp[0].route[0].destination.host",
            ),
            (
                ResourceKind::VirtualService,
                json!({"metadata": meta, "spec": {"http": [{"route": [{"destination": {}}]}]}}),
                "spec.http[0].route[0].destination.host",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {}}),
                "spec.rules",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"rules": []}}),
                "spec.rules",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"rules": [{"backendRefs": [{"name": "b"}]}]}}),
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"rules": [{"backendRefs": [{"port": 80}]}]}}),
                "spec.rules[0].backendRefs[0].name",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"rules": [{"backendRefs": [{"name": "b", "port": 80, "weight": -1}]}]}}),
                "spec.rules[0].backendRefs[0].weight",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"rules": [{"backendRefs": [{"name": "b", "port": 70000}]}]}}),
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"rules": [{"backendRefs": []}]}}),
                "spec.rules[0].backendRefs",
            ),
            (
                ResourceKind::TcpRoute,
                json!({"metadata": meta, "spec": {"parentRefs": [{"kind": "Service"}], "rules": [{}]}}),
                "spec.parentRefs[0].name",
            ),
        ];
        for (kind, object, field) in cases {
            let p = admit_routing(kind, object.clone()).expect_err(&object.to_string());
            assert_eq!(p.field, field, "{object}: {p}");
        }
        // The Gateway API's bounds.
        let rules: Vec<Value> = (0..17).map(|_| json!({})).collect();
        let p = admit_routing(
            ResourceKind::TcpRoute,
            json!({"metadata": meta, "spec": {"rules": rules}}),
        )
        .expect_err("17 rules");
        assert_eq!(p.field, "spec.rules");
        // A non-Service backend needs no port.
        admit_routing(
            ResourceKind::TcpRoute,
            json!({"metadata": meta, "spec": {"rules": [{"backendRefs": [{"group": "x.example", "kind": "Thing", "name": "b"}]}]}}),
        )
        .expect("a backend of another kind");
    }
}
