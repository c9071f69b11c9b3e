//! What the waypoint's connections share: its identity and TLS, the
//! configuration in force (replaced whole on a reload), the metrics, the
//! backend client and the connection bounds; and what one tunnel knows of
//! its client.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock, PoisonError, RwLock},
};

use mesh_agent::{
    identity::{MeshTls, SpiffeId, TrustDomain},
    proxy::limits::{Bounds, Limits},
    telemetry::PeerLabels,
};

use crate::{
    client::Proxy,
    config::WaypointConfig,
    l7::route::RouteTable,
    metrics::Metrics,
    otlp::{OtlpConfig, OtlpError, SpanSink},
    services::{Services, Target},
    upstream::HboneConnector,
};

/// What the waypoint knows and shares between its connections.
#[derive(Debug)]
pub struct Shared {
    /// The waypoint's own identity.
    pub identity: SpiffeId,
    /// Its TLS configurations (the agent's identity code).
    pub tls: Arc<MeshTls>,
    /// The configuration in force (replaced whole on a reload).
    active: RwLock<Arc<Active>>,
    /// The request metrics.
    pub metrics: Metrics,
    /// The HTTP client to the backends.
    pub proxy: Proxy,
    /// The agent's connection bounds: global and per-peer connection and
    /// stream caps, handshake, first-request and idle deadlines.
    pub bounds: Arc<Bounds>,
    /// The endpoint choice (the routing engine's balancer: active requests,
    /// cursors, outlier ejections), kept across reloads.
    pub balancer: mesh_routing::Balancer,
    /// The OTLP span export, once [`Shared::export_spans`] started it.
    pub spans: OnceLock<SpanSink>,
}

/// The services and routes in force, and which configuration they came from.
#[derive(Debug)]
pub struct Active {
    /// 1 for the configuration at start, +1 per reload.
    pub generation: u64,
    /// The services the waypoint fronts.
    pub services: Services,
    /// The compiled routes.
    pub routes: RouteTable,
}

impl Shared {
    /// Everything a waypoint with `identity` serving `config` needs.
    pub fn new(
        identity: SpiffeId,
        tls: Arc<MeshTls>,
        config: &WaypointConfig,
        limits: Limits,
    ) -> Self {
        let active = Active::build(config, tls.trust_domain(), 1);
        let targets = active.services.hbone_targets(tls.trust_domain());
        let hbone = HboneConnector::new(Arc::clone(&tls), identity.clone(), targets);
        Self {
            proxy: Proxy::new(hbone),
            identity,
            tls,
            active: RwLock::new(Arc::new(active)),
            metrics: Metrics::new(),
            bounds: Arc::new(Bounds::new(limits, mesh_agent::process::FdLimit::default())),
            balancer: mesh_routing::Balancer::default(),
            spans: OnceLock::new(),
        }
    }
}

impl Active {
    fn build(config: &WaypointConfig, trust_domain: &TrustDomain, generation: u64) -> Self {
        let services = Services::new(
            &config.services,
            trust_domain.as_str(),
            &config.destination_rules(),
        );
        let routes = RouteTable::build(
            &config.services,
            services.destinations(),
            &config.route_objects(),
        );
        tracing::info!(
            generation,
            services = config.services.len(),
            routes = routes.accepted.len(),
            unsupported = routes.unsupported.len(),
            "waypoint configured"
        );
        Self {
            generation,
            services,
            routes,
        }
    }
}

impl Shared {
    /// The configuration in force (a request keeps the one it started with).
    pub fn active(&self) -> Arc<Active> {
        Arc::clone(&self.active.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the services and routes with `config`'s; requests in flight
    /// finish with the previous ones. Returns the new generation.
    pub fn reload(&self, config: &WaypointConfig) -> u64 {
        let mut slot = self.active.write().unwrap_or_else(PoisonError::into_inner);
        let active = Active::build(config, self.tls.trust_domain(), slot.generation + 1);
        self.proxy
            .set_hbone_targets(active.services.hbone_targets(self.tls.trust_domain()));
        self.balancer.prune(active.services.destinations());
        let generation = active.generation;
        *slot = Arc::new(active);
        generation
    }
}

impl Shared {
    /// Starts exporting one span per sampled request to `config`'s
    /// collector; the spans carry the waypoint's identity as Istio's
    /// resource attributes. A second call keeps the first export.
    pub fn export_spans(&self, config: OtlpConfig) -> Result<(), OtlpError> {
        if self.spans.get().is_some() {
            return Ok(());
        }
        let id = &self.identity;
        let resource = vec![
            opentelemetry::KeyValue::new(
                "istio.canonical_service",
                id.service_account().to_owned(),
            ),
            opentelemetry::KeyValue::new("istio.namespace", id.namespace().to_owned()),
            opentelemetry::KeyValue::new("istio.mesh_id", id.trust_domain().as_str().to_owned()),
            opentelemetry::KeyValue::new("node_id", id.to_string()),
        ];
        let _ = self.spans.set(SpanSink::start(config, resource)?);
        Ok(())
    }
}

/// The client side of one tunnel, as the HTTP proxy needs it.
#[derive(Debug)]
pub struct Tunnel {
    /// The service port the client CONNECTed to.
    pub target: Target,
    /// The tunnel's TCP peer.
    pub peer: SocketAddr,
    /// Its authenticated identity.
    pub peer_id: SpiffeId,
    /// Its telemetry labels.
    pub source: PeerLabels,
}
