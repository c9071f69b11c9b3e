//! The access log: one line per proxied connection, written when it closes,
//! through `tracing` at `info` on target [`ACCESS_TARGET`]. Plain by default
//! (`INFO access: connection closed direction="outbound" src.addr=… …`), one
//! JSON object per line when the agent runs with `--log-format json`. The
//! field names follow ztunnel's (`src.workload`, `dst.identity`,
//! `bytes_sent`, …); fields the proxy does not know are left out.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use super::{
    counters::ProxyEvent,
    metrics::{ResponseFlags, SecurityPolicy},
};

/// The `tracing` target of access-log lines.
pub const ACCESS_TARGET: &str = "access";

/// Which of the pod's listeners took the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The pod's app connected out (captured by `cgroup/connect`).
    Outbound,
    /// A peer connected to the pod (steered by `sk_lookup`).
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One side of a connection, as far as the agent knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    /// The address (for the destination: what the client dialled).
    pub addr: Option<SocketAddr>,
    /// The pod's name, when the address is a known workload's.
    pub workload: Option<String>,
    /// The pod's namespace.
    pub namespace: Option<String>,
    /// The peer's identity (SPIFFE ID), when authenticated.
    pub identity: Option<String>,
}

/// What kind of failure ended a connection: the access log's `outcome`,
/// and from it the `response_flags` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The relay failed or a side reset the connection.
    Reset,
    /// The agent could not connect to the destination (or deliver to the app).
    ConnectFailed,
    /// An authorization policy refused the connection (at open, or later
    /// when a policy change denied it).
    Denied,
    /// The proxy gave up on the connection for another reason (no original
    /// destination, a loop, shut down).
    Error,
}

impl FailureKind {
    /// `reset`, `connect_failed`, `denied` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reset => "reset",
            Self::ConnectFailed => "connect_failed",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }

    /// The Istio `response_flags` of a connection that ended so.
    pub fn response_flags(self) -> ResponseFlags {
        match self {
            Self::Denied => ResponseFlags::Denied,
            Self::ConnectFailed => ResponseFlags::ConnectFailure,
            Self::Reset | Self::Error => ResponseFlags::None,
        }
    }
}

/// Why a connection did not close cleanly, as telemetry reports it. The
/// proxy's error type implements it: the one place that decides, for each
/// error, the access log's `outcome` ([`Failure::kind`], and so the
/// `response_flags` label), its `reason` (the error's `Display`) and
/// `policy`, and the proxy counter it counts besides `failed`.
pub trait Failure: std::error::Error + Send + Sync + 'static {
    /// What kind of failure it is.
    fn kind(&self) -> FailureKind;

    /// The denying policy (`namespace/name`), when a policy denied.
    fn policy(&self) -> Option<String> {
        None
    }

    /// The proxy counter this failure also counts, if any.
    fn event(&self) -> Option<ProxyEvent> {
        None
    }
}

/// How a connection ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Both directions closed cleanly.
    Closed,
    /// It failed, was refused or was cut: why.
    Failed(Arc<dyn Failure>),
}

impl Outcome {
    /// A connection that ended with `failure`.
    pub fn failed(failure: impl Failure) -> Self {
        Self::Failed(Arc::new(failure))
    }

    /// The short name logged as `outcome`: `closed`, `reset`,
    /// `connect_failed`, `denied` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Failed(f) => f.kind().as_str(),
        }
    }

    /// The Istio `response_flags` of the connection.
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            Self::Closed => ResponseFlags::None,
            Self::Failed(f) => f.kind().response_flags(),
        }
    }

    /// The error or the denial's reason, if any.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Closed => None,
            Self::Failed(f) => Some(f.to_string()),
        }
    }

    /// The denying policy, if any.
    pub fn policy(&self) -> Option<String> {
        match self {
            Self::Closed => None,
            Self::Failed(f) => f.policy(),
        }
    }
}

/// Everything the access log says about one connection.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    /// Outbound (the pod's app is the client) or inbound (the pod serves).
    pub direction: Direction,
    /// The client.
    pub src: Endpoint,
    /// The server.
    pub dst: Endpoint,
    /// The destination service (`name.namespace.svc.cluster.local`), when the
    /// client dialled a service address.
    pub dst_service: Option<String>,
    /// `mutual_tls` or `none`, when known.
    pub security: Option<SecurityPolicy>,
    /// Bytes relayed from the client to the server.
    pub bytes_sent: u64,
    /// Bytes relayed from the server to the client.
    pub bytes_received: u64,
    /// From accept to close.
    pub duration: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// The client address the peer claimed in an HBONE `forwarded` header,
    /// if it sent one: information only, never used for policy or `src.*`.
    pub forwarded_for: Option<String>,
    /// Inbound deliveries: whether the app saw the client's address as the
    /// source (`false`: the pod's own, see `source_not_preserved`).
    pub source_preserved: Option<bool>,
    /// Why the client's address could not be the delivery's source.
    pub source_not_preserved: Option<&'static str>,
    /// The route that chose the destination (`VirtualService/ns/name`,
    /// `TCPRoute/ns/name`), when a route did.
    pub route: Option<String>,
    /// The destination subset, when the route chose one.
    pub subset: Option<String>,
    /// The waypoint (`namespace/name`) the connection went through (or was
    /// refused for): its L7 and routing are the waypoint's job.
    pub waypoint: Option<String>,
}

/// Writes the access-log line of a closed connection (`info`, target
/// [`ACCESS_TARGET`], message `connection closed`).
pub fn log_connection(r: &ConnectionRecord) {
    let duration_ms = u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX);
    let (policy, reason) = (r.outcome.policy(), r.outcome.reason());
    tracing::info!(
        target: ACCESS_TARGET,
        direction = r.direction.as_str(),
        src.addr = r.src.addr.map(display),
        src.workload = r.src.workload.as_deref(),
        src.namespace = r.src.namespace.as_deref(),
        src.identity = r.src.identity.as_deref(),
        dst.addr = r.dst.addr.map(display),
        dst.service = r.dst_service.as_deref(),
        dst.workload = r.dst.workload.as_deref(),
        dst.namespace = r.dst.namespace.as_deref(),
        dst.identity = r.dst.identity.as_deref(),
        security = r.security.map(SecurityPolicy::as_str),
        bytes_sent = r.bytes_sent,
        bytes_recv = r.bytes_received,
        duration_ms,
        outcome = r.outcome.as_str(),
        policy = policy.as_deref(),
        reason = reason.as_deref(),
        forwarded_for = r.forwarded_for.as_deref(),
        source_preserved = r.source_preserved,
        source_not_preserved = r.source_not_preserved,
        route = r.route.as_deref(),
        subset = r.subset.as_deref(),
        waypoint = r.waypoint.as_deref(),
        "connection closed"
    );
}
