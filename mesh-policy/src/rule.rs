//! The compiled (lowered) policies and their matching against a
//! connection.
//!
//! A rule becomes a list of *clauses* that are ANDed (`from`, `to`, and one
//! per `when` condition); a clause is a list of [`Match`]es that are ORed
//! (the entries of `from`/`to`); a [`Match`] ANDs its fields, ORs the values
//! of a field, and requires none of the `not*` values. A [`Match`] with no
//! field matches everything: that is what is left of a DENY entry whose
//! fields were all L7 (Istio's "enforced without the HTTP rules").

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::connection::{Connection, HttpRequest};
use crate::error::PolicyName;

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
    // L7, compiled for a waypoint only (empty at L4).
    /// Case-sensitive patterns (Istio's header matcher on `:method`).
    pub methods: Vec<StrMatch>,
    pub not_methods: Vec<StrMatch>,
    pub paths: Vec<PathMatch>,
    pub not_paths: Vec<PathMatch>,
    /// Lowercase patterns, matched case-insensitively.
    pub hosts: Vec<StrMatch>,
    pub not_hosts: Vec<StrMatch>,
    pub headers: Vec<HeaderCond>,
    /// Matched against no request principal: there is no
    /// RequestAuthentication (JWT) support, so positive patterns never
    /// match and negative ones always do.
    pub request_principals: Vec<StrMatch>,
    pub not_request_principals: Vec<StrMatch>,
}

/// A `when: request.headers[name]` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderCond {
    /// Lowercase.
    pub name: Box<str>,
    pub values: Vec<StrMatch>,
    pub not_values: Vec<StrMatch>,
}

impl HeaderCond {
    fn matches(&self, request: Option<&HttpRequest<'_>>) -> bool {
        let value = request.and_then(|r| r.header(&self.name));
        check(&self.values, &self.not_values, |m| {
            m.matches(value.as_deref())
        })
    }
}

/// An Istio `paths` pattern, matched against the normalised path without
/// its query: exact, `prefix*`, `*suffix`, `*` (any), or a template (a
/// value with `{*}` or `{**}`, Envoy's URI template): segments that are
/// literal text, `{*}` (one non-empty segment) or `{**}` (anything,
/// slashes included, possibly nothing; the last operator, literal
/// segments may follow it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    Str(StrMatch),
    Template(Vec<Segment>),
}

/// A segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(Box<str>),
    One,
    Rest,
}

impl PathMatch {
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(Some(path)),
            PathMatch::Template(segments) => {
                let Some(path) = path.strip_prefix('/') else {
                    return false;
                };
                let parts: Vec<&str> = path.split('/').collect();
                template_matches(segments, &parts)
            }
        }
    }
}

/// `segments` against the path's `parts` (split on `/`). `{**}` takes
/// the parts its trailing literals leave, at least one (the `/` before
/// it is literal): `/a/{**}` needs `/a/`, and `{**}/` a trailing slash.
fn template_matches(segments: &[Segment], parts: &[&str]) -> bool {
    let mut i = 0;
    for (k, seg) in segments.iter().enumerate() {
        match seg {
            Segment::Rest => {
                let tail = &segments[k + 1..];
                let Some(first_tail) = parts.len().checked_sub(tail.len()) else {
                    return false;
                };
                return first_tail > i
                    && tail.iter().zip(&parts[first_tail..]).all(|(t, p)| match t {
                        Segment::Literal(l) => **l == **p,
                        // Compiled templates have one `{**}`, last of the operators.
                        Segment::One | Segment::Rest => false,
                    });
            }
            Segment::One => {
                if parts.get(i).is_none_or(|p| p.is_empty()) {
                    return false;
                }
            }
            Segment::Literal(l) => {
                if parts.get(i) != Some(&&**l) {
                    return false;
                }
            }
        }
        i += 1;
    }
    i == parts.len()
}

/// `host` (the authority as sent, lowercased) against a lowercase
/// pattern. Like Istio's (Envoy's `:authority` header matcher), the port
/// is part of the value: `hosts: [example.com]` does not match
/// `example.com:8080`; Istio's documentation has users write
/// `[example.com, "example.com:*"]`.
fn host_matches(m: &StrMatch, host: &str) -> bool {
    m.matches(Some(host))
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

/// A `targetRef` of a waypoint policy (the policy's namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
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

/// Evaluation context: the connection, normalized once.
pub(crate) struct Ctx<'a> {
    /// The peer principal without `spiffe://`; `None` for plaintext.
    pub principal: Option<&'a str>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    source_ip: IpAddr,
    remote_ip: IpAddr,
    destination_ip: IpAddr,
    port: u16,
    /// The HTTP request at a waypoint; `None` at L4.
    request: Option<&'a HttpRequest<'a>>,
}

impl<'a> Ctx<'a> {
    /// The context of `c` carrying an HTTP `request` (a waypoint).
    pub(crate) fn with_request(c: &Connection<'a>, request: Option<&'a HttpRequest<'a>>) -> Self {
        Ctx {
            request,
            ..Self::new(c)
        }
    }

    pub(crate) fn new(c: &Connection<'a>) -> Self {
        let principal = c
            .source_principal
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
            .filter(|p| !p.is_empty());
        let (namespace, service_account) = principal.and_then(ns_sa).unzip();
        let source_ip = c.source_ip.to_canonical();
        Ctx {
            principal,
            namespace,
            service_account,
            source_ip,
            remote_ip: c.remote_ip.map_or(source_ip, |ip| ip.to_canonical()),
            destination_ip: c.destination_ip.to_canonical(),
            port: c.destination_port,
            request: None,
        }
    }
}

/// `td/ns/<ns>/sa/<sa>` -> `(ns, sa)`.
fn ns_sa(principal: &str) -> Option<(&str, &str)> {
    let mut it = principal.split('/');
    let (_td, ns_kw, ns, sa_kw, sa) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    (it.next().is_none() && ns_kw == "ns" && sa_kw == "sa" && !ns.is_empty() && !sa.is_empty())
        .then_some((ns, sa))
}

fn check<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&f)) && !neg.iter().any(&f)
}

impl Match {
    fn matches(&self, c: &Ctx<'_>) -> bool {
        let ip = |ip: IpAddr| move |n: &IpNet| n.contains(&ip);
        let sa = |(ns, sa): &(Box<str>, Box<str>)| {
            c.namespace == Some(&**ns) && c.service_account == Some(&**sa)
        };
        check(&self.ports, &self.not_ports, |p| *p == c.port)
            && check(&self.principals, &self.not_principals, |m| {
                m.matches(c.principal)
            })
            && check(&self.namespaces, &self.not_namespaces, |m| {
                m.matches(c.namespace)
            })
            && check(&self.service_accounts, &self.not_service_accounts, sa)
            && check(&self.source_ips, &self.not_source_ips, ip(c.source_ip))
            && check(&self.remote_ips, &self.not_remote_ips, ip(c.remote_ip))
            && check(
                &self.destination_ips,
                &self.not_destination_ips,
                ip(c.destination_ip),
            )
            && self.l7_matches(c.request)
    }

    /// The L7 fields against `request` (all empty at L4: true). Without a
    /// request a positive L7 field never matches.
    fn l7_matches(&self, request: Option<&HttpRequest<'_>>) -> bool {
        check(&self.methods, &self.not_methods, |m| {
            request.is_some_and(|r| m.matches(Some(r.method)))
        }) && check(&self.paths, &self.not_paths, |p| {
            request.is_some_and(|r| p.matches(r.path))
        }) && check(&self.hosts, &self.not_hosts, |h| {
            request.is_some_and(|r| host_matches(h, &r.host.to_ascii_lowercase()))
        }) && self.headers.iter().all(|h| h.matches(request))
            && check(
                &self.request_principals,
                &self.not_request_principals,
                |m| m.matches(None),
            )
    }
}

impl CompiledRule {
    fn matches(&self, c: &Ctx<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches(c)))
    }
}

impl CompiledAuthz {
    /// Whether any of its rules matches the connection.
    pub(crate) fn matches(&self, c: &Ctx<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}
