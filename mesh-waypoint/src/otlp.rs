//! OTLP export of the waypoint's request spans (`--otlp-endpoint`), off by
//! default. One span per sampled request ([`crate::trace::Span`]: the ids
//! the backend sees in its `traceparent`) goes to an OpenTelemetry
//! collector over OTLP/gRPC (the `opentelemetry-otlp` tonic exporter), under
//! the service name `mesh-waypoint`.
//!
//! Bounded and never in a request's way: requests hand their span to a
//! queue of at most [`OtlpConfig::max_queue`] spans without waiting; a full
//! queue (a slow or absent collector) drops the span and counts it. One
//! task sends the queue in batches of at most [`OtlpConfig::max_batch`]
//! spans, each export bounded by [`OtlpConfig::timeout`]; a failed batch is
//! dropped and counted (no retries: the next batch is as likely to fail,
//! and the queue bound is what protects the waypoint). [`SpanSink::dump`]
//! (in `/config_dump`) shows the endpoint and the counts.

use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::trace::Span;

/// The service name of the exported spans (`service.name`).
pub const SERVICE_NAME: &str = "mesh-waypoint";

/// Where and how the spans are exported.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, `http://host:4317`.
    pub endpoint: String,
    /// Spans waiting for export at most; more are dropped (and counted).
    pub max_queue: usize,
    /// Spans per export call at most.
    pub max_batch: usize,
    /// How long a batch waits to fill before it is sent.
    pub interval: Duration,
    /// The deadline of one export call.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// `endpoint` with the defaults of OpenTelemetry's batch span processor
    /// (queue 2048, batches of 512), a 1 s batch interval and a 5 s export
    /// deadline.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            max_queue: 2048,
            max_batch: 512,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why span export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not an `http://` or `https://` URI with a host.
    #[error(
        "the OTLP endpoint {endpoint:?} is not a URI like http://otel-collector.istio-system:4317; pass the collector's OTLP/gRPC address with its scheme"
    )]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
    },
    /// A queue or batch size of zero.
    #[error(
        "the OTLP span queue and batch sizes must be at least 1 (got queue {max_queue}, batch {max_batch})"
    )]
    Size {
        /// The queue size given.
        max_queue: usize,
        /// The batch size given.
        max_batch: usize,
    },
    /// The exporter rejected its configuration.
    #[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
    Build {
        /// The endpoint.
        endpoint: String,
        /// The exporter's error.
        reason: String,
    },
}

/// Counts of the spans handed to the sink.
#[derive(Debug, Default)]
pub struct SpanStats {
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because their export call failed or timed out.
    pub dropped_export_failed: AtomicU64,
}

/// What a request tells about its span, beyond its ids.
#[derive(Debug)]
pub struct Finished {
    /// The operation name (Envoy's: `host:port/*`).
    pub name: String,
    /// When the request arrived.
    pub start: SystemTime,
    /// When its response ended.
    pub end: SystemTime,
    /// The span's attributes (Envoy's and Istio's tag names).
    pub attributes: Vec<KeyValue>,
    /// The response was a 5xx (the span's status is an error).
    pub error: bool,
}

/// The export queue and its task; dropping it stops the export.
#[derive(Debug)]
pub struct SpanSink {
    config: OtlpConfig,
    tx: mpsc::Sender<SpanData>,
    stats: Arc<SpanStats>,
    task: JoinHandle<()>,
}

impl Drop for SpanSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn valid_endpoint(endpoint: &str) -> bool {
    endpoint.parse::<http::Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    })
}

impl SpanSink {
    /// Starts exporting to `config.endpoint`, with `resource` attributes
    /// (beside `service.name`) on every span; needs a tokio runtime. The
    /// collector is connected lazily: one that is down only fails exports.
    pub fn start(config: OtlpConfig, resource: Vec<KeyValue>) -> Result<Self, OtlpError> {
        if !valid_endpoint(&config.endpoint) {
            return Err(OtlpError::Endpoint {
                endpoint: config.endpoint,
            });
        }
        if config.max_queue == 0 || config.max_batch == 0 {
            return Err(OtlpError::Size {
                max_queue: config.max_queue,
                max_batch: config.max_batch,
            });
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout)
            .build()
            .map_err(|e| OtlpError::Build {
                endpoint: config.endpoint.clone(),
                reason: e.to_string(),
            })?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(SERVICE_NAME)
                .with_attributes(resource)
                .build(),
        );
        let (tx, rx) = mpsc::channel(config.max_queue);
        let stats = Arc::new(SpanStats::default());
        let task = tokio::spawn(run(exporter, rx, Arc::clone(&stats), config.clone()));
        tracing::info!(endpoint = %config.endpoint, max_queue = config.max_queue, "exporting request spans over OTLP");
        Ok(Self {
            config,
            tx,
            stats,
            task,
        })
    }

    /// Queues `span`'s record if its trace is sampled; never waits: a full
    /// queue drops it (counted in [`SpanStats::dropped_queue_full`]).
    pub fn record(&self, span: &Span, finished: Finished) {
        if !span.sampled() {
            return;
        }
        let Some(data) = span_data(span, finished) else {
            return;
        };
        if self.tx.try_send(data).is_err() {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> &SpanStats {
        &self.stats
    }

    /// The endpoint, the bounds and the counts (for `/config_dump`).
    pub fn dump(&self) -> serde_json::Value {
        let s = &self.stats;
        json!({
            "endpoint": self.config.endpoint,
            "service_name": SERVICE_NAME,
            "max_queue": self.config.max_queue,
            "max_batch": self.config.max_batch,
            "queued": self.config.max_queue.saturating_sub(self.tx.capacity()),
            "exported": s.exported.load(Ordering::Relaxed),
            "dropped_queue_full": s.dropped_queue_full.load(Ordering::Relaxed),
            "dropped_export_failed": s.dropped_export_failed.load(Ordering::Relaxed),
        })
    }
}

/// The SDK's record of `span`; None if its ids are not hex (they always are:
/// [`Span`] is built from validated or generated ids).
fn span_data(span: &Span, f: Finished) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&span.trace_id).ok()?;
    let span_id = SpanId::from_hex(&span.span_id).ok()?;
    let flags = u8::from_str_radix(&span.flags, 16).ok()?;
    let parent = match &span.parent_id {
        Some(p) => SpanId::from_hex(p).ok()?,
        None => SpanId::INVALID,
    };
    Some(SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags),
            false,
            TraceState::NONE,
        ),
        parent_span_id: parent,
        parent_span_is_remote: span.parent_id.is_some(),
        // The waypoint's hop as Envoy reports a proxy's outbound request.
        span_kind: SpanKind::Client,
        name: Cow::Owned(f.name),
        start_time: f.start,
        end_time: f.end,
        attributes: f.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if f.error {
            Status::error("")
        } else {
            Status::Unset
        },
        instrumentation_scope: InstrumentationScope::builder(SERVICE_NAME).build(),
    })
}

/// Sends the queue in batches until the sink is dropped.
async fn run(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    stats: Arc<SpanStats>,
    config: OtlpConfig,
) {
    let failing = AtomicBool::new(false);
    let mut batch = Vec::with_capacity(config.max_batch);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + config.interval;
        while batch.len() < config.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let sent =
            tokio::time::timeout(config.timeout, exporter.export(std::mem::take(&mut batch)));
        let error = match sent.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", config.timeout)),
        };
        match error {
            None => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %config.endpoint, "OTLP span export recovered");
                }
            }
            Some(error) => {
                stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                // Logged once per outage, not per batch.
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %config.endpoint, %error, spans = n, "OTLP span export failed; dropping spans until the collector answers");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_a_scheme_and_a_host() {
        for ok in [
            "http://127.0.0.1:4317",
            "https://collector.istio-system:4317",
            "http://c",
        ] {
            assert!(valid_endpoint(ok), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1:4317",
            "grpc://c:4317",
            "http://",
            "not a uri",
        ] {
            assert!(!valid_endpoint(bad), "{bad}");
        }
    }

    #[test]
    fn a_span_keeps_the_propagated_ids() {
        let span = Span {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "a0f067aa0ba902b7".into(),
            parent_id: Some("00f067aa0ba902b7".into()),
            flags: "01".into(),
        };
        let now = SystemTime::now();
        let data = span_data(
            &span,
            Finished {
                name: "web.default.svc.cluster.local:80/*".into(),
                start: now,
                end: now,
                attributes: vec![KeyValue::new("http.status_code", 503)],
                error: true,
            },
        )
        .expect("hex ids");
        assert_eq!(
            data.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
        );
        assert_eq!(
            data.span_context.span_id(),
            SpanId::from_hex("a0f067aa0ba902b7").expect("hex")
        );
        assert_eq!(
            data.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        assert!(data.span_context.is_sampled());
        assert!(matches!(data.status, Status::Error { .. }));
    }
}
