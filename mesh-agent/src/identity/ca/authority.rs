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

use super::csr::{SignError, SignedCsr, cert_pem, check_csr};
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
        let uri = id.to_string().try_into().map_err(|e| crypto(&e))?;
        let params =
            leaf_params(vec![SanType::URI(uri)], not_before, not_after).map_err(|e| crypto(&e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| crypto(&e))?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(id.clone(), chain, key)
    }

    /// Certifies the key of a PKCS#10 request (PEM or DER) for `id`, the
    /// identity the caller decided (Istio's certificate service): the CSR's
    /// self-signature must verify, its key must be ECDSA P-256/P-384 or RSA
    /// of 2048 to 8192 bits, and its SANs must be exactly `id` (or none): a
    /// CSR adds nothing to the certificate. The leaf has the profile of
    /// [`LocalCa`](crate::identity::LocalCa)'s (URI SAN, no subject,
    /// serverAuth + clientAuth), back-dated by [`CLOCK_SKEW`], valid for `ttl`
    /// (whole seconds, rounded up) but never past the CA's expiry. Returns the
    /// PEM chain leaf, intermediates, root, as Istio does.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<SignedCsr, SignError> {
        let key = check_csr(csr, id)?;
        let (not_before, not_after) = self.leaf_validity(ttl)?;
        let crypto = |e: &dyn fmt::Display| SignError::Crypto {
            detail: e.to_string(),
        };
        let uri = id.to_string().try_into().map_err(|e| crypto(&e))?;
        let mut params =
            leaf_params(vec![SanType::URI(uri)], not_before, not_after).map_err(|e| crypto(&e))?;
        let serial = random_serial().map_err(|e| crypto(&e))?;
        let serial_hex = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&key.0, &self.issuer)
            .map_err(|e| crypto(&e))?;
        Ok(SignedCsr {
            chain_pem: self.chain_pem(cert.der()),
            serial_hex,
            not_before,
            not_after,
        })
    }

    /// A TLS server certificate for `dns_names` (serverAuth, DNS SANs, a
    /// fresh ECDSA P-256 key), valid for `ttl` but never past the CA's
    /// expiry: the CA server's own certificate, which agents verify against
    /// the mesh root. Returns the chain (leaf, intermediates) and the key.
    pub fn sign_server_cert(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            SystemTime,
        ),
        SignError,
    > {
        let (not_before, not_after) = self.leaf_validity(ttl)?;
        let crypto = |e: &dyn fmt::Display| SignError::Crypto {
            detail: e.to_string(),
        };
        let sans = dns_names
            .iter()
            .map(|n| {
                n.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| SignError::BadDnsName {
                        name: n.clone(),
                        detail: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| crypto(&e))?;
        let mut params = leaf_params(sans, not_before, not_after).map_err(|e| crypto(&e))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| crypto(&e))?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key, not_after))
    }

    /// `leaf`, then the intermediates and the root(s), in PEM.
    fn chain_pem(&self, leaf: &CertificateDer<'_>) -> Vec<String> {
        std::iter::once(leaf)
            .chain(self.intermediates.iter())
            .chain(self.roots.iter())
            .map(cert_pem)
            .collect()
    }

    /// From now less the clock skew (not before the CA's start) to now plus
    /// `ttl` rounded up to a whole second (not after the CA's end).
    fn leaf_validity(&self, ttl: Duration) -> Result<(SystemTime, SystemTime), SignError> {
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(SignError::CaExpired {
                not_after: self.not_after,
            });
        }
        let ttl = ttl.max(Duration::from_secs(1));
        let wanted = now.checked_add(ttl).map_or(self.not_after, ceil_second);
        let not_before = (now - CLOCK_SKEW).max(self.not_before);
        Ok((not_before, wanted.min(self.not_after)))
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

/// The profile of every workload leaf: the SANs, no subject, not a CA,
/// digitalSignature + keyEncipherment, serverAuth + clientAuth, the
/// authority key identifier, a random serial.
fn leaf_params(
    sans: Vec<SanType>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
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
    params.serial_number = Some(random_serial()?);
    params.not_before = x509_time(not_before)?;
    params.not_after = x509_time(not_after)?;
    Ok(params)
}

fn ceil_second(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => {
            SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1)
        }
        _ => t,
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
