//! [`LocalCa`]: issues workload certificates with the mesh CA.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::CertificateDer;

use super::ca::{CLOCK_SKEW, MeshCa, validity::CaValidity};
use super::cert::{
    CertificateProvider, IssueError, IssueFuture, IssuerInfo, IssuerKind, WorkloadCert,
};
use super::clock::fmt_time;
use super::spiffe::{SpiffeId, TrustDomain};

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issues workload certificates with the mesh CA: URI SAN = the SPIFFE ID,
/// no subject, digitalSignature + keyEncipherment, serverAuth + clientAuth,
/// back-dated by [`CLOCK_SKEW`], a fresh ECDSA P-256 key each time (kept in
/// memory only), valid for the TTL (default [`DEFAULT_CERT_TTL`]) but never
/// past the CA's own expiry.
#[derive(Debug, Clone)]
pub struct LocalCa {
    ca: Arc<MeshCa>,
    trust_domain: TrustDomain,
    ttl: Duration,
}

impl LocalCa {
    /// Issues for identities of `trust_domain`, with the default TTL.
    pub fn new(ca: Arc<MeshCa>, trust_domain: TrustDomain) -> Self {
        Self {
            ca,
            trust_domain,
            ttl: DEFAULT_CERT_TTL,
        }
    }

    /// Sets the certificates' lifetime (whole seconds; at least one second).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// The certificates' lifetime.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The CA it signs with.
    pub fn ca(&self) -> &Arc<MeshCa> {
        &self.ca
    }

    /// Issues a certificate valid exactly between `not_before` and
    /// `not_after`, for any trust domain: for tests and tooling (an expired
    /// certificate, another trust domain). The agent uses
    /// [`issue`](CertificateProvider::issue).
    pub fn issue_valid_between(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IssueError> {
        self.ca.sign_leaf(id, not_before, not_after)
    }
}

impl LocalCa {
    /// Issues a certificate for `id` now (what [`CertificateProvider::issue`]
    /// does, without the future): a fresh key, signed in this process.
    pub fn issue_now(&self, id: &SpiffeId) -> Result<WorkloadCert, IssueError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IssueError::ForeignTrustDomain {
                id: id.clone(),
                ours: self.trust_domain.clone(),
            });
        }
        let now = SystemTime::now();
        let ca_not_after = self.ca.not_after();
        if now >= ca_not_after {
            return Err(IssueError::CaExpired {
                id: id.clone(),
                not_after: ca_not_after,
            });
        }
        // X.509 times have whole seconds: round the expiry up so that the
        // certificate lives at least the TTL, and cap it at the CA's expiry.
        let wanted = now.checked_add(self.ttl).map_or(ca_not_after, ceil_second);
        let not_after = wanted.min(ca_not_after);
        let not_before = (now - CLOCK_SKEW).max(self.ca.validity().not_before);
        if not_after < wanted {
            tracing::warn!(
                identity = %id,
                ca_not_after = %fmt_time(ca_not_after),
                "the mesh CA expires before the workload certificate would: install a new CA soon"
            );
        }
        self.ca.sign_leaf(id, not_before, not_after)
    }
}

impl CertificateProvider for LocalCa {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        // Pure computation (a P-256 key and one signature, well under a
        // millisecond): no need for another task.
        Box::pin(std::future::ready(self.issue_now(id)))
    }

    fn describe(&self) -> IssuerInfo {
        IssuerInfo {
            kind: IssuerKind::Local,
            endpoint: self.ca.subject().to_string(),
        }
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots().to_vec()
    }

    fn ca_validity(&self) -> Option<CaValidity> {
        Some(self.ca.validity())
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

fn ceil_second(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => {
            SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1)
        }
        _ => t,
    }
}
