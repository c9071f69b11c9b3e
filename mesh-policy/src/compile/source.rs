//! Lowering of a rule's `from` entries (`source`) into [`Match`]es.

use crate::model::{From, Source};
use crate::rule::Match;

use super::layer::Unchecked;
use super::values::{Problems, Warnings, cidrs, non_empty, patterns, service_accounts};

/// Lowers `from` (of the rule at `path`, e.g. `spec.rules[0]`): one clause
/// whose matches are ORed. L7-only fields are added to `l7`.
pub(super) fn compile_from(
    from: &[Option<From>],
    path: &str,
    policy_namespace: &str,
    problems: &mut Problems,
    warnings: &mut Warnings,
    l7: &mut Unchecked,
) -> Vec<Match> {
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
        clause.push(compile_source(
            source,
            &p,
            policy_namespace,
            problems,
            warnings,
            l7,
        ));
    }
    clause
}

/// Lowers one `source` (at `p`): its fields ANDed.
fn compile_source(
    source: &Source,
    p: &str,
    policy_namespace: &str,
    problems: &mut Problems,
    warnings: &mut Warnings,
    l7: &mut Unchecked,
) -> Match {
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
    for (name, values, negative) in [
        ("requestPrincipals", &source.request_principals, false),
        ("notRequestPrincipals", &source.not_request_principals, true),
    ] {
        if let Some(f) = list(name, values) {
            non_empty(&f, values.iter().map(String::as_str), problems);
            if l7.http() {
                // No RequestAuthentication (JWT): a request never has a
                // request principal, as in Istio for a request without a
                // token.
                let compiled = patterns(&f, values, false, problems);
                if negative {
                    m.not_request_principals = compiled;
                } else {
                    m.request_principals = compiled;
                }
                warnings.push((
                    f,
                    "no RequestAuthentication: never authenticated (JWT is not supported, requests \
                     carry no request principal, as in Istio for a request without a token): \
                     requestPrincipals never match and notRequestPrincipals always do"
                        .into(),
                ));
            } else {
                l7.push(f);
            }
        }
    }
    if !any {
        problems.push((p.to_owned(), "must not be empty".into()));
    }
    let sa = !source.service_accounts.is_empty() || !source.not_service_accounts.is_empty();
    let pn = !source.principals.is_empty()
        || !source.not_principals.is_empty()
        || !source.namespaces.is_empty()
        || !source.not_namespaces.is_empty();
    if sa && pn {
        problems.push((
            p.to_owned(),
            "serviceAccounts cannot be set together with principals or namespaces".into(),
        ));
    }
    m
}
