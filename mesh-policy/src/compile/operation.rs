//! Lowering of a rule's `to` entries (`operation`) into [`Match`]es.

use crate::model::{Operation, To};
use crate::rule::Match;

use super::values::{Problems, non_empty, ports};

/// Lowers `to` (of the rule at `path`): one clause whose matches are ORed.
/// L7-only fields (hosts, methods, paths) are added to `l7`.
pub(super) fn compile_to(
    to: &[Option<To>],
    path: &str,
    problems: &mut Problems,
    l7: &mut Vec<String>,
) -> Vec<Match> {
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
        clause.push(compile_operation(op, &p, problems, l7));
    }
    clause
}

/// Lowers one `operation` (at `p`): its ports; the rest is L7.
fn compile_operation(
    op: &Operation,
    p: &str,
    problems: &mut Problems,
    l7: &mut Vec<String>,
) -> Match {
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
        problems.push((p.to_owned(), "must not be empty".into()));
    }
    m
}
