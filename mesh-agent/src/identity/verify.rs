//! Peer verification: chain to the mesh root plus the SPIFFE rules, on
//! the server side (any identity of the trust domain) and the client side
//! (one of the identities expected for the destination).

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::peer::{PeerCertError, parse_leaf};
use super::provider::crypto_provider;
use super::spiffe::{SpiffeId, TrustDomain};

/// Verifies `chain` (leaf first) against `roots` at `now` for server use, as
/// a mesh client does (no name check). Used to self-test a loaded CA.
pub(in crate::identity) fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let parsed = ParsedCertificate::try_from(leaf)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        intermediates,
        now,
        crypto_provider().signature_verification_algorithms.all,
    )
}

/// Server side: rustls' WebPKI client verifier (chain to the mesh root,
/// validity, clientAuth usage, signatures), then the SPIFFE rules.
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(chain_error)?;
        let id = parse_leaf(end_entity)
            .and_then(|leaf| leaf.identity)
            .map_err(PeerCertError::into_rustls)?;
        if id.trust_domain() != &self.trust_domain {
            return Err(PeerCertError::ForeignTrustDomain {
                id,
                ours: self.trust_domain.clone(),
            }
            .into_rustls());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to the mesh root (validity, serverAuth usage) with
/// WebPKI but no host name check, then the server's SPIFFE ID must be one of
/// those expected for the destination.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    pub(super) roots: Arc<RootCertStore>,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
    pub(super) trust_domain: TrustDomain,
    pub(super) expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(chain_error)?;
        let id = parse_leaf(end_entity)
            .and_then(|leaf| leaf.identity)
            .map_err(PeerCertError::into_rustls)?;
        if self.expected.contains(&id) {
            return Ok(ServerCertVerified::assertion());
        }
        let known_domain = id.trust_domain() == &self.trust_domain
            || self
                .expected
                .iter()
                .any(|e| e.trust_domain() == id.trust_domain());
        Err(if known_domain {
            PeerCertError::UnexpectedIdentity {
                id,
                expected: self.expected.clone(),
            }
        } else {
            PeerCertError::ForeignTrustDomain {
                id,
                ours: self.trust_domain.clone(),
            }
        }
        .into_rustls())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A chain-verification error as the operator should read it: a certificate
/// whose issuer has the name of a trusted CA but whose signature does not
/// verify was issued by another CA of the same name (two meshes made the
/// same way): an unknown issuer, not a forged handshake.
fn chain_error(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            CertificateError::UnknownIssuer.into()
        }
        other => other,
    }
}
