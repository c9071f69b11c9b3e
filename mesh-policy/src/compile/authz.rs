//! Lowering of an AuthorizationPolicy: its dry-run annotation, action,
//! attachment (selector or targetRefs) and rules, and the fail-closed
//! stand-in of a rejected policy.

use std::collections::BTreeMap;

use crate::error::{PolicyError, PolicyName, PolicyWarning, RejectEffect, Report};
use crate::model::{AuthorizationPolicy, Kind};
use crate::rule::{CompiledAuthz, CompiledRule, Effect, Origin, Scope, TargetRef};

use super::layer::Layer;
use super::rule::{Mode, compile_rule};
use super::values::{Problems, compile_selector, report_rejected};

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

/// Where a lowered policy applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attach {
    /// Workloads (node agents): a selector or a whole namespace.
    Scope(Scope),
    /// Waypoints: the Gateways, Services or GatewayClass named.
    Targets(Vec<TargetRef>),
}

/// Lowers an AuthorizationPolicy for the node agents (`Layer::Node`: its
/// selector scope; targetRefs policies are reported and left to waypoints)
/// or for a waypoint (`Layer::Waypoint`: only targetRefs policies, with
/// their HTTP fields); `None` when it has no effect at that layer.
pub(crate) fn compile_authz(
    ap: &AuthorizationPolicy,
    root_namespace: &str,
    layer: Layer,
    report: &mut Report,
) -> Option<(Attach, CompiledAuthz)> {
    let namespace = ap.metadata.namespace.as_deref().unwrap_or_default();
    let name = PolicyName::new(namespace, ap.metadata.name.as_deref().unwrap_or_default());
    let dry_run = read_dry_run(ap, &name, report);
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
    let fallback_scope = Attach::Scope(Scope {
        namespace: namespace.to_owned(),
        labels: ap.raw_selector.clone().unwrap_or_default(),
    });

    let spec = match &ap.spec {
        Ok(spec) => spec,
        Err(e) => {
            let mut problems = vec![(e.field.clone(), e.message.clone())];
            if layer == Layer::Node {
                return reject_authz(name, problems, reject_effect, fallback_scope, report);
            }
            // Unreadable: a waypoint rejects it over the targets it can
            // still read (fail closed there); without any, it is a node
            // agent's policy (rejected there in its selector's scope).
            let refs: Vec<&serde_yaml::Value> = ap.raw_target_refs.iter().collect();
            if refs.is_empty() {
                return None;
            }
            let targets = target_refs(&refs, "spec.targetRefs", namespace, &mut problems);
            return reject_authz(
                name,
                problems,
                reject_effect,
                Attach::Targets(targets),
                report,
            );
        }
    };

    let has_target_refs = spec.target_refs.as_ref().is_some_and(|v| !v.is_empty());
    let has_target_ref = spec.target_ref.as_ref().is_some_and(|v| !v.is_null());
    let attachments = usize::from(spec.selector.is_some())
        + usize::from(has_target_ref)
        + usize::from(has_target_refs);
    let mut problems: Problems = Vec::new();
    let targets = if layer != Layer::Node {
        if !(has_target_refs || has_target_ref) {
            return None; // a node agent's policy
        }
        let refs: Vec<&serde_yaml::Value> = match (&spec.target_refs, &spec.target_ref) {
            (Some(list), _) if !list.is_empty() => list.iter().collect(),
            (_, Some(one)) => vec![one],
            _ => Vec::new(),
        };
        let field = if has_target_refs {
            "spec.targetRefs"
        } else {
            "spec.targetRef"
        };
        Some(target_refs(&refs, field, namespace, &mut problems))
    } else {
        None
    };
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
    } else if (has_target_refs || has_target_ref) && layer == Layer::Node {
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

    let (effect, mode, custom) = read_action(spec.action.as_deref(), &mut problems);
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
                if let Some(r) = compile_rule(
                    rule,
                    &path,
                    namespace,
                    (mode, layer),
                    &mut problems,
                    &mut warnings,
                ) {
                    rules.push(r);
                }
            }
        }
    }
    let scope = match (targets, labels) {
        (Some(targets), _) => Attach::Targets(targets),
        (None, Some(labels)) => Attach::Scope(Scope {
            namespace: namespace.to_owned(),
            labels,
        }),
        // An invalid selector: the whole namespace (wider, so a fail-closed
        // rejection covers at least what the policy meant to).
        (None, None) => Attach::Scope(Scope {
            namespace: namespace.to_owned(),
            labels: BTreeMap::new(),
        }),
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
    let whole_mesh = matches!(&scope, Attach::Scope(s) if s.labels.is_empty());
    if namespace == root_namespace && whole_mesh && effect == Effect::Allow && no_rules {
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

/// The `istio.io/dry-run` annotation, read as Istio does (Go's
/// `strconv.ParseBool`); an unreadable value is reported and the policy is
/// enforced, as Istio's control plane does.
fn read_dry_run(ap: &AuthorizationPolicy, name: &PolicyName, report: &mut Report) -> bool {
    match ap.metadata.annotations.get(DRY_RUN_ANNOTATION) {
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
    }
}

/// `spec.action`: the effect, how rules are lowered, and whether it is
/// CUSTOM. An unknown action is a problem, lowered as DENY.
fn read_action(action: Option<&str>, problems: &mut Problems) -> (Effect, Mode, bool) {
    match action {
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
    }
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
    scope: Attach,
    report: &mut Report,
) -> Option<(Attach, CompiledAuthz)> {
    report_rejected(report, Kind::AuthorizationPolicy, &name, problems, effect);
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

/// Reads `targetRef(s)` (at `field`) of a policy in `namespace`: `kind`
/// and `name` required; `group` as written (`""` for core Services);
/// a `namespace` other than the policy's is refused (Istio's rule).
fn target_refs(
    refs: &[&serde_yaml::Value],
    field: &str,
    namespace: &str,
    problems: &mut Problems,
) -> Vec<TargetRef> {
    let mut out = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let at = if field.ends_with('s') {
            format!("{field}[{i}]")
        } else {
            field.to_owned()
        };
        let text = |k: &str| {
            r.get(k)
                .and_then(serde_yaml::Value::as_str)
                .unwrap_or_default()
        };
        let (kind, name) = (text("kind"), text("name"));
        if kind.is_empty() || name.is_empty() {
            problems.push((at, "kind and name are required".into()));
            continue;
        }
        let ns = text("namespace");
        if !ns.is_empty() && ns != namespace {
            problems.push((
                format!("{at}.namespace"),
                "must be the policy's own namespace (cross-namespace references are not allowed)"
                    .into(),
            ));
            continue;
        }
        out.push(TargetRef {
            group: text("group").to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        });
    }
    out
}
