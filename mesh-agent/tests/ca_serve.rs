//! `mesh-agent ca serve` over real gRPC on TLS 1.3, against the fake API
//! server (TokenReview, pod reads), driven by the real `IstioCaClient`:
//! node agents get certificates for the pods of their node and nothing
//! else, refusals carry their reason, the per-node rate limit holds, an API
//! outage fails closed. Root-free.

mod kube_fake;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use kube_fake::{FakeApiServer, TokenUser};
use mesh_agent::{
    ca_server::{self, CaServer, CaServerConfig},
    identity::{
        CLOCK_SKEW, MeshCa, SpiffeId, TrustDomain, WorkloadCert,
        istio_ca::{CaClientConfig, CaClientError, IstioCaClient, generate_csr, pem_chain_to_der},
        peer_identity,
    },
};
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

const AUDIENCE: &str = "istio-ca";
const DNS_NAME: &str = "mesh-ca.test.svc";
const MAX_TTL: Duration = Duration::from_secs(3600);
const MIN_TTL: Duration = Duration::from_secs(120);

struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-ca-serve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("trust domain")
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td(), ns, sa).expect("identity")
}

fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running"}
    })
}

/// The cluster: an agent on node-a and one on node-b; cart on node-a, web
/// on node-b; and the tokens the tests use.
async fn cluster() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.apply(pod(
        "mesh-system",
        "mesh-agent-a",
        "uid-agent-a",
        "mesh-agent",
        "node-a",
    ));
    api.apply(pod(
        "mesh-system",
        "mesh-agent-b",
        "uid-agent-b",
        "mesh-agent",
        "node-b",
    ));
    api.apply(pod("shop", "cart-1", "uid-cart-1", "cart", "node-a"));
    api.apply(pod("shop", "web-1", "uid-web-1", "web", "node-b"));
    let agent = |pod: &str, uid: &str, node: Option<&str>, aud: &str| {
        TokenUser::bound("mesh-system", "mesh-agent", pod, uid, node, aud)
    };
    api.add_token(
        "agent-a",
        agent("mesh-agent-a", "uid-agent-a", Some("node-a"), AUDIENCE),
    );
    api.add_token(
        "agent-a-pre-1.30",
        agent("mesh-agent-a", "uid-agent-a", None, AUDIENCE),
    );
    api.add_token(
        "agent-b",
        agent("mesh-agent-b", "uid-agent-b", Some("node-b"), AUDIENCE),
    );
    // The token of an earlier pod of the same name (re-created since).
    api.add_token(
        "agent-a-stale",
        agent("mesh-agent-a", "uid-gone", None, AUDIENCE),
    );
    // A token claiming node-b for the pod that runs on node-a.
    api.add_token(
        "agent-a-claims-b",
        agent("mesh-agent-a", "uid-agent-a", Some("node-b"), AUDIENCE),
    );
    api.add_token(
        "agent-a-other-audience",
        agent("mesh-agent-a", "uid-agent-a", Some("node-a"), "kubernetes"),
    );
    let cart = || {
        TokenUser::bound(
            "shop",
            "cart",
            "cart-1",
            "uid-cart-1",
            Some("node-a"),
            AUDIENCE,
        )
    };
    api.add_token("cart", cart());
    api.add_token(&jwt("cart"), cart());
    api
}

/// A JWT-shaped token named `name` expiring in 2100 (the CA server keeps a
/// review only of a token whose `exp` it can read; the fake API server
/// knows tokens by their whole text, signature or not).
fn jwt(name: &str) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{name}",
        b64(r#"{"alg":"RS256","kid":"test"}"#),
        b64(&format!(r#"{{"exp":4102444800,"sub":"{name}"}}"#))
    )
}

/// The mesh CA, and the directory holding its files (`dir/ca`).
struct Ca {
    dir: Tmp,
    ca: Arc<MeshCa>,
}

fn mesh_ca(tag: &str) -> Ca {
    let dir = Tmp::new(tag);
    MeshCa::init_dir(&dir.0.join("ca"), &td(), 30).expect("ca init");
    let ca = Arc::new(MeshCa::load_dir(&dir.0.join("ca")).expect("ca load"));
    Ca { dir, ca }
}

async fn serve(ca: &Ca, api: &FakeApiServer, tune: impl FnOnce(&mut CaServerConfig)) -> CaServer {
    let mut cfg = CaServerConfig::new(Arc::clone(&ca.ca), td());
    cfg.listen = "127.0.0.1:0".parse().expect("address");
    cfg.dns_names = vec![DNS_NAME.into()];
    cfg.max_cert_ttl = MAX_TTL;
    cfg.min_cert_ttl = MIN_TTL;
    cfg.rate_per_node = 1000.0;
    cfg.rate_burst = 1000;
    cfg.api_timeout = Duration::from_secs(5);
    tune(&mut cfg);
    ca_server::start(cfg, api.client())
        .await
        .expect("CA server starts")
}

/// A client of `addr` presenting the token in `token_file`.
fn client(ca: &Ca, addr: SocketAddr, token_file: &Path) -> IstioCaClient {
    client_with(ca.ca.roots().to_vec(), addr, token_file, Some(DNS_NAME))
}

fn client_with(
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    addr: SocketAddr,
    token_file: &Path,
    server_name: Option<&str>,
) -> IstioCaClient {
    IstioCaClient::new(CaClientConfig {
        address: format!("https://{addr}"),
        server_name: server_name.map(str::to_owned),
        root_certs: roots,
        token_file: Some(token_file.to_owned()),
        cluster_id: Some("Kubernetes".into()),
        timeout: Duration::from_secs(10),
    })
    .expect("client")
}

fn token(dir: &Tmp, token: &str) -> PathBuf {
    let path = dir.0.join("token");
    std::fs::write(&path, format!("{token}\n")).expect("token file");
    path
}

/// Asks for `want` (impersonating it when `impersonate`) with a CSR for
/// `want`; on success checks the certificate against the key and identity.
async fn ask(
    client: &IstioCaClient,
    want: &SpiffeId,
    impersonate: bool,
    ttl: Duration,
) -> Result<
    (
        WorkloadCert,
        Vec<rustls::pki_types::CertificateDer<'static>>,
    ),
    CaClientError,
> {
    let (csr, key) = generate_csr(want).expect("CSR");
    let chain = client
        .create_certificate(&csr, impersonate.then_some(want), ttl)
        .await?;
    let der = pem_chain_to_der(&chain).expect("PEM chain");
    // The leaf names `want` and carries the CSR's key.
    let cert = WorkloadCert::new(want.clone(), der[..der.len() - 1].to_vec(), key)
        .expect("the leaf names the identity and carries the CSR key");
    Ok((cert, der))
}

/// `n` requests for `want` (not impersonating) sent at once; their results.
async fn ask_together(
    client: &IstioCaClient,
    want: &SpiffeId,
    n: usize,
) -> Vec<Result<(), CaClientError>> {
    let asks: Vec<_> = (0..n)
        .map(|_| {
            let (c, want) = (client.clone(), want.clone());
            tokio::spawn(async move { ask(&c, &want, false, MAX_TTL).await.map(|_| ()) })
        })
        .collect();
    let mut results = Vec::new();
    for a in asks {
        results.push(a.await.expect("the request task"));
    }
    results
}

fn verifies_to_root(chain: &[rustls::pki_types::CertificateDer<'static>], ca: &Ca) {
    let root = &ca.ca.roots()[0];
    assert_eq!(
        chain.last(),
        Some(root),
        "the chain ends with the mesh root"
    );
    let (_, leaf) = X509Certificate::from_der(chain[0].as_ref()).expect("leaf");
    let (_, root) = X509Certificate::from_der(root.as_ref()).expect("root");
    assert_eq!(leaf.issuer(), root.subject());
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf is signed by the mesh root");
}

fn denied(e: &CaClientError, needle: &str) {
    match e {
        CaClientError::PermissionDenied { message, .. } => {
            assert!(message.contains(needle), "{needle:?} not in {e}")
        }
        other => panic!("expected PERMISSION_DENIED with {needle:?}, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_certificates_for_the_pods_of_its_node_only() {
    let ca = mesh_ca("issue");
    let api = cluster().await;
    let server = serve(&ca, &api, |_| {}).await;
    let dir = Tmp::new("issue-token");
    let agent_a = client(&ca, server.local_addr(), &token(&dir, "agent-a"));
    let cart = id("shop", "cart");

    // A pod on node-a: issued, chained to the root, TTL capped.
    let before = SystemTime::now();
    let (cert, chain) = ask(&agent_a, &cart, true, Duration::from_secs(48 * 3600))
        .await
        .expect("cart runs on node-a");
    verifies_to_root(&chain, &ca);
    assert_eq!(peer_identity(&chain[..1]).unwrap(), cart);
    assert!(cert.not_after() <= SystemTime::now() + MAX_TTL + Duration::from_secs(1));
    assert!(cert.not_after() >= before + MAX_TTL);
    assert!(cert.not_before() <= before - CLOCK_SKEW + Duration::from_secs(1));
    // A short request is honoured down to the minimum.
    let (short, _) = ask(&agent_a, &cart, true, Duration::from_secs(5))
        .await
        .unwrap();
    let life = short.not_after().duration_since(SystemTime::now()).unwrap();
    // Rounded up to a whole second.
    assert!(
        life <= MIN_TTL + Duration::from_secs(1) && life >= MIN_TTL - Duration::from_secs(30),
        "{life:?}"
    );

    // Without impersonation the agent gets its own identity only.
    let (own, _) = ask(&agent_a, &id("mesh-system", "mesh-agent"), false, MAX_TTL)
        .await
        .unwrap();
    assert_eq!(own.identity(), &id("mesh-system", "mesh-agent"));

    // A pod of node-b: refused, with the reason.
    let e = ask(&agent_a, &id("shop", "web"), true, MAX_TTL)
        .await
        .unwrap_err();
    denied(
        &e,
        "no pod of service account shop/web is scheduled on node node-a",
    );
    // ...which node-b's agent gets.
    std::fs::write(dir.0.join("token"), "agent-b").unwrap(); // re-read per call
    ask(&agent_a, &id("shop", "web"), true, MAX_TTL)
        .await
        .expect("web runs on node-b");
    // A service account no pod runs as.
    std::fs::write(dir.0.join("token"), "agent-a").unwrap();
    let e = ask(&agent_a, &id("shop", "ghost"), true, MAX_TTL)
        .await
        .unwrap_err();
    denied(&e, "shop/ghost");
    // Another trust domain.
    let foreign =
        SpiffeId::new(TrustDomain::new("other.example").unwrap(), "shop", "cart").unwrap();
    let e = ask(&agent_a, &foreign, true, MAX_TTL).await.unwrap_err();
    denied(&e, "trust domain");

    // A token without the node-name claim: the caller pod's node decides.
    std::fs::write(dir.0.join("token"), "agent-a-pre-1.30").unwrap();
    ask(&agent_a, &cart, true, MAX_TTL)
        .await
        .expect("node from the caller's pod");
    let e = ask(&agent_a, &id("shop", "web"), true, MAX_TTL)
        .await
        .unwrap_err();
    denied(&e, "node node-a");

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_misused_tokens_are_refused_with_a_reason() {
    let ca = mesh_ca("refuse");
    let api = cluster().await;
    let server = serve(&ca, &api, |_| {}).await;
    let dir = Tmp::new("refuse-token");
    let path = token(&dir, "agent-a-stale");
    let c = client(&ca, server.local_addr(), &path);
    let cart = id("shop", "cart");

    // The token's pod was re-created (UID mismatch).
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    denied(&e, "UID");
    // The token names node-b; its pod runs on node-a.
    std::fs::write(&path, "agent-a-claims-b").unwrap();
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    denied(&e, "bound to node node-b");
    // A workload's own account may not impersonate.
    std::fs::write(&path, "cart").unwrap();
    let e = ask(&c, &id("shop", "web"), true, MAX_TTL)
        .await
        .unwrap_err();
    denied(&e, "not a trusted node agent");
    // ...but gets its own identity.
    ask(&c, &cart, false, MAX_TTL)
        .await
        .expect("cart's own identity");
    // A token for another audience.
    std::fs::write(&path, "agent-a-other-audience").unwrap();
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(matches!(e, CaClientError::Unauthenticated { .. }), "{e}");
    // An unknown token, and none at all.
    std::fs::write(&path, "forged").unwrap();
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(
        matches!(&e, CaClientError::Unauthenticated { message, .. } if message.contains("invalid bearer token")),
        "{e}"
    );
    std::fs::write(&path, "").unwrap();
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(matches!(e, CaClientError::BadToken { .. }), "{e}");

    // The server acts on the impersonation metadata, not on the CSR: a CSR
    // for cart without the metadata asks for the caller's own identity
    // (mesh-agent), and the CSR may not name anything else.
    std::fs::write(&path, "agent-a").unwrap();
    let (csr, _) = generate_csr(&cart).unwrap();
    let e = c.create_certificate(&csr, None, MAX_TTL).await.unwrap_err();
    match &e {
        CaClientError::Refused { code, message, .. } => {
            assert_eq!(*code, tonic::Code::InvalidArgument);
            assert!(
                message.contains("spiffe://cluster.local/ns/mesh-system/sa/mesh-agent"),
                "{e}"
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other}"),
    }
    // The same CSR with the metadata naming a pod of node-b: refused for the
    // node, whatever the CSR says.
    let e = c
        .create_certificate(&csr, Some(&id("shop", "web")), MAX_TTL)
        .await
        .unwrap_err();
    denied(&e, "shop/web");
    // With the metadata naming cart, it is cart's certificate.
    let chain = c
        .create_certificate(&csr, Some(&cart), MAX_TTL)
        .await
        .unwrap();
    let der = pem_chain_to_der(&chain).unwrap();
    assert_eq!(peer_identity(&der[..1]).unwrap(), cart);

    server.shutdown().await.unwrap();
}

/// Two requests at once, then one every ~17 minutes: the third request of
/// a key in a test is over the limit however slow the machine.
fn two_then_limited(cfg: &mut CaServerConfig) {
    cfg.rate_per_node = 0.001;
    cfg.rate_burst = 2;
}

/// A pod on a node (every pod-bound token names its node) spends its own
/// budget, not its node agent's; a source whose tokens keep failing
/// authentication is paused before each costs the API server a
/// TokenReview.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_pod_cannot_spend_its_agents_budget_nor_a_bad_token_the_api() {
    let ca = mesh_ca("tenant-limits");
    let api = cluster().await;
    let server = serve(&ca, &api, two_then_limited).await;
    let dir = Tmp::new("tenant-limits-token");
    let path = token(&dir, "cart");
    let c = client(&ca, server.local_addr(), &path);
    let cart = id("shop", "cart");
    ask(&c, &cart, false, MAX_TTL).await.unwrap();
    ask(&c, &cart, false, MAX_TTL).await.unwrap();
    let e = ask(&c, &cart, false, MAX_TTL).await.unwrap_err();
    assert!(
        matches!(&e, CaClientError::RateLimited { message, .. } if message.contains("node/node-a/sa/shop/cart")),
        "{e}"
    );
    // The agent on the same node still has its whole budget.
    std::fs::write(&path, "agent-a").unwrap();
    ask(&c, &cart, true, MAX_TTL).await.unwrap();
    // Two tokens the API refuses, then the source is paused unheard.
    let reviews = "POST /apis/authentication.k8s.io/v1/tokenreviews";
    std::fs::write(&path, "nobody").unwrap();
    let before = api.count(reviews);
    for _ in 0..2 {
        let e = ask(&c, &cart, false, MAX_TTL).await.unwrap_err();
        assert!(matches!(e, CaClientError::Unauthenticated { .. }), "{e}");
    }
    let e = ask(&c, &cart, false, MAX_TTL).await.unwrap_err();
    assert!(
        matches!(&e, CaClientError::RateLimited { message, .. } if message.contains("source/127.0.0.1")),
        "{e}"
    );
    assert_eq!(
        api.count(reviews) - before,
        2,
        "a paused source cost a TokenReview"
    );
    server.shutdown().await.unwrap();
}

/// Holding a connection needs no certificate: one source address holds at
/// most its share (`max_connections_per_source`); beyond, a connection is
/// closed at once, and a freed slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_at_most_its_share_of_connections() {
    use tokio::io::AsyncReadExt;
    let ca = mesh_ca("per-source");
    let api = cluster().await;
    let server = serve(&ca, &api, |cfg| cfg.max_connections_per_source = 2).await;
    let addr = server.local_addr();
    let idle = || tokio::net::TcpStream::connect(addr);
    let (first, _second) = (idle().await.unwrap(), idle().await.unwrap());
    let mut third = idle().await.unwrap();
    let mut buf = [0u8; 16];
    // At once: well within the TLS handshake deadline (10 s) that would
    // close it anyway.
    let closed = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a connection beyond the source's share was kept: {closed:?}"
    );
    // Freed: a client of the same source is served again.
    drop(first);
    let dir = Tmp::new("per-source-token");
    let c = client(&ca, addr, &token(&dir, "agent-a"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ask(&c, &id("shop", "cart"), true, MAX_TTL).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the freed slot never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

/// A caller repeating a valid token (a flood from one pod) costs the API
/// server one TokenReview, and meets its rate limit unreviewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_token_costs_one_token_review() {
    let ca = mesh_ca("review-cache");
    let api = cluster().await;
    let server = serve(&ca, &api, two_then_limited).await;
    let dir = Tmp::new("review-cache-token");
    let c = client(&ca, server.local_addr(), &token(&dir, &jwt("cart")));
    let cart = id("shop", "cart");
    let reviews = "POST /apis/authentication.k8s.io/v1/tokenreviews";
    let before = api.count(reviews);
    ask(&c, &cart, false, MAX_TTL).await.unwrap();
    ask(&c, &cart, false, MAX_TTL).await.unwrap();
    for _ in 0..5 {
        let e = ask(&c, &cart, false, MAX_TTL).await.unwrap_err();
        assert!(matches!(e, CaClientError::RateLimited { .. }), "{e}");
    }
    assert_eq!(api.count(reviews) - before, 1, "one review for one token");
    // A token without a readable expiry is reviewed each time: how long
    // it may be believed is unknown.
    let opaque = client(&ca, server.local_addr(), &token(&dir, "agent-a"));
    let before = api.count(reviews);
    for _ in 0..2 {
        ask(&opaque, &cart, true, MAX_TTL).await.unwrap();
    }
    assert_eq!(api.count(reviews) - before, 2);
    server.shutdown().await.unwrap();
}

/// Requests with one token arriving together, before any review of it is
/// kept (an agent asking for all its pods at start), cost one TokenReview:
/// they wait for the first one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_with_a_token_share_one_review() {
    let ca = mesh_ca("review-shared");
    let api = cluster().await;
    let server = serve(&ca, &api, |_| {}).await;
    let dir = Tmp::new("review-shared-token");
    let c = client(&ca, server.local_addr(), &token(&dir, &jwt("cart")));
    let cart = id("shop", "cart");
    let reviews = "POST /apis/authentication.k8s.io/v1/tokenreviews";
    let before = api.count(reviews);
    // The review takes long enough for all eight to arrive meanwhile.
    api.set_delay(Duration::from_millis(1500));
    for r in ask_together(&c, &cart, 8).await {
        r.expect("issued");
    }
    assert_eq!(
        api.count(reviews) - before,
        1,
        "one review for eight requests"
    );
    api.set_delay(Duration::ZERO);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_per_node_and_an_api_outage_fails_closed() {
    let ca = mesh_ca("limits");
    let api = cluster().await;
    // Every request reviewed: the outage below meets the TokenReview.
    let server = serve(&ca, &api, |cfg| {
        two_then_limited(cfg);
        cfg.token_review_cache = Duration::ZERO;
    })
    .await;
    let dir = Tmp::new("limits-token");
    let path = token(&dir, "agent-a");
    let c = client(&ca, server.local_addr(), &path);
    let cart = id("shop", "cart");
    ask(&c, &cart, true, MAX_TTL).await.unwrap();
    ask(&c, &cart, true, MAX_TTL).await.unwrap();
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(
        matches!(&e, CaClientError::RateLimited { message, .. } if message.contains("node/node-a")),
        "{e}"
    );
    // Node-b has its own budget.
    std::fs::write(&path, "agent-b").unwrap();
    ask(&c, &id("shop", "web"), true, MAX_TTL).await.unwrap();

    // The API server is down: refused as UNAVAILABLE, never issued.
    api.set_outage(true);
    let e = ask(&c, &id("shop", "web"), true, MAX_TTL)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CaClientError::Unavailable { message, .. } if message.contains("TokenReview")),
        "{e}"
    );
    api.set_outage(false);
    ask(&c, &id("shop", "web"), true, MAX_TTL)
        .await
        .expect("back after the outage");
    assert!(api.count("POST /apis/authentication.k8s.io/v1/tokenreviews") >= 5);

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_verifies_the_ca_and_says_what_failed() {
    let ca = mesh_ca("tls");
    let api = cluster().await;
    let server = serve(&ca, &api, |_| {}).await;
    let dir = Tmp::new("tls-token");
    let path = token(&dir, "agent-a");
    let cart = id("shop", "cart");

    // The wrong name: the server's certificate is for DNS_NAME.
    let c = client_with(
        ca.ca.roots().to_vec(),
        server.local_addr(),
        &path,
        Some("istiod.istio-system.svc"),
    );
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(matches!(e, CaClientError::Tls { .. }), "{e}");
    // Another mesh's root.
    let other = mesh_ca("tls-other");
    let c = client_with(
        other.ca.roots().to_vec(),
        server.local_addr(),
        &path,
        Some(DNS_NAME),
    );
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    match &e {
        CaClientError::Tls { reason, .. } => assert!(reason.contains("UnknownIssuer"), "{e}"),
        other => panic!("expected a TLS error, got {other}"),
    }
    // A token file that is not there.
    let c = client(&ca, server.local_addr(), &dir.0.join("missing"));
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(matches!(e, CaClientError::TokenFile { .. }), "{e}");

    // Nothing listening: a port just released here (the stopped server's
    // listener may still be closing, and then answers with a reset).
    server.shutdown().await.unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let c = client(&ca, addr, &path);
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(matches!(e, CaClientError::Unreachable { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_and_a_slow_api_fails_closed() {
    let ca = mesh_ca("busy");
    let api = cluster().await;
    let server = serve(&ca, &api, |cfg| {
        cfg.max_concurrent_requests = 1;
        // The slot stays taken this long: the second request below comes on
        // the same HTTP/2 connection well within it, even on a loaded machine.
        cfg.api_timeout = Duration::from_secs(5);
    })
    .await;
    let dir = Tmp::new("busy-token");
    let c = client(&ca, server.local_addr(), &token(&dir, "agent-a"));
    let cart = id("shop", "cart");
    // Every API answer now comes after the server's API deadline.
    api.set_delay(Duration::from_secs(30));
    let slow = {
        let c = c.clone();
        let cart = cart.clone();
        tokio::spawn(async move { ask(&c, &cart, true, MAX_TTL).await })
    };
    // Once its TokenReview reached the API server, the one slot is taken.
    let reviews = "POST /apis/authentication.k8s.io/v1/tokenreviews";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.count(reviews) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never reached the API"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = ask(&c, &cart, true, MAX_TTL).await.unwrap_err();
    assert!(
        matches!(&e, CaClientError::Unavailable { message, .. } if message.contains("handling 1 requests")),
        "{e}"
    );
    assert_eq!(
        api.count(reviews),
        1,
        "a refused request costs the API nothing"
    );
    // The slow one is refused at the API deadline, not issued.
    let e = slow.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, CaClientError::Unavailable { message, .. } if message.contains("no answer within")),
        "{e}"
    );
    api.set_delay(Duration::ZERO);
    ask(&c, &cart, true, MAX_TTL).await.expect("served again");
    server.shutdown().await.unwrap();
}

/// Stops the child on drop (a failed assertion must not leave it running).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_with_its_flags_and_stops_on_sigterm() {
    let ca = mesh_ca("binary");
    let api = cluster().await;
    let dir = Tmp::new("binary-token");
    // A free port (released for the child to bind).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["ca", "serve", "--listen", &addr.to_string()])
            .args(["--dns-name", "other.name", "--dns-name", DNS_NAME])
            .args(["--max-cert-ttl", "1h", "--min-cert-ttl", "2m"])
            .args(["--node-service-account", "mesh-system/mesh-agent"])
            .args(["--api-server", &api.url()])
            .env("MESH_CA_DIR", ca.dir.0.join("ca"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client(&ca, addr, &token(&dir, "agent-a"));
    let cart = id("shop", "cart");
    // Until the child listens, the client cannot connect.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (cert, chain) = loop {
        match ask(&c, &cart, true, Duration::from_secs(48 * 3600)).await {
            Ok(issued) => break issued,
            Err(CaClientError::Unreachable { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the binary did not serve: {e}"),
        }
    };
    verifies_to_root(&chain, &ca);
    assert!(cert.not_after() <= SystemTime::now() + MAX_TTL + Duration::from_secs(1));
    let e = ask(&c, &id("shop", "web"), true, MAX_TTL)
        .await
        .unwrap_err();
    denied(&e, "node node-a");

    // SIGTERM: a clean exit.
    let mut child = child;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

/// When the review the others wait for fails (here: an API outage), the
/// waiting requests each ask for themselves at once, and all fail within
/// about one API deadline, not one deadline after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_failed_review_fail_together_not_in_turn() {
    let ca = mesh_ca("review-shared-fail");
    let api = cluster().await;
    let server = serve(&ca, &api, |cfg| cfg.api_timeout = Duration::from_secs(2)).await;
    let dir = Tmp::new("review-shared-fail-token");
    let c = client(&ca, server.local_addr(), &token(&dir, &jwt("cart")));
    let cart = id("shop", "cart");
    api.set_delay(Duration::from_secs(30));
    let started = std::time::Instant::now();
    for r in ask_together(&c, &cart, 4).await {
        let e = r.unwrap_err();
        assert!(matches!(e, CaClientError::Unavailable { .. }), "{e}");
    }
    // In turn, the last would fail after 4 deadlines (8 s).
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    api.set_delay(Duration::ZERO);
    server.shutdown().await.unwrap();
}
