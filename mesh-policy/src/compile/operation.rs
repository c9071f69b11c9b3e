//! Lowering of a rule's `to` entries (`operation`) into [`Match`]es.

use crate::model::{Operation, To};
use crate::rule::{Match, PathMatch, Segment};

use super::layer::Unchecked;
use super::values::{Problems, non_empty, patterns, ports};

/// Lowers `to` (of the rule at `path`): one clause whose matches are ORed.
/// L7-only fields (hosts, methods, paths) are added to `l7`.
pub(super) fn compile_to(
    to: &[Option<To>],
    path: &str,
    problems: &mut Problems,
    l7: &mut Unchecked,
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
    l7: &mut Unchecked,
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
            if !l7.http() {
                l7.push(f);
                continue;
            }
            match name {
                "hosts" | "notHosts" => {
                    let lower: Vec<String> =
                        values.iter().map(|v| v.to_ascii_lowercase()).collect();
                    let compiled = patterns(&f, &lower, false, problems);
                    if name == "hosts" {
                        m.hosts = compiled;
                    } else {
                        m.not_hosts = compiled;
                    }
                }
                "methods" | "notMethods" => {
                    // Istio's header matcher on `:method`: case-sensitive,
                    // with `*`, `prefix*` and `*suffix`.
                    let compiled = patterns(&f, values, false, problems);
                    if name == "methods" {
                        m.methods = compiled;
                    } else {
                        m.not_methods = compiled;
                    }
                }
                _ => {
                    let compiled = path_patterns(&f, values, problems);
                    if name == "paths" {
                        m.paths = compiled;
                    } else {
                        m.not_paths = compiled;
                    }
                }
            }
        }
    }
    if !any {
        problems.push((p.to_owned(), "must not be empty".into()));
    }
    m
}

/// Parses `paths` values as Istio does: a value with `{*}` or `{**}` is a
/// path template (Envoy's URI template; `*`, `{` and `}` are allowed only
/// as those operators, each alone in its segment, `{**}` the last
/// operator); any other value is exact, `prefix*`, `*suffix` or `*`.
fn path_patterns(field: &str, values: &[String], problems: &mut Problems) -> Vec<PathMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if v.contains("{*}") || v.contains("{**}") {
            match template(v) {
                Ok(t) => out.push(PathMatch::Template(t)),
                Err(msg) => problems.push((format!("{field}[{i}]"), msg)),
            }
            continue;
        }
        let mut p = Vec::new();
        for m in patterns(
            &format!("{field}[{i}]"),
            std::slice::from_ref(v),
            false,
            &mut p,
        ) {
            out.push(PathMatch::Str(m));
        }
        problems.append(&mut p);
    }
    out
}

fn template(v: &str) -> Result<Vec<Segment>, String> {
    let bad = |why: &str| Err(format!("invalid or unsupported path template {v:?}: {why}"));
    let Some(rest) = v.strip_prefix('/') else {
        return bad("must start with /");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    let mut after_rest = false;
    for part in parts {
        let seg = match part {
            "{*}" => Segment::One,
            "{**}" => Segment::Rest,
            p if p.contains(['{', '}', '*']) => {
                return bad(
                    "*, { and } are allowed only as the operators {*} and {**}, alone in their segment",
                );
            }
            p => Segment::Literal(p.into()),
        };
        if after_rest && seg != Segment::Literal(part.into()) {
            return bad("{**} must be the last operator");
        }
        after_rest |= seg == Segment::Rest;
        out.push(seg);
    }
    Ok(out)
}
