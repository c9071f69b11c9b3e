//! What the admin surfaces know of the workload certificates: identity,
//! serial and validity, never keys. The identity code plugs a
//! [`CertificateSource`] into the shared [`Certificates`]; `/config_dump`,
//! `mesh-agent certs` and the `mesh_certificate*` metrics read through it.

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::SystemTime,
};

pub use crate::telemetry::unix;

/// One certificate the agent holds (public parts only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The SPIFFE ID it certifies.
    pub identity: String,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Certificates in the chain served with it (leaf included).
    pub chain_len: usize,
}

impl CertificateInfo {
    /// Seconds from `now` until expiry (negative once expired).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        unix(self.not_after) - unix(now)
    }

    /// The JSON of `/config_dump` (times as RFC 3339 UTC and Unix seconds).
    pub fn to_json(&self, now: SystemTime) -> serde_json::Value {
        serde_json::json!({
            "identity": self.identity,
            "serial": self.serial,
            "not_before": rfc3339(self.not_before),
            "not_after": rfc3339(self.not_after),
            "not_after_unix": unix(self.not_after),
            "expires_in_seconds": self.expires_in(now),
            "chain_len": self.chain_len,
        })
    }
}

/// Anything that can list the certificates it holds (the identity code's
/// certificate manager implements this).
pub trait CertificateSource: Send + Sync + 'static {
    /// The certificates held now.
    fn certificates(&self) -> Vec<CertificateInfo>;

    /// The validity of the CA the certificates are signed with, if known.
    fn ca(&self) -> Option<crate::identity::CaValidity> {
        None
    }

    /// Who issues the certificates, with issuance counts.
    fn issuer(&self) -> Option<IssuerStatus> {
        None
    }
}

/// The issuer and its record since start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerStatus {
    /// Kind and address.
    pub info: crate::identity::IssuerInfo,
    /// Issuances and failures.
    pub counts: crate::identity::IssueCounts,
}

impl IssuerStatus {
    /// The JSON of `/config_dump`'s `issuer`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.info.kind,
            "endpoint": self.info.endpoint,
            "issued": self.counts.issued,
            "failed": self.counts.failed,
            "last_failure": self.counts.last_failure.as_ref().map(|f| serde_json::json!({
                "identity": f.identity.to_string(),
                "error": f.error,
                "at": rfc3339(f.at),
            })),
        })
    }
}

/// The shared view of the agent's certificates: empty until a source is set.
#[derive(Clone, Default)]
pub struct Certificates {
    source: Arc<RwLock<Option<Arc<dyn CertificateSource>>>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

impl Certificates {
    /// Reads certificates from `source` from now on.
    pub fn set_source(&self, source: Arc<dyn CertificateSource>) {
        *self.source.write().unwrap_or_else(PoisonError::into_inner) = Some(source);
    }

    /// The certificates held now, sorted by identity.
    pub fn list(&self) -> Vec<CertificateInfo> {
        let source = self
            .source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out = source.map(|s| s.certificates()).unwrap_or_default();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The mesh CA's validity (none before a source is set, or when the
    /// source has no local CA).
    pub fn ca(&self) -> Option<crate::identity::CaValidity> {
        self.source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|s| s.ca())
    }

    /// The issuer (none before a source is set).
    pub fn issuer(&self) -> Option<IssuerStatus> {
        self.source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|s| s.issuer())
    }
}

/// The identity code's certificate manager: what it holds now, without
/// issuing or rotating anything.
impl CertificateSource for crate::identity::CertManager {
    fn certificates(&self) -> Vec<CertificateInfo> {
        self.identities()
            .iter()
            .filter_map(|id| self.current(id))
            .map(|c| CertificateInfo {
                identity: c.identity().to_string(),
                serial: c.serial_hex(),
                not_before: c.not_before(),
                not_after: c.not_after(),
                chain_len: c.chain().len(),
            })
            .collect()
    }

    fn ca(&self) -> Option<crate::identity::CaValidity> {
        self.ca_validity()
    }

    fn issuer(&self) -> Option<IssuerStatus> {
        Some(IssuerStatus {
            info: crate::identity::CertManager::issuer(self),
            counts: self.issue_counts(),
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix(t);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    struct Fixed(Vec<CertificateInfo>);
    impl CertificateSource for Fixed {
        fn certificates(&self) -> Vec<CertificateInfo> {
            self.0.clone()
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn list_is_sorted_and_empty_without_source() {
        let certs = Certificates::default();
        assert!(certs.list().is_empty());
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let info = |id: &str| CertificateInfo {
            identity: id.into(),
            serial: "01".into(),
            not_before: at(0),
            not_after: at(3600),
            chain_len: 2,
        };
        certs.set_source(Arc::new(Fixed(vec![
            info("spiffe://b"),
            info("spiffe://a"),
        ])));
        let ids: Vec<_> = certs.list().into_iter().map(|c| c.identity).collect();
        assert_eq!(ids, ["spiffe://a", "spiffe://b"]);
        assert_eq!(info("x").expires_in(at(600)), 3000);
        let json = info("x").to_json(at(600));
        assert_eq!(json["not_after"], "1970-01-01T01:00:00Z");
        assert_eq!(json["expires_in_seconds"], 3000);
    }
}
