//! The HBONE side: accept mTLS under the waypoint's identity, answer each
//! HTTP/2 CONNECT to a known service VIP:port with 200, then detect the
//! inner protocol (HTTP/1.1, HTTP/2 prior knowledge, or TCP) and hand the
//! stream to [`crate::http`] or relay it to an endpoint as TCP.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::RecvStream;
use http::StatusCode;
use mesh_agent::{
    identity::{SpiffeId, describe_tls_error, peer_identity},
    proxy::{
        hbone,
        limits::{Activity, ActivityGuard, Expiry, GOAWAY_GRACE, StreamPermit},
    },
    telemetry::PeerLabels,
};
use tokio::{
    io::{AsyncReadExt, DuplexStream},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    config::PortProtocol,
    metrics::peer_in,
    services::{Client, Upstream},
    shared::{Shared, Tunnel},
    stream::{PIPE, Rewind, pipe},
};

/// Connecting to an endpoint for a TCP relay must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel whose client sends nothing within this time is treated as TCP
/// (a server-first protocol); HTTP clients speak first. One that sent the
/// start of what could be a request line is HTTP ([`undecided`]).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    let Ok(handshake) = bounds.handshake(peer.ip()) else {
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
        Ok(Ok(mut tls)) => {
            hbone::size_tls_buffer(tls.get_mut().1);
            tls
        }
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
    // Held for the connection's life: the peer's slot and the connection
    // window it grants (what the peer can make this connection buffer).
    let Ok(mut tunnel) = bounds.tunnel(&peer_id, hbone::CONNECTION_WINDOW) else {
        tracing::debug!(src = %peer, src_identity = %peer_id, "HBONE connection refused: the peer holds its maximum of connections");
        return;
    };
    let handshake_result = tokio::time::timeout_at(
        deadline,
        hbone::server_handshake(tls, limits.max_streams_per_connection, tunnel.window()),
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
            // A window reduced by the budget grows back as it frees.
            window = tunnel.grown(), if tunnel.reduced() => {
                conn.set_target_window_size(window);
                continue;
            }
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
                let slots = (permit, activity.stream());
                let shared = Arc::clone(&shared);
                let peer_id = peer_id.clone();
                tokio::spawn(stream(shared, req, respond, peer, peer_id, slots));
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
    slots: (StreamPermit, ActivityGuard),
) {
    let Ok(vip) = hbone::connect_target(&req) else {
        tracing::info!(src = %peer, src_identity = %peer_id, method = %req.method(), uri = %req.uri(), "tunnel refused: not a CONNECT to an address");
        return hbone::respond_status(&mut respond, StatusCode::BAD_REQUEST);
    };
    let Some(target) = shared.active().services.target(vip) else {
        tracing::info!(src = %peer, src_identity = %peer_id, dst = %vip, "tunnel refused: not a service or pod of this waypoint");
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
    let idle = shared.stream_idle_timeout();
    let reset = CancellationToken::new();
    let on_reset = reset.clone();
    tokio::spawn(async move {
        if pipe(outer, send, req.into_body(), Some(idle))
            .await
            .is_err()
        {
            on_reset.cancel();
        }
    });
    let tunnel = Arc::new(Tunnel {
        target,
        vip,
        peer,
        peer_id,
        source,
        slots,
        reset,
    });
    inner_stream(shared, tunnel, inner).await;
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

/// The longest request line (with the empty lines before it) detection
/// reads; a stream still undecided at this length is HTTP (see [`detect`]).
pub const MAX_DETECT_LINE: usize = 8 * 1024;

/// Decides from `prefix` when it can (None: more bytes are needed).
///
/// HTTP/1: empty lines before the request line are skipped (RFC 9112 2.2,
/// as servers do); one of the nine common methods and a space decides at
/// once. Any other method token (RFC 9110 `tchar`s, in any case: a
/// backend may take `get` or a long extension method where the waypoint
/// answers 400 or applies its policy) and a space needs its whole request
/// line to end in an HTTP/1 version (`HTTP/1.0`, `HTTP/1.1`, in any
/// case), so a text protocol such as Redis's `SET k v` or memcached's
/// `get k` stays TCP. What starts otherwise (a byte that is not a token
/// character, a token ended by anything but a space: TLS, binary
/// protocols, `PING\r\n`) is TCP at once.
///
/// A stream that could still be a request line at [`MAX_DETECT_LINE`] is
/// HTTP: its parser answers or closes it. A client cannot make an HTTP
/// request pass as TCP, which would skip routing, the policies' HTTP
/// fields and the HTTP telemetry; see also [`undecided`].
pub fn detect(prefix: &[u8]) -> Option<Detected> {
    // Undecided so far: more bytes, unless the bound is reached.
    let more = || (prefix.len() >= MAX_DETECT_LINE).then_some(Detected::Http1);
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (prefix.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut rest = prefix;
    loop {
        if let Some(r) = rest
            .strip_prefix(b"\r\n")
            .or_else(|| rest.strip_prefix(b"\n"))
        {
            rest = r;
        } else if rest == b"\r" {
            return more();
        } else {
            break;
        }
    }
    if rest.is_empty() {
        return more();
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
    if METHODS.iter().any(|m| rest.starts_with(m)) {
        return Some(Detected::Http1);
    }
    // Any other method, in any case, and a space: the whole line decides.
    let token = rest.iter().take_while(|b| is_token_char(**b)).count();
    match rest.get(token) {
        None => return more(),
        Some(b' ') if token > 0 => {}
        _ => return Some(Detected::Tcp),
    }
    let Some(end) = rest.iter().position(|b| *b == b'\n') else {
        return more();
    };
    let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
    Some(if ends_with_http1_version(line) {
        Detected::Http1
    } else {
        Detected::Tcp
    })
}

/// What a stream that [`detect`] could not decide is when no more bytes
/// come in time (the client waits, or ended its side): TCP when it sent
/// nothing (a server-first protocol: the server speaks first), HTTP
/// otherwise (a partial request line; the HTTP parser answers 400 or
/// closes it), never TCP to a backend that would finish the line.
pub fn undecided(prefix: &[u8]) -> Detected {
    if prefix.is_empty() {
        Detected::Tcp
    } else {
        Detected::Http1
    }
}

/// Whether a request line ends in ` HTTP/1.<digit>` (any case; spaces
/// after it are tolerated, as lenient servers do).
fn ends_with_http1_version(line: &[u8]) -> bool {
    let line = line.trim_ascii_end();
    let Some(at) = line.len().checked_sub(b" HTTP/1.x".len()) else {
        return false;
    };
    let (head, version) = line.split_at(at);
    !head.is_empty()
        && version[..b" HTTP/1.".len()].eq_ignore_ascii_case(b" HTTP/1.")
        && version[b" HTTP/1.".len()].is_ascii_digit()
}

/// A character of a method token (RFC 9110 5.6.2 `tchar`).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

async fn inner_stream(shared: Arc<Shared>, tunnel: Arc<Tunnel>, mut io: DuplexStream) {
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let detected = if tunnel.target.port.protocol == PortProtocol::Tcp {
        Detected::Tcp
    } else {
        let sniff = async {
            // Whatever is read is put back in front of the stream.
            let mut chunk = [0u8; 1024];
            loop {
                if let Some(d) = detect(&prefix) {
                    return Some(d);
                }
                let want = MAX_DETECT_LINE
                    .saturating_sub(prefix.len())
                    .clamp(1, chunk.len());
                match io.read(&mut chunk[..want]).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => prefix.extend_from_slice(&chunk[..n]),
                }
            }
        };
        // The client's side ended, or the deadline passed, undecided.
        match tokio::time::timeout(DETECT_TIMEOUT, sniff).await {
            Ok(Some(d)) => d,
            Ok(None) | Err(_) => undecided(&prefix),
        }
    };
    let http_only = matches!(
        tunnel.target.port.protocol,
        PortProtocol::Http | PortProtocol::Http2
    );
    if detected == Detected::Tcp && http_only {
        tracing::info!(src = %tunnel.peer, target = %tunnel.target, "tunnel closed: the port is HTTP but the client does not speak HTTP");
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

/// An opaque stream's backend connection.
enum Relay {
    /// Plain TCP (an endpoint outside the mesh).
    Tcp(TcpStream),
    /// An HBONE stream to a meshed endpoint.
    Hbone(tokio::io::DuplexStream),
}

/// Relays an opaque stream to an endpoint of the service, or to the pod
/// addressed.
async fn tcp(shared: Arc<Shared>, tunnel: Arc<Tunnel>, mut io: Rewind) {
    let t = &tunnel.target;
    // Policies attached to the waypoint apply to opaque streams too, their
    // HTTP fields fail safe (an ALLOW rule needing them grants nothing).
    let decision = shared.active().authorize(&tunnel, None);
    if let Some(reason) = decision.deny_reason() {
        tracing::info!(
            target: mesh_agent::telemetry::ACCESS_TARGET,
            reporter = "waypoint",
            src = %tunnel.peer,
            src_identity = %tunnel.peer_id,
            service = %t,
            policy = reason.policy().map(tracing::field::display),
            reason = %reason,
            "tcp stream denied"
        );
        return;
    }
    let client = Client {
        namespace: &tunnel.source.namespace,
        ip: tunnel.peer.ip(),
    };
    let picked =
        shared
            .active()
            .services
            .pick(&shared.balancer, &Upstream::of(t), tunnel.vip, client, &[]);
    // The pick counts the relay as an active connection until it ends.
    let (chosen, _pick) = match picked {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(src = %tunnel.peer, service = %t, reason = %e, "TCP tunnel closed: no endpoint");
            return;
        }
    };
    let connect_timeout = chosen
        .dest
        .as_ref()
        .map_or(HANDSHAKE_TIMEOUT, |d| d.policy.connect_timeout())
        .min(HANDSHAKE_TIMEOUT);
    // A meshed endpoint only over HBONE (mTLS to its identity, as its
    // agent requires), naming the client it carries; others in plaintext.
    let open = async {
        if chosen.hbone {
            shared
                .proxy
                .connector
                .tcp(chosen.addr, tunnel.peer, tunnel.reset.clone())
                .await
                .map(Relay::Hbone)
                .map_err(|e| e.to_string())
        } else {
            TcpStream::connect(chosen.addr)
                .await
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Relay::Tcp(s)
                })
                .map_err(|e| e.to_string())
        }
    };
    let connected = tokio::time::timeout(connect_timeout, open).await;
    let failed = |reason: &str| {
        if let Some(dest) = &chosen.dest {
            shared
                .balancer
                .failure(dest, chosen.addr, std::time::Instant::now());
        }
        tracing::info!(src = %tunnel.peer, service = %t, upstream = %chosen.addr, reason, "TCP tunnel closed: cannot reach the endpoint");
    };
    let mut upstream = match connected {
        Ok(Ok(s)) => {
            if let Some(dest) = &chosen.dest {
                shared
                    .balancer
                    .success(dest, chosen.addr, std::time::Instant::now());
            }
            s
        }
        Ok(Err(e)) => return failed(&e),
        Err(_) => return failed("the endpoint did not answer in time"),
    };
    let copy = async {
        match &mut upstream {
            Relay::Tcp(s) => tokio::io::copy_bidirectional(&mut io, s).await,
            Relay::Hbone(s) => tokio::io::copy_bidirectional(&mut io, s).await,
        }
    };
    // A reset tunnel stream ends the relay: the backend connection is
    // dropped even when the backend never speaks (the pipe's half-close
    // only ends the direction toward it).
    let result = tokio::select! {
        r = copy => r,
        () = tunnel.reset.cancelled() => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the tunnel stream was reset",
        )),
    };
    let (sent, received) = result.as_ref().map_or((0, 0), |r| *r);
    tracing::info!(
        target: mesh_agent::telemetry::ACCESS_TARGET,
        protocol = "tcp",
        src = %tunnel.peer,
        src_identity = %tunnel.peer_id,
        service = %t,
        upstream = %chosen.addr,
        dst_workload = %chosen.labels.workload,
        sent,
        received,
        error = result.err().map(tracing::field::display),
        "tcp connection closed"
    );
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
        assert_eq!(detect(b"GETX"), None, "an extension method, so far");
        assert_eq!(detect(b"GETX\x00"), Some(Detected::Tcp));
        assert_eq!(detect(b"PRI * HTTP/1.1"), None);
        // Empty lines before the request line, other methods.
        assert_eq!(detect(b"\r\n\r\nGET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"\r\n\r"), None);
        assert_eq!(detect(b"PROPFIND /dav HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"QUERY /q HTTP/1.0\n"), Some(Detected::Http1));
        assert_eq!(detect(b"PROPFIND /dav"), None);
        // A text protocol's command line is not HTTP.
        assert_eq!(detect(b"SET key value\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b"PING\r\n"), Some(Detected::Tcp));
        // A greeting without a space or line end yet could still be a
        // method: it waits (the deadline makes it HTTP, see `undecided`).
        assert_eq!(detect(b"hello"), None);
        assert_eq!(detect(b"hello\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b"hello world\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(&[b'A'; 25]), None, "a long method, so far");
        // Methods in any case are HTTP (the waypoint answers 400 to a
        // lower-case one), as any token a server could take for one.
        assert_eq!(detect(b"get / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"Get /x HTTP/1.0\n"), Some(Detected::Http1));
        assert_eq!(detect(b"get / http/1.1 \r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"M-SEARCH * HTTP/1.1\r\n"), Some(Detected::Http1));
        let mut long_method = vec![b'A'; 100];
        long_method.extend_from_slice(b" / HTTP/1.1\r\n");
        assert_eq!(detect(&long_method), Some(Detected::Http1));
        assert_eq!(detect(b"get / HTTP/1."), None);
        assert_eq!(detect(b"get /"), None);
        // Memcached's and other text commands are not HTTP lines.
        assert_eq!(detect(b"get key\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b"get / HTTP/2.0\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b"SSH-2.0-OpenSSH_9.6\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b" GET / HTTP/1.1\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Tcp));
        // Bounded: a line still undecided at MAX_DETECT_LINE is HTTP.
        let mut long = b"PROPFIND /".to_vec();
        long.resize(MAX_DETECT_LINE, b'a');
        assert_eq!(detect(&long), Some(Detected::Http1));
        let mut long = b"get /".to_vec();
        long.resize(MAX_DETECT_LINE, b'a');
        assert_eq!(detect(&long), Some(Detected::Http1));
        assert_eq!(detect(&vec![b'A'; MAX_DETECT_LINE]), Some(Detected::Http1));
        assert_eq!(
            detect(&vec![b'\n'; MAX_DETECT_LINE]),
            Some(Detected::Http1),
            "servers skip any number of empty lines before a request"
        );
        // A binary stream is decided at its first bytes, whatever follows.
        let mut binary = vec![0x16, 0x03, 0x01];
        binary.resize(MAX_DETECT_LINE, b'a');
        assert_eq!(detect(&binary), Some(Detected::Tcp));
    }

    #[test]
    fn undecided_streams_are_http_unless_the_client_said_nothing() {
        // A server-first protocol: the client waits for the server.
        assert_eq!(undecided(b""), Detected::Tcp);
        // A partial request line stalled until the deadline (or ended).
        assert_eq!(undecided(b"get /admin HTTP/1."), Detected::Http1);
        assert_eq!(undecided(b"PROPFIND"), Detected::Http1);
        assert_eq!(undecided(b"\r\n"), Detected::Http1);
    }
}
