//! Lowering of a rule's `when` conditions: one clause per L4 condition;
//! the L7 keys Istio knows are listed, unknown keys rejected.

use crate::model::{Condition, Scalar};
use crate::rule::{HeaderCond, Match, StrMatch};

use super::layer::Unchecked;
use super::values::{Problems, Warnings, cidrs, non_empty, patterns, ports, service_accounts};

/// Lowers `when` (of the rule at `path`): one single-match clause per L4
/// condition, appended to `clauses`. L7 conditions are added to `l7`.
pub(super) fn compile_when(
    when: &[Option<Condition>],
    path: &str,
    policy_namespace: &str,
    problems: &mut Problems,
    warnings: &mut Warnings,
    l7: &mut Unchecked,
    clauses: &mut Vec<Vec<Match>>,
) {
    for (j, cond) in when.iter().enumerate() {
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
        if let Some(m) = compile_l4_condition(cond, key, &p, policy_namespace, problems, warnings) {
            clauses.push(vec![m]);
            continue;
        }
        match l7_key(key) {
            Ok(()) => {
                let (vp, np) = (format!("{p}.values"), format!("{p}.notValues"));
                non_empty(&vp, cond.values.iter().map(Scalar::as_str), problems);
                non_empty(&np, cond.not_values.iter().map(Scalar::as_str), problems);
                if l7.http()
                    && let Some(m) = waypoint_condition(cond, key, &p, problems, warnings)
                {
                    clauses.push(vec![m]);
                    continue;
                }
                l7.push(format!("{p} (key {key})"));
            }
            Err(msg) => problems.push((format!("{p}.key"), msg)),
        }
    }
}

/// Lowers a condition (at `p`) whose `key` is an L4 attribute; `None` when
/// it is not one.
fn compile_l4_condition(
    cond: &Condition,
    key: &str,
    p: &str,
    policy_namespace: &str,
    problems: &mut Problems,
    warnings: &mut Warnings,
) -> Option<Match> {
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
        _ => return None,
    }
    Some(m)
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

/// Lowers an HTTP condition at a waypoint (at `p`): `request.headers[name]`
/// into a header matcher; `request.auth.*` into a condition on the
/// request principal a request never has (no RequestAuthentication), as
/// Istio evaluates them without a JWT. `None`: a key the waypoint cannot
/// check (`connection.sni`, claims-free experimental keys, inline headers).
fn waypoint_condition(
    cond: &Condition,
    key: &str,
    p: &str,
    problems: &mut Problems,
    warnings: &mut Warnings,
) -> Option<Match> {
    let strs = |v: &[Scalar]| v.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
    let mut m = Match::default();
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        m.headers.push(HeaderCond {
            name: name.to_ascii_lowercase().into(),
            values: patterns(&format!("{p}.values"), &strs(&cond.values), false, problems),
            not_values: patterns(
                &format!("{p}.notValues"),
                &strs(&cond.not_values),
                false,
                problems,
            ),
        });
        return Some(m);
    }
    if key.starts_with("request.auth.") {
        if !cond.values.is_empty() {
            m.request_principals.push(StrMatch::Presence);
        }
        if !cond.not_values.is_empty() {
            m.not_request_principals.push(StrMatch::Presence);
        }
        warnings.push((
            format!("{p} (key {key})"),
            "no RequestAuthentication: never authenticated (JWT is not supported, a request has \
             no token, as in Istio for a request without one): values never match and notValues \
             always do"
                .into(),
        ));
        return Some(m);
    }
    None
}
