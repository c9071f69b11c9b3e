//! The HBONE side: accept mTLS under the waypoint's identity, answer each
//! HTTP/2 CONNECT to a known service VIP:port with 200, then detect the
//! inner protocol (HTTP/1.1, HTTP/2 prior knowledge, or TCP) and hand the
//! stream to [`crate::http`] or relay it to an endpoint as TCP.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::StatusCode;
use mesh_agent::{
    identity::{MeshTls, SpiffeId, TrustDomain, describe_tls_error, peer_identity},
    proxy::{
        hbone,
        limits::{Activity, Bounds, Expiry, GOAWAY_GRACE, Limits},
    },
    telemetry::PeerLabels,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{PortProtocol, WaypointConfig},
    http::Proxy,
    l7::route::RouteTable,
    metrics::{Metrics, peer_in},
    services::{Services, Target},
    upstream::HboneConnector,
};

/// Connecting to an endpoint for a TCP relay must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel whose client sends nothing within this time is treated as TCP
/// (a server-first protocol); HTTP clients speak first.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The in-memory pipe between an HBONE stream and the inner protocol.
pub(crate) const PIPE: usize = 64 * 1024;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the waypoint knows and shares between its connections.
#[derive(Debug)]
pub struct Shared {
    /// The waypoint's own identity.
    pub identity: SpiffeId,
    /// Its TLS configurations (the agent's identity code).
    pub tls: Arc<MeshTls>,
    /// The configuration in force (replaced whole on a reload).
    active: RwLock<Arc<Active>>,
    /// The request metrics.
    pub metrics: Metrics,
    /// The HTTP client to the backends.
    pub proxy: Proxy,
    /// The agent's connection bounds: global and per-peer connection and
    /// stream caps, handshake, first-request and idle deadlines.
    pub bounds: Arc<Bounds>,
}

/// The services and routes in force, and which configuration they came from.
#[derive(Debug)]
pub struct Active {
    /// 1 for the configuration at start, +1 per reload.
    pub generation: u64,
    /// The services the waypoint fronts.
    pub services: Services,
    /// The compiled routes.
    pub routes: RouteTable,
}

impl Shared {
    /// Everything a waypoint with `identity` serving `config` needs.
    pub fn new(
        identity: SpiffeId,
        tls: Arc<MeshTls>,
        config: &WaypointConfig,
        limits: Limits,
    ) -> Self {
        let active = Active::build(config, tls.trust_domain(), 1);
        let targets = active.services.hbone_targets(tls.trust_domain());
        let hbone = HboneConnector::new(Arc::clone(&tls), identity.clone(), targets);
        Self {
            proxy: Proxy::new(hbone),
            identity,
            tls,
            active: RwLock::new(Arc::new(active)),
            metrics: Metrics::new(),
            bounds: Arc::new(Bounds::new(limits, mesh_agent::process::FdLimit::default())),
        }
    }
}

impl Active {
    fn build(config: &WaypointConfig, trust_domain: &TrustDomain, generation: u64) -> Self {
        let routes = RouteTable::build(&config.services, &config.route_objects());
        let services = Services::new(&config.services, trust_domain.as_str())
            .with_outliers(routes.outliers.clone());
        tracing::info!(
            generation,
            services = config.services.len(),
            routes = routes.accepted.len(),
            unsupported = routes.unsupported.len(),
            "waypoint configured"
        );
        Self {
            generation,
            services,
            routes,
        }
    }
}

impl Shared {
    /// The configuration in force (a request keeps the one it started with).
    pub fn active(&self) -> Arc<Active> {
        Arc::clone(&self.active.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the services and routes with `config`'s; requests in flight
    /// finish with the previous ones. Returns the new generation.
    pub fn reload(&self, config: &WaypointConfig) -> u64 {
        let mut slot = self.active.write().unwrap_or_else(PoisonError::into_inner);
        let active = Active::build(config, self.tls.trust_domain(), slot.generation + 1);
        self.proxy
            .set_hbone_targets(active.services.hbone_targets(self.tls.trust_domain()));
        let generation = active.generation;
        *slot = Arc::new(active);
        generation
    }
}

/// The client side of one tunnel, as the HTTP proxy needs it.
#[derive(Debug)]
pub struct Tunnel {
    /// The service port the client CONNECTed to.
    pub target: Target,
    /// The tunnel's TCP peer.
    pub peer: SocketAddr,
    /// Its authenticated identity.
    pub peer_id: SpiffeId,
    /// Its telemetry labels.
    pub source: PeerLabels,
}

/// Accepts HBONE connections on `listener` forever.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Refusals are logged (rate-limited) and counted by the bounds.
        let Ok(permit) = shared.bounds.connection() else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            connection(shared, tcp, peer).await;
        });
    }
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let bounds = Arc::clone(&shared.bounds);
    let limits = bounds.limits().clone();
    // Held from accept to the first CONNECT: idle sockets cannot pile up.
    let Ok(handshake) = bounds.handshake() else {
        return;
    };
    let mut handshake = Some(handshake);
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let _ = tcp.set_nodelay(true);
    let me = &shared.identity;
    if let Err(e) = shared.tls.manager().fetch(me).await {
        tracing::warn!(src = %peer, reason = %e, "HBONE handshake rejected: the waypoint has no certificate");
        return;
    }
    let acceptor = TlsAcceptor::from(shared.tls.server_config(me));
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(src = %peer, reason = %describe_tls_error(&e), "HBONE handshake rejected");
            return;
        }
        Err(_) => {
            bounds.expired(Expiry::Handshake);
            tracing::warn!(src = %peer, reason = "no TLS handshake in time", "HBONE handshake rejected");
            return;
        }
    };
    let peer_id = match tls.get_ref().1.peer_certificates().map(peer_identity) {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            tracing::warn!(src = %peer, reason = %e, "HBONE handshake rejected");
            return;
        }
        None => {
            tracing::warn!(src = %peer, reason = "no client certificate", "HBONE handshake rejected");
            return;
        }
    };
    let Ok(_peer_slot) = bounds.peer_connection(&peer_id) else {
        tracing::debug!(src = %peer, src_identity = %peer_id, "HBONE connection refused: the peer holds its maximum of connections");
        return;
    };
    let handshake_result = tokio::time::timeout_at(
        deadline,
        hbone::server_handshake(tls, limits.max_streams_per_connection),
    )
    .await;
    let mut conn = match handshake_result {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(src = %peer, src_identity = %peer_id, error = %e, "HBONE HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            bounds.expired(Expiry::Handshake);
            tracing::warn!(src = %peer, src_identity = %peer_id, "HBONE HTTP/2 handshake timed out");
            return;
        }
    };
    // The agent's deadlines: the first CONNECT, then idleness between streams.
    let activity = Activity::new();
    let mut expired = false;
    loop {
        let idle = activity.deadline(&limits);
        let next = tokio::select! {
            n = conn.accept() => n,
            _ = activity.changed() => continue,
            _ = sleep_until(idle.map(|(at, _)| at)) => {
                match activity.deadline(&limits) {
                    Some((at, why)) if at <= std::time::Instant::now() => {
                        bounds.expired(why);
                        tracing::info!(src = %peer, src_identity = %peer_id, reason = why.as_str(), "HBONE connection closed: no stream in time");
                        conn.graceful_shutdown();
                        expired = true;
                        None
                    }
                    _ => continue,
                }
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, mut respond)) => {
                handshake.take();
                let Ok(permit) = bounds.stream(&peer_id) else {
                    tracing::debug!(src = %peer, src_identity = %peer_id, "HBONE stream refused by a limit");
                    hbone::respond_status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                    continue;
                };
                let open = activity.stream();
                let shared = Arc::clone(&shared);
                let peer_id = peer_id.clone();
                tokio::spawn(async move {
                    let _slots = (permit, open);
                    stream(shared, req, respond, peer, peer_id).await;
                });
            }
            Err(e) => {
                tracing::debug!(src = %peer, error = %e, "HBONE connection ended");
                break;
            }
        }
    }
    drop(handshake);
    let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
    if expired {
        let _ = tokio::time::timeout(GOAWAY_GRACE, closed).await;
    } else {
        let _ = closed.await;
    }
}

/// Sleeps until `at`, or forever without a deadline.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Istio's baggage (`k8s.namespace.name=...,k8s.deployment.name=...`): the
/// client's own claim, used for labels only (never for a decision).
fn source_labels(req: &http::Request<RecvStream>, peer_id: &SpiffeId) -> PeerLabels {
    let mut p = peer_in(Some(peer_id.namespace()), Some(peer_id.to_string()));
    let baggage = req
        .headers()
        .get("baggage")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for item in baggage.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        // Kubernetes names and label values: at most 63 characters of
        // [A-Za-z0-9-_.]; anything else is not a claim worth a label.
        let plausible = !v.is_empty()
            && v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !plausible {
            continue;
        }
        match k {
            "k8s.deployment.name" | "k8s.pod.name" if p.workload == "unknown" => {
                p.workload = v.to_owned();
            }
            "service.name" => {
                p.app = v.to_owned();
                p.canonical_service = v.to_owned();
            }
            "service.version" => {
                p.version = v.to_owned();
                p.canonical_revision = v.to_owned();
            }
            _ => {}
        }
    }
    p
}

async fn stream(
    shared: Arc<Shared>,
    req: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: SpiffeId,
) {
    let Ok(vip) = hbone::connect_target(&req) else {
        tracing::info!(src = %peer, src_identity = %peer_id, method = %req.method(), uri = %req.uri(), "tunnel refused: not a CONNECT to an address");
        return hbone::respond_status(&mut respond, StatusCode::BAD_REQUEST);
    };
    let Some(target) = shared.active().services.by_vip(vip).cloned() else {
        tracing::info!(src = %peer, src_identity = %peer_id, dst = %vip, "tunnel refused: not a service of this waypoint");
        return hbone::respond_status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
    };
    let source = source_labels(&req, &peer_id);
    let response = http::Response::new(());
    let send = match respond.send_response(response, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(src = %peer, error = %e, "tunnel gone before its response");
            return;
        }
    };
    let (inner, outer) = tokio::io::duplex(PIPE);
    tokio::spawn(pipe(outer, send, req.into_body()));
    let tunnel = Arc::new(Tunnel {
        target,
        peer,
        peer_id,
        source,
    });
    inner_stream(shared, tunnel, inner).await;
}

/// Copies between the HBONE stream and the in-memory pipe until both
/// directions end; an error resets the HTTP/2 stream.
pub(crate) async fn pipe(io: DuplexStream, mut send: SendStream<Bytes>, mut recv: RecvStream) {
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            buf.reserve(16 * 1024);
            if r.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true)
                    .map_err(io::Error::other)?;
                return io::Result::Ok(());
            }
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed"))?
                    .map_err(io::Error::other)?;
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(io::Error::other)?;
            }
        }
    };
    let down = async {
        while let Some(data) = recv.data().await {
            let data = data.map_err(io::Error::other)?;
            w.write_all(&data).await?;
            let _ = recv.flow_control().release_capacity(data.len());
        }
        w.shutdown().await
    };
    let (a, b) = tokio::join!(up, down);
    if let Err(e) = a.and(b) {
        tracing::debug!(error = %e, "tunnel stream reset");
        send.send_reset(h2::Reason::CANCEL);
    }
}

/// The protocol of an inner stream, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x (a request line).
    Http1,
    /// HTTP/2 with prior knowledge (the connection preface).
    Http2,
    /// Anything else.
    Tcp,
}

/// Decides from `prefix` when it can (None: more bytes are needed).
pub fn detect(prefix: &[u8]) -> Option<Detected> {
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (prefix.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    // An HTTP/1 request line starts with a method token and a space.
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
    ];
    let mut undecided = false;
    for m in METHODS {
        let n = prefix.len().min(m.len());
        if prefix[..n] == m[..n] {
            if prefix.len() >= m.len() {
                return Some(Detected::Http1);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(Detected::Tcp) }
}

async fn inner_stream(shared: Arc<Shared>, tunnel: Arc<Tunnel>, mut io: DuplexStream) {
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let detected = if tunnel.target.port.protocol == PortProtocol::Tcp {
        Detected::Tcp
    } else {
        let sniff = async {
            let mut byte = [0u8; 32];
            loop {
                if let Some(d) = detect(&prefix) {
                    return d;
                }
                let want = H2_PREFACE.len() - prefix.len().min(H2_PREFACE.len());
                match io.read(&mut byte[..want.max(1)]).await {
                    Ok(0) | Err(_) => return Detected::Tcp,
                    Ok(n) => prefix.extend_from_slice(&byte[..n]),
                }
            }
        };
        tokio::time::timeout(DETECT_TIMEOUT, sniff)
            .await
            .unwrap_or(Detected::Tcp)
    };
    let http_only = matches!(
        tunnel.target.port.protocol,
        PortProtocol::Http | PortProtocol::Http2
    );
    if detected == Detected::Tcp && http_only {
        tracing::info!(src = %tunnel.peer, service = %tunnel.target.service, "tunnel closed: the port is HTTP but the client does not speak HTTP");
        return;
    }
    let io = Rewind {
        prefix: Bytes::from(prefix),
        io,
    };
    match detected {
        Detected::Http1 | Detected::Http2 => {
            crate::http::serve(shared, tunnel, io, detected == Detected::Http2).await;
        }
        Detected::Tcp => tcp(shared, tunnel, io).await,
    }
}

/// Relays an opaque stream to an endpoint of the service.
async fn tcp(shared: Arc<Shared>, tunnel: Arc<Tunnel>, mut io: Rewind) {
    let t = &tunnel.target;
    let Some(chosen) = shared
        .active()
        .services
        .endpoint(&t.service, t.port.port, None)
    else {
        tracing::info!(src = %tunnel.peer, service = %t.service, "TCP tunnel closed: the service has no endpoints");
        return;
    };
    let mut upstream = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TcpStream::connect(chosen.addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(src = %tunnel.peer, service = %t.service, upstream = %chosen.addr, error = %e, "TCP tunnel closed: cannot reach the endpoint");
            return;
        }
        Err(_) => {
            tracing::info!(src = %tunnel.peer, service = %t.service, upstream = %chosen.addr, "TCP tunnel closed: the endpoint did not answer in time");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let result = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
    let (sent, received) = result.as_ref().map_or((0, 0), |r| *r);
    tracing::info!(
        target: mesh_agent::telemetry::ACCESS_TARGET,
        protocol = "tcp",
        src = %tunnel.peer,
        src_identity = %tunnel.peer_id,
        service = %t.service,
        upstream = %chosen.addr,
        sent,
        received,
        error = result.err().map(tracing::field::display),
        "tcp connection closed"
    );
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind {
    prefix: Bytes,
    io: DuplexStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let part = self.prefix.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"GE"), None);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(detect(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(detect(b"P"), None);
        assert_eq!(detect(b"\x16\x03\x01"), Some(Detected::Tcp));
        assert_eq!(detect(b"GETX"), Some(Detected::Tcp));
        assert_eq!(detect(b"PRI * HTTP/1.1"), Some(Detected::Tcp));
    }
}
