//! The admin endpoint: `/healthz/ready`, `/metrics` (OpenMetrics text of the
//! request metrics) and `/config_dump` (services, accepted routes, and every
//! unsupported route field with its effect; the bounds and their usage).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_agent::telemetry::metrics::CONTENT_TYPE;
use serde_json::json;
use tokio::net::TcpListener;

use crate::shared::{Active, Shared};

/// Serves the admin endpoints on `listener` forever.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(answer(&shared, &req)) }
            });
            // A client must send its request's head in time (hyper
            // applies its header timeout only with a timer).
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(crate::http::HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Every destination (service port, subset) with its effective policy and
/// its endpoints' balancer state (active requests, ejections).
fn destinations(shared: &Shared, active: &Active) -> Vec<serde_json::Value> {
    let now = std::time::Instant::now();
    active
        .services
        .destinations()
        .view()
        .iter()
        .flat_map(|s| s.destinations.iter())
        .map(|d| {
            let endpoints: Vec<serde_json::Value> = d
                .endpoints
                .iter()
                .map(|e| {
                    let st = shared.balancer.status(*e, now);
                    json!({
                        "address": e.to_string(),
                        "active": st.active,
                        "consecutive_errors": st.consecutive_errors,
                        "ejected": st.ejected,
                        "times_ejected": st.times_ejected,
                    })
                })
                .collect();
            json!({
                "destination": d.key.as_ref(),
                "rule": d.rule.as_deref(),
                "policy": d.policy,
                "endpoints": endpoints,
            })
        })
        .collect()
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz/ready" => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/metrics" => match shared.metrics.encode() {
            Ok(m) => text(StatusCode::OK, CONTENT_TYPE, m),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "cannot encode the metrics\n".into(),
            ),
        },
        "/config_dump" => {
            let active = shared.active();
            let dump = json!({
                "identity": shared.identity.to_string(),
                "generation": active.generation,
                "routes": {
                    "accepted": active.routes.accepted,
                    "attached": active.routes.attached(),
                    "unsupported": active.routes.unsupported,
                },
                "destinations": destinations(shared, &active),
                "policies": {
                    "gateway": format!("{}/{}", active.gateway.0, active.gateway.1),
                    "in_force": active.policies.names().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "errors": active.policy_report.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "warnings": active.policy_report.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
                },
                "tracing": shared.spans.get().map(crate::otlp::SpanSink::dump),
                // The agent's bounds as the agent shows them: the limits,
                // the descriptor limit they were sized from, the usage.
                "limits": shared.bounds.to_json(),
                "stream_idle_timeout_ms": u64::try_from(shared.stream_idle_timeout().as_millis()).unwrap_or(u64::MAX),
            });
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
