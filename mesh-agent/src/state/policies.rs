//! The one place policies are compiled: a [`Policies`] set (raw objects as
//! a source read them) into the [`PolicyStore`] connections are decided
//! with, and the report of what is not enforced as written, each finding
//! tied to its document and field. The store publishes the result with
//! every snapshot; `mesh-agent check` calls the same function on a file.
#![forbid(unsafe_code)]

use std::{collections::HashMap, fmt};

pub use crate::policy::DEFAULT_ROOT_NAMESPACE;
use crate::policy::{Kind, PolicyError, PolicyName, PolicyStore, PolicyWarning, parse_value};

use super::Policies;

/// A document of a [`Policies`] set: its list (by kind) and its position there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyDocument {
    /// `AuthorizationPolicy` (`Policies::authorization`) or
    /// `PeerAuthentication` (`Policies::peer_authentication`).
    pub kind: Kind,
    /// 0-based position in that list.
    pub index: usize,
}

impl fmt::Display for PolicyDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::AuthorizationPolicy => write!(f, "authorization[{}]", self.index),
            Kind::PeerAuthentication => write!(f, "peer_authentication[{}]", self.index),
        }
    }
}

impl Policies {
    /// Every document with its place, AuthorizationPolicies first (the order
    /// they are compiled in).
    pub fn documents(&self) -> impl Iterator<Item = (PolicyDocument, &serde_json::Value)> {
        let doc = |kind| move |(index, v)| (PolicyDocument { kind, index }, v);
        self.authorization
            .iter()
            .enumerate()
            .map(doc(Kind::AuthorizationPolicy))
            .chain(
                self.peer_authentication
                    .iter()
                    .enumerate()
                    .map(doc(Kind::PeerAuthentication)),
            )
    }
}

/// An error or warning of a compilation, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding<T> {
    /// What the engine reported (its text names the policy and the field).
    pub finding: T,
    /// The document it is about, when it can be tied to one.
    pub document: Option<PolicyDocument>,
    /// The field path from the document's root (`spec.rules[0]…`), when it
    /// names one.
    pub field: Option<String>,
}

impl<T: fmt::Display> fmt::Display for Finding<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.finding.fmt(f)
    }
}

/// What compiling a [`Policies`] set found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyReport {
    /// Documents and policies not honoured as written: parse errors first,
    /// then the engine's, in document order.
    pub errors: Vec<Finding<PolicyError>>,
    /// Policies enforced more strictly than written.
    pub warnings: Vec<Finding<PolicyWarning>>,
}

impl PolicyReport {
    /// Errors whose policy is rejected (fail closed, dropped or not
    /// enforced here), as opposed to reported and still enforced.
    pub fn rejected(&self) -> usize {
        self.errors
            .iter()
            .filter(|e| rejects_policy(&e.finding))
            .count()
    }
}

/// Whether `error` means its policy is not enforced as written — rejected
/// (enforced fail closed, see [`crate::policy::RejectEffect`]), dropped, or
/// left to a waypoint — rather than reported while the policy is enforced
/// (an invalid `istio.io/dry-run` value is ignored, as Istio does, and the
/// policy is enforced).
pub fn rejects_policy(error: &PolicyError) -> bool {
    match error {
        PolicyError::Syntax { .. }
        | PolicyError::Document { .. }
        | PolicyError::UnsupportedKind { .. }
        | PolicyError::Rejected { .. }
        | PolicyError::TargetRefs { .. }
        | PolicyError::CustomAction { .. } => true,
        PolicyError::BadAnnotation { .. } => false,
    }
}

/// The log message of an error whose policy is rejected.
const REJECTED: &str = "policy rejected";
/// The log message of an error whose policy is still enforced.
const REPORTED: &str = "policy error reported, policy still enforced";

/// The message [`CompiledPolicies::log`] logs `error` with.
fn log_message(error: &PolicyError) -> &'static str {
    if rejects_policy(error) {
        REJECTED
    } else {
        REPORTED
    }
}

/// The field path an error names, from its document's root.
fn error_field(error: &PolicyError) -> Option<String> {
    match error {
        PolicyError::Document { field, .. }
        | PolicyError::Rejected { field, .. }
        | PolicyError::TargetRefs { field, .. }
        | PolicyError::BadAnnotation { field, .. } => Some(field.clone()),
        PolicyError::CustomAction { .. } => Some("spec.action".into()),
        PolicyError::Syntax { .. } | PolicyError::UnsupportedKind { .. } => None,
    }
}

/// Compiled policies: the store decisions are made with, and the report.
#[derive(Debug, Default)]
pub struct CompiledPolicies {
    /// The policy store in force (rejected policies with their fail-closed
    /// effect included).
    pub store: PolicyStore,
    /// What compiling found.
    pub report: PolicyReport,
}

impl CompiledPolicies {
    /// Policies in force (AuthorizationPolicies and PeerAuthentications).
    pub fn in_force(&self) -> usize {
        self.store.authorization_policy_count() + self.store.peer_authentication_count()
    }

    /// Logs the report's findings the last compile did not have, and a
    /// summary (once per change, by the store that published them, at
    /// `generation`).
    pub(super) fn log(&self, generation: u64, logged: &super::findings::LoggedFindings) {
        let mut pass = logged.pass("policies");
        for e in &self.report.errors {
            if pass.fresh(format!("error {e}")) {
                tracing::error!(error = %e, "{}", log_message(&e.finding));
            }
        }
        for w in &self.report.warnings {
            if pass.fresh(format!("warning {w}")) {
                tracing::warn!(warning = %w, "policy enforced more strictly than written");
            }
        }
        drop(pass);
        tracing::info!(
            generation,
            authorization_policies = self.store.authorization_policy_count(),
            peer_authentications = self.store.peer_authentication_count(),
            rejected = self.report.rejected(),
            errors = self.report.errors.len(),
            warnings = self.report.warnings.len(),
            "policies applied"
        );
    }
}

/// Compiles `policies` for `root_namespace` (whose policies apply mesh-wide):
/// each object through the engine's parser, then one store for all of them.
/// A malformed policy is reported with its document and field and enforced
/// fail closed; the others keep working.
pub fn compile_policies(policies: &Policies, root_namespace: &str) -> CompiledPolicies {
    let mut resources = Vec::new();
    // The document each resource came from (the engine reports by name).
    let mut origin: HashMap<(Kind, PolicyName), PolicyDocument> = HashMap::new();
    let mut report = PolicyReport::default();
    for (n, (document, doc)) in policies.documents().enumerate() {
        let value = match serde_yaml::to_value(doc) {
            Ok(value) => value,
            Err(e) => {
                report.errors.push(Finding {
                    finding: PolicyError::Document {
                        document: n + 1,
                        field: "(root)".into(),
                        message: format!("not representable as YAML: {e}"),
                    },
                    document: Some(document),
                    field: None,
                });
                continue;
            }
        };
        let parsed = parse_value(value, n + 1);
        for r in &parsed.resources {
            let m = r.metadata();
            let name = PolicyName::new(
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            );
            // The engine keeps the last of duplicates: so does this map.
            origin.insert((r.kind(), name), document);
        }
        resources.extend(parsed.resources);
        report
            .errors
            .extend(parsed.errors.into_iter().map(|e| Finding {
                field: error_field(&e),
                finding: e,
                document: Some(document),
            }));
    }
    let (store, built) = PolicyStore::build(root_namespace, &resources);
    let locate = |kind: Kind, policy: &PolicyName| origin.get(&(kind, policy.clone())).copied();
    report.errors.extend(built.errors.into_iter().map(|e| {
        let kind = match &e {
            PolicyError::Rejected { kind, .. } | PolicyError::BadAnnotation { kind, .. } => {
                Some(*kind)
            }
            PolicyError::TargetRefs { .. } | PolicyError::CustomAction { .. } => {
                Some(Kind::AuthorizationPolicy)
            }
            _ => None,
        };
        Finding {
            document: kind.zip(e.policy()).and_then(|(k, p)| locate(k, p)),
            field: error_field(&e),
            finding: e,
        }
    }));
    report
        .warnings
        .extend(built.warnings.into_iter().map(|w| Finding {
            document: locate(w.kind, &w.policy),
            field: Some(w.field.clone()),
            finding: w,
        }));
    CompiledPolicies { store, report }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::policy::{Connection, Decision, RejectEffect, WorkloadRef};
    use crate::state::{Snapshot, Store};

    fn object(kind: &str, meta: &str, spec: &str) -> serde_json::Value {
        let yaml = format!(
            "{{apiVersion: security.istio.io/v1, kind: {kind}, metadata: {meta}, spec: {spec}}}"
        );
        serde_yaml::from_str(&yaml).expect("test object")
    }

    fn decide(compiled: &CompiledPolicies, namespace: &str) -> Decision {
        let labels = BTreeMap::new();
        let conn = Connection {
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/front"),
            source_ip: "10.0.0.7".parse().expect("ip"),
            remote_ip: None,
            destination_ip: "10.0.1.9".parse().expect("ip"),
            destination_port: 8080,
        };
        compiled.store.evaluate(
            &conn,
            &WorkloadRef {
                namespace,
                labels: &labels,
            },
        )
    }

    fn bad_deny() -> serde_json::Value {
        object(
            "AuthorizationPolicy",
            "{name: deny-bad-cidr, namespace: shop}",
            "{action: DENY, rules: [{from: [{source: {ipBlocks: ['10.0.0.0/33']}}]}]}",
        )
    }

    #[test]
    fn a_published_bad_deny_fails_closed_and_is_reported_with_its_field() {
        let store = Store::new();
        let policies = Policies {
            authorization: vec![
                object(
                    "AuthorizationPolicy",
                    "{name: fine, namespace: web}",
                    "{rules: [{}]}",
                ),
                bad_deny(),
            ],
            peer_authentication: vec![],
        };
        assert_eq!(
            store.publish_snapshot(Snapshot {
                policies,
                ..Default::default()
            }),
            1
        );
        let snap = store.current();
        let compiled = &snap.compiled;
        // Fail closed in its scope (namespace shop); other namespaces unaffected.
        assert!(!decide(compiled, "shop").is_allowed());
        assert!(decide(compiled, "other").is_allowed());
        assert_eq!(compiled.report.errors.len(), 1, "{:?}", compiled.report);
        let e = &compiled.report.errors[0];
        assert_eq!(
            e.document,
            Some(PolicyDocument {
                kind: Kind::AuthorizationPolicy,
                index: 1
            })
        );
        assert_eq!(
            e.field.as_deref(),
            Some("spec.rules[0].from[0].source.ipBlocks[0]")
        );
        assert!(
            matches!(
                &e.finding,
                PolicyError::Rejected { policy, effect: RejectEffect::DenyAll, .. }
                    if policy.to_string() == "shop/deny-bad-cidr"
            ),
            "{e}"
        );
        assert!(rejects_policy(&e.finding));
        assert_eq!(log_message(&e.finding), "policy rejected");
        assert_eq!(compiled.report.rejected(), 1);
    }

    #[test]
    fn compiled_policies_are_shared_until_the_policies_change() {
        let store = Store::new();
        let policies = Policies {
            authorization: vec![bad_deny()],
            peer_authentication: vec![],
        };
        store.publish_snapshot(Snapshot {
            policies: policies.clone(),
            ..Default::default()
        });
        let first = store.current().compiled.clone();
        // Another change (the node): the same compiled policies, not recompiled.
        store.publish_snapshot(Snapshot {
            node: crate::state::NodeInfo {
                name: "n".into(),
                probe_sources: vec![],
            },
            policies: policies.clone(),
            ..Default::default()
        });
        assert_eq!(store.current().generation, 2);
        assert!(Arc::ptr_eq(&first, &store.current().compiled));
        store.publish(Default::default(), Default::default());
        assert!(Arc::ptr_eq(&first, &store.current().compiled));
        // Policies removed: a new, empty store.
        store.publish_snapshot(Snapshot::default());
        let now = store.current().compiled.clone();
        assert!(!Arc::ptr_eq(&first, &now));
        assert!(now.report.errors.is_empty());
        assert!(decide(&now, "shop").is_allowed());
    }

    #[test]
    fn an_invalid_dry_run_is_reported_but_the_policy_is_enforced() {
        let policies = Policies {
            authorization: vec![object(
                "AuthorizationPolicy",
                "{name: deny-all, namespace: shop, annotations: {istio.io/dry-run: tRuE}}",
                "{action: DENY, rules: [{}]}",
            )],
            peer_authentication: vec![],
        };
        let compiled = compile_policies(&policies, DEFAULT_ROOT_NAMESPACE);
        assert_eq!(compiled.report.errors.len(), 1, "{:?}", compiled.report);
        let e = &compiled.report.errors[0];
        assert!(
            matches!(e.finding, PolicyError::BadAnnotation { .. }),
            "{e}"
        );
        assert_eq!(
            e.field.as_deref(),
            Some("metadata.annotations[istio.io/dry-run]")
        );
        // Reported, not rejected: the deny-all is enforced, and the log
        // line does not say it was rejected.
        assert!(!rejects_policy(&e.finding));
        assert!(!log_message(&e.finding).contains("rejected"));
        assert_eq!(compiled.report.rejected(), 0);
        assert!(!decide(&compiled, "shop").is_allowed());
    }

    #[test]
    fn documents_are_located_per_kind_and_the_root_namespace_is_the_stores() {
        let policies = Policies {
            authorization: vec![object(
                "AuthorizationPolicy",
                "{name: mesh-deny, namespace: mesh-root}",
                "{action: DENY, rules: [{}]}",
            )],
            peer_authentication: vec![object(
                "PeerAuthentication",
                "{name: default, namespace: shop}",
                "{mtls: {mode: SOMETIMES}}",
            )],
        };
        let store = Store::with_root_namespace("mesh-root");
        assert_eq!(store.root_namespace(), "mesh-root");
        store.publish_snapshot(Snapshot {
            policies: policies.clone(),
            ..Default::default()
        });
        let snap = store.current();
        // A root-namespace policy without selector applies mesh-wide.
        assert!(!decide(&snap.compiled, "shop").is_allowed());
        let e = &snap.compiled.report.errors[0];
        assert_eq!(
            e.document.map(|d| d.to_string()).as_deref(),
            Some("peer_authentication[0]")
        );
        assert_eq!(e.field.as_deref(), Some("spec.mtls.mode"));
        // Under the default root namespace, the same policy is namespaced.
        let compiled = compile_policies(&policies, DEFAULT_ROOT_NAMESPACE);
        assert!(decide(&compiled, "shop").is_allowed());
    }
}
