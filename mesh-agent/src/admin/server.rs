//! The three HTTP/1 servers (hyper 1, on the agent's runtime) and their
//! routes. Routes are plain functions of the request line, so they are
//! tested without a socket.
//!
//! | server | path | what |
//! |---|---|---|
//! | admin (`127.0.0.1:15000`) | `GET /config_dump` | the agent's configuration, JSON |
//! | | `GET /logging`, `POST`/`PUT /logging?level=…` | read or change the log filter |
//! | | `POST /logging/flush` | write out the access-log lines the proxy threads have gathered |
//! | | `GET /stats` | kernel and proxy counters, JSON |
//! | | `GET /connections` | open proxied connections, JSON |
//! | | `GET /healthz/ready` | readiness, as on the readiness server |
//! | metrics (pod IP or `127.0.0.1`, `:15020`) | `GET /metrics` (`/stats/prometheus`) | Prometheus, OpenMetrics text |
//! | readiness (`0.0.0.0:15021`) | `GET /healthz/ready` | 200 when ready, 503 before |

use std::{convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::{
    certs::Certificates,
    config_dump::ConfigDump,
    logging::LogControl,
    readiness::{Readiness, ReadyState},
};
use crate::keyed::PerKey;
use crate::telemetry::{Telemetry, log_batch, metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE};

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections per admin and metrics listener.
pub const MAX_CONNECTIONS: usize = 64;

/// What one admin listener holds at most, and how long a connection may
/// hold a slot without asking anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerCaps {
    /// Open connections in all; beyond, a connection is closed at once.
    pub total: usize,
    /// Open connections per source address; beyond, closed at once.
    pub per_source: usize,
    /// How long a client may take to send its request head.
    pub header_timeout: Duration,
    /// Whether a connection may carry more than one request.
    pub keep_alive: bool,
    /// How long a connection may live, however it is used: a client
    /// reading its answer slowly (a zero receive window) frees its slot
    /// then too.
    pub max_lifetime: Duration,
}

impl ListenerCaps {
    /// The admin and metrics listeners: [`MAX_CONNECTIONS`] in all, a
    /// request head within 10 s, a connection for at most 60 s (Prometheus
    /// reconnects). The metrics listener is reachable by any pod: a flood
    /// must not take the agent's descriptors or its control runtime.
    pub const ADMIN: Self = Self {
        total: MAX_CONNECTIONS,
        per_source: MAX_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
        keep_alive: true,
        max_lifetime: Duration::from_secs(60),
    };

    /// The readiness listener, the kubelet's probes, reachable by any pod:
    /// 4 connections per source address (an IPv6 /64 counts as one; the
    /// kubelet's probes from the node's address need at most 3 at once),
    /// 4096 in all, one request each and its head within 2 s, 10 s at
    /// most in all, so a slot is held about 2 s by a client that asks
    /// nothing. Capped like the metrics listener, one pod holding 64
    /// connections would keep the probe out and get the agent (or the
    /// waypoint) marked unready; uncapped, it could take the process's
    /// descriptors. What is left: a tenant with a thousand pods each
    /// reconnecting as fast as it is closed can fill the total, and the
    /// node's own address is shared by the host-network pods and
    /// processes of the node, which can take its 4 slots.
    pub const READINESS: Self = Self {
        total: 4096,
        per_source: 4,
        header_timeout: Duration::from_secs(2),
        keep_alive: false,
        max_lifetime: Duration::from_secs(10),
    };
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// What the routes serve from.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// `/config_dump`.
    pub config_dump: ConfigDump,
    /// `/stats` (same mechanism: named JSON parts).
    pub stats: ConfigDump,
    /// Metrics and open connections.
    pub telemetry: Telemetry,
    /// The agent's certificates.
    pub certificates: Certificates,
    /// Readiness.
    pub readiness: Readiness,
    /// The log filter.
    pub log: LogControl,
}

/// A response: status, content type, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    /// A reply with `status`, `content_type` and `body`.
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    fn json(status: StatusCode, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
        body.push('\n');
        Self::new(status, JSON, body)
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.into() }))
    }

    fn not_found(path: &str) -> Self {
        Self::error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))
    }

    fn method_not_allowed(method: &Method, path: &str) -> Self {
        Self::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not supported on {path}"),
        )
    }
}

/// A route: the reply to a request line.
pub type Route = fn(&AdminState, &Method, &str, Option<&str>) -> Reply;

/// The admin server's routes.
pub fn admin_route(state: &AdminState, method: &Method, path: &str, query: Option<&str>) -> Reply {
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/" if get => Reply::new(
            StatusCode::OK,
            TEXT,
            "mesh-agent admin\n  GET  /config_dump\n  GET  /stats\n  GET  /connections\n  \
             GET  /logging\n  POST /logging?level=LEVEL\n  POST /logging/flush\n  GET  /healthz/ready\n",
        ),
        "/config_dump" if get => Reply::json(StatusCode::OK, &state.config_dump.dump()),
        "/stats" if get => Reply::json(StatusCode::OK, &state.stats.dump()),
        "/connections" if get => Reply::json(
            StatusCode::OK,
            &serde_json::to_value(state.telemetry.connections.list())
                .unwrap_or(serde_json::Value::Null),
        ),
        "/logging" => logging(state, method, query),
        // The access-log lines the proxy threads have gathered, written
        // out now (telemetry/log_batch.rs): a reader that saw a connection
        // counted as closed then finds its line in the log.
        "/logging/flush" if method == Method::POST => Reply::json(
            StatusCode::OK,
            &serde_json::json!({ "flushed_bytes": log_batch::flush_all() }),
        ),
        "/healthz/ready" if get => readiness_reply(&state.readiness),
        "/" | "/config_dump" | "/stats" | "/connections" | "/healthz/ready" | "/logging/flush" => {
            Reply::method_not_allowed(method, path)
        }
        _ => Reply::not_found(path),
    }
}

fn logging(state: &AdminState, method: &Method, query: Option<&str>) -> Reply {
    let result = if method == Method::GET || method == Method::HEAD {
        state.log.current()
    } else if method == Method::POST || method == Method::PUT {
        match query.and_then(|q| query_param(q, "level")) {
            Some(level) => {
                let result = state.log.set(&level);
                if let Ok(now) = &result {
                    tracing::info!(level = %now, "log level changed");
                }
                result
            }
            None => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    "missing the level: POST /logging?level=debug (or directives such as \
                     level=info,mesh_agent::proxy=debug)",
                );
            }
        }
    } else {
        return Reply::method_not_allowed(method, "/logging");
    };
    match result {
        Ok(level) => Reply::json(StatusCode::OK, &serde_json::json!({ "level": level })),
        Err(e @ super::logging::LoggingError::InvalidLevel { .. }) => {
            Reply::error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => Reply::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The metrics server's routes.
pub fn metrics_route(
    state: &AdminState,
    method: &Method,
    path: &str,
    _query: Option<&str>,
) -> Reply {
    match path {
        "/metrics" | "/stats/prometheus" if method == Method::GET || method == Method::HEAD => {
            match state.telemetry.metrics.encode() {
                Ok(text) => Reply::new(StatusCode::OK, METRICS_CONTENT_TYPE, text),
                Err(_) => Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the metrics could not be encoded",
                ),
            }
        }
        "/metrics" | "/stats/prometheus" => Reply::method_not_allowed(method, path),
        _ => Reply::not_found(path),
    }
}

/// The readiness server's routes.
pub fn readiness_route(
    state: &AdminState,
    method: &Method,
    path: &str,
    _query: Option<&str>,
) -> Reply {
    match path {
        "/healthz/ready" if method == Method::GET || method == Method::HEAD => {
            readiness_reply(&state.readiness)
        }
        "/healthz/ready" => Reply::method_not_allowed(method, path),
        _ => Reply::not_found(path),
    }
}

fn readiness_reply(readiness: &Readiness) -> Reply {
    match readiness.state() {
        ReadyState::Ready => Reply::new(StatusCode::OK, TEXT, "ready\n"),
        ReadyState::Waiting(what) => Reply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready: waiting for {}\n", what.join(", ")),
        ),
        ReadyState::ShuttingDown => Reply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: shutting down\n",
        ),
    }
}

/// The value of `key` in a query string, percent-decoded (`+` is a space).
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == key).then(|| percent_decode(v))?
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Serves `route` on `listener` until the task is dropped (the runtime
/// shuts down). Each connection runs in its own task, within `caps`
/// ([`ListenerCaps::ADMIN`] for the admin and metrics listeners,
/// [`ListenerCaps::READINESS`] for the readiness one): beyond, a
/// connection is closed at once.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    route: Route,
    caps: ListenerCaps,
) {
    serve_with(listener, caps, move |method, path, query| {
        route(&state, method, path, query)
    })
    .await;
}

/// Serves the replies of `answer` (method, path, query) on `listener` as
/// [`serve`] does: HTTP/1.1, a connection per task, within `caps` (beyond,
/// closed at once); `HEAD` answered without the body. For the waypoint's
/// admin listeners too.
pub async fn serve_with<F>(listener: TcpListener, caps: ListenerCaps, answer: F)
where
    F: Fn(&Method, &str, Option<&str>) -> Reply + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let slots = Arc::new(tokio::sync::Semaphore::new(caps.total));
    let per_source = PerKey::<IpAddr>::new(caps.per_source);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, max = caps.total, "admin connection closed: too many open");
            continue;
        };
        let Some(source_slot) = per_source.try_acquire(&source_key(peer.ip())) else {
            tracing::debug!(%peer, max = caps.per_source, "admin connection closed: too many open from its address");
            continue;
        };
        let answer = Arc::clone(&answer);
        tokio::spawn(async move {
            let _slots = (slot, source_slot);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reply = answer(req.method(), req.uri().path(), req.uri().query());
                let head = req.method() == Method::HEAD;
                async move { Ok::<_, Infallible>(into_response(reply, head)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(caps.header_timeout)
                .keep_alive(caps.keep_alive)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(caps.max_lifetime, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
                Err(_) => {
                    tracing::debug!(%peer, max_lifetime_s = caps.max_lifetime.as_secs(), "admin connection closed: it lived its longest");
                }
            }
        });
    }
}

/// What a source address is counted as: an IPv4 address (v4-mapped ones
/// included) as itself, an IPv6 address by its /64, which one host (or
/// pod) may hold all of.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

fn into_response(reply: Reply, head: bool) -> Response<Full<Bytes>> {
    let len = reply.body.len();
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(reply.body)
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = reply.status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    if head {
        headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_by_address_and_ipv6_by_its_64() {
        let key = |s: &str| source_key(s.parse().expect("ip"));
        assert_eq!(key("10.0.0.7"), key("10.0.0.7"));
        assert_ne!(key("10.0.0.7"), key("10.0.0.8"));
        assert_eq!(key("::ffff:10.0.0.7"), key("10.0.0.7"));
        assert_eq!(key("fd00:1:2:3::1"), key("fd00:1:2:3:ffff::9"));
        assert_ne!(key("fd00:1:2:3::1"), key("fd00:1:2:4::1"));
    }

    /// Sends a GET of `path` on a fresh connection to `addr`.
    async fn ask(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        s
    }

    /// A client that asks for a large answer and never reads it (a zero
    /// receive window) holds its slot only for `max_lifetime`: with one
    /// slot in all, a second client is closed at once while it lives, and
    /// served once it has been cut.
    #[tokio::test]
    async fn a_connection_that_never_reads_its_answer_frees_its_slot_at_its_lifetime() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let caps = ListenerCaps {
            total: 1,
            per_source: 1,
            header_timeout: Duration::from_secs(5),
            keep_alive: true,
            max_lifetime: Duration::from_millis(1500),
        };
        let server = tokio::spawn(serve_with(listener, caps, |_, path, _| {
            // Far more than loopback's socket buffers hold.
            let body = if path == "/big" {
                "x".repeat(64 << 20)
            } else {
                "ok".to_owned()
            };
            Reply::new(StatusCode::OK, "text/plain", body)
        }));
        let _stalled = ask(addr, "/big").await;
        // Give the server time to accept it and fill the buffers.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut refused = ask(addr, "/small").await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(1), refused.read(&mut buf))
            .await
            .expect("a client beyond the cap is closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "no answer beyond the cap");
        // Past the stalled connection's lifetime its slot is free again.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let mut served = ask(addr, "/small").await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), async {
            while !answer.ends_with(b"ok") {
                let n = served.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(read.is_ok(), "the new client's answer never ended");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "the freed slot serves a new client: {answer:?}"
        );
        server.abort();
    }
}
