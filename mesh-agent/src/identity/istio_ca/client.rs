//! [`IstioCaClient`]: asks an Istio-compatible CA (istiod, istio-csr,
//! `mesh-agent ca serve`) to sign a CSR, over gRPC on TLS 1.3, authenticated
//! with the agent's projected ServiceAccount token.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::{io::AsyncReadExt as _, net::TcpStream};
use tonic::{
    Code, Request, Status,
    codegen::{Service, http::Uri},
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    transport::{Channel, Endpoint},
};

use super::proto::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use crate::identity::config::ALPN_H2;
use crate::identity::provider::crypto_provider;
use crate::identity::spiffe::SpiffeId;

/// The metadata field ztunnel sets to ask for another identity's certificate.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The header carrying the caller's cluster (ztunnel's `ClusterID`).
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// The largest response accepted (a chain of a few certificates is ~3 KiB).
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// The most certificates a returned chain may hold.
pub const MAX_CHAIN_LEN: usize = 16;
/// The largest token file read (a projected token is ~1 KiB).
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// How to reach and authenticate to the CA.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `https://host:port` of the CA (istiod: `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// The name the CA's certificate must carry; default the address's host.
    pub server_name: Option<String>,
    /// The roots the CA's certificate must chain to (the mesh root).
    pub root_certs: Vec<CertificateDer<'static>>,
    /// The projected ServiceAccount token, re-read on every request (the
    /// kubelet rotates it); sent as `authorization: Bearer <token>`. None:
    /// no token (a CA that authenticates otherwise).
    pub token_file: Option<PathBuf>,
    /// Sent as the `ClusterID` header when set, as ztunnel does.
    pub cluster_id: Option<String>,
    /// Deadline of each request, connection included.
    pub timeout: Duration,
}

/// Why a certificate could not be obtained from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// The configured address is not usable.
    #[error("the CA address {address:?} is not usable: {reason} (expected https://host:port)")]
    BadAddress {
        /// The address given.
        address: String,
        /// Why.
        reason: String,
    },
    /// No roots to verify the CA with, or they do not load.
    #[error("cannot verify the CA's certificate: {detail} (give the mesh root certificate)")]
    BadRoots {
        /// What was wrong.
        detail: String,
    },
    /// Created outside a tokio runtime.
    #[error("the CA client must be created inside a tokio runtime")]
    NoRuntime,
    /// The token file cannot be read.
    #[error(
        "cannot read the ServiceAccount token {}: {source} (mount a projected token with the CA's audience there)",
        path.display()
    )]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The token file is empty, too large, or not a token.
    #[error("the ServiceAccount token {} is not usable: {reason}", path.display())]
    BadToken {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The CA could not be reached.
    #[error(
        "cannot reach the CA at {address}: {detail} (is the CA running, and its address and port right?)"
    )]
    Unreachable {
        /// The CA's address.
        address: String,
        /// What failed.
        detail: String,
    },
    /// The TLS handshake with the CA failed.
    #[error(
        "the TLS handshake with the CA at {address} failed: {reason} (the CA's certificate must chain to the mesh root and name {server_name})"
    )]
    Tls {
        /// The CA's address.
        address: String,
        /// The name its certificate must carry.
        server_name: String,
        /// What TLS said.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("the CA at {address} did not answer within {after:?}")]
    Timeout {
        /// The CA's address.
        address: String,
        /// The deadline.
        after: Duration,
    },
    /// The CA did not accept the caller's credentials.
    #[error(
        "the CA at {address} refused to authenticate this agent: {message} (check the token's audience and that it is not expired)"
    )]
    Unauthenticated {
        /// The CA's address.
        address: String,
        /// The CA's reason.
        message: String,
    },
    /// The CA does not let this caller have that identity.
    #[error("the CA at {address} refused the certificate: {message}")]
    PermissionDenied {
        /// The CA's address.
        address: String,
        /// The CA's reason.
        message: String,
    },
    /// The CA is rate-limiting this caller.
    #[error("the CA at {address} is rate-limiting this node: {message} (retry later)")]
    RateLimited {
        /// The CA's address.
        address: String,
        /// The CA's reason.
        message: String,
    },
    /// The CA answered but cannot serve now (its Kubernetes API is down, it is
    /// at its request limit): it failed closed.
    #[error("the CA at {address} is unavailable: {message} (retry later)")]
    Unavailable {
        /// The CA's address.
        address: String,
        /// The CA's reason.
        message: String,
    },
    /// Any other refusal or failure the CA reported.
    #[error("the CA at {address} answered {code:?}: {message}")]
    Refused {
        /// The CA's address.
        address: String,
        /// The gRPC status code.
        code: Code,
        /// The CA's message.
        message: String,
    },
    /// The CA returned no certificate.
    #[error("the CA at {address} returned an empty certificate chain")]
    EmptyChain {
        /// The CA's address.
        address: String,
    },
    /// The CA returned something that is not a PEM certificate chain.
    #[error("the CA at {address} returned an unusable certificate chain: {reason}")]
    BadChain {
        /// The CA's address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The CSR could not be generated.
    #[error("cannot generate a CSR for {id}: {detail}")]
    Csr {
        /// The identity.
        id: SpiffeId,
        /// What failed.
        detail: String,
    },
}

/// A client of Istio's certificate service
/// (`istio.v1.auth.IstioCertificateService/CreateCertificate`). Cheap to
/// clone; connects lazily and reconnects by itself.
#[derive(Clone, Debug)]
pub struct IstioCaClient {
    client: IstioCertificateServiceClient<Channel>,
    address: String,
    server_name: String,
    token_file: Option<PathBuf>,
    cluster_id: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl IstioCaClient {
    /// A client for `cfg.address`, verifying the CA against `cfg.root_certs`
    /// (TLS 1.3 with the mesh's crypto provider, ALPN h2). Nothing is sent
    /// until the first request. Must be called inside a tokio runtime.
    pub fn new(cfg: CaClientConfig) -> Result<Self, CaClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(CaClientError::NoRuntime);
        }
        let bad = |reason: String| CaClientError::BadAddress {
            address: cfg.address.clone(),
            reason,
        };
        let uri: Uri = cfg.address.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https".into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("it has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
        let name = ServerName::try_from(server_name.clone())
            .map_err(|e| bad(format!("{server_name:?} is not a TLS server name: {e}")))?;
        if cfg.root_certs.is_empty() {
            return Err(CaClientError::BadRoots {
                detail: "no root certificate was given".into(),
            });
        }
        let mut roots = RootCertStore::empty();
        for root in &cfg.root_certs {
            roots
                .add(root.clone())
                .map_err(|e| CaClientError::BadRoots {
                    detail: e.to_string(),
                })?;
        }
        let mut tls = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaClientError::BadRoots {
                detail: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let connector = TlsConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            name,
            host,
            port,
            timeout: cfg.timeout,
        };
        let endpoint = Endpoint::from_shared(cfg.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint.connect_with_connector_lazy(connector);
        let client = IstioCertificateServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let cluster_id = cfg
            .cluster_id
            .as_deref()
            .map(|c| {
                AsciiMetadataValue::try_from(c)
                    .map_err(|_| bad(format!("cluster id {c:?} is not a header value")))
            })
            .transpose()?;
        Ok(Self {
            client,
            address: cfg.address,
            server_name,
            token_file: cfg.token_file,
            cluster_id,
            timeout: cfg.timeout,
        })
    }

    /// The CA's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends `csr_pem` and returns the PEM chain as the CA returned it (leaf
    /// first, root last; at least one certificate, each a PEM block). With
    /// `impersonate`, asks for that identity (the metadata ztunnel sends:
    /// `ImpersonatedIdentity` = the SPIFFE ID), as a node agent does for a
    /// pod on its node; without, the CA certifies the caller's own identity.
    /// `ttl` is the requested validity (the CA may shorten it).
    ///
    /// The token file is read again for every request.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        impersonate: Option<&SpiffeId>,
        ttl: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        });
        let mut req = Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        if let Some(path) = &self.token_file {
            let token = read_token(path).await?;
            let value = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                CaClientError::BadToken {
                    path: path.clone(),
                    reason: "it holds characters a token cannot have",
                }
            })?;
            req.metadata_mut().insert("authorization", value);
        }
        if let Some(cluster) = &self.cluster_id {
            req.metadata_mut().insert(
                AsciiMetadataKey::from_static(CLUSTER_ID_HEADER),
                cluster.clone(),
            );
        }
        let mut client = self.client.clone();
        // The channel enforces the deadline too; this one also covers a
        // connection stuck before the request is sent.
        let call = tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            client.create_certificate(req),
        );
        let resp = match call.await {
            Err(_) => {
                return Err(CaClientError::Timeout {
                    address: self.address.clone(),
                    after: self.timeout,
                });
            }
            Ok(Err(status)) => return Err(self.status_error(status)),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        self.check_chain(&resp.cert_chain)?;
        Ok(resp.cert_chain)
    }

    fn check_chain(&self, chain: &[String]) -> Result<(), CaClientError> {
        let bad = |reason: String| CaClientError::BadChain {
            address: self.address.clone(),
            reason,
        };
        if chain.is_empty() {
            return Err(CaClientError::EmptyChain {
                address: self.address.clone(),
            });
        }
        if chain.len() > MAX_CHAIN_LEN {
            return Err(bad(format!(
                "{} certificates (at most {MAX_CHAIN_LEN})",
                chain.len()
            )));
        }
        for (i, pem) in chain.iter().enumerate() {
            let n = CertificateDer::pem_slice_iter(pem.as_bytes())
                .try_fold(0usize, |n, c| c.map(|_| n + 1))
                .map_err(|e| bad(format!("element {i} is not PEM: {e}")))?;
            if n == 0 {
                return Err(bad(format!("element {i} holds no certificate")));
            }
        }
        Ok(())
    }

    fn status_error(&self, status: Status) -> CaClientError {
        let address = self.address.clone();
        let message = status.message().to_owned();
        if let Some(fail) = connect_failure(&status) {
            return match fail {
                ConnectFailure::Tls(reason) => CaClientError::Tls {
                    address,
                    server_name: self.server_name.clone(),
                    reason: reason.clone(),
                },
                ConnectFailure::Timeout => CaClientError::Timeout {
                    address,
                    after: self.timeout,
                },
                ConnectFailure::Tcp(detail) => CaClientError::Unreachable {
                    address,
                    detail: detail.clone(),
                },
            };
        }
        match status.code() {
            Code::Unauthenticated => CaClientError::Unauthenticated { address, message },
            Code::PermissionDenied => CaClientError::PermissionDenied { address, message },
            Code::ResourceExhausted => CaClientError::RateLimited { address, message },
            Code::DeadlineExceeded | Code::Cancelled if message.contains("Timeout") => {
                CaClientError::Timeout {
                    address,
                    after: self.timeout,
                }
            }
            // The channel's own status carries the transport error as its
            // source (no connection); one the server sent is the CA failing closed.
            Code::Unavailable if std::error::Error::source(&status).is_some() => {
                CaClientError::Unreachable {
                    address,
                    detail: full_message(&status),
                }
            }
            Code::Unavailable => CaClientError::Unavailable { address, message },
            code => CaClientError::Refused {
                address,
                code,
                message,
            },
        }
    }
}

/// The status's message followed by its causes.
fn full_message(status: &Status) -> String {
    let mut out = status.message().to_owned();
    let mut src = std::error::Error::source(status);
    while let Some(e) = src {
        out.push_str(": ");
        out.push_str(&e.to_string());
        src = e.source();
    }
    out
}

/// The connector's own failure, if the status carries one.
fn connect_failure(status: &Status) -> Option<&ConnectFailure> {
    let mut src = std::error::Error::source(status);
    while let Some(e) = src {
        if let Some(f) = e.downcast_ref::<ConnectFailure>() {
            return Some(f);
        }
        src = e.source();
    }
    None
}

async fn read_token(path: &Path) -> Result<String, CaClientError> {
    let io_err = |source| CaClientError::TokenFile {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(io_err)?;
    let mut buf = Vec::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(io_err)?;
    let bad = |reason| CaClientError::BadToken {
        path: path.to_owned(),
        reason,
    };
    if buf.len() as u64 > MAX_TOKEN_BYTES {
        return Err(bad("it is larger than 64 KiB"));
    }
    let token = String::from_utf8(buf).map_err(|_| bad("it is not text"))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(bad("it is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("it holds characters a token cannot have"));
    }
    Ok(token.to_owned())
}

/// Why the connector could not open a connection.
#[derive(Debug, thiserror::Error)]
enum ConnectFailure {
    #[error("{0}")]
    Tcp(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connection timed out")]
    Timeout,
}

/// TCP, then TLS 1.3 with the mesh's configuration.
#[derive(Clone)]
struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    host: String,
    port: u16,
    timeout: Duration,
}

type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl Service<Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, ConnectFailure>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = async {
                let tcp = TcpStream::connect((this.host.as_str(), this.port))
                    .await
                    .map_err(|e| ConnectFailure::Tcp(format!("TCP connect: {e}")))?;
                let _ = tcp.set_nodelay(true);
                let tls = this
                    .tls
                    .connect(this.name.clone(), tcp)
                    .await
                    .map_err(|e| ConnectFailure::Tls(tls_reason(&e)))?;
                if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                    return Err(ConnectFailure::Tls(
                        "the server did not agree to HTTP/2 (ALPN h2)".into(),
                    ));
                }
                Ok(TokioIo::new(tls))
            };
            tokio::time::timeout(this.timeout, connect)
                .await
                .unwrap_or(Err(ConnectFailure::Timeout))
        })
    }
}

fn tls_reason(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

/// Decodes a PEM chain as the CA returns it (one or more certificates per
/// element) into DER certificates, leaf first.
pub fn pem_chain_to_der(chain: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for (i, pem) in chain.iter().enumerate() {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            out.push(cert.map_err(|e| format!("element {i} is not PEM: {e}"))?);
        }
    }
    if out.is_empty() {
        return Err("the chain holds no certificate".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{MeshCa, TrustDomain};

    fn client() -> IstioCaClient {
        let g = MeshCa::generate(&TrustDomain::default(), 1).unwrap();
        let ca = MeshCa::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes(), None).unwrap();
        IstioCaClient::new(CaClientConfig {
            address: "https://mesh-ca.mesh-system.svc:15012".into(),
            server_name: None,
            root_certs: ca.roots().to_vec(),
            token_file: None,
            cluster_id: None,
            timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_config_is_checked() {
        let ok = client();
        assert_eq!(ok.server_name, "mesh-ca.mesh-system.svc");
        let mut cfg = CaClientConfig {
            address: "http://mesh-ca:15012".into(),
            server_name: None,
            root_certs: Vec::new(),
            token_file: None,
            cluster_id: None,
            timeout: Duration::from_secs(1),
        };
        let e = IstioCaClient::new(cfg.clone()).unwrap_err();
        assert!(matches!(e, CaClientError::BadAddress { .. }), "{e}");
        cfg.address = "https://mesh-ca:15012".into();
        let e = IstioCaClient::new(cfg).unwrap_err();
        assert!(matches!(e, CaClientError::BadRoots { .. }), "{e}");
    }

    #[test]
    fn outside_a_runtime_it_says_so() {
        let cfg = CaClientConfig {
            address: "https://mesh-ca:15012".into(),
            server_name: None,
            root_certs: Vec::new(),
            token_file: None,
            cluster_id: None,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            IstioCaClient::new(cfg),
            Err(CaClientError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn a_chain_must_hold_pem_certificates() {
        let c = client();
        let e = c.check_chain(&[]).unwrap_err();
        assert!(matches!(e, CaClientError::EmptyChain { .. }), "{e}");
        let e = c.check_chain(&["not pem".into()]).unwrap_err();
        assert!(matches!(e, CaClientError::BadChain { .. }), "{e}");
        let g = MeshCa::generate(&TrustDomain::default(), 1).unwrap();
        c.check_chain(std::slice::from_ref(&g.cert_pem)).unwrap();
        let e = c
            .check_chain(&vec![g.cert_pem.clone(); MAX_CHAIN_LEN + 1])
            .unwrap_err();
        assert!(matches!(e, CaClientError::BadChain { .. }), "{e}");
    }

    #[tokio::test]
    async fn server_statuses_map_to_what_to_do() {
        let c = client();
        let e = c.status_error(Status::permission_denied("no pod of shop/web on node-a"));
        assert!(
            matches!(&e, CaClientError::PermissionDenied { message, .. } if message.contains("node-a")),
            "{e}"
        );
        let e = c.status_error(Status::unauthenticated("bad token"));
        assert!(matches!(e, CaClientError::Unauthenticated { .. }), "{e}");
        let e = c.status_error(Status::resource_exhausted("slow down"));
        assert!(matches!(e, CaClientError::RateLimited { .. }), "{e}");
        let e = c.status_error(Status::unavailable("API down"));
        assert!(matches!(e, CaClientError::Unavailable { .. }), "{e}");
        let e = c.status_error(Status::invalid_argument("bad CSR"));
        assert!(
            matches!(
                e,
                CaClientError::Refused {
                    code: Code::InvalidArgument,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_token_file_is_read_with_care() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "  eyJhbGciOi.abc.def \n").unwrap();
        assert_eq!(read_token(&path).await.unwrap(), "eyJhbGciOi.abc.def");
        for bad in [&b"\n"[..], b"two words", b"\xff\xfe"] {
            std::fs::write(&path, bad).unwrap();
            let e = read_token(&path).await.unwrap_err();
            assert!(matches!(e, CaClientError::BadToken { .. }), "{e}");
        }
        std::fs::write(&path, vec![b'a'; MAX_TOKEN_BYTES as usize + 1]).unwrap();
        let e = read_token(&path).await.unwrap_err();
        assert!(matches!(e, CaClientError::BadToken { .. }), "{e}");
        let e = read_token(&dir.join("missing")).await.unwrap_err();
        assert!(matches!(e, CaClientError::TokenFile { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
