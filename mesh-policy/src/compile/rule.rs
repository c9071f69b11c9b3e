//! Lowering of one rule: its `from`, `to` and `when` clauses ANDed, and
//! what to do with the L7 parts the node agent cannot check.

use crate::model::Rule;
use crate::rule::{CompiledRule, Match};

use super::condition::compile_when;
use super::layer::{Layer, Unchecked};
use super::operation::compile_to;
use super::source::compile_from;
use super::values::{Problems, Warnings};

/// Rule evaluation mode: ALLOW/AUDIT rules must be fully checkable to
/// match; DENY (and CUSTOM) rules drop what they cannot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Grant,
    Deny,
}

/// Lowers the rule at `path` (e.g. `spec.rules[0]`); `None` when it can
/// never match (an ALLOW/AUDIT rule with L7 parts).
pub(super) fn compile_rule(
    rule: &Rule,
    path: &str,
    policy_namespace: &str,
    (mode, layer): (Mode, Layer),
    problems: &mut Problems,
    warnings: &mut Warnings,
) -> Option<CompiledRule> {
    let mut clauses = Vec::new();
    let mut l7 = Unchecked {
        layer,
        fields: Vec::new(),
    };
    if let Some(from) = &rule.from {
        clauses.push(compile_from(
            from,
            path,
            policy_namespace,
            problems,
            warnings,
            &mut l7,
        ));
    }
    if let Some(to) = &rule.to {
        clauses.push(compile_to(to, path, problems, &mut l7));
    }
    compile_when(
        rule.when.as_deref().unwrap_or_default(),
        path,
        policy_namespace,
        problems,
        warnings,
        &mut l7,
        &mut clauses,
    );
    with_l7(clauses, &l7, mode, warnings)
}

/// The rule left once its L7 parts (`l7`, field paths) are set aside: for
/// a grant, nothing; for a deny, its L4 clauses. Each case is warned about.
fn with_l7(
    clauses: Vec<Vec<Match>>,
    l7: &Unchecked,
    mode: Mode,
    warnings: &mut Warnings,
) -> Option<CompiledRule> {
    if l7.fields.is_empty() {
        return Some(CompiledRule { clauses });
    }
    let fields = l7.fields.join(", ");
    if l7.layer == Layer::Waypoint {
        return match mode {
            Mode::Grant => {
                warnings.push((
                    fields,
                    "not supported by the waypoint (JWT claims, SNI, experimental keys): this rule \
                     never matches (in an ALLOW policy it grants nothing)"
                        .into(),
                ));
                None
            }
            Mode::Deny => {
                warnings.push((
                    fields,
                    "not supported by the waypoint (JWT claims, SNI, experimental keys): the rule \
                     is enforced without them, which denies more than written"
                        .into(),
                ));
                Some(CompiledRule { clauses })
            }
        };
    }
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
