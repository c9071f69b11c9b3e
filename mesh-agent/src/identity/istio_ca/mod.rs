//! Istio's certificate service (`istio.v1.auth.IstioCertificateService`):
//! the protocol (`proto.rs`, generated from `ca.proto`), the client agents
//! use to get workload certificates from a CA without holding its key
//! ([`IstioCaClient`], `client.rs`), and the CSR they send (`csr.rs`). The
//! server side is `mesh-agent ca serve` (`crate::ca_server`), signing with
//! [`MeshCa::sign_csr`](super::MeshCa::sign_csr).

mod client;
mod csr;
pub mod proto;

pub use client::{
    CLUSTER_ID_HEADER, CaClientConfig, CaClientError, IMPERSONATED_IDENTITY, IstioCaClient,
    MAX_CHAIN_LEN, MAX_RESPONSE_BYTES, MAX_TOKEN_BYTES, pem_chain_to_der,
};
pub use csr::generate_csr;
