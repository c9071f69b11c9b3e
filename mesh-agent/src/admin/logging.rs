//! Logging: `tracing` to stderr, plain or JSON, level from `MESH_LOG` (or
//! `RUST_LOG`), default `info`, changeable at runtime through the admin
//! endpoint (`/logging`). Records of the kernel programs (aya-log, via the
//! `log` crate) are bridged into `tracing` under the `mesh_ebpf` target.
//!
//! Two output layers share the filter: the access log (target
//! [`ACCESS_TARGET`](super::access_log::ACCESS_TARGET)) is printed with its
//! target, so its lines read `INFO access: connection closed …`; every other
//! line is printed without one.

use std::sync::OnceLock;

use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::filter_fn,
    fmt::{self, MakeWriter},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    reload,
};

use super::access_log::ACCESS_TARGET;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// The level used when neither `MESH_LOG` nor `RUST_LOG` is set (or valid).
/// kube-rs logs every retry of a watch at error level; the agent logs the outage itself, once.
pub const DEFAULT_LEVEL: &str = "info,kube_client=off,kube_runtime=off";

/// Handle on the installed filter, set once by [`init`].
static FILTER: OnceLock<LogControl> = OnceLock::new();

/// Why the log level could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The level string does not parse as a filter.
    #[error(
        "invalid log level {spec:?}: {reason} (use a level such as `debug`, or directives such as `info,mesh_agent::proxy=debug`)"
    )]
    InvalidLevel {
        /// What was asked for.
        spec: String,
        /// Why it does not parse.
        reason: String,
    },
    /// No reloadable filter is installed (logging was not initialised by [`init`]).
    #[error(
        "the log level cannot be changed: logging was not initialised with a reloadable filter"
    )]
    NotReloadable,
}

/// Reads and changes the level of a reloadable filter.
#[derive(Clone, Debug)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogControl {
    /// Controls the filter behind `handle`.
    pub fn new(handle: reload::Handle<EnvFilter, Registry>) -> Self {
        Self {
            handle: Some(handle),
        }
    }

    /// The control of the process's subscriber installed by [`init`], or one
    /// that refuses every change when logging was set up otherwise.
    pub fn global() -> Self {
        FILTER.get().cloned().unwrap_or(Self { handle: None })
    }

    /// The current filter, as directives (for example `info` or
    /// `info,mesh_agent::proxy=debug`).
    pub fn current(&self) -> Result<String, LoggingError> {
        let handle = self.handle.as_ref().ok_or(LoggingError::NotReloadable)?;
        handle
            .with_current(|f| f.to_string())
            .map_err(|_| LoggingError::NotReloadable)
    }

    /// Replaces the filter with `spec`; returns the new filter's directives.
    pub fn set(&self, spec: &str) -> Result<String, LoggingError> {
        let handle = self.handle.as_ref().ok_or(LoggingError::NotReloadable)?;
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(LoggingError::InvalidLevel {
                spec: spec.to_owned(),
                reason: "it is empty".into(),
            });
        }
        let filter = EnvFilter::try_new(spec).map_err(|e| LoggingError::InvalidLevel {
            spec: spec.to_owned(),
            reason: e.to_string(),
        })?;
        handle
            .reload(filter)
            .map_err(|_| LoggingError::NotReloadable)?;
        self.current()
    }
}

/// The filter from `MESH_LOG`, else `RUST_LOG`, else [`DEFAULT_LEVEL`].
fn initial_filter() -> EnvFilter {
    std::env::var("MESH_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LEVEL))
}

/// The output layers for `format`, writing to `writer`: the access log
/// (with its target) and everything else (without).
pub fn output_layers<S, W>(format: LogFormat, writer: W) -> Vec<Box<dyn Layer<S> + Send + Sync>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Clone + Send + Sync + 'static,
{
    let is_access = |m: &tracing::Metadata<'_>| m.target() == ACCESS_TARGET;
    let general = fmt::layer().with_writer(writer.clone()).with_target(false);
    let access = fmt::layer().with_writer(writer).with_target(true);
    match format {
        LogFormat::Plain => vec![
            general
                .with_ansi(false)
                .with_filter(filter_fn(move |m| !is_access(m)))
                .boxed(),
            access
                .with_ansi(false)
                .with_filter(filter_fn(is_access))
                .boxed(),
        ],
        LogFormat::Json => vec![
            general
                .json()
                .flatten_event(true)
                .with_filter(filter_fn(move |m| !is_access(m)))
                .boxed(),
            access
                .json()
                .flatten_event(true)
                .with_filter(filter_fn(is_access))
                .boxed(),
        ],
    }
}

/// Installs the global subscriber (and the `log` bridge) with a reloadable
/// filter. Safe to call more than once; later calls are ignored.
pub fn init(format: LogFormat) {
    let (filter, handle) = reload::Layer::new(initial_filter());
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(output_layers(format, std::io::stderr));
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = FILTER.set(LogControl::new(handle));
        let _ = tracing_log::LogTracer::init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_changes_at_runtime_and_bad_levels_are_refused() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry().with(filter);
        let control = LogControl::new(handle);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(control.current().expect("current"), "info");
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            // The filter reports its directives most specific first.
            assert_eq!(
                control.set("debug,mesh_agent::proxy=trace").expect("set"),
                "mesh_agent::proxy=trace,debug"
            );
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            let err = control.set("mesh_agent=loud").expect_err("invalid");
            assert!(err.to_string().contains("invalid log level"), "{err}");
            assert!(control.set("  ").is_err());
            assert_eq!(
                control.current().expect("current"),
                "mesh_agent::proxy=trace,debug"
            );
        });
    }

    #[test]
    fn a_changed_level_reaches_the_output_layers() {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(output_layers(LogFormat::Plain, move || writer.clone()));
        let control = LogControl::new(handle);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden");
            control.set("debug").expect("set");
            tracing::debug!("shown");
            tracing::debug!(target: "access", "access shown");
        });
        let out = String::from_utf8(buf.0.lock().expect("buf").clone()).expect("utf-8");
        assert!(!out.contains("hidden"), "{out}");
        assert!(out.contains("DEBUG shown"), "{out}");
        assert!(out.contains("DEBUG access: access shown"), "{out}");
    }

    #[test]
    fn without_init_changes_are_refused() {
        let control = LogControl { handle: None };
        assert!(matches!(
            control.set("debug"),
            Err(LoggingError::NotReloadable)
        ));
    }
}
