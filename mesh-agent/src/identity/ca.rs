//! The mesh CA: loading a root (or intermediate) from PEM files, creating a
//! new root (`mesh-agent ca init`), and [`LocalCa`], which issues workload
//! certificates with it.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
    pem::{self, PemObject},
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{
    CertificateProvider, IssueError, SpiffeId, TrustDomain, WorkloadCert, fmt_time, tls,
    unix_to_system,
};

/// File name of the CA certificate written by `ca init`.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key written by `ca init` (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Default lifetime of a root created by `ca init`: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Longest lifetime `ca init` accepts: a hundred years.
pub const MAX_CA_DAYS: u32 = 36_500;
/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long before the mesh CA expires the agent starts warning (log and
/// `mesh_ca_expiring`): time enough to roll out a new CA.
pub const CA_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);
/// How far a workload certificate's validity is back-dated, so that peers
/// whose clocks run a little behind accept it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// What went wrong loading or creating the mesh CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file does not exist.
    #[error(
        "the CA {what} file {} does not exist: create a CA with `mesh-agent ca init --out DIR`, or point to your CA's files",
        path.display()
    )]
    Missing {
        /// Which file (certificate, key, chain).
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// A file exists but cannot be read.
    #[error("cannot read the CA {what} file {}: {source}", path.display())]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM block of the expected kind.
    #[error(
        "the CA {what} file {} is not usable PEM: {detail} (expected {expected})",
        path.display()
    )]
    NotPem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
        /// What it should contain.
        expected: &'static str,
    },
    /// A certificate does not parse as X.509.
    #[error("the certificate in {} is not valid X.509: {detail}", path.display())]
    BadCertificate {
        /// The file it came from.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// The key is not a supported private key.
    #[error(
        "the CA key in {} is not a usable private key (ECDSA P-256/P-384, Ed25519 or RSA, unencrypted): {source}",
        path.display()
    )]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// The key is not the certificate's key.
    #[error(
        "the CA key {} does not match the CA certificate {}: they are from different CAs; use the key the certificate was made for",
        key.display(), cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate may not sign certificates.
    #[error(
        "the certificate in {} is not a CA certificate ({reason}): the mesh needs a root or intermediate CA, not a leaf",
        path.display()
    )]
    NotCa {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The CA certificate has expired.
    #[error(
        "the CA certificate in {} expired at {}: create or install a new CA",
        path.display(), fmt_time(*not_after)
    )]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// When it expired.
        not_after: SystemTime,
    },
    /// The CA certificate is not valid yet.
    #[error(
        "the CA certificate in {} is not valid before {} (is this machine's clock right?)",
        path.display(), fmt_time(*not_before)
    )]
    NotYetValid {
        /// The certificate file.
        path: PathBuf,
        /// When it becomes valid.
        not_before: SystemTime,
    },
    /// An intermediate was given without the chain up to its root.
    #[error(
        "the CA certificate in {} is not self-signed (an intermediate): give the chain up to the root too",
        path.display()
    )]
    ChainMissing {
        /// The certificate file.
        path: PathBuf,
    },
    /// The chain does not end in a self-signed root.
    #[error(
        "the last certificate of the CA chain in {} is not a self-signed root: the chain must run from the CA's issuer up to the root",
        path.display()
    )]
    NoRoot {
        /// The chain file.
        path: PathBuf,
    },
    /// Certificates signed by this CA would not verify against its root.
    #[error(
        "certificates signed by this CA do not verify against its root ({detail}): check that the chain is complete and in order (issuer of the CA first, root last)"
    )]
    SelfTest {
        /// What verification said.
        detail: String,
    },
    /// `ca init` will not overwrite an existing file.
    #[error(
        "{} already exists: refusing to overwrite a CA; choose another --out directory or remove the old files yourself",
        path.display()
    )]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Writing `ca init`'s files failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `ca init` was asked for a lifetime out of range.
    #[error("a CA lifetime of {days} days is out of range: choose 1 to {MAX_CA_DAYS} days")]
    BadDays {
        /// The lifetime asked for.
        days: u32,
    },
    /// Key generation or signing failed while creating a CA.
    #[error("cannot create the CA: {detail}")]
    Generate {
        /// What failed.
        detail: String,
    },
}

/// The validity of the mesh CA certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaValidity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Where the mesh CA stands at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaExpiry {
    /// Valid for longer than [`CA_EXPIRY_WARNING`].
    Valid,
    /// Valid, but expires within [`CA_EXPIRY_WARNING`]: install a new CA.
    ExpiringSoon,
    /// Expired: no certificate can be issued.
    Expired,
    /// Not valid yet (a clock problem).
    NotYetValid,
}

impl CaValidity {
    /// The state at `now`.
    pub fn expiry_at(&self, now: SystemTime) -> CaExpiry {
        if now < self.not_before {
            CaExpiry::NotYetValid
        } else if now >= self.not_after {
            CaExpiry::Expired
        } else if self
            .not_after
            .duration_since(now)
            .is_ok_and(|left| left <= CA_EXPIRY_WARNING)
        {
            CaExpiry::ExpiringSoon
        } else {
            CaExpiry::Valid
        }
    }

    /// Seconds from `now` until the CA expires (negative once expired).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        let secs = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        secs(self.not_after).saturating_sub(secs(now))
    }
}

/// The mesh CA: a certificate and key that sign workload certificates, the
/// chain from it up to the root, and the root(s) peers must chain to.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate followed by its issuers, without the root (sent to
    /// peers after the leaf); empty when the CA is itself the root.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    subject: String,
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

/// The PEM text of a new CA.
pub struct GeneratedCa {
    /// The root certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl fmt::Debug for GeneratedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCa").finish_non_exhaustive()
    }
}

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

    /// Creates a new self-signed root CA (ECDSA P-256) valid for `days`,
    /// named `O=<trust domain>, CN=mesh root CA <random tag>` (the tag keeps
    /// two meshes' roots apart in diagnostics). Nothing is written.
    pub fn generate(trust_domain: &TrustDomain, days: u32) -> Result<GeneratedCa, CaError> {
        if !(1..=MAX_CA_DAYS).contains(&days) {
            return Err(CaError::BadDays { days });
        }
        let generate = |detail: String| CaError::Generate { detail };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate(e.to_string()))?;
        let serial = random_serial().map_err(generate)?;
        let tag: String = serial.to_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain.as_str());
        dn.push(DnType::CommonName, format!("mesh root CA {tag}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(serial);
        let now = SystemTime::now();
        let not_after = now + Duration::from_secs(u64::from(days) * 86_400);
        params.not_before = x509_time(now - CLOCK_SKEW).map_err(generate)?;
        params.not_after = x509_time(not_after).map_err(generate)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| generate(e.to_string()))?;
        Ok(GeneratedCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `mesh-agent ca init`: creates a new root CA in `dir` (made if needed)
    /// as `ca.crt` and `ca.key` (mode 0600). Refuses to overwrite either file.
    /// Returns the two paths.
    pub fn init_dir(
        dir: &Path,
        trust_domain: &TrustDomain,
        days: u32,
    ) -> Result<(PathBuf, PathBuf), CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for path in [&cert_path, &key_path] {
            if path.symlink_metadata().is_ok() {
                return Err(CaError::AlreadyExists { path: path.clone() });
            }
        }
        let generated = Self::generate(trust_domain, days)?;
        fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })?;
        write_new(&key_path, generated.key_pem.as_bytes(), 0o600)?;
        if let Err(e) = write_new(&cert_path, generated.cert_pem.as_bytes(), 0o644) {
            // Leave nothing half-made behind (the key is ours: just created).
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        Ok((cert_path, key_path))
    }

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
    fn sign_leaf(
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
    fn self_test(&self) -> Result<(), CaError> {
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
        tls::verify_chain(leaf.chain(), &self.roots, UnixTime::now()).map_err(|e| {
            CaError::SelfTest {
                detail: e.to_string(),
            }
        })
    }
}

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

impl CertificateProvider for LocalCa {
    fn issue(&self, id: &SpiffeId) -> Result<WorkloadCert, IssueError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IssueError::ForeignTrustDomain {
                id: id.clone(),
                ours: self.trust_domain.clone(),
            });
        }
        let now = SystemTime::now();
        if now >= self.ca.not_after {
            return Err(IssueError::CaExpired {
                id: id.clone(),
                not_after: self.ca.not_after,
            });
        }
        // X.509 times have whole seconds: round the expiry up so that the
        // certificate lives at least the TTL, and cap it at the CA's expiry.
        let wanted = now
            .checked_add(self.ttl)
            .map_or(self.ca.not_after, ceil_second);
        let not_after = wanted.min(self.ca.not_after);
        let not_before = (now - CLOCK_SKEW).max(self.ca.not_before);
        if not_after < wanted {
            tracing::warn!(
                identity = %id,
                ca_not_after = %fmt_time(self.ca.not_after),
                "the mesh CA expires before the workload certificate would: install a new CA soon"
            );
        }
        self.ca.sign_leaf(id, not_before, not_after)
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots.clone()
    }

    fn ca_validity(&self) -> Option<CaValidity> {
        Some(self.ca.validity())
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
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

/// A time for rcgen, if X.509 can carry it (years 0 to 9999).
fn x509_time(t: SystemTime) -> Result<time::OffsetDateTime, String> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .filter(|d| (0..=9999).contains(&d.year()))
        .ok_or_else(|| format!("{t:?} cannot be written in a certificate"))
}

fn ceil_second(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => {
            SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1)
        }
        _ => t,
    }
}

/// 16 random bytes, positive and without a leading zero octet (RFC 5280:
/// unique per CA, at most 20 octets).
fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    tls::crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "the system random number generator failed".to_owned())?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => CaError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => CaError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| CaError::Write {
            path: path.to_owned(),
            source,
        })
}
