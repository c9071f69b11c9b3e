//! [`IstioCaIssuer`]: workload certificates from a CA reached over Istio's
//! certificate API (`istio.v1.auth.IstioCertificateService`): istiod,
//! cert-manager's istio-csr, or `mesh-agent ca serve`. The key is made here
//! and never leaves the process; the CA sees a CSR and decides, from the
//! agent's ServiceAccount token and the Kubernetes API, whether the
//! identity belongs to a pod on this node.

use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};

use super::ca::validity::CaValidity;
use super::cert::{
    CertificateProvider, IssueError, IssueFuture, IssuerInfo, IssuerKind, WorkloadCert,
};
use super::istio_ca::{IstioCaClient, generate_csr, pem_chain_to_der};
use super::spiffe::{SpiffeId, TrustDomain};
use super::verify::verify_chain;

/// Issues through an Istio-compatible CA, impersonating the node's workloads
/// as ztunnel does (the `ImpersonatedIdentity` metadata).
pub struct IstioCaIssuer {
    client: IstioCaClient,
    endpoint: String,
    roots: Vec<CertificateDer<'static>>,
    trust_domain: TrustDomain,
    ttl: Duration,
    /// Ask without impersonation (the caller's own identity, as a
    /// waypoint does) instead of as a node agent for its workloads.
    own: bool,
}

impl std::fmt::Debug for IstioCaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCaIssuer")
            .field("endpoint", &self.endpoint)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl IstioCaIssuer {
    /// Issues with `client` (at `endpoint`, for display) for identities of
    /// `trust_domain`, asking for `ttl`; peers and the CA's answers are
    /// checked against `roots` (the mesh root certificates, public).
    pub fn new(
        client: IstioCaClient,
        endpoint: String,
        roots: Vec<CertificateDer<'static>>,
        trust_domain: TrustDomain,
        ttl: Duration,
    ) -> Self {
        Self {
            client,
            endpoint,
            roots,
            trust_domain,
            ttl,
            own: false,
        }
    }

    /// Asks for the caller's own identity (no `ImpersonatedIdentity`): the
    /// CA issues only the identity of the token's service account. The
    /// waypoint's mode; a node agent impersonates its pods.
    pub fn for_own_identity(mut self) -> Self {
        self.own = true;
        self
    }

    async fn issue_for(&self, id: &SpiffeId) -> Result<WorkloadCert, IssueError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IssueError::ForeignTrustDomain {
                id: id.clone(),
                ours: self.trust_domain.clone(),
            });
        }
        let (csr, key) = generate_csr(id).map_err(|e| IssueError::Crypto {
            id: id.clone(),
            detail: e.to_string(),
        })?;
        let pems = self
            .client
            .create_certificate(&csr, (!self.own).then_some(id), self.ttl)
            .await
            .map_err(|e| IssueError::Unavailable {
                id: id.clone(),
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            })?;
        let invalid = |reason: String| IssueError::Invalid {
            id: id.clone(),
            reason,
        };
        let mut chain =
            pem_chain_to_der(&pems).map_err(|e| invalid(format!("the CA's answer: {e}")))?;
        // Istio answers leaf, intermediates, root: the root is not served.
        chain.retain(|c| !self.roots.contains(c));
        verify_chain(&chain, &self.roots, UnixTime::now()).map_err(|e| {
            invalid(format!(
                "it does not chain to the mesh root (--ca-root-cert): {e}"
            ))
        })?;
        WorkloadCert::new(id.clone(), chain, key)
    }
}

impl CertificateProvider for IstioCaIssuer {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(self.issue_for(id))
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn ca_validity(&self) -> Option<CaValidity> {
        None
    }

    fn describe(&self) -> IssuerInfo {
        IssuerInfo {
            kind: IssuerKind::IstioCa,
            endpoint: self.endpoint.clone(),
        }
    }
}
