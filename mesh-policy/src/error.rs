//! What building a [`PolicyStore`](crate::PolicyStore) reports: errors
//! (a document or a policy that is not honoured as written) and warnings
//! (a policy enforced more strictly than written, or not at all where that
//! cannot open traffic).

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::model::Kind;

/// `namespace/name` of a policy. Cheap to clone (two `Arc`s).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyName {
    /// `metadata.namespace`.
    pub namespace: Arc<str>,
    /// `metadata.name`.
    pub name: Arc<str>,
}

impl PolicyName {
    /// A name from its parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl Serialize for PolicyName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("PolicyName", 2)?;
        st.serialize_field("namespace", &*self.namespace)?;
        st.serialize_field("name", &*self.name)?;
        st.end()
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a rejected policy still does, so that rejecting it never opens
/// traffic (fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RejectEffect {
    /// A rejected DENY (or CUSTOM, or unknown action) policy denies every
    /// connection to the workloads in its scope.
    DenyAll,
    /// A rejected ALLOW policy grants nothing, but its workloads still
    /// require an ALLOW match (other ALLOW policies may grant).
    GrantNothing,
    /// A rejected AUDIT policy has no effect (AUDIT never decides).
    None,
    /// A rejected PeerAuthentication makes its scope STRICT.
    Strict,
    /// The document could not be tied to a scope at all (no name, unknown
    /// kind, unreadable YAML): nothing is enforced for it.
    Unscoped,
}

impl fmt::Display for RejectEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectEffect::DenyAll => {
                "fail closed: every connection to the workloads in its scope is denied"
            }
            RejectEffect::GrantNothing => {
                "fail closed: it grants nothing, its workloads still need another ALLOW policy to match"
            }
            RejectEffect::None => "not evaluated (AUDIT never changes a decision)",
            RejectEffect::Strict => "fail closed: mTLS mode STRICT for its scope",
            RejectEffect::Unscoped => "ignored: it names no scope",
        })
    }
}

/// A document or a policy that is not honoured as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum PolicyError {
    /// The text is not YAML/JSON.
    #[error("document {document}: not valid YAML/JSON: {message}")]
    Syntax {
        /// 1-based index of the document in the input.
        document: usize,
        /// The parser's message (with line and column when known).
        message: String,
    },
    /// A document that is not an object with `apiVersion` and `kind`.
    #[error("document {document}: {field}: {message}")]
    Document {
        /// 1-based index of the document in the input.
        document: usize,
        /// The offending field (`apiVersion`, `kind`, `metadata.name`, …).
        field: String,
        /// What is wrong there.
        message: String,
    },
    /// A kind this engine does not enforce (reported, never silently
    /// dropped).
    #[error(
        "document {document}: unsupported kind {api_version}/{kind}{}: only security.istio.io \
         AuthorizationPolicy and PeerAuthentication are enforced",
        name.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
    )]
    UnsupportedKind {
        /// 1-based index of the document in the input.
        document: usize,
        /// `apiVersion` as written.
        api_version: String,
        /// `kind` as written.
        kind: String,
        /// `namespace/name`, when it has one.
        name: Option<String>,
    },
    /// A policy that is malformed or cannot be enforced; it is rejected and
    /// takes the fail-closed `effect`.
    #[error("{kind} {policy} rejected: {field}: {message} ({effect})")]
    Rejected {
        /// Its kind.
        kind: Kind,
        /// `namespace/name`.
        policy: PolicyName,
        /// Field path from the object's root, e.g.
        /// `spec.rules[0].to[0].operation.ports[1]`.
        field: String,
        /// What is wrong there.
        message: String,
        /// What the rejected policy still does.
        effect: RejectEffect,
    },
    /// An AuthorizationPolicy with `targetRef`/`targetRefs` attaches to a
    /// waypoint or gateway, which the node agent is not (Istio ambient's
    /// ztunnel ignores these too): it is not enforced here.
    #[error(
        "AuthorizationPolicy {policy}: {field}: policies attached with targetRefs are enforced by the \
         waypoint they target (mesh-waypoint: its Gateway, a Service it fronts, the istio-waypoint \
         GatewayClass), not at L4 by the node agent: not enforced here"
    )]
    TargetRefs {
        /// `namespace/name`.
        policy: PolicyName,
        /// `spec.targetRef` or `spec.targetRefs`.
        field: String,
    },
    /// An annotation whose value Istio cannot read (`istio.io/dry-run:
    /// "tRuE"`): it is ignored, as Istio's control plane does, and the
    /// policy is enforced.
    #[error("{kind} {policy}: {field}: invalid value {value:?}: {message}")]
    BadAnnotation {
        /// Its kind.
        kind: Kind,
        /// `namespace/name`.
        policy: PolicyName,
        /// `metadata.annotations[<name>]`.
        field: String,
        /// The value as written.
        value: String,
        /// What the agent does instead, and what to write.
        message: String,
    },
    /// `action: CUSTOM` needs an external authorizer neither the node agent
    /// nor the waypoint can call: the connections or requests its rules
    /// select are denied (fail closed).
    #[error(
        "AuthorizationPolicy {policy}: spec.action: CUSTOM (external authorization) cannot be \
         enforced (no external authorizer in the node agent or the waypoint): fail closed, the \
         connections or requests its rules select are denied"
    )]
    CustomAction {
        /// `namespace/name`.
        policy: PolicyName,
    },
}

impl PolicyError {
    /// The policy concerned, when the error is tied to one.
    pub fn policy(&self) -> Option<&PolicyName> {
        match self {
            PolicyError::Rejected { policy, .. }
            | PolicyError::BadAnnotation { policy, .. }
            | PolicyError::TargetRefs { policy, .. }
            | PolicyError::CustomAction { policy } => Some(policy),
            _ => None,
        }
    }
}

/// A policy enforced differently from what is written, never more openly:
/// L7 attributes at L4, dry-run, duplicates, policies that match nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{kind} {policy}: {field}: {message}")]
pub struct PolicyWarning {
    /// Its kind.
    pub kind: Kind,
    /// `namespace/name`.
    pub policy: PolicyName,
    /// Field path(s) from the object's root.
    pub field: String,
    /// What the agent does about it.
    pub message: String,
}

/// Everything building a store found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Rejected documents and policies.
    pub errors: Vec<PolicyError>,
    /// Policies enforced more strictly than written (or not at all where
    /// that cannot open traffic).
    pub warnings: Vec<PolicyWarning>,
}

impl Report {
    /// No errors and no warnings.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.warnings.is_empty()
    }

    /// Puts `errors` (the documents' parse errors) before the report's own.
    pub fn prepend_errors(&mut self, mut errors: Vec<PolicyError>) {
        errors.append(&mut self.errors);
        self.errors = errors;
    }
}
