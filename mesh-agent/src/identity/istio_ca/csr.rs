//! The CSR an agent sends for a workload: a fresh ECDSA P-256 key (kept in
//! memory) and a PKCS#10 request naming only the workload's SPIFFE ID, as
//! ztunnel sends it.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::client::CaClientError;
use crate::identity::spiffe::SpiffeId;

/// A new key and a PEM CSR for `id` (URI SAN = the SPIFFE ID, empty subject).
pub fn generate_csr(id: &SpiffeId) -> Result<(String, PrivateKeyDer<'static>), CaClientError> {
    let fail = |e: &dyn std::fmt::Display| CaClientError::Csr {
        id: id.clone(),
        detail: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(&e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string().try_into().map_err(|e| fail(&e))?,
    )];
    let csr = params.serialize_request(&key).map_err(|e| fail(&e))?;
    let pem = csr.pem().map_err(|e| fail(&e))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((pem, der))
}
