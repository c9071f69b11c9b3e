//! Who issues a process's certificates, as flags and as a
//! [`CertificateProvider`]: the one place both the node agent
//! (`mesh-agent run`) and the waypoint (`mesh-waypoint run`) choose and
//! build their issuer. Each binary flattens [`IssuerArgs`] into its command
//! line, turns it into an [`IssuerConfig`] ([`IssuerArgs::config`]) and
//! builds the provider with [`IssuerConfig::provider`].
//!
//! - `local`: the mesh CA's key in this process (`--ca-dir`, from
//!   `mesh-agent ca init`): labs and single-node clusters.
//! - `istio-ca`: a CSR to a CA over Istio's certificate API (istiod,
//!   istio-csr, `mesh-agent ca serve`), authenticated with the process's
//!   projected ServiceAccount token: the process holds no CA key.

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use super::{
    CaError, CertificateProvider, IstioCaIssuer, LocalCa, MeshCa, TrustDomain,
    istio_ca::{CaClientConfig, CaClientError, IstioCaClient},
};

/// How long one request to an `istio-ca` issuer may take.
pub const CA_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The issuer flags (`--issuer`, `--ca-dir`, `--ca-address`, ...), shared
/// by `mesh-agent run` and `mesh-waypoint run` (`#[command(flatten)]`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct IssuerArgs {
    /// `istio-ca`: ask a CA over Istio's certificate API (istiod, istio-csr,
    /// `mesh-agent ca serve`) with a CSR: this process holds no CA key.
    /// `local`: sign with the mesh CA key in --ca-dir (labs and single-node
    /// clusters: every such process then holds the root key). Default:
    /// `istio-ca` when --ca-address is set, `local` otherwise.
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
    /// This process's projected ServiceAccount token, sent to the CA
    /// (re-read at every request: the kubelet rotates it).
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

/// Who issues the certificates, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerConfig {
    /// The mesh CA's key in this process (`mesh-agent ca init`): labs and
    /// single-node clusters.
    Local {
        /// `ca.crt` and `ca.key` (none: [`IssuerConfig::provider`] says how
        /// to get one; the agent checks its other flags first).
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

/// Whose certificates an `istio-ca` provider asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    /// A node agent, for its pods (impersonation: the CA checks the pod is
    /// on the agent's node).
    NodeAgent,
    /// The process itself, with its own token (the waypoint): no
    /// impersonation, the CA issues the token's identity only.
    Itself,
}

/// Why the issuer flags cannot make a certificate provider.
#[derive(Debug, thiserror::Error)]
pub enum IssuerConfigError {
    /// `istio-ca` without an address.
    #[error("--issuer istio-ca needs --ca-address (the CA's https:// address)")]
    NoAddress,
    /// `istio-ca` without the mesh root.
    #[error("--issuer istio-ca needs --ca-root-cert (the mesh root certificate, PEM)")]
    NoRootCert,
    /// `local` without a CA directory.
    #[error(
        "no mesh CA: pass --ca-dir DIR (create one with `mesh-agent ca init --out DIR`), \
         or --issuer istio-ca with --ca-address"
    )]
    NoCaDir,
    /// The CA directory does not load.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The mesh root file cannot be read.
    #[error("cannot read the mesh root certificate {path} (--ca-root-cert): {source}")]
    ReadRoot {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The mesh root file is not PEM certificates.
    #[error(
        "the mesh root certificate {path} (--ca-root-cert) is not PEM: {reason}; it must hold the mesh root certificate"
    )]
    BadRoot {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The CA client cannot be built (address, roots, runtime).
    #[error(transparent)]
    Client(#[from] CaClientError),
}

impl IssuerArgs {
    /// The issuer these flags choose (`istio-ca` when `--ca-address` is
    /// set and `--issuer` is not).
    pub fn config(self) -> Result<IssuerConfig, IssuerConfigError> {
        let choice = self.issuer.unwrap_or(if self.ca_address.is_some() {
            IssuerChoice::IstioCa
        } else {
            IssuerChoice::Local
        });
        match choice {
            IssuerChoice::Local => Ok(IssuerConfig::Local {
                ca_dir: self.ca_dir,
            }),
            IssuerChoice::IstioCa => Ok(IssuerConfig::IstioCa {
                address: self.ca_address.ok_or(IssuerConfigError::NoAddress)?,
                root_cert: self.ca_root_cert.ok_or(IssuerConfigError::NoRootCert)?,
                server_name: self.ca_server_name,
                token_file: self.ca_token_file,
                cluster_id: self.cluster_id,
            }),
        }
    }
}

impl IssuerConfig {
    /// The certificate provider for `trust_domain`, issuing certificates
    /// valid for `cert_ttl`, asked for by `requester`. An `istio-ca` client connects lazily (an
    /// unreachable CA at start is an issuance failure, retried, not a start
    /// failure); it needs a Tokio runtime entered.
    pub fn provider(
        &self,
        trust_domain: &TrustDomain,
        cert_ttl: Duration,
        requester: Requester,
    ) -> Result<Arc<dyn CertificateProvider>, IssuerConfigError> {
        match self {
            Self::Local { ca_dir } => {
                let ca_dir = ca_dir.as_ref().ok_or(IssuerConfigError::NoCaDir)?;
                let ca = Arc::new(MeshCa::load_dir(ca_dir)?);
                Ok(Arc::new(
                    LocalCa::new(ca, trust_domain.clone()).with_ttl(cert_ttl),
                ))
            }
            Self::IstioCa {
                address,
                root_cert,
                server_name,
                token_file,
                cluster_id,
            } => {
                let roots = read_roots(root_cert)?;
                let client = IstioCaClient::new(CaClientConfig {
                    address: address.clone(),
                    server_name: server_name.clone(),
                    root_certs: roots.clone(),
                    token_file: token_file.clone(),
                    cluster_id: Some(cluster_id.clone()),
                    timeout: CA_REQUEST_TIMEOUT,
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
                    Requester::Itself => issuer.for_own_identity(),
                }))
            }
        }
    }
}

/// The PEM certificates of `path` (at least one).
fn read_roots(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, IssuerConfigError> {
    let pem = std::fs::read(path).map_err(|source| IssuerConfigError::ReadRoot {
        path: path.clone(),
        source,
    })?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IssuerConfigError::BadRoot {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if roots.is_empty() {
        return Err(IssuerConfigError::BadRoot {
            path: path.clone(),
            reason: "no certificate in it".to_owned(),
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> IssuerArgs {
        IssuerArgs {
            cluster_id: "Kubernetes".into(),
            ..IssuerArgs::default()
        }
    }

    #[test]
    fn the_address_chooses_istio_ca_and_istio_ca_needs_its_flags() {
        assert_eq!(
            args().config().expect("local"),
            IssuerConfig::Local { ca_dir: None }
        );
        let with_address = IssuerArgs {
            ca_address: Some("https://ca:15012".into()),
            ..args()
        };
        assert!(matches!(
            with_address.clone().config(),
            Err(IssuerConfigError::NoRootCert)
        ));
        let full = IssuerArgs {
            ca_root_cert: Some("/etc/mesh/root.pem".into()),
            ca_token_file: Some("/var/run/token".into()),
            ..with_address
        };
        assert_eq!(
            full.config().expect("istio-ca"),
            IssuerConfig::IstioCa {
                address: "https://ca:15012".into(),
                root_cert: "/etc/mesh/root.pem".into(),
                server_name: None,
                token_file: Some("/var/run/token".into()),
                cluster_id: "Kubernetes".into(),
            }
        );
        let explicit = IssuerArgs {
            issuer: Some(IssuerChoice::IstioCa),
            ..args()
        };
        assert!(matches!(
            explicit.config(),
            Err(IssuerConfigError::NoAddress)
        ));
    }

    #[test]
    fn a_missing_ca_dir_or_root_says_what_to_pass() {
        let td = TrustDomain::default();
        let e = IssuerConfig::Local { ca_dir: None }
            .provider(&td, Duration::from_secs(3600), Requester::NodeAgent)
            .err()
            .expect("no CA dir");
        assert!(e.to_string().contains("--ca-dir"), "{e}");
        let dir = std::env::temp_dir().join(format!("issuer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let istio = |root_cert: PathBuf| IssuerConfig::IstioCa {
            address: "https://ca:15012".into(),
            root_cert,
            server_name: None,
            token_file: None,
            cluster_id: "Kubernetes".into(),
        };
        let e = istio(empty).provider(&td, Duration::from_secs(3600), Requester::NodeAgent);
        assert!(
            matches!(e, Err(IssuerConfigError::BadRoot { .. })),
            "{:?}",
            e.err()
        );
        let e = istio(dir.join("absent.pem")).provider(
            &td,
            Duration::from_secs(3600),
            Requester::NodeAgent,
        );
        assert!(
            matches!(e, Err(IssuerConfigError::ReadRoot { .. })),
            "{:?}",
            e.err()
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
