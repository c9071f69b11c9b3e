//! The peer side of a handshake, in words: why a peer's certificate was
//! refused ([`PeerCertError`]), what a failed handshake means
//! ([`describe_tls_error`]), and the identity a leaf certificate carries
//! ([`peer_identity`], [`parse_leaf`]).

use std::{fmt, io, sync::Arc, time::SystemTime};

use rustls::{
    AlertDescription, CertificateError, OtherError,
    pki_types::{CertificateDer, UnixTime},
};
use x509_parser::{
    extensions::GeneralName,
    prelude::{FromDer, X509Certificate},
};

use super::clock::{fmt_time, unix_to_system};
use super::spiffe::{SpiffeId, TrustDomain};

/// Why a peer's certificate was refused, in words for the log. Our verifiers
/// return these inside `rustls::Error`; [`PeerCertError::from_rustls`] gets
/// them back out (with the chain and time errors rustls itself reports).
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    /// The chain does not lead to the mesh root.
    #[error(
        "the peer's certificate is not signed by the mesh root: it comes from another CA (perhaps one of the same name), or its chain is incomplete"
    )]
    UnknownIssuer,
    /// The peer's certificate has expired.
    #[error("the peer's certificate has expired{}", expired_detail(*not_after, *now))]
    Expired {
        /// When it expired, if known.
        not_after: Option<SystemTime>,
        /// When it was checked, if known.
        now: Option<SystemTime>,
    },
    /// The peer's certificate is not valid yet.
    #[error(
        "the peer's certificate is not valid yet{} (is one of the clocks wrong?)",
        not_before.map(|t| format!(": not before {}", fmt_time(t))).unwrap_or_default()
    )]
    NotYetValid {
        /// When it becomes valid, if known.
        not_before: Option<SystemTime>,
    },
    /// The peer sent no certificate.
    #[error("the peer presented no certificate; the mesh requires mutual TLS")]
    NoCertificate,
    /// The certificate carries no (single, valid) SPIFFE ID.
    #[error("the peer's certificate has no SPIFFE workload identity: {reason}")]
    NotSpiffe {
        /// What is wrong.
        reason: String,
    },
    /// The SPIFFE ID is in a trust domain we do not trust.
    #[error(
        "the peer's identity {id} is in trust domain \"{}\", but this mesh is \"{ours}\"",
        id.trust_domain()
    )]
    ForeignTrustDomain {
        /// The peer's identity.
        id: SpiffeId,
        /// Our trust domain.
        ours: TrustDomain,
    },
    /// The server is not one of the identities the destination runs as.
    #[error(
        "the server's identity {id} is not one expected for this destination (expected {})",
        list(expected)
    )]
    UnexpectedIdentity {
        /// The server's identity.
        id: SpiffeId,
        /// Who it should have been.
        expected: Vec<SpiffeId>,
    },
    /// Any other defect of the certificate.
    #[error("the peer's certificate is invalid: {detail}")]
    Invalid {
        /// What is wrong.
        detail: String,
    },
}

// Debug shows the message: rustls prints a custom certificate error with
// `{:?}`, and these end up in logs.
impl fmt::Debug for PeerCertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PeerCertError {
    /// The reason a handshake refused the peer's certificate, if that is what
    /// `err` says (from our verifiers or rustls' chain checks).
    pub fn from_rustls(err: &rustls::Error) -> Option<Self> {
        let rustls::Error::InvalidCertificate(cert_err) = err else {
            return match err {
                rustls::Error::NoCertificatesPresented => Some(Self::NoCertificate),
                _ => None,
            };
        };
        Some(match cert_err {
            CertificateError::UnknownIssuer => Self::UnknownIssuer,
            CertificateError::Expired => Self::Expired {
                not_after: None,
                now: None,
            },
            CertificateError::ExpiredContext { time, not_after } => Self::Expired {
                not_after: Some(unix_time(*not_after)),
                now: Some(unix_time(*time)),
            },
            CertificateError::NotValidYet => Self::NotYetValid { not_before: None },
            CertificateError::NotValidYetContext { not_before, .. } => Self::NotYetValid {
                not_before: Some(unix_time(*not_before)),
            },
            CertificateError::Other(OtherError(inner)) => {
                match inner.downcast_ref::<PeerCertError>() {
                    Some(ours) => ours.clone(),
                    None => Self::Invalid {
                        detail: inner.to_string(),
                    },
                }
            }
            other => Self::Invalid {
                detail: other.to_string(),
            },
        })
    }

    pub(super) fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// A failed TLS handshake (or TLS read/write) in words for the log: why we
/// refused the peer, or what the peer's alert says it refused, or the
/// incompatibility. Falls back to the error's own text.
pub fn describe_tls_error(err: &io::Error) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return err.to_string();
    };
    if let Some(reason) = PeerCertError::from_rustls(tls) {
        return format!("refused the peer: {reason}");
    }
    match tls {
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::UnknownCA => {
                    "our certificate is not signed by a root it trusts (different mesh CA?)"
                }
                AlertDescription::CertificateExpired => {
                    "it considers our certificate expired or not yet valid (clock skew?)"
                }
                AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied => {
                    "it refused our certificate (wrong trust domain or identity? see its log)"
                }
                AlertDescription::CertificateRequired => "we presented no client certificate",
                AlertDescription::ProtocolVersion
                | AlertDescription::HandshakeFailure
                | AlertDescription::InsufficientSecurity => {
                    "no common TLS version or cipher suite (the mesh needs TLS 1.3 with AES-GCM)"
                }
                AlertDescription::NoApplicationProtocol => {
                    "no common ALPN protocol (the mesh needs h2)"
                }
                _ => "see its log",
            };
            format!("the peer refused the handshake ({alert:?}): {why}")
        }
        rustls::Error::PeerIncompatible(what) => format!(
            "the peer's TLS is incompatible (the mesh needs TLS 1.3, AES-GCM, ALPN h2): {what:?}"
        ),
        rustls::Error::NoApplicationProtocol => {
            "the peer does not speak ALPN h2, which the mesh needs".into()
        }
        rustls::Error::InvalidMessage(what) => {
            format!("the peer does not speak TLS (or sent a corrupt record): {what:?}")
        }
        other => other.to_string(),
    }
}

/// The SPIFFE ID of the peer of an established connection, from its
/// certificates (leaf first), as `peer_certificates()` gives them:
/// `tls_stream.get_ref().1.peer_certificates()` for a tokio-rustls stream.
///
/// The handshake already verified the chain and the identity rules (trust
/// domain, expected identities); this only reads the identity back.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, PeerCertError> {
    let leaf = certs.first().ok_or(PeerCertError::NoCertificate)?;
    parse_leaf(leaf)?.identity
}

/// What the mesh reads from a leaf certificate.
pub(super) struct LeafInfo {
    /// Its single SPIFFE ID, or why it has none.
    pub identity: Result<SpiffeId, PeerCertError>,
    pub serial: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Parses a leaf certificate: validity, serial, and the SPIFFE ID, which must
/// be its one and only URI subjectAltName.
pub(super) fn parse_leaf(der: &CertificateDer<'_>) -> Result<LeafInfo, PeerCertError> {
    let (_, x509) = X509Certificate::from_der(der).map_err(|e| PeerCertError::Invalid {
        detail: format!("it is not valid X.509: {e}"),
    })?;
    let v = x509.validity();
    Ok(LeafInfo {
        identity: spiffe_id_of(&x509),
        serial: x509.tbs_certificate.raw_serial().to_vec(),
        not_before: unix_to_system(v.not_before.timestamp()),
        not_after: unix_to_system(v.not_after.timestamp()),
    })
}

fn spiffe_id_of(x509: &X509Certificate<'_>) -> Result<SpiffeId, PeerCertError> {
    let not_spiffe = |reason: String| PeerCertError::NotSpiffe { reason };
    let san = x509
        .subject_alternative_name()
        .map_err(|e| not_spiffe(format!("its subjectAltName is malformed: {e}")))?
        .ok_or_else(|| not_spiffe("it has no subjectAltName extension".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (None, _) => Err(not_spiffe("it has no URI subjectAltName".into())),
        (Some(_), Some(_)) => Err(not_spiffe(format!(
            "it has {} URI subjectAltNames; a SPIFFE certificate has exactly one",
            2 + uris.count()
        ))),
        (Some(uri), None) => SpiffeId::parse(uri).map_err(|e| not_spiffe(e.to_string())),
    }
}

fn unix_time(t: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs())
}

fn expired_detail(not_after: Option<SystemTime>, now: Option<SystemTime>) -> String {
    match (not_after, now) {
        (Some(not_after), Some(now)) => format!(
            " at {} ({} s before the check)",
            fmt_time(not_after),
            now.duration_since(not_after).unwrap_or_default().as_secs()
        ),
        (Some(not_after), None) => format!(" at {}", fmt_time(not_after)),
        _ => String::new(),
    }
}

fn list(ids: &[SpiffeId]) -> String {
    if ids.is_empty() {
        return "none: no identity is known for it".into();
    }
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}
