//! The services the waypoint fronts: VIP lookup for the CONNECT target, the
//! endpoint choice for a service port, and the telemetry labels of both.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use mesh_agent::telemetry::{PeerLabels, ServiceLabels, metrics::CLUSTER_DOMAIN};

use crate::{
    config::{EndpointConfig, ServiceConfig, ServicePort},
    l7::route::ServiceKey,
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
    /// Its telemetry labels.
    pub labels: PeerLabels,
}

/// The services index.
#[derive(Debug, Default)]
pub struct Services {
    by_vip: HashMap<(IpAddr, u16), Target>,
    by_key: HashMap<ServiceKey, ServiceConfig>,
    trust_domain: String,
}

impl Services {
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

    /// An endpoint of `service`:`port`, at random (uniform); None without endpoints.
    pub fn endpoint(&self, service: &ServiceKey, port: u16) -> Option<Chosen> {
        let svc = self.by_key.get(service)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        if svc.endpoints.is_empty() {
            return None;
        }
        let e = &svc.endpoints[fastrand::usize(..svc.endpoints.len())];
        let pod_port = e.port.or(sp.target_port).unwrap_or(sp.port);
        Some(Chosen {
            addr: SocketAddr::new(e.address, pod_port),
            labels: self.endpoint_labels(svc, e),
        })
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
