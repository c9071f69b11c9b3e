//! The admin endpoints. The admin listener (`--admin`, loopback by
//! default, as Envoy's admin port) serves `/healthz/ready`, `/metrics`
//! (OpenMetrics text of the request metrics) and `/config_dump` (services,
//! accepted routes, and every unsupported route field with its effect;
//! policies; the bounds and their usage). The metrics listener
//! (`--metrics`, reachable by Prometheus and the kubelet, so by any pod)
//! serves only `/healthz/ready` and `/metrics`: the configuration dump
//! tells whoever asks which policies guard which services. Each of those
//! listeners holds at most [`MAX_CONNECTIONS`] connections (the agent's
//! admin server). The readiness listener (`--readiness`, the kubelet's
//! probes) serves only `/healthz/ready` within the agent's readiness caps
//! ([`ListenerCaps::READINESS`]: few connections per source address, many
//! in all, one request each, its head within 2 s): one pod cannot keep the
//! kubelet's probe out and have the waypoint marked unready and restarted,
//! nor take its descriptors.

use std::sync::Arc;

use http::{Method, StatusCode};
use mesh_agent::{
    admin::server::{self, ListenerCaps, Reply},
    telemetry::metrics::CONTENT_TYPE,
};
use serde_json::json;
use tokio::net::TcpListener;

use crate::shared::{Active, Shared};

/// The most connections each admin listener holds at once (beyond, closed
/// at once): a flood from a pod takes neither descriptors nor the runtime.
pub const MAX_CONNECTIONS: usize = server::MAX_CONNECTIONS;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// Everything: readiness, metrics and the configuration dump.
    Admin,
    /// Readiness and metrics only.
    Metrics,
    /// Readiness only (the kubelet's probes), within
    /// [`ListenerCaps::READINESS`].
    Readiness,
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, endpoints: Endpoints) {
    let caps = match endpoints {
        Endpoints::Admin | Endpoints::Metrics => ListenerCaps::ADMIN,
        Endpoints::Readiness => ListenerCaps::READINESS,
    };
    server::serve_with(listener, caps, move |method, path, _query| {
        if method != Method::GET && method != Method::HEAD {
            return Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET or HEAD\n",
            );
        }
        answer(&shared, path, endpoints)
    })
    .await;
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

fn answer(shared: &Shared, path: &str, endpoints: Endpoints) -> Reply {
    match path {
        "/healthz/ready" => Reply::new(StatusCode::OK, "text/plain", "ready\n"),
        "/metrics" if endpoints != Endpoints::Readiness => match shared.metrics.encode() {
            Ok(m) => Reply::new(StatusCode::OK, CONTENT_TYPE, m),
            Err(_) => Reply::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "cannot encode the metrics\n",
            ),
        },
        "/config_dump" if endpoints == Endpoints::Admin => {
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
            Reply::new(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => Reply::new(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
