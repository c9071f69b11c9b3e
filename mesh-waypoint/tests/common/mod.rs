//! Root-free harness for the waypoint's integration tests: a test mesh CA,
//! the waypoint started in-process on 127.0.0.1, real backend servers
//! (hyper HTTP/1.1, a TCP echo) on 127.0.0.1, and a mesh client that opens
//! real HBONE tunnels (mTLS with a certificate of the mesh CA, HTTP/2
//! CONNECT) and speaks HTTP/1.1 or HTTP/2 inside them.
#![allow(dead_code, missing_docs)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::identity::{
    CertManager, CertificateProvider, LocalCa, MeshCa, MeshTls, SpiffeId, TrustDomain,
    WorkloadCert, crypto_provider, server_name,
};
use mesh_waypoint::{Running, config::WaypointConfig};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    net::TcpListener,
};

pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// A mesh CA and a local issuer of it.
pub fn issuer() -> Arc<LocalCa> {
    let td = TrustDomain::default();
    let generated = MeshCa::generate(&td, 1).expect("generate CA");
    let ca = MeshCa::from_pem(
        generated.cert_pem.as_bytes(),
        generated.key_pem.as_bytes(),
        None,
    )
    .expect("load CA");
    Arc::new(LocalCa::new(Arc::new(ca), td))
}

/// A backend HTTP/1.1 server named `name`: answers `<name> <path>` with the
/// request's headers echoed as `x-echo-<name>` response headers, a header
/// `x-internal: secret`; never answers paths under `/hang`; answers 503 to
/// paths containing `fail`, and to every other request for paths containing
/// `flaky` (the 1st, 3rd, ...); `grpc-status: 14` (unavailable) to every
/// other request for paths containing `grpc-unstable`, 0 to the others.
pub async fn http_backend(name: &'static str) -> SocketAddr {
    counted_backend(name).await.0
}

/// [`http_backend`] and its count of requests received.
pub async fn counted_backend(name: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        answer(name, n, req)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, count)
}

async fn answer(
    name: &'static str,
    n: u64,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path.starts_with("/hang") {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let fail = path.contains("fail") || (path.contains("flaky") && n % 2 == 1);
    let mut response = Response::builder()
        .status(if fail { 503 } else { 200 })
        .header("x-backend", name)
        .header("x-internal", "secret");
    if path.contains("grpc-unstable") {
        // A trailers-only gRPC answer: UNAVAILABLE (14) to the 1st, 3rd, ...
        let code = if n % 2 == 1 { "14" } else { "0" };
        response = response.header("grpc-status", code);
    }
    for (k, v) in req.headers() {
        response = response.header(format!("x-echo-{k}"), v);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let text = format!("{name} {path} {body}");
    Ok(response
        .body(Full::new(Bytes::from(text)))
        .expect("response"))
}

/// A TCP echo server.
pub async fn echo_backend() -> SocketAddr {
    tcp_backend(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// A TCP server on 127.0.0.1 running `serve` on each connection in a task.
pub async fn tcp_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// The waypoint, started in-process with `config` and a certificate of `ca`.
pub async fn waypoint(ca: Arc<LocalCa>, config: &str) -> Running {
    waypoint_with_limits(ca, config, mesh_agent::proxy::limits::Limits::default()).await
}

/// [`waypoint`] bounded by `limits`.
pub async fn waypoint_with_limits(
    ca: Arc<LocalCa>,
    config: &str,
    limits: mesh_agent::proxy::limits::Limits,
) -> Running {
    let settings = mesh_waypoint::Settings {
        limits,
        ..Default::default()
    };
    waypoint_with(ca, config, settings).await
}

/// [`waypoint`] started with `settings`.
pub async fn waypoint_with(
    ca: Arc<LocalCa>,
    config: &str,
    settings: mesh_waypoint::Settings,
) -> Running {
    let config = WaypointConfig::parse(config).expect("config");
    let id = SpiffeId::parse(WAYPOINT_ID).expect("id");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ca = ca as Arc<dyn CertificateProvider>;
    mesh_waypoint::start_with(id, ca, &config, any, any, settings)
        .await
        .expect("start")
}

/// A mesh client with identity `id`, certificates from `provider`.
pub struct MeshClient {
    tls: MeshTls,
    id: SpiffeId,
    pub waypoint: SocketAddr,
}

impl MeshClient {
    pub async fn new(provider: Arc<LocalCa>, id: &str, waypoint: SocketAddr) -> Self {
        let tls = MeshTls::new(Arc::new(CertManager::new(provider))).expect("tls");
        let id = SpiffeId::parse(id).expect("id");
        tls.manager().fetch(&id).await.expect("client certificate");
        Self { tls, id, waypoint }
    }

    /// Opens a tunnel to `target` (a VIP:port); Err with the CONNECT status
    /// or the error text.
    pub async fn tunnel(&self, target: SocketAddr) -> Result<DuplexStream, String> {
        let waypoint_id = SpiffeId::parse(WAYPOINT_ID).expect("id");
        let config = self.tls.client_config(&self.id, vec![waypoint_id]);
        open_tunnel(config, self.waypoint, target).await
    }

    /// An HTTP/1.1 (`http2` false) or HTTP/2 connection through a tunnel to `target`.
    pub async fn http(&self, target: SocketAddr, http2: bool) -> HttpClient {
        let io = TokioIo::new(self.tunnel(target).await.expect("tunnel"));
        if http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2");
            tokio::spawn(conn);
            HttpClient::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
            tokio::spawn(conn);
            HttpClient::H1(sender)
        }
    }
}

/// A tunnel with any client configuration (the baggage names the client workload).
pub async fn open_tunnel(
    config: Arc<ClientConfig>,
    waypoint: SocketAddr,
    target: SocketAddr,
) -> Result<DuplexStream, String> {
    let tcp = tokio::net::TcpStream::connect(waypoint)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name(waypoint.ip()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = mesh_agent::proxy::hbone::connect_request(
        target,
        "127.0.0.1:40000".parse().expect("addr"),
        &mesh_agent::proxy::hbone::baggage("default", "client", "client"),
    );
    let (response, send) = sender.send_request(req, false).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .map_err(|_| "no CONNECT response".to_owned())?
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("CONNECT answered {}", response.status()));
    }
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(pipe(theirs, send, response.into_body()));
    Ok(ours)
}

pub async fn pipe(io: DuplexStream, mut send: h2::SendStream<Bytes>, mut recv: h2::RecvStream) {
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            buf.reserve(16 * 1024);
            if r.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let Some(Ok(granted)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                else {
                    return;
                };
                let part = chunk.split_to(granted.min(chunk.len()));
                if send.send_data(part, false).is_err() {
                    return;
                }
            }
        }
    };
    let down = async {
        while let Some(Ok(data)) = recv.data().await {
            if w.write_all(&data).await.is_err() {
                return;
            }
            let _ = recv.flow_control().release_capacity(data.len());
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
}

pub enum HttpClient {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpClient {
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Answer {
        let response = match self {
            Self::H1(s) => {
                s.ready().await.expect("h1 ready");
                s.send_request(req).await.expect("h1 response")
            }
            Self::H2(s) => {
                s.ready().await.expect("h2 ready");
                s.send_request(req).await.expect("h2 response")
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// GET `path` with `headers` (HTTP/1.1 with a Host, HTTP/2 with an authority).
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = match self {
            Self::H1(_) => Request::get(path).header("host", "web.default.svc.cluster.local"),
            Self::H2(_) => Request::get(format!("http://web.default.svc.cluster.local{path}")),
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::new())).expect("request"))
            .await
    }
}

/// GET on the admin endpoint.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("admin h1");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(req).await.expect("admin response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The `istio_requests_total` samples: labels (as a map) and value.
pub fn requests_total(metrics: &str) -> Vec<(BTreeMap<String, String>, u64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("istio_requests_total{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let map = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((map, value.trim().parse().ok()?))
        })
        .collect()
}

/// Polls `/metrics` until `done` holds (the waypoint records a request when
/// its response body ends, just after the client has it); panics after 10 s.
pub async fn wait_metrics(admin: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        let m = admin_get(admin, "/metrics").await;
        if done(&m) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "metrics never reached the expected state:\n{}",
        admin_get(admin, "/metrics").await
    );
}

/// Accepts any server certificate (the client wants the server's verdict on its own).
#[derive(Debug)]
pub struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 h2 client presenting `cert` (or no certificate), trusting any server.
pub fn rogue_config(cert: Option<&WorkloadCert>) -> Arc<ClientConfig> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain().to_vec(), c.key().clone_key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// What a [`pod_agent`] saw: the client identity and CONNECT target of each
/// stream, and the TLS connections accepted.
#[derive(Debug, Default)]
pub struct AgentLog {
    pub streams: Vec<(String, String)>,
    pub connections: usize,
    /// Each stream's `forwarded` header, in stream order.
    pub forwarded: Vec<Option<String>>,
}

/// A stand-in for a destination node agent's HBONE listener: mTLS
/// presenting `pod_id` (a certificate of `ca`), each CONNECT answered 200
/// and relayed to `backend` whatever its target (so that only a tunnelled
/// request can reach the backend when the target port is closed).
pub async fn pod_agent(
    ca: Arc<LocalCa>,
    pod_id: &str,
    backend: SocketAddr,
) -> (SocketAddr, Arc<std::sync::Mutex<AgentLog>>) {
    pod_agent_with(ca, pod_id, move |recv, send| {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(pipe(theirs, send, recv));
        tokio::spawn(async move {
            let mut ours = ours;
            if let Ok(mut app) = tokio::net::TcpStream::connect(backend).await {
                let _ = tokio::io::copy_bidirectional(&mut ours, &mut app).await;
            }
        });
    })
    .await
}

/// [`pod_agent`] handing each answered stream (its request body and its
/// response's send half) to `serve`.
pub async fn pod_agent_with<F>(
    ca: Arc<LocalCa>,
    pod_id: &str,
    serve: F,
) -> (SocketAddr, Arc<std::sync::Mutex<AgentLog>>)
where
    F: Fn(h2::RecvStream, h2::SendStream<Bytes>) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let tls = Arc::new(MeshTls::new(Arc::new(CertManager::new(ca))).expect("tls"));
    let id = SpiffeId::parse(pod_id).expect("id");
    tls.manager().fetch(&id).await.expect("pod certificate");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Arc::new(std::sync::Mutex::new(AgentLog::default()));
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config(&id));
            let seen = Arc::clone(&seen);
            let serve = Arc::clone(&serve);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(mesh_agent::identity::peer_identity)
                    .and_then(Result::ok)
                    .map_or_else(|| "none".to_owned(), |p| p.to_string());
                seen.lock().expect("lock").connections += 1;
                let Ok(mut conn) = mesh_agent::proxy::hbone::server_handshake(
                    tls,
                    100,
                    mesh_agent::proxy::hbone::CONNECTION_WINDOW,
                )
                .await
                else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let target = req.uri().to_string();
                    let forwarded = req
                        .headers()
                        .get("forwarded")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    {
                        let mut seen = seen.lock().expect("lock");
                        seen.streams.push((peer.clone(), target));
                        seen.forwarded.push(forwarded);
                    }
                    let Ok(send) = respond.send_response(Response::new(()), false) else {
                        continue;
                    };
                    serve(req.into_body(), send);
                }
            });
        }
    });
    (addr, log)
}

/// One service, `default/web` (VIP 10.96.0.10, port 80), no routes, over
/// the backend at 127.0.0.1:`port`.
pub fn backend_config(port: u16) -> String {
    format!(
        r#"
services:
  - name: web
    namespace: default
    addresses: [10.96.0.10]
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {port}, workload: web-v1, serviceAccount: web, labels: {{ app: web, version: v1 }} }}]
"#
    )
}
