//! Loading the mesh CA from PEM (files or memory) and checking it: key
//! match, CA constraints, validity, chain to a root, and a self-test.

use std::{fs, io, path::Path, time::SystemTime};

use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, PemObject},
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::authority::MeshCa;
use super::error::CaError;
use super::limits::{CA_CERT_FILE, CA_KEY_FILE};
use crate::identity::clock::unix_to_system;

impl MeshCa {
    /// Loads the CA from PEM files: `cert` (the CA certificate; further
    /// certificates in it are taken as the start of the chain), `key` (its
    /// unencrypted private key: PKCS#8, SEC1 or PKCS#1), and `chain` (the
    /// certificates from the CA's issuer up to the root, root last; may start
    /// with the CA certificate itself, as Istio's `cert-chain.pem` does).
    /// Without a chain the CA certificate must be a self-signed root.
    ///
    /// Refuses a key that does not match, a certificate that is not a CA, is
    /// expired or not yet valid, and a chain that does not verify (checked by
    /// signing and verifying a throw-away workload certificate).
    pub fn load(cert: &Path, key: &Path, chain: Option<&Path>) -> Result<Self, CaError> {
        let cert_pem = read("certificate", cert)?;
        let key_pem = read("key", key)?;
        let chain_pem = chain.map(|c| read("chain", c)).transpose()?;
        Self::parse(
            (&cert_pem, cert),
            (&key_pem, key),
            chain.zip(chain_pem.as_deref()).map(|(p, pem)| (pem, p)),
        )
    }

    /// Like [`load`](Self::load), from PEM already in memory (a Kubernetes
    /// Secret, say); errors name the parts `<certificate>`, `<key>` and
    /// `<chain>`.
    pub fn from_pem(cert: &[u8], key: &[u8], chain: Option<&[u8]>) -> Result<Self, CaError> {
        Self::parse(
            (cert, Path::new("<certificate>")),
            (key, Path::new("<key>")),
            chain.map(|c| (c, Path::new("<chain>"))),
        )
    }

    /// Loads `ca.crt` and `ca.key` from a directory made by `ca init`.
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        Self::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE), None)
    }

    fn parse(
        (cert_pem, cert): (&[u8], &Path),
        (key_pem, key): (&[u8], &Path),
        chain: Option<(&[u8], &Path)>,
    ) -> Result<Self, CaError> {
        let mut certs = parse_certs("certificate", cert, cert_pem)?;
        let ca_der = certs.remove(0);
        let mut rest = certs;
        if let Some((chain_pem, chain)) = chain {
            rest.extend(parse_certs("chain", chain, chain_pem)?);
        }
        if rest.first() == Some(&ca_der) {
            rest.remove(0);
        }

        let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CaError::NotPem {
            what: "key",
            path: key.to_owned(),
            detail: pem_detail(e),
            expected: "a PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block",
        })?;
        let key_pair = KeyPair::try_from(&key_der).map_err(|source| CaError::BadKey {
            path: key.to_owned(),
            source,
        })?;

        let (_, x509) =
            X509Certificate::from_der(&ca_der).map_err(|e| CaError::BadCertificate {
                path: cert.to_owned(),
                detail: e.to_string(),
            })?;
        if x509
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .as_ref()
            != key_pair.public_key_raw()
        {
            return Err(CaError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            });
        }
        check_is_ca(&x509, cert)?;
        let (not_before, not_after) = validity(&x509);
        let now = SystemTime::now();
        if now >= not_after {
            return Err(CaError::Expired {
                path: cert.to_owned(),
                not_after,
            });
        }
        if now < not_before {
            return Err(CaError::NotYetValid {
                path: cert.to_owned(),
                not_before,
            });
        }
        let self_signed = is_self_signed(&x509);
        let subject = x509.subject().to_string();

        // The trust anchor: the CA itself if it is a root, else the chain's
        // last certificate, which must be a root.
        let (intermediates, roots) = if self_signed {
            (Vec::new(), vec![ca_der.clone()])
        } else {
            let chain_path = chain.map_or(cert, |(_, path)| path);
            let Some(root) = rest.pop() else {
                return Err(CaError::ChainMissing {
                    path: cert.to_owned(),
                });
            };
            let (_, root_x509) =
                X509Certificate::from_der(&root).map_err(|e| CaError::BadCertificate {
                    path: chain_path.to_owned(),
                    detail: e.to_string(),
                })?;
            if !is_self_signed(&root_x509) {
                return Err(CaError::NoRoot {
                    path: chain_path.to_owned(),
                });
            }
            let mut intermediates = vec![ca_der.clone()];
            intermediates.extend(rest);
            (intermediates, vec![root])
        };

        let issuer =
            Issuer::from_ca_cert_der(&ca_der, key_pair).map_err(|e| CaError::BadCertificate {
                path: cert.to_owned(),
                detail: format!("rcgen cannot sign with it: {e}"),
            })?;
        let ca = Self {
            issuer,
            intermediates,
            roots,
            not_before,
            not_after,
            subject,
        };
        ca.self_test()?;
        Ok(ca)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CaError::Missing {
            what,
            path: path.to_owned(),
        },
        _ => CaError::Read {
            what,
            path: path.to_owned(),
            source,
        },
    })
}

fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let not_pem = |detail| CaError::NotPem {
        what,
        path: path.to_owned(),
        detail,
        expected: "one or more CERTIFICATE blocks",
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(pem_detail(e)))?;
    if certs.is_empty() {
        return Err(not_pem("it has no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn pem_detail(e: pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => "it has no block of that kind".into(),
        other => other.to_string(),
    }
}

fn check_is_ca(x509: &X509Certificate<'_>, path: &Path) -> Result<(), CaError> {
    let not_ca = |reason| CaError::NotCa {
        path: path.to_owned(),
        reason,
    };
    match x509.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(Some(_)) => return Err(not_ca("its basicConstraints say CA:FALSE")),
        Ok(None) => return Err(not_ca("it has no basicConstraints extension")),
        Err(_) => return Err(not_ca("its basicConstraints extension is malformed")),
    }
    match x509.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err(not_ca("its keyUsage does not allow keyCertSign"))
        }
        Ok(_) => Ok(()),
        Err(_) => Err(not_ca("its keyUsage extension is malformed")),
    }
}

fn is_self_signed(x509: &X509Certificate<'_>) -> bool {
    x509.tbs_certificate.subject.as_raw() == x509.tbs_certificate.issuer.as_raw()
}

fn validity(x509: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let v = x509.validity();
    (
        unix_to_system(v.not_before.timestamp()),
        unix_to_system(v.not_after.timestamp()),
    )
}
