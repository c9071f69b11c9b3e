//! Certificate signing requests (PKCS#10) as Istio's certificate service
//! receives them: parsed, their self-signature verified, their key and SANs
//! checked before [`MeshCa::sign_csr`](super::MeshCa::sign_csr) certifies
//! the key for the identity the server decided.

use std::time::SystemTime;

use rcgen::{
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, SubjectPublicKeyInfo,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME,
    prelude::FromDer,
    public_key::PublicKey,
    x509::X509Version,
};

use crate::identity::clock::fmt_time;
use crate::identity::spiffe::SpiffeId;

/// The largest CSR accepted (PEM or DER). An ECDSA CSR is about 400 bytes,
/// an RSA 4096 one about 1.7 KiB in PEM.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// The smallest RSA key certified.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA key certified (bounds the verification cost).
pub const MAX_RSA_BITS: usize = 8192;
/// How many SANs a CSR may list before it is refused unread.
const MAX_SANS: usize = 16;
/// How much of a rejected SAN is quoted in an error.
const QUOTE_LEN: usize = 128;

/// Why a certificate was not signed from a CSR (or for the CA's server).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("the CSR is {len} bytes; at most {MAX_CSR_LEN} are accepted")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The CSR is neither PEM nor DER PKCS#10.
    #[error(
        "the CSR is not a PKCS#10 certificate request (PEM \"CERTIFICATE REQUEST\" or DER): {detail}"
    )]
    Malformed {
        /// What the parser said.
        detail: String,
    },
    /// The CSR's self-signature does not verify with its own key.
    #[error(
        "the CSR's signature does not verify with the key it carries: it was altered or signed with another key; generate a new CSR with the certificate's key"
    )]
    BadSignature,
    /// The CSR's key is not one the mesh certifies.
    #[error(
        "the CSR's key is {found}: the mesh certifies ECDSA P-256 or P-384 keys and RSA keys of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
    )]
    UnsupportedKey {
        /// What the key is.
        found: String,
    },
    /// The CSR's SANs are not exactly the identity being certified.
    #[error(
        "the CSR asks for {found}, but this caller may get a certificate for {expected} only: put exactly that URI SAN in the CSR and no other name"
    )]
    SanMismatch {
        /// The identity the server decided.
        expected: SpiffeId,
        /// What the CSR lists (shortened).
        found: String,
    },
    /// The CA certificate is no longer valid.
    #[error(
        "the mesh CA certificate expired at {}: install a new CA (ca.crt, ca.key) and restart the CA server",
        fmt_time(*not_after)
    )]
    CaExpired {
        /// When it expired.
        not_after: SystemTime,
    },
    /// A DNS name for the CA server's certificate is not usable.
    #[error("{name:?} cannot be a DNS name of a certificate: {detail}")]
    BadDnsName {
        /// The rejected name.
        name: String,
        /// Why.
        detail: String,
    },
    /// Key generation or signing failed.
    #[error("signing failed: {detail}")]
    Crypto {
        /// What the crypto library said.
        detail: String,
    },
}

/// A certificate signed from a CSR, as the certificate service returns it.
#[derive(Clone, Debug)]
pub struct SignedCsr {
    /// PEM certificates, one per element: the leaf, the intermediates, the root.
    pub chain_pem: Vec<String>,
    /// The leaf's serial number in hex (for the audit log).
    pub serial_hex: String,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

/// The checked public key of a CSR.
pub(super) struct CsrKey(pub(super) SubjectPublicKeyInfo);

/// Parses `csr` (PEM or DER), verifies its self-signature, checks its key,
/// and checks that its SANs are exactly `expected` (one URI SAN, or none at
/// all: the server decides the identity, a CSR may add nothing to it).
pub(super) fn check_csr(csr: &[u8], expected: &SpiffeId) -> Result<CsrKey, SignError> {
    if csr.len() > MAX_CSR_LEN {
        return Err(SignError::TooLarge { len: csr.len() });
    }
    let malformed = |detail: String| SignError::Malformed { detail };
    let trimmed = csr.trim_ascii_start();
    let der = if trimmed.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(trimmed)
            .map_err(|e| malformed(format!("bad PEM: {e}")))?
    } else {
        CertificateSigningRequestDer::from(csr.to_vec())
    };
    let (rest, req) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes follow the request",
            rest.len()
        )));
    }
    if req.certification_request_info.version != X509Version(0) {
        return Err(malformed("its version is not 1 (0)".into()));
    }
    req.verify_signature()
        .map_err(|_| SignError::BadSignature)?;
    let key = check_key(&req)?;
    check_sans(&req, expected)?;
    Ok(key)
}

fn check_key(req: &X509CertificationRequest<'_>) -> Result<CsrKey, SignError> {
    let spki = &req.certification_request_info.subject_pki;
    let unsupported = |found: String| SignError::UnsupportedKey { found };
    let parsed = spki
        .parsed()
        .map_err(|e| unsupported(format!("unreadable ({e})")))?;
    let info = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|_| unsupported(format!("of algorithm {}", spki.algorithm.algorithm)))?;
    let alg = rcgen::PublicKeyData::algorithm(&info);
    match parsed {
        PublicKey::EC(_) if alg == &PKCS_ECDSA_P256_SHA256 || alg == &PKCS_ECDSA_P384_SHA384 => {}
        PublicKey::EC(ec) => return Err(unsupported(format!("ECDSA of {} bits", ec.key_size()))),
        PublicKey::RSA(rsa) if alg == &PKCS_RSA_SHA256 => {
            let bits = rsa.key_size();
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err(unsupported(format!("RSA of {bits} bits")));
            }
        }
        PublicKey::RSA(_) => return Err(unsupported("RSA with unexpected parameters".into())),
        _ => {
            return Err(unsupported(format!(
                "of algorithm {}",
                spki.algorithm.algorithm
            )));
        }
    }
    Ok(CsrKey(info))
}

fn check_sans(req: &X509CertificationRequest<'_>, expected: &SpiffeId) -> Result<(), SignError> {
    let want = expected.to_string();
    let mut found: Vec<String> = Vec::new();
    let mut bad = false;
    // Every extension request attribute, not only the first one a parser
    // would pick: a second one must not slip names past the check.
    for attr in req.certification_request_info.iter_attributes() {
        let x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(ext_req) =
            attr.parsed_attribute()
        else {
            continue;
        };
        for ext in &ext_req.extensions {
            if ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
                continue;
            }
            let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                bad = true;
                found.push("an unreadable subjectAltName".into());
                continue;
            };
            for name in &san.general_names {
                if found.len() >= MAX_SANS {
                    bad = true;
                    break;
                }
                match name {
                    GeneralName::URI(uri) if *uri == want => found.push(quote(uri)),
                    GeneralName::URI(uri) => {
                        bad = true;
                        found.push(quote(uri));
                    }
                    other => {
                        bad = true;
                        found.push(quote(&other.to_string()));
                    }
                }
            }
        }
    }
    // No SAN at all is fine (the server names the identity); one URI SAN
    // must be exactly it; anything else is refused.
    if bad || found.len() > 1 {
        return Err(SignError::SanMismatch {
            expected: expected.clone(),
            found: found.join(", "),
        });
    }
    Ok(())
}

fn quote(s: &str) -> String {
    let mut end = s.len().min(QUOTE_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}", &s[..end])
}

/// `der` as one PEM `CERTIFICATE` block with a trailing newline (LF line
/// endings), as Istio returns each certificate of a chain.
pub(super) fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use rcgen::{CertificateParams, KeyPair, SanType, SignatureAlgorithm};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use x509_parser::prelude::X509Certificate;

    use super::*;
    use crate::identity::{
        CLOCK_SKEW, MeshCa, TrustDomain, WorkloadCert, istio_ca::pem_chain_to_der, peer_identity,
    };

    fn ca(days: u32) -> Arc<MeshCa> {
        let g = MeshCa::generate(&TrustDomain::default(), days).unwrap();
        Arc::new(MeshCa::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes(), None).unwrap())
    }

    fn cart() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap()
    }

    /// A CSR with `sans` and a fresh key of `alg`: (PEM, DER, key).
    fn csr(alg: &'static SignatureAlgorithm, sans: Vec<SanType>) -> (String, Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = sans;
        let req = params.serialize_request(&key).unwrap();
        (req.pem().unwrap(), req.der().to_vec(), key)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_csr_is_signed_for_exactly_the_identity_with_the_leaf_profile() {
        let ca = ca(30);
        let (pem, _, key) = csr(&PKCS_ECDSA_P256_SHA256, vec![uri(&cart().to_string())]);
        let before = SystemTime::now();
        let signed = ca
            .sign_csr(pem.as_bytes(), &cart(), Duration::from_secs(3600))
            .unwrap();
        // Leaf then root, each one PEM block ending in a newline.
        assert_eq!(signed.chain_pem.len(), 2);
        assert!(signed.chain_pem.iter().all(|p| p.ends_with("-----\n")));
        let der = pem_chain_to_der(&signed.chain_pem).unwrap();
        assert_eq!(&der[1], &ca.roots()[0]);
        assert_eq!(peer_identity(&der[..1]).unwrap(), cart());
        // The certificate is for the CSR's key.
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cert = WorkloadCert::new(cart(), der[..1].to_vec(), key).unwrap();
        assert_eq!(cert.serial_hex(), signed.serial_hex);
        assert!(cert.not_before() <= before - CLOCK_SKEW + Duration::from_secs(1));
        assert!(cert.not_after() >= before + Duration::from_secs(3600));
        let (_, x509) = X509Certificate::from_der(der[0].as_ref()).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!x509.is_ca());
        x509.verify_signature(Some(
            X509Certificate::from_der(ca.roots()[0].as_ref())
                .unwrap()
                .1
                .public_key(),
        ))
        .unwrap();
    }

    #[test]
    fn a_csr_without_sans_gets_the_identity_the_server_decided() {
        let (_, der, _) = csr(&PKCS_ECDSA_P256_SHA256, vec![]);
        let signed = ca(30)
            .sign_csr(&der, &cart(), Duration::from_secs(600))
            .unwrap();
        let chain = pem_chain_to_der(&signed.chain_pem).unwrap();
        assert_eq!(peer_identity(&chain[..1]).unwrap(), cart());
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let (_, mut der, _) = csr(&PKCS_ECDSA_P256_SHA256, vec![uri(&cart().to_string())]);
        // The last byte is the signature's.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let e = ca(30)
            .sign_csr(&der, &cart(), Duration::from_secs(600))
            .unwrap_err();
        assert!(matches!(e, SignError::BadSignature), "{e}");
        let e = ca(30)
            .sign_csr(b"not a csr", &cart(), Duration::from_secs(600))
            .unwrap_err();
        assert!(matches!(e, SignError::Malformed { .. }), "{e}");
        let e = ca(30)
            .sign_csr(
                &vec![b'A'; MAX_CSR_LEN + 1],
                &cart(),
                Duration::from_secs(600),
            )
            .unwrap_err();
        assert!(matches!(e, SignError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn a_csr_may_not_smuggle_names() {
        let ca = ca(30);
        let me = cart().to_string();
        let refused = |sans: Vec<SanType>| {
            let (pem, _, _) = csr(&PKCS_ECDSA_P256_SHA256, sans);
            match ca.sign_csr(pem.as_bytes(), &cart(), Duration::from_secs(600)) {
                Err(SignError::SanMismatch { found, .. }) => found,
                other => panic!("expected a SAN refusal, got {other:?}"),
            }
        };
        let found = refused(vec![
            uri(&me),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ]);
        assert!(found.contains("evil.example"), "{found}");
        refused(vec![
            uri(&me),
            uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
        ]);
        refused(vec![uri(&me), uri(&me)]);
        // Another identity, and the same one in another trust domain.
        refused(vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
        let found = refused(vec![uri("spiffe://other.example/ns/shop/sa/cart")]);
        assert!(found.contains("other.example"), "{found}");
        refused(vec![SanType::IpAddress("10.0.0.1".parse().unwrap())]);
    }

    #[test]
    fn only_p256_p384_and_large_rsa_keys_are_certified() {
        let ca = ca(30);
        let me = cart().to_string();
        for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_RSA_SHA256] {
            let (pem, _, _) = csr(alg, vec![uri(&me)]);
            ca.sign_csr(pem.as_bytes(), &cart(), Duration::from_secs(600))
                .unwrap();
        }
        let (pem, _, _) = csr(&rcgen::PKCS_ED25519, vec![uri(&me)]);
        let e = ca
            .sign_csr(pem.as_bytes(), &cart(), Duration::from_secs(600))
            .unwrap_err();
        assert!(matches!(e, SignError::UnsupportedKey { .. }), "{e}");
    }

    #[test]
    fn a_certificate_never_outlives_the_ca() {
        let ca = ca(1);
        let (pem, _, _) = csr(&PKCS_ECDSA_P256_SHA256, vec![]);
        let signed = ca
            .sign_csr(pem.as_bytes(), &cart(), Duration::from_secs(10 * 86_400))
            .unwrap();
        assert!(signed.not_after <= ca.not_after());
        let (chain, _, not_after) = ca
            .sign_server_cert(
                &["mesh-ca.mesh-system.svc".into()],
                Duration::from_secs(10 * 86_400),
            )
            .unwrap();
        assert!(not_after <= ca.not_after());
        let (_, x509) = X509Certificate::from_der(chain[0].as_ref()).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
    }
}
