//! A hand-made HBONE client for tests that play a hostile (or forged) peer:
//! mTLS with any certificate the test issues, HTTP/2 CONNECT to any target
//! with any headers, from inside any netns of the lab.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use mesh_agent::identity::{LocalCa, MeshCa, SpiffeId, TrustDomain, WorkloadCert, crypto_provider};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::Mesh;

/// Accepts any server certificate (the rogue client wants the server's
/// verdict) and remembers it.
#[derive(Debug)]
pub struct AcceptAny {
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The last server certificate seen (DER).
    pub seen: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().expect("lock") = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3 `h2` client configuration presenting `cert`, trusting any server.
pub fn client_config(cert: &WorkloadCert) -> (Arc<ClientConfig>, Arc<AcceptAny>) {
    let provider = crypto_provider();
    let verifier = Arc::new(AcceptAny {
        provider: provider.clone(),
        seen: Mutex::new(None),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(cert.chain().to_vec(), cert.key().clone_key())
        .expect("client cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    (Arc::new(config), verifier)
}

/// A TCP connection made from inside the netns at `netns` (the test process
/// is outside the lab cgroup, so nothing captures it; the destination's
/// sk_lookup still steers it). A connection the agent resets at once may
/// fail already here.
pub fn try_tcp_from(netns: &Path, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = super::in_netns(netns, || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })?;
    s.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(s)
}

/// [`try_tcp_from`] for a connection that must succeed.
pub fn tcp_from(netns: &Path, to: SocketAddr) -> tokio::net::TcpStream {
    try_tcp_from(netns, to).expect("connect")
}

/// Opens HBONE to `to` from `netns` with `cert` and sends CONNECT `target`
/// with the extra `headers`; returns the HTTP status, or the error text.
pub async fn connect_with_headers(
    netns: &Path,
    to: SocketAddr,
    cert: &WorkloadCert,
    target: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<u16, String> {
    let (response, _send) = open_stream(netns, to, cert, target, headers).await?;
    Ok(response.status().as_u16())
}

/// [`connect_with_headers`], then the first line the app sends on the
/// stream (an echo server's `--greeting-peer` line, `peer=<addr>`).
pub async fn connect_read_line(
    netns: &Path,
    to: SocketAddr,
    cert: &WorkloadCert,
    target: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let (response, _send) = open_stream(netns, to, cert, target, headers).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut line = Vec::new();
    while !line.contains(&b'\n') {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .map_err(|_| "no data".to_owned())?
            .ok_or("stream ended")?
            .map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        line.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&line);
    Ok((status, text.lines().next().unwrap_or_default().to_owned()))
}

/// An HBONE stream: TLS with `cert`, HTTP/2, CONNECT `target` with `headers`.
async fn open_stream(
    netns: &Path,
    to: SocketAddr,
    cert: &WorkloadCert,
    target: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<bytes::Bytes>), String> {
    let (config, _) = client_config(cert);
    let tcp = tcp_from(netns, to);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(to.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(target.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(()).expect("request");
    let (response, send) = sender.send_request(req, false).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .map_err(|_| "no response".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok((response, send))
}

/// [`connect_with_headers`] without extra headers.
pub async fn connect(
    netns: &Path,
    to: SocketAddr,
    cert: &WorkloadCert,
    target: SocketAddr,
) -> Result<u16, String> {
    connect_with_headers(netns, to, cert, target, &[]).await
}

/// A valid mesh certificate (the lab's CA, trust domain `cluster.local`)
/// for `spiffe://cluster.local/ns/default/sa/<service_account>`.
pub fn mesh_cert(mesh: &Mesh, service_account: &str) -> WorkloadCert {
    let td = TrustDomain::new("cluster.local").expect("td");
    let ca = LocalCa::new(
        Arc::new(MeshCa::load_dir(&mesh.ca_dir()).expect("lab CA")),
        td.clone(),
    );
    let id = SpiffeId::new(td, "default", service_account).expect("id");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    ca.issue_valid_between(&id, now - hour, now + hour)
        .expect("issue")
}

/// A two-worker runtime, for servers a test runs beside blocking calls.
pub fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A current-thread runtime for the async helpers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
