//! The waypoint's pooled HTTP client to the backends (plaintext, h2c, or
//! HBONE through the agent's tunnel pool), the body types it carries, and
//! the retry budget every route shares.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::upstream::HboneConnector;

/// How long a backend connection may take to establish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled backend connections are closed after this time.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle pooled connections per backend endpoint.
pub const POOL_MAX_IDLE_PER_ENDPOINT: usize = 64;
/// A response body as the waypoint sends it.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;
/// A request body as the waypoint sends it to a backend.
pub type BackendBody = UnsyncBoxBody<Bytes, hyper::Error>;
/// The retry budget: each request earns 0.2 retries (20 % extra load at
/// most), up to a reserve of 10.
pub const RETRY_BUDGET_RATIO_MILLI: u64 = 200;
/// The retry budget's reserve (and its starting value), in retries.
pub const RETRY_BUDGET_RESERVE: u64 = 10;

/// Bounds retries to [`RETRY_BUDGET_RATIO_MILLI`] of the requests plus a
/// reserve, so that retries cannot multiply an outage's load.
#[derive(Debug)]
pub struct RetryBudget {
    milli: AtomicU64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            milli: AtomicU64::new(RETRY_BUDGET_RESERVE * 1000),
        }
    }
}

impl RetryBudget {
    /// A request arrived: it earns its share.
    pub fn deposit(&self) {
        let cap = RETRY_BUDGET_RESERVE * 1000;
        let _ = self
            .milli
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m + RETRY_BUDGET_RATIO_MILLI).min(cap))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.milli
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                m.checked_sub(1000)
            })
            .is_ok()
    }
}

/// Mirrors in flight at most (a slow mirror backend cannot pile them up).
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// The pooled client to the backends.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) client: Client<HttpConnector, BackendBody>,
    pub(crate) hbone: Client<HboneConnector, BackendBody>,
    pub(crate) client_h2: Client<HttpConnector, BackendBody>,
    pub(crate) hbone_h2: Client<HboneConnector, BackendBody>,
    pub(crate) connector: HboneConnector,
    /// The retry budget shared by every route.
    pub budget: RetryBudget,
    pub(crate) mirrors: Arc<tokio::sync::Semaphore>,
}

impl Proxy {
    /// Replaces the HBONE endpoints (a configuration reload).
    pub fn set_hbone_targets(
        &self,
        targets: std::collections::HashMap<std::net::IpAddr, crate::services::HboneTarget>,
    ) {
        self.connector.set_targets(targets);
    }

    /// Drops idle HBONE tunnel connections (run periodically).
    pub fn sweep(&self) {
        self.connector.sweep();
    }

    /// Clients keeping connections to backends pooled: plaintext, and
    /// through `hbone` for HBONE endpoints.
    pub fn new(hbone: HboneConnector) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let builder = |http2: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            // The timer runs the pool's idle sweep: without it idle
            // connections (and the tunnel streams under them) stay until
            // their endpoint is used again.
            b.pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(POOL_MAX_IDLE_PER_ENDPOINT)
                .http2_only(http2);
            b
        };
        Self {
            client: builder(false).build(connector.clone()),
            hbone: builder(false).build(hbone.clone()),
            client_h2: builder(true).build(connector),
            hbone_h2: builder(true).build(hbone.clone()),
            connector: hbone,
            budget: RetryBudget::default(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
        }
    }
}
