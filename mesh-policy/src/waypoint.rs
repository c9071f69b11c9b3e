//! The AuthorizationPolicies a waypoint enforces: those attached with
//! `targetRefs` (Istio ambient) to the waypoint's Gateway, to a Service it
//! fronts, or to the `istio-waypoint` GatewayClass from the root
//! namespace — evaluated per HTTP request with its method, path, host and
//! headers (the node agents enforce the `selector` policies at L4).
//!
//! ```
//! use mesh_policy::{Connection, HttpRequest, WaypointPolicies, WaypointTarget};
//!
//! let (policies, report) = WaypointPolicies::from_text("istio-system", r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: reviews-get, namespace: shop}
//! spec:
//!   targetRefs: [{kind: Service, group: "", name: reviews}]
//!   rules:
//!   - to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
//! "#);
//! assert!(report.errors.is_empty(), "{report:?}");
//! let target = WaypointTarget {
//!     waypoint_namespace: "shop", waypoint_name: "waypoint",
//!     service_namespace: "shop", service_name: "reviews",
//! };
//! let conn = Connection {
//!     source_principal: Some("cluster.local/ns/shop/sa/front"),
//!     source_ip: "10.0.0.7".parse().unwrap(),
//!     remote_ip: None,
//!     destination_ip: "10.96.0.9".parse().unwrap(),
//!     destination_port: 9080,
//! };
//! let get = HttpRequest { method: "GET", path: "/api/books", host: "reviews", headers: &[] };
//! assert!(policies.evaluate(&target, &conn, Some(&get)).is_allowed());
//! let delete = HttpRequest { method: "DELETE", ..get };
//! assert!(!policies.evaluate(&target, &conn, Some(&delete)).is_allowed());
//! ```

use std::collections::BTreeMap;

use crate::compile::{self, Attach, Layer};
use crate::connection::{Connection, HttpRequest};
use crate::decision::Decision;
use crate::error::{PolicyName, PolicyWarning, Report};
use crate::model::Kind;
use crate::parse::{Resource, parse_documents};
use crate::rule::{CompiledAuthz, Ctx, TargetRef};
use crate::store::Decider;

/// The Gateway API group of `Gateway` and `GatewayClass` targets.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of Istio's waypoints: a root-namespace policy
/// targeting it applies to every waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// What a request at a waypoint is for.
#[derive(Debug, Clone, Copy)]
pub struct WaypointTarget<'a> {
    /// The waypoint's namespace (its Gateway's).
    pub waypoint_namespace: &'a str,
    /// The waypoint's name (its Gateway's).
    pub waypoint_name: &'a str,
    /// The namespace of the Service the client addressed (empty when the
    /// client addressed a pod by its own IP: no Service target matches,
    /// since a `targetRefs` name is never empty).
    pub service_namespace: &'a str,
    /// The Service's name.
    pub service_name: &'a str,
}

#[derive(Debug)]
struct Entry {
    targets: Vec<TargetRef>,
    /// Lowered with its HTTP fields, for HTTP requests.
    http: CompiledAuthz,
    /// Lowered as the node agent does (HTTP fields fail safe), for opaque
    /// TCP streams.
    tcp: Option<CompiledAuthz>,
}

/// The waypoint policies of a snapshot, compiled.
#[derive(Debug, Default)]
pub struct WaypointPolicies {
    root_namespace: String,
    entries: Vec<Entry>,
}

impl WaypointPolicies {
    /// Compiles the AuthorizationPolicies with `targetRef(s)` among
    /// `resources` (the others are the node agents'). Malformed ones are
    /// rejected and fail closed over their targets; HTTP fields the
    /// waypoint cannot check, unsupported target kinds and
    /// RequestAuthentication-dependent fields are reported.
    pub fn build(root_namespace: &str, resources: &[Resource]) -> (Self, Report) {
        let mut report = Report::default();
        let mut latest: BTreeMap<(&str, &str), &Resource> = BTreeMap::new();
        for r in resources {
            if r.kind() == Kind::AuthorizationPolicy {
                let m = r.metadata();
                latest.insert(
                    (
                        m.namespace.as_deref().unwrap_or_default(),
                        m.name.as_deref().unwrap_or_default(),
                    ),
                    r,
                );
            }
        }
        let mut entries = Vec::new();
        for r in latest.into_values() {
            let Resource::AuthorizationPolicy(ap) = r else {
                continue;
            };
            let Some((Attach::Targets(targets), http)) =
                compile::compile_authz(ap, root_namespace, Layer::Waypoint, &mut report)
            else {
                continue;
            };
            // The TCP lowering's warnings repeat the HTTP one's: not reported twice.
            let tcp = compile::compile_authz(
                ap,
                root_namespace,
                Layer::WaypointTcp,
                &mut Report::default(),
            )
            .map(|(_, tcp)| tcp);
            for t in &targets {
                if !supported(t) {
                    report.warnings.push(PolicyWarning {
                        kind: Kind::AuthorizationPolicy,
                        policy: http.name.clone(),
                        field: "spec.targetRefs".into(),
                        message: format!(
                            "target {}/{} {} is not supported by the waypoint (Gateway, Service, \
                             GatewayClass {WAYPOINT_CLASS}): the policy does not apply to it",
                            if t.group.is_empty() { "core" } else { &t.group },
                            t.kind,
                            t.name
                        ),
                    });
                }
            }
            entries.push(Entry { targets, http, tcp });
        }
        entries.sort_by(|a, b| a.http.name.cmp(&b.http.name));
        (
            Self {
                root_namespace: root_namespace.to_owned(),
                entries,
            },
            report,
        )
    }

    /// Parses `text` (YAML or JSON documents) and compiles it; parse
    /// errors first in the report.
    pub fn from_text(root_namespace: &str, text: &str) -> (Self, Report) {
        let parsed = parse_documents(text);
        let (policies, mut report) = Self::build(root_namespace, &parsed.resources);
        report.prepend_errors(parsed.errors);
        (policies, report)
    }

    fn applies(&self, t: &TargetRef, w: &WaypointTarget<'_>) -> bool {
        match (t.group.as_str(), t.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => {
                t.namespace == w.waypoint_namespace && t.name == w.waypoint_name
            }
            ("", "Service") => t.namespace == w.service_namespace && t.name == w.service_name,
            (GATEWAY_GROUP, "GatewayClass") => {
                t.namespace == self.root_namespace && t.name == WAYPOINT_CLASS
            }
            _ => false,
        }
    }

    /// Decides a request (`request`: an HTTP request; `None`: an opaque TCP
    /// stream, for which HTTP fields are fail safe) from `conn` to
    /// `target`, in Istio's order (DENY, then ALLOW; AUDIT only listed).
    pub fn evaluate(
        &self,
        target: &WaypointTarget<'_>,
        conn: &Connection<'_>,
        request: Option<&HttpRequest<'_>>,
    ) -> Decision {
        let ctx = Ctx::with_request(conn, request);
        let mut decider = Decider::default();
        for e in &self.entries {
            if !e.targets.iter().any(|t| self.applies(t, target)) {
                continue;
            }
            let compiled = if request.is_some() {
                Some(&e.http)
            } else {
                e.tcp.as_ref()
            };
            if let Some(p) = compiled {
                decider.visit(p, &ctx);
            }
        }
        decider.finish()
    }

    /// The policies that apply to `target`, by name.
    pub fn policies_for(&self, target: &WaypointTarget<'_>) -> Vec<PolicyName> {
        self.entries
            .iter()
            .filter(|e| e.targets.iter().any(|t| self.applies(t, target)))
            .map(|e| e.http.name.clone())
            .collect()
    }

    /// Every policy in force, by name.
    pub fn names(&self) -> Vec<PolicyName> {
        self.entries.iter().map(|e| e.http.name.clone()).collect()
    }

    /// How many policies are in force.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn supported(t: &TargetRef) -> bool {
    matches!(
        (t.group.as_str(), t.kind.as_str()),
        (GATEWAY_GROUP, "Gateway") | ("", "Service") | (GATEWAY_GROUP, "GatewayClass")
    )
}
