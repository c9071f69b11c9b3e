//! Workload identity for the mesh's mutual TLS (HBONE).
//!
//! - [`SpiffeId`], `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`MeshCa`], the mesh CA loaded from PEM files (or created by
//!   `mesh-agent ca init`); [`LocalCa`] issues workload certificates with it.
//! - [`CertificateProvider`], the seam for other issuers (Istio's CA, SPIRE).
//! - [`CertManager`] keeps each local workload's current [`WorkloadCert`], issued
//!   on first use and rotated at half-life; keys stay in memory.
//! - [`MeshTls`] builds rustls server and client configurations (TLS 1.3, AES-GCM,
//!   ALPN `h2`) that present the workload's certificate and verify the peer:
//!   chain to the mesh root, SPIFFE ID in the trust domain, and on the client
//!   side one of the identities expected for the destination.
//!   [`peer_identity`] reads the verified peer's identity after a handshake.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use mesh_agent::identity::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let td = TrustDomain::default();
//! let ca = Arc::new(MeshCa::load_dir("/etc/mesh/ca".as_ref())?);
//! let manager = Arc::new(CertManager::new(Arc::new(LocalCa::new(ca, td.clone()))));
//! let tls = MeshTls::new(manager)?;
//! let me = SpiffeId::new(td.clone(), "default", "client")?;
//! let them = SpiffeId::new(td, "default", "server")?;
//! let inbound = tls.server_config(&me); // for tokio_rustls::TlsAcceptor
//! let outbound = tls.client_config(&me, vec![them]); // for tokio_rustls::TlsConnector
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod ca;
mod cert;
mod manager;
mod spiffe;
mod tls;

#[cfg(test)]
mod tests;

pub use ca::{
    CA_CERT_FILE, CA_EXPIRY_WARNING, CA_KEY_FILE, CLOCK_SKEW, CaError, CaExpiry, CaValidity,
    DEFAULT_CA_DAYS, DEFAULT_CERT_TTL, GeneratedCa, LocalCa, MAX_CA_DAYS, MeshCa,
};
pub use cert::{CertificateProvider, IssueError, WorkloadCert};
pub use manager::CertManager;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{
    ALPN_H2, MeshTls, PeerCertError, TlsSetupError, crypto_provider, describe_tls_error,
    peer_identity, server_name,
};

/// Seconds since the Unix epoch (negative: before it) as a `SystemTime`.
fn unix_to_system(secs: i64) -> std::time::SystemTime {
    use std::time::{Duration, SystemTime};
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

/// A time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for messages and logs.
fn fmt_time(t: std::time::SystemTime) -> String {
    let secs = match t.duration_since(std::time::SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} s after 1970"),
    }
}
