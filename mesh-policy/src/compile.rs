//! Validation and lowering of the written policies into matchers.
//!
//! A rule becomes a list of *clauses* that are ANDed (`from`, `to`, and one
//! per `when` condition); a clause is a list of [`Match`]es that are ORed
//! (the entries of `from`/`to`); a [`Match`] ANDs its fields, ORs the values
//! of a field, and requires none of the `not*` values. A [`Match`] with no
//! field matches everything: that is what is left of a DENY entry whose
//! fields were all L7 (Istio's "enforced without the HTTP rules").

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

use crate::error::{PolicyError, PolicyName, PolicyWarning, RejectEffect, Report};
use crate::model::{
    AuthorizationPolicy, Kind, MutualTls, PeerAuthentication, Scalar, WorkloadSelector,
};

/// The annotation Istio uses for dry-run AuthorizationPolicies.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// A boolean as Go's `strconv.ParseBool` reads it (what Istio uses for
/// `istio.io/dry-run`): `None` for anything else (`"tRuE"`, `"yes"`, `""`).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A string matcher (`principals`, `namespaces`): exact, `prefix*`,
/// `*suffix`, or `*` (present and non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrMatch {
    /// An absent value (plaintext: no principal, no namespace) matches no
    /// positive pattern, not even `*`.
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            StrMatch::Exact(e) => v == &**e,
            StrMatch::Prefix(p) => v.starts_with(&**p),
            StrMatch::Suffix(s) => v.ends_with(&**s),
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// One ANDed set of L4 conditions (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Match {
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// `(namespace, service account)`.
    pub service_accounts: Vec<(Box<str>, Box<str>)>,
    pub not_service_accounts: Vec<(Box<str>, Box<str>)>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub remote_ips: Vec<IpNet>,
    pub not_remote_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A lowered rule: clauses ANDed, matches of a clause ORed. No clause: the
/// rule matches everything (`rules: [{}]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CompiledRule {
    pub clauses: Vec<Vec<Match>>,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    Allow,
    Deny,
    Audit,
}

/// Why a policy has its effect (named in deny reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// As written (L7 parts possibly removed, never widening).
    Written,
    /// `action: CUSTOM`, enforced as DENY of what its rules select.
    Custom,
    /// Rejected: fail-closed stand-in.
    Rejected,
}

/// A lowered AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompiledAuthz {
    pub name: PolicyName,
    pub effect: Effect,
    pub origin: Origin,
    /// Empty: matches nothing.
    pub rules: Vec<CompiledRule>,
}

/// Where a policy applies. `labels` empty: the whole namespace (the whole
/// mesh in the root namespace); otherwise the workloads of the namespace
/// carrying all the labels (of every namespace, in the root namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// A PeerAuthentication mode as written (`UNSET` inherits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WrittenMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A lowered PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompiledPeerAuthn {
    pub name: PolicyName,
    /// Among competing policies at one level: rejected ones first, then
    /// the oldest (`creationTimestamp`; absent sorts first), then by name.
    pub order: (bool, String, PolicyName),
    pub mode: WrittenMode,
    pub ports: BTreeMap<u16, WrittenMode>,
}

/// Rule evaluation mode: ALLOW/AUDIT rules must be fully checkable to
/// match; DENY (and CUSTOM) rules drop what they cannot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Grant,
    Deny,
}

/// Errors found in one policy: `(field path, message)`.
type Problems = Vec<(String, String)>;

/// Lowers an AuthorizationPolicy; `None` when it has no effect at all.
pub(crate) fn compile_authz(
    ap: &AuthorizationPolicy,
    root_namespace: &str,
    report: &mut Report,
) -> Option<(Scope, CompiledAuthz)> {
    let namespace = ap.metadata.namespace.as_deref().unwrap_or_default();
    let name = PolicyName::new(namespace, ap.metadata.name.as_deref().unwrap_or_default());
    // Read as Istio does (Go's `strconv.ParseBool`); an unreadable value is
    // reported and the policy is enforced, as Istio's control plane does.
    let dry_run = match ap.metadata.annotations.get(DRY_RUN_ANNOTATION) {
        None => false,
        Some(v) => parse_bool(v.as_str()).unwrap_or_else(|| {
            report.errors.push(PolicyError::BadAnnotation {
                kind: Kind::AuthorizationPolicy,
                policy: name.clone(),
                field: format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                value: v.as_str().to_owned(),
                message: "expected a boolean as Istio reads it (1, t, T, TRUE, true, True, 0, f, \
                          F, FALSE, false, False): the policy is enforced, not dry-run; fix the \
                          value to dry-run it"
                    .into(),
            });
            false
        }),
    };
    let written_action = ap.raw_action.as_deref();
    let reject_effect = if dry_run {
        RejectEffect::None
    } else {
        match written_action {
            None | Some("ALLOW") => RejectEffect::GrantNothing,
            Some("AUDIT") => RejectEffect::None,
            _ => RejectEffect::DenyAll,
        }
    };
    let fallback_scope = Scope {
        namespace: namespace.to_owned(),
        labels: ap.raw_selector.clone().unwrap_or_default(),
    };

    let spec = match &ap.spec {
        Ok(spec) => spec,
        Err(e) => {
            let problems = vec![(e.field.clone(), e.message.clone())];
            return reject_authz(name, problems, reject_effect, fallback_scope, report);
        }
    };

    let has_target_refs = spec.target_refs.as_ref().is_some_and(|v| !v.is_empty());
    let has_target_ref = spec.target_ref.as_ref().is_some_and(|v| !v.is_null());
    let attachments = usize::from(spec.selector.is_some())
        + usize::from(has_target_ref)
        + usize::from(has_target_refs);
    let mut problems: Problems = Vec::new();
    if attachments > 1 {
        // The API server refuses it (CEL `oneof(selector, targetRef,
        // targetRefs)`); rejected here, fail closed in the selector's scope,
        // rather than ignored as a waypoint policy.
        problems.push((
            "spec".into(),
            "only one of selector, targetRef or targetRefs can be set (the API server refuses \
             this policy): keep the selector for the node agent, or targetRefs for a waypoint"
                .into(),
        ));
    } else if has_target_refs || has_target_ref {
        report.errors.push(PolicyError::TargetRefs {
            policy: name,
            field: if has_target_refs {
                "spec.targetRefs".into()
            } else {
                "spec.targetRef".into()
            },
        });
        return None;
    }

    let (effect, mode, custom) = match spec.action.as_deref() {
        None | Some("ALLOW") => (Effect::Allow, Mode::Grant, false),
        Some("DENY") => (Effect::Deny, Mode::Deny, false),
        Some("AUDIT") => (Effect::Audit, Mode::Grant, false),
        Some("CUSTOM") => (Effect::Deny, Mode::Deny, true),
        Some(other) => {
            problems.push((
                "spec.action".into(),
                format!("unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"),
            ));
            (Effect::Deny, Mode::Deny, false)
        }
    };
    if spec.provider.as_ref().is_some_and(|p| !p.is_null()) && !custom {
        problems.push((
            "spec.provider".into(),
            "only allowed with action CUSTOM".into(),
        ));
    }
    let labels = compile_selector(spec.selector.as_ref(), &mut problems);

    let mut rules = Vec::new();
    let mut warnings = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let path = format!("spec.rules[{i}]");
        match rule {
            None => problems.push((path, "a rule must not be null".into())),
            Some(rule) => {
                if let Some(r) =
                    compile_rule(rule, &path, namespace, mode, &mut problems, &mut warnings)
                {
                    rules.push(r);
                }
            }
        }
    }
    let scope = match labels {
        Some(labels) => Scope {
            namespace: namespace.to_owned(),
            labels,
        },
        // An invalid selector: the whole namespace (wider, so a fail-closed
        // rejection covers at least what the policy meant to).
        None => Scope {
            namespace: namespace.to_owned(),
            labels: BTreeMap::new(),
        },
    };
    if !problems.is_empty() {
        return reject_authz(name, problems, reject_effect, scope, report);
    }

    for (field, message) in warnings {
        report.warnings.push(PolicyWarning {
            kind: Kind::AuthorizationPolicy,
            policy: name.clone(),
            field,
            message,
        });
    }
    let no_rules = spec.rules.as_ref().is_none_or(Vec::is_empty);
    if custom {
        report.errors.push(PolicyError::CustomAction {
            policy: name.clone(),
        });
    }
    if no_rules && effect == Effect::Deny {
        warn(
            report,
            &name,
            "spec.rules",
            "a DENY or CUSTOM policy without rules matches nothing and has no effect (Istio rejects it)",
        );
    }
    if namespace == root_namespace && scope.labels.is_empty() && effect == Effect::Allow && no_rules
    {
        warn(
            report,
            &name,
            "spec",
            "an ALLOW policy without rules in the root namespace allows nothing: it denies every connection in the mesh",
        );
    }
    let effect = if dry_run {
        warn(
            report,
            &name,
            "metadata.annotations[istio.io/dry-run]",
            "dry-run: evaluated and reported like AUDIT, never enforced",
        );
        Effect::Audit
    } else {
        effect
    };
    Some((
        scope,
        CompiledAuthz {
            name,
            effect,
            origin: if custom {
                Origin::Custom
            } else {
                Origin::Written
            },
            rules,
        },
    ))
}

fn warn(report: &mut Report, name: &PolicyName, field: &str, message: &str) {
    report.warnings.push(PolicyWarning {
        kind: Kind::AuthorizationPolicy,
        policy: name.clone(),
        field: field.into(),
        message: message.into(),
    });
}

fn reject_authz(
    name: PolicyName,
    problems: Problems,
    effect: RejectEffect,
    scope: Scope,
    report: &mut Report,
) -> Option<(Scope, CompiledAuthz)> {
    for (field, message) in problems {
        report.errors.push(PolicyError::Rejected {
            kind: Kind::AuthorizationPolicy,
            policy: name.clone(),
            field,
            message,
            effect,
        });
    }
    let (effect, rules) = match effect {
        // One rule without clauses: matches every connection.
        RejectEffect::DenyAll => (Effect::Deny, vec![CompiledRule::default()]),
        // No rule: matches nothing, but the policy still applies.
        RejectEffect::GrantNothing => (Effect::Allow, Vec::new()),
        _ => return None,
    };
    Some((
        scope,
        CompiledAuthz {
            name,
            effect,
            origin: Origin::Rejected,
            rules,
        },
    ))
}

/// `Some(labels)` (possibly empty: no selector) when valid.
fn compile_selector(
    selector: Option<&WorkloadSelector>,
    problems: &mut Problems,
) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, v) in selector.map(|s| &s.match_labels).into_iter().flatten() {
        let field = format!("spec.selector.matchLabels[{k}]");
        if k.is_empty() {
            problems.push((field, "empty label key".into()));
            ok = false;
        } else if k.contains('*') || v.as_str().contains('*') {
            problems.push((field, "wildcards are not supported in selectors".into()));
            ok = false;
        } else {
            out.insert(k.clone(), v.0.clone());
        }
    }
    ok.then_some(out)
}

fn compile_rule(
    rule: &crate::model::Rule,
    path: &str,
    policy_namespace: &str,
    mode: Mode,
    problems: &mut Problems,
    warnings: &mut Vec<(String, String)>,
) -> Option<CompiledRule> {
    let mut clauses = Vec::new();
    let mut l7: Vec<String> = Vec::new();

    if let Some(from) = &rule.from {
        if from.is_empty() {
            problems.push((format!("{path}.from"), "must not be empty".into()));
        }
        let mut clause = Vec::new();
        for (j, entry) in from.iter().enumerate() {
            let p = format!("{path}.from[{j}]");
            let Some(source) = entry.as_ref().and_then(|f| f.source.as_ref()) else {
                problems.push((format!("{p}.source"), "must not be null".into()));
                continue;
            };
            let p = format!("{p}.source");
            let mut m = Match::default();
            let mut any = false;
            let mut list = |name: &str, values: &[String]| -> Option<String> {
                any |= !values.is_empty();
                (!values.is_empty()).then(|| format!("{p}.{name}"))
            };
            if let Some(f) = list("principals", &source.principals) {
                m.principals = patterns(&f, &source.principals, true, problems);
            }
            if let Some(f) = list("notPrincipals", &source.not_principals) {
                m.not_principals = patterns(&f, &source.not_principals, true, problems);
            }
            if let Some(f) = list("namespaces", &source.namespaces) {
                m.namespaces = patterns(&f, &source.namespaces, false, problems);
            }
            if let Some(f) = list("notNamespaces", &source.not_namespaces) {
                m.not_namespaces = patterns(&f, &source.not_namespaces, false, problems);
            }
            if let Some(f) = list("serviceAccounts", &source.service_accounts) {
                m.service_accounts =
                    service_accounts(&f, &source.service_accounts, policy_namespace, problems);
            }
            if let Some(f) = list("notServiceAccounts", &source.not_service_accounts) {
                m.not_service_accounts =
                    service_accounts(&f, &source.not_service_accounts, policy_namespace, problems);
            }
            if let Some(f) = list("ipBlocks", &source.ip_blocks) {
                m.source_ips = cidrs(&f, &source.ip_blocks, problems, warnings);
            }
            if let Some(f) = list("notIpBlocks", &source.not_ip_blocks) {
                m.not_source_ips = cidrs(&f, &source.not_ip_blocks, problems, warnings);
            }
            if let Some(f) = list("remoteIpBlocks", &source.remote_ip_blocks) {
                m.remote_ips = cidrs(&f, &source.remote_ip_blocks, problems, warnings);
            }
            if let Some(f) = list("notRemoteIpBlocks", &source.not_remote_ip_blocks) {
                m.not_remote_ips = cidrs(&f, &source.not_remote_ip_blocks, problems, warnings);
            }
            for (name, values) in [
                ("requestPrincipals", &source.request_principals),
                ("notRequestPrincipals", &source.not_request_principals),
            ] {
                if let Some(f) = list(name, values) {
                    non_empty(&f, values.iter().map(String::as_str), problems);
                    l7.push(f);
                }
            }
            if !any {
                problems.push((p.clone(), "must not be empty".into()));
            }
            let sa = !source.service_accounts.is_empty() || !source.not_service_accounts.is_empty();
            let pn = !source.principals.is_empty()
                || !source.not_principals.is_empty()
                || !source.namespaces.is_empty()
                || !source.not_namespaces.is_empty();
            if sa && pn {
                problems.push((
                    p.clone(),
                    "serviceAccounts cannot be set together with principals or namespaces".into(),
                ));
            }
            clause.push(m);
        }
        clauses.push(clause);
    }

    if let Some(to) = &rule.to {
        if to.is_empty() {
            problems.push((format!("{path}.to"), "must not be empty".into()));
        }
        let mut clause = Vec::new();
        for (j, entry) in to.iter().enumerate() {
            let p = format!("{path}.to[{j}]");
            let Some(op) = entry.as_ref().and_then(|t| t.operation.as_ref()) else {
                problems.push((format!("{p}.operation"), "must not be null".into()));
                continue;
            };
            let p = format!("{p}.operation");
            let mut m = Match::default();
            if !op.ports.is_empty() {
                m.ports = ports(&format!("{p}.ports"), &op.ports, problems);
            }
            if !op.not_ports.is_empty() {
                m.not_ports = ports(&format!("{p}.notPorts"), &op.not_ports, problems);
            }
            let mut any = !op.ports.is_empty() || !op.not_ports.is_empty();
            for (name, values) in [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ] {
                if !values.is_empty() {
                    any = true;
                    let f = format!("{p}.{name}");
                    non_empty(&f, values.iter().map(String::as_str), problems);
                    l7.push(f);
                }
            }
            if !any {
                problems.push((p.clone(), "must not be empty".into()));
            }
            clause.push(m);
        }
        clauses.push(clause);
    }

    for (j, cond) in rule.when.iter().flatten().enumerate() {
        let p = format!("{path}.when[{j}]");
        let Some(cond) = cond else {
            problems.push((p, "must not be null".into()));
            continue;
        };
        let key = cond.key.as_deref().unwrap_or_default();
        if key.is_empty() {
            problems.push((format!("{p}.key"), "must not be empty".into()));
            continue;
        }
        if cond.values.is_empty() && cond.not_values.is_empty() {
            problems.push((
                p.clone(),
                format!("at least one of values or notValues must be set for key {key}"),
            ));
            continue;
        }
        let vp = format!("{p}.values");
        let np = format!("{p}.notValues");
        let strs = |v: &[Scalar]| v.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
        let mut m = Match::default();
        match key {
            "source.ip" => {
                m.source_ips = cidrs(&vp, &strs(&cond.values), problems, warnings);
                m.not_source_ips = cidrs(&np, &strs(&cond.not_values), problems, warnings);
            }
            "remote.ip" => {
                m.remote_ips = cidrs(&vp, &strs(&cond.values), problems, warnings);
                m.not_remote_ips = cidrs(&np, &strs(&cond.not_values), problems, warnings);
            }
            "destination.ip" => {
                m.destination_ips = cidrs(&vp, &strs(&cond.values), problems, warnings);
                m.not_destination_ips = cidrs(&np, &strs(&cond.not_values), problems, warnings);
            }
            "source.serviceAccount" => {
                let (values, not_values) = (strs(&cond.values), strs(&cond.not_values));
                if !values.is_empty() {
                    m.service_accounts = service_accounts(&vp, &values, policy_namespace, problems);
                }
                if !not_values.is_empty() {
                    m.not_service_accounts =
                        service_accounts(&np, &not_values, policy_namespace, problems);
                }
            }
            "destination.port" => {
                m.ports = ports(&vp, &cond.values, problems);
                m.not_ports = ports(&np, &cond.not_values, problems);
            }
            "source.namespace" => {
                m.namespaces = patterns(&vp, &strs(&cond.values), false, problems);
                m.not_namespaces = patterns(&np, &strs(&cond.not_values), false, problems);
            }
            "source.principal" => {
                m.principals = patterns(&vp, &strs(&cond.values), true, problems);
                m.not_principals = patterns(&np, &strs(&cond.not_values), true, problems);
            }
            _ => {
                match l7_key(key) {
                    Ok(()) => {
                        non_empty(&vp, cond.values.iter().map(Scalar::as_str), problems);
                        non_empty(&np, cond.not_values.iter().map(Scalar::as_str), problems);
                        l7.push(format!("{p} (key {key})"));
                    }
                    Err(msg) => problems.push((format!("{p}.key"), msg)),
                }
                continue;
            }
        }
        clauses.push(vec![m]);
    }

    if l7.is_empty() {
        return Some(CompiledRule { clauses });
    }
    let fields = l7.join(", ");
    match mode {
        Mode::Grant => {
            warnings.push((
                fields,
                "L7 (HTTP) attributes cannot be checked by the node agent: this rule never matches \
                 (in an ALLOW policy it grants nothing: more restrictive than written; in an AUDIT \
                 policy it logs nothing); use a waypoint for HTTP rules"
                    .into(),
            ));
            None
        }
        Mode::Deny => {
            let everything = clauses
                .iter()
                .all(|c| c.iter().any(|m| *m == Match::default()));
            let mut msg = String::from(
                "L7 (HTTP) attributes cannot be checked by the node agent: the rule is enforced on its \
                 L4 conditions only, which denies more than written",
            );
            if everything {
                msg.push_str(
                    "; with none left, it denies every connection to the workloads in scope",
                );
            }
            warnings.push((fields, msg));
            Some(CompiledRule { clauses })
        }
    }
}

/// The `when` keys Istio knows that only an L7 proxy can check. `Err`: a
/// key Istio rejects (unknown, deprecated, replaced).
fn l7_key(key: &str) -> Result<(), String> {
    let map_key = |prefix: &str| -> Result<(), String> {
        let rest = &key[prefix.len()..];
        if rest.len() > 2 && rest.starts_with('[') && rest.ends_with(']') {
            Ok(())
        } else {
            Err(format!(
                "bad key {key:?}: should have the form {prefix}[name]"
            ))
        }
    };
    match key {
        "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(()),
        _ if key.starts_with("request.headers") => map_key("request.headers"),
        _ if key.starts_with("request.experimental.inline.headers") => {
            map_key("request.experimental.inline.headers")
        }
        _ if key.starts_with("request.auth.claims") => map_key("request.auth.claims"),
        _ if key.starts_with("experimental.envoy.filters.") => {
            let open = key.find('[').unwrap_or(0);
            if open > 0 && key.ends_with(']') && open + 2 < key.len() {
                Ok(())
            } else {
                Err(format!("bad key {key:?}: should have the form a[b]"))
            }
        }
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the policy's metadata.namespace"
        )),
        _ if key.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Err(format!("unknown attribute {key:?}")),
    }
}

fn non_empty<'a>(field: &str, values: impl Iterator<Item = &'a str>, problems: &mut Problems) {
    for (i, v) in values.enumerate() {
        if v.is_empty() {
            problems.push((format!("{field}[{i}]"), "empty value".into()));
        }
    }
}

/// Parses principal or namespace patterns.
fn patterns(
    field: &str,
    values: &[String],
    principal: bool,
    problems: &mut Problems,
) -> Vec<StrMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match pattern(v, principal) {
            Ok(m) => out.push(m),
            Err(msg) => problems.push((format!("{field}[{i}]"), msg)),
        }
    }
    out
}

pub(crate) fn pattern(v: &str, principal: bool) -> Result<StrMatch, String> {
    if v.is_empty() {
        return Err("empty value".into());
    }
    if principal && v.starts_with("spiffe://") {
        return Err(format!(
            "bad principal {v:?}: write principals without the spiffe:// scheme, e.g. cluster.local/ns/default/sa/sleep"
        ));
    }
    let bad = || {
        Err(format!(
            "bad pattern {v:?}: '*' is only allowed alone, as a prefix (\"*suffix\") or as a suffix (\"prefix*\")"
        ))
    };
    if v == "*" {
        return Ok(StrMatch::Presence);
    }
    if let Some(rest) = v.strip_prefix('*') {
        if rest.contains('*') {
            return bad();
        }
        return Ok(StrMatch::Suffix(rest.into()));
    }
    if let Some(rest) = v.strip_suffix('*') {
        if rest.contains('*') {
            return bad();
        }
        return Ok(StrMatch::Prefix(rest.into()));
    }
    if v.contains('*') {
        return bad();
    }
    Ok(StrMatch::Exact(v.into()))
}

/// The API server's limits on `serviceAccounts`, `notServiceAccounts` and
/// the values of a `source.serviceAccount` condition.
const MAX_SERVICE_ACCOUNTS: usize = 16;
const MAX_SERVICE_ACCOUNT_LEN: usize = 320;

/// `<namespace>/<service account>`, or `<service account>` in the policy's
/// namespace; matched against the peer principal's `ns` and `sa` (see
/// `Ctx` in the store).
fn service_accounts(
    field: &str,
    values: &[String],
    policy_namespace: &str,
    problems: &mut Problems,
) -> Vec<(Box<str>, Box<str>)> {
    if values.len() > MAX_SERVICE_ACCOUNTS {
        problems.push((
            field.to_owned(),
            format!(
                "at most {MAX_SERVICE_ACCOUNTS} service accounts (the API server's limit): split the rule"
            ),
        ));
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if v.len() > MAX_SERVICE_ACCOUNT_LEN {
            problems.push((
                format!("{field}[{i}]"),
                format!("bad service account: longer than {MAX_SERVICE_ACCOUNT_LEN} characters"),
            ));
            continue;
        }
        let (ns, sa) = match v.split_once('/') {
            Some((ns, sa)) => (ns, sa),
            None => (policy_namespace, v.as_str()),
        };
        if ns.is_empty() || sa.is_empty() || sa.contains('/') || v.contains('*') {
            problems.push((
                format!("{field}[{i}]"),
                format!("bad service account {v:?}: expected \"name\" or \"namespace/name\", without wildcards"),
            ));
        } else {
            out.push((ns.into(), sa.into()));
        }
    }
    out
}

/// Parses IPs and CIDRs (v4 or v6). An IPv4-mapped IPv6 block
/// (`::ffff:10.0.0.0/104`) stays an IPv6 block: connection addresses are
/// canonical (a v4-mapped peer is IPv4), so it never matches, as in Istio
/// (Envoy's and ztunnel's CIDR matches never cross address families); a
/// warning gives the IPv4 block that was probably meant.
fn cidrs(
    field: &str,
    values: &[String],
    problems: &mut Problems,
    warnings: &mut Vec<(String, String)>,
) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match cidr(v) {
            Ok(n) => {
                if let Some(v4) = v4_mapped(&n) {
                    warnings.push((
                        format!("{field}[{i}]"),
                        format!(
                            "{v} is an IPv4-mapped IPv6 range: IPv4 peers are matched as IPv4 and never \
                             match an IPv6 range (as in Istio), so this value matches no connection; \
                             write {v4} to match IPv4 peers"
                        ),
                    ));
                }
                out.push(n);
            }
            Err(msg) => problems.push((format!("{field}[{i}]"), msg)),
        }
    }
    out
}

/// An IP or CIDR (v4 or v6), host bits allowed (as Go's
/// `netip.ParsePrefix`, which Istio uses).
pub(crate) fn cidr(v: &str) -> Result<IpNet, String> {
    if v.contains('/') {
        IpNet::from_str(v).map_err(|_| format!("bad CIDR {v:?}"))
    } else {
        Ok(IpNet::from(
            IpAddr::from_str(v).map_err(|_| format!("bad IP address {v:?}"))?,
        ))
    }
}

/// The IPv4 block an IPv6 block inside `::ffff:0:0/96` stands for.
fn v4_mapped(net: &IpNet) -> Option<Ipv4Net> {
    let IpNet::V6(n) = net else { return None };
    let prefix = n.prefix_len().checked_sub(96)?;
    let v4 = n.trunc().addr().to_ipv4_mapped()?;
    Ipv4Net::new(v4, prefix).ok()
}

/// AuthorizationPolicy ports (`ports`, `notPorts`, `destination.port`):
/// 0..=65535 as Istio validates them; port 0 is valid and matches no
/// connection.
fn ports(field: &str, values: &[Scalar], problems: &mut Problems) -> Vec<u16> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match port_number(v.as_str()) {
            Some(p) => out.push(p),
            None => problems.push((
                format!("{field}[{i}]"),
                format!("bad port {:?}: expected a number in 0..65535", v.as_str()),
            )),
        }
    }
    out
}

/// A port number as Go's `strconv.ParseUint(v, 10, 32)` reads it (decimal
/// digits only, leading zeros allowed), at most 65535.
pub(crate) fn port_number(v: &str) -> Option<u16> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = v.trim_start_matches('0');
    if digits.len() > 5 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    digits.parse::<u16>().ok()
}

/// A `portLevelMtls` port: 1..=65535 (Istio refuses port 0 there).
pub(crate) fn port(v: &str) -> Option<u16> {
    port_number(v).filter(|p| *p != 0)
}

/// Lowers a PeerAuthentication; `None` when it has no effect.
pub(crate) fn compile_peer_authn(
    pa: &PeerAuthentication,
    root_namespace: &str,
    report: &mut Report,
) -> Option<(Scope, CompiledPeerAuthn)> {
    let namespace = ap_ns(pa);
    let name = PolicyName::new(namespace, pa.metadata.name.as_deref().unwrap_or_default());
    let created = pa
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.clone())
        .unwrap_or_default();
    let mut problems: Problems = Vec::new();
    let mut scope = Scope {
        namespace: namespace.to_owned(),
        labels: pa.raw_selector.clone().unwrap_or_default(),
    };
    let mut mode = WrittenMode::Strict;
    let mut ports = BTreeMap::new();
    match &pa.spec {
        Err(e) => problems.push((e.field.clone(), e.message.clone())),
        Ok(spec) => {
            match compile_selector(spec.selector.as_ref(), &mut problems) {
                Some(labels) => scope.labels = labels,
                None => scope.labels = BTreeMap::new(),
            }
            mode = written_mode("spec.mtls.mode", spec.mtls.as_ref(), &mut problems);
            if let Some(map) = &spec.port_level_mtls {
                if spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.match_labels.is_empty())
                {
                    problems.push((
                        "spec.portLevelMtls".into(),
                        "only allowed in a policy with a workload selector".into(),
                    ));
                }
                if map.is_empty() {
                    problems.push((
                        "spec.portLevelMtls".into(),
                        "if given, must have at least one port".into(),
                    ));
                }
                for (k, v) in map {
                    let field = format!("spec.portLevelMtls[{k}]");
                    let m = written_mode(&format!("{field}.mode"), v.as_ref(), &mut problems);
                    match port(k.as_str()) {
                        Some(p) => {
                            ports.insert(p, m);
                        }
                        None => problems.push((
                            field,
                            format!("bad port {:?}: expected a number in 1..65535", k.as_str()),
                        )),
                    }
                }
            }
        }
    }
    if namespace == root_namespace && !scope.labels.is_empty() {
        report.warnings.push(PolicyWarning {
            kind: Kind::PeerAuthentication,
            policy: name,
            field: "spec.selector".into(),
            message: "a PeerAuthentication with a selector in the root namespace is ignored (as in Istio)"
                .into(),
        });
        return None;
    }
    let rejected = !problems.is_empty();
    if rejected {
        for (field, message) in problems {
            report.errors.push(PolicyError::Rejected {
                kind: Kind::PeerAuthentication,
                policy: name.clone(),
                field,
                message,
                effect: RejectEffect::Strict,
            });
        }
        mode = WrittenMode::Strict;
        ports.clear();
    }
    Some((
        scope,
        CompiledPeerAuthn {
            order: (!rejected, created, name.clone()),
            name,
            mode,
            ports,
        },
    ))
}

fn ap_ns(pa: &PeerAuthentication) -> &str {
    pa.metadata.namespace.as_deref().unwrap_or_default()
}

fn written_mode(field: &str, mtls: Option<&MutualTls>, problems: &mut Problems) -> WrittenMode {
    match mtls.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => WrittenMode::Unset,
        Some("DISABLE") => WrittenMode::Disable,
        Some("PERMISSIVE") => WrittenMode::Permissive,
        Some("STRICT") => WrittenMode::Strict,
        Some(other) => {
            problems.push((
                field.into(),
                format!("unknown mode {other:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
            ));
            WrittenMode::Strict
        }
    }
}
