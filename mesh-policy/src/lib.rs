//! Istio-compatible L4 authorization for the mesh agent:
//! `security.istio.io/v1` (and `v1beta1`) `AuthorizationPolicy` and
//! `PeerAuthentication`, parsed from the YAML/JSON that `kubectl get -o
//! yaml` prints, indexed, and evaluated per inbound connection.
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
//!   `targetRef(s)` policies bind to waypoints/gateways and are reported,
//!   not enforced (ztunnel ignores them too).
//! - **Decision.** A STRICT port refuses plaintext. Then any matching DENY
//!   denies; else if any ALLOW policy applies, one must match; else allow.
//!   `spec: {}` (ALLOW, no rules) allows nothing; `rules: [{}]` allows
//!   everything. AUDIT policies (and policies annotated
//!   `istio.io/dry-run: "true"`) never change the decision; the matching
//!   ones are listed in the [`Decision`] to be counted and logged.
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
//!   asks for them at L4). `serviceAccounts` (`name` or `ns/name`) is
//!   supported. L4 `when` keys: `source.ip`, `source.namespace`,
//!   `source.principal`, `destination.ip`, `destination.port`, `remote.ip`.
//! - **L7 fail-safe.** `requestPrincipals`, `hosts`, `methods`, `paths`,
//!   their `not*` forms, and `when` keys `request.*`, `connection.sni`,
//!   `experimental.*`: an ALLOW (or AUDIT) rule using them never matches; a
//!   DENY rule drops them and still denies on what remains — an entry, or a
//!   whole rule, left with nothing matches everything (Istio's documented
//!   "DENY is enforced without the HTTP rules", which ztunnel fails to do
//!   when an entry is L7-only: istio/istio#61126). Each case is a warning
//!   naming the policy and the fields.
//! - **CUSTOM** (external authorization) cannot be honoured: reported as an
//!   error and enforced as DENY of what its rules select (fail closed;
//!   ztunnel ignores CUSTOM policies).
//! - **Malformed policies** (bad CIDR, port outside 1..65535, unknown
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

pub mod bench;
mod compile;
pub mod error;
pub mod model;
pub mod parse;
mod store;

#[cfg(test)]
mod tests;

pub use compile::DRY_RUN_ANNOTATION;
pub use error::{PolicyError, PolicyName, PolicyWarning, RejectEffect, Report};
pub use model::Kind;
pub use parse::{Parsed, Resource, parse_documents, parse_value};
pub use store::{
    Connection, DEFAULT_ROOT_NAMESPACE, Decision, DenyReason, MtlsMode, MtlsSetting, PolicyStore,
    WorkloadRef,
};
