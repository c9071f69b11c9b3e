//! The command line: `run` (the agent), and the diagnostics that work with
//! or without a running agent.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    admin::logging::{self, LogFormat},
    agent::{self, RunConfig},
    datapath::{self, DEFAULT_PIN_DIR, counters::Counters},
    sync,
};

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
enum Command {
    /// Run the agent: load the datapath, enroll pods, proxy their traffic.
    Run(RunArgs),
    /// Validate a workload file and exit (non-zero, with the reason, if invalid).
    Check {
        /// The workload file.
        #[arg(long, env = "MESH_WORKLOADS")]
        workloads: PathBuf,
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
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The workload file (YAML) describing the node and its pods; re-read on change.
    #[arg(long, env = "MESH_WORKLOADS")]
    workloads: PathBuf,
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
                workloads: args.workloads,
                pin_dir: args.pin_dir,
                cgroup,
                ebpf_object: args.ebpf_object,
                kernel_log_level: args.kernel_log as u8,
                reload_interval: Duration::from_millis(args.reload_interval_ms.max(50)),
            })
        }
        Command::Check { workloads } => sync::file::load(&workloads)
            .map(|f| {
                let enrolled = f.workloads.values().filter(|w| w.enrolled).count();
                println!(
                    "{}: ok ({} pods, {} enrolled)",
                    workloads.display(),
                    f.workloads.len(),
                    enrolled
                );
            })
            .map_err(anyhow::Error::from),
        Command::Stats { pin_dir, json } => stats(&pin_dir, json),
        Command::Uninstall { pin_dir } => datapath::uninstall(&pin_dir)
            .map(|n| println!("removed {n} pinned objects under {}", pin_dir.display()))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
