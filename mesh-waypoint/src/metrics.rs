//! Istio's request metrics as a waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, with Istio's label names.
//! The peer labels are the agent's ([`PeerLabels`], [`ServiceLabels`]).

use std::fmt;

use mesh_agent::telemetry::{IstioPeerLabels, PeerLabels, ServiceLabels};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Istio's default request-duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Everything one request's metrics are labelled with.
#[derive(Clone, Debug)]
pub struct RequestLabels {
    /// The client (authenticated principal; workload from its baggage).
    pub source: PeerLabels,
    /// The chosen backend pod (unknown when none was chosen).
    pub destination: PeerLabels,
    /// The service the client addressed.
    pub destination_service: ServiceLabels,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// The response's status code.
    pub response_code: u16,
    /// A gRPC request's status (its response's `grpc-status`, else the
    /// HTTP status mapped as gRPC clients do); `None` for other requests
    /// (the label is then empty, as Istio's).
    pub grpc_response_status: Option<u32>,
    /// Envoy's response flags (`-`, `UT`, `UF`, `NR`, `UH`).
    pub response_flags: &'static str,
}

/// The request metrics' labels: Istio's peer labels (shared with the
/// agent's TCP metrics), then what is a request's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    #[prometheus(flatten)]
    peers: IstioPeerLabels,
    request_protocol: &'static str,
    response_code: String,
    grpc_response_status: String,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

impl From<&RequestLabels> for Labels {
    fn from(l: &RequestLabels) -> Self {
        Self {
            peers: IstioPeerLabels::new(
                "waypoint",
                &l.source,
                &l.destination,
                Some(&l.destination_service),
            ),
            request_protocol: l.protocol,
            response_code: l.response_code.to_string(),
            grpc_response_status: l
                .grpc_response_status
                .map(|c| c.to_string())
                .unwrap_or_default(),
            response_flags: l.response_flags,
            // The client's hop into the waypoint is always HBONE (mTLS).
            connection_security_policy: "mutual_tls",
        }
    }
}

/// At most this many distinct client-claimed source label sets (workload,
/// app, version from the client's `baggage`) are kept; past it, new ones are
/// reported `unknown`: a client cannot grow the metrics without bound.
pub const MAX_CLAIMED_SOURCES: usize = 4096;

/// The waypoint's metric registry.
pub struct Metrics {
    claimed: std::sync::Mutex<std::collections::HashSet<(String, String, String, String)>>,
    registry: Registry,
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    request_bytes: Family<Labels, Histogram, fn() -> Histogram>,
    response_bytes: Family<Labels, Histogram, fn() -> Histogram>,
    retries: Family<RetryLabels, Counter>,
    mirrors: Family<RetryLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    result: &'static str,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The four Istio request families, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        // Istio's byte buckets: 1, 10, ..., 10^9.
        let bytes = || -> Family<Labels, Histogram, fn() -> Histogram> {
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 10.0, 10)))
        };
        let (request_bytes, response_bytes) = (bytes(), bytes());
        // prometheus-client appends `_total` to counters.
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request durations",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "mesh_waypoint_retries",
            "Retries: attempted, or refused by the retry budget",
            retries.clone(),
        );
        let mirrors = Family::<RetryLabels, Counter>::default();
        registry.register(
            "mesh_waypoint_mirrors",
            "Mirrored requests: sent, failed, skipped_body, skipped_limit, no_endpoint",
            mirrors.clone(),
        );
        Self {
            claimed: std::sync::Mutex::default(),
            registry,
            retries,
            mirrors,
            requests,
            duration,
            request_bytes,
            response_bytes,
        }
    }

    /// The source labels to report: the client's claims while the bound on
    /// distinct claims holds, else only what was authenticated.
    fn bounded_source(&self, s: &PeerLabels) -> PeerLabels {
        let key = (
            s.principal.clone(),
            s.workload.clone(),
            s.app.clone(),
            s.version.clone(),
        );
        let mut claimed = self
            .claimed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if claimed.contains(&key) || claimed.len() < MAX_CLAIMED_SOURCES {
            claimed.insert(key);
            return s.clone();
        }
        let mut bounded = PeerLabels::unknown();
        bounded.principal = s.principal.clone();
        bounded.namespace = s.namespace.clone();
        bounded
    }

    /// Records one finished request.
    pub fn request(
        &self,
        l: &RequestLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let bounded = RequestLabels {
            source: self.bounded_source(&l.source),
            ..l.clone()
        };
        let labels = Labels::from(&bounded);
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(duration_ms);
        self.request_bytes
            .get_or_create(&labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(&labels)
            .observe(response_bytes as f64);
    }

    /// A retry was attempted (true) or refused by the budget (false).
    pub fn retry(&self, attempted: bool) {
        let result = if attempted {
            "attempted"
        } else {
            "budget_exhausted"
        };
        self.retries.get_or_create(&RetryLabels { result }).inc();
    }

    /// A mirror's outcome.
    pub fn mirror(&self, result: &'static str) {
        self.mirrors.get_or_create(&RetryLabels { result }).inc();
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Peer labels when nothing is known but the namespace.
pub fn peer_in(namespace: Option<&str>, principal: Option<String>) -> PeerLabels {
    let mut p = PeerLabels::unknown();
    if let Some(ns) = namespace {
        p.namespace = ns.to_owned();
    }
    if let Some(pr) = principal {
        p.principal = pr;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_source_labels_are_bounded() {
        let m = Metrics::new();
        let claim = |i: usize| {
            let mut p = PeerLabels::unknown();
            p.principal = "spiffe://cluster.local/ns/a/sa/b".into();
            p.namespace = "a".into();
            p.workload = format!("w{i}");
            p
        };
        for i in 0..MAX_CLAIMED_SOURCES {
            assert_eq!(m.bounded_source(&claim(i)).workload, format!("w{i}"));
        }
        // A known claim is still reported; a new one past the bound is not.
        assert_eq!(m.bounded_source(&claim(0)).workload, "w0");
        let past = m.bounded_source(&claim(MAX_CLAIMED_SOURCES));
        assert_eq!(
            (past.workload.as_str(), past.namespace.as_str()),
            ("unknown", "a")
        );
        assert_eq!(past.principal, "spiffe://cluster.local/ns/a/sa/b");
    }
}
