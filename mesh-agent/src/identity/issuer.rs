//! Which issuer signs workload certificates, chosen by flags shared by
//! every binary that holds mesh identities (`mesh-agent run`,
//! `mesh-waypoint run`): the flags ([`IssuerArgs`]), the choice
//! ([`IssuerConfig`]) and the provider built from it ([`IssuerConfig::provider`]).

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use super::{
    CaError, CertificateProvider, IstioCaIssuer, LocalCa, MeshCa, TrustDomain,
    istio_ca::{CaClientConfig, CaClientError, IstioCaClient},
};

/// Who issues the workload certificates (flags).
#[derive(Debug, Clone, clap::Args)]
pub struct IssuerArgs {
    /// `istio-ca`: ask a CA over Istio's certificate API (istiod, istio-csr,
    /// `mesh-agent ca serve`) with a CSR: this process holds no CA key.
    /// `local`: sign with the mesh CA key in --ca-dir (labs and single-node
    /// clusters: every node then holds the root key). Default: `istio-ca`
    /// when --ca-address is set, `local` otherwise.
    #[arg(long, value_enum, env = "MESH_ISSUER")]
    pub issuer: Option<IssuerChoice>,
    /// The mesh CA directory (ca.crt, ca.key), from `mesh-agent ca init` (local issuer).
    #[arg(long, env = "MESH_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// The CA's address (istio-ca issuer), e.g. `https://mesh-ca.mesh-system.svc:15012`
    /// or `https://istiod.istio-system.svc:15012`.
    #[arg(long, env = "MESH_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// The mesh root certificate(s), PEM (istio-ca issuer): verifies the CA's
    /// TLS certificate, the certificates it issues, and every peer.
    #[arg(long, env = "MESH_CA_ROOT_CERT")]
    pub ca_root_cert: Option<PathBuf>,
    /// The name the CA's TLS certificate must carry (default: the address's host).
    #[arg(long, env = "MESH_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// The projected ServiceAccount token sent to the CA (re-read at every
    /// request: the kubelet rotates it).
    #[arg(long, env = "MESH_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// The cluster ID sent to the CA (Istio's `ClusterID` header).
    #[arg(long, env = "MESH_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
}

/// `--issuer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IssuerChoice {
    /// The mesh CA key in this process.
    Local,
    /// A CA over Istio's certificate API.
    IstioCa,
}

/// Whose identities a process asks the CA for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    /// A node agent: the identities of the pods on its node (Istio's
    /// `ImpersonatedIdentity`, allowed for node agent accounts only).
    NodeAgent,
    /// Its own service account's identity (a waypoint).
    Itself,
}

/// Who issues the workload certificates.
#[derive(Debug, Clone)]
pub enum IssuerConfig {
    /// The mesh CA's key in this process (`mesh-agent ca init`): labs and
    /// single-node clusters.
    Local {
        /// `ca.crt` and `ca.key` (none: [`IssuerConfig::provider`] says so).
        ca_dir: Option<PathBuf>,
    },
    /// A CA over Istio's certificate API, with CSRs: no CA key here.
    IstioCa {
        /// `https://host:port`.
        address: String,
        /// The mesh root certificate(s), PEM.
        root_cert: PathBuf,
        /// The name the CA's certificate must carry (default: the host).
        server_name: Option<String>,
        /// The projected ServiceAccount token sent to the CA.
        token_file: Option<PathBuf>,
        /// Istio's `ClusterID` header.
        cluster_id: String,
    },
}

/// Why no issuer can be set up.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// A flag the chosen issuer needs is missing.
    #[error("{0}")]
    Flags(&'static str),
    /// The local issuer has no CA directory.
    #[error(
        "no mesh CA: pass --ca-dir DIR (create one with `mesh-agent ca init --out DIR`), or \
         --issuer istio-ca with --ca-address"
    )]
    NoCaDir,
    /// The local CA cannot be loaded.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The mesh root certificate cannot be read.
    #[error("cannot read the mesh root certificate {path} (--ca-root-cert): {source}")]
    RootRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The mesh root certificate file holds no PEM certificate.
    #[error(
        "no PEM certificate in {path} (--ca-root-cert): it must hold the mesh root certificate{detail}"
    )]
    RootPem {
        /// The file.
        path: PathBuf,
        /// The parse error, if any.
        detail: String,
    },
    /// The CA client cannot be built.
    #[error(transparent)]
    Client(#[from] CaClientError),
}

impl IssuerArgs {
    /// The issuer these flags choose.
    pub fn config(&self) -> Result<IssuerConfig, IssuerError> {
        let choice = self.issuer.unwrap_or(if self.ca_address.is_some() {
            IssuerChoice::IstioCa
        } else {
            IssuerChoice::Local
        });
        match choice {
            IssuerChoice::Local => Ok(IssuerConfig::Local {
                ca_dir: self.ca_dir.clone(),
            }),
            IssuerChoice::IstioCa => Ok(IssuerConfig::IstioCa {
                address: self.ca_address.clone().ok_or(IssuerError::Flags(
                    "--issuer istio-ca needs --ca-address (the CA's https:// address)",
                ))?,
                root_cert: self.ca_root_cert.clone().ok_or(IssuerError::Flags(
                    "--issuer istio-ca needs --ca-root-cert (the mesh root certificate, PEM)",
                ))?,
                server_name: self.ca_server_name.clone(),
                token_file: self.ca_token_file.clone(),
                cluster_id: self.cluster_id.clone(),
            }),
        }
    }
}

impl IssuerConfig {
    /// The certificate provider for identities of `trust_domain` with
    /// certificates of `cert_ttl`, asked for as `requester`. `in_kubernetes`: a local CA then warns
    /// loudly (whoever holds its key can sign any identity). The istio-ca
    /// client connects lazily (an unreachable CA is an issuance failure,
    /// retried); it needs a tokio runtime.
    pub fn provider(
        &self,
        trust_domain: &TrustDomain,
        cert_ttl: Duration,
        requester: Requester,
        in_kubernetes: bool,
    ) -> Result<Arc<dyn CertificateProvider>, IssuerError> {
        match self {
            IssuerConfig::Local { ca_dir } => {
                let ca_dir = ca_dir.as_ref().ok_or(IssuerError::NoCaDir)?;
                let ca = Arc::new(MeshCa::load_dir(ca_dir)?);
                if in_kubernetes {
                    tracing::warn!(
                        ca_dir = %ca_dir.display(),
                        "LOCAL CA IN KUBERNETES MODE: this process holds the mesh CA's private key \
                         and can sign any identity; one compromised pod or node owns every \
                         identity in the mesh. Use --issuer istio-ca with `mesh-agent ca serve` \
                         (deploy/) or istiod"
                    );
                }
                Ok(Arc::new(
                    LocalCa::new(ca, trust_domain.clone()).with_ttl(cert_ttl),
                ))
            }
            IssuerConfig::IstioCa {
                address,
                root_cert,
                server_name,
                token_file,
                cluster_id,
            } => {
                let pem = std::fs::read(root_cert).map_err(|source| IssuerError::RootRead {
                    path: root_cert.clone(),
                    source,
                })?;
                let roots = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| IssuerError::RootPem {
                        path: root_cert.clone(),
                        detail: format!(": {e}"),
                    })?;
                if roots.is_empty() {
                    return Err(IssuerError::RootPem {
                        path: root_cert.clone(),
                        detail: String::new(),
                    });
                }
                let client = IstioCaClient::new(CaClientConfig {
                    address: address.clone(),
                    server_name: server_name.clone(),
                    root_certs: roots.clone(),
                    token_file: token_file.clone(),
                    cluster_id: Some(cluster_id.clone()),
                    timeout: Duration::from_secs(10),
                })?;
                let issuer = IstioCaIssuer::new(
                    client,
                    address.clone(),
                    roots,
                    trust_domain.clone(),
                    cert_ttl,
                );
                Ok(Arc::new(match requester {
                    Requester::NodeAgent => issuer,
                    Requester::Itself => issuer.own_identity(),
                }))
            }
        }
    }
}
