//! The object-level checks the Kubernetes API server (the CRD schema and
//! Istio's validating webhook) applies before it stores a policy, for the
//! sources that have no API server in front of them (the agent's workload
//! file).
//!
//! The engine itself ([`PolicyStore::build`](crate::PolicyStore::build))
//! fails closed on a malformed *spec*; but an object without a usable name,
//! of an unsupported version, or attached both to workloads and to a
//! waypoint cannot be tied to a scope, so the engine can only report and
//! drop it — a deny-all written that way would silently allow. A source
//! without an API server must refuse such an object instead, as the API
//! server would: that is what [`check_object`] is for.

use std::fmt;

use serde_yaml::Value;

use crate::compile::{DRY_RUN_ANNOTATION, parse_bool};
use crate::parse::API_GROUP;

/// One reason the API server would refuse an object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectProblem {
    /// Field path from the object's root (`metadata.name`, `spec`, …).
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for ObjectProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The supported `apiVersion`s.
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// What the API server would refuse in `object`, an `AuthorizationPolicy`
/// or `PeerAuthentication` as `kubectl apply` would send it: `apiVersion`
/// (`security.istio.io/v1` or `v1beta1`), `kind`, `metadata.name` (present,
/// a DNS-1123 subdomain), `metadata.namespace` (a DNS-1123 label when
/// given), the `istio.io/dry-run` annotation (a boolean, on an ALLOW or
/// DENY AuthorizationPolicy only), and at most one of `spec.selector`,
/// `spec.targetRef` and `spec.targetRefs`. Empty: nothing to refuse (the
/// spec itself is checked by the engine, which fails closed).
pub fn check_object(object: &Value) -> Vec<ObjectProblem> {
    let mut out = Vec::new();
    let mut problem = |field: &str, message: String| {
        out.push(ObjectProblem {
            field: field.to_owned(),
            message,
        });
    };
    if !object.is_mapping() {
        problem(
            "(root)",
            "expected an AuthorizationPolicy or PeerAuthentication object".into(),
        );
        return out;
    }
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(v)
            if v.split_once('/')
                .is_some_and(|(g, ver)| g == API_GROUP && VERSIONS.contains(&ver)) => {}
        Some(v) => problem(
            "apiVersion",
            format!("unsupported apiVersion {v:?}: expected {API_GROUP}/v1 or {API_GROUP}/v1beta1"),
        ),
        None => problem(
            "apiVersion",
            format!("missing: write {API_GROUP}/v1 (or {API_GROUP}/v1beta1)"),
        ),
    }
    let kind = object.get("kind").and_then(Value::as_str);
    let authz = kind == Some("AuthorizationPolicy");
    if !authz && kind != Some("PeerAuthentication") {
        problem(
            "kind",
            format!("{kind:?} is not AuthorizationPolicy or PeerAuthentication"),
        );
    }

    let metadata = object.get("metadata").filter(|m| !m.is_null());
    if metadata.is_some_and(|m| !m.is_mapping()) {
        problem("metadata", "expected an object".into());
    }
    match metadata.and_then(|m| m.get("name")) {
        None | Some(Value::Null) => problem(
            "metadata.name",
            "missing: every policy needs a name (the API server refuses an object without one)"
                .into(),
        ),
        Some(Value::String(n)) if is_dns_subdomain(n) => {}
        Some(Value::String(n)) => problem(
            "metadata.name",
            format!(
                "{n:?} is not a valid name: lowercase letters, digits, '-' and '.', starting \
                 and ending with a letter or digit, at most 253 characters"
            ),
        ),
        Some(_) => problem("metadata.name", "expected a string".into()),
    }
    match metadata.and_then(|m| m.get("namespace")) {
        None | Some(Value::Null) => {}
        Some(Value::String(n)) if is_dns_label(n) => {}
        Some(Value::String(n)) => problem(
            "metadata.namespace",
            format!(
                "{n:?} is not a valid namespace: lowercase letters, digits and '-', starting \
                 and ending with a letter or digit, at most 63 characters"
            ),
        ),
        Some(_) => problem("metadata.namespace", "expected a string".into()),
    }

    let spec = object.get("spec").filter(|s| s.is_mapping());
    let dry_run = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(DRY_RUN_ANNOTATION));
    if let Some(value) = dry_run {
        let field = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
        let action = spec
            .and_then(|s| s.get("action"))
            .and_then(Value::as_str)
            .unwrap_or("ALLOW");
        let text = match value {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if !authz {
            problem(
                &field,
                "only AuthorizationPolicy supports this annotation: remove it".into(),
            );
        } else if action != "ALLOW" && action != "DENY" {
            problem(
                &field,
                format!("supported with action ALLOW or DENY only, not {action}: remove it"),
            );
        } else if text.as_deref().and_then(parse_bool).is_none() {
            problem(
                &field,
                format!(
                    "invalid value {}: write \"true\" or \"false\"",
                    text.map_or_else(|| "(not a string)".into(), |t| format!("{t:?}"))
                ),
            );
        }
    }

    if authz && let Some(spec) = spec {
        let set = |key: &str| spec.get(key).is_some_and(|v| !v.is_null());
        let target_refs = spec
            .get("targetRefs")
            .and_then(Value::as_sequence)
            .is_some_and(|s| !s.is_empty());
        let n =
            usize::from(set("selector")) + usize::from(set("targetRef")) + usize::from(target_refs);
        if n > 1 {
            problem(
                "spec",
                "only one of selector, targetRef or targetRefs can be set: keep the selector for \
                 the node agent, or targetRefs for a waypoint"
                    .into(),
            );
        }
    }
    out
}

/// A DNS-1123 label: 1..=63 of `[a-z0-9-]`, alphanumeric at both ends
/// (a namespace's name, as the API server checks it).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated labels
/// (each `[a-z0-9-]`, alphanumeric at both ends; their length is not
/// limited to 63 here, as in Kubernetes).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && l.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && l.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (case, object as flow YAML, expected problems as `field: substring`
    /// joined by ` && `, or `ok`)
    #[rustfmt::skip]
    const CASES: &[(&str, &str, &str)] = &[
        ("valid v1", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny-all, namespace: shop}, spec: {action: DENY, rules: [{}]}}", "ok"),
        ("valid v1beta1 PA", "{apiVersion: security.istio.io/v1beta1, kind: PeerAuthentication, metadata: {name: default}}", "ok"),
        ("dotted name", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: a.b-c.d}}", "ok"),
        ("missing name", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {namespace: shop}, spec: {action: DENY, rules: [{}]}}", "metadata.name: missing"),
        ("missing metadata", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, spec: {}}", "metadata.name: missing"),
        ("empty name", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: ''}}", "metadata.name: \"\" is not a valid name"),
        ("uppercase name", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: DenyAll}}", "metadata.name: \"DenyAll\" is not a valid name"),
        ("name with underscore", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny_all}}", "metadata.name: \"deny_all\""),
        ("name with empty label", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: a..b}}", "metadata.name: \"a..b\""),
        ("name not a string", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: [x]}}", "metadata.name: expected a string"),
        ("bad namespace", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, namespace: a.b}}", "metadata.namespace: \"a.b\" is not a valid namespace"),
        ("v1alpha1", "{apiVersion: security.istio.io/v1alpha1, kind: AuthorizationPolicy, metadata: {name: x}}", "apiVersion: unsupported apiVersion \"security.istio.io/v1alpha1\""),
        ("wrong group", "{apiVersion: networking.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x}}", "apiVersion: unsupported apiVersion"),
        ("missing apiVersion", "{kind: AuthorizationPolicy, metadata: {name: x}}", "apiVersion: missing"),
        ("bad kind", "{apiVersion: security.istio.io/v1, kind: RequestAuthentication, metadata: {name: x}}", "kind: Some(\"RequestAuthentication\") is not"),
        ("not an object", "[a]", "(root): expected"),
        ("selector and targetRefs", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x}, spec: {selector: {matchLabels: {app: a}}, targetRefs: [{kind: Service, name: a}]}}", "spec: only one of selector, targetRef or targetRefs"),
        ("empty selector and targetRef", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x}, spec: {selector: {}, targetRef: {kind: Gateway, name: g}}}", "spec: only one of"),
        ("selector and empty targetRefs", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x}, spec: {selector: {matchLabels: {app: a}}, targetRefs: []}}", "ok"),
        ("targetRefs alone", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x}, spec: {targetRefs: [{kind: Service, name: a}]}}", "ok"),
        ("dry-run true", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, annotations: {istio.io/dry-run: 'true'}}, spec: {action: DENY}}", "ok"),
        ("dry-run 1", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, annotations: {istio.io/dry-run: '1'}}}", "ok"),
        ("dry-run YAML bool", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, annotations: {istio.io/dry-run: false}}}", "ok"),
        ("dry-run tRuE", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, annotations: {istio.io/dry-run: tRuE}}}", "metadata.annotations[istio.io/dry-run]: invalid value \"tRuE\""),
        ("dry-run on AUDIT", "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: x, annotations: {istio.io/dry-run: 'true'}}, spec: {action: AUDIT}}", "metadata.annotations[istio.io/dry-run]: supported with action ALLOW or DENY only"),
        ("dry-run on PA", "{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: x, annotations: {istio.io/dry-run: 'true'}}}", "metadata.annotations[istio.io/dry-run]: only AuthorizationPolicy"),
        ("several problems", "{apiVersion: v1, kind: AuthorizationPolicy, metadata: {name: X}}", "apiVersion: unsupported && metadata.name: \"X\""),
    ];

    #[test]
    fn object_checks_table() {
        let mut failures = Vec::new();
        for (name, object, want) in CASES {
            let value: Value = serde_yaml::from_str(object).expect("test YAML");
            let got: Vec<String> = check_object(&value)
                .iter()
                .map(ToString::to_string)
                .collect();
            if *want == "ok" {
                if !got.is_empty() {
                    failures.push(format!("{name}: want ok, got {got:?}"));
                }
                continue;
            }
            for w in want.split(" && ") {
                if !got.iter().any(|g| g.contains(w)) {
                    failures.push(format!("{name}: want {w:?} in {got:?}"));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
