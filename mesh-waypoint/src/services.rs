//! The services the waypoint fronts: VIP lookup for the CONNECT target, the
//! endpoint choice for a service port, and the telemetry labels of both.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::Instant,
};

use mesh_agent::{
    identity::{SpiffeId, TrustDomain},
    telemetry::{PeerLabels, ServiceLabels, metrics::CLUSTER_DOMAIN},
};

use crate::{
    config::{EndpointConfig, PortProtocol, ServiceConfig, ServicePort, TunnelProtocol},
    l7::route::{OutlierPolicy, ServiceKey, Subset},
};

/// A service port a client tunnelled to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The service.
    pub service: ServiceKey,
    /// The port.
    pub port: ServicePort,
}

/// One chosen endpoint.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Through HBONE (else plaintext).
    pub hbone: bool,
    /// The backend port speaks HTTP/2 (else HTTP/1.1).
    pub http2: bool,
    /// Its telemetry labels.
    pub labels: PeerLabels,
}

/// How to reach a pod address over HBONE.
#[derive(Clone, Debug)]
pub struct HboneTarget {
    /// The pod's HBONE address (`pod_ip:15008`).
    pub hbone: SocketAddr,
    /// The identity the pod must present.
    pub identity: SpiffeId,
}

/// The HBONE port of a pod.
pub const HBONE_PORT: u16 = 15008;

/// The services index.
#[derive(Debug, Default)]
pub struct Services {
    by_vip: HashMap<(IpAddr, u16), Target>,
    by_key: HashMap<ServiceKey, ServiceConfig>,
    trust_domain: String,
    outliers: HashMap<ServiceKey, OutlierPolicy>,
    /// Per endpoint address: consecutive errors and ejection.
    health: Mutex<HashMap<SocketAddr, Health>>,
}

/// One endpoint's outlier-detection state.
#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// What a try of a request to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryResult {
    /// A response with this status.
    Status(u16),
    /// No connection, or a reset before the response.
    Failure,
}

impl Services {
    /// Applies DestinationRule `outlierDetection` policies (by service).
    pub fn with_outliers(mut self, outliers: HashMap<ServiceKey, OutlierPolicy>) -> Self {
        self.outliers = outliers;
        self
    }

    /// Records a try's result for `service`'s endpoint `addr`: consecutive
    /// errors past the policy eject it for the base time × its ejections so
    /// far, unless the service is at its ejection cap.
    pub fn report(&self, service: &ServiceKey, addr: SocketAddr, result: TryResult) {
        let Some(policy) = self.outliers.get(service) else {
            return;
        };
        let (server_error, gateway_error) = match result {
            TryResult::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504)),
            TryResult::Failure => (true, true),
        };
        let now = Instant::now();
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let h = health.entry(addr).or_default();
        h.consecutive_5xx = if server_error {
            h.consecutive_5xx + 1
        } else {
            0
        };
        h.consecutive_gateway = if gateway_error {
            h.consecutive_gateway + 1
        } else {
            0
        };
        let trips = policy
            .consecutive_5xx
            .is_some_and(|n| h.consecutive_5xx >= n)
            || policy
                .consecutive_gateway
                .is_some_and(|n| h.consecutive_gateway >= n);
        if !trips || h.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        let total = self.by_key.get(service).map_or(0, |s| s.endpoints.len());
        let ejected = self.by_key.get(service).map_or(0, |s| {
            s.endpoints
                .iter()
                .filter(|e| {
                    s.ports.iter().any(|sp| {
                        let a = SocketAddr::new(
                            e.address,
                            e.port.or(sp.target_port).unwrap_or(sp.port),
                        );
                        health
                            .get(&a)
                            .and_then(|h| h.ejected_until)
                            .is_some_and(|t| t > now)
                    })
                })
                .count()
        });
        let cap = (total * policy.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            return;
        }
        let Some(h) = health.get_mut(&addr) else {
            return;
        };
        h.ejections += 1;
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        let length = policy.base_ejection * h.ejections.min(10);
        h.ejected_until = Some(now + length);
        tracing::warn!(service = %service, endpoint = %addr, ejection_s = length.as_secs_f64(), "endpoint ejected by outlier detection");
    }

    fn ejected(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)
            .and_then(|h| h.ejected_until)
            .is_some_and(|t| t > now)
    }

    /// Indexes `services`; principals of endpoints are in `trust_domain`.
    pub fn new(services: &[ServiceConfig], trust_domain: &str) -> Self {
        let mut s = Self {
            trust_domain: trust_domain.to_owned(),
            ..Self::default()
        };
        for svc in services {
            let key = ServiceKey {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            };
            for ip in &svc.addresses {
                for port in &svc.ports {
                    let target = Target {
                        service: key.clone(),
                        port: port.clone(),
                    };
                    s.by_vip.insert((ip.to_canonical(), port.port), target);
                }
            }
            s.by_key.insert(key, svc.clone());
        }
        s
    }

    /// The service port behind a CONNECT target (a VIP and port).
    pub fn by_vip(&self, addr: SocketAddr) -> Option<&Target> {
        self.by_vip.get(&(addr.ip().to_canonical(), addr.port()))
    }

    /// An endpoint of `service`:`port` (of `subset`: carrying its labels),
    /// at random (uniform); None without endpoints.
    pub fn endpoint(
        &self,
        service: &ServiceKey,
        port: u16,
        subset: Option<&Subset>,
    ) -> Option<Chosen> {
        let svc = self.by_key.get(service)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        let in_subset = |e: &&EndpointConfig| {
            subset.is_none_or(|s| s.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
        };
        let candidates: Vec<&EndpointConfig> = svc.endpoints.iter().filter(in_subset).collect();
        if candidates.is_empty() {
            return None;
        }
        let pod_addr = |e: &EndpointConfig| {
            SocketAddr::new(e.address, e.port.or(sp.target_port).unwrap_or(sp.port))
        };
        // Ejected endpoints are skipped while any other is left.
        let healthy: Vec<&EndpointConfig> = if self.outliers.contains_key(service) {
            candidates
                .iter()
                .copied()
                .filter(|e| !self.ejected(pod_addr(e)))
                .collect()
        } else {
            Vec::new()
        };
        let pool = if healthy.is_empty() {
            &candidates
        } else {
            &healthy
        };
        let e = pool[fastrand::usize(..pool.len())];
        let pod_port = e.port.or(sp.target_port).unwrap_or(sp.port);
        Some(Chosen {
            addr: SocketAddr::new(e.address, pod_port),
            hbone: e.tunnel == TunnelProtocol::Hbone,
            http2: sp.protocol == PortProtocol::Http2,
            labels: self.endpoint_labels(svc, e),
        })
    }

    /// Every HBONE endpoint's pod address (per service port) and how to
    /// reach it; the identity is the pod's service account (`default` when
    /// unnamed, as in Kubernetes) in the service's namespace.
    pub fn hbone_targets(&self, trust_domain: &TrustDomain) -> HashMap<SocketAddr, HboneTarget> {
        let mut targets = HashMap::new();
        for svc in self.by_key.values() {
            for e in svc
                .endpoints
                .iter()
                .filter(|e| e.tunnel == TunnelProtocol::Hbone)
            {
                let sa = e.service_account.as_deref().unwrap_or("default");
                let Ok(identity) = SpiffeId::new(trust_domain.clone(), &svc.namespace, sa) else {
                    tracing::warn!(service = %svc.name, namespace = %svc.namespace, service_account = sa, "endpoint identity is not a valid SPIFFE ID; its requests fail");
                    continue;
                };
                let hbone = SocketAddr::new(e.address, e.hbone_port.unwrap_or(HBONE_PORT));
                for sp in &svc.ports {
                    let pod_port = e.port.or(sp.target_port).unwrap_or(sp.port);
                    let target = HboneTarget {
                        hbone,
                        identity: identity.clone(),
                    };
                    targets.insert(SocketAddr::new(e.address, pod_port), target);
                }
            }
        }
        targets
    }

    fn endpoint_labels(&self, svc: &ServiceConfig, e: &EndpointConfig) -> PeerLabels {
        let label = |keys: &[&str]| keys.iter().find_map(|k| e.labels.get(*k)).cloned();
        let mut p = PeerLabels::unknown();
        let workload = e.workload.clone().unwrap_or_else(|| p.workload.clone());
        p.namespace = svc.namespace.clone();
        if let Some(sa) = &e.service_account {
            p.principal = format!(
                "spiffe://{}/ns/{}/sa/{sa}",
                self.trust_domain, svc.namespace
            );
        }
        if let Some(app) = label(&["app", "app.kubernetes.io/name"]) {
            p.app = app;
        }
        if let Some(v) = label(&["version", "app.kubernetes.io/version"]) {
            p.version = v;
        }
        p.canonical_service = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload.clone());
        p.canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned());
        p.workload = workload;
        p
    }
}

/// The `destination_service*` labels of a service.
pub fn service_labels(key: &ServiceKey) -> ServiceLabels {
    ServiceLabels {
        host: format!("{}.{}.svc.{CLUSTER_DOMAIN}", key.name, key.namespace),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
    }
}
