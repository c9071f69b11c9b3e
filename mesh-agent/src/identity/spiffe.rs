//! SPIFFE identities of Kubernetes workloads:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

/// The trust domain used when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// SPIFFE: a trust domain name is at most 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// SPIFFE: a SPIFFE ID is at most 2048 bytes.
const MAX_ID_LEN: usize = 2048;
/// Kubernetes: a namespace is a DNS-1123 label.
const MAX_NAMESPACE_LEN: usize = 63;
/// Kubernetes: a service account name is a DNS-1123 subdomain.
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;
/// How much of a rejected input an error message quotes (inputs may come from
/// a peer's certificate and end up in logs).
const QUOTE_LEN: usize = 256;

/// Why a string is not a valid SPIFFE workload identity (or trust domain).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\" (lowercase)")]
    NotSpiffe {
        /// The rejected input (shortened).
        input: String,
    },
    /// The whole ID is longer than SPIFFE allows.
    #[error("SPIFFE ID is {len} bytes long; SPIFFE allows at most {MAX_ID_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The trust domain is empty, too long or has characters SPIFFE forbids.
    #[error(
        "invalid trust domain {value:?}: {reason} (a trust domain is lowercase letters, digits, '.', '-' and '_', like \"cluster.local\")"
    )]
    TrustDomain {
        /// The rejected trust domain (shortened).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "{input:?} is not a workload identity: its path must be /ns/<namespace>/sa/<service-account>"
    )]
    Path {
        /// The rejected input (shortened).
        input: String,
    },
    /// The namespace is not a Kubernetes namespace name.
    #[error(
        "invalid namespace {value:?}: {reason} (a Kubernetes namespace is at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
    )]
    Namespace {
        /// The rejected namespace (shortened).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The service account is not a Kubernetes service account name.
    #[error(
        "invalid service account {value:?}: {reason} (a Kubernetes service account name is at most 253 lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)"
    )]
    ServiceAccount {
        /// The rejected service account (shortened).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A SPIFFE trust domain, such as `cluster.local`: lowercase letters, digits,
/// `.`, `-` and `_`, at most 255 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let bad = |reason| SpiffeIdError::TrustDomain {
            value: quote(name),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(bad("it is longer than 255 bytes"));
        }
        if !name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(bad("it has a character that is not allowed"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    /// `cluster.local`.
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The SPIFFE identity of a Kubernetes workload:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsing is strict: lowercase scheme and trust domain, exactly the
/// `/ns/<namespace>/sa/<service-account>` path, Kubernetes name rules for the
/// namespace (DNS-1123 label) and service account (DNS-1123 subdomain), no
/// query, fragment, port or user info.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// The identity of service account `service_account` in `namespace`.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_namespace(namespace)?;
        check_service_account(service_account)?;
        let id = Self {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let len = id.uri_len();
        if len > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len });
        }
        Ok(id)
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::NotSpiffe { input: quote(s) })?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        let trust_domain = TrustDomain::new(td)?;
        let bad_path = || SpiffeIdError::Path { input: quote(s) };
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad_path());
        };
        Self::new(trust_domain, ns, sa)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI form, `spiffe://…` (same as `to_string()`).
    pub fn to_uri(&self) -> String {
        self.to_string()
    }

    fn uri_len(&self) -> usize {
        SCHEME.len()
            + self.trust_domain.0.len()
            + "/ns/".len()
            + self.namespace.len()
            + "/sa/".len()
            + self.service_account.len()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn check_namespace(ns: &str) -> Result<(), SpiffeIdError> {
    dns_label(ns, MAX_NAMESPACE_LEN).map_err(|reason| SpiffeIdError::Namespace {
        value: quote(ns),
        reason,
    })
}

fn check_service_account(sa: &str) -> Result<(), SpiffeIdError> {
    let bad = |reason| SpiffeIdError::ServiceAccount {
        value: quote(sa),
        reason,
    };
    if sa.len() > MAX_SERVICE_ACCOUNT_LEN {
        return Err(bad("it is longer than 253 bytes"));
    }
    if sa.is_empty() {
        return Err(bad("it is empty"));
    }
    sa.split('.')
        .try_for_each(|label| dns_label(label, MAX_SERVICE_ACCOUNT_LEN))
        .map_err(bad)
}

/// A DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most `max` bytes.
fn dns_label(s: &str, max: usize) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err("it is empty (or has an empty part)");
    };
    if bytes.len() > max {
        return Err("it is too long");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err("it has a character that is not allowed");
    }
    if *first == b'-' || *last == b'-' {
        return Err("it starts or ends with '-'");
    }
    Ok(())
}

/// The input, cut to a length fit for an error message.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_LEN) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let s = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let id = SpiffeId::parse(s).unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.to_uri(), s);
        assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
        let built = SpiffeId::new(TrustDomain::default(), "default", "bookinfo-productpage");
        assert_eq!(built.unwrap(), id);
        // Dotted service accounts and odd trust domains are fine.
        let id = SpiffeId::parse("spiffe://td_1.example-x/ns/a1/sa/a.b-c.d").unwrap();
        assert_eq!(id.trust_domain().as_str(), "td_1.example-x");
        assert_eq!(id.service_account(), "a.b-c.d");
    }

    #[test]
    fn default_trust_domain_is_cluster_local() {
        assert_eq!(TrustDomain::default().as_str(), DEFAULT_TRUST_DOMAIN);
        assert_eq!(DEFAULT_TRUST_DOMAIN, "cluster.local");
    }

    #[test]
    fn rejects_malformed_ids() {
        use SpiffeIdError as E;
        type Case = (&'static str, fn(&E) -> bool);
        let cases: &[Case] = &[
            ("", |e| matches!(e, E::NotSpiffe { .. })),
            ("https://cluster.local/ns/a/sa/b", |e| {
                matches!(e, E::NotSpiffe { .. })
            }),
            ("SPIFFE://cluster.local/ns/a/sa/b", |e| {
                matches!(e, E::NotSpiffe { .. })
            }),
            ("spiffe:/cluster.local/ns/a/sa/b", |e| {
                matches!(e, E::NotSpiffe { .. })
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, E::TrustDomain { .. })
            }),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| {
                matches!(e, E::TrustDomain { .. })
            }),
            ("spiffe://cluster.local:443/ns/a/sa/b", |e| {
                matches!(e, E::TrustDomain { .. })
            }),
            ("spiffe://user@td/ns/a/sa/b", |e| {
                matches!(e, E::TrustDomain { .. })
            }),
            ("spiffe://cluster.local", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/ns/a", |e| {
                matches!(e, E::Path { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa", |e| {
                matches!(e, E::Path { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b/", |e| {
                matches!(e, E::Path { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b/c", |e| {
                matches!(e, E::Path { .. })
            }),
            ("spiffe://cluster.local/sa/b/ns/a", |e| {
                matches!(e, E::Path { .. })
            }),
            ("spiffe://cluster.local//ns/a/sa/b", |e| {
                matches!(e, E::Path { .. })
            }),
            ("spiffe://cluster.local/ns//sa/b", |e| {
                matches!(e, E::Namespace { .. })
            }),
            ("spiffe://cluster.local/ns/A/sa/b", |e| {
                matches!(e, E::Namespace { .. })
            }),
            ("spiffe://cluster.local/ns/-a/sa/b", |e| {
                matches!(e, E::Namespace { .. })
            }),
            ("spiffe://cluster.local/ns/a.b/sa/b", |e| {
                matches!(e, E::Namespace { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b#f", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b%41", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/a..b", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/.b", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b-", |e| {
                matches!(e, E::ServiceAccount { .. })
            }),
        ];
        for (input, check) in cases {
            let err = SpiffeId::parse(input).unwrap_err();
            assert!(check(&err), "{input:?}: unexpected {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn enforces_lengths() {
        let ns = "a".repeat(64);
        let e = SpiffeId::parse(&format!("spiffe://td/ns/{ns}/sa/b")).unwrap_err();
        assert!(matches!(e, SpiffeIdError::Namespace { .. }), "{e}");
        assert!(SpiffeId::parse(&format!("spiffe://td/ns/{}/sa/b", &ns[..63])).is_ok());
        let sa = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(sa.len(), 253);
        assert!(SpiffeId::parse(&format!("spiffe://td/ns/a/sa/{sa}")).is_ok());
        let e = SpiffeId::parse(&format!("spiffe://td/ns/a/sa/{sa}x")).unwrap_err();
        assert!(matches!(e, SpiffeIdError::ServiceAccount { .. }), "{e}");
        let td = "t".repeat(256);
        let e = TrustDomain::new(&td).unwrap_err();
        assert!(matches!(e, SpiffeIdError::TrustDomain { .. }), "{e}");
        let e = SpiffeId::parse(&format!("spiffe://td/ns/a/sa/{}", "b".repeat(3000))).unwrap_err();
        assert!(matches!(e, SpiffeIdError::TooLong { len: 3020 }), "{e}");
    }

    #[test]
    fn error_messages_quote_and_shorten_the_input() {
        let e = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b\n").unwrap_err();
        assert!(e.to_string().contains("\\n"), "{e}");
        let long = format!("x{}", "y".repeat(1000));
        let e = SpiffeId::parse(&long).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
    }
}
