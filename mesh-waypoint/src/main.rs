//! `mesh-waypoint run`: the waypoint binary.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::identity::{IssuerArgs, Requester, SpiffeId};
use mesh_waypoint::config::WaypointConfig;

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
    Run {
        /// The HBONE listener.
        #[arg(long, default_value = "0.0.0.0:15008")]
        listen: SocketAddr,
        /// The admin listener (/healthz/ready, /metrics, /config_dump).
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: SocketAddr,
        /// The waypoint's SPIFFE identity (its service account's).
        #[arg(long)]
        identity: String,
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
        #[arg(long)]
        config: PathBuf,
        /// Export one span per sampled request over OTLP/gRPC to this
        /// collector (`http://host:4317`); off when absent.
        #[arg(long)]
        otlp_endpoint: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Command::Run {
        listen,
        admin,
        identity,
        issuer,
        cert_ttl,
        config,
        otlp_endpoint,
    } = Cli::parse().command;
    let identity = SpiffeId::parse(&identity).context("--identity")?;
    let config_path = config;
    let config = WaypointConfig::load(&config_path)?;
    let in_kubernetes = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let provider = issuer.config()?.provider(
        identity.trust_domain(),
        cert_ttl,
        Requester::Itself,
        in_kubernetes,
    )?;
    let running = mesh_waypoint::start(identity, provider, &config, listen, admin).await?;
    if let Some(endpoint) = otlp_endpoint {
        running
            .shared
            .export_spans(mesh_waypoint::otlp::OtlpConfig::new(endpoint))
            .context("--otlp-endpoint")?;
    }
    tokio::spawn(mesh_waypoint::watch_config(
        Arc::clone(&running.shared),
        config_path,
        std::time::Duration::from_secs(2),
    ));
    running.wait().await;
    Ok(())
}
