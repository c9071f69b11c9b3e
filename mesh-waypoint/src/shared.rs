//! What the waypoint's connections share: its identity and TLS, the
//! configuration in force (replaced whole on a reload), the metrics, the
//! backend client and the connection bounds; and what one tunnel knows of
//! its client.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_agent::{
    identity::{MeshTls, SpiffeId, TrustDomain},
    process::FdLimit,
    proxy::limits::{ActivityGuard, Bounds, Limits, StreamPermit},
    telemetry::PeerLabels,
};

use tokio_util::sync::CancellationToken;

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
    /// A tunnel stream moving no byte either way this long is reset
    /// (milliseconds; see [`Shared::set_stream_idle_timeout`]).
    stream_idle_ms: AtomicU64,
    /// [`Settings::default_virtual_service_export_to`], for every reload.
    default_export_to: Vec<String>,
}

/// Default of [`Shared::stream_idle_timeout`]: 1 h, Istio's idle timeout
/// for TCP (Envoy's `idle_timeout`).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What bounds a waypoint from its first connection on (its command line).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The agent's caps and deadlines (connections, streams, handshakes).
    pub limits: Limits,
    /// The file-descriptor limit `limits` were sized from, as reported in
    /// `/config_dump` `limits.fd_limit` (`Limits::for_this_process`'s).
    pub fd_limit: FdLimit,
    /// The first [`Shared::stream_idle_timeout`] (`--stream-idle-timeout`).
    pub stream_idle_timeout: Duration,
    /// The `exportTo` of a VirtualService that sets none (Istio's
    /// `defaultVirtualServiceExportTo`, `--default-virtual-service-export-to`):
    /// `*` (Istio's default) or `.` (its own namespace's clients only).
    pub default_virtual_service_export_to: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            fd_limit: FdLimit::default(),
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            default_virtual_service_export_to: vec!["*".to_owned()],
        }
    }
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
    /// The AuthorizationPolicies this waypoint enforces.
    pub policies: mesh_policy::WaypointPolicies,
    /// What became of them (rejected ones fail closed; unsupported fields).
    pub policy_report: mesh_policy::Report,
    /// The Gateway this waypoint is (`namespace`, `name`).
    pub gateway: (String, String),
}

impl Shared {
    /// Everything a waypoint with `identity` serving `config`, bounded by
    /// `settings`, needs.
    pub fn new(
        identity: SpiffeId,
        tls: Arc<MeshTls>,
        config: &WaypointConfig,
        settings: Settings,
    ) -> Self {
        let default_export_to = settings.default_virtual_service_export_to;
        let active = Active::build(config, &identity, tls.trust_domain(), &default_export_to, 1);
        let targets = active.services.hbone_targets(tls.trust_domain());
        let bounds = Arc::new(Bounds::new(settings.limits, settings.fd_limit));
        let hbone = HboneConnector::new(
            Arc::clone(&tls),
            identity.clone(),
            Arc::clone(&bounds),
            targets,
        );
        Self {
            proxy: Proxy::new(hbone),
            identity,
            tls,
            active: RwLock::new(Arc::new(active)),
            metrics: Metrics::new(),
            bounds,
            balancer: mesh_routing::Balancer::default(),
            spans: OnceLock::new(),
            stream_idle_ms: AtomicU64::new(millis(settings.stream_idle_timeout).max(1)),
            default_export_to,
        }
    }

    /// How long a tunnel stream may move no byte in either direction before
    /// it is reset: a request or upgraded connection whose client stopped
    /// reading (or writing) cannot hold its slots, its backend connection
    /// and its destination's `maxConnections` share for ever.
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_ms.load(Ordering::Relaxed))
    }

    /// Sets [`Self::stream_idle_timeout`] for the streams opened from now on
    /// (`--stream-idle-timeout`; at least 1 ms).
    pub fn set_stream_idle_timeout(&self, idle: Duration) {
        self.stream_idle_ms
            .store(millis(idle).max(1), Ordering::Relaxed);
    }
}

/// `d` in whole milliseconds (saturating).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Active {
    fn build(
        config: &WaypointConfig,
        identity: &SpiffeId,
        trust_domain: &TrustDomain,
        default_export_to: &[String],
        generation: u64,
    ) -> Self {
        let services = Services::new(
            &config.services,
            &config.workloads,
            trust_domain.as_str(),
            &config.destination_rules(),
        );
        let routes = RouteTable::build(
            &config.services,
            services.destinations(),
            &config.route_objects(),
            default_export_to,
        );
        let (policies, policy_report) = compile_policies(config);
        for e in &policy_report.errors {
            tracing::warn!(error = %e, "waypoint policy error");
        }
        for w in &policy_report.warnings {
            tracing::warn!(warning = %w, "waypoint policy warning");
        }
        let gateway = config.gateway.as_ref().map_or_else(
            || {
                (
                    identity.namespace().to_owned(),
                    identity.service_account().to_owned(),
                )
            },
            |g| (g.namespace.clone(), g.name.clone()),
        );
        tracing::info!(
            generation,
            policies = policies.len(),
            services = config.services.len(),
            routes = routes.accepted.len(),
            unsupported = routes.unsupported.len(),
            "waypoint configured"
        );
        Self {
            generation,
            services,
            routes,
            policies,
            policy_report,
            gateway,
        }
    }
}

/// Compiles the configuration's AuthorizationPolicies (parse errors first
/// in the report: a policy that cannot be read fails closed at the node
/// agents, and is reported here).
fn compile_policies(
    config: &WaypointConfig,
) -> (mesh_policy::WaypointPolicies, mesh_policy::Report) {
    let root = config
        .root_namespace
        .as_deref()
        .unwrap_or(mesh_policy::DEFAULT_ROOT_NAMESPACE);
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for (i, value) in config.policies.iter().enumerate() {
        let mut parsed = mesh_policy::parse_value(value.clone(), i);
        resources.append(&mut parsed.resources);
        errors.append(&mut parsed.errors);
    }
    let (policies, mut report) = mesh_policy::WaypointPolicies::build(root, &resources);
    report.prepend_errors(errors);
    (policies, report)
}

impl Active {
    /// Decides a request (`request`; `None`: an opaque TCP stream) on
    /// `tunnel` by the AuthorizationPolicies attached to this waypoint or
    /// to the service the client addressed (none for a pod addressed by
    /// its own IP).
    pub fn authorize(
        &self,
        tunnel: &Tunnel,
        request: Option<&mesh_policy::HttpRequest<'_>>,
    ) -> mesh_policy::Decision {
        let principal = tunnel.peer_id.to_string();
        let conn = mesh_policy::Connection {
            source_principal: Some(&principal),
            source_ip: tunnel.peer.ip(),
            remote_ip: None,
            destination_ip: tunnel.vip.ip(),
            destination_port: tunnel.vip.port(),
        };
        // A pod addressed by its own IP has no Service: only the policies
        // attached to the waypoint (its Gateway, the GatewayClass) apply.
        let (service_namespace, service_name) = tunnel
            .target
            .service()
            .map_or(("", ""), |s| (s.namespace.as_str(), s.name.as_str()));
        let target = mesh_policy::WaypointTarget {
            waypoint_namespace: &self.gateway.0,
            waypoint_name: &self.gateway.1,
            service_namespace,
            service_name,
        };
        self.policies.evaluate(&target, &conn, request)
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
        let active = Active::build(
            config,
            &self.identity,
            self.tls.trust_domain(),
            &self.default_export_to,
            slot.generation + 1,
        );
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
    /// The service port (or pod port) the client CONNECTed to.
    pub target: Target,
    /// The address it CONNECTed to (the service VIP, or the pod's address,
    /// and port).
    pub vip: SocketAddr,
    /// The tunnel's TCP peer.
    pub peer: SocketAddr,
    /// Its authenticated identity.
    pub peer_id: SpiffeId,
    /// Its telemetry labels.
    pub source: PeerLabels,
    /// The stream's slots of the agent's bounds (its peer's stream cap, the
    /// global cap) and its mark on its connection's idle deadline: held as
    /// long as anything serving the stream holds the tunnel, an upgraded
    /// connection's relay included.
    pub slots: (StreamPermit, ActivityGuard),
    /// Cancelled when the tunnel stream is reset (an error, or no byte
    /// either way for the stream idle timeout): a relay serving it (TCP,
    /// an upgraded connection) ends at once and drops its backend
    /// connection, which the pipe's half-close alone would leave open for
    /// as long as the backend says nothing.
    pub reset: CancellationToken,
}
