//! Logging: `tracing` to stderr, plain or JSON, level from `MESH_LOG` (or
//! `RUST_LOG`), default `info`. Records of the kernel programs (aya-log, via
//! the `log` crate) are bridged into `tracing` under the `mesh_ebpf` target.

use tracing_subscriber::{EnvFilter, fmt};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init(format: LogFormat) {
    let filter = std::env::var("MESH_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_log::LogTracer::init();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Plain => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
