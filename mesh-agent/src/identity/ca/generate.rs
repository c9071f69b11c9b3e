//! Creating a new root CA (`mesh-agent ca init`) and writing its files.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};

use super::authority::{MeshCa, random_serial, x509_time};
use super::error::CaError;
use super::limits::{CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, MAX_CA_DAYS};
use crate::identity::spiffe::TrustDomain;

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
