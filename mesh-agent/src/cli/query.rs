//! The subcommands that ask a running agent (its admin endpoint):
//! `status`, `workloads`, `policies`, `certs`, `connections`, `routes`; and the
//! `run` options that place the agent's endpoints.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::Subcommand;
use serde_json::Value;

use super::{client, render};
use crate::admin::{AdminConfig, DEFAULT_ADMIN_ADDR, DEFAULT_READINESS_ADDR, METRICS_PORT};

/// Where `mesh-agent run` serves its HTTP endpoints.
#[derive(Clone, Debug, clap::Args)]
pub struct EndpointArgs {
    /// Admin endpoint (`/config_dump`, `/logging`, `/stats`, `/connections`); keep it on loopback.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`; they name every workload and SPIFFE
    /// ID of the node). Default: the agent's pod IP (`--pod-ip`) on port
    /// 15020 if given, else loopback (`127.0.0.1:15020`); never all addresses
    /// unless asked for.
    #[arg(long, env = "MESH_METRICS_ADDR", conflicts_with = "metrics_loopback")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve metrics on loopback only (`127.0.0.1:15020`), even with a pod IP.
    #[arg(long, env = "MESH_METRICS_LOOPBACK")]
    pub metrics_loopback: bool,
    /// The agent's own pod IP (the downward API's `status.podIP`): where
    /// metrics are served by default.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Readiness probe (`/healthz/ready`; says ready or not, nothing else).
    #[arg(long, env = "MESH_READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
}

impl EndpointArgs {
    /// The agent's endpoint configuration.
    pub fn config(&self) -> AdminConfig {
        AdminConfig {
            admin_addr: self.admin_addr,
            metrics_addr: metrics_addr(self.metrics_addr, self.metrics_loopback, self.pod_ip),
            readiness_addr: self.readiness_addr,
        }
    }
}

/// Where metrics are served: the address asked for, else loopback if asked
/// for, else the pod IP, else loopback (safe where no pod IP is known: the
/// file mode and the lab).
pub fn metrics_addr(
    explicit: Option<SocketAddr>,
    loopback: bool,
    pod_ip: Option<IpAddr>,
) -> SocketAddr {
    match (explicit, loopback, pod_ip) {
        (Some(addr), _, _) => addr,
        (None, false, Some(ip)) => SocketAddr::new(ip, METRICS_PORT),
        (None, _, _) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), METRICS_PORT),
    }
}

/// How to reach the agent and how to print.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The agent's admin address (run the command in the node's network namespace).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The subcommands that query a running agent.
#[derive(Clone, Debug, Subcommand)]
pub enum QueryCommand {
    /// Summarise a running agent: readiness, datapath, sources, listeners, counts.
    Status(Target),
    /// List the workloads a running agent knows and their enrollment.
    Workloads(Target),
    /// List the security policies a running agent has.
    Policies(Target),
    /// List a running agent's workload certificates (no keys).
    Certs(Target),
    /// List the connections a running agent is proxying now.
    Connections(Target),
    /// Show a running agent's effective routing per service: routes and
    /// weights, subsets with their endpoints, ejected endpoints, and what
    /// became of each DestinationRule, VirtualService and TCPRoute.
    Routes(Target),
}

/// Runs a query subcommand, printing to stdout.
pub fn run(cmd: &QueryCommand) -> anyhow::Result<()> {
    print!("{}", output(cmd)?);
    Ok(())
}

/// What a query subcommand prints.
pub fn output(cmd: &QueryCommand) -> anyhow::Result<String> {
    let (target, path) = match cmd {
        QueryCommand::Connections(t) => (t, "/connections"),
        QueryCommand::Status(t)
        | QueryCommand::Workloads(t)
        | QueryCommand::Policies(t)
        | QueryCommand::Certs(t)
        | QueryCommand::Routes(t) => (t, "/config_dump"),
    };
    let addr = client::resolve(&target.admin_addr)?;
    let answer = client::get_json(addr, path)?;
    Ok(format_answer(cmd, &answer, target.json))
}

/// The text of a query subcommand for the agent's `answer`.
pub fn format_answer(cmd: &QueryCommand, answer: &Value, json: bool) -> String {
    let part = |key: &str| answer.get(key).cloned().unwrap_or(Value::Null);
    let (value, text): (Value, fn(&Value) -> String) = match cmd {
        QueryCommand::Status(_) => (answer.clone(), render::status),
        QueryCommand::Workloads(_) => (part("workloads"), render::workloads),
        QueryCommand::Policies(_) => (part("policies"), render::policies),
        // The JSON is the list; the text starts with who issues them.
        QueryCommand::Certs(_) if !json => {
            return format!(
                "{}{}",
                render::issuer(&part("issuer")),
                render::certs(&part("certificates"))
            );
        }
        QueryCommand::Certs(_) => (part("certificates"), render::certs),
        QueryCommand::Connections(_) => (answer.clone(), render::connections),
        QueryCommand::Routes(_) => (part("routes"), render::routes),
    };
    if json {
        let mut out = serde_json::to_string_pretty(&value).unwrap_or_else(|_| "null".into());
        out.push('\n');
        out
    } else {
        text(&value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_default_to_the_pod_ip_or_loopback_never_all_addresses() {
        let pod: IpAddr = "10.1.2.3".parse().expect("ip");
        let any: SocketAddr = "0.0.0.0:9999".parse().expect("addr");
        assert_eq!(
            metrics_addr(None, false, None).to_string(),
            "127.0.0.1:15020"
        );
        assert_eq!(
            metrics_addr(None, false, Some(pod)).to_string(),
            "10.1.2.3:15020"
        );
        assert_eq!(
            metrics_addr(None, true, Some(pod)).to_string(),
            "127.0.0.1:15020"
        );
        assert_eq!(metrics_addr(Some(any), false, Some(pod)), any);
        assert_eq!(
            crate::admin::AdminConfig::default()
                .metrics_addr
                .to_string(),
            "127.0.0.1:15020"
        );
    }
}
