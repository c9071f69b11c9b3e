//! HTTP proxying on a tunnel stream: a hyper server (HTTP/1.1 or HTTP/2)
//! whose requests are routed by [`crate::l7::route`] (a service's) or go to
//! the pod the client addressed, and are sent with a pooled hyper client to
//! the chosen endpoint (over HBONE to meshed pods, plaintext otherwise),
//! and the per-request telemetry: Istio's metrics, one access-log line and
//! a span.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use mesh_agent::proxy::limits::{GOAWAY_GRACE, StreamPermit};

use crate::{
    client::{BackendBody, ProxyBody},
    l7::route::{Backend, RetryPolicy, Rule, Selection, grpc_status},
    metrics::RequestLabels,
    services::{Addressed, Chosen, Client, NoEndpoint, TryResult, Upstream},
    shared::{Shared, Tunnel, millis},
    stream::Rewind,
};

/// At most this many concurrent HTTP/2 requests per tunnel stream.
pub const MAX_INNER_STREAMS: u32 = 100;
/// An HTTP/1.1 client must send a request's headers within this time (a
/// slow-header client cannot hold a tunnel's HTTP server).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 clients inside a tunnel are pinged this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and dropped when a ping is not answered within this time.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The header naming the client's certificate to the backend.
const XFCC: &str = "x-forwarded-client-cert";
/// A mirrored request's exchange (sent, answered, its answer read and
/// dropped) must end within this time (Envoy's default route timeout).
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);
/// Request bodies up to this size (known in advance) are kept for retries;
/// larger or streamed bodies are sent once.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// The request body sent to a backend: the client's, counted.
#[derive(Debug)]
pub struct CountedBody {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves HTTP on one tunnel stream until the client closes it.
///
/// An HTTP/1.1 connection is timed out by the tunnel stream's pipe (no
/// byte either way for the stream idle timeout). An inner HTTP/2
/// connection moves bytes while idle (its pings), so it is timed out here,
/// with the same timeout: a response body producing nothing while the
/// client uploads nothing is dropped (`IdleBody`: its backend response,
/// pick and slots with it), and the connection is closed once it has had
/// no request in progress for that long.
pub async fn serve(shared: Arc<Shared>, tunnel: Arc<Tunnel>, io: Rewind, http2: bool) {
    let io = TokioIo::new(io);
    let result = if http2 {
        let idle = shared.stream_idle_timeout();
        let peer = tunnel.peer;
        let requests = Arc::new(tokio::sync::watch::Sender::new(InnerRequests {
            active: 0,
            since: Instant::now(),
        }));
        let mut quiet = requests.subscribe();
        let service = hyper::service::service_fn(move |req| {
            let (shared, tunnel) = (Arc::clone(&shared), Arc::clone(&tunnel));
            let in_flight = InFlight::new(&requests);
            let uploaded = Arc::new(AtomicU64::new(0));
            async move {
                let response = handle(shared, tunnel, req, Arc::clone(&uploaded)).await;
                Ok::<_, Infallible>(IdleBody::watch(response, in_flight, uploaded, idle))
            }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_INNER_STREAMS)
            .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .serve_connection(io, service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = no_request_for(&mut quiet, idle) => {
                tracing::debug!(src = %peer, idle_ms = millis(idle), "inner HTTP/2 connection closed: no request for the stream idle timeout");
                conn.as_mut().graceful_shutdown();
                // Streams whose body was dropped may wait for a client
                // that does not read: the grace bounds them.
                tokio::time::timeout(GOAWAY_GRACE, conn.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
        }
    } else {
        let service = hyper::service::service_fn(move |req| {
            let (shared, tunnel) = (Arc::clone(&shared), Arc::clone(&tunnel));
            let uploaded = Arc::new(AtomicU64::new(0));
            async move { Ok::<_, Infallible>(handle(shared, tunnel, req, uploaded).await) }
        });
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection on a tunnel ended with an error");
    }
}

/// The requests in progress on an inner HTTP/2 connection, and since when
/// their count is what it is.
#[derive(Clone, Copy, Debug)]
struct InnerRequests {
    active: usize,
    since: Instant,
}

/// One request of an inner HTTP/2 connection, in progress from its
/// arrival until its response body ends, is dropped, or is timed out.
#[derive(Debug)]
struct InFlight(Arc<tokio::sync::watch::Sender<InnerRequests>>);

impl InFlight {
    fn new(requests: &Arc<tokio::sync::watch::Sender<InnerRequests>>) -> Self {
        // Only the first request wakes the connection's idle timer.
        requests.send_if_modified(|r| {
            r.active += 1;
            r.since = Instant::now();
            r.active == 1
        });
        Self(Arc::clone(requests))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Only the last one does (its end starts the idle time).
        self.0.send_if_modified(|r| {
            r.active = r.active.saturating_sub(1);
            r.since = Instant::now();
            r.active == 0
        });
    }
}

/// Returns once no request has been in progress for `idle`.
async fn no_request_for(
    requests: &mut tokio::sync::watch::Receiver<InnerRequests>,
    idle: Duration,
) {
    loop {
        let now = *requests.borrow_and_update();
        let quiet_at = now.since.checked_add(idle).filter(|_| now.active == 0);
        let quiet = async {
            match quiet_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = quiet => return,
            changed = requests.changed() => {
                // The connection's service holds the sender: never gone
                // while the connection is served.
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Why a response body on an inner HTTP/2 connection ended early.
#[derive(Debug, thiserror::Error)]
enum InnerBodyError {
    /// The backend's response failed.
    #[error(transparent)]
    Backend(#[from] hyper::Error),
    /// Nothing moved either way for the stream idle timeout (in ms): the
    /// response was dropped and its stream is reset.
    #[error("no byte either way for {0} ms: the response was dropped")]
    Idle(u64),
}

/// What an [`IdleBody`] and its watchdog share.
struct Watched {
    /// The response and its mark on the connection's requests; taken by
    /// the watchdog when idle.
    body: Option<(ProxyBody, InFlight)>,
    /// When the body last produced a frame.
    last: Instant,
    /// The task waiting on the body, woken when the watchdog takes it.
    waker: Option<std::task::Waker>,
}

/// A response body on an inner HTTP/2 connection, dropped by its watchdog
/// after the stream idle timeout without a frame produced or a request
/// byte received: hyper's HTTP/2 server keeps a stream whose client stops
/// reading for ever (it waits for flow-control capacity), and its
/// connection's pings keep the tunnel stream's pipe from idling; dropping
/// the body releases the backend response, the endpoint pick and the
/// request's slots. The stream is then reset when hyper polls the body
/// again, or closed with its idle connection.
struct IdleBody {
    watched: Arc<std::sync::Mutex<Watched>>,
    idle: Duration,
    /// Dropped with the body: stops the watchdog.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl IdleBody {
    /// `response` with its body watched for `idle`; `uploaded` counts the
    /// request body's bytes (an upload in progress is not idle).
    fn watch(
        response: Response<ProxyBody>,
        in_flight: InFlight,
        uploaded: Arc<AtomicU64>,
        idle: Duration,
    ) -> Response<Self> {
        let (parts, body) = response.into_parts();
        let watched = Arc::new(std::sync::Mutex::new(Watched {
            body: Some((body, in_flight)),
            last: Instant::now(),
            waker: None,
        }));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let dog = Arc::downgrade(&watched);
        tokio::spawn(async move {
            let mut seen = uploaded.load(Ordering::Relaxed);
            let mut at = Instant::now().checked_add(idle);
            loop {
                let Some(deadline) = at else { return };
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep_until(deadline.into()) => {}
                }
                let Some(watched) = dog.upgrade() else { return };
                let now = Instant::now();
                let bytes = uploaded.load(Ordering::Relaxed);
                if bytes != seen {
                    seen = bytes;
                    at = now.checked_add(idle);
                    continue;
                }
                let mut w = watched.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(next) = w.last.checked_add(idle)
                    && next > now
                {
                    at = Some(next);
                    continue;
                }
                let (body, waker) = (w.body.take(), w.waker.take());
                drop(w);
                drop(body);
                if let Some(waker) = waker {
                    waker.wake();
                }
                tracing::debug!(
                    idle_ms = millis(idle),
                    "inner HTTP/2 response dropped: no byte either way for the stream idle timeout"
                );
                return;
            }
        });
        Response::from_parts(
            parts,
            Self {
                watched,
                idle,
                _stop: stop,
            },
        )
    }
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = InnerBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, InnerBodyError>>> {
        let mut w = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((body, _)) = w.body.as_mut() else {
            return Poll::Ready(Some(Err(InnerBodyError::Idle(millis(self.idle)))));
        };
        let polled = Pin::new(body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => w.last = Instant::now(),
            Poll::Pending => w.waker = Some(cx.waker().clone()),
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {}
        }
        polled.map(|f| f.map(|r| r.map_err(InnerBodyError::Backend)))
    }

    fn is_end_stream(&self) -> bool {
        let w = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        w.body.as_ref().is_some_and(|(b, _)| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let w = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        w.body
            .as_ref()
            .map_or_else(SizeHint::default, |(b, _)| b.size_hint())
    }
}

/// Envoy's response flags for what the waypoint itself answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    /// Proxied (`-`).
    None,
    /// No route matched (`NR`).
    NoRoute,
    /// No endpoint for the backend (`UH`).
    NoHealthyUpstream,
    /// The backend could not be reached (`UF`).
    ConnectFailure,
    /// The backend reset the request (`UC`).
    UpstreamReset,
    /// The route timeout fired (`UT`).
    Timeout,
    /// The route's configuration cannot be served (`NC`, 500).
    NoConfig,
    /// A fault delay was injected (`DI`).
    DelayInjected,
    /// A fault abort answered (`FI`).
    FaultInjected,
    /// The destination is at its `maxConnections` (`UO`).
    Overflow,
    /// Nothing moved for the stream idle timeout before the answer
    /// (`SI`, with 408).
    StreamIdle,
}

impl Flags {
    /// Envoy's short form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::NoRoute => "NR",
            Self::NoHealthyUpstream => "UH",
            Self::ConnectFailure => "UF",
            Self::UpstreamReset => "UC",
            Self::Timeout => "UT",
            Self::NoConfig => "NC",
            Self::DelayInjected => "DI",
            Self::FaultInjected => "FI",
            Self::Overflow => "UO",
            Self::StreamIdle => "SI",
        }
    }
}

/// How waiting for a request's answer ended.
#[derive(Debug)]
enum Waited<T> {
    /// The tries ended with this.
    Answered(T),
    /// The route's timeout passed first.
    RouteTimeout,
    /// Nothing moved for the stream idle timeout: no answer from the
    /// backend, no request byte from the client.
    StreamIdle,
}

/// Waits for `tries`, at most the route timeout `route` (Istio's default:
/// none), and no longer than `idle` (the stream idle timeout) without a
/// request byte from the client (`uploaded` counts them): a backend that
/// never answers, on a route without a timeout, holds the request, its
/// slots and its endpoint pick no longer than Envoy's
/// `stream_idle_timeout` would (the waypoint answers 408, flag `SI`). The
/// same bounds a small body being read whole for retries or mirrors.
/// Upload progress is looked at once per `idle`: the request is dropped
/// between one and two `idle`s after the client's last byte. An inner
/// HTTP/1.1 request's tunnel stream is timed out by its pipe too; an
/// inner HTTP/2 one's is not (its pings keep the stream busy): this is
/// what bounds it.
async fn wait_for_answer<F: Future>(
    tries: F,
    route: Option<Duration>,
    uploaded: &AtomicU64,
    idle: Duration,
) -> Waited<F::Output> {
    let start = tokio::time::Instant::now();
    let deadline = route.and_then(|t| start.checked_add(t));
    let mut tries = std::pin::pin!(tries);
    let mut seen = uploaded.load(Ordering::Relaxed);
    let mut idle_at = start.checked_add(idle);
    loop {
        let wake = match (deadline, idle_at) {
            (Some(d), Some(i)) => Some(d.min(i)),
            (d, i) => d.or(i),
        };
        let Some(wake) = wake else {
            return Waited::Answered(tries.await);
        };
        tokio::select! {
            outcome = tries.as_mut() => return Waited::Answered(outcome),
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = tokio::time::Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Waited::RouteTimeout;
        }
        if idle_at.is_some_and(|i| now >= i) {
            let n = uploaded.load(Ordering::Relaxed);
            if n == seen {
                return Waited::StreamIdle;
            }
            seen = n;
            idle_at = now.checked_add(idle);
        }
    }
}

/// What is recorded when the response ends (its body's last frame, or
/// the client going away).
struct Finish {
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    start: Instant,
    method: http::Method,
    path: String,
    authority: String,
    route: String,
    upstream: Option<Chosen>,
    /// The last try's endpoint pick: the request counts as active on it
    /// (`LEAST_REQUEST`, `maxConnections`) until its response ends.
    _pick: Option<mesh_routing::Pick>,
    status: StatusCode,
    flags: Flags,
    request_bytes: Arc<AtomicU64>,
    /// The policy that denied the request (or why, when none is named).
    policy: Option<String>,
    /// The waypoint's span (its ids go to the backend in `traceparent`).
    span: crate::trace::Span,
    /// The wall-clock time of `start` (the exported span's start).
    wall_start: std::time::SystemTime,
    /// The HTTP version the client spoke.
    version: http::Version,
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for what the waypoint answered
    /// itself for a reason the status and flags do not tell (an RBAC
    /// denial has no response flag in Envoy).
    details: Option<String>,
    /// A gRPC request (`content-type: application/grpc...`): counted with
    /// `request_protocol="grpc"` and a `grpc_response_status`.
    grpc: bool,
    /// The response's `grpc-status` (its headers, for a trailers-only
    /// answer, or its trailers).
    grpc_status: Option<u32>,
    /// A request multiplexed on an inner HTTP/2 connection: its own slots
    /// of the agent's bounds until its response ends (see [`handle`]).
    _slot: Option<StreamPermit>,
}

impl Finish {
    fn record(&self, response_bytes: u64) {
        let duration = self.start.elapsed();
        let t = &self.tunnel;
        let destination = self
            .upstream
            .as_ref()
            .map_or_else(mesh_agent::telemetry::PeerLabels::unknown, |c| {
                c.labels.clone()
            });
        let labels = RequestLabels {
            source: t.source.clone(),
            destination,
            destination_service: t.target.service_labels(),
            protocol: if self.grpc { "grpc" } else { "http" },
            response_code: self.status.as_u16(),
            grpc_response_status: self.grpc.then(|| {
                self.grpc_status
                    .unwrap_or_else(|| grpc_status_of_http(self.status))
            }),
            response_flags: self.flags.as_str(),
        };
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.shared.metrics.request(
            &labels,
            duration.as_secs_f64() * 1000.0,
            request_bytes,
            response_bytes,
        );
        tracing::info!(
            target: mesh_agent::telemetry::ACCESS_TARGET,
            reporter = "waypoint",
            src = %t.peer,
            src_identity = %t.peer_id,
            src_workload = %labels.source.workload,
            method = %self.method,
            path = %self.path,
            authority = %self.authority,
            service = %t.target,
            route = %self.route,
            policy = self.policy.as_deref(),
            response_code_details = self.details.as_deref(),
            upstream = self.upstream.as_ref().map(|c| tracing::field::display(c.addr)),
            dst_workload = %labels.destination.workload,
            status = self.status.as_u16(),
            grpc_status = labels.grpc_response_status,
            response_flags = self.flags.as_str(),
            request_bytes,
            response_bytes,
            duration_ms = duration.as_millis() as u64,
            trace_id = %self.span.trace_id,
            "http request"
        );
        if let Some(sink) = self.shared.spans.get()
            && self.span.sampled()
        {
            sink.record(
                &self.span,
                self.finished(duration, &labels, request_bytes, response_bytes),
            );
        }
    }

    /// The span's record, with Envoy's and Istio's tag names.
    fn finished(
        &self,
        duration: std::time::Duration,
        labels: &RequestLabels,
        request_bytes: u64,
        response_bytes: u64,
    ) -> crate::otlp::Finished {
        use opentelemetry::KeyValue;
        let t = &self.tunnel;
        let host = &labels.destination_service.host;
        let port = t.target.port.port;
        let mut attributes = vec![
            KeyValue::new("component", "proxy"),
            KeyValue::new("http.method", self.method.to_string()),
            KeyValue::new(
                "http.url",
                format!("http://{}{}", self.authority, self.path),
            ),
            KeyValue::new("http.protocol", format!("{:?}", self.version)),
            KeyValue::new("http.status_code", i64::from(self.status.as_u16())),
            KeyValue::new("response_flags", self.flags.as_str()),
            KeyValue::new("request_size", request_bytes as i64),
            KeyValue::new("response_size", response_bytes as i64),
            KeyValue::new("peer.address", t.peer.ip().to_string()),
            KeyValue::new(
                "downstream_cluster",
                labels.source.canonical_service.clone(),
            ),
            KeyValue::new("istio.source_principal", t.peer_id.to_string()),
            KeyValue::new("route_name", self.route.clone()),
            // Istio's custom tags: the proxy's own workload.
            KeyValue::new(
                "istio.canonical_service",
                self.shared.identity.service_account().to_owned(),
            ),
            KeyValue::new(
                "istio.namespace",
                self.shared.identity.namespace().to_owned(),
            ),
        ];
        if let Some(c) = &self.upstream {
            let subset = c
                .dest
                .as_ref()
                .and_then(|d| d.subset.as_deref())
                .unwrap_or("");
            let cluster = format!("outbound|{port}|{subset}|{host}");
            attributes.push(KeyValue::new("upstream_cluster", cluster.clone()));
            attributes.push(KeyValue::new("upstream_cluster.name", cluster));
            attributes.push(KeyValue::new("upstream_address", c.addr.to_string()));
            attributes.push(KeyValue::new(
                "istio.destination_canonical_service",
                c.labels.canonical_service.clone(),
            ));
        }
        let error = self.status.is_server_error();
        if error {
            attributes.push(KeyValue::new("error", true));
        }
        crate::otlp::Finished {
            name: format!("{host}:{port}/*"),
            start: self.wall_start,
            end: self.wall_start + duration,
            attributes,
            error,
        }
    }
}

/// A response body that records the request when it ends.
struct Metered {
    inner: ProxyBody,
    bytes: u64,
    finish: Option<Finish>,
}

impl Metered {
    fn done(&mut self) {
        if let Some(f) = self.finish.take() {
            f.record(self.bytes);
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.done();
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(f) = self.finish.as_mut()
                    && let Some(code) = grpc_status(trailers)
                {
                    f.grpc_status = Some(code);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The gRPC status a client derives from an HTTP status without one
/// (gRPC's HTTP-to-gRPC status mapping): what a gRPC request the waypoint
/// answered itself, or whose backend answered plain HTTP, ended with.
fn grpc_status_of_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        // OK without a grpc-status: the stream ended without one (UNKNOWN).
        200 => 2,
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

fn local(status: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are not forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    // `te: trailers` is the one TE value HTTP/2 allows (gRPC needs it).
    let trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for h in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(h);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// What an HTTP/1.1 request's `Connection: upgrade` asks for.
#[derive(Debug, PartialEq, Eq)]
enum UpgradeAsked {
    /// No upgrade, or `h2c`: served as an ordinary request (the upgrade
    /// headers are hop-by-hop and not forwarded), as Envoy does.
    None,
    /// WebSocket, the upgrade Istio's waypoints carry: forwarded.
    WebSocket(HeaderValue),
    /// Any other protocol: refused (403), as Envoy refuses an upgrade it
    /// is not configured for; an opaque channel would take the requests
    /// after it past routing and policy.
    Other,
}

/// The upgrade an HTTP/1.1 request asks for (`Connection: upgrade` with an
/// `Upgrade` header).
fn upgrade_requested(headers: &HeaderMap) -> UpgradeAsked {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let Some(protocol) = headers.get(header::UPGRADE).filter(|_| connection_upgrade) else {
        return UpgradeAsked::None;
    };
    let token = protocol.to_str().unwrap_or("").trim();
    if token.eq_ignore_ascii_case("websocket") {
        UpgradeAsked::WebSocket(protocol.clone())
    } else if token.eq_ignore_ascii_case("h2c") {
        UpgradeAsked::None
    } else {
        UpgradeAsked::Other
    }
}

/// The one authority a request names, which policy, routing, the access
/// log and the backend all see: the request target's (HTTP/1.1 absolute
/// form, HTTP/2 `:authority`), else its `Host`. A request naming two cannot
/// make a policy check one host while the backend serves another, so it
/// gets 400 (Envoy's detail as the reason): two `Host` headers; an
/// HTTP/2 `host` that is not its `:authority` (RFC 9113 8.3.1, compared
/// as URIs by [`same_authority`]: `web:80` is `web`); userinfo in the
/// authority. In HTTP/1.1 absolute form the target's authority replaces a
/// different `Host` (RFC 9112 3.2.2).
fn request_authority(parts: &mut http::request::Parts) -> Result<String, &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err("multiple_host_headers");
    }
    let Some(target) = parts.uri.authority().map(|a| a.as_str().to_owned()) else {
        return match host {
            Some(h) => match h.to_str() {
                Ok(h) if h.contains('@') => Err("userinfo_in_authority"),
                Ok(h) => Ok(h.to_owned()),
                Err(_) => Err("invalid_host"),
            },
            // RFC 9112 3.2: an HTTP/1.1 request without Host is refused.
            None if parts.version == http::Version::HTTP_11 => Err("missing_host"),
            None => Ok(String::new()),
        };
    };
    if target.contains('@') {
        return Err("userinfo_in_authority");
    }
    match host {
        Some(h) if same_authority(h.as_bytes(), &target, parts.uri.scheme()) => {}
        None => {}
        Some(_) if parts.version == http::Version::HTTP_2 => {
            return Err("host_differs_from_authority");
        }
        Some(_) => {
            let v = HeaderValue::from_str(&target).map_err(|_| "invalid_authority")?;
            parts.headers.insert(header::HOST, v);
        }
    }
    Ok(target)
}

/// Whether `host` and `target` name the same authority (RFC 9110 4.2.3,
/// as URIs are compared): the host case-insensitively, and a missing or
/// empty port as the scheme's default (80 for `http`, and for a request
/// without a scheme, the waypoint's inner HTTP being plaintext; 443 for
/// `https`). `web:80` and `Web` are the same authority for `http`.
fn same_authority(host: &[u8], target: &str, scheme: Option<&http::uri::Scheme>) -> bool {
    if host.eq_ignore_ascii_case(target.as_bytes()) {
        return true;
    }
    let default = match scheme.map(http::uri::Scheme::as_str) {
        None | Some("http") => Some(80),
        Some("https") => Some(443),
        Some(_) => None,
    };
    // (host, port): the port as the default when absent or empty.
    let split = |a: &[u8]| -> Option<(String, Option<u16>)> {
        let a = std::str::from_utf8(a).ok()?;
        // An IPv6 literal's colons are inside its brackets.
        let (name, port) = match a.rfind(':') {
            Some(i) if !a[i..].contains(']') => (&a[..i], &a[i + 1..]),
            _ => (a, ""),
        };
        let port = if port.is_empty() {
            default
        } else if port.bytes().all(|b| b.is_ascii_digit()) {
            Some(port.parse().ok()?)
        } else {
            return None;
        };
        (!name.is_empty()).then(|| (name.to_ascii_lowercase(), port))
    };
    match (split(host), split(target.as_bytes())) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Relays an upgraded connection (after a `101`) between the client and
/// the backend until either side closes, or the tunnel stream is reset
/// (then the backend connection is dropped at once). It holds the tunnel,
/// so the stream's slots of the agent's bounds (per-peer and global caps)
/// and its connection's idle deadline count it until it ends.
fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    service: String,
    tunnel: Arc<Tunnel>,
) {
    tokio::spawn(async move {
        let relay = async {
            let (client, backend) = match tokio::join!(client, backend) {
                (Ok(c), Ok(b)) => (c, b),
                (c, b) => {
                    tracing::debug!(
                        service,
                        client = c.is_ok(),
                        backend = b.is_ok(),
                        "upgrade not completed"
                    );
                    return None;
                }
            };
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            Some(tokio::io::copy_bidirectional(&mut client, &mut backend).await)
        };
        let relayed = tokio::select! {
            r = relay => r,
            () = tunnel.reset.cancelled() => Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the tunnel stream was reset",
            ))),
        };
        let Some(relayed) = relayed else { return };
        match relayed {
            Ok((up, down)) => {
                tracing::debug!(
                    service,
                    bytes_up = up,
                    bytes_down = down,
                    "upgraded connection closed"
                );
            }
            Err(e) => {
                tracing::debug!(service, error = %e, "upgraded connection ended with an error")
            }
        }
    });
}

/// Answers one request; `request_bytes` counts its body's bytes as they
/// are sent to the backend.
async fn handle(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    mut req: Request<Incoming>,
    request_bytes: Arc<AtomicU64>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    // An HTTP/1.1 upgrade (WebSocket...): carried to the backend, never
    // retried, mirrored or sent as HTTP/2; the client's side of the
    // switched connection is taken before the request is consumed.
    let asked = if req.version() == http::Version::HTTP_11 {
        upgrade_requested(req.headers())
    } else {
        UpgradeAsked::None
    };
    let refuse_upgrade = asked == UpgradeAsked::Other;
    let upgrade = match asked {
        UpgradeAsked::WebSocket(protocol) => Some((protocol, hyper::upgrade::on(&mut req))),
        UpgradeAsked::None | UpgradeAsked::Other => None,
    };
    let (mut parts, body) = req.into_parts();
    let authority = request_authority(&mut parts);
    let mut finish = Finish {
        shared: Arc::clone(&shared),
        tunnel: Arc::clone(&tunnel),
        start,
        method: parts.method.clone(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.to_string()),
        authority: authority.clone().unwrap_or_default(),
        route: "-".to_owned(),
        upstream: None,
        _pick: None,
        status: StatusCode::OK,
        flags: Flags::None,
        request_bytes,
        span: crate::trace::Span::start(&parts.headers),
        wall_start: std::time::SystemTime::now(),
        version: parts.version,
        policy: None,
        details: None,
        grpc: parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
        grpc_status: None,
        _slot: None,
    };
    let answer = |mut finish: Finish, status: StatusCode, flags: Flags| {
        finish.status = status;
        finish.flags = flags;
        metered(local(status), finish)
    };
    let target = &tunnel.target;
    let active = shared.active();
    // Policies and routes see the path as Istio's default normalisation
    // (BASE) leaves it, and the backend gets that path: a request cannot
    // reach what a policy denies by spelling its path differently.
    // Istio refuses a method that is not upper case (its normalisation
    // of `methods`), and a path Envoy's normalisation cannot read.
    if parts
        .method
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        finish.details = Some("method_not_upper_case".into());
        return answer(finish, StatusCode::BAD_REQUEST, Flags::None);
    }
    // A tunnel stream's slots cover one request at a time (HTTP/1.1). The
    // requests multiplexed on an inner HTTP/2 connection (up to
    // MAX_INNER_STREAMS) each hold their own, a slot of the peer's stream
    // cap and one of the global cap, so one tunnel stream cannot open a
    // hundred backend connections past the bounds.
    if parts.version == http::Version::HTTP_2 {
        match shared.bounds.stream(&tunnel.peer_id) {
            Ok(slot) => finish._slot = Some(slot),
            Err(refusal) => {
                finish.details = Some(format!("waypoint_limit_{}", refusal.as_str()));
                return answer(finish, StatusCode::SERVICE_UNAVAILABLE, Flags::Overflow);
            }
        }
    }
    let authority = match authority {
        Ok(a) => a,
        Err(detail) => {
            finish.details = Some(detail.into());
            return answer(finish, StatusCode::BAD_REQUEST, Flags::None);
        }
    };
    if refuse_upgrade {
        finish.details = Some("upgrade_failed".into());
        return answer(finish, StatusCode::FORBIDDEN, Flags::None);
    }
    let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(normalized) = mesh_policy::normalize_path(raw) else {
        finish.details = Some("path_normalization_failed".into());
        return answer(finish, StatusCode::BAD_REQUEST, Flags::None);
    };
    if normalized != parts.uri.path() {
        let with_query = match parts.uri.query() {
            Some(q) => format!("{normalized}?{q}"),
            None => normalized.clone(),
        };
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = with_query.parse().ok();
        match http::Uri::from_parts(uri) {
            Ok(u) => parts.uri = u,
            Err(_) => return answer(finish, StatusCode::BAD_REQUEST, Flags::None),
        }
    }
    if !active.policies.is_empty() {
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            // Bytes that are not UTF-8 cannot match a policy's text, but the
            // header is still there (`*` sees it, `notValues` are checked).
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let request = mesh_policy::HttpRequest {
            method: parts.method.as_str(),
            path: &normalized,
            host: &authority,
            headers: &headers,
        };
        let decision = active.authorize(&tunnel, Some(&request));
        if let Some(reason) = decision.deny_reason() {
            finish.policy = Some(
                reason
                    .policy()
                    .map_or_else(|| reason.to_string(), ToString::to_string),
            );
            // Envoy's detail, with Istio's name of the policy (without the
            // rule index, which is not tracked).
            finish.details = Some(format!(
                "rbac_access_denied_matched_policy[{}]",
                reason.policy().map_or_else(
                    || "none".to_owned(),
                    |p| format!("ns[{}]-policy[{}]", p.namespace, p.name)
                )
            ));
            return rbac_denied(finish);
        }
    }
    // A pod addressed by its own IP has no route: the pod is the backend.
    let service = match &target.addressed {
        Addressed::Service(service) => service,
        Addressed::Pod(_) => {
            let upstream = Upstream::of(target);
            return forward(shared, tunnel, parts, body, upgrade, finish, None, upstream).await;
        }
    };
    // The client's namespace from its verified identity (not its baggage).
    let selection = active.routes.select(
        service,
        target.port.port,
        tunnel.peer_id.namespace(),
        &parts.method,
        &parts.uri,
        &parts.headers,
    );
    let (rule, backend): (Option<&Arc<Rule>>, Backend) = match selection {
        Selection::NoMatch => return answer(finish, StatusCode::NOT_FOUND, Flags::NoRoute),
        Selection::Default => (
            None,
            Backend::Service {
                service: service.clone(),
                port: target.port.port,
                subset: None,
            },
        ),
        Selection::Rule(rule) => {
            finish.route = format!("{}#{}", rule.route, rule.index);
            if let Some(why) = &rule.broken {
                tracing::debug!(route = %finish.route, reason = %why, "rule answers 500");
                return answer(finish, StatusCode::INTERNAL_SERVER_ERROR, Flags::NoConfig);
            }
            // Fault injection happens before routing (Envoy's fault filter):
            // a delay is not counted in the route timeout.
            if let Some((delay, share)) = rule.fault.delay
                && fastrand::f64() < share
            {
                finish.flags = Flags::DelayInjected;
                tokio::time::sleep(delay).await;
            }
            if let Some((status, share)) = rule.fault.abort
                && fastrand::f64() < share
            {
                return answer(finish, status, Flags::FaultInjected);
            }
            if let Some(redirect) = &rule.redirect {
                let location = redirect.location(&authority, parts.uri.path(), parts.uri.query());
                let mut r = answer(finish, redirect.status, Flags::None);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
            match rule.choose(|total| fastrand::u32(..total)) {
                Some(b) => (Some(rule), b.clone()),
                None => {
                    return answer(finish, StatusCode::INTERNAL_SERVER_ERROR, Flags::NoConfig);
                }
            }
        }
    };
    let upstream = match backend {
        Backend::Service {
            service,
            port,
            subset,
        } => Upstream::Service {
            service,
            port,
            subset,
        },
        Backend::Invalid(_) => {
            return answer(finish, StatusCode::INTERNAL_SERVER_ERROR, Flags::NoConfig);
        }
    };
    let rule = rule.cloned();
    forward(shared, tunnel, parts, body, upgrade, finish, rule, upstream).await
}

/// Rewrites, retries, mirrors and sends the routed request (`rule`, if a
/// route rule matched) to `upstream`, and answers the client.
#[allow(clippy::too_many_arguments)] // the request's parts and its context
async fn forward(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    mut parts: http::request::Parts,
    body: Incoming,
    upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
    mut finish: Finish,
    rule: Option<Arc<Rule>>,
    upstream: Upstream,
) -> Response<ProxyBody> {
    let answer = |mut finish: Finish, status: StatusCode, flags: Flags| {
        finish.status = status;
        finish.flags = flags;
        metered(local(status), finish)
    };
    let client = Client {
        namespace: &tunnel.source.namespace,
        ip: tunnel.peer.ip(),
    };
    let authority = finish.authority.clone();
    let rule = rule.as_ref();
    let mut path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Some(rule) = rule {
        if let Some(new) = rule.rewrite.path(parts.uri.path()) {
            path = match parts.uri.query() {
                Some(q) => format!("{new}?{q}"),
                None => new,
            };
        }
        if let Some(host) = &rule.rewrite.hostname {
            parts.headers.insert(header::HOST, host.clone());
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    // The client's certificate as the waypoint verified it, never as the
    // client wrote it (Envoy's SANITIZE_SET): the backend's agent sees the
    // waypoint's identity, so a client's own value would pass as proven.
    parts.headers.remove(XFCC);
    if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={}", shared.identity, tunnel.peer_id))
    {
        parts.headers.insert(XFCC, v);
    }
    if !parts.headers.contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(&authority)
    {
        parts.headers.insert(header::HOST, host);
    }
    if let Some(rule) = rule {
        rule.request_headers.apply(&mut parts.headers);
    }
    finish.span.inject(&mut parts.headers);
    let mut policy = rule.map(|r| r.retry.clone()).unwrap_or_default();
    if let Some((protocol, _)) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
        policy.attempts = 0;
    }
    let counted = CountedBody {
        inner: body,
        bytes: Arc::clone(&finish.request_bytes),
    };
    // A body is replayable when it is small and its size known in advance.
    let small = counted
        .size_hint()
        .exact()
        .is_some_and(|n| n <= MAX_REPLAY_BODY);
    let mirrors = match (rule, &upgrade) {
        (Some(r), None) => r.mirrors.as_slice(),
        _ => &[][..],
    };
    let (replay, streamed) = if (policy.attempts > 0 || !mirrors.is_empty()) && small {
        // A client that stops sending its (small) body is bounded by the
        // stream idle timeout too.
        let uploaded = Arc::clone(&finish.request_bytes);
        let idle = shared.stream_idle_timeout();
        match wait_for_answer(counted.collect(), None, &uploaded, idle).await {
            Waited::Answered(Ok(c)) => (Some(c.to_bytes()), None),
            Waited::Answered(Err(_)) => {
                return answer(finish, StatusCode::BAD_REQUEST, Flags::None);
            }
            Waited::StreamIdle | Waited::RouteTimeout => {
                return answer(finish, StatusCode::REQUEST_TIMEOUT, Flags::StreamIdle);
            }
        }
    } else {
        (None, Some(counted))
    };
    shared.proxy.budget.deposit();
    let template = Template {
        method: parts.method.clone(),
        path,
        headers: parts.headers.clone(),
        upgrade: upgrade.is_some(),
    };
    for (backend, share) in mirrors {
        if fastrand::f64() < *share {
            mirror(&shared, client, &template, backend, replay.as_ref());
        }
    }
    let mut last = None;
    let mut last_pick = None;
    let tries = send_with_retries(
        &shared,
        client,
        &template,
        (&upstream, tunnel.vip),
        &policy,
        replay,
        streamed,
        (&mut last, &mut last_pick),
    );
    let waited = wait_for_answer(
        tries,
        rule.and_then(|r| r.timeout),
        &finish.request_bytes,
        shared.stream_idle_timeout(),
    )
    .await;
    // The endpoint of the last try, even when a timeout cut it.
    finish.upstream = last;
    finish._pick = last_pick;
    let outcome = match waited {
        Waited::Answered(outcome) => outcome,
        Waited::RouteTimeout => {
            return answer(finish, StatusCode::GATEWAY_TIMEOUT, Flags::Timeout);
        }
        Waited::StreamIdle => {
            return answer(finish, StatusCode::REQUEST_TIMEOUT, Flags::StreamIdle);
        }
    };
    let response = match outcome {
        Try::Response(r) => r,
        Try::NoEndpoint(why) => {
            let flags = match why {
                NoEndpoint::Missing(_) => Flags::NoConfig,
                NoEndpoint::Unhealthy(_) => Flags::NoHealthyUpstream,
                NoEndpoint::Overflow(_) => Flags::Overflow,
            };
            tracing::debug!(service = %upstream, reason = %why, "no endpoint for the request");
            return answer(finish, StatusCode::SERVICE_UNAVAILABLE, flags);
        }
        Try::Timeout => return answer(finish, StatusCode::GATEWAY_TIMEOUT, Flags::Timeout),
        Try::Connect => {
            return answer(
                finish,
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::ConnectFailure,
            );
        }
        Try::Reset => {
            return answer(
                finish,
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UpstreamReset,
            );
        }
        Try::BadUri => return answer(finish, StatusCode::BAD_REQUEST, Flags::None),
    };
    let mut response = response;
    let switched = match upgrade {
        Some((_, client_side)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let backend_side = hyper::upgrade::on(&mut response);
            let protocol = response.headers().get(header::UPGRADE).cloned();
            splice_upgrade(
                client_side,
                backend_side,
                upstream.to_string(),
                Arc::clone(&tunnel),
            );
            protocol
        }
        _ => None,
    };
    let (mut rparts, rbody) = response.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    if let Some(protocol) = switched {
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        rparts.headers.insert(header::UPGRADE, protocol);
    }
    if let Some(rule) = rule {
        rule.response_headers.apply(&mut rparts.headers);
    }
    finish.status = rparts.status;
    finish.grpc_status = grpc_status(&rparts.headers);
    let body = rbody.boxed();
    metered(Response::from_parts(rparts, body), finish)
}

/// Envoy's answer to a request its RBAC filter denies: 403 `RBAC: access
/// denied`, no response flag (Envoy has none for RBAC: Istio's metrics
/// show `response_flags="-"`), the reason in the access log.
fn rbac_denied(mut finish: Finish) -> Response<ProxyBody> {
    finish.status = StatusCode::FORBIDDEN;
    finish.flags = Flags::None;
    let mut r = Response::new(
        Full::new(Bytes::from_static(b"RBAC: access denied"))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    metered(r, finish)
}

fn metered(response: Response<ProxyBody>, finish: Finish) -> Response<ProxyBody> {
    let (parts, inner) = response.into_parts();
    let body = Metered {
        inner,
        bytes: 0,
        finish: Some(finish),
    };
    Response::from_parts(parts, body.boxed())
}

/// Sends a copy of the request to `backend` and ignores the answer, as
/// Envoy's shadowing does (`-shadow` appended to the Host). Only bodies kept
/// for replay can be mirrored; a mirror over the in-flight bound is skipped.
fn mirror(
    shared: &Arc<Shared>,
    client: Client<'_>,
    template: &Template,
    backend: &Backend,
    body: Option<&Bytes>,
) {
    let Backend::Service {
        service,
        port,
        subset,
    } = backend
    else {
        return;
    };
    let Some(body) = body.cloned() else {
        shared.metrics.mirror("skipped_body");
        return;
    };
    let Ok(permit) = Arc::clone(&shared.proxy.mirrors).try_acquire_owned() else {
        shared.metrics.mirror("skipped_limit");
        return;
    };
    let Ok((chosen, pick)) = shared.active().services.endpoint(
        &shared.balancer,
        service,
        *port,
        subset.as_deref(),
        client,
        &[],
    ) else {
        shared.metrics.mirror("no_endpoint");
        return;
    };
    let Ok(uri) = format!("http://{}{}", chosen.addr, template.path).parse::<http::Uri>() else {
        return;
    };
    let mut req = Request::new(Full::new(body).map_err(|e| match e {}).boxed_unsync());
    *req.method_mut() = template.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = template.headers.clone();
    if let Some(host) = template
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&format!("{host}-shadow"))
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let p = &shared.proxy;
    if chosen.http2 {
        *req.version_mut() = http::Version::HTTP_2;
    }
    let sent = match (chosen.hbone, chosen.http2) {
        (false, false) => p.client.request(req),
        (true, false) => p.hbone.request(req),
        (false, true) => p.client_h2.request(req),
        (true, true) => p.hbone_h2.request(req),
    };
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _permit = permit;
        let _pick = pick;
        // The answer is read and dropped frame by frame (the connection
        // goes back to the pool), never held whole, and within
        // MIRROR_TIMEOUT: a mirror answering slowly or without end cannot
        // hold a slot of the mirror cap or its pick for longer.
        let exchange = async {
            let mut body = sent.await.map_err(|_| "failed")?.into_body();
            while let Some(frame) = body.frame().await {
                frame.map_err(|_| "failed")?;
            }
            Ok("sent")
        };
        let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
            Ok(Ok(o) | Err(o)) => o,
            Err(_) => "timeout",
        };
        shared.metrics.mirror(outcome);
    });
}

/// What every try of a request sends (origin-form path, headers).
struct Template {
    method: http::Method,
    path: String,
    headers: HeaderMap,
    /// An HTTP/1.1 upgrade: always sent as HTTP/1.1.
    upgrade: bool,
}

/// The outcome of the last try.
enum Try {
    Response(Response<Incoming>),
    NoEndpoint(NoEndpoint),
    Timeout,
    Connect,
    Reset,
    BadUri,
}

/// Sends the request to an endpoint of `service`:`port` (of `subset`; a
/// fresh choice per try, other endpoints preferred on retries), retrying per
/// `policy` while the body can be replayed and the budget allows; returns
/// the last outcome; `last` is the endpoint of the last try and its pick
/// (set before it is sent).
#[allow(clippy::too_many_arguments)]
async fn send_with_retries(
    shared: &Shared,
    client: Client<'_>,
    template: &Template,
    (upstream, dialled): (&Upstream, SocketAddr),
    policy: &RetryPolicy,
    replay: Option<Bytes>,
    mut streamed: Option<CountedBody>,
    (last, last_pick): (&mut Option<Chosen>, &mut Option<mesh_routing::Pick>),
) -> Try {
    let mut retries = 0u32;
    let mut tried = Vec::new();
    loop {
        let picked =
            shared
                .active()
                .services
                .pick(&shared.balancer, upstream, dialled, client, &tried);
        let (chosen, pick) = match picked {
            Ok(p) => p,
            Err(e) => return Try::NoEndpoint(e),
        };
        tried.push(chosen.addr);
        *last = Some(chosen.clone());
        *last_pick = pick;
        let body: BackendBody = match (&replay, streamed.take()) {
            (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync(),
            (None, Some(s)) => s.boxed_unsync(),
            (None, None) => Empty::new().map_err(|e| match e {}).boxed_unsync(),
        };
        let Ok(uri) = format!("http://{}{}", chosen.addr, template.path).parse::<http::Uri>()
        else {
            return Try::BadUri;
        };
        let mut req = Request::new(body);
        *req.method_mut() = template.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = template.headers.clone();
        let p = &shared.proxy;
        let http2 = chosen.http2 && !template.upgrade;
        if http2 {
            *req.version_mut() = http::Version::HTTP_2;
        }
        let sent = match (chosen.hbone, http2) {
            (false, false) => p.client.request(req),
            (true, false) => p.hbone.request(req),
            (false, true) => p.client_h2.request(req),
            (true, true) => p.hbone_h2.request(req),
        };
        let result = match policy.per_try_timeout {
            Some(t) => tokio::time::timeout(t, sent).await.ok(),
            None => Some(sent.await),
        };
        let outcome = match result {
            None => Try::Timeout,
            Some(Ok(r)) => Try::Response(r),
            Some(Err(e)) if e.is_connect() => {
                tracing::debug!(upstream = %chosen.addr, error = %e, "backend unreachable");
                Try::Connect
            }
            Some(Err(e)) => {
                tracing::debug!(upstream = %chosen.addr, error = %e, "backend request failed");
                Try::Reset
            }
        };
        let result = match &outcome {
            Try::Response(r) => Some(TryResult::Status(r.status().as_u16())),
            Try::Connect | Try::Reset | Try::Timeout => Some(TryResult::Failure),
            Try::NoEndpoint(_) | Try::BadUri => None,
        };
        if let Some(result) = result {
            shared
                .active()
                .services
                .report(&shared.balancer, &chosen, result);
        }
        let on = &policy.on;
        let retriable = match &outcome {
            Try::Response(r) => on.status(r.status().as_u16()) || on.grpc_status(r.headers()),
            Try::Timeout => on.timeout(),
            Try::Connect => on.connect(),
            Try::Reset => on.reset(),
            Try::NoEndpoint(_) | Try::BadUri => false,
        };
        if !retriable || retries >= policy.attempts || replay.is_none() {
            return outcome;
        }
        if !shared.proxy.budget.withdraw() {
            shared.metrics.retry(false);
            tracing::debug!(service = %upstream, "retry budget spent; not retrying");
            return outcome;
        }
        shared.metrics.retry(true);
        retries += 1;
        // Envoy's backoff: the base (25 ms by default), doubling, jittered.
        let base = policy
            .backoff
            .map_or(25, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let step = base.saturating_mul(1 << (retries - 1).min(3));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(step / 2..=step))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`wait_for_answer`] returned for a backend answering after
    /// `answer_after` while the client uploads a byte every `upload_every`
    /// (never: `None`), with the stream idle timeout 1 s and the route
    /// timeout `route`; and when (paused time: exact, never flaky).
    async fn waited(
        answer_after: Duration,
        upload_every: Option<Duration>,
        route: Option<Duration>,
    ) -> (&'static str, Duration) {
        let uploaded = Arc::new(AtomicU64::new(0));
        let uploader = upload_every.map(|every| {
            let uploaded = Arc::clone(&uploaded);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    uploaded.fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        let start = tokio::time::Instant::now();
        let tries = tokio::time::sleep(answer_after);
        let what = match wait_for_answer(tries, route, &uploaded, Duration::from_secs(1)).await {
            Waited::Answered(()) => "answered",
            Waited::RouteTimeout => "route_timeout",
            Waited::StreamIdle => "stream_idle",
        };
        if let Some(u) = uploader {
            u.abort();
        }
        (what, start.elapsed())
    }

    /// A client uploading steadily, however slowly within the idle
    /// timeout, is waited for as long as it takes (here 30 idle timeouts);
    /// one that stops is dropped between one and two idle timeouts after
    /// its last byte; the route timeout bounds both.
    #[tokio::test(start_paused = true)]
    async fn a_steady_slow_upload_is_waited_for_and_a_stalled_one_is_not() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let (what, took) = waited(s(30), Some(ms(900)), None).await;
        assert_eq!((what, took), ("answered", s(30)));
        // Nothing uploaded, no answer: idle at the first look.
        let (what, took) = waited(s(30), None, None).await;
        assert_eq!((what, took), ("stream_idle", s(1)));
        // An answer within the idle timeout needs no upload.
        let (what, took) = waited(ms(999), None, None).await;
        assert_eq!((what, took), ("answered", ms(999)));
        // The route timeout ends a steady upload too.
        let (what, took) = waited(s(30), Some(ms(500)), Some(s(5))).await;
        assert_eq!((what, took), ("route_timeout", s(5)));
    }

    /// A client that uploads for a while, then stalls, is dropped between
    /// one and two idle timeouts after its last byte.
    #[tokio::test(start_paused = true)]
    async fn an_upload_that_stalls_is_dropped_after_the_idle_timeout() {
        let uploaded = Arc::new(AtomicU64::new(0));
        let feeder = {
            let uploaded = Arc::clone(&uploaded);
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    uploaded.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let start = tokio::time::Instant::now();
        let tries = tokio::time::sleep(Duration::from_secs(60));
        let waited = wait_for_answer(tries, None, &uploaded, Duration::from_secs(1)).await;
        assert!(matches!(waited, Waited::StreamIdle));
        // The last byte came at 5 s.
        let took = start.elapsed();
        assert!(
            (Duration::from_secs(6)..=Duration::from_secs(7)).contains(&took),
            "{took:?}"
        );
        feeder.abort();
    }

    fn parts(version: http::Version, uri: &str, hosts: &[&str]) -> http::request::Parts {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn a_request_names_one_authority_for_policy_routing_and_the_backend() {
        const HTTP_11: http::Version = http::Version::HTTP_11;
        const HTTP_2: http::Version = http::Version::HTTP_2;
        // Origin form: the Host header.
        let mut p = parts(HTTP_11, "/a", &["web.shop"]);
        assert_eq!(request_authority(&mut p), Ok("web.shop".to_owned()));
        assert_eq!(
            request_authority(&mut parts(HTTP_11, "/", &[])),
            Err("missing_host")
        );
        let http_10 = http::Version::HTTP_10;
        assert_eq!(
            request_authority(&mut parts(http_10, "/", &[])),
            Ok(String::new())
        );
        let mut p = parts(HTTP_11, "/", &["x@admin.shop"]);
        assert_eq!(request_authority(&mut p), Err("userinfo_in_authority"));
        // Absolute form: the target's authority, which replaces Host.
        let mut p = parts(HTTP_11, "http://public.shop/", &["admin.shop"]);
        assert_eq!(request_authority(&mut p), Ok("public.shop".to_owned()));
        assert_eq!(p.headers[header::HOST], "public.shop");
        assert_eq!(p.headers.get_all(header::HOST).iter().count(), 1);
        // HTTP/2: a host that is not the :authority is malformed; the same
        // host (any case) is not.
        let mut p = parts(HTTP_2, "http://public.shop/", &["admin.shop"]);
        assert_eq!(
            request_authority(&mut p),
            Err("host_differs_from_authority")
        );
        let mut p = parts(HTTP_2, "http://public.shop/", &["Public.Shop"]);
        assert_eq!(request_authority(&mut p), Ok("public.shop".to_owned()));
        // Compared as URIs (RFC 9110 4.2.3): the scheme's default port may
        // be written or not, on either side, the host in any case.
        let mut p = parts(HTTP_2, "http://web:80/", &["web"]);
        assert_eq!(request_authority(&mut p), Ok("web:80".to_owned()));
        let mut p = parts(HTTP_2, "http://web/", &["WEB:80"]);
        assert_eq!(request_authority(&mut p), Ok("web".to_owned()));
        let mut p = parts(HTTP_2, "http://web:/", &["web:80"]);
        assert_eq!(request_authority(&mut p), Ok("web:".to_owned()));
        let mut p = parts(HTTP_2, "https://web:443/", &["web"]);
        assert_eq!(request_authority(&mut p), Ok("web:443".to_owned()));
        let mut p = parts(HTTP_2, "http://[fd00::1]:80/", &["[FD00::1]"]);
        assert_eq!(request_authority(&mut p), Ok("[fd00::1]:80".to_owned()));
        // Another port, or another scheme's default, is another authority.
        for (uri, host) in [
            ("http://web:8080/", "web"),
            ("http://web:443/", "web"),
            ("https://web:80/", "web"),
            ("http://web/", "web:8080"),
            ("http://web/", "web:x"),
            ("http://[fd00::1]/", "[fd00::1]:8080"),
            ("http://web:80/", "webb"),
        ] {
            let mut p = parts(HTTP_2, uri, &[host]);
            assert_eq!(
                request_authority(&mut p),
                Err("host_differs_from_authority"),
                "{uri} with host {host}"
            );
        }
        // HTTP/1.1 absolute form: the same authority keeps its Host.
        let mut p = parts(HTTP_11, "http://web:80/", &["web"]);
        assert_eq!(request_authority(&mut p), Ok("web:80".to_owned()));
        assert_eq!(p.headers[header::HOST], "web");
        // Two Host headers, userinfo.
        let mut p = parts(HTTP_11, "/", &["public.shop", "admin.shop"]);
        assert_eq!(request_authority(&mut p), Err("multiple_host_headers"));
        let mut p = parts(HTTP_11, "http://x@admin.shop/", &[]);
        assert_eq!(request_authority(&mut p), Err("userinfo_in_authority"));
    }

    #[test]
    fn only_websocket_upgrades_are_carried() {
        let asked = |upgrade: &str, connection: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::UPGRADE,
                HeaderValue::from_str(upgrade).expect("value"),
            );
            h.insert(
                header::CONNECTION,
                HeaderValue::from_str(connection).expect("value"),
            );
            upgrade_requested(&h)
        };
        assert_eq!(
            asked("WebSocket", "keep-alive, Upgrade"),
            UpgradeAsked::WebSocket(HeaderValue::from_static("WebSocket"))
        );
        assert_eq!(asked("h2c", "Upgrade, HTTP2-Settings"), UpgradeAsked::None);
        assert_eq!(asked("echo", "upgrade"), UpgradeAsked::Other);
        assert_eq!(asked("websocket", "keep-alive"), UpgradeAsked::None);
    }
}
