//! `mesh-waypoint`: the mesh's L7 proxy, compatible with Istio ambient's
//! waypoints. Node agents send a service's traffic to it over HBONE (mTLS,
//! HTTP/2 CONNECT to the service's VIP:port); it terminates the tunnel under
//! its own SPIFFE identity, detects the inner protocol and, for HTTP/1.1 and
//! HTTP/2 (prior knowledge), routes each request by the Gateway API
//! `HTTPRoute`s attached to the service (GAMMA), reporting Istio's request
//! metrics (`reporter="waypoint"`) and one access-log line per request.
//! Anything else is relayed as TCP to an endpoint of the service.
//!
//! Endpoints marked `tunnel: hbone` are reached over HBONE (mTLS under the
//! waypoint's identity, the pod's identity required; the agent's
//! [`mesh_agent::proxy::hbone::Pool`]); others over plaintext TCP. Istio
//! `VirtualService` `http:` routes (retries with a budget, timeouts, faults,
//! mirrors, rewrites) are supported too; DestinationRules are compiled and
//! endpoints picked by the node agent's routing engine (`mesh-routing`).
//! The node agents send `istio.io/use-waypoint` services' traffic here.
//!
//! Modules (imports flow down this list, never back up):
//! - [`admin`]: `/healthz/ready`, `/metrics`, `/config_dump`.
//! - [`server`]: HBONE termination, protocol detection, TCP relay; uses
//!   `mesh_agent::identity` (TLS, SPIFFE) and `mesh_agent::proxy::hbone`.
//! - [`http`]: the hyper server on a tunnel stream, the backend clients, the
//!   retries and their budget, the per-request telemetry.
//! - [`upstream`]: HBONE to the backend pods (the agent's `hbone::Pool`).
//! - [`metrics`]: the `istio_request*` families (peer labels from
//!   `mesh_agent::telemetry`).
//! - [`services`]: VIP and endpoint lookup.
//! - [`otlp`]: the bounded OTLP export of the request spans.
//! - [`trace`]: W3C `traceparent` propagation (the waypoint's span).
//! - [`l7::route`]: the route model (pure).
//! - [`kube`]: Kubernetes mode, the configuration from the agent's
//!   Kubernetes source (`mesh_agent::sync::kube`); uses [`shared`], [`config`].
//! - [`config`]: the configuration file.
#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod http;
pub mod kube;
pub mod l7;
pub mod metrics;
pub mod otlp;
pub mod server;
pub mod services;
pub mod shared;
pub mod stream;
pub mod trace;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc};

use mesh_agent::{
    identity::{CertManager, CertificateProvider, MeshTls, SpiffeId, TlsSetupError},
    proxy::limits::Limits,
};
use tokio::{net::TcpListener, task::JoinHandle};

pub use crate::shared::Settings;
use crate::{config::WaypointConfig, shared::Shared};

/// Why the waypoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS configuration cannot be built.
    #[error("cannot set up the waypoint's TLS: {0}")]
    Tls(#[from] TlsSetupError),
    /// The identity is not in the issuer's trust domain.
    #[error(
        "the waypoint identity {identity} is not in the trust domain {trust_domain} of the CA; pass an --identity in that trust domain"
    )]
    TrustDomain {
        /// The identity.
        identity: SpiffeId,
        /// The issuer's trust domain.
        trust_domain: String,
    },
    /// A listener cannot be bound.
    #[error("cannot listen on {addr}: {source}; is the address in use?")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running waypoint; dropping it stops it.
#[derive(Debug)]
pub struct Running {
    /// The HBONE listener's address.
    pub hbone: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
    /// What the listeners share.
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Running {
    /// Also serves readiness and metrics only (not the configuration dump)
    /// on `addr`, for Prometheus; its address. At most
    /// [`admin::MAX_CONNECTIONS`] connections at once.
    pub async fn serve_metrics(&mut self, addr: SocketAddr) -> Result<SocketAddr, StartError> {
        self.serve_endpoints(addr, admin::Endpoints::Metrics).await
    }

    /// Also serves readiness only on `addr`, for the kubelet's probes,
    /// capped per source address (see [`admin`]); its address.
    pub async fn serve_readiness(&mut self, addr: SocketAddr) -> Result<SocketAddr, StartError> {
        self.serve_endpoints(addr, admin::Endpoints::Readiness)
            .await
    }

    async fn serve_endpoints(
        &mut self,
        addr: SocketAddr,
        endpoints: admin::Endpoints,
    ) -> Result<SocketAddr, StartError> {
        let listen = |source| StartError::Listen { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(listen)?;
        let local = listener.local_addr().map_err(listen)?;
        self.tasks.push(tokio::spawn(admin::serve(
            Arc::clone(&self.shared),
            listener,
            endpoints,
        )));
        tracing::info!(listener = %local, endpoints = ?endpoints, "waypoint admin endpoints listening");
        Ok(local)
    }

    /// Waits until the listeners stop (they do not, unless aborted).
    pub async fn wait(mut self) {
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

/// Drops idle HBONE connections to backends and rotates the waypoint's
/// certificate ahead of expiry, periodically.
async fn sweep(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tick.tick().await;
        shared.proxy.sweep();
        shared.tls.manager().rotate_due().await;
    }
}

/// Re-reads the configuration file `path` every `interval` and applies each
/// new valid content ([`Shared::reload`]); a file that cannot be read or
/// parsed is logged once per content and the configuration in force stays.
pub async fn watch_config(
    shared: Arc<Shared>,
    path: std::path::PathBuf,
    interval: std::time::Duration,
) {
    let mut last: Option<Vec<u8>> = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(bytes) = tokio::fs::read(&path).await else {
            if last.take().is_some() {
                tracing::error!(file = %path.display(), "waypoint configuration unreadable; keeping the configuration in force");
            }
            continue;
        };
        if last.as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        last = Some(bytes.clone());
        match WaypointConfig::parse(&String::from_utf8_lossy(&bytes)) {
            Ok(config) => {
                let generation = shared.reload(&config);
                tracing::info!(file = %path.display(), generation, "waypoint configuration reloaded");
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "waypoint configuration rejected; keeping the configuration in force");
            }
        }
    }
}

/// [`start_with`] with the default [`Settings`].
pub async fn start(
    identity: SpiffeId,
    provider: Arc<dyn CertificateProvider>,
    config: &WaypointConfig,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<Running, StartError> {
    start_with(
        identity,
        provider,
        config,
        listen,
        admin,
        Settings::default(),
    )
    .await
}

/// [`start_with`] bounded by `limits`, the other settings the defaults.
pub async fn start_with_limits(
    identity: SpiffeId,
    provider: Arc<dyn CertificateProvider>,
    config: &WaypointConfig,
    listen: SocketAddr,
    admin: SocketAddr,
    limits: Limits,
) -> Result<Running, StartError> {
    let settings = Settings {
        limits,
        ..Settings::default()
    };
    start_with(identity, provider, config, listen, admin, settings).await
}

/// Starts a waypoint with `identity`, certificates from `provider`, serving
/// `config`, with HBONE on `listen` and the admin endpoint on `admin`,
/// bounded by `settings` (the agent's limits: connections, per-peer caps,
/// deadlines; the stream idle timeout) from its first connection on.
pub async fn start_with(
    identity: SpiffeId,
    provider: Arc<dyn CertificateProvider>,
    config: &WaypointConfig,
    listen: SocketAddr,
    admin: SocketAddr,
    settings: Settings,
) -> Result<Running, StartError> {
    let trust_domain = provider.trust_domain().clone();
    if identity.trust_domain() != &trust_domain {
        return Err(StartError::TrustDomain {
            identity,
            trust_domain: trust_domain.to_string(),
        });
    }
    let tls = Arc::new(MeshTls::new(Arc::new(CertManager::new(provider)))?);
    // Its own certificate is asked for now (a remote CA: before the first
    // client waits for it); a failure is retried per handshake, fail closed.
    tls.manager().prefetch([&identity]);
    let shared = Arc::new(Shared::new(identity, tls, config, settings));
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    };
    let hbone = bind(listen).await?;
    let admin_listener = bind(admin).await?;
    let (hbone_addr, admin_addr) = (
        hbone.local_addr().map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?,
        admin_listener
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: admin,
                source,
            })?,
    );
    let tasks = vec![
        tokio::spawn(server::serve(Arc::clone(&shared), hbone)),
        tokio::spawn(admin::serve(
            Arc::clone(&shared),
            admin_listener,
            admin::Endpoints::Admin,
        )),
        tokio::spawn(sweep(Arc::clone(&shared))),
    ];
    tracing::info!(hbone = %hbone_addr, admin = %admin_addr, "waypoint listening");
    Ok(Running {
        hbone: hbone_addr,
        admin: admin_addr,
        shared,
        tasks,
    })
}
