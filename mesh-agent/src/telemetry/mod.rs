//! What the proxy reports, and what is derived from it: the open-connection
//! list, the access log and the Istio metric families with their labels.
//!
//! The proxy reports through one handle, [`Telemetry`]:
//! [`Telemetry::open`] when a connection's destination is known,
//! [`ConnectionTracker::close`] when it ends, [`Telemetry::count`] for
//! events such as accepts, [`Telemetry::refused`] for a connection refused
//! before it was tracked. Everything counted is derived from these reports:
//! the Istio metrics, the access log, the proxy's counters (`/stats`). `admin` serves what is
//! collected here (`/metrics`, `/connections`) and registers its own
//! collectors (certificates, kernel maps) into the [`Metrics`] registry;
//! nothing here imports `admin`.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod connections;
pub mod counters;
pub mod log_batch;
pub mod metrics;

use std::time::{SystemTime, UNIX_EPOCH};

pub use access_log::{
    ACCESS_TARGET, ConnectionRecord, Direction, Endpoint, Failure, FailureKind, Outcome,
    log_connection,
};
pub use connections::{Connection, ConnectionTracker, OpenConnection, Peer, Telemetry};
pub use counters::{ProxyCounters, ProxyEvent};
pub use metrics::{
    ConnectionLabels, IstioPeerLabels, LimitsReading, Metrics, PeerLabels, PolicyDecision,
    Reporter, ResponseFlags, RouteEvent, SecurityPolicy, ServiceLabels,
};

/// Seconds since the Unix epoch (negative before it).
pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
