//! `mesh-waypoint run`: the waypoint binary.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::proxy::limits::{LimitOverrides, Limits};
use mesh_agent::{
    identity::{IssuerArgs, IssuerConfig, Requester, SpiffeId, TrustDomain},
    state::{Store, WaypointRef},
    sync::kube::{KubeConfig, client},
};
use mesh_waypoint::config::WaypointConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mesh-waypoint",
    about = "The mesh's L7 waypoint proxy (HBONE in, HTTP routing)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HBONE tunnels and route the HTTP inside them.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// The admin listener (/healthz/ready, /metrics, /config_dump): keep it
    /// on loopback, the dump shows the policies guarding each service.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// A listener for /healthz/ready and /metrics only, at most 64
    /// connections (Prometheus; `0.0.0.0:15020` in a cluster).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A listener for /healthz/ready only, capped per source address (the
    /// kubelet's probes; `0.0.0.0:15021` in a cluster): a pod holding the
    /// metrics listener's connections cannot get the waypoint restarted.
    #[arg(long)]
    readiness: Option<SocketAddr>,
    /// The waypoint's SPIFFE identity (its service account's). Default:
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    #[arg(long)]
    identity: Option<String>,
    /// The trust domain of the default identity.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = mesh_agent::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Who issues the waypoint's certificate: the same flags as
    /// `mesh-agent run` (`--issuer istio-ca --ca-address ... --ca-root-cert
    /// ... --ca-token-file ...` in a cluster: no CA key here; `--ca-dir`
    /// for a local CA in labs).
    #[command(flatten)]
    issuer: IssuerArgs,
    /// Lifetime of the waypoint's certificate (`30m`, `24h`); rotated at 40-50 %.
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = mesh_agent::cli::parse_duration)]
    cert_ttl: std::time::Duration,
    /// The services and routes (YAML; see the README), re-read every 2 s.
    /// Without it, Kubernetes mode.
    #[arg(long, conflicts_with = "kube")]
    config: Option<PathBuf>,
    /// Kubernetes mode: the services that use this waypoint
    /// (`istio.io/use-waypoint`), their endpoints, routes and policies, from the API server.
    #[arg(long, env = "MESH_KUBE")]
    kube: bool,
    /// The API server URL, spoken to in plain HTTP without authentication
    /// (`kubectl proxy`, tests). Default: the in-cluster service account, else KUBECONFIG.
    #[arg(long, env = "MESH_API_SERVER")]
    api_server: Option<String>,
    /// This waypoint's name (its Gateway's and Service's).
    #[arg(long, env = "WAYPOINT_NAME", default_value = "waypoint")]
    waypoint_name: String,
    /// This waypoint's namespace (the downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    waypoint_namespace: String,
    /// The waypoint's service account (the default identity's); default: its name.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// Istio's root namespace (Kubernetes mode): its policies targeting the
    /// `istio-waypoint` GatewayClass apply to every waypoint.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = mesh_policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Export one span per sampled request over OTLP/gRPC to this
    /// collector (`http://host:4317`); off when absent.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// A tunnel stream moving no byte either way this long is reset
    /// (Istio's TCP idle timeout; `90s`, `30m`, `1h`).
    #[arg(long, env = "MESH_WAYPOINT_STREAM_IDLE_TIMEOUT", default_value = "1h", value_parser = mesh_agent::cli::parse_duration)]
    stream_idle_timeout: std::time::Duration,
    /// Routing options (as the node agent's).
    #[command(flatten)]
    routing: mesh_agent::cli::RoutingArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Command::Run(args) = Cli::parse().command;
    let trust_domain = TrustDomain::new(&args.trust_domain).context("--trust-domain")?;
    let identity = match &args.identity {
        Some(id) => SpiffeId::parse(id).context("--identity")?,
        None => SpiffeId::new(
            trust_domain.clone(),
            &args.waypoint_namespace,
            args.service_account
                .as_deref()
                .unwrap_or(&args.waypoint_name),
        )
        .context("the default identity (--waypoint-namespace, --service-account)")?,
    };
    let issuer = args.issuer.config()?;
    let in_kubernetes =
        args.config.is_none() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let provider = issuer.provider(
        identity.trust_domain(),
        args.cert_ttl,
        Requester::Itself,
        in_kubernetes,
    )?;
    if in_kubernetes && matches!(issuer, IssuerConfig::Local { .. }) {
        tracing::warn!(
            "LOCAL CA IN KUBERNETES MODE: this waypoint holds the mesh CA's private key and can \
             sign any identity. Use --issuer istio-ca (deploy/waypoint/)"
        );
    }
    let describe = provider.describe();
    tracing::info!(identity = %identity, issuer = %describe.kind, endpoint = %describe.endpoint, "waypoint identity");
    // As the agent: the soft RLIMIT_NOFILE raised to the hard limit, and
    // the connection caps sized from it (not from an assumed 65 536).
    let (limits, fd_limit) = Limits::for_this_process(&LimitOverrides::default());
    tracing::info!(
        fd_limit = fd_limit.soft,
        max_connections = limits.max_connections,
        "resource limits"
    );
    let cancel = CancellationToken::new();
    // What the configuration comes from, and is followed in.
    enum Source {
        File(PathBuf),
        Kube(Store, WaypointRef),
    }
    let mut _kube_source = None;
    let (config, source) = match args.config.clone().filter(|_| !args.kube) {
        Some(config_path) => (
            WaypointConfig::load(&config_path)?,
            Source::File(config_path),
        ),
        None => {
            let me = WaypointRef {
                namespace: args.waypoint_namespace.clone(),
                name: args.waypoint_name.clone(),
            };
            let client = client(args.api_server.as_deref()).await?;
            let store = Store::with_root_namespace(&args.root_namespace);
            tracing::info!(waypoint = %me, "kubernetes mode: waiting for the first sync");
            _kube_source = Some(
                mesh_agent::sync::kube::start(
                    client,
                    KubeConfig::observer(),
                    store.clone(),
                    cancel.clone(),
                )
                .await?,
            );
            let config = mesh_waypoint::kube::config_from_snapshot(
                &store.current(),
                &me,
                store.root_namespace(),
            );
            (config, Source::Kube(store, me))
        }
    };
    // Every setting in force before the first connection is accepted.
    let settings = mesh_waypoint::Settings {
        limits,
        fd_limit,
        stream_idle_timeout: args.stream_idle_timeout,
        default_virtual_service_export_to: args.routing.default_virtual_service_export_to,
    };
    let mut running = mesh_waypoint::start_with(
        identity,
        provider,
        &config,
        args.listen,
        args.admin,
        settings,
    )
    .await?;
    if let Some(addr) = args.metrics {
        running.serve_metrics(addr).await?;
    }
    if let Some(addr) = args.readiness {
        running.serve_readiness(addr).await?;
    }
    let shared = Arc::clone(&running.shared);
    match source {
        Source::File(path) => tokio::spawn(mesh_waypoint::watch_config(
            shared,
            path,
            std::time::Duration::from_secs(2),
        )),
        Source::Kube(store, me) => tokio::spawn(mesh_waypoint::kube::follow(
            store,
            shared,
            me,
            cancel.clone(),
        )),
    };
    if let Some(endpoint) = &args.otlp_endpoint {
        running
            .shared
            .export_spans(mesh_waypoint::otlp::OtlpConfig::new(endpoint.clone()))
            .context("--otlp-endpoint")?;
    }
    running.wait().await;
    cancel.cancel();
    Ok(())
}
