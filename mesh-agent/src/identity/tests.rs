//! Tests of the identity module working together: real TLS handshakes over
//! in-memory pipes, rotation, CA loading and `ca init`.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    sign::CertifiedKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::*;

// ---------------------------------------------------------------- helpers

fn td() -> TrustDomain {
    TrustDomain::default()
}

fn other_td() -> TrustDomain {
    TrustDomain::new("other.example").unwrap()
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td(), ns, sa).unwrap()
}

fn client_id() -> SpiffeId {
    id("default", "client")
}

fn server_id() -> SpiffeId {
    id("prod", "server")
}

/// A fresh root CA in memory.
fn new_ca() -> Arc<MeshCa> {
    let generated = MeshCa::generate(&td(), 30).unwrap();
    Arc::new(
        MeshCa::from_pem(
            generated.cert_pem.as_bytes(),
            generated.key_pem.as_bytes(),
            None,
        )
        .unwrap(),
    )
}

fn mesh_tls(provider: impl CertificateProvider) -> MeshTls {
    MeshTls::new(Arc::new(CertManager::new(Arc::new(provider)))).unwrap()
}

fn local(ca: &Arc<MeshCa>) -> MeshTls {
    mesh_tls(LocalCa::new(Arc::clone(ca), td()))
}

/// The server configuration of `id`, its certificate fetched first (as the
/// proxy does before a handshake).
async fn ready_server(tls: &MeshTls, id: &SpiffeId) -> Arc<ServerConfig> {
    tls.manager().fetch(id).await.unwrap();
    tls.server_config(id)
}

/// The client configuration of `id` expecting `expected`, its certificate
/// fetched first.
async fn ready_client(tls: &MeshTls, id: &SpiffeId, expected: Vec<SpiffeId>) -> Arc<ClientConfig> {
    tls.manager().fetch(id).await.unwrap();
    tls.client_config(id, expected)
}

/// Issues with one CA (optionally for another trust domain) but trusts
/// another root and enforces another trust domain: the odd peers the
/// verifiers must refuse.
struct Rogue {
    issuer: LocalCa,
    anchors: Vec<CertificateDer<'static>>,
    enforce: TrustDomain,
}

impl Rogue {
    fn new(issuer_ca: &Arc<MeshCa>, issue_td: TrustDomain, trusted_ca: &Arc<MeshCa>) -> Self {
        Self {
            issuer: LocalCa::new(Arc::clone(issuer_ca), issue_td),
            anchors: trusted_ca.roots().to_vec(),
            enforce: td(),
        }
    }
}

impl CertificateProvider for Rogue {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(std::future::ready(self.issuer.issue_now(id)))
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.anchors.clone()
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.enforce
    }

    fn describe(&self) -> IssuerInfo {
        test_issuer()
    }
}

fn test_issuer() -> IssuerInfo {
    IssuerInfo {
        kind: IssuerKind::Local,
        endpoint: "test".into(),
    }
}

/// A certificate of `ca` for `id` that expired an hour ago (the manager
/// never presents one: tests present it by hand).
fn expired_cert(ca: &Arc<MeshCa>, id: &SpiffeId) -> Arc<CertifiedKey> {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    LocalCa::new(Arc::clone(ca), td())
        .issue_valid_between(id, now - 2 * hour, now - hour)
        .unwrap()
        .certified_key()
}

/// Presents a fixed chain and key as the server certificate.
#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

type Handshake = (
    std::io::Result<server::TlsStream<DuplexStream>>,
    std::io::Result<client::TlsStream<DuplexStream>>,
);

/// Runs a handshake over an in-memory pipe, dialling an IP as HBONE does.
async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Handshake {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let dst = server_name(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
    tokio::join!(acceptor.accept(s), connector.connect(dst, c))
}

/// The reason a handshake error carries, as the proxy would log it.
fn peer_error(err: &std::io::Error) -> PeerCertError {
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
    PeerCertError::from_rustls(tls).unwrap_or_else(|| panic!("not a certificate error: {tls:?}"))
}

fn alert(err: &std::io::Error) -> AlertDescription {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(a)) => *a,
        other => panic!("not an alert: {other:?} ({err})"),
    }
}

/// The client side of a handshake the server refused: TLS 1.3 clients finish
/// first and learn of the refusal on their first read.
async fn client_refused(
    client: std::io::Result<client::TlsStream<DuplexStream>>,
) -> std::io::Error {
    match client {
        Err(e) => e,
        Ok(mut stream) => {
            let mut buf = [0u8; 16];
            match stream.read(&mut buf).await {
                Err(e) => e,
                Ok(n) => panic!("client read {n} bytes from a server that refused it"),
            }
        }
    }
}

async fn echo_round_trip(
    server: &mut server::TlsStream<DuplexStream>,
    client: &mut client::TlsStream<DuplexStream>,
    payload: &[u8],
) {
    // Write and read at once: the pipe holds less than the payload.
    let send = async {
        client.write_all(payload).await.unwrap();
        client.flush().await.unwrap();
    };
    let echo = async {
        let mut got = vec![0u8; payload.len()];
        server.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, echo);
    assert!(got == payload, "server received other bytes");
    let send = async {
        server.write_all(&got).await.unwrap();
        server.flush().await.unwrap();
    };
    let back = async {
        let mut back = vec![0u8; payload.len()];
        client.read_exact(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(send, back);
    assert!(back == payload, "client received other bytes");
}

fn leaf_of(certs: Option<&[CertificateDer<'static>]>) -> CertificateDer<'static> {
    certs.expect("peer certificates")[0].clone()
}

/// A certificate verifier that accepts anything (for clients that only need
/// to reach the point where the server refuses them).
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
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

/// Presents a fixed chain and key as the client certificate (or none).
#[derive(Debug)]
struct FixedClientCert(Option<Arc<CertifiedKey>>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-identity-test-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA made with rcgen directly, so tests can also sign odd certificates.
struct RawCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl RawCa {
    fn root(name: &str) -> Self {
        Self::make(name, None, hours(-1), hours(24))
    }

    /// A CA valid between the two instants, self-signed or signed by `parent`.
    fn make(
        name: &str,
        parent: Option<&RawCa>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = match parent {
            None => params.self_signed(&key).unwrap(),
            Some(p) => params.signed_by(&key, &p.issuer()).unwrap(),
        };
        Self {
            pem: cert.pem(),
            params,
            key,
        }
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// A leaf with the given SANs (no SPIFFE rules applied), with its key.
    fn leaf(&self, sans: Vec<SanType>) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (cert, key) = self.leaf_rcgen(sans);
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    fn leaf_rcgen(&self, sans: Vec<SanType>) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer()).unwrap();
        (cert, key)
    }

    fn mesh_ca(&self) -> Arc<MeshCa> {
        Arc::new(
            MeshCa::from_pem(
                self.pem.as_bytes(),
                self.key.serialize_pem().as_bytes(),
                None,
            )
            .unwrap(),
        )
    }
}

/// Now plus (or minus) some hours.
fn hours(h: i64) -> SystemTime {
    let d = Duration::from_secs(h.unsigned_abs() * 3600);
    if h < 0 {
        SystemTime::now() - d
    } else {
        SystemTime::now() + d
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

// ------------------------------------------------------------ handshakes

#[tokio::test]
async fn mutual_tls_happy_path_both_identities_alpn_and_data() {
    let ca = new_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(
            &client_side,
            &client_id(),
            vec![id("prod", "other"), server_id()],
        )
        .await,
    )
    .await;
    let (mut s, mut c) = (s.unwrap(), c.unwrap());

    // Each side reads the other's verified identity.
    let (_, server_conn) = s.get_ref();
    assert_eq!(
        peer_identity(server_conn.peer_certificates().unwrap()).unwrap(),
        client_id()
    );
    let (_, client_conn) = c.get_ref();
    assert_eq!(
        peer_identity(client_conn.peer_certificates().unwrap()).unwrap(),
        server_id()
    );

    // TLS 1.3, AES-GCM, h2 on both sides; no SNI was sent.
    for conn in [&**server_conn as &rustls::CommonState, &**client_conn] {
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        let suite = conn.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    assert_eq!(server_conn.server_name(), None);

    // The chain presented is the manager's current certificate.
    let presented = leaf_of(c.get_ref().1.peer_certificates());
    let current = server_side.manager().current(&server_id()).unwrap();
    assert_eq!(&presented, current.leaf());

    echo_round_trip(&mut s, &mut c, b"hello over mesh mTLS").await;
    echo_round_trip(&mut s, &mut c, &vec![0x5a; 300_000]).await;
}

#[tokio::test]
async fn configs_are_cached() {
    let ca = new_ca();
    let tls = local(&ca);
    assert!(Arc::ptr_eq(
        &ready_server(&tls, &server_id()).await,
        &ready_server(&tls, &server_id()).await
    ));
    let a = ready_client(&tls, &client_id(), vec![server_id(), id("x", "y")]).await;
    let b = ready_client(
        &tls,
        &client_id(),
        vec![id("x", "y"), server_id(), server_id()],
    )
    .await;
    assert!(Arc::ptr_eq(&a, &b));
    let c = ready_client(&tls, &client_id(), vec![server_id()]).await;
    assert!(!Arc::ptr_eq(&a, &c));
    assert!(!a.enable_sni);
    assert_eq!(a.alpn_protocols, vec![b"h2".to_vec()]);

    // Forgetting a workload drops its configurations and certificate.
    tls.manager().get(&client_id()).unwrap();
    tls.manager().get(&server_id()).unwrap();
    tls.retain([&server_id()]);
    assert_eq!(tls.manager().identities(), vec![server_id()]);
    assert!(!Arc::ptr_eq(
        &c,
        &ready_client(&tls, &client_id(), vec![server_id()]).await
    ));
}

#[tokio::test]
async fn server_refuses_client_cert_from_another_ca() {
    let ca = new_ca();
    let stranger = new_ca();
    let server_side = local(&ca);
    // Trusts our root (so it accepts our server) but presents a certificate
    // signed by another CA.
    let client_side = mesh_tls(Rogue::new(&stranger, td(), &ca));
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    let err = s.unwrap_err();
    assert_eq!(peer_error(&err), PeerCertError::UnknownIssuer);
    let msg = describe_tls_error(&err);
    assert!(msg.contains("not signed by the mesh root"), "{msg}");
    let client_err = client_refused(c).await;
    assert_eq!(alert(&client_err), AlertDescription::UnknownCA);
    let msg = describe_tls_error(&client_err);
    assert!(msg.contains("not signed by a root it trusts"), "{msg}");
}

#[tokio::test]
async fn server_refuses_client_cert_from_another_ca_of_the_same_name() {
    // Two roots with one name (say, two meshes made alike): the issuer is
    // found by name but its signature does not verify.
    let ca = RawCa::root("mesh root").mesh_ca();
    let twin = RawCa::root("mesh root").mesh_ca();
    assert_eq!(ca.subject(), twin.subject());
    let server_side = local(&ca);
    let client_side = mesh_tls(Rogue::new(&twin, td(), &ca));
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    assert_eq!(peer_error(&s.unwrap_err()), PeerCertError::UnknownIssuer);
    assert_eq!(alert(&client_refused(c).await), AlertDescription::UnknownCA);
    // And the other way round.
    let server_side = mesh_tls(Rogue::new(&twin, td(), &ca));
    let client_side = local(&ca);
    let (_, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    assert_eq!(peer_error(&c.unwrap_err()), PeerCertError::UnknownIssuer);
}

#[tokio::test]
async fn client_refuses_server_cert_from_another_ca() {
    let ca = new_ca();
    let stranger = new_ca();
    let server_side = mesh_tls(Rogue::new(&stranger, td(), &ca));
    let client_side = local(&ca);
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    let err = c.unwrap_err();
    assert_eq!(peer_error(&err), PeerCertError::UnknownIssuer);
    assert_eq!(alert(&s.unwrap_err()), AlertDescription::UnknownCA);
}

#[tokio::test]
async fn server_refuses_client_from_another_trust_domain() {
    let ca = new_ca();
    let server_side = local(&ca);
    // Same root, but an identity in another trust domain.
    let client_side = mesh_tls(Rogue::new(&ca, other_td(), &ca));
    let foreign = SpiffeId::new(other_td(), "default", "client").unwrap();
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &foreign, vec![server_id()]).await,
    )
    .await;
    let err = s.unwrap_err();
    assert_eq!(
        peer_error(&err),
        PeerCertError::ForeignTrustDomain {
            id: foreign,
            ours: td()
        }
    );
    let msg = describe_tls_error(&err);
    assert!(
        msg.contains("trust domain \"other.example\", but this mesh is \"cluster.local\""),
        "{msg}"
    );
    client_refused(c).await;
}

#[tokio::test]
async fn client_refuses_server_from_another_trust_domain() {
    let ca = new_ca();
    let server_side = mesh_tls(Rogue::new(&ca, other_td(), &ca));
    let client_side = local(&ca);
    let foreign = SpiffeId::new(other_td(), "prod", "server").unwrap();
    let (s, c) = handshake(
        ready_server(&server_side, &foreign).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    let err = c.unwrap_err();
    assert!(
        matches!(peer_error(&err), PeerCertError::ForeignTrustDomain { ref id, .. } if *id == foreign),
        "{err}"
    );
    assert!(s.is_err());
}

#[tokio::test]
async fn server_refuses_expired_client_cert() {
    let ca = new_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let mut config = (*ready_client(&client_side, &client_id(), vec![server_id()]).await).clone();
    config.client_auth_cert_resolver =
        Arc::new(FixedClientCert(Some(expired_cert(&ca, &client_id()))));
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        Arc::new(config),
    )
    .await;
    let err = s.unwrap_err();
    let PeerCertError::Expired {
        not_after: Some(not_after),
        now: Some(_),
    } = peer_error(&err)
    else {
        panic!("{err}");
    };
    assert!(not_after < SystemTime::now() - Duration::from_secs(3000));
    let msg = describe_tls_error(&err);
    assert!(msg.contains("has expired at"), "{msg}");
    let client_err = client_refused(c).await;
    assert_eq!(alert(&client_err), AlertDescription::CertificateExpired);
}

#[tokio::test]
async fn client_refuses_expired_server_cert() {
    let ca = new_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let mut config = (*ready_server(&server_side, &server_id()).await).clone();
    config.cert_resolver = Arc::new(FixedServerCert(expired_cert(&ca, &server_id())));
    let (s, c) = handshake(
        Arc::new(config),
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    assert!(matches!(
        peer_error(&c.unwrap_err()),
        PeerCertError::Expired { .. }
    ));
    assert_eq!(alert(&s.unwrap_err()), AlertDescription::CertificateExpired);
}

#[tokio::test]
async fn the_manager_never_presents_an_expired_certificate() {
    // A provider handing out a certificate that is already expired (a CA
    // with a wrong clock): refused at issuance, so no handshake presents it.
    struct Stale(Arc<MeshCa>, TrustDomain);
    impl CertificateProvider for Stale {
        fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
            let now = SystemTime::now();
            let hour = Duration::from_secs(3600);
            Box::pin(std::future::ready(
                LocalCa::new(Arc::clone(&self.0), td()).issue_valid_between(
                    id,
                    now - 2 * hour,
                    now - hour,
                ),
            ))
        }
        fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
            self.0.roots().to_vec()
        }
        fn trust_domain(&self) -> &TrustDomain {
            &self.1
        }
        fn describe(&self) -> IssuerInfo {
            test_issuer()
        }
    }
    let manager = Arc::new(CertManager::new(Arc::new(Stale(new_ca(), td()))));
    let err = manager.fetch(&client_id()).await.unwrap_err();
    assert!(matches!(err, IssueError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("clock"), "{err}");
    assert!(manager.get(&client_id()).is_none());
    assert_eq!(manager.issue_counts().failed, 1);
}

#[tokio::test]
async fn client_refuses_unexpected_server_identity() {
    let ca = new_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let wanted = id("prod", "payments");
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![wanted.clone()]).await,
    )
    .await;
    let err = c.unwrap_err();
    assert_eq!(
        peer_error(&err),
        PeerCertError::UnexpectedIdentity {
            id: server_id(),
            expected: vec![wanted]
        }
    );
    let msg = describe_tls_error(&err);
    assert!(
        msg.contains("spiffe://cluster.local/ns/prod/sa/server is not one expected")
            && msg.contains("expected spiffe://cluster.local/ns/prod/sa/payments"),
        "{msg}"
    );
    assert!(s.is_err());

    // No expected identity at all: every server is refused.
    let (_, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), Vec::new()).await,
    )
    .await;
    let err = c.unwrap_err();
    assert!(describe_tls_error(&err).contains("expected none"), "{err}");
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    let ca = new_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let mut config = (*ready_client(&client_side, &client_id(), vec![server_id()]).await).clone();
    config.client_auth_cert_resolver = Arc::new(FixedClientCert(None));
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        Arc::new(config),
    )
    .await;
    let err = s.unwrap_err();
    assert_eq!(peer_error(&err), PeerCertError::NoCertificate);
    assert!(describe_tls_error(&err).contains("presented no certificate"));
    let client_err = client_refused(c).await;
    assert_eq!(alert(&client_err), AlertDescription::CertificateRequired);
}

#[tokio::test]
async fn server_refuses_client_cert_without_spiffe_id() {
    let raw = RawCa::root("raw root");
    let ca = raw.mesh_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let cases = [
        (
            vec![SanType::DnsName("client.example".try_into().unwrap())],
            "no URI subjectAltName",
        ),
        (
            vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ],
            "2 URI subjectAltNames",
        ),
        (
            vec![uri("https://cluster.local/ns/a/sa/b")],
            "must start with",
        ),
        (
            vec![uri("spiffe://cluster.local/a/b")],
            "is not a workload identity",
        ),
        (Vec::new(), "no subjectAltName extension"),
    ];
    for (sans, why) in cases {
        let (leaf, key) = raw.leaf(sans);
        let certified =
            CertifiedKey::from_der(vec![leaf.clone()], key, &crypto_provider()).unwrap();
        let mut config =
            (*ready_client(&client_side, &client_id(), vec![server_id()]).await).clone();
        config.client_auth_cert_resolver = Arc::new(FixedClientCert(Some(Arc::new(certified))));
        let (s, _c) = handshake(
            ready_server(&server_side, &server_id()).await,
            Arc::new(config),
        )
        .await;
        let err = s.unwrap_err();
        let reason = peer_error(&err);
        assert!(
            matches!(reason, PeerCertError::NotSpiffe { .. }),
            "{reason}"
        );
        assert!(
            reason.to_string().contains(why),
            "{reason} (wanted {why:?})"
        );
        // The same check after a handshake.
        assert!(matches!(
            peer_identity(&[leaf]),
            Err(PeerCertError::NotSpiffe { .. })
        ));
    }
    assert_eq!(peer_identity(&[]), Err(PeerCertError::NoCertificate));
}

#[tokio::test]
async fn server_refuses_tls12_client() {
    let ca = new_ca();
    let server_side = local(&ca);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        Arc::new(config),
    )
    .await;
    let err = s.unwrap_err();
    let msg = describe_tls_error(&err);
    assert!(msg.contains("incompatible"), "{msg}");
    let client_err = c.unwrap_err();
    assert_eq!(alert(&client_err), AlertDescription::ProtocolVersion);
    assert!(describe_tls_error(&client_err).contains("TLS 1.3"));
}

#[tokio::test]
async fn server_refuses_client_without_aes_gcm() {
    let ca = new_ca();
    let server_side = local(&ca);
    let chacha_only = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&chacha_only))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(chacha_only)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        Arc::new(config),
    )
    .await;
    assert!(describe_tls_error(&s.unwrap_err()).contains("incompatible"));
    assert_eq!(alert(&c.unwrap_err()), AlertDescription::HandshakeFailure);
}

#[tokio::test]
async fn server_refuses_client_without_h2() {
    let ca = new_ca();
    let server_side = local(&ca);
    let client_side = local(&ca);
    let mut config = (*ready_client(&client_side, &client_id(), vec![server_id()]).await).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        Arc::new(config),
    )
    .await;
    let err = s.unwrap_err();
    assert!(describe_tls_error(&err).contains("ALPN h2"), "{err}");
    assert_eq!(
        alert(&c.unwrap_err()),
        AlertDescription::NoApplicationProtocol
    );
}

#[tokio::test]
async fn server_refuses_a_client_that_does_not_speak_tls() {
    let ca = new_ca();
    let acceptor = TlsAcceptor::from(ready_server(&local(&ca), &server_id()).await);
    let (mut c, s) = tokio::io::duplex(4096);
    let (accepted, _) = tokio::join!(acceptor.accept(s), async {
        c.write_all(b"CONNECT 10.1.2.3:8080 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf).await;
    });
    let msg = describe_tls_error(&accepted.unwrap_err());
    assert!(msg.contains("does not speak TLS"), "{msg}");
}

#[tokio::test]
async fn intermediate_ca_chain_is_sent_and_verified() {
    let root = RawCa::root("mesh root");
    let inter = RawCa::make("mesh intermediate", Some(&root), hours(-1), hours(24));
    let dir = TempDir::new();
    let cert = dir.write("ca-cert.pem", &inter.pem);
    let key = dir.write("ca-key.pem", inter.key.serialize_pem());
    // Istio's layout: the chain file starts with the CA certificate itself.
    let chain = dir.write("cert-chain.pem", format!("{}{}", inter.pem, root.pem));
    let ca = Arc::new(MeshCa::load(&cert, &key, Some(&chain)).unwrap());
    assert_eq!(ca.roots().len(), 1);
    assert_eq!(ca.intermediates().len(), 1);

    // An intermediate without its chain is refused clearly.
    let err = MeshCa::load(&cert, &key, None).unwrap_err();
    assert!(matches!(err, CaError::ChainMissing { .. }), "{err}");
    // A chain that does not end in a root, too.
    let other_inter = RawCa::make("other", Some(&root), hours(-1), hours(24));
    let bad_chain = dir.write("bad-chain.pem", &other_inter.pem);
    let err = MeshCa::load(&cert, &key, Some(&bad_chain)).unwrap_err();
    assert!(matches!(err, CaError::NoRoot { .. }), "{err}");
    // A chain ending in the wrong root fails the self-test.
    let wrong_root = RawCa::root("wrong root");
    let wrong_chain = dir.write("wrong-chain.pem", &wrong_root.pem);
    let err = MeshCa::load(&cert, &key, Some(&wrong_chain)).unwrap_err();
    assert!(matches!(err, CaError::SelfTest { .. }), "{err}");

    let server_side = local(&ca);
    let client_side = local(&ca);
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    let (s, c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.get_ref().1.peer_certificates().unwrap().len(), 2);
    assert_eq!(c.get_ref().1.peer_certificates().unwrap().len(), 2);
    assert_eq!(
        peer_identity(s.get_ref().1.peer_certificates().unwrap()).unwrap(),
        client_id()
    );
}

// -------------------------------------------------------------- rotation

#[tokio::test]
async fn rotation_new_handshakes_get_the_new_cert_and_open_connections_keep_working() {
    let ca = new_ca();
    let ttl = Duration::from_secs(2);
    let server_side = mesh_tls(LocalCa::new(Arc::clone(&ca), td()).with_ttl(ttl));
    let client_side = mesh_tls(LocalCa::new(Arc::clone(&ca), td()).with_ttl(ttl));
    let server_cfg = ready_server(&server_side, &server_id()).await;
    let client_cfg = ready_client(&client_side, &client_id(), vec![server_id()]).await;

    let (s, c) = handshake(Arc::clone(&server_cfg), Arc::clone(&client_cfg)).await;
    let (mut old_s, mut old_c) = (s.unwrap(), c.unwrap());
    let first = server_side.manager().current(&server_id()).unwrap();
    let first_client = client_side.manager().current(&client_id()).unwrap();
    assert_eq!(
        leaf_of(old_c.get_ref().1.peer_certificates()),
        *first.leaf()
    );

    sleep_until(first.refresh_at().max(first_client.refresh_at())).await;
    // What the sweeper (or a fetch finding the certificate due) does.
    assert_eq!(server_side.manager().rotate_due().await, 1);
    assert_eq!(client_side.manager().rotate_due().await, 1);
    let (s, c) = handshake(server_cfg, client_cfg).await;
    let (mut new_s, mut new_c) = (s.unwrap(), c.unwrap());
    let second = server_side.manager().current(&server_id()).unwrap();
    assert_ne!(first.serial(), second.serial());
    assert_eq!(
        leaf_of(new_c.get_ref().1.peer_certificates()),
        *second.leaf()
    );
    assert_ne!(
        leaf_of(new_s.get_ref().1.peer_certificates()),
        *first_client.leaf()
    );
    echo_round_trip(&mut new_s, &mut new_c, b"new connection").await;

    // The connection made before rotation keeps its session, even once the
    // certificates it was made with have expired.
    echo_round_trip(&mut old_s, &mut old_c, b"still flowing after rotation").await;
    sleep_until(first.not_after().max(first_client.not_after()) + Duration::from_millis(50)).await;
    echo_round_trip(&mut old_s, &mut old_c, b"still flowing after expiry").await;
}

async fn sleep_until(t: SystemTime) {
    let wait = t.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(wait <= Duration::from_secs(3), "test would sleep {wait:?}");
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
}

/// Counts issuances and can be told to fail.
struct Counting {
    inner: LocalCa,
    issued: AtomicUsize,
    fail: AtomicBool,
}

impl Counting {
    fn new(ca: &Arc<MeshCa>, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: LocalCa::new(Arc::clone(ca), td()).with_ttl(ttl),
            issued: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }
}

impl CertificateProvider for Counting {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(async move {
            // An issuer a network hop away: callers wait, and meanwhile
            // others may ask for the same identity.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(IssueError::Unavailable {
                    id: id.clone(),
                    endpoint: "test".into(),
                    reason: "the issuer is down".into(),
                });
            }
            self.issued.fetch_add(1, Ordering::SeqCst);
            self.inner.issue_now(id)
        })
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.inner.trust_anchors()
    }

    fn trust_domain(&self) -> &TrustDomain {
        self.inner.trust_domain()
    }

    fn describe(&self) -> IssuerInfo {
        test_issuer()
    }
}

#[tokio::test]
async fn fetch_issues_once_then_rotates_before_half_life() {
    let ca = new_ca();
    let provider = Counting::new(&ca, Duration::from_secs(4));
    let manager = Arc::new(CertManager::new(provider.clone()));
    assert!(manager.current(&client_id()).is_none());
    assert!(manager.get(&client_id()).is_none(), "get never issues");
    let first = manager.fetch(&client_id()).await.unwrap();
    assert!(Arc::ptr_eq(
        &first,
        &manager.fetch(&client_id()).await.unwrap()
    ));
    assert!(Arc::ptr_eq(&first, &manager.get(&client_id()).unwrap()));
    assert_eq!(provider.issued.load(Ordering::SeqCst), 1);
    // The TTL asked for (X.509 whole seconds, rounded up), counted from
    // when the manager received it: a loaded machine may take a while
    // between signing and receiving, so only the upper bound is tight.
    let life = first.not_after().duration_since(first.issued_at()).unwrap();
    assert!(
        life >= Duration::from_secs(2) && life <= Duration::from_secs(5),
        "{life:?}"
    );

    // Past half-life (rotation is due from 40 % on): a fetch returns the
    // still-valid certificate at once and rotates in the background.
    sleep_until(first.refresh_at()).await;
    let during = manager.fetch(&client_id()).await.unwrap();
    assert!(Arc::ptr_eq(&first, &during) || during.serial() != first.serial());
    let second = wait_for(|| {
        manager
            .current(&client_id())
            .filter(|c| c.serial() != first.serial())
    })
    .await;
    assert_ne!(first.key().secret_der(), second.key().secret_der());
    assert_eq!(provider.issued.load(Ordering::SeqCst), 2);
}

/// Polls `f` until it returns something (at most 3 s).
async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 3 s");
}

#[tokio::test]
async fn sweeper_rotates_idle_identities() {
    let ca = new_ca();
    let manager = Arc::new(CertManager::new(Counting::new(&ca, Duration::from_secs(2))));
    let first = manager.fetch(&server_id()).await.unwrap();
    let sweeper = manager.spawn_sweeper(Duration::from_millis(50));
    // Rotated without anyone asking.
    wait_for(|| {
        manager
            .current(&server_id())
            .filter(|c| c.serial() != first.serial())
    })
    .await;
    // The sweeper ends with the manager.
    drop(manager);
    tokio::time::timeout(Duration::from_secs(1), sweeper)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn rotate_due_counts_rotations() {
    let ca = new_ca();
    let provider = Counting::new(&ca, Duration::from_secs(3600));
    let manager = Arc::new(CertManager::new(provider.clone()));
    manager.fetch(&client_id()).await.unwrap();
    assert_eq!(manager.rotate_due().await, 0);
    assert_eq!(provider.issued.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_use_issues_once() {
    let ca = new_ca();
    let provider = Counting::new(&ca, Duration::from_secs(3600));
    let manager = Arc::new(CertManager::new(provider.clone()));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move { manager.fetch(&client_id()).await.unwrap() })
        })
        .collect();
    let mut certs = Vec::new();
    for t in tasks {
        certs.push(t.await.unwrap());
    }
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(provider.issued.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_issuer_outage_keeps_the_valid_cert_backs_off_and_recovers() {
    let ca = new_ca();
    let provider = Counting::new(&ca, Duration::from_secs(2));
    let manager = Arc::new(CertManager::new(provider.clone()));
    let first = manager.fetch(&client_id()).await.unwrap();
    provider.fail.store(true, Ordering::SeqCst);

    // Nothing to fall back on: the error comes through, then fails fast
    // (backoff) without asking the issuer again.
    let err = manager.fetch(&server_id()).await.unwrap_err();
    assert!(err.to_string().contains("the issuer is down"), "{err}");
    let again = manager.fetch(&server_id()).await.unwrap_err();
    assert!(matches!(again, IssueError::Backoff { .. }), "{again}");
    assert_eq!(manager.issue_counts().failed, 1);
    let last = manager.issue_counts().last_failure.unwrap();
    assert_eq!(last.identity, server_id());

    // Rotation due during the outage: the valid certificate is still served.
    sleep_until(first.refresh_at()).await;
    assert_eq!(manager.rotate_due().await, 0);
    let still = manager.fetch(&client_id()).await.unwrap();
    assert!(Arc::ptr_eq(&first, &still));
    assert!(manager.issue_counts().failed >= 2);

    // Once the issuer is back, the next attempt after the backoff rotates
    // (before the certificate expires: the backoff is at most a quarter of
    // the time left).
    provider.fail.store(false, Ordering::SeqCst);
    let mut rotated = None;
    for _ in 0..300 {
        manager.rotate_due().await;
        rotated = manager
            .current(&client_id())
            .filter(|c| c.serial() != first.serial());
        if rotated.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rotated = rotated.expect("rotated once the issuer is back");
    assert!(SystemTime::now() < first.not_after());
    assert!(!rotated.is_expired_at(SystemTime::now()));
    // And the identity that never had one gets it.
    let mut server = None;
    for _ in 0..300 {
        server = manager.fetch(&server_id()).await.ok();
        if server.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server = server.expect("issued once the issuer is back");
    assert_eq!(server.identity(), &server_id());
}

#[tokio::test]
async fn retain_forgets_identities_no_longer_local() {
    let ca = new_ca();
    let manager = Arc::new(CertManager::new(Counting::new(
        &ca,
        Duration::from_secs(3600),
    )));
    manager.fetch(&client_id()).await.unwrap();
    manager.fetch(&server_id()).await.unwrap();
    let mut ids = manager.identities();
    ids.sort();
    assert_eq!(ids, vec![client_id(), server_id()]);
    manager.retain(&[server_id()]);
    assert_eq!(manager.identities(), vec![server_id()]);
    assert!(manager.current(&client_id()).is_none());
}

// -------------------------------------------------------------------- CA

#[test]
fn local_ca_leaf_has_the_workload_profile() {
    let ca = new_ca();
    let issuer = LocalCa::new(Arc::clone(&ca), td());
    assert_eq!(issuer.ttl(), Duration::from_secs(24 * 3600));
    let before = SystemTime::now();
    let cert = issuer.issue_now(&client_id()).unwrap();
    assert_eq!(cert.identity(), &client_id());
    assert_eq!(cert.chain().len(), 1); // root CA: nothing after the leaf

    let (_, x509) = X509Certificate::from_der(cert.leaf()).unwrap();
    assert!(x509.subject().iter().next().is_none(), "no subject needed");
    assert_eq!(x509.version(), x509_parser::x509::X509Version::V3);
    let san = x509.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN is critical when the subject is empty");
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(peer_identity(cert.chain()).unwrap(), client_id());
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = x509.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    assert_eq!(
        x509.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );

    // Authority key id = the CA's subject key id (some verifiers insist).
    let (_, root) = X509Certificate::from_der(&ca.roots()[0]).unwrap();
    let ski = root
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
    let aki = x509
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
    assert_eq!(aki, ski);
    assert_eq!(x509.issuer().as_raw(), root.subject().as_raw());

    // Back-dated against clock skew; lives at least the TTL.
    let skew = before.duration_since(cert.not_before()).unwrap();
    assert!(
        skew >= CLOCK_SKEW - Duration::from_secs(1) && skew <= CLOCK_SKEW + Duration::from_secs(1),
        "{skew:?}"
    );
    let life = cert.not_after().duration_since(before).unwrap();
    assert!(
        life >= DEFAULT_CERT_TTL && life <= DEFAULT_CERT_TTL + Duration::from_secs(2),
        "{life:?}"
    );

    // Fresh key and serial each time; the serial is positive and 16 bytes.
    let again = issuer.issue_now(&client_id()).unwrap();
    assert_ne!(cert.serial(), again.serial());
    assert_ne!(cert.key().secret_der(), again.key().secret_der());
    assert_eq!(cert.serial().len(), 16);
    assert!(cert.serial()[0] & 0x80 == 0 && cert.serial()[0] != 0);
    // Debug never shows the key.
    let debug = format!("{cert:?}");
    assert!(
        debug.contains("spiffe://cluster.local/ns/default/sa/client") && !debug.contains("key"),
        "{debug}"
    );
}

#[test]
fn local_ca_refuses_other_trust_domains() {
    let ca = new_ca();
    let issuer = LocalCa::new(ca, td());
    let foreign = SpiffeId::new(other_td(), "default", "client").unwrap();
    let err = issuer.issue_now(&foreign).unwrap_err();
    assert!(
        matches!(err, IssueError::ForeignTrustDomain { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("issues for trust domain \"cluster.local\" only"),
        "{err}"
    );
}

#[test]
fn local_ca_never_issues_past_the_ca_expiry() {
    let raw = RawCa::make("short-lived root", None, hours(-1), hours(1));
    let ca = raw.mesh_ca();
    let cert = LocalCa::new(Arc::clone(&ca), td())
        .issue_now(&client_id())
        .unwrap();
    assert_eq!(cert.not_after(), ca.not_after());
}

#[test]
fn workload_cert_checks_what_it_wraps() {
    let raw = RawCa::root("root");
    let (leaf, key) = raw.leaf(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
    let (_, other_key) = raw.leaf(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
    let ab = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
    assert!(WorkloadCert::new(ab.clone(), vec![leaf.clone()], key.clone_key()).is_ok());
    let err = WorkloadCert::new(client_id(), vec![leaf.clone()], key.clone_key()).unwrap_err();
    assert!(
        err.to_string()
            .contains("it names spiffe://cluster.local/ns/a/sa/b"),
        "{err}"
    );
    let err = WorkloadCert::new(ab.clone(), vec![leaf], other_key).unwrap_err();
    assert!(err.to_string().contains("key does not fit"), "{err}");
    let err = WorkloadCert::new(ab, Vec::new(), key).unwrap_err();
    assert!(err.to_string().contains("chain is empty"), "{err}");
}

#[test]
fn ca_load_errors_say_what_to_do() {
    let dir = TempDir::new();
    let good = MeshCa::generate(&td(), 1).unwrap();
    let other = MeshCa::generate(&td(), 1).unwrap();
    let cert = dir.write("ca.crt", &good.cert_pem);
    let key = dir.write("ca.key", &good.key_pem);
    assert!(MeshCa::load(&cert, &key, None).is_ok());

    // Missing files.
    let missing = dir.path().join("nope.crt");
    let err = MeshCa::load(&missing, &key, None).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Missing {
                what: "certificate",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("nope.crt does not exist") && err.to_string().contains("ca init"),
        "{err}"
    );
    let err = MeshCa::load(&cert, &dir.path().join("nope.key"), None).unwrap_err();
    assert!(matches!(err, CaError::Missing { what: "key", .. }), "{err}");
    let err = MeshCa::load(&cert, &key, Some(&dir.path().join("nope.pem"))).unwrap_err();
    assert!(
        matches!(err, CaError::Missing { what: "chain", .. }),
        "{err}"
    );

    // Not PEM, or the wrong kind of PEM.
    let garbage = dir.write("garbage.pem", "this is not a certificate\n");
    let err = MeshCa::load(&garbage, &key, None).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::NotPem {
                what: "certificate",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("CERTIFICATE block"), "{err}");
    let err = MeshCa::load(&cert, &garbage, None).unwrap_err();
    assert!(matches!(err, CaError::NotPem { what: "key", .. }), "{err}");
    let err = MeshCa::load(&cert, &cert, None).unwrap_err();
    assert!(matches!(err, CaError::NotPem { what: "key", .. }), "{err}");
    let err = MeshCa::load(&key, &key, None).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::NotPem {
                what: "certificate",
                ..
            }
        ),
        "{err}"
    );
    let broken = dir.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let err = MeshCa::load(&broken, &key, None).unwrap_err();
    assert!(matches!(err, CaError::BadCertificate { .. }), "{err}");

    // The key of another CA.
    let other_key = dir.write("other.key", &other.key_pem);
    let err = MeshCa::load(&cert, &other_key, None).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("does not match the CA certificate"),
        "{err}"
    );

    // A leaf is not a CA.
    let raw = RawCa::root("root");
    let (leaf, leaf_key) = raw.leaf_rcgen(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
    let leaf_cert = dir.write("leaf.crt", leaf.pem());
    let leaf_key = dir.write("leaf.key", leaf_key.serialize_pem());
    let err = MeshCa::load(&leaf_cert, &leaf_key, None).unwrap_err();
    assert!(matches!(err, CaError::NotCa { .. }), "{err}");
    assert!(err.to_string().contains("not a CA certificate"), "{err}");

    // Expired, and not yet valid.
    let expired = RawCa::make("expired root", None, hours(-48), hours(-24));
    let exp_cert = dir.write("expired.crt", &expired.pem);
    let exp_key = dir.write("expired.key", expired.key.serialize_pem());
    let err = MeshCa::load(&exp_cert, &exp_key, None).unwrap_err();
    assert!(matches!(err, CaError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("expired at"), "{err}");
    let future = RawCa::make("future root", None, hours(24), hours(48));
    let fut_cert = dir.write("future.crt", &future.pem);
    let fut_key = dir.write("future.key", future.key.serialize_pem());
    let err = MeshCa::load(&fut_cert, &fut_key, None).unwrap_err();
    assert!(matches!(err, CaError::NotYetValid { .. }), "{err}");
}

#[tokio::test]
async fn loads_openssl_sec1_and_pkcs1_ca_keys() {
    for (cert, key, subject) in [
        (
            include_str!("testdata/openssl-ec-root.crt"),
            include_str!("testdata/openssl-ec-root.key"),
            "openssl root",
        ),
        (
            include_str!("testdata/openssl-rsa-root.crt"),
            include_str!("testdata/openssl-rsa-root.key"),
            "Root CA",
        ),
    ] {
        assert!(
            key.starts_with("-----BEGIN EC PRIVATE KEY")
                || key.starts_with("-----BEGIN RSA PRIVATE KEY")
        );
        let ca = Arc::new(MeshCa::from_pem(cert.as_bytes(), key.as_bytes(), None).unwrap());
        assert!(ca.subject().contains(subject), "{}", ca.subject());
        let (s, c) = handshake(
            ready_server(&local(&ca), &server_id()).await,
            ready_client(&local(&ca), &client_id(), vec![server_id()]).await,
        )
        .await;
        let s = s.unwrap();
        c.unwrap();
        assert_eq!(
            peer_identity(s.get_ref().1.peer_certificates().unwrap()).unwrap(),
            client_id()
        );
    }
}

#[cfg(unix)]
#[test]
fn ca_init_round_trip_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let out = dir.path().join("new-ca");
    let (cert, key) = MeshCa::init_dir(&out, &other_td(), 30).unwrap();
    assert_eq!(cert, out.join("ca.crt"));
    assert_eq!(key, out.join("ca.key"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key_before = std::fs::read(&key).unwrap();

    let ca = Arc::new(MeshCa::load_dir(&out).unwrap());
    assert!(ca.subject().contains("other.example"), "{}", ca.subject());
    let days = ca
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs()
        / 86_400;
    assert!((29..=30).contains(&days), "{days}");

    // Lifetimes out of range are refused before anything is written.
    for days in [0, MAX_CA_DAYS + 1, u32::MAX] {
        let err = MeshCa::init_dir(&dir.path().join("bad"), &td(), days).unwrap_err();
        assert!(matches!(err, CaError::BadDays { .. }), "{err}");
        assert!(!dir.path().join("bad").exists());
    }

    // Refuses to overwrite, and leaves the files alone.
    let err = MeshCa::init_dir(&out, &other_td(), 30).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), key_before);
    // Either file existing is enough to refuse.
    std::fs::remove_file(&cert).unwrap();
    assert!(matches!(
        MeshCa::init_dir(&out, &other_td(), 30),
        Err(CaError::AlreadyExists { .. })
    ));
    assert!(!cert.exists());
}

#[tokio::test]
async fn ca_init_then_handshake() {
    let dir = TempDir::new();
    MeshCa::init_dir(dir.path(), &td(), DEFAULT_CA_DAYS).unwrap();
    let ca = Arc::new(MeshCa::load_dir(dir.path()).unwrap());
    let issued = LocalCa::new(Arc::clone(&ca), td())
        .issue_now(&client_id())
        .unwrap();
    assert_eq!(peer_identity(issued.chain()).unwrap(), client_id());
    let server_side = local(&ca);
    let client_side = local(&ca);
    let (s, c) = handshake(
        ready_server(&server_side, &server_id()).await,
        ready_client(&client_side, &client_id(), vec![server_id()]).await,
    )
    .await;
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    assert_eq!(
        peer_identity(s.get_ref().1.peer_certificates().unwrap()).unwrap(),
        client_id()
    );
    echo_round_trip(&mut s, &mut c, b"made by ca init").await;
}

#[test]
fn mesh_tls_needs_trust_anchors() {
    struct NoRoots(TrustDomain);
    impl CertificateProvider for NoRoots {
        fn describe(&self) -> IssuerInfo {
            test_issuer()
        }
        fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
            Box::pin(std::future::ready(Err(IssueError::Provider {
                id: id.clone(),
                source: "none".into(),
            })))
        }
        fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
            Vec::new()
        }
        fn trust_domain(&self) -> &TrustDomain {
            &self.0
        }
    }
    let err = MeshTls::new(Arc::new(CertManager::new(Arc::new(NoRoots(td()))))).unwrap_err();
    assert!(matches!(err, TlsSetupError::NoTrustAnchors), "{err}");
}
