//! Parsers of written field values (selectors, principal and namespace
//! patterns, service accounts, CIDRs, ports), each reporting its problems
//! with the field path; and the report of a rejected policy's problems.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

use crate::error::{PolicyError, PolicyName, RejectEffect, Report};
use crate::model::{Kind, Scalar, WorkloadSelector};
use crate::rule::StrMatch;

/// Errors found in one policy: `(field path, message)`.
pub(super) type Problems = Vec<(String, String)>;

/// Reports each problem of a rejected policy, with the effect its
/// rejection has.
pub(super) fn report_rejected(
    report: &mut Report,
    kind: Kind,
    name: &PolicyName,
    problems: Problems,
    effect: RejectEffect,
) {
    for (field, message) in problems {
        report.errors.push(PolicyError::Rejected {
            kind,
            policy: name.clone(),
            field,
            message,
            effect,
        });
    }
}

/// Warnings found in one policy: `(field path, message)`.
pub(super) type Warnings = Vec<(String, String)>;

/// `Some(labels)` (possibly empty: no selector) when valid.
pub(super) fn compile_selector(
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

pub(super) fn non_empty<'a>(
    field: &str,
    values: impl Iterator<Item = &'a str>,
    problems: &mut Problems,
) {
    for (i, v) in values.enumerate() {
        if v.is_empty() {
            problems.push((format!("{field}[{i}]"), "empty value".into()));
        }
    }
}

/// Parses principal or namespace patterns.
pub(super) fn patterns(
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

fn pattern(v: &str, principal: bool) -> Result<StrMatch, String> {
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
/// `Ctx` in `crate::rule`).
pub(super) fn service_accounts(
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
pub(super) fn cidrs(
    field: &str,
    values: &[String],
    problems: &mut Problems,
    warnings: &mut Warnings,
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
fn cidr(v: &str) -> Result<IpNet, String> {
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
pub(super) fn ports(field: &str, values: &[Scalar], problems: &mut Problems) -> Vec<u16> {
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
fn port_number(v: &str) -> Option<u16> {
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
pub(super) fn port(v: &str) -> Option<u16> {
    port_number(v).filter(|p| *p != 0)
}
