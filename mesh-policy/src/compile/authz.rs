//! Lowering of an AuthorizationPolicy: its dry-run annotation, action,
//! attachment (selector or targetRefs) and rules, and the fail-closed
//! stand-in of a rejected policy.

use std::collections::BTreeMap;

use crate::error::{PolicyError, PolicyName, PolicyWarning, RejectEffect, Report};
use crate::model::{AuthorizationPolicy, Kind};
use crate::rule::{CompiledAuthz, CompiledRule, Effect, Origin, Scope};

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

/// Lowers an AuthorizationPolicy; `None` when it has no effect at all.
pub(crate) fn compile_authz(
    ap: &AuthorizationPolicy,
    root_namespace: &str,
    report: &mut Report,
) -> Option<(Scope, CompiledAuthz)> {
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
    scope: Scope,
    report: &mut Report,
) -> Option<(Scope, CompiledAuthz)> {
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
