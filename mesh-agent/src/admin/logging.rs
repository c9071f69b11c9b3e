//! Logging: `tracing` to stderr (the proxy threads' access-log lines in
//! batches: [`log_batch`]), plain or JSON, level from `MESH_LOG` (or
//! `RUST_LOG`), default `info`, changeable at runtime through the admin
//! endpoint (`/logging`). Records of the kernel programs (aya-log, via the
//! `log` crate) are bridged into `tracing` under the `mesh_ebpf` target.
//!
//! Two output layers share the filter: the access log (target
//! [`ACCESS_TARGET`]) is printed with its
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

use crate::telemetry::{access_log::ACCESS_TARGET, log_batch};

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
        .with(output_layers(format, log_batch::Batched::stderr()));
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
        let buf = super::access_log_tests::Buffer::default();
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

    #[test]
    fn the_log_layers_batch_access_lines_and_write_the_rest_at_once() {
        let _serial = crate::telemetry::log_batch::serial();
        use tracing_subscriber::layer::SubscriberExt as _;

        use crate::telemetry::log_batch::{Writes, on_batching_thread};

        let (seen, make) = Writes::batched();
        on_batching_thread(move || {
            let subscriber =
                tracing_subscriber::registry().with(output_layers(LogFormat::Plain, make));
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(target: crate::telemetry::ACCESS_TARGET, "connection closed");
                assert!(seen.taken().is_empty(), "the access line is gathered");
                tracing::warn!("HBONE handshake rejected");
                let written = seen.taken();
                assert_eq!(written.len(), 2, "{written:?}");
                assert!(
                    written[0].contains("access: connection closed"),
                    "{written:?}"
                );
                assert!(
                    written[1].contains("HBONE handshake rejected"),
                    "{written:?}"
                );
            });
        });
    }
}

/// The access log as the agent's output layers write it.
#[cfg(test)]
mod access_log_tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use std::time::Duration;

    use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _};

    use super::{LogFormat, output_layers};
    use crate::telemetry::{
        SecurityPolicy,
        access_log::{
            ConnectionRecord, Direction, Endpoint, Failure, FailureKind, Outcome, log_connection,
        },
    };

    /// A failure as the proxy would report it.
    #[derive(Debug, thiserror::Error)]
    #[error("{reason}")]
    struct Failed {
        kind: FailureKind,
        policy: Option<&'static str>,
        reason: &'static str,
    }

    impl Failure for Failed {
        fn kind(&self) -> FailureKind {
            self.kind
        }
        fn policy(&self) -> Option<String> {
            self.policy.map(str::to_owned)
        }
    }

    /// A writer collecting everything into a shared buffer.
    #[derive(Clone, Default)]
    pub(super) struct Buffer(pub(super) Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn capture(format: LogFormat, f: impl FnOnce()) -> String {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(output_layers(format, buf.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().expect("buffer").clone();
        String::from_utf8(bytes).expect("utf-8 log")
    }

    fn record() -> ConnectionRecord {
        ConnectionRecord {
            direction: Direction::Outbound,
            src: Endpoint {
                addr: Some("198.18.1.10:40000".parse().expect("addr")),
                workload: Some("a".into()),
                namespace: Some("default".into()),
                identity: Some("spiffe://cluster.local/ns/default/sa/a".into()),
            },
            dst: Endpoint {
                addr: Some("198.18.1.11:8080".parse().expect("addr")),
                workload: Some("b".into()),
                namespace: Some("default".into()),
                identity: None,
            },
            dst_service: None,
            security: Some(SecurityPolicy::MutualTls),
            bytes_sent: 100,
            bytes_received: 2048,
            duration: Duration::from_millis(1500),
            outcome: Outcome::Closed,
            forwarded_for: None,
            source_preserved: None,
            source_not_preserved: None,
            route: None,
            subset: None,
            waypoint: None,
        }
    }

    #[test]
    fn a_routed_connection_names_its_route_and_subset() {
        let mut r = record();
        r.route = Some("VirtualService/default/b-split".into());
        r.subset = Some("v2".into());
        let out = capture(LogFormat::Json, || log_connection(&r));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["route"], "VirtualService/default/b-split");
        assert_eq!(v["subset"], "v2");
    }

    #[test]
    fn plain_line_has_ztunnel_like_fields() {
        let out = capture(LogFormat::Plain, || log_connection(&record()));
        let line = out.trim_end();
        assert_eq!(out.lines().count(), 1, "{out}");
        let (_, rest) = line.split_once(" INFO ").expect("level");
        assert_eq!(
            rest.trim_start(),
            "access: connection closed direction=\"outbound\" src.addr=198.18.1.10:40000 \
             src.workload=\"a\" src.namespace=\"default\" \
             src.identity=\"spiffe://cluster.local/ns/default/sa/a\" dst.addr=198.18.1.11:8080 \
             dst.workload=\"b\" dst.namespace=\"default\" security=\"mutual_tls\" bytes_sent=100 \
             bytes_recv=2048 \
             duration_ms=1500 outcome=\"closed\""
        );
    }

    #[test]
    fn plain_denied_line_names_the_policy() {
        let mut r = record();
        r.direction = Direction::Inbound;
        r.bytes_sent = 0;
        r.bytes_received = 0;
        r.outcome = Outcome::failed(Failed {
            kind: FailureKind::Denied,
            policy: Some("default/deny-a"),
            reason: "denied by DENY policy default/deny-a",
        });
        let out = capture(LogFormat::Plain, || log_connection(&r));
        assert!(
            out.contains(
                "outcome=\"denied\" policy=\"default/deny-a\" \
                 reason=\"denied by DENY policy default/deny-a\""
            ),
            "{out}"
        );
        assert!(!out.contains("error="), "{out}");
    }

    #[test]
    fn json_line_has_the_same_fields() {
        let mut r = record();
        r.dst_service = Some("b.default.svc.cluster.local".into());
        r.outcome = Outcome::failed(Failed {
            kind: FailureKind::Reset,
            policy: None,
            reason: "connection reset by peer",
        });
        let out = capture(LogFormat::Json, || log_connection(&r));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "connection closed");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["src.addr"], "198.18.1.10:40000");
        assert_eq!(v["src.workload"], "a");
        assert_eq!(v["src.namespace"], "default");
        assert_eq!(v["src.identity"], "spiffe://cluster.local/ns/default/sa/a");
        assert_eq!(v["dst.addr"], "198.18.1.11:8080");
        assert_eq!(v["dst.service"], "b.default.svc.cluster.local");
        assert_eq!(v["dst.workload"], "b");
        assert_eq!(v["bytes_sent"], 100);
        assert_eq!(v["bytes_recv"], 2048);
        assert_eq!(v["duration_ms"], 1500);
        assert_eq!(v["outcome"], "reset");
        assert_eq!(v["reason"], "connection reset by peer");
        assert_eq!(v["security"], "mutual_tls");
        assert!(v.get("dst.identity").is_none(), "{v}");
        assert!(v.get("policy").is_none(), "{v}");
    }

    #[test]
    fn other_lines_keep_no_target() {
        let out = capture(LogFormat::Plain, || tracing::info!(pods = 2, "agent ready"));
        assert!(out.contains(" INFO agent ready pods=2"), "{out}");
    }

    #[test]
    fn a_claimed_client_address_is_a_field_of_its_own() {
        let mut r = record();
        r.direction = Direction::Inbound;
        r.forwarded_for = Some("198.18.2.12:40000".into());
        let out = capture(LogFormat::Json, || log_connection(&r));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["forwarded_for"], "198.18.2.12:40000");
        assert_eq!(v["src.addr"], "198.18.1.10:40000");
        let out = capture(LogFormat::Plain, || log_connection(&record()));
        assert!(!out.contains("forwarded_for"), "{out}");
    }
}
