//! The mesh CA: its fixed names and limits, loading it from PEM, creating a
//! new root (`mesh-agent ca init`), its validity, and signing leaves with
//! it. Issuing workload certificates is [`LocalCa`](super::LocalCa)'s job.

mod authority;
mod csr;
mod error;
mod generate;
mod limits;
mod load;
pub(super) mod validity;

pub use authority::MeshCa;
pub use csr::{MAX_CSR_LEN, MIN_RSA_BITS, SignError, SignedCsr};
pub use error::CaError;
pub use generate::GeneratedCa;
pub use limits::{CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, DEFAULT_CA_DAYS, MAX_CA_DAYS};
pub use validity::{CA_EXPIRY_WARNING, CaExpiry, CaValidity};
