//! Workload identity for the mesh's mutual TLS (HBONE).
//!
//! - [`SpiffeId`], `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`MeshCa`], the mesh CA loaded from PEM files (or created by
//!   `mesh-agent ca init`); [`LocalCa`] issues workload certificates with it.
//! - [`CertificateProvider`], the asynchronous issuer seam: [`LocalCa`] (the
//!   CA key in this process) and [`IstioCaIssuer`] (a CSR to a CA over Istio's
//!   certificate API: istiod, istio-csr, `mesh-agent ca serve`).
//! - [`CertManager`] keeps each local workload's current [`WorkloadCert`], issued
//!   on first use ([`CertManager::fetch`], awaited by the proxy before a
//!   handshake), rotated ahead of expiry with jitter, retried with backoff
//!   through issuer outages; keys stay in memory.
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
//! # let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(tls.manager().fetch(&me))?; // issue before the handshake
//! let them = SpiffeId::new(td, "default", "server")?;
//! let inbound = tls.server_config(&me); // for tokio_rustls::TlsAcceptor
//! let outbound = tls.client_config(&me, vec![them]); // for tokio_rustls::TlsConnector
//! # Ok(()) }
//! ```
//!
//! # Files (one job each; imports flow down this list, never back up)
//!
//! - `config.rs`: [`MeshTls`], the server and client configurations; uses
//!   `resolver.rs` (the certificate resolvers, over the [`CertManager`] of
//!   `manager.rs`) and `verify.rs` (the SPIFFE verifiers and the chain check).
//! - `issue.rs`: [`LocalCa`], workload certificates signed by the mesh CA.
//! - `istio_issuer.rs`: [`IstioCaIssuer`], workload certificates from a CA
//!   over Istio's API (key and CSR made here, the answer checked against the
//!   mesh root); uses `istio_ca/`.
//! - `ca/`: the mesh CA — `authority.rs` (the loaded CA, leaf signing and
//!   self-test), `load.rs` (PEM loading and checks), `generate.rs`
//!   (`ca init`), `validity.rs` (expiry), `error.rs`, `limits.rs`.
//! - `cert.rs`: the [`CertificateProvider`] seam and [`WorkloadCert`].
//! - `verify.rs` uses `peer.rs`: [`PeerCertError`], [`peer_identity`],
//!   [`describe_tls_error`] and the leaf parser.
//! - `istio_ca/`: Istio's certificate service: the generated protocol, the
//!   [`IstioCaClient`](istio_ca::IstioCaClient) and the CSR an agent sends.
//!   `ca/csr.rs` checks the CSRs [`MeshCa::sign_csr`] signs for `ca serve`.
//! - `issuer_config.rs`: the issuer flags ([`issuer_config::IssuerArgs`],
//!   shared by the agent and the waypoint) and the provider they build.
//! - Leaves: `provider.rs` ([`crypto_provider`]), `spiffe.rs`, `clock.rs`.
#![forbid(unsafe_code)]

mod ca;
mod cert;
mod clock;
mod config;
mod issue;
pub mod issuer_config;
pub mod istio_ca;
mod istio_issuer;
mod manager;
mod peer;
mod provider;
mod resolver;
mod spiffe;
mod verify;

#[cfg(test)]
mod tests;

pub use ca::{
    CA_CERT_FILE, CA_EXPIRY_WARNING, CA_KEY_FILE, CLOCK_SKEW, CaError, CaExpiry, CaValidity,
    DEFAULT_CA_DAYS, GeneratedCa, MAX_CA_DAYS, MAX_CSR_LEN, MIN_RSA_BITS, MeshCa, SignError,
    SignedCsr,
};
pub use cert::{
    CertificateProvider, IssueError, IssueFuture, IssuerInfo, IssuerKind, WorkloadCert,
};
pub use config::{ALPN_H2, MeshTls, TlsSetupError, server_name};
pub use issue::{DEFAULT_CERT_TTL, LocalCa};
pub use istio_issuer::IstioCaIssuer;
pub use manager::{CertManager, ISSUE_TIMEOUT, IssueCounts, IssueFailure};
pub use peer::{PeerCertError, describe_tls_error, peer_identity};
pub use provider::crypto_provider;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError, TrustDomain};

/// For `manager.rs` (as `super::fmt_time`) and the CA server's logs.
pub use clock::fmt_time;
