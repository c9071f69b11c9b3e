//! Istio-compatible authorization: `security.istio.io/v1` (and `v1beta1`)
//! `AuthorizationPolicy` and `PeerAuthentication`, parsed from the
//! YAML/JSON that `kubectl get -o yaml` prints, indexed, and evaluated per
//! inbound connection by the node agent ([`PolicyStore`], L4, the
//! `selector` policies) and per HTTP request by the waypoint
//! ([`WaypointPolicies`], the `targetRefs` policies with their HTTP fields,
//! on paths normalised by [`normalize_path`]; see the `waypoint` module).
//!
//! ```
//! use std::collections::BTreeMap;
//! use mesh_policy::{Connection, PolicyStore, WorkloadRef};
//!
//! let (store, report) = PolicyStore::from_text("istio-system", r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: web-from-front, namespace: shop}
//! spec:
//!   selector: {matchLabels: {app: web}}
//!   rules:
//!   - from: [{source: {principals: ["cluster.local/ns/shop/sa/front"]}}]
//!     to: [{operation: {ports: ["8080"]}}]
//! "#);
//! assert!(report.is_clean());
//! let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
//! let web = WorkloadRef { namespace: "shop", labels: &labels };
//! let conn = Connection {
//!     source_principal: Some("spiffe://cluster.local/ns/shop/sa/front"),
//!     source_ip: "10.0.0.7".parse().unwrap(),
//!     remote_ip: None,
//!     destination_ip: "10.0.1.9".parse().unwrap(),
//!     destination_port: 8080,
//! };
//! assert!(store.evaluate(&conn, &web).is_allowed());
//! let plaintext = Connection { source_principal: None, ..conn };
//! let denied = store.evaluate(&plaintext, &web);
//! assert_eq!(denied.to_string(), "no ALLOW policy matched");
//! ```
//!
//! # Semantics
//!
//! Istio's, as its AuthorizationPolicy reference and ztunnel (Istio
//! ambient's node proxy) define them, with the deviations listed below,
//! all of which are *more restrictive* than ztunnel or are explicitly
//! asked for by the project.
//!
//! - **Scope.** A policy in the root namespace (`istio-system` unless
//!   configured) without selector applies to every workload of the mesh; with
//!   `selector.matchLabels`, to the matching workloads of *every* namespace
//!   (Istio's documented rule). Elsewhere: no selector, every workload of its
//!   namespace; a selector, the matching workloads of its namespace.
//!   `targetRef(s)` policies bind to waypoints/gateways: the node agent
//!   reports them and leaves them to the waypoint (ztunnel ignores them
//!   too); [`WaypointPolicies`] applies them there — `Gateway` (the
//!   waypoint), `Service` (requests to it), `GatewayClass istio-waypoint`
//!   from the root namespace (every waypoint). A policy setting more than one
//!   of `selector`, `targetRef` and `targetRefs` (which the API server
//!   refuses) is rejected, fail closed in its selector's scope.
//! - **Decision.** A STRICT port refuses plaintext. Then any matching DENY
//!   denies; else if any ALLOW policy applies, one must match; else allow.
//!   `spec: {}` (ALLOW, no rules) allows nothing; `rules: [{}]` allows
//!   everything. AUDIT policies (and policies annotated
//!   `istio.io/dry-run: "true"`) never change the decision; the matching
//!   ones are listed in the [`Decision`] to be counted and logged. The
//!   annotation is read like Go's `strconv.ParseBool` ([`parse_bool`]:
//!   `1`, `t`, `T`, `TRUE`, `true`, `True` and their false forms); any other
//!   value (`"tRuE"`, `"yes"`) is reported ([`PolicyError::BadAnnotation`])
//!   and the policy is enforced, as Istio's control plane does.
//! - **Matching.** Within a rule `from`, `to` and every `when` are ANDed;
//!   the entries of `from` (and of `to`) are ORed; the fields of a source
//!   are ANDed; the values of a field are ORed; a `not*` field matches when
//!   none of its values does. Principals are written without `spiffe://`;
//!   `*` matches any *present* principal (plaintext never matches it),
//!   `prefix*` and `*suffix` match by prefix and suffix. Plaintext has no
//!   principal, namespace or service account: positive fields on them never
//!   match, their `not*` forms always do. `ipBlocks`/`source.ip` are the
//!   direct peer; `remoteIpBlocks`/`remote.ip` the original client when the
//!   transport gives one ([`Connection::remote_ip`]), else the direct peer
//!   (Istio's TCP semantics; ztunnel instead treats them as L7 — the project
//!   asks for them at L4). `serviceAccounts` (`name` or `ns/name`, at most
//!   16) is supported. L4 `when` keys: `source.ip`, `source.namespace`,
//!   `source.principal`, `source.serviceAccount` (the same `ns/name` or
//!   `name` values as `serviceAccounts`, matched against the
//!   `ns/<ns>/sa/<sa>` of the peer's principal; an L4 key in Istio's API
//!   and its sidecars, which ztunnel instead handles as L7), `destination.ip`,
//!   `destination.port`, `remote.ip`.
//! - **Addresses and ports.** Connection addresses are canonical (a
//!   v4-mapped IPv6 peer is IPv4), and an address never matches a block of
//!   the other family: an IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`)
//!   matches no connection, as in Istio (it is warned about, with the IPv4
//!   block probably meant). Ports are 0..=65535 as Istio validates them
//!   (leading zeros allowed); port 0 matches no connection.
//! - **L7 fail-safe.** `requestPrincipals`, `hosts`, `methods`, `paths`,
//!   their `not*` forms, and `when` keys `request.*` (including
//!   `request.experimental.inline.headers[...]`), `connection.sni`,
//!   `experimental.*`: an ALLOW (or AUDIT) rule using them never matches; a
//!   DENY rule drops them and still denies on what remains — an entry, or a
//!   whole rule, left with nothing matches everything (Istio's documented
//!   "DENY is enforced without the HTTP rules", which ztunnel fails to do
//!   when an entry is L7-only: istio/istio#61126). Each case is a warning
//!   naming the policy and the fields.
//! - **At a waypoint** ([`WaypointPolicies`]) those fields are matchers,
//!   as Istio's generator builds them: `methods` case-sensitive with
//!   `*`/prefix/suffix; `paths` on the [`normalize_path`]ed path without
//!   its query (a value with `{*}`/`{**}` is Envoy's URI template);
//!   `hosts` case-insensitive on the authority as sent, port included
//!   (Istio's advice: `[example.com, "example.com:*"]`); `when:
//!   request.headers[name]`. There is no RequestAuthentication: a request
//!   has no request principal, so `requestPrincipals`/`request.auth.*`
//!   values never match and their negations always do (warned: "no
//!   RequestAuthentication: never authenticated"). `connection.sni` and
//!   `experimental.*` stay fail-safe. Opaque TCP streams at the waypoint
//!   get the fail-safe lowering above.
//! - **CUSTOM** (external authorization) cannot be honoured: reported as an
//!   error and enforced as DENY of what its rules select (fail closed;
//!   ztunnel ignores CUSTOM policies).
//! - **Malformed policies** (bad CIDR, port outside 0..65535, unknown
//!   action, unknown field, bad pattern such as `a*b` or a `spiffe://`
//!   principal, unknown `when` key, empty source, …) are rejected with an
//!   error naming the resource and the field path, and fail closed
//!   ([`RejectEffect`]): a rejected DENY/CUSTOM/unknown-action policy
//!   denies everything in its scope (as Istio's sidecars do for an invalid
//!   DENY policy); a rejected ALLOW policy grants nothing but keeps its
//!   workloads in allow-list mode; a rejected PeerAuthentication is STRICT.
//!   Other policies keep working.
//! - **PeerAuthentication.** Workload (selector) over namespace over mesh
//!   (root namespace), `UNSET` inheriting; `portLevelMtls` overrides the
//!   workload policy for its port; default PERMISSIVE; of competing policies
//!   at one level the oldest (`creationTimestamp`, then name) wins.
//!   `DISABLE` behaves as PERMISSIVE (ambient). A selector PeerAuthentication
//!   in the root namespace is ignored, with a warning (as in Istio).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admission;
pub mod bench;
mod compile;
mod connection;
mod decision;
pub mod error;
pub mod model;
pub mod parse;
mod rule;
mod store;
mod waypoint;

#[cfg(test)]
mod tests;

pub use compile::{DRY_RUN_ANNOTATION, parse_bool};
pub use connection::{Connection, HttpRequest, WorkloadRef, normalize_path};
pub use decision::{Decision, DenyReason, MtlsMode, MtlsSetting};
pub use error::{PolicyError, PolicyName, PolicyWarning, RejectEffect, Report};
pub use model::Kind;
pub use parse::{Parsed, Resource, parse_documents, parse_value};
pub use store::{DEFAULT_ROOT_NAMESPACE, PolicyStore};
pub use waypoint::{GATEWAY_GROUP, WAYPOINT_CLASS, WaypointPolicies, WaypointTarget};
