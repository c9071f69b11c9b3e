//! The command line: `run` (the agent), and the diagnostics that work with
//! or without a running agent.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    admin::logging::{self, LogFormat},
    agent::{self, RunConfig},
    datapath::{self, DEFAULT_PIN_DIR, counters::Counters},
    sync,
};

pub mod ca_serve;
pub mod check;
pub mod client;
pub mod query;
pub mod render;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless eBPF service-mesh node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum Command {
    /// Run the agent: load the datapath, enroll pods, proxy their traffic.
    Run(RunArgs),
    /// The mesh certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Validate a workload file and compile its policies; exit non-zero,
    /// naming the policy and field, if anything is invalid.
    Check {
        /// The workload file.
        #[arg(long, env = "MESH_WORKLOADS")]
        workloads: PathBuf,
        /// Istio's root namespace, as given to `run`.
        #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = crate::proxy::authz::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
    },
    /// Print the kernel programs' counters (from the pinned map; no agent needed).
    Stats {
        /// The agent's bpffs pin directory.
        #[arg(long, env = "MESH_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach every program and remove the pinned maps: pods' traffic goes direct.
    Uninstall {
        /// The agent's bpffs pin directory.
        #[arg(long, env = "MESH_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    #[command(flatten)]
    Query(query::QueryCommand),
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum CaCommand {
    /// Create a new root CA for a new mesh (ca.crt, ca.key with mode 0600); never overwrites.
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The mesh's trust domain.
        #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity of the root, in days.
        #[arg(long, default_value_t = crate::identity::DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Serve Istio's certificate service with the mesh CA: agents get
    /// certificates for the pods on their node without holding the CA key.
    Serve(ca_serve::CaServeArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The workload file (YAML) describing the node and its pods; re-read on
    /// change. Not read with --kube.
    #[arg(long, env = "MESH_WORKLOADS", required_unless_present = "kube")]
    workloads: Option<PathBuf>,
    #[command(flatten)]
    kube: sync::kube::KubeArgs,
    /// bpffs directory where programs and maps are pinned.
    #[arg(long, env = "MESH_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// cgroup2 directory covering the pods (default: the cgroup2 mount root).
    #[arg(long, env = "MESH_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Load this eBPF object instead of the embedded one (`cargo xtask build-ebpf`).
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// Log level of the kernel programs (aya-log), shown at the agent's debug level.
    #[arg(long, value_enum, default_value_t = KernelLog::Off)]
    kernel_log: KernelLog,
    /// How often the workload file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(flatten)]
    endpoints: query::EndpointArgs,
    #[command(flatten)]
    issuer: crate::identity::IssuerArgs,
    /// The mesh's trust domain (SPIFFE).
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of workload certificates (`90s`, `30m`, `24h`); rotated at half-life.
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// Istio's root namespace: AuthorizationPolicy/PeerAuthentication there apply mesh-wide.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = crate::proxy::authz::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    #[command(flatten)]
    routing: RoutingArgs,
    /// On SIGTERM, how long open connections keep being served (new ones go
    /// to the next agent) before the agent exits (`30s`, `2m`).
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[command(flatten)]
    limits: LimitArgs,
    /// Same-node fast path: a connection between two pods this agent serves
    /// is delivered directly (source identity, policy, telemetry and the
    /// access log as over HBONE), without TLS and HTTP/2 to itself.
    /// `false`: same-node traffic goes through an HBONE tunnel like any other.
    #[arg(long, env = "MESH_SAME_NODE_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    same_node_fast_path: bool,
    /// Send a client's first bytes on its tunnel stream before the
    /// destination's node proxy answers the `CONNECT` (early data: one read,
    /// up to 16 KiB, only while the answer is pending; never to a waypoint).
    /// `false`: wait for the answer, as ztunnel does.
    #[arg(long, env = "MESH_TUNNEL_EARLY_DATA", default_value_t = true, action = clap::ArgAction::Set)]
    tunnel_early_data: bool,
    /// Plaintext relays (the same-node fast path, passthrough, plaintext
    /// inbound) move a bulk transfer by `splice(2)`, socket to pipe to
    /// socket, without copying its bytes through the agent.
    /// `false`: they copy every byte through the agent.
    #[arg(long, env = "MESH_RELAY_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
    relay_splice: bool,
    /// Threads serving the pods' connections, each with its own listeners
    /// and tunnel connections (default: one per CPU, at most 4).
    #[arg(long, env = "MESH_PROXY_THREADS", value_parser = clap::value_parser!(u16).range(1..=crate::proxy::threads::MAX_THREADS as i64))]
    proxy_threads: Option<u16>,
}

/// Connection caps and HBONE deadlines (`mesh-agent run`). Caps left unset
/// are sized from the file-descriptor limit (see `/config_dump` `limits`).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Concurrent proxied connections, all pods and directions (each inbound
    /// HBONE stream counts as one); beyond it new ones are reset.
    #[arg(long, env = "MESH_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Inbound HBONE connections between accept and their first CONNECT.
    #[arg(long, env = "MESH_MAX_HANDSHAKES")]
    max_handshakes: Option<usize>,
    /// Of those, from one source address (default: an eighth).
    #[arg(long, env = "MESH_MAX_HANDSHAKES_PER_SOURCE")]
    max_handshakes_per_source: Option<usize>,
    /// Concurrent inbound HBONE connections per peer identity.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_PEER")]
    max_connections_per_peer: Option<usize>,
    /// Concurrent inbound HBONE streams per peer identity (beyond: HTTP 503).
    #[arg(long, env = "MESH_MAX_STREAMS_PER_PEER")]
    max_streams_per_peer: Option<usize>,
    /// Concurrent streams per inbound HBONE connection (default 100, as Istio).
    #[arg(long, env = "MESH_MAX_STREAMS_PER_CONNECTION")]
    max_streams_per_connection: Option<u32>,
    /// Deadline for an inbound HBONE connection's TLS and HTTP/2 handshakes (default 10s).
    #[arg(long, env = "MESH_HBONE_HANDSHAKE_TIMEOUT", value_parser = parse_duration)]
    hbone_handshake_timeout: Option<Duration>,
    /// Deadline for the first CONNECT after the HTTP/2 handshake (default 10s).
    #[arg(long, env = "MESH_HBONE_FIRST_REQUEST_TIMEOUT", value_parser = parse_duration)]
    hbone_first_request_timeout: Option<Duration>,
    /// An inbound HBONE connection without streams this long is closed
    /// (GOAWAY; default 60s, above the client pools' 30s).
    #[arg(long, env = "MESH_HBONE_IDLE_TIMEOUT", value_parser = parse_duration)]
    hbone_idle_timeout: Option<Duration>,
    /// Bytes all tunnel peers together may send ahead of the apps reading
    /// them (the HTTP/2 connection windows granted, on inbound tunnels and
    /// the agent's own outbound ones; default 1 GiB): what they can make the
    /// agent buffer. A connection beyond it gets a smaller window, at least
    /// HTTP/2's 65,535 bytes, which grows back as the budget frees.
    #[arg(long, env = "MESH_MAX_TUNNEL_WINDOW_BYTES")]
    max_tunnel_window_bytes: Option<u64>,
    /// Of those, one share's (default: a quarter): an inbound tunnel's peer
    /// identity, an outbound tunnel's local client identity (the two
    /// directions counted apart: an identity can hold this in each).
    #[arg(long, env = "MESH_MAX_TUNNEL_WINDOW_BYTES_PER_PEER")]
    max_tunnel_window_bytes_per_peer: Option<u64>,
}

impl LimitArgs {
    fn overrides(&self) -> crate::proxy::limits::LimitOverrides {
        crate::proxy::limits::LimitOverrides {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            max_connections_per_peer: self.max_connections_per_peer,
            max_streams_per_peer: self.max_streams_per_peer,
            max_streams_per_connection: self.max_streams_per_connection,
            handshake_timeout: self.hbone_handshake_timeout,
            first_request_timeout: self.hbone_first_request_timeout,
            idle_timeout: self.hbone_idle_timeout,
            max_tunnel_window: self.max_tunnel_window_bytes,
            max_tunnel_window_per_peer: self.max_tunnel_window_bytes_per_peer,
        }
    }
}

/// `90s`, `30m`, `24h`, `2d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m or 24h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("a duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum KernelLog {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

/// Parses the command line and runs it. Errors are printed with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            logging::init(args.log_format);
            let cgroup = match args.cgroup.or_else(datapath::cgroup2_mount) {
                Some(c) => c,
                None => {
                    eprintln!(
                        "error: no cgroup2 filesystem is mounted; mount one or pass --cgroup"
                    );
                    return ExitCode::from(2);
                }
            };
            agent::run(RunConfig {
                workloads: args.workloads.unwrap_or_default(),
                kube: args.kube.kube.then_some(args.kube),
                pin_dir: args.pin_dir,
                cgroup,
                ebpf_object: args.ebpf_object,
                kernel_log_level: args.kernel_log as u8,
                reload_interval: Duration::from_millis(args.reload_interval_ms.max(50)),
                admin: args.endpoints.config(),
                issuer: match args.issuer.config() {
                    Ok(issuer) => issuer,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
                trust_domain: args.trust_domain,
                cert_ttl: args.cert_ttl,
                root_namespace: args.root_namespace,
                default_virtual_service_export_to: args.routing.default_virtual_service_export_to,
                drain_timeout: args.drain_timeout,
                limits: args.limits.overrides(),
                same_node_fast_path: args.same_node_fast_path,
                tunnel_early_data: args.tunnel_early_data,
                relay_splice: args.relay_splice,
                proxy_threads: args.proxy_threads.map(usize::from),
            })
        }
        Command::Ca(CaCommand::Init {
            out,
            trust_domain,
            days,
        }) => ca_init(&out, &trust_domain, days),
        Command::Ca(CaCommand::Serve(args)) => ca_serve::run(&args),
        Command::Check {
            workloads,
            root_namespace,
        } => check::run(&workloads, &root_namespace),
        Command::Stats { pin_dir, json } => stats(&pin_dir, json),
        Command::Uninstall { pin_dir } => datapath::uninstall(&pin_dir)
            .map(|n| println!("removed {n} pinned objects under {}", pin_dir.display()))
            .map_err(anyhow::Error::from),
        Command::Query(q) => query::run(&q),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ca_init(out: &std::path::Path, trust_domain: &str, days: u32) -> anyhow::Result<()> {
    let td = crate::identity::TrustDomain::new(trust_domain)?;
    let (cert, key) = crate::identity::MeshCa::init_dir(out, &td, days)?;
    println!(
        "created the mesh CA for trust domain {trust_domain}: {} and {}",
        cert.display(),
        key.display()
    );
    println!(
        "distribute it with: kubectl -n mesh-system create secret generic mesh-ca --from-file={} --from-file={}",
        cert.display(),
        key.display()
    );
    Ok(())
}

fn stats(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let reading = Counters::open_pinned(pin_dir)?.read()?;
    if json {
        let obj: serde_json::Map<String, serde_json::Value> = reading
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for (name, value) in reading {
            println!("{name:<28} {value}");
        }
    }
    Ok(())
}

/// Routing options the agent and the waypoint share (`mesh-waypoint run`
/// flattens them too).
#[derive(clap::Args, Clone, Debug)]
pub struct RoutingArgs {
    /// The `exportTo` of a VirtualService that sets none (Istio's mesh
    /// option `defaultVirtualServiceExportTo`): `*` (every namespace, Istio's
    /// default) or `.` (its own namespace's clients: in a multi-tenant
    /// cluster, a tenant's VirtualService for another namespace's service
    /// then routes only the tenant's own connections); comma-separated.
    /// The waypoint takes the same flag.
    #[arg(
        long,
        env = "MESH_DEFAULT_VIRTUAL_SERVICE_EXPORT_TO",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub default_virtual_service_export_to: Vec<String>,
}
