//! The access log: one line per proxied connection, written when it closes,
//! through `tracing` at `info` on target [`ACCESS_TARGET`]. Plain by default
//! (`INFO access: connection closed direction="outbound" src.addr=… …`), one
//! JSON object per line when the agent runs with `--log-format json`. The
//! field names follow ztunnel's (`src.workload`, `dst.identity`,
//! `bytes_sent`, …); fields the proxy does not know are left out.

use std::{fmt, net::SocketAddr, time::Duration};

use super::metrics::SecurityPolicy;

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

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions closed cleanly.
    Closed,
    /// The relay failed or a side reset the connection.
    Reset(String),
    /// The agent could not connect to the destination (or deliver to the app).
    ConnectFailed(String),
    /// An authorization policy refused the connection.
    Denied {
        /// The denying policy (`namespace/name`), when one matched.
        policy: Option<String>,
        /// Why, in the policy engine's words (for example `no ALLOW policy matched`).
        reason: String,
    },
    /// The proxy gave up on the connection for another reason (no original
    /// destination, a loop, shut down).
    Error(String),
}

impl Outcome {
    /// The short name logged as `outcome`: `closed`, `reset`,
    /// `connect_failed`, `denied` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Reset(_) => "reset",
            Self::ConnectFailed(_) => "connect_failed",
            Self::Denied { .. } => "denied",
            Self::Error(_) => "error",
        }
    }

    /// The error detail or the denial's reason, if any.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Reset(e) | Self::ConnectFailed(e) | Self::Error(e) => Some(e),
            Self::Denied { reason, .. } => Some(reason),
            Self::Closed => None,
        }
    }

    /// The denying policy, if any.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Self::Denied { policy, .. } => policy.as_deref(),
            _ => None,
        }
    }
}

/// Everything the access log says about one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// Writes the access-log line of a closed connection (`info`, target
/// [`ACCESS_TARGET`], message `connection closed`).
pub fn log_connection(r: &ConnectionRecord) {
    let duration_ms = u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX);
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
        policy = r.outcome.policy(),
        reason = r.outcome.reason(),
        forwarded_for = r.forwarded_for.as_deref(),
        "connection closed"
    );
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _};

    use super::*;
    use crate::admin::logging::{LogFormat, output_layers};

    /// A writer collecting everything into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

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
        }
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
        r.outcome = Outcome::Denied {
            policy: Some("default/deny-a".into()),
            reason: "denied by DENY policy default/deny-a".into(),
        };
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
        r.outcome = Outcome::Reset("connection reset by peer".into());
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
