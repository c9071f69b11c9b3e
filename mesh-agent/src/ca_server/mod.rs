//! `mesh-agent ca serve`: Istio's certificate service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`) backed by
//! the mesh CA, so that agents hold no CA key and a node can only get the
//! identities of the pods scheduled on it.
//!
//! A request is authenticated with its bearer token through the Kubernetes
//! TokenReview API (audience `--audience`); the caller gets its own
//! identity, or, as a trusted node agent (`--node-service-account`)
//! impersonating (`ImpersonatedIdentity` metadata, as ztunnel sends it), the
//! identity of a pod scheduled on its node: Istio's NodeAuthorizer rules,
//! checked against the API server on every request. One audit line per
//! issuance (`certificate issued`) and refusal (`certificate refused`).
//!
//! # Files
//! - `service.rs`: the gRPC method, the audit lines.
//! - `authz.rs`: the caller and every decision, pure (unit-tested).
//! - `kube_api.rs`: TokenReview and pod lookups under deadlines.
//! - `tls.rs`: the server's certificate (rotated), TLS 1.3, the accept loop.
//! - `limits.rs`: the bounds and the per-node rate limiter.
//!
//! Imports `identity` (the CA, the protocol) and nothing else of the agent.
#![forbid(unsafe_code)]

pub mod authz;
mod kube_api;
pub mod limits;
mod reviewed;
mod service;
mod tls;

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use authz::{Refusal, ServiceAccountRef};

use crate::identity::istio_ca::proto::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::identity::{MeshCa, SignError, TrustDomain};
use limits::{
    MAX_CONNECTION_AGE, MAX_HEADER_LIST_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
    MAX_STREAMS_PER_CONNECTION, REQUEST_TIMEOUT,
};

/// The default port, istiod's.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// The default DNS name of the server's certificate.
pub const DEFAULT_DNS_NAME: &str = "mesh-ca.mesh-system.svc";
/// The default token audience (Istio's CA audience).
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The default trusted node agent account.
pub const DEFAULT_NODE_SERVICE_ACCOUNT: &str = "mesh-system/mesh-agent";
/// Default open connections per source address: an agent (or a waypoint)
/// keeps one; a source holding idle connections cannot take the others'.
pub const DEFAULT_CONNECTIONS_PER_SOURCE: usize = 32;
/// Default of [`CaServerConfig::token_review_cache`]: the API server's own
/// cache of successful token authentications keeps them as long.
pub const DEFAULT_TOKEN_REVIEW_CACHE: Duration = Duration::from_secs(10);

/// How the CA server runs.
#[derive(Debug, Clone)]
pub struct CaServerConfig {
    /// The CA that signs.
    pub ca: Arc<MeshCa>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The DNS names of the server's own certificate.
    pub dns_names: Vec<String>,
    /// The trust domain it issues for.
    pub trust_domain: TrustDomain,
    /// The audience tokens must be for.
    pub audience: String,
    /// The node agents' service accounts, trusted to impersonate pods of their node.
    pub node_service_accounts: BTreeSet<ServiceAccountRef>,
    /// The longest validity granted (longer requests are shortened).
    pub max_cert_ttl: Duration,
    /// The shortest validity granted (shorter requests are lengthened).
    pub min_cert_ttl: Duration,
    /// Requests per second per node.
    pub rate_per_node: f64,
    /// Requests a node may make at once above the rate.
    pub rate_burst: u32,
    /// Requests handled at once (beyond: UNAVAILABLE, retry).
    pub max_concurrent_requests: usize,
    /// Open connections (beyond: new ones are closed).
    pub max_connections: usize,
    /// Of those, from one source address (an agent keeps one).
    pub max_connections_per_source: usize,
    /// Deadline of each Kubernetes API call.
    pub api_timeout: Duration,
    /// How long a token the API server authenticated is taken as reviewed
    /// without asking again, from when the review was asked, never past the
    /// token's `exp` (zero: every request is reviewed, none shared).
    pub token_review_cache: Duration,
    /// Validity of the server's own certificate (re-signed at half-life).
    pub serving_cert_ttl: Duration,
}

impl CaServerConfig {
    /// The defaults, for `ca` and `trust_domain`.
    pub fn new(ca: Arc<MeshCa>, trust_domain: TrustDomain) -> Self {
        Self {
            ca,
            listen: SocketAddr::from(([0, 0, 0, 0], 15012)),
            dns_names: vec![DEFAULT_DNS_NAME.to_owned()],
            trust_domain,
            audience: DEFAULT_AUDIENCE.to_owned(),
            node_service_accounts: [ServiceAccountRef {
                namespace: "mesh-system".into(),
                name: "mesh-agent".into(),
            }]
            .into(),
            max_cert_ttl: Duration::from_secs(24 * 3600),
            min_cert_ttl: Duration::from_secs(10 * 60),
            rate_per_node: 5.0,
            rate_burst: 200,
            max_concurrent_requests: 64,
            max_connections: 4096,
            max_connections_per_source: DEFAULT_CONNECTIONS_PER_SOURCE,
            api_timeout: Duration::from_secs(5),
            token_review_cache: DEFAULT_TOKEN_REVIEW_CACHE,
            serving_cert_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why the CA server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source} (is the port in use, or --listen wrong?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server's own certificate cannot be signed.
    #[error("cannot sign the CA server's certificate: {0}")]
    ServingCert(#[source] SignError),
    /// No DNS name for the server's certificate.
    #[error("the CA server needs at least one --dns-name (the name agents connect to)")]
    NoDnsName,
    /// The TLS configuration cannot be built.
    #[error("cannot configure TLS: {0}")]
    Tls(#[source] rustls::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[source] tonic::transport::Error),
    /// The server task ended abnormally.
    #[error("the CA server task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A running CA server.
pub struct CaServer {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl CaServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open requests finish, and waits.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.cancel.cancel();
        self.task.await.map_err(ServeError::Task)?
    }

    /// Waits until the server stops (an error, or `shutdown` elsewhere).
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        (&mut self.task).await.map_err(ServeError::Task)?
    }
}

/// Binds `cfg.listen`, signs the server's certificate, and serves until
/// [`CaServer::shutdown`], checking requests with `client`.
pub async fn start(cfg: CaServerConfig, client: kube::Client) -> Result<CaServer, ServeError> {
    if cfg.dns_names.is_empty() {
        return Err(ServeError::NoDnsName);
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let cancel = CancellationToken::new();
    let cert = tls::serving_cert(
        Arc::clone(&cfg.ca),
        cfg.dns_names.clone(),
        cfg.serving_cert_ttl,
        cancel.clone(),
    )
    .map_err(ServeError::ServingCert)?;
    let tls = tls::server_config(cert).map_err(ServeError::Tls)?;
    let rx = tls::accept_loop(
        listener,
        tls,
        cfg.max_connections,
        cfg.max_connections_per_source,
        cancel.clone(),
    );
    let incoming = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    tracing::info!(
        listen = %local_addr,
        dns_names = ?cfg.dns_names,
        trust_domain = %cfg.trust_domain,
        audience = %cfg.audience,
        node_service_accounts = ?cfg.node_service_accounts.iter().map(ToString::to_string).collect::<Vec<_>>(),
        max_cert_ttl_secs = cfg.max_cert_ttl.as_secs(),
        ca = %cfg.ca.subject(),
        "CA server listening"
    );
    let api = kube_api::KubeApi::new(client, cfg.api_timeout);
    let service = service::CaService::new(Arc::new(cfg), api);
    let svc = IstioCertificateServiceServer::new(service)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let signal = cancel.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_connection_age(MAX_CONNECTION_AGE)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .serve_with_incoming_shutdown(svc, incoming, signal)
            .await
            .map_err(ServeError::Transport)
    });
    Ok(CaServer {
        local_addr,
        cancel,
        task,
    })
}
