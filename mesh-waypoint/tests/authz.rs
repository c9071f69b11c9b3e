//! L7 AuthorizationPolicies at the waypoint, end to end without root: real
//! HBONE tunnels (mTLS, the client's SPIFFE identity verified) into a
//! waypoint started in-process, policies attached with `targetRefs` to a
//! Service and to the waypoint's Gateway, real backends on 127.0.0.1.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use mesh_waypoint::config::WaypointConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REVIEWS: &str = "10.96.8.10:80";
const RATINGS: &str = "10.96.8.11:80";
const ECHO: &str = "10.96.8.12:7000";
const INTRUDER_ID: &str = "spiffe://cluster.local/ns/default/sa/intruder";

fn vip(s: &str) -> SocketAddr {
    s.parse().expect("vip")
}

fn config(reviews: SocketAddr, ratings: SocketAddr, echo: SocketAddr, policies: &str) -> String {
    format!(
        r#"
services:
  - name: reviews
    namespace: default
    addresses: [10.96.8.10]
    ports: [{{ port: 80, targetPort: {} }}]
    endpoints: [{{ address: 127.0.0.1, workload: reviews-v1 }}]
  - name: ratings
    namespace: default
    addresses: [10.96.8.11]
    ports: [{{ port: 80, targetPort: {} }}]
    endpoints: [{{ address: 127.0.0.1, workload: ratings-v1 }}]
  - name: echo
    namespace: default
    addresses: [10.96.8.12]
    ports: [{{ port: 7000, targetPort: {}, protocol: tcp }}]
    endpoints: [{{ address: 127.0.0.1, workload: echo }}]
policies:
{policies}
"#,
        reviews.port(),
        ratings.port(),
        echo.port()
    )
}

/// reviews: GET /api/* from the client only (Service target); every
/// service: `x-block: yes` denied (Gateway target); a policy for a
/// service the waypoint does not front; echo (TCP): an ALLOW that needs
/// HTTP, so a TCP stream gets nothing.
const POLICIES: &str = r#"
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: reviews-read, namespace: default }
    spec:
      targetRefs: [{ kind: Service, group: "", name: reviews }]
      rules:
        - from: [{ source: { principals: [cluster.local/ns/default/sa/client] } }]
          to: [{ operation: { methods: [GET], paths: ["/api/*"] } }]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: block-header, namespace: default }
    spec:
      targetRefs: [{ kind: Gateway, group: gateway.networking.k8s.io, name: waypoint }]
      action: DENY
      rules:
        - when: [{ key: "request.headers[x-block]", values: ["yes"] }]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: elsewhere, namespace: default }
    spec:
      targetRefs: [{ kind: Service, group: "", name: not-here }]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: echo-http-only, namespace: default }
    spec:
      targetRefs: [{ kind: Service, group: "", name: echo }]
      rules:
        - to: [{ operation: { methods: [GET] } }]
"#;

async fn send(c: &mut HttpClient, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "reviews.default.svc.cluster.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.send(req.body(Full::new(Bytes::new())).expect("request"))
        .await
}

/// The reviews and ratings HTTP backends and the echo TCP backend.
async fn backends() -> (SocketAddr, SocketAddr, SocketAddr) {
    (
        http_backend("reviews").await,
        http_backend("ratings").await,
        echo_backend().await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_authorized_by_policies_attached_to_the_service_and_the_waypoint() {
    let (reviews, ratings, echo) = backends().await;
    let ca = issuer();
    let w = waypoint(ca.clone(), &config(reviews, ratings, echo, POLICIES)).await;
    let client = MeshClient::new(ca.clone(), CLIENT_ID, w.hbone).await;
    let mut c = client.http(vip(REVIEWS), false).await;

    let ok = send(&mut c, "GET", "/api/books", &[]).await;
    assert_eq!(
        (ok.status.as_u16(), ok.body.as_str()),
        (200, "reviews /api/books 0")
    );
    let post = send(&mut c, "POST", "/api/books", &[]).await;
    assert_eq!(
        (post.status.as_u16(), post.body.as_str()),
        (403, "RBAC: access denied")
    );
    assert_eq!(send(&mut c, "GET", "/admin", &[]).await.status, 403);
    // The path the policy checked is the path the backend gets.
    let dotted = send(&mut c, "GET", "/admin/../api/books", &[]).await;
    assert_eq!(
        (dotted.status.as_u16(), dotted.body.as_str()),
        (200, "reviews /api/books 0")
    );
    let escape = send(&mut c, "GET", "/api/../admin", &[]).await;
    assert_eq!(escape.status, 403, "{escape:?}");
    // The Gateway-wide DENY applies to every service.
    assert_eq!(
        send(&mut c, "GET", "/api/books", &[("x-block", "yes")])
            .await
            .status,
        403
    );
    let mut r = client.http(vip(RATINGS), true).await;
    assert_eq!(
        r.get("/", &[]).await.status,
        200,
        "no ALLOW applies to ratings"
    );
    assert_eq!(r.get("/", &[("x-block", "yes")]).await.status, 403);
    // Another identity: not the principal the ALLOW names.
    let intruder = MeshClient::new(ca.clone(), INTRUDER_ID, w.hbone).await;
    let mut i = intruder.http(vip(REVIEWS), false).await;
    assert_eq!(send(&mut i, "GET", "/api/books", &[]).await.status, 403);

    // Counted as Istio counts an RBAC denial: response_code 403 and no
    // response flag ("-": Envoy has none for RBAC), from the client's
    // identity to the service, by the waypoint.
    let denied = 6;
    let is_403 = |l: &std::collections::BTreeMap<String, String>| {
        l.get("response_code").map(String::as_str) == Some("403")
    };
    let metrics = wait_metrics(w.admin, |m| {
        requests_total(m)
            .iter()
            .filter(|(l, _)| is_403(l))
            .map(|(_, n)| n)
            .sum::<u64>()
            == denied
    })
    .await;
    let label = |l: &std::collections::BTreeMap<String, String>, k: &str| {
        l.get(k).cloned().unwrap_or_default()
    };
    let mut forbidden: Vec<(String, String, String, String, u64)> = requests_total(&metrics)
        .into_iter()
        .filter(|(l, _)| is_403(l))
        .map(|(l, n)| {
            (
                label(&l, "response_flags"),
                label(&l, "reporter"),
                label(&l, "source_principal"),
                label(&l, "destination_service_name"),
                n,
            )
        })
        .collect();
    forbidden.sort();
    let row = |p: &str, svc: &str, n: u64| {
        (
            "-".to_owned(),
            "waypoint".to_owned(),
            p.to_owned(),
            svc.to_owned(),
            n,
        )
    };
    assert_eq!(
        forbidden,
        vec![
            row(CLIENT_ID, "ratings", 1),
            row(CLIENT_ID, "reviews", 4),
            row(INTRUDER_ID, "reviews", 1),
        ],
        "{metrics}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(w.admin, "/config_dump").await).expect("json");
    assert_eq!(dump["policies"]["gateway"], "default/waypoint", "{dump:#}");
    assert_eq!(
        dump["policies"]["in_force"].as_array().map(Vec::len),
        Some(4),
        "{dump:#}"
    );

    // An opaque TCP stream to echo: the ALLOW needs HTTP, so it grants
    // nothing and the stream is closed unanswered.
    let mut t = client.tunnel(vip(ECHO)).await.expect("tunnel");
    let _ = t.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), t.read(&mut buf))
        .await
        .expect("the denied stream was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?} {buf:?}");

    // A reload without the reviews ALLOW: POST is no longer denied.
    let without = POLICIES.replace(
        "{ name: reviews-read, namespace: default }",
        r#"{ name: reviews-read, namespace: default, annotations: { istio.io/dry-run: "true" } }"#,
    );
    let reloaded =
        WaypointConfig::parse(&config(reviews, ratings, echo, &without)).expect("config");
    w.shared.reload(&reloaded);
    let mut c = client.http(vip(REVIEWS), false).await;
    assert_eq!(send(&mut c, "POST", "/api/books", &[]).await.status, 200);
    assert_eq!(
        send(&mut c, "POST", "/api/books", &[("x-block", "yes")])
            .await
            .status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_istio_would_refuse_gets_400() {
    let (reviews, ratings, echo) = backends().await;
    let ca = issuer();
    let w = waypoint(ca.clone(), &config(reviews, ratings, echo, "  []")).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    // A NUL escape (Envoy's normalisation refuses it); a stray '%' is
    // kept, as Envoy's does, and served.
    for (line, status) in [
        ("GET /a%00 HTTP/1.1", &b"HTTP/1.1 400"[..]),
        ("GET /a%zz HTTP/1.1", b"HTTP/1.1 200"),
    ] {
        let mut io = client.tunnel(vip(REVIEWS)).await.expect("tunnel");
        io.write_all(format!("{line}\r\nhost: reviews\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut head = vec![0u8; 12];
        io.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head[..], status, "{line}");
    }
    // A method not in upper case (Istio's normalisation of `methods`):
    // over HTTP/2, as HTTP/1 detection only knows upper-case methods (a
    // lowercase request line is an opaque TCP stream, decided at L4).
    let mut h2 = client.http(vip(REVIEWS), true).await;
    let lower = h2
        .send(
            http::Request::builder()
                .method("get")
                .uri("http://reviews/")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await;
    assert_eq!(lower.status, 400, "{lower:?}");
    assert_eq!(h2.get("/", &[]).await.status, 200);
}

/// Traffic addressed to a pod's own IP (the pod's waypoint takes workload
/// traffic): the pod is the backend, no route applies, and of the
/// policies only those attached to the waypoint itself do (a Service's
/// policies are for traffic addressed to the Service), as in Istio. It is
/// counted with the pod as destination and no destination service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_addressed_by_its_own_ip_gets_the_waypoints_policies_not_its_services() {
    let (reviews, ratings, echo) = backends().await;
    let ca = issuer();
    // The pod `reviews-v1-0` at 127.0.0.1 (where every backend listens).
    let pods = "\
workloads:
  - name: reviews-v1-0
    namespace: default
    addresses: [127.0.0.1]
    workload: reviews-v1
    serviceAccount: reviews
    labels: { app: reviews, version: v1 }
";
    let text = format!("{}{pods}", config(reviews, ratings, echo, POLICIES));
    let w = waypoint(ca.clone(), &text).await;
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let pod = SocketAddr::new([127, 0, 0, 1].into(), reviews.port());

    let mut c = client.http(pod, false).await;
    // The Service's ALLOW (GET /api/* only) does not apply to the pod...
    let admin = send(&mut c, "GET", "/admin", &[]).await;
    assert_eq!(
        (admin.status.as_u16(), admin.body.as_str()),
        (200, "reviews /admin 0")
    );
    // ...the Gateway's DENY does.
    let blocked = send(&mut c, "GET", "/admin", &[("x-block", "yes")]).await;
    assert_eq!(blocked.status, 403, "{blocked:?}");
    // The same request to the Service is denied by the Service's ALLOW.
    let mut s = client.http(vip(REVIEWS), false).await;
    assert_eq!(send(&mut s, "GET", "/admin", &[]).await.status, 403);

    // Opaque TCP to the pod: the Gateway's DENY has an HTTP condition,
    // which fails safe for a stream (it denies it)... (A line: a lone
    // word could still start a request line, which detection waits for.)
    let echo_pod = SocketAddr::new([127, 0, 0, 1].into(), echo.port());
    let mut t = client.tunnel(echo_pod).await.expect("tunnel to the pod");
    let _ = t.write_all(b"hello\n").await;
    let mut back = [0u8; 5];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), t.read(&mut back))
        .await
        .expect("the denied stream was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?} {back:?}");
    // ...and once that DENY is attached elsewhere, the echo Service's
    // HTTP-only ALLOW does not apply to the pod: the stream is relayed to
    // the pod's port (the same stream to the Service's VIP is not).
    let elsewhere = POLICIES.replace(
        "group: gateway.networking.k8s.io, name: waypoint }",
        "group: gateway.networking.k8s.io, name: another-waypoint }",
    );
    let reloaded = WaypointConfig::parse(&format!(
        "{}{pods}",
        config(reviews, ratings, echo, &elsewhere)
    ))
    .expect("config");
    w.shared.reload(&reloaded);
    let mut t = client.tunnel(echo_pod).await.expect("tunnel to the pod");
    t.write_all(b"hello\n").await.expect("write");
    t.read_exact(&mut back).await.expect("echo from the pod");
    assert_eq!(&back, b"hello");
    let mut t = client.tunnel(vip(ECHO)).await.expect("tunnel");
    let _ = t.write_all(b"hello\n").await;
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), t.read(&mut back))
        .await
        .expect("the denied stream was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?} {back:?}");

    // An address that is neither a service of this waypoint nor one of its pods.
    let r = client.tunnel(vip("127.0.0.2:80")).await;
    assert_eq!(
        r.err().as_deref(),
        Some("CONNECT answered 503 Service Unavailable")
    );

    // Counted with the pod as the destination, and no service.
    let is_pod_200 = |l: &std::collections::BTreeMap<String, String>| {
        l.get("response_code").map(String::as_str) == Some("200")
            && l.get("destination_workload").map(String::as_str) == Some("reviews-v1")
    };
    let metrics = wait_metrics(w.admin, |m| {
        requests_total(m)
            .iter()
            .any(|(l, n)| is_pod_200(l) && *n == 1)
    })
    .await;
    let (labels, _) = requests_total(&metrics)
        .into_iter()
        .find(|(l, _)| is_pod_200(l))
        .expect("the pod's sample");
    for (k, v) in [
        ("reporter", "waypoint"),
        ("destination_service", "unknown"),
        ("destination_service_name", "unknown"),
        ("destination_version", "v1"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/reviews",
        ),
        ("source_principal", CLIENT_ID),
    ] {
        assert_eq!(
            labels.get(k).map(String::as_str),
            Some(v),
            "{k} in {labels:?}"
        );
    }
}
