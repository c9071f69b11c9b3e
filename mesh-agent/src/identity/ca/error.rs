//! What can go wrong loading or creating the mesh CA, in words that say
//! what to do.

use std::{io, path::PathBuf, time::SystemTime};

use super::limits::MAX_CA_DAYS;
use crate::identity::clock::fmt_time;

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
