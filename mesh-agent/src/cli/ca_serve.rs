//! `mesh-agent ca serve`: the flags, and running the CA server until
//! SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;

use crate::admin::logging::{self, LogFormat};
use crate::ca_server::{
    self, CaServerConfig, DEFAULT_AUDIENCE, DEFAULT_DNS_NAME, DEFAULT_LISTEN,
    DEFAULT_NODE_SERVICE_ACCOUNT, ServiceAccountRef,
};
use crate::identity::{DEFAULT_TRUST_DOMAIN, MeshCa, TrustDomain};

/// The flags of `mesh-agent ca serve`.
#[derive(Debug, clap::Args)]
pub struct CaServeArgs {
    /// The mesh CA directory (ca.crt, ca.key), from `mesh-agent ca init`.
    #[arg(long, env = "MESH_CA_DIR")]
    ca_dir: PathBuf,
    /// Where to serve Istio's certificate service (gRPC over TLS).
    #[arg(long, env = "MESH_CA_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// A DNS name of the server's certificate (the name agents connect to); repeatable.
    #[arg(long = "dns-name", env = "MESH_CA_DNS_NAMES", value_delimiter = ',', default_value = DEFAULT_DNS_NAME)]
    dns_names: Vec<String>,
    /// The mesh's trust domain (SPIFFE): the only one issued for.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The audience callers' tokens must be for (TokenReview spec.audiences).
    #[arg(long, env = "MESH_CA_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    audience: String,
    /// A node agent's service account (NAMESPACE/NAME), trusted to request
    /// certificates for pods on its node; repeatable.
    #[arg(long = "node-service-account", env = "MESH_CA_NODE_SERVICE_ACCOUNTS", value_delimiter = ',', default_value = DEFAULT_NODE_SERVICE_ACCOUNT)]
    node_service_accounts: Vec<ServiceAccountRef>,
    /// The longest certificate validity granted (longer requests are capped).
    #[arg(long, env = "MESH_CA_MAX_CERT_TTL", default_value = "24h", value_parser = super::parse_duration)]
    max_cert_ttl: Duration,
    /// The shortest certificate validity granted (shorter requests get this).
    #[arg(long, env = "MESH_CA_MIN_CERT_TTL", default_value = "10m", value_parser = super::parse_duration)]
    min_cert_ttl: Duration,
    /// Certificate requests per second per node and service account (beyond
    /// the burst: RESOURCE_EXHAUSTED); also the rate at which a source
    /// address's failed authentications are allowed before it is paused.
    #[arg(long, env = "MESH_CA_RATE_PER_NODE", default_value_t = 5.0)]
    rate_per_node: f64,
    /// Requests a node may make at once above the rate (a restarted agent asks for all its pods).
    #[arg(long, env = "MESH_CA_RATE_BURST", default_value_t = 200)]
    rate_burst: u32,
    /// Requests handled at once (beyond: UNAVAILABLE, clients retry).
    #[arg(long, env = "MESH_CA_MAX_CONCURRENT_REQUESTS", default_value_t = 64)]
    max_concurrent_requests: usize,
    /// Open client connections (beyond: new ones are closed).
    #[arg(long, env = "MESH_CA_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Of those, from one source address (an agent keeps one).
    #[arg(long, env = "MESH_CA_MAX_CONNECTIONS_PER_SOURCE", default_value_t = crate::ca_server::DEFAULT_CONNECTIONS_PER_SOURCE)]
    max_connections_per_source: usize,
    /// Deadline of each Kubernetes API call (TokenReview, pod lookups).
    #[arg(long, env = "MESH_CA_API_TIMEOUT", default_value = "5s", value_parser = super::parse_duration)]
    api_timeout: Duration,
    /// How long a token the API server authenticated is taken as reviewed
    /// without a new TokenReview, from when the review was asked and never
    /// past the token's `exp` (a token revoked meanwhile is honoured that
    /// long, as by the API server's own cache); requests with one token
    /// arriving together share one review. 0s reviews every request.
    #[arg(long, env = "MESH_CA_TOKEN_REVIEW_CACHE", default_value = "10s", value_parser = super::parse_duration)]
    token_review_cache: Duration,
    /// The API server URL, spoken to in plain HTTP without authentication
    /// (`kubectl proxy`, tests). Default: the in-cluster service account, else KUBECONFIG.
    #[arg(long, env = "MESH_API_SERVER")]
    api_server: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
}

impl CaServeArgs {
    fn config(&self) -> anyhow::Result<CaServerConfig> {
        let td = TrustDomain::new(&self.trust_domain)?;
        if self.rate_per_node.is_nan() || self.rate_per_node <= 0.0 {
            anyhow::bail!("--rate-per-node must be a positive number of requests per second");
        }
        let ca = MeshCa::load_dir(&self.ca_dir)?;
        let mut cfg = CaServerConfig::new(Arc::new(ca), td);
        cfg.listen = self.listen;
        cfg.dns_names = self.dns_names.clone();
        cfg.audience = self.audience.clone();
        cfg.node_service_accounts = self.node_service_accounts.iter().cloned().collect();
        cfg.max_cert_ttl = self.max_cert_ttl;
        cfg.min_cert_ttl = self.min_cert_ttl.min(self.max_cert_ttl);
        cfg.rate_per_node = self.rate_per_node;
        cfg.rate_burst = self.rate_burst.max(1);
        cfg.max_concurrent_requests = self.max_concurrent_requests.max(1);
        cfg.max_connections = self.max_connections.max(1);
        cfg.max_connections_per_source = self.max_connections_per_source.max(1);
        cfg.api_timeout = self.api_timeout;
        cfg.token_review_cache = self.token_review_cache;
        Ok(cfg)
    }
}

/// Runs the CA server until SIGTERM or Ctrl-C.
pub fn run(args: &CaServeArgs) -> anyhow::Result<()> {
    logging::init(args.log_format);
    let cfg = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mesh-ca")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let client = crate::sync::kube::config::client(args.api_server.as_deref()).await?;
        let mut server = ca_server::start(cfg, client).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        tokio::select! {
            r = server.wait() => return r.map_err(anyhow::Error::from),
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("CA server stopping");
        server.shutdown().await.map_err(anyhow::Error::from)
    })
}
