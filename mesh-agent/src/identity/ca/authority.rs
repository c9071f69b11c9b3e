//! The loaded mesh CA: its signing key, chain and roots, and the signing
//! of a leaf (also used to self-test a freshly loaded CA).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use super::error::CaError;
use super::limits::CLOCK_SKEW;
use super::validity::CaValidity;
use crate::identity::cert::{IssueError, WorkloadCert};
use crate::identity::clock::fmt_time;
use crate::identity::provider::crypto_provider;
use crate::identity::spiffe::{SpiffeId, TrustDomain};
use crate::identity::verify::verify_chain;

/// The mesh CA: a certificate and key that sign workload certificates, the
/// chain from it up to the root, and the root(s) peers must chain to.
pub struct MeshCa {
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// The CA certificate followed by its issuers, without the root (sent to
    /// peers after the leaf); empty when the CA is itself the root.
    pub(super) intermediates: Vec<CertificateDer<'static>>,
    pub(super) roots: Vec<CertificateDer<'static>>,
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
    pub(super) subject: String,
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("subject", &self.subject)
            .field("intermediates", &self.intermediates.len())
            .field("not_after", &fmt_time(self.not_after))
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// The roots peers' certificates must chain to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The certificates sent after a leaf: the CA certificate and its issuers
    /// below the root (empty when the CA is the root).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The CA certificate's subject, for logs.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The end of the CA certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA certificate's validity.
    pub fn validity(&self) -> CaValidity {
        CaValidity {
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }

    /// Signs a leaf for `id` valid between the two instants, with a fresh
    /// ECDSA P-256 key.
    pub(in crate::identity) fn sign_leaf(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IssueError> {
        let crypto = |e: &dyn fmt::Display| IssueError::Crypto {
            id: id.clone(),
            detail: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| crypto(&e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.to_string().try_into().map_err(|e| crypto(&e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial().map_err(|e| crypto(&e))?);
        params.not_before = x509_time(not_before).map_err(|e| crypto(&e))?;
        params.not_after = x509_time(not_after).map_err(|e| crypto(&e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| crypto(&e))?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(id.clone(), chain, key)
    }

    /// Signs a throw-away leaf and verifies it against the roots, as a peer
    /// would: catches a chain out of order, a missing intermediate, or an
    /// issuer name rcgen cannot reproduce.
    pub(super) fn self_test(&self) -> Result<(), CaError> {
        let td = TrustDomain::default();
        let id = SpiffeId::new(td, "mesh-self-test", "mesh-self-test").map_err(|e| {
            CaError::SelfTest {
                detail: e.to_string(),
            }
        })?;
        let now = SystemTime::now();
        let leaf = self
            .sign_leaf(
                &id,
                now - CLOCK_SKEW,
                (now + Duration::from_secs(300)).min(self.not_after),
            )
            .map_err(|e| CaError::SelfTest {
                detail: e.to_string(),
            })?;
        verify_chain(leaf.chain(), &self.roots, UnixTime::now()).map_err(|e| CaError::SelfTest {
            detail: e.to_string(),
        })
    }
}

/// A time for rcgen, if X.509 can carry it (years 0 to 9999).
pub(super) fn x509_time(t: SystemTime) -> Result<time::OffsetDateTime, String> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .filter(|d| (0..=9999).contains(&d.year()))
        .ok_or_else(|| format!("{t:?} cannot be written in a certificate"))
}

/// 16 random bytes, positive and without a leading zero octet (RFC 5280:
/// unique per CA, at most 20 octets).
pub(super) fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "the system random number generator failed".to_owned())?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}
