//! The waypoint end to end, without root: real HBONE tunnels (mTLS with
//! certificates of a test mesh CA, HTTP/2 CONNECT to a service VIP) into a
//! waypoint started in-process on 127.0.0.1, HTTP/1.1 and HTTP/2 inside
//! them, real backend servers on 127.0.0.1.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use mesh_agent::identity::SpiffeId;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WEB_VIP: &str = "10.96.0.10:80";
const ECHO_VIP: &str = "10.96.0.11:7000";
const HTTP_ONLY_VIP: &str = "10.96.0.12:80";

/// Backends: v1, v2 (the web service's canary versions), an echo server.
struct Backends {
    v1: SocketAddr,
    v2: SocketAddr,
    echo: SocketAddr,
}

async fn backends() -> Backends {
    Backends {
        v1: http_backend("v1").await,
        v2: http_backend("v2").await,
        echo: echo_backend().await,
    }
}

fn config(b: &Backends) -> String {
    let (v1, v2, echo) = (b.v1.port(), b.v2.port(), b.echo.port());
    format!(
        r#"
services:
  - name: web
    namespace: default
    addresses: [10.96.0.10]
    ports: [{{ port: 80, targetPort: {v1} }}]
    endpoints: [{{ address: 127.0.0.1, workload: web-v1, serviceAccount: web, labels: {{ app: web, version: v1 }} }}]
  - name: web-v1
    namespace: default
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v1}, workload: web-v1, serviceAccount: web, labels: {{ app: web, version: v1 }} }}]
  - name: web-v2
    namespace: default
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v2}, workload: web-v2, serviceAccount: web, labels: {{ app: web, version: v2 }} }}]
  - name: echo
    namespace: default
    addresses: [10.96.0.11]
    ports: [{{ port: 7000 }}]
    endpoints: [{{ address: 127.0.0.1, port: {echo}, workload: echo }}]
  - name: strict
    namespace: default
    addresses: [10.96.0.12]
    ports: [{{ port: 80, protocol: http }}]
    endpoints: [{{ address: 127.0.0.1, port: {echo}, workload: echo }}]
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: web, namespace: default }}
    spec:
      parentRefs: [{{ group: "", kind: Service, name: web, port: 80 }}]
      rules:
        - matches: [{{ headers: [{{ name: x-canary, value: "true" }}] }}]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {{ set: [{{ name: x-route, value: canary }}], remove: [x-secret] }}
            - type: ResponseHeaderModifier
              responseHeaderModifier: {{ add: [{{ name: x-served-by, value: waypoint }}], remove: [x-internal] }}
          backendRefs: [{{ name: web-v2, port: 80 }}]
        - matches: [{{ path: {{ type: PathPrefix, value: /api }}, method: GET }}]
          backendRefs: [{{ name: web-v2, port: 80 }}]
        - matches: [{{ path: {{ type: RegularExpression, value: "/items/[0-9]+" }} }}]
          backendRefs: [{{ name: web-v2, port: 80 }}]
        - matches: [{{ queryParams: [{{ name: version, value: two }}] }}]
          backendRefs: [{{ name: web-v2, port: 80 }}]
        - matches: [{{ path: {{ type: PathPrefix, value: /hang }} }}]
          timeouts: {{ request: 300ms }}
          backendRefs: [{{ name: web-v1, port: 80 }}]
        - matches: [{{ path: {{ type: PathPrefix, value: /mirror }} }}]
          filters: [{{ type: ExtensionRef, extensionRef: {{ group: example.com, kind: Filter, name: x }} }}]
          backendRefs: [{{ name: web-v1, port: 80 }}]
        - matches: [{{ path: {{ type: PathPrefix, value: / }} }}]
          backendRefs: [{{ name: web-v1, port: 80, weight: 90 }}, {{ name: web-v2, port: 80, weight: 10 }}]
        - matches: [{{ path: {{ type: Exact, value: /only-v1 }} }}]
          backendRefs: [{{ name: web-v1, port: 80 }}]
        - matches: [{{ path: {{ type: PathPrefix, value: /moved }} }}]
          filters:
            - type: RequestRedirect
              requestRedirect: {{ scheme: https, hostname: elsewhere.example, statusCode: 301, path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /here }} }}
        - matches: [{{ path: {{ type: PathPrefix, value: /old }} }}]
          filters:
            - type: URLRewrite
              urlRewrite: {{ hostname: new.example, path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /new }} }}
          backendRefs: [{{ name: web-v1, port: 80 }}]
"#
    )
}

struct Setup {
    _backends: Backends,
    waypoint: mesh_waypoint::Running,
    client: MeshClient,
    ca: std::sync::Arc<mesh_agent::identity::LocalCa>,
}

async fn setup() -> Setup {
    let b = backends().await;
    let ca = issuer();
    let waypoint = waypoint(ca.clone(), &config(&b)).await;
    let client = MeshClient::new(ca.clone(), CLIENT_ID, waypoint.hbone).await;
    Setup {
        _backends: b,
        waypoint,
        client,
        ca,
    }
}

fn vip(s: &str) -> SocketAddr {
    s.parse().expect("vip")
}

fn backend(a: &Answer) -> &str {
    a.body.split(' ').next().unwrap_or("")
}

/// A request path, its headers, the backend that must answer (`?`: either).
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Path, method, regex, query and header matches pick their rule's backend,
/// over either HTTP version.
async fn routes_by_match(http2: bool) {
    let s = setup().await;
    let mut c = s.client.http(vip(WEB_VIP), http2).await;
    let cases: [Case; 7] = [
        ("/only-v1", &[], "v1"),
        ("/api/users", &[], "v2"),
        ("/apiary", &[("x-canary", "false")], "?"), // the 90/10 rule: either
        ("/items/42", &[], "v2"),
        ("/items/4x", &[], "?"),
        ("/other?version=two", &[], "v2"),
        ("/other", &[("x-canary", "true")], "v2"),
    ];
    for (path, headers, want) in cases {
        let a = c.get(path, headers).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        if want != "?" {
            assert_eq!(backend(&a), want, "{path} {headers:?}: {a:?}");
        }
        // The backend saw the client's path and the service's host.
        assert!(
            a.body.contains(path.split('?').next().unwrap_or(path)),
            "{a:?}"
        );
        assert_eq!(
            a.headers
                .get("x-echo-host")
                .map(|v| v.to_str().unwrap_or("")),
            Some("web.default.svc.cluster.local"),
            "{a:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_are_routed_by_path_method_regex_query_and_header() {
    routes_by_match(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_requests_are_routed_the_same() {
    routes_by_match(true).await;
}

/// 90/10 over N = 1000 requests: v1's count is Binomial(1000, 0.9), mean
/// 900, sd sqrt(1000 * 0.9 * 0.1) = 9.49. The tolerance ±60 is 6.3 sd: a
/// correct split falls outside with probability below 1e-9, while a 50/50
/// or 100/0 split (mean 500 or 1000) cannot fall inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_weighted_split_lands_within_six_standard_deviations() {
    let s = setup().await;
    let mut c = s.client.http(vip(WEB_VIP), false).await;
    let (mut v1, mut v2) = (0u32, 0u32);
    for _ in 0..1000 {
        let a = c.get("/", &[]).await;
        match backend(&a) {
            "v1" => v1 += 1,
            "v2" => v2 += 1,
            other => panic!("unexpected backend {other:?}: {a:?}"),
        }
    }
    assert_eq!(v1 + v2, 1000);
    assert!((840..=960).contains(&v1), "v1 got {v1} of 1000, v2 {v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_and_the_tunnel_keeps_serving() {
    let s = setup().await;
    for http2 in [false, true] {
        let mut c = s.client.http(vip(WEB_VIP), http2).await;
        // The backend never answers /hang: only the route's 300 ms timeout
        // ends the request (the guard turns a missing timeout into a failure).
        let a = tokio::time::timeout(Duration::from_secs(60), c.get("/hang", &[]))
            .await
            .expect("the route timeout did not fire");
        assert_eq!(a.status, 504, "{a:?}");
        let a = c.get("/only-v1", &[]).await;
        assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers_change_the_request_and_the_response() {
    let s = setup().await;
    for http2 in [false, true] {
        let mut c = s.client.http(vip(WEB_VIP), http2).await;
        let a = c
            .get(
                "/",
                &[
                    ("x-canary", "true"),
                    ("x-route", "client"),
                    ("x-secret", "s"),
                ],
            )
            .await;
        assert_eq!((a.status.as_u16(), backend(&a)), (200, "v2"), "{a:?}");
        let h = |n: &str| {
            a.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        // Request: set replaced the client's value; remove took x-secret out.
        assert_eq!(h("x-echo-x-route").as_deref(), Some("canary"));
        assert_eq!(h("x-echo-x-secret"), None);
        // Response: add, and remove of the backend's x-internal.
        assert_eq!(h("x-served-by").as_deref(), Some("waypoint"));
        assert_eq!(h("x-internal"), None);
        assert_eq!(h("x-backend").as_deref(), Some("v2"));
        // Without the rule, x-internal passes.
        let a = c.get("/only-v1", &[]).await;
        assert_eq!(
            a.headers.get("x-internal").and_then(|v| v.to_str().ok()),
            Some("secret")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_rewrite_replaces_the_prefix_by_path_element_and_the_host() {
    let s = setup().await;
    for http2 in [false, true] {
        let mut c = s.client.http(vip(WEB_VIP), http2).await;
        for (path, seen) in [
            ("/old/x", "/new/x"),
            ("/old", "/new"),
            ("/old/", "/new/"),
            ("/oldish", "?"),
        ] {
            let a = c.get(path, &[]).await;
            assert_eq!(a.status, 200, "{a:?}");
            if seen == "?" {
                // Not the /old prefix (whole path elements): another rule, no rewrite.
                assert!(a.body.contains(" /oldish "), "{a:?}");
                continue;
            }
            assert_eq!(a.body, format!("v1 {seen} 0"), "{path}: {a:?}");
            assert_eq!(
                a.headers.get("x-echo-host").and_then(|v| v.to_str().ok()),
                Some("new.example")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_redirect_answers_with_a_location_and_no_backend() {
    let s = setup().await;
    let mut c = s.client.http(vip(WEB_VIP), false).await;
    let a = c.get("/moved/page?x=1", &[]).await;
    assert_eq!(a.status, 301, "{a:?}");
    assert_eq!(
        a.headers.get("location").and_then(|v| v.to_str().ok()),
        Some("https://elsewhere.example/here/page?x=1")
    );
    assert_eq!(a.headers.get("x-backend"), None);
}

/// Whether the server closed `c` (it was over the cap) rather than
/// holding it, waiting for a request.
async fn is_closed(mut c: TcpStream) -> bool {
    let mut buf = [0u8; 1];
    // Within the admin listeners' 10 s request-head deadline that would
    // close it anyway.
    let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await;
    matches!(r, Ok(Ok(0) | Err(_)))
}

/// Waits until a new connection to `addr` is held (a slot is free: the
/// server frees a slot when its task sees the close, which can come after
/// the next accept).
async fn wait_held(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let probe = TcpStream::connect(addr).await.expect("connect");
        if !is_closed(probe).await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the freed slot never served"
        );
    }
}

/// `n` connections to `addr`, held open.
async fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    held
}

/// The metrics listener (reachable by any pod in a cluster) serves
/// readiness and metrics, never the configuration dump, which names the
/// policies guarding each service; each admin listener holds at most its
/// cap of connections, and a freed slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_no_config_dump_and_listeners_are_capped() {
    let mut s = setup().await;
    let metrics = s
        .waypoint
        .serve_metrics("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("metrics listener");
    // The cap first, on a listener no one has used: each held connection
    // has a slot. Idle connections up to the cap are held, the next is
    // closed.
    let mut held = hold(metrics, mesh_waypoint::admin::MAX_CONNECTIONS).await;
    let beyond = TcpStream::connect(metrics).await.expect("connect");
    assert!(
        is_closed(beyond).await,
        "a connection beyond the cap was held"
    );
    // Freeing one held connection's slot lets a new one in (after the
    // server sees the close).
    drop(held.pop());
    wait_held(metrics).await;
    // The rest, once the held connections' slots are free.
    drop(held);
    wait_held(metrics).await;
    assert_eq!(admin_get(metrics, "/healthz/ready").await, "ready\n");
    assert!(admin_get(metrics, "/metrics").await.contains("# EOF"));
    assert_eq!(admin_get(metrics, "/config_dump").await, "not found\n");
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(s.waypoint.admin, "/config_dump").await).expect("json");
    assert!(dump["identity"].is_string(), "{dump}");
}

/// A connection to `addr` from the loopback address `source`.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind a loopback source");
    socket.connect(addr).await.expect("connect")
}

/// The readiness listener (the kubelet's probes) answers the kubelet
/// however many connections pods hold open on it: capped in all like the
/// metrics listener, a pod holding 64 would get the waypoint marked
/// unready and restarted. Instead it caps each source address (4), holds
/// a connection at most 2 s without a request head and serves one request
/// per connection, so a slot is never held long. It serves readiness only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_listener_is_capped_per_source_and_serves_readiness_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = setup().await;
    let readiness = s
        .waypoint
        .serve_readiness("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("readiness listener");
    // 32 other sources hold 4 connections each: more than the metrics
    // listener's whole cap.
    let mut held = Vec::new();
    for i in 0..32u8 {
        for _ in 0..4 {
            held.push(connect_from([127, 0, 1, i + 1], readiness).await);
        }
    }
    // One source's fifth connection is closed at once (well inside the
    // 2 s request-head deadline that closes idle ones anyway).
    let mut beyond = connect_from([127, 0, 1, 1], readiness).await;
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_millis(300), beyond.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a fifth connection from one source was held: {closed:?}"
    );
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        admin_get(readiness, "/healthz/ready"),
    )
    .await
    .expect("readiness answered with the held connections open");
    assert_eq!(probe, "ready\n");
    // Held connections that send nothing are closed after 2 s (the 3 s of
    // `is_closed` run from here; they were opened before).
    assert!(
        is_closed(held.pop().expect("held")).await,
        "an idle connection outlived the request-head deadline"
    );
    drop(held);
    // One request per connection: of two pipelined, only the first is
    // answered, and the server closes.
    let mut c = connect_from([127, 0, 2, 1], readiness).await;
    c.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("requests");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the connection stayed open after its answer");
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
    assert_eq!(admin_get(readiness, "/metrics").await, "not found\n");
    assert_eq!(admin_get(readiness, "/config_dump").await, "not found\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_filters_answer_500_and_are_listed_in_config_dump() {
    let s = setup().await;
    let mut c = s.client.http(vip(WEB_VIP), false).await;
    let a = c.get("/mirror/x", &[]).await;
    assert_eq!(a.status, 500, "{a:?}");
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(s.waypoint.admin, "/config_dump").await).expect("json");
    let unsupported = dump["routes"]["unsupported"].as_array().expect("list");
    assert!(
        unsupported
            .iter()
            .any(|u| u["field"] == "spec.rules[5].filters[0]"
                && u["effect"] == "rule_fails"
                && u["route"] == "default/web"),
        "{dump:#}"
    );
    assert_eq!(dump["routes"]["accepted"][0], "default/web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_with_istio_labels() {
    let s = setup().await;
    let mut c = s.client.http(vip(WEB_VIP), false).await;
    for _ in 0..3 {
        assert_eq!(c.get("/only-v1", &[]).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(c.get("/api/x", &[]).await.status, 200);
    }
    assert_eq!(c.get("/hang", &[]).await.status, 504);
    let count = |m: &str, version: &str, code: &str| {
        requests_total(m)
            .into_iter()
            .filter(|(l, _)| l["destination_version"] == version && l["response_code"] == code)
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    let m = wait_metrics(s.waypoint.admin, |m| {
        count(m, "v1", "200") == 3 && count(m, "v2", "200") == 2 && count(m, "v1", "504") == 1
    })
    .await;
    let samples = requests_total(&m);
    assert_eq!(samples.len(), 3, "{m}");
    let (v1, _) = samples
        .iter()
        .find(|(l, _)| l["destination_version"] == "v1" && l["response_code"] == "200")
        .expect("v1 sample");
    let expect = [
        ("reporter", "waypoint"),
        ("source_principal", CLIENT_ID),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("destination_workload", "web-v1"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/web",
        ),
        ("destination_app", "web"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (k, v) in expect {
        assert_eq!(v1.get(k).map(String::as_str), Some(v), "{k} in {v1:?}");
    }
    let (timed_out, _) = samples
        .iter()
        .find(|(l, _)| l["response_code"] == "504")
        .expect("504 sample");
    assert_eq!(timed_out["response_flags"], "UT");
    assert!(
        m.contains("istio_request_duration_milliseconds_bucket{"),
        "{m}"
    );
    assert!(m.contains("istio_request_bytes_count{"), "{m}");
    assert!(m.contains("istio_response_bytes_sum{"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_http_stream_is_relayed_as_tcp() {
    let s = setup().await;
    let mut t = s.client.tunnel(vip(ECHO_VIP)).await.expect("tunnel");
    let message = b"\x00\x01 not http at all\n";
    t.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    t.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, message);
    // A port declared HTTP does not carry it.
    let mut t = s.client.tunnel(vip(HTTP_ONLY_VIP)).await.expect("tunnel");
    t.write_all(message).await.expect("write");
    let mut buf = [0u8; 8];
    assert_eq!(
        t.read(&mut buf).await.unwrap_or(0),
        0,
        "the HTTP-only port relayed TCP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_mesh_certificate_are_refused() {
    let s = setup().await;
    // A certificate of another CA, with a plausible identity.
    let other = issuer();
    let id = SpiffeId::parse(CLIENT_ID).expect("id");
    let foreign = other.issue_now(&id).expect("foreign cert");
    let target = vip(WEB_VIP);
    let r = open_tunnel(rogue_config(Some(&foreign)), s.waypoint.hbone, target).await;
    assert!(r.is_err(), "a foreign certificate got a tunnel");
    // No certificate at all.
    let r = open_tunnel(rogue_config(None), s.waypoint.hbone, target).await;
    assert!(r.is_err(), "a client without a certificate got a tunnel");
    // The control: the same rogue client with a valid mesh certificate passes.
    let valid = s.ca.issue_now(&id).expect("cert");
    let r = open_tunnel(rogue_config(Some(&valid)), s.waypoint.hbone, target).await;
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_an_address_that_is_not_a_service_is_refused() {
    let s = setup().await;
    let r = s.client.tunnel(vip("10.96.0.99:80")).await;
    assert_eq!(
        r.err().as_deref(),
        Some("CONNECT answered 503 Service Unavailable")
    );
}

/// Istio `VirtualService` routes: first match in order, retries with a budget.
mod virtual_service {
    use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};

    use super::*;

    const API_VIP: &str = "10.96.1.10:80";

    fn config(v1: SocketAddr, v2: SocketAddr) -> String {
        let (v1, v2) = (v1.port(), v2.port());
        format!(
            r#"
services:
  - {{ name: api, namespace: default, addresses: [10.96.1.10], ports: [{{ port: 80 }}], endpoints: [] }}
  - name: api-v1
    namespace: default
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v1}, workload: api-v1, labels: {{ version: v1 }} }}]
  - name: api-v2
    namespace: default
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v2}, workload: api-v2, labels: {{ version: v2 }} }}]
routes:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: api, namespace: default }}
    spec:
      hosts: [api]
      http:
        - match: [{{ headers: {{ x-canary: {{ exact: "true" }} }} }}]
          headers: {{ response: {{ set: {{ x-vs: canary }} }} }}
          route: [{{ destination: {{ host: api-v2 }} }}]
        - match: [{{ uri: {{ prefix: /flaky }} }}]
          retries: {{ attempts: 2, retryOn: 5xx }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /fail }} }}]
          retries: {{ attempts: 3, retryOn: "5xx,connect-failure,reset" }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /no-retry-fail }} }}]
          retries: {{ attempts: 0 }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /hang }} }}]
          timeout: 5s
          retries: {{ attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error }}
          route: [{{ destination: {{ host: api-v1, port: {{ number: 80 }} }} }}]
        - match: [{{ uri: {{ prefix: /mirrored }} }}]
          directResponse: {{ status: 200 }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /faulty }} }}]
          fault: {{ abort: {{ httpStatus: 418, percentage: {{ value: 100 }} }} }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /half }} }}]
          fault: {{ abort: {{ httpStatus: 503, percentage: {{ value: 50 }} }} }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /delayed }} }}]
          fault: {{ delay: {{ fixedDelay: 1ms, percentage: {{ value: 100 }} }} }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /shadowed }} }}]
          mirror: {{ host: api-v2 }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /legacy }} }}]
          rewrite: {{ uri: /v2api }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ exact: /v1-only }} }}]
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /grpc-unstable-no-retry }} }}]
          retries: {{ attempts: 2, retryOn: 5xx }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - match: [{{ uri: {{ prefix: /grpc-unstable }} }}]
          retries: {{ attempts: 2, retryOn: unavailable }}
          route: [{{ destination: {{ host: api-v1 }} }}]
        - route:
            - {{ destination: {{ host: api-v1 }}, weight: 90 }}
            - {{ destination: {{ host: api-v2 }}, weight: 10 }}
"#
        )
    }

    struct Vs {
        _w: mesh_waypoint::Running,
        admin: SocketAddr,
        client: MeshClient,
        v1_count: Arc<AtomicU64>,
        v2_count: Arc<AtomicU64>,
    }

    async fn setup() -> Vs {
        let (v1, v1_count) = counted_backend("v1").await;
        let (v2, v2_count) = counted_backend("v2").await;
        let ca = issuer();
        let w = waypoint(ca.clone(), &config(v1, v2)).await;
        let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
        Vs {
            admin: w.admin,
            _w: w,
            client,
            v1_count,
            v2_count,
        }
    }

    fn retries(m: &str, result: &str) -> u64 {
        let prefix = format!("mesh_waypoint_retries_total{{result=\"{result}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_match_in_order_with_header_operations_and_unsupported_fields_fail_visibly() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        let a = c.get("/v1-only", &[("x-canary", "true")]).await;
        // The header rule comes first in the VirtualService: it wins over the exact path.
        assert_eq!((a.status.as_u16(), backend(&a)), (200, "v2"), "{a:?}");
        assert_eq!(
            a.headers.get("x-vs").and_then(|v| v.to_str().ok()),
            Some("canary")
        );
        let a = c.get("/v1-only", &[]).await;
        assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
        assert_eq!(a.headers.get("x-vs"), None);
        // `directResponse` cannot be skipped: the route answers 500, and says why.
        assert_eq!(c.get("/mirrored", &[]).await.status, 500);
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(s.admin, "/config_dump").await).expect("json");
        let unsupported = dump["routes"]["unsupported"].as_array().expect("list");
        assert!(
            unsupported
                .iter()
                .any(|u| u["field"] == "spec.http[5].directResponse" && u["effect"] == "rule_fails"),
            "{dump:#}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_unavailable_is_retried_when_retry_on_names_it() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        let grpc = [("content-type", "application/grpc")];
        for i in 0..5 {
            let a = c.get("/grpc-unstable", &grpc).await;
            assert_eq!(
                a.headers.get("grpc-status").and_then(|v| v.to_str().ok()),
                Some("0"),
                "request {i}: {a:?}"
            );
        }
        // Each request: UNAVAILABLE, then the retry's OK.
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 10);
        wait_metrics(s.admin, |m| retries(m, "attempted") == 5).await;
        // A route retrying on 5xx only passes the gRPC error on.
        let a = c.get("/grpc-unstable-no-retry", &grpc).await;
        assert_eq!(
            a.headers.get("grpc-status").and_then(|v| v.to_str().ok()),
            Some("14"),
            "{a:?}"
        );
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 11);
        // Counted by their gRPC status (the trailers-only answers' headers).
        let grpc_count = |m: &str, status: &str| {
            requests_total(m)
                .iter()
                .filter(|(l, _)| {
                    l["request_protocol"] == "grpc" && l["grpc_response_status"] == status
                })
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        wait_metrics(s.admin, |m| {
            grpc_count(m, "0") == 5 && grpc_count(m, "14") == 1
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_turn_an_upstreams_alternate_503s_into_successes() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        // 10 requests needing one retry each fit the budget (reserve 10).
        for i in 0..10 {
            let a = c.get("/flaky", &[]).await;
            assert_eq!(
                (a.status.as_u16(), backend(&a)),
                (200, "v1"),
                "request {i}: {a:?}"
            );
        }
        // Each request: a 503, then the retry's 200.
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 20);
        let m = wait_metrics(s.admin, |m| retries(m, "attempted") == 10).await;
        assert_eq!(retries(&m, "budget_exhausted"), 0);
        // Without retries the 503 reaches the client.
        let a = c.get("/no-retry-fail", &[]).await;
        assert_eq!(a.status, 503);
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 21);
    }

    /// An upstream that always fails, 100 requests with `attempts: 3`:
    /// unbounded, 400 requests would reach it. The budget allows the
    /// reserve (10) plus 20 % of the requests (20): at most 130.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_retry_budget_keeps_retries_from_amplifying_an_outage() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        for _ in 0..100 {
            assert_eq!(c.get("/fail", &[]).await.status, 503);
        }
        let upstream = s.v1_count.load(Ordering::SeqCst);
        assert!(
            (110..=130).contains(&upstream),
            "{upstream} upstream requests"
        );
        let m = admin_get(s.admin, "/metrics").await;
        assert_eq!(retries(&m, "attempted"), upstream - 100, "{m}");
        assert!(retries(&m, "budget_exhausted") > 0, "{m}");
    }

    /// Abort at 100 % answers the status without the backend; abort at 50 %
    /// over N = 400: the aborted count is Binomial(400, 0.5), sd 10; the
    /// tolerance ±60 (6 sd) fails a correct share with probability < 1e-8,
    /// and 0 % or 100 % cannot pass. Delayed requests still succeed, counted
    /// with response_flags DI.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_injection_aborts_and_delays_the_configured_share() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        for _ in 0..5 {
            assert_eq!(c.get("/faulty", &[]).await.status, 418);
        }
        assert_eq!(
            s.v1_count.load(Ordering::SeqCst),
            0,
            "an abort reached the backend"
        );
        let mut aborted = 0u64;
        for _ in 0..400 {
            match c.get("/half", &[]).await.status.as_u16() {
                503 => aborted += 1,
                200 => {}
                other => panic!("status {other}"),
            }
        }
        assert!((140..=260).contains(&aborted), "{aborted} of 400 aborted");
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 400 - aborted);
        for _ in 0..3 {
            assert_eq!(c.get("/delayed", &[]).await.status, 200);
        }
        let flags = |m: &str, code: &str, flag: &str| {
            requests_total(m)
                .iter()
                .filter(|(l, _)| l["response_code"] == code && l["response_flags"] == flag)
                .map(|(_, v)| *v)
                .sum::<u64>()
        };
        let m = wait_metrics(s.admin, |m| flags(m, "200", "DI") == 3).await;
        assert_eq!(flags(&m, "418", "FI"), 5);
        assert_eq!(flags(&m, "503", "FI"), aborted);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rewrite_replaces_the_matched_prefix() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), true).await;
        let a = c.get("/legacy/items?id=7", &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.body, "v1 /v2api/items 0");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mirrored_requests_reach_the_mirror_and_the_client_gets_the_primary() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        for _ in 0..20 {
            let a = c.get("/shadowed", &[]).await;
            assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
        }
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 20);
        // The copies are sent in the background: wait for the waypoint to
        // count them sent, then the mirror backend has every one.
        let m = wait_metrics(s.admin, |m| {
            m.contains("mesh_waypoint_mirrors_total{result=\"sent\"} 20")
        })
        .await;
        assert!(!m.contains("result=\"skipped"), "{m}");
        assert_eq!(s.v2_count.load(Ordering::SeqCst), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_try_timeouts_are_retried_then_answer_504() {
        let s = setup().await;
        let mut c = s.client.http(vip(API_VIP), false).await;
        let a = tokio::time::timeout(Duration::from_secs(60), c.get("/hang", &[]))
            .await
            .expect("no timeout fired");
        assert_eq!(a.status, 504, "{a:?}");
        // The first try and its two retries each reached the backend.
        assert_eq!(s.v1_count.load(Ordering::SeqCst), 3);
        let m = wait_metrics(s.admin, |m| {
            requests_total(m)
                .iter()
                .any(|(l, v)| l["response_code"] == "504" && l["response_flags"] == "UT" && *v == 1)
        })
        .await;
        assert_eq!(retries(&m, "attempted"), 2);
    }
}

/// The `mesh-waypoint run` binary: CA directory, config file, listeners.
mod binary {
    use std::{path::PathBuf, process::Stdio, sync::Arc};

    use mesh_agent::identity::{LocalCa, MeshCa, TrustDomain};

    use super::*;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The child process, killed on drop.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A port free at the time of the call (the binary binds it just after).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_binary_serves_tunnels_with_its_ca_dir_and_config_file() {
        let dir = std::env::temp_dir().join(format!("mesh-waypoint-bin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let scratch = Scratch(dir.clone());
        let ca_dir = dir.join("ca");
        MeshCa::init_dir(&ca_dir, &TrustDomain::default(), 1).expect("ca init");
        let b = backends().await;
        let config = dir.join("waypoint.yaml");
        std::fs::write(&config, super::config(&b)).expect("config");
        let (hbone, admin) = (free_port(), free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-waypoint"))
            .args(["run", "--listen", &format!("127.0.0.1:{hbone}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--identity", WAYPOINT_ID, "--ca-dir"])
            .arg(&ca_dir)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mesh-waypoint");
        let _child = Child(child);
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");
        let mut ready = false;
        for _ in 0..200 {
            if TcpStream::connect(admin).await.is_ok()
                && admin_get(admin, "/healthz/ready").await == "ready\n"
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "mesh-waypoint never became ready");
        // A client with a certificate of the same CA directory.
        let ca = MeshCa::load_dir(&ca_dir).expect("load ca");
        let issuer = Arc::new(LocalCa::new(Arc::new(ca), TrustDomain::default()));
        let hbone: SocketAddr = format!("127.0.0.1:{hbone}").parse().expect("addr");
        let client = MeshClient::new(issuer, CLIENT_ID, hbone).await;
        for http2 in [false, true] {
            let mut c = client.http(vip(WEB_VIP), http2).await;
            let a = c.get("/only-v1", &[]).await;
            assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
        }
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(admin, "/config_dump").await).expect("json");
        assert_eq!(dump["identity"], WAYPOINT_ID);
        assert_eq!(dump["generation"], 1);
        // A changed file is applied: /only-v1 now goes to v2.
        let before = "value: /only-v1 } }]\n          backendRefs: [{ name: web-v1";
        let text = super::config(&b);
        assert!(text.contains(before), "the test edits a rule it knows");
        let edited = text.replace(before, &before.replace("web-v1", "web-v2"));
        std::fs::write(&config, edited).expect("rewrite config");
        let mut generation = 1;
        for _ in 0..200 {
            let dump: serde_json::Value =
                serde_json::from_str(&admin_get(admin, "/config_dump").await).expect("json");
            generation = dump["generation"].as_u64().unwrap_or(0);
            if generation == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(generation, 2, "the edited configuration was never applied");
        let mut c = client.http(vip(WEB_VIP), false).await;
        let a = c.get("/only-v1", &[]).await;
        assert_eq!((a.status.as_u16(), backend(&a)), (200, "v2"), "{a:?}");
        drop(scratch);
    }
}

/// Backends reached over HBONE: mTLS under the waypoint's identity,
/// the pod's identity required, CONNECT to the pod address.
mod hbone_backends {
    use super::*;

    const MESHED_VIP: &str = "10.96.2.10:80";
    const IMPOSTOR_VIP: &str = "10.96.2.11:80";
    const POD_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_to_hbone_endpoints_go_through_mtls_tunnels_under_the_waypoint_identity() {
        let v1 = http_backend("v1").await;
        let ca = issuer();
        let (agent, log) = pod_agent(ca.clone(), POD_ID, v1).await;
        // A pod agent presenting another identity than the endpoint's.
        let other = "spiffe://cluster.local/ns/default/sa/other";
        let (impostor, impostor_log) = pod_agent(ca.clone(), other, v1).await;
        // Port 1 of the pod address is closed: only a tunnel reaches v1.
        let config = format!(
            r#"
services:
  - name: meshed
    namespace: default
    addresses: [10.96.2.10]
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: 1, tunnel: hbone, hbonePort: {}, serviceAccount: web, workload: web-v1, labels: {{ version: v1 }} }}]
  - name: impostor
    namespace: default
    addresses: [10.96.2.11]
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.2, port: 1, tunnel: hbone, hbonePort: {}, serviceAccount: web }}]
"#,
            agent.port(),
            impostor.port()
        );
        let w = waypoint(ca.clone(), &config).await;
        let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
        for http2 in [false, true] {
            let mut c = client.http(vip(MESHED_VIP), http2).await;
            for _ in 0..5 {
                let a = c.get("/x", &[]).await;
                assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
            }
        }
        {
            let log = log.lock().expect("lock");
            assert!(!log.streams.is_empty());
            for (peer, target) in &log.streams {
                assert_eq!(
                    (peer.as_str(), target.as_str()),
                    (WAYPOINT_ID, "127.0.0.1:1")
                );
            }
            // Ten requests: backend connections pooled (keep-alive inside
            // the tunnel streams), tunnel streams on one TLS connection.
            assert!(log.streams.len() < 10, "{log:?}");
            assert_eq!(log.connections, 1, "{log:?}");
        }
        // The impostor's certificate is not the endpoint's identity: the
        // waypoint refuses it (503, connect failure) and sends nothing.
        let mut c = client.http(vip(IMPOSTOR_VIP), false).await;
        let a = c.get("/x", &[]).await;
        assert_eq!(a.status, 503, "{a:?}");
        assert!(impostor_log.lock().expect("lock").streams.is_empty());
        let m = wait_metrics(w.admin, |m| {
            requests_total(m)
                .iter()
                .any(|(l, _)| l["response_code"] == "503" && l["response_flags"] == "UF")
        })
        .await;
        assert!(m.contains("destination_version=\"v1\""), "{m}");
    }
}

/// An opaque TCP stream to a meshed endpoint goes over HBONE too (mTLS to
/// the pod's identity, as its agent requires; plain TCP would be refused
/// under STRICT), naming in `forwarded` the one client it carries, which
/// the pod's agent believes from a waypoint. Pooled HTTP streams name none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_streams_to_meshed_endpoints_are_tunnelled_and_name_their_client() {
    let echo = echo_backend().await;
    let ca = issuer();
    let (agent, log) = pod_agent(ca.clone(), "spiffe://cluster.local/ns/default/sa/db", echo).await;
    // Port 1 of the pod address is closed: only a tunnel reaches the echo.
    let config = format!(
        r#"
services:
  - name: db
    namespace: default
    addresses: [10.96.3.10]
    ports: [{{ port: 5432 }}]
    endpoints: [{{ address: 127.0.0.1, port: 1, tunnel: hbone, hbonePort: {}, serviceAccount: db }}]
"#,
        agent.port()
    );
    let w = waypoint(ca.clone(), &config).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut t = client.tunnel(vip("10.96.3.10:5432")).await.expect("tunnel");
    let message = b"\x00\x01 not http at all\n";
    t.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    t.read_exact(&mut back)
        .await
        .expect("echo through the tunnel");
    assert_eq!(&back, message);
    let log = log.lock().expect("lock");
    assert_eq!(
        log.streams,
        vec![(WAYPOINT_ID.to_owned(), "127.0.0.1:1".to_owned())]
    );
    let forwarded = log.forwarded.first().cloned().flatten().unwrap_or_default();
    assert!(
        forwarded.starts_with("for=\"127.0.0.1:"),
        "the client's address in forwarded: {forwarded:?}"
    );
}

/// A backend port declared `http2` gets HTTP/2 (prior knowledge) whatever the
/// client speaks; trailers-capable `te` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_backends_get_http2_from_http1_and_http2_clients() {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let h2c = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let te = req
                            .headers()
                            .get("te")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let text = format!("h2c {:?} te={te}", req.version());
                        // A gRPC call ends with its status in trailers.
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        let trailers = async move {
                            grpc.then(|| {
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                                Ok::<_, Infallible>(t)
                            })
                        };
                        let body = Full::new(Bytes::from(text)).with_trailers(trailers);
                        Ok::<_, Infallible>(http::Response::new(body))
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let config = format!(
        r#"
services:
  - name: grpc
    namespace: default
    addresses: [10.96.3.10]
    ports: [{{ port: 50051, protocol: grpc }}]
    endpoints: [{{ address: 127.0.0.1, port: {} }}]
"#,
        h2c.port()
    );
    let ca = issuer();
    let w = waypoint(ca.clone(), &config).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    for http2 in [false, true] {
        let mut c = client.http(vip("10.96.3.10:50051"), http2).await;
        let a = c.get("/svc/Method", &[("te", "trailers")]).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(
            a.body, "h2c HTTP/2.0 te=trailers",
            "client http2={http2}: {a:?}"
        );
    }
    // A gRPC call: counted as Istio counts it, request_protocol "grpc" and
    // the grpc-status of the backend's trailers.
    let mut c = client.http(vip("10.96.3.10:50051"), true).await;
    let grpc = [("te", "trailers"), ("content-type", "application/grpc")];
    assert_eq!(c.get("/svc/Method", &grpc).await.status, 200);
    let m = wait_metrics(w.admin, |m| {
        requests_total(m)
            .iter()
            .any(|(l, _)| l["request_protocol"] == "grpc")
    })
    .await;
    let mut statuses: Vec<(String, String, u64)> = requests_total(&m)
        .into_iter()
        .map(|(l, n)| {
            (
                l["request_protocol"].clone(),
                l["grpc_response_status"].clone(),
                n,
            )
        })
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            ("grpc".to_owned(), "0".to_owned(), 1),
            ("http".to_owned(), String::new(), 2),
        ],
        "{m}"
    );
}

/// The backend gets the caller's trace with the waypoint's span as parent;
/// a request without a trace gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_propagated_with_the_waypoints_span() {
    let s = setup().await;
    let mut c = s.client.http(vip(WEB_VIP), false).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a = c.get("/only-v1", &[("traceparent", incoming)]).await;
    let seen = a.headers["x-echo-traceparent"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the waypoint's span is the parent"
    );
    let a = c.get("/only-v1", &[]).await;
    let fresh = a.headers["x-echo-traceparent"].to_str().expect("ascii");
    assert_eq!(fresh.len(), 55, "{fresh}");
    assert!(!fresh.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
}

/// The classic Istio canary: one Service, a DestinationRule with subsets by
/// the `version` label, a VirtualService routing to the subsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_subsets_from_a_destination_rule_pick_endpoints_by_label() {
    let (v1, v2) = (http_backend("v1").await, http_backend("v2").await);
    let config = format!(
        r#"
services:
  - name: reviews
    namespace: default
    addresses: [10.96.4.10]
    ports: [{{ port: 9080 }}]
    endpoints:
      - {{ address: 127.0.0.1, port: {}, workload: reviews-v1, labels: {{ app: reviews, version: v1 }} }}
      - {{ address: 127.0.0.1, port: {}, workload: reviews-v2, labels: {{ app: reviews, version: v2 }} }}
routes:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: reviews, namespace: default }}
    spec:
      host: reviews
      trafficPolicy: {{ loadBalancer: {{ simple: ROUND_ROBIN }} }}
      subsets:
        - {{ name: v1, labels: {{ version: v1 }} }}
        - {{ name: v2, labels: {{ version: v2 }} }}
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: reviews, namespace: default }}
    spec:
      hosts: [reviews.default.svc.cluster.local]
      http:
        - match: [{{ headers: {{ end-user: {{ exact: jason }} }} }}]
          route: [{{ destination: {{ host: reviews, subset: v2 }} }}]
        - match: [{{ uri: {{ prefix: /v3 }} }}]
          route: [{{ destination: {{ host: reviews, subset: v3 }} }}]
        - route: [{{ destination: {{ host: reviews, subset: v1 }} }}]
"#,
        v1.port(),
        v2.port()
    );
    let ca = issuer();
    let w = waypoint(ca.clone(), &config).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut c = client.http(vip("10.96.4.10:9080"), false).await;
    // Without subsets each request would pick either endpoint: 20 in a
    // row on v1 happen by chance with probability 2^-20.
    for _ in 0..20 {
        assert_eq!(backend(&c.get("/", &[]).await), "v1");
        assert_eq!(backend(&c.get("/", &[("end-user", "jason")]).await), "v2");
    }
    // A subset no DestinationRule defines: 500, reported.
    assert_eq!(c.get("/v3", &[]).await.status, 500);
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(w.admin, "/config_dump").await).expect("json");
    let unsupported = dump["routes"]["unsupported"].as_array().expect("list");
    let has = |field: &str, effect: &str| {
        unsupported
            .iter()
            .any(|u| u["field"] == field && u["effect"] == effect)
    };
    assert!(has("spec.http[1].route[0]", "backend_fails"), "{dump:#}");
    // The load balancer is applied (the routing engine's), not reported.
    assert!(
        !has("spec.trafficPolicy.loadBalancer", "ignored"),
        "{dump:#}"
    );
    let v1_dest = dump["destinations"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|d| d["destination"] == "default/reviews:9080/v1")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(v1_dest["policy"]["lb"], "ROUND_ROBIN", "{dump:#}");
    assert_eq!(
        v1_dest["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{dump:#}"
    );
}

/// A DestinationRule's `loadBalancer` and `connectionPool.tcp` apply at the
/// waypoint as at the node proxy (one engine, `mesh-routing`): ROUND_ROBIN
/// alternates exactly, and `maxConnections` bounds the requests in flight
/// to the destination (over it: 503 `UO` at once, never queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rule_load_balancing_and_connection_limits_apply() {
    let (v1, v2) = (http_backend("v1").await, http_backend("v2").await);
    let config = format!(
        r#"
services:
  - name: lb
    namespace: default
    addresses: [10.96.6.10]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 127.0.0.1, port: {}, workload: v1 }}
      - {{ address: 127.0.0.1, port: {}, workload: v2 }}
routes:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: lb, namespace: default }}
    spec:
      host: lb
      trafficPolicy:
        loadBalancer: {{ simple: ROUND_ROBIN }}
        connectionPool: {{ tcp: {{ maxConnections: 1 }} }}
"#,
        v1.port(),
        v2.port()
    );
    let ca = issuer();
    let w = waypoint(ca.clone(), &config).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut c = client.http(vip("10.96.6.10:80"), false).await;
    let seen: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..10 {
            let a = c.get("/", &[]).await;
            assert_eq!(a.status, 200, "{a:?}");
            v.push(backend(&a).to_owned());
        }
        v
    };
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "ROUND_ROBIN alternates: {seen:?}"
    );
    // One request held in flight (the backend never answers /hang) fills
    // maxConnections: a second one is refused at once.
    let mut holder = client.http(vip("10.96.6.10:80"), false).await;
    let held = tokio::spawn(async move { holder.get("/hang", &[]).await });
    let admin = w.admin;
    let active = || async move {
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(admin, "/config_dump").await).expect("json");
        dump["destinations"][0]["endpoints"]
            .as_array()
            .map_or(0, |e| {
                e.iter().filter_map(|e| e["active"].as_u64()).sum::<u64>()
            })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while active().await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held request never became active"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = c.get("/", &[]).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    let metrics = wait_metrics(w.admin, |m| m.contains("response_flags=\"UO\"")).await;
    assert!(
        requests_total(&metrics)
            .iter()
            .any(
                |(l, n)| l.get("response_flags").map(String::as_str) == Some("UO")
                    && l.get("response_code").map(String::as_str) == Some("503")
                    && *n == 1
            ),
        "{metrics}"
    );
    // The held request ends (its client goes away): the slot is free again.
    held.abort();
    let _ = held.await;
    answered_ok_within_10s(&mut c, "/", "the slot was never released").await;
}

/// GETs `path` until it is answered 200, for at most 10 s (panics with
/// `what` and the last answer beyond).
async fn answered_ok_within_10s(c: &mut HttpClient, path: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = c.get(path, &[]).await;
        if a.status == 200 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A waypoint whose peers hold at most 2 streams, serving `web` (no route:
/// a request under `/hang` waits for the backend for ever), its client,
/// and the count of requests the backend received.
async fn two_stream_waypoint() -> (
    mesh_waypoint::Running,
    MeshClient,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let (v1, received) = counted_backend("v1").await;
    let config = backend_config(v1.port());
    let ca = issuer();
    let limits = mesh_agent::proxy::limits::Limits {
        max_streams_per_peer: 2,
        ..Default::default()
    };
    let w = waypoint_with_limits(ca.clone(), &config, limits).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    (w, client, received)
}

/// An inner HTTP/2 connection to `target` through a tunnel of `client`,
/// pinging every 200 ms (bytes always move in the tunnel), and the task
/// driving it.
async fn pinging_h2<B>(
    client: &MeshClient,
    target: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = hyper_util::rt::TokioIo::new(client.tunnel(target).await.expect("tunnel"));
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake::<_, B>(io)
            .await
            .expect("h2");
    (sender, tokio::spawn(conn))
}

/// Requests multiplexed on an inner HTTP/2 connection each hold a slot of
/// the peer's stream cap while they are answered (one tunnel stream cannot
/// carry a hundred backend connections past the bounds); the slot comes
/// back with the answer. The backend gets the client's certificate as the
/// waypoint verified it, never the client's own `x-forwarded-client-cert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_http2_requests_hold_slots_of_the_peers_stream_cap() {
    let (_w, client, received) = two_stream_waypoint().await;
    // The tunnel stream holds one slot, a request the other.
    let mut c = client.http(vip(WEB_VIP), true).await;
    let forged = (
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/default/sa/admin",
    );
    let a = c.get("/only-v1", &[forged]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.headers["x-echo-x-forwarded-client-cert"],
        format!("By={WAYPOINT_ID};URI={CLIENT_ID}").as_str()
    );
    let HttpClient::H2(sender) = &c else {
        panic!("an HTTP/2 client")
    };
    let mut hanging = sender.clone();
    let req = http::Request::get("http://web.default.svc.cluster.local/hang")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let held = tokio::spawn(async move {
        hanging.ready().await.expect("h2 ready");
        hanging.send_request(req).await
    });
    // Once the backend has it, the hanging request holds the peer's
    // second slot: the next request is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while received.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline && !held.is_finished(),
            "the hanging request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a = c.get("/only-v1", &[]).await;
    assert_eq!(a.status, 503, "{a:?}");
    assert!(!held.is_finished(), "the hanging request ended");
    held.abort();
    answered_ok_within_10s(&mut c, "/only-v1", "the slot never came back").await;
}

/// A request a backend never answers, on a route without a timeout (as
/// Istio's default), sent on an inner HTTP/2 connection (whose pings keep
/// the tunnel stream from idling) is answered 408 with Envoy's `SI` flag
/// once nothing moved for the stream idle timeout, not held for ever with
/// its slot; the slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_never_answered_ends_at_the_stream_idle_timeout() {
    let (w, client, _received) = two_stream_waypoint().await;
    w.shared.set_stream_idle_timeout(Duration::from_millis(800));
    type Either = http_body_util::Either<http_body_util::Empty<bytes::Bytes>, Stalled>;
    let (mut sender, _conn) = pinging_h2::<Either>(&client, vip(WEB_VIP)).await;
    let get = |path: &str| {
        http::Request::get(format!("http://web.default.svc.cluster.local{path}"))
            .body(Either::Left(http_body_util::Empty::new()))
            .expect("request")
    };
    let started = std::time::Instant::now();
    let a = tokio::time::timeout(Duration::from_secs(10), sender.send_request(get("/hang")))
        .await
        .expect("the hanging request was held past 10 s")
        .expect("an answer");
    assert_eq!(a.status(), 408, "{a:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "answered before the idle timeout"
    );
    let m = wait_metrics(w.admin, |m| {
        requests_total(m)
            .iter()
            .any(|(l, _)| l["response_code"] == "408" && l["response_flags"] == "SI")
    })
    .await;
    assert!(m.contains("response_flags=\"SI\""), "{m}");
    // Its slot is back: the tunnel stream and one request fit again.
    let b = sender
        .send_request(get("/only-v1"))
        .await
        .expect("the slot never came back");
    assert_eq!(b.status(), 200, "{b:?}");
    // A small body (read whole, for retries) that never comes ends the
    // same way.
    let post = http::Request::post("http://web.default.svc.cluster.local/only-v1")
        .header("content-length", "10")
        .body(Either::Right(Stalled))
        .expect("request");
    let c = tokio::time::timeout(Duration::from_secs(10), sender.send_request(post))
        .await
        .expect("the stalled upload was held past 10 s")
        .expect("an answer");
    assert_eq!(c.status(), 408, "{c:?}");
}

/// A request body that says it has 10 bytes and never sends one.
struct Stalled;

impl hyper::body::Body for Stalled {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(10)
    }
}

/// The agent's connection bounds apply: a peer identity holding its maximum
/// of HBONE connections gets no more, other identities are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_its_connection_limit_is_refused_others_are_not() {
    let b = backends().await;
    let ca = issuer();
    let limits = mesh_agent::proxy::limits::Limits {
        max_connections_per_peer: 1,
        ..Default::default()
    };
    let w = waypoint_with_limits(ca.clone(), &config(&b), limits).await;
    let client = MeshClient::new(ca.clone(), CLIENT_ID, w.hbone).await;
    let first = client.tunnel(vip(WEB_VIP)).await.expect("first tunnel");
    assert!(
        client.tunnel(vip(WEB_VIP)).await.is_err(),
        "a second connection of the same peer"
    );
    let other = MeshClient::new(ca, "spiffe://cluster.local/ns/default/sa/other", w.hbone).await;
    let mut c = other.http(vip(WEB_VIP), false).await;
    assert_eq!(c.get("/only-v1", &[]).await.status, 200);
    drop(first);
}

/// DestinationRule outlierDetection: an endpoint that fails is ejected and
/// the next requests all go to the healthy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint() {
    let v1 = http_backend("v1").await;
    let config = format!(
        r#"
services:
  - name: flaky
    namespace: default
    addresses: [10.96.5.10]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 127.0.0.1, port: 1, workload: dead }}
      - {{ address: 127.0.0.1, port: {}, workload: v1 }}
routes:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: flaky, namespace: default }}
    spec:
      host: flaky
      trafficPolicy:
        outlierDetection: {{ consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1h, maxEjectionPercent: 50 }}
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: flaky, namespace: default }}
    spec:
      hosts: [flaky]
      http:
        - route: [{{ destination: {{ host: flaky }} }}]
          retries: {{ attempts: 0 }}
"#,
        v1.port()
    );
    let ca = issuer();
    let w = waypoint(ca.clone(), &config).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut c = client.http(vip("10.96.5.10:80"), false).await;
    // Until the dead endpoint is picked once (2^-200 never in 200 tries).
    let mut failed = false;
    for _ in 0..200 {
        if c.get("/", &[]).await.status == 503 {
            failed = true;
            break;
        }
    }
    assert!(failed, "the dead endpoint was never picked");
    // Ejected: without it, 20 in a row on v1 happen with probability 2^-20.
    for _ in 0..20 {
        let a = c.get("/", &[]).await;
        assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
    }
}

/// A backend that switches `Upgrade: echo` requests to a raw echo of the
/// bytes that follow (as a WebSocket server switches protocols).
async fn upgrade_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await.to_ascii_lowercase();
                // The client's certificate as the waypoint verified it, not
                // the client's own claim.
                let xfcc = format!("x-forwarded-client-cert: by={WAYPOINT_ID};uri={CLIENT_ID}\r\n");
                if !(head.contains("upgrade: websocket")
                    && head.contains("connection: upgrade")
                    && head.contains(&xfcc)
                    && !head.contains("sa/admin"))
                {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                    )
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Writes `message` on `io` and reads it back.
async fn echo(io: &mut tokio::io::DuplexStream, message: &[u8]) {
    io.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo");
    assert_eq!(back, message);
}

/// Writes `request` on `io` and reads the answer's head, in lower case.
async fn ask_head(io: &mut tokio::io::DuplexStream, request: &[u8]) -> String {
    io.write_all(request).await.expect("request");
    tokio::time::timeout(Duration::from_secs(10), read_head(io))
        .await
        .expect("no answer")
        .to_ascii_lowercase()
}

/// Reads an HTTP head (up to the blank line) byte by byte.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An HTTP/1.1 WebSocket upgrade goes through the waypoint: the backend's
/// 101 reaches the client with the Upgrade headers, and the bytes after it
/// are relayed both ways; the request is counted with 101. The relay holds
/// the tunnel stream's slot of the per-peer cap and keeps its connection
/// from the idle deadline for as long as it lives. Another upgrade is
/// refused (403, as Envoy); the backend gets the client's certificate as
/// verified, never the client's own `x-forwarded-client-cert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upgrade_switches_protocols_end_to_end() {
    let backend = upgrade_backend().await;
    let config = format!(
        r#"
services:
  - name: ws
    namespace: default
    addresses: [10.96.7.10]
    ports: [{{ port: 80, protocol: http }}]
    endpoints:
      - {{ address: 127.0.0.1, port: {}, workload: ws }}
"#,
        backend.port()
    );
    let ca = issuer();
    let limits = mesh_agent::proxy::limits::Limits {
        max_streams_per_peer: 1,
        idle_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let w = waypoint_with_limits(ca.clone(), &config, limits).await;
    let other = MeshClient::new(
        ca.clone(),
        "spiffe://cluster.local/ns/default/sa/other",
        w.hbone,
    )
    .await;
    let mut io = other.tunnel(vip("10.96.7.10:80")).await.expect("tunnel");
    let upgrade = b"GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n";
    let head = ask_head(&mut io, upgrade).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");

    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut io = client.tunnel(vip("10.96.7.10:80")).await.expect("tunnel");
    let head = ask_head(&mut io, b"GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: Upgrade\r\nupgrade: websocket\r\nx-forwarded-client-cert: URI=spiffe://cluster.local/ns/default/sa/admin\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    for message in [b"ping".to_vec(), vec![0u8, 1, 2, 255], vec![7u8; 100_000]] {
        echo(&mut io, &message).await;
    }
    // The upgraded stream holds the client's one stream slot.
    assert_eq!(
        client.tunnel(vip("10.96.7.10:80")).await.err().as_deref(),
        Some("CONNECT answered 503 Service Unavailable"),
        "a second stream while the upgraded one holds the peer's only slot"
    );
    // Past the idle deadline (1 s) and the GOAWAY's grace (5 s) it goes on:
    // an open upgraded stream is not an idle connection.
    tokio::time::sleep(
        Duration::from_secs(1) + mesh_agent::proxy::limits::GOAWAY_GRACE + Duration::from_secs(1),
    )
    .await;
    echo(&mut io, b"still there").await;
    let metrics = wait_metrics(w.admin, |m| m.contains("response_code=\"101\"")).await;
    assert!(
        requests_total(&metrics)
            .iter()
            .any(|(l, n)| l.get("response_code").map(String::as_str) == Some("101") && *n == 1),
        "{metrics}"
    );
}

/// GAMMA: an HTTPRoute in another namespace than its parent Service (a
/// consumer route) routes the clients of its own namespace only; the
/// producer route (in the Service's namespace) routes everyone else. A
/// backend in another namespace than its route needs a ReferenceGrant,
/// which the waypoint does not read: refused. A VirtualService routes the
/// clients its `exportTo` names only. The client's namespace is its
/// verified identity's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_other_namespaces_route_their_own_clients_only() {
    let (v1, v2, thief) = (
        http_backend("v1").await,
        http_backend("v2").await,
        http_backend("thief").await,
    );
    let config = format!(
        r#"
services:
  - name: web
    namespace: default
    addresses: [10.96.8.10]
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v1}, workload: web-v1 }}]
  - name: api
    namespace: default
    addresses: [10.96.8.11]
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v1}, workload: web-v1 }}]
  - name: web-v2
    namespace: default
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {v2}, workload: web-v2 }}]
  - name: collector
    namespace: evil
    ports: [{{ port: 80 }}]
    endpoints: [{{ address: 127.0.0.1, port: {thief}, workload: thief }}]
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: web, namespace: default }}
    spec:
      parentRefs: [{{ group: "", kind: Service, name: web, port: 80 }}]
      rules:
        - matches: [{{ path: {{ type: PathPrefix, value: /cross }} }}]
          backendRefs: [{{ name: collector, namespace: evil, port: 80 }}]
        - backendRefs: [{{ name: web, port: 80 }}]
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: steal, namespace: evil }}
    spec:
      parentRefs: [{{ group: "", kind: Service, name: web, namespace: default, port: 80 }}]
      rules:
        - matches: [{{ path: {{ type: PathPrefix, value: /account }} }}]
          backendRefs: [{{ name: collector, port: 80 }}]
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: api, namespace: default }}
    spec:
      hosts: [api]
      http:
        - route: [{{ destination: {{ host: web-v2 }} }}]
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: mine, namespace: other }}
    spec:
      hosts: [api.default.svc.cluster.local]
      exportTo: ["."]
      http:
        - route: [{{ destination: {{ host: web.default.svc.cluster.local }} }}]
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{ name: steal-api, namespace: evil }}
    spec:
      parentRefs: [{{ group: "", kind: Service, name: api, namespace: default, port: 80 }}]
      rules:
        - backendRefs: [{{ name: collector, port: 80 }}]
"#,
        v1 = v1.port(),
        v2 = v2.port(),
        thief = thief.port(),
    );
    let ca = issuer();
    let w = waypoint(ca.clone(), &config).await;
    let get = |id: &'static str, target: &'static str, path: &'static str| {
        let ca = ca.clone();
        async move {
            let client = MeshClient::new(ca, id, w.hbone).await;
            let mut c = client.http(vip(target), false).await;
            c.get(path, &[]).await
        }
    };
    let thief_id = "spiffe://cluster.local/ns/evil/sa/thief";
    let other_id = "spiffe://cluster.local/ns/other/sa/app";
    // The producer route for the Service's own clients and any other's,
    // though the consumer route's match is the more specific...
    let a = get(CLIENT_ID, "10.96.8.10:80", "/account").await;
    assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
    let a = get(other_id, "10.96.8.10:80", "/account").await;
    assert_eq!((a.status.as_u16(), backend(&a)), (200, "v1"), "{a:?}");
    // ...the consumer route for its own namespace's.
    let a = get(thief_id, "10.96.8.10:80", "/account").await;
    assert_eq!((a.status.as_u16(), backend(&a)), (200, "thief"), "{a:?}");
    // A backend in another namespace than the route: refused.
    let a = get(CLIENT_ID, "10.96.8.10:80", "/cross").await;
    assert_ne!(backend(&a), "thief", "{a:?}");
    assert_eq!(a.status.as_u16(), 500, "{a:?}");
    let dump = admin_get(w.admin, "/config_dump").await;
    assert!(dump.contains("ReferenceGrant"), "{dump}");
    // VirtualServices: `other`'s (exportTo ".") for `other`'s clients, the
    // service's own for the rest; evil's consumer HTTPRoute on the same
    // port routes evil's clients and takes neither away from the others.
    for (id, expected) in [
        (CLIENT_ID, "v2"),
        ("spiffe://cluster.local/ns/third/sa/app", "v2"),
        (other_id, "v1"),
        (thief_id, "thief"),
    ] {
        let a = get(id, "10.96.8.11:80", "/").await;
        assert_eq!(
            (a.status.as_u16(), backend(&a)),
            (200, expected),
            "{id}: {a:?}"
        );
    }
}

/// A request cannot pass as opaque TCP (skipping routing and the HTTP
/// telemetry) by starting with empty lines or using a method outside the
/// common nine: both are detected as HTTP and routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_empty_lines_first_or_other_methods_are_http() {
    let s = setup().await;
    for request in [
        &b"\r\n\r\nGET /x HTTP/1.1\r\nhost: web\r\nx-canary: true\r\nconnection: close\r\n\r\n"[..],
        &b"PROPFIND /x HTTP/1.1\r\nhost: web\r\nx-canary: true\r\nconnection: close\r\n\r\n"[..],
    ] {
        let mut io = s.client.tunnel(vip(WEB_VIP)).await.expect("tunnel");
        io.write_all(request).await.expect("request");
        let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut io))
            .await
            .expect("no answer");
        let lower = head.to_ascii_lowercase();
        // Routed by the HTTPRoute (x-canary: v2; the service's own
        // endpoint, where a TCP relay would go, is v1).
        assert!(lower.starts_with("http/1.1 200"), "{head}");
        assert!(lower.contains("x-backend: v2"), "{head}");
    }
}

/// A tunnel stream that moves no byte either way for the stream idle
/// timeout is reset (the backend connection with it); one that keeps
/// moving bytes is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_stream_is_reset_a_busy_one_is_not() {
    let s = setup().await;
    s.waypoint
        .shared
        .set_stream_idle_timeout(Duration::from_millis(800));
    let mut busy = s.client.tunnel(vip(ECHO_VIP)).await.expect("tunnel");
    let mut idle = s.client.tunnel(vip(ECHO_VIP)).await.expect("tunnel");
    // Lines: a lone word could still start a request line, which
    // detection waits for.
    echo(&mut idle, b"ping\n").await;
    echo(&mut busy, b"ping\n").await;
    // 2.4 s: three idle timeouts; the busy stream moves a byte every 200 ms.
    for _ in 0..12 {
        echo(&mut busy, b"x").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the idle stream is still open: {closed:?}"
    );
    echo(&mut busy, b"still there").await;
}

/// The settings a waypoint starts with are in force from its first
/// stream (the stream idle timeout is not the default for a moment) and
/// shown in `/config_dump`, with the file-descriptor limit its caps were
/// sized from (not 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_settings_apply_from_the_first_stream_and_are_shown() {
    let b = backends().await;
    let fd_limit = mesh_agent::process::FdLimit {
        soft: 4096,
        hard: 8192,
        raised_from: Some(1024),
    };
    let settings = mesh_waypoint::Settings {
        limits: mesh_agent::proxy::limits::Limits::for_fd_limit(fd_limit.soft),
        fd_limit,
        stream_idle_timeout: Duration::from_millis(800),
        ..mesh_waypoint::Settings::default()
    };
    let max_connections = settings.limits.max_connections;
    let (w, client) = waypoint_and_client(issuer(), &config(&b), settings).await;
    let mut first = client.tunnel(vip(ECHO_VIP)).await.expect("tunnel");
    echo(&mut first, b"ping\n").await;
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the first stream did not get the idle timeout: {closed:?}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(w.admin, "/config_dump").await).expect("json");
    assert_eq!(dump["stream_idle_timeout_ms"], 800, "{dump}");
    assert_eq!(dump["limits"]["fd_limit"]["soft"], 4096, "{dump}");
    assert_eq!(dump["limits"]["fd_limit"]["raised_from"], 1024, "{dump}");
    assert_eq!(
        dump["limits"]["limits"]["max_connections"], max_connections,
        "{dump}"
    );
}

/// A service `name` at `vip`:`port` (`protocol`) with one endpoint,
/// `backend`, as an item of the configuration's `services`.
fn service(name: &str, vip: &str, port: u16, protocol: &str, backend: SocketAddr) -> String {
    format!(
        "  - {{ name: {name}, namespace: default, addresses: [{vip}], ports: [{{ port: {port}, protocol: {protocol} }}], endpoints: [{{ address: {}, port: {}, workload: {name} }}] }}\n",
        backend.ip(),
        backend.port()
    )
}

/// A waypoint serving `config` with `settings`, and a mesh client of it
/// (both with certificates of `ca`).
async fn waypoint_and_client(
    ca: std::sync::Arc<mesh_agent::identity::LocalCa>,
    config: &str,
    settings: mesh_waypoint::Settings,
) -> (mesh_waypoint::Running, MeshClient) {
    let w = waypoint_with(ca.clone(), config, settings).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    (w, client)
}

/// A backend that never says anything and never closes a connection: it
/// reads what it gets (with `upgrade`, a request head, answered with a
/// WebSocket 101 first) and holds the socket.
async fn silent_backend(upgrade: bool) -> SocketAddr {
    tcp_backend(move |mut s| async move {
        if upgrade {
            read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                .await;
        }
        let mut sink = [0u8; 1024];
        while let Ok(n) = s.read(&mut sink).await
            && n > 0
        {}
        // Half-closed by the waypoint: held open, silent.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    })
    .await
}

/// A tunnel stream from `client` to `target`, if it gets one within
/// `within` (a peer at its stream cap is answered 503 until a slot frees).
async fn tunnel_within(
    client: &MeshClient,
    target: SocketAddr,
    within: Duration,
) -> Option<tokio::io::DuplexStream> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok(io) = client.tunnel(target).await {
            return Some(io);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The active count of `service`'s endpoint in `/config_dump`, once it is
/// `want` (polled for up to 5 s; the last count otherwise).
async fn endpoint_active(admin: SocketAddr, service: &str, want: u64) -> Option<u64> {
    let mut last = None;
    for _ in 0..50 {
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(admin, "/config_dump").await).expect("json");
        last = dump["destinations"].as_array().and_then(|ds| {
            ds.iter()
                .find(|d| d["destination"].as_str() == Some(service))
                .and_then(|d| d["endpoints"][0]["active"].as_u64())
        });
        if last == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// A TCP relay and an upgraded (WebSocket) relay whose tunnel stream the
/// idle timeout resets end with it, though their backend never speaks:
/// the stream's slot of the peer's cap (1 here) and the backend's
/// connection count are released within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_ends_its_tcp_and_upgraded_relays_though_the_backend_is_silent() {
    let (tcp, ws) = (silent_backend(false).await, silent_backend(true).await);
    // A meshed endpoint's agent that notes how each stream ended: reset,
    // or half-closed (its request body ended) and left open.
    let ca = issuer();
    let ends = std::sync::Arc::new(std::sync::Mutex::new(Vec::<&str>::new()));
    let noted = std::sync::Arc::clone(&ends);
    let (agent, _) = pod_agent_with(
        ca.clone(),
        "spiffe://cluster.local/ns/default/sa/db",
        move |mut recv, send| {
            let noted = std::sync::Arc::clone(&noted);
            tokio::spawn(async move {
                let _silent = send;
                let end = loop {
                    match recv.data().await {
                        Some(Ok(d)) => {
                            let _ = recv.flow_control().release_capacity(d.len());
                        }
                        Some(Err(_)) => break "reset",
                        None => break "half-closed",
                    }
                };
                noted.lock().expect("lock").push(end);
            });
        },
    )
    .await;
    let config = format!(
        "services:\n{}{}  - {{ name: meshed, namespace: default, addresses: [10.96.8.12], ports: [{{ port: 7000, protocol: tcp }}], endpoints: [{{ address: 127.0.0.1, port: 1, tunnel: hbone, hbonePort: {}, serviceAccount: db, workload: meshed }}] }}\n",
        service("quiet", "10.96.8.10", 7000, "tcp", tcp),
        service("ws", "10.96.8.11", 80, "http", ws),
        agent.port()
    );
    let settings = mesh_waypoint::Settings {
        limits: mesh_agent::proxy::limits::Limits {
            max_streams_per_peer: 1,
            ..Default::default()
        },
        stream_idle_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let (w, client) = waypoint_and_client(ca, &config, settings).await;

    let mut io = client.tunnel(vip("10.96.8.10:7000")).await.expect("tunnel");
    io.write_all(b"\x00opaque").await.expect("write");
    assert_eq!(
        endpoint_active(w.admin, "default/quiet:7000", 1).await,
        Some(1)
    );
    // Reset at 800 ms: the relay ends, its pick and its slot with it.
    assert_eq!(
        endpoint_active(w.admin, "default/quiet:7000", 0).await,
        Some(0),
        "the TCP relay outlived its reset stream"
    );
    drop(io);

    // The slot is free once the relay (then the probe's stream) is reset.
    let mut io = tunnel_within(&client, vip("10.96.8.11:80"), Duration::from_secs(5))
        .await
        .expect("the TCP relay still holds the reset stream's slot");
    let upgrade =
        b"GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n";
    let head = ask_head(&mut io, upgrade).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(
        client.tunnel(vip("10.96.8.11:80")).await.err().as_deref(),
        Some("CONNECT answered 503 Service Unavailable"),
        "the upgraded relay holds the slot while it lives"
    );
    assert!(
        tunnel_within(&client, vip("10.96.8.11:80"), Duration::from_secs(5))
            .await
            .is_some(),
        "the upgraded relay still holds the reset stream's slot"
    );
    drop(io);

    // To a meshed endpoint, the relay's HBONE stream is reset with the
    // client's, not half-closed and left to a silent backend.
    let mut io = tunnel_within(&client, vip("10.96.8.12:7000"), Duration::from_secs(5))
        .await
        .expect("a stream to the meshed service");
    io.write_all(b"\x00opaque").await.expect("write");
    for _ in 0..50 {
        if !ends.lock().expect("lock").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(*ends.lock().expect("lock"), ["reset"]);
    drop(io);
}

/// Streams that start as an HTTP/1 request line in any case are HTTP,
/// though the method is lower case, unusual and its line over the
/// detection bound, or the line stalls past the detection deadline:
/// none reaches a backend as TCP, past routing and policy (a TCP relay
/// would reach web-v1, the service's own endpoint; the route sends
/// `x-canary` to v2, and the waypoint answers a lower-case method 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lines_in_any_case_long_or_stalled_are_http() {
    let s = setup().await;
    let ask = |head: Vec<u8>, stall: Option<(usize, Duration)>| {
        let client = &s.client;
        async move {
            let mut io = client.tunnel(vip(WEB_VIP)).await.expect("tunnel");
            let (first, rest) = head.split_at(stall.map_or(head.len(), |(at, _)| at));
            io.write_all(first).await.expect("request");
            if let Some((_, wait)) = stall {
                tokio::time::sleep(wait).await;
            }
            ask_head(&mut io, rest).await
        }
    };
    let canary = "\r\nhost: web\r\nx-canary: true\r\nconnection: close\r\n\r\n";
    let lower = ask(format!("get /x HTTP/1.1{canary}").into_bytes(), None);
    let long_line = format!(
        "PROPFIND /{} HTTP/1.1{canary}",
        "a".repeat(mesh_waypoint::server::MAX_DETECT_LINE + 1024)
    );
    let long = ask(long_line.into_bytes(), None);
    // Stalled mid-line past the detection deadline.
    let stall = (
        "PROPFIND /x HTTP/1.".len(),
        mesh_waypoint::server::DETECT_TIMEOUT + Duration::from_millis(500),
    );
    let stalled = ask(
        format!("PROPFIND /x HTTP/1.1{canary}").into_bytes(),
        Some(stall),
    );
    let (lower, long, stalled) = tokio::join!(lower, long, stalled);
    assert!(lower.starts_with("http/1.1 400"), "{lower}");
    for head in [long, stalled] {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("x-backend: v2"), "{head}");
    }
}

/// A server-first protocol (the client sends nothing until the server's
/// greeting) is still relayed as TCP after the detection deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_is_relayed_as_tcp() {
    let greeter = tcp_backend(|mut s| async move {
        let _ = s.write_all(b"220 ready\r\n").await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let ca = issuer();
    let w = waypoint(ca.clone(), &backend_config(greeter.port())).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut io = client.tunnel(vip(WEB_VIP)).await.expect("tunnel");
    let mut greeting = [0u8; 11];
    let within = mesh_waypoint::server::DETECT_TIMEOUT + Duration::from_secs(5);
    tokio::time::timeout(within, io.read_exact(&mut greeting))
        .await
        .expect("no greeting")
        .expect("greeting");
    assert_eq!(&greeting, b"220 ready\r\n");
    echo(&mut io, b"HELO me\r\n").await;
}

/// A backend answering `/big` with an endless body (it notes when its
/// connection is closed under it), `/upload` with its response head at
/// once and `ok` once the (chunked) request body has ended, and anything
/// else with `ok`.
async fn streaming_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noted = std::sync::Arc::clone(&closed);
    let addr = tcp_backend(move |mut s| {
        let noted = std::sync::Arc::clone(&noted);
        async move {
            loop {
                let head = read_head(&mut s).await;
                if head.is_empty() {
                    return;
                }
                if head.contains("/upload") {
                    let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                    if s.write_all(start).await.is_err() {
                        return;
                    }
                    let mut body = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !body.ends_with(b"0\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => body.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    if s.write_all(b"2\r\nok\r\n0\r\n\r\n").await.is_err() {
                        return;
                    }
                    continue;
                }
                if !head.contains("/big") {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                    continue;
                }
                let big = b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n";
                let chunk = vec![0u8; 16 * 1024];
                let mut written = s.write_all(big).await;
                while written.is_ok() {
                    written = s.write_all(&chunk).await;
                }
                noted.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
        }
    })
    .await;
    (addr, closed)
}

/// A request body of the HTTP/2 test client.
type Upload = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;

/// Inside a tunnel, HTTP/2 moves bytes while idle (pings), so the tunnel
/// stream's idle timeout never fires on it: a response whose client stops
/// reading is dropped after the stream idle timeout (its backend
/// connection closed) while the connection keeps serving other requests,
/// and the connection is closed once it carries no request for that long,
/// though its client keeps pinging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_http2_stalled_responses_and_idle_connections_are_timed_out() {
    let (backend, closed) = streaming_backend().await;
    let config = format!(
        "services:\n{}",
        service("stream", "10.96.9.10", 80, "http", backend)
    );
    let settings = mesh_waypoint::Settings {
        stream_idle_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let (_w, client) = waypoint_and_client(issuer(), &config, settings).await;
    let (mut sender, conn) = pinging_h2::<Upload>(&client, vip("10.96.9.10:80")).await;
    let get = |path: &str| {
        http::Request::get(format!("http://stream.default{path}"))
            .body(Upload::new(http_body_util::Empty::new()))
            .expect("request")
    };
    let stalled = sender.send_request(get("/big")).await.expect("big");
    assert_eq!(stalled.status(), 200);
    // 2.4 s (three idle timeouts) of requests every 200 ms: served.
    for _ in 0..12 {
        let r = sender
            .send_request(get("/small"))
            .await
            .expect("busy request");
        use http_body_util::BodyExt;
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..50 {
        if closed.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        "the unread response's backend connection is still open"
    );
    // A response silent while its request uploads (a byte every 200 ms for
    // 2.4 s) is not idle: it ends when the backend answers.
    let chunks = futures::stream::unfold(0, |sent| async move {
        if sent == 12 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let frame = hyper::body::Frame::data(bytes::Bytes::from_static(b"x"));
        Some((Ok::<_, std::convert::Infallible>(frame), sent + 1))
    });
    let upload = http::Request::post("http://stream.default/upload")
        .body(Upload::new(http_body_util::StreamBody::new(chunks)))
        .expect("request");
    let answer = sender.send_request(upload).await.expect("upload");
    let body = http_body_util::BodyExt::collect(answer.into_body()).await;
    assert_eq!(
        body.expect("the uploading request's response was dropped")
            .to_bytes(),
        &b"ok"[..]
    );
    // No request from now on: closed after the idle timeout and, for the
    // stalled stream, the GOAWAY's grace.
    let within = Duration::from_millis(800) + mesh_agent::proxy::limits::GOAWAY_GRACE;
    let ended = tokio::time::timeout(within + Duration::from_secs(3), conn)
        .await
        .expect("the idle inner HTTP/2 connection is still open")
        .expect("join");
    // Closed by the waypoint (GOAWAY, or the stream's end under it).
    let _ = ended;
    drop(stalled);
}
