//! The waypoint's OTLP span export: an in-test collector (the OTLP
//! `TraceService` over gRPC, tonic) receives one span per sampled request,
//! with the caller's span as parent and the span id the backend saw as its
//! parent in `traceparent`; unsampled traces are not exported; a collector
//! that is down costs the requests nothing and the lost spans are counted.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use tokio::sync::mpsc;

/// Forwards every export request it receives.
struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A collector on 127.0.0.1 and the export requests it receives.
async fn collector() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        TraceServiceServer::new(Collector(tx)),
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    (addr, rx)
}

const VIP: &str = "10.96.0.10:80";
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string(v: Option<&Value>) -> Option<&str> {
    match v {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// The next exported request's spans and its resource's attributes.
async fn next_export(
    rx: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) -> (Vec<Span>, Vec<KeyValue>) {
    let req = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an export within 10 s (the batch interval is 1 s)")
        .expect("collector running");
    let mut spans = Vec::new();
    let mut resource = Vec::new();
    for rs in req.resource_spans {
        resource.extend(rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            spans.extend(ss.spans);
        }
    }
    (spans, resource)
}

async fn dump(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&admin_get(admin, "/config_dump").await).expect("json")
}

/// Two hops: client → waypoint → backend. The exported span is the child
/// of the client's span and the parent the backend was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_span_links_the_client_and_the_backend() {
    let (otlp, mut exports) = collector().await;
    let backend = http_backend("v1").await;
    let ca = issuer();
    let w = waypoint(ca.clone(), &backend_config(backend.port())).await;
    w.shared
        .export_spans(mesh_waypoint::otlp::OtlpConfig::new(format!(
            "http://{otlp}"
        )))
        .expect("export");
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut c = client.http(VIP.parse().expect("vip"), false).await;
    let incoming = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let a = c.get("/hello?x=1", &[("traceparent", &incoming)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = a.headers["x-echo-traceparent"].to_str().expect("ascii");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], CLIENT_TRACE);
    let waypoint_span = parts[2];

    let (spans, resource) = next_export(&mut exports).await;
    assert_eq!(spans.len(), 1, "one request, one span: {spans:?}");
    let s = &spans[0];
    assert_eq!(hex(&s.trace_id), CLIENT_TRACE);
    assert_eq!(
        hex(&s.parent_span_id),
        CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(
        hex(&s.span_id),
        waypoint_span,
        "the backend's parent is the exported span"
    );
    assert_eq!(s.name, "web.default.svc.cluster.local:80/*");
    assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    assert_eq!(
        string(attr(&resource, "service.name")),
        Some("mesh-waypoint")
    );
    assert_eq!(string(attr(&s.attributes, "http.method")), Some("GET"));
    assert_eq!(
        string(attr(&s.attributes, "http.url")),
        Some("http://web.default.svc.cluster.local/hello?x=1")
    );
    assert_eq!(
        attr(&s.attributes, "http.status_code"),
        Some(&Value::IntValue(200))
    );
    assert_eq!(
        string(attr(&s.attributes, "upstream_cluster")),
        Some("outbound|80||web.default.svc.cluster.local")
    );
    assert_eq!(
        string(attr(&s.attributes, "upstream_address")),
        Some(backend.to_string().as_str())
    );
    assert_eq!(
        string(attr(&s.attributes, "istio.canonical_service")),
        Some("waypoint")
    );
    assert_eq!(
        string(attr(&s.attributes, "istio.namespace")),
        Some("default")
    );

    // An unsampled trace is propagated but not exported; the next sampled one is.
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    let a = c.get("/quiet", &[("traceparent", &unsampled)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.headers["x-echo-traceparent"]
            .to_str()
            .expect("ascii")
            .ends_with("-00")
    );
    let a = c.get("/loud", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let (spans, _) = next_export(&mut exports).await;
    let urls: Vec<_> = spans
        .iter()
        .filter_map(|s| string(attr(&s.attributes, "http.url")))
        .collect();
    assert_eq!(
        urls,
        ["http://web.default.svc.cluster.local/loud"],
        "{spans:?}"
    );
    assert!(spans[0].parent_span_id.is_empty(), "a new trace is a root");

    // The count follows the collector's answer (bounded wait).
    let mut d = dump(w.admin).await;
    for _ in 0..50 {
        if d["tracing"]["exported"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        d = dump(w.admin).await;
    }
    assert_eq!(d["tracing"]["endpoint"], format!("http://{otlp}"));
    assert_eq!(d["tracing"]["exported"], 2, "{d}");
    assert_eq!(d["tracing"]["dropped_queue_full"], 0, "{d}");
}

/// A collector that never answers: requests are answered as usual, the
/// spans are dropped and counted. Batches of 1, a queue of 2, a 2 s export
/// deadline: the first span's export hangs, 2 more fill the queue, the
/// next ones are dropped at once (the 20 requests take far less than the
/// 2 s the export hangs, so at least one finds the queue full; the test
/// also holds if they were slower: it then counts export failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_drops_counted_spans_and_no_requests() {
    // Accepts connections (the kernel's backlog) and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed = hole.local_addr().expect("addr");
    let backend = http_backend("v1").await;
    let ca = issuer();
    let w = waypoint(ca.clone(), &backend_config(backend.port())).await;
    let mut config = mesh_waypoint::otlp::OtlpConfig::new(format!("http://{closed}"));
    config.max_queue = 2;
    config.max_batch = 1;
    config.interval = Duration::from_millis(100);
    config.timeout = Duration::from_secs(2);
    w.shared.export_spans(config).expect("export");
    let client = MeshClient::new(ca, CLIENT_ID, w.hbone).await;
    let mut c = client.http(VIP.parse().expect("vip"), false).await;
    const N: u64 = 20;
    for i in 0..N {
        let a = c.get(&format!("/r{i}"), &[]).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
    }
    // Every span is accounted for once the queue has drained (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let d = loop {
        let d = dump(w.admin).await;
        let t = &d["tracing"];
        let total = t["exported"].as_u64().unwrap_or(0)
            + t["dropped_queue_full"].as_u64().unwrap_or(0)
            + t["dropped_export_failed"].as_u64().unwrap_or(0);
        if total == N || tokio::time::Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let t = &d["tracing"];
    assert_eq!(t["exported"], 0, "{d}");
    assert!(t["dropped_export_failed"].as_u64().unwrap_or(0) >= 1, "{d}");
    assert!(t["dropped_queue_full"].as_u64().unwrap_or(0) >= 1, "{d}");
    assert_eq!(
        t["dropped_export_failed"].as_u64().unwrap_or(0)
            + t["dropped_queue_full"].as_u64().unwrap_or(0),
        N,
        "{d}"
    );
    drop(hole);
}
