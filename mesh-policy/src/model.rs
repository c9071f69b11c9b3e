//! Typed Kubernetes objects: `security.istio.io/v1` (and `v1beta1`)
//! `AuthorizationPolicy` and `PeerAuthentication`, as `kubectl get -o yaml`
//! prints them.
//!
//! These structs are the *written* form: every field of the Istio API that
//! the agent must see, strings kept as strings. Unknown fields inside `spec`
//! are an error (a typo such as `principal:` for `principals:` must not
//! silently widen a policy); unknown fields in `metadata` and at the top
//! level (`status`, `managedFields`, …) are ignored. Validation and meaning
//! are applied by [`PolicyStore::build`](crate::PolicyStore::build).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// The kinds this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// `security.istio.io` `AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `security.istio.io` `PeerAuthentication`.
    PeerAuthentication,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
        })
    }
}

/// The part of `metadata` the engine uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// `metadata.name` (required).
    #[serde(default)]
    pub name: Option<String>,
    /// `metadata.namespace`; `default` when absent, as `kubectl apply` does.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `metadata.creationTimestamp` (RFC 3339): among competing
    /// PeerAuthentications the oldest wins, as in Istio.
    #[serde(default)]
    pub creation_timestamp: Option<Scalar>,
    /// `metadata.annotations` (`istio.io/dry-run` is honoured). Values are
    /// read leniently (`true` as `"true"`), so that a hand-written file
    /// never loses a policy over an annotation.
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, Scalar>,
}

/// `spec.selector` (`istio.type.v1beta1.WorkloadSelector`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry to be selected.
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, Scalar>,
}

/// An `AuthorizationPolicy` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its spec, or why it could not be read (the policy is then rejected,
    /// fail-closed, when the store is built).
    pub spec: Result<AuthorizationPolicySpec, SpecError>,
    /// `spec.action` as written, read even when the rest of the spec is not
    /// readable: it decides how a rejected policy fails closed.
    pub raw_action: Option<String>,
    /// `spec.selector.matchLabels` as written, read even when the rest of
    /// the spec is not readable: it bounds a rejected policy's scope.
    pub raw_selector: Option<BTreeMap<String, String>>,
    /// `spec.targetRefs` (or `spec.targetRef`, as one) as written, read
    /// even when the rest of the spec is not readable: a waypoint still
    /// knows what a rejected policy attaches to, and fails closed there.
    /// Empty: none.
    pub raw_target_refs: Box<[serde_yaml::Value]>,
}

/// A `PeerAuthentication` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its spec, or why it could not be read.
    pub spec: Result<PeerAuthenticationSpec, SpecError>,
    /// `spec.selector.matchLabels` as written, read even when the rest of
    /// the spec is not readable.
    pub raw_selector: Option<BTreeMap<String, String>>,
}

/// Why a `spec` could not be deserialized: the field path (from the
/// object's root, e.g. `spec.rules[0].from[0].source.ipBlocks`) and the
/// deserializer's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecError {
    /// Field path from the object's root.
    pub field: String,
    /// What is wrong there.
    pub message: String,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to (absent: the whole namespace, or the
    /// whole mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Gateway/waypoint attachment: not enforceable by the node agent.
    #[serde(default)]
    pub target_ref: Option<serde_yaml::Value>,
    /// Gateway/waypoint attachments: not enforceable by the node agent.
    #[serde(default)]
    pub target_refs: Option<Vec<serde_yaml::Value>>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// The external authorizer of a `CUSTOM` policy.
    #[serde(default)]
    pub provider: Option<serde_yaml::Value>,
    /// The rules; absent or empty: the policy matches nothing.
    #[serde(default)]
    pub rules: Option<Vec<Option<Rule>>>,
}

/// One rule: `from`, `to` and `when` are ANDed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources, ORed (absent: any source).
    #[serde(default)]
    pub from: Option<Vec<Option<From>>>,
    /// Operations, ORed (absent: any operation).
    #[serde(default)]
    pub to: Option<Vec<Option<To>>>,
    /// Conditions, ANDed.
    #[serde(default)]
    pub when: Option<Vec<Option<Condition>>>,
}

/// An entry of `from`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// The source to match.
    #[serde(default)]
    pub source: Option<Source>,
}

/// `from[].source`: fields ANDed, values of one field ORed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // the Istio field names say it all
pub struct Source {
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// An entry of `to`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// The operation to match.
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)] // the Istio field names say it all
pub struct Operation {
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ports: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
}

/// An entry of `when`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The attribute, e.g. `source.ip`.
    #[serde(default)]
    pub key: Option<String>,
    /// Values, ORed.
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<Scalar>,
    /// Values none of which may match.
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<Scalar>,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The workload-wide mode.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per-port modes (port of the workload, as a string or a number).
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<Scalar, Option<MutualTls>>>,
}

/// `mtls` / `portLevelMtls[port]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// `UNSET`, `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// A YAML scalar read as text: `8080` and `"8080"` are the same port, and
/// `version: 1` the same label value as `version: "1"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Scalar(pub String);

impl Scalar {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `null` (as YAML writes an empty `key:`) reads as the default.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
