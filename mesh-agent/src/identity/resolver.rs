//! Certificate resolvers: the workload's current certificate from the
//! [`CertManager`], per handshake, or none (the templates' placeholder).

use std::sync::Arc;

use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::manager::CertManager;
use super::spiffe::SpiffeId;

/// Presents a workload's current certificate, from the manager, at each
/// handshake (the proxy has fetched it before; an expired one is never
/// presented).
#[derive(Debug)]
pub(super) struct ManagedCert {
    pub(super) manager: Arc<CertManager>,
    pub(super) id: SpiffeId,
}

impl ManagedCert {
    fn resolve(&self) -> Option<Arc<CertifiedKey>> {
        match self.manager.get(&self.id) {
            Some(cert) => Some(cert.certified_key()),
            None => {
                tracing::error!(
                    identity = %self.id,
                    "no valid certificate to present: the handshake fails"
                );
                None
            }
        }
    }
}

impl ResolvesServerCert for ManagedCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        ManagedCert::resolve(self)
    }
}

impl ResolvesClientCert for ManagedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        ManagedCert::resolve(self)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The templates' resolver, replaced in every configuration handed out.
#[derive(Debug)]
pub(super) struct NoCert;

impl ResolvesServerCert for NoCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}
