//! The services and pods the waypoint fronts: the lookup of a CONNECT
//! target (a service VIP, or a pod's own address when its waypoint takes
//! workload traffic), the endpoint choice for a service port, and the
//! telemetry labels of both.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use mesh_agent::{
    identity::{SpiffeId, TrustDomain},
    telemetry::{
        PeerLabels, ServiceLabels,
        metrics::{CLUSTER_DOMAIN, UNKNOWN},
    },
};

use mesh_routing::{
    Balancer, Dest, Ejection, EndpointInput, HttpOutcome, Objects, Options, Pick, PickError,
    RouteTable, ServiceInput,
};

use crate::{
    config::{
        EndpointConfig, PortProtocol, ServiceConfig, ServicePort, TunnelProtocol, WorkloadConfig,
    },
    l7::route::ServiceKey,
};

/// What a client tunnelled to: a service port, or a port of a pod's own
/// address.
#[derive(Clone, Debug)]
pub struct Target {
    /// The service or pod.
    pub addressed: Addressed,
    /// The port (for a pod: the port dialled, its protocol the pod's).
    pub port: ServicePort,
}

/// The object a CONNECT target names.
#[derive(Clone, Debug)]
pub enum Addressed {
    /// A service, by one of its VIPs: routes, policies attached to it and
    /// its endpoints apply.
    Service(ServiceKey),
    /// A pod by its own address (Istio's workload-addressed traffic): no
    /// route (Gateway API and Istio routes attach to services), the
    /// waypoint's own policies, and the pod itself as the backend.
    Pod(Arc<PodTarget>),
}

/// A pod whose waypoint (this one) takes its workload traffic.
#[derive(Debug)]
pub struct PodTarget {
    /// `namespace/name` of the pod.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Reached over HBONE (else plaintext).
    pub hbone: bool,
    /// Its ports speak HTTP/2 (prior knowledge) when HTTP.
    pub protocol: PortProtocol,
    /// Its telemetry labels.
    pub labels: PeerLabels,
}

impl Target {
    /// The service addressed, if a service was.
    pub fn service(&self) -> Option<&ServiceKey> {
        match &self.addressed {
            Addressed::Service(s) => Some(s),
            Addressed::Pod(_) => None,
        }
    }

    /// The `destination_service*` labels: the service's, `unknown` for a
    /// pod (as Istio reports workload-addressed requests).
    pub fn service_labels(&self) -> ServiceLabels {
        match &self.addressed {
            Addressed::Service(s) => service_labels(s),
            Addressed::Pod(_) => ServiceLabels {
                host: UNKNOWN.to_owned(),
                name: UNKNOWN.to_owned(),
                namespace: UNKNOWN.to_owned(),
            },
        }
    }
}

impl std::fmt::Display for Target {
    /// `namespace/name` of a service, `pod namespace/name` of a pod.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addressed {
            Addressed::Service(s) => write!(f, "{s}"),
            Addressed::Pod(p) => write!(f, "{p}"),
        }
    }
}

impl std::fmt::Display for PodTarget {
    /// `pod namespace/name`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pod {}/{}", self.namespace, self.name)
    }
}

/// Where a request or stream goes once routed.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// An endpoint of a service's port (of a subset), picked by the
    /// routing engine.
    Service {
        /// The service.
        service: ServiceKey,
        /// Its port.
        port: u16,
        /// The DestinationRule subset, if any.
        subset: Option<Arc<str>>,
    },
    /// The pod the client addressed by its own IP.
    Pod(Arc<PodTarget>),
}

impl Upstream {
    /// Where a tunnel to `target` goes when no route applies: the service
    /// port's endpoints, or the pod itself.
    pub fn of(target: &Target) -> Self {
        match &target.addressed {
            Addressed::Service(service) => Self::Service {
                service: service.clone(),
                port: target.port.port,
                subset: None,
            },
            Addressed::Pod(pod) => Self::Pod(Arc::clone(pod)),
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service { service, .. } => write!(f, "{service}"),
            Self::Pod(p) => write!(f, "{p}"),
        }
    }
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
    /// The destination it was picked from (its policy, its balancer key):
    /// the try's outcome is reported against it. `None`: a pod addressed
    /// by its own IP (no service, no balancing, no outlier detection).
    pub dest: Option<Arc<Dest>>,
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

/// The services index, and their destinations as the node agent's routing
/// engine compiles them: DestinationRule subsets, load balancing,
/// `connectionPool.tcp`, outlier detection and `exportTo` have one
/// implementation, `mesh-routing`, shared by both proxies.
#[derive(Debug)]
pub struct Services {
    by_vip: HashMap<(IpAddr, u16), Target>,
    /// The pods whose workload traffic this waypoint takes, by address.
    by_pod: HashMap<IpAddr, Arc<PodTarget>>,
    /// Those pods, as configured.
    pods: Vec<WorkloadConfig>,
    by_key: HashMap<ServiceKey, ServiceConfig>,
    /// Per service, its endpoints by pod address (`ip:port`).
    by_addr: HashMap<ServiceKey, HashMap<SocketAddr, EndpointConfig>>,
    trust_domain: String,
    destinations: RouteTable,
}

/// What a try of a request to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryResult {
    /// A response with this status.
    Status(u16),
    /// No connection, or a reset before the response.
    Failure,
}

/// Who asks for an endpoint (the client of the tunnel).
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The client's namespace: which DestinationRule it sees (`exportTo`).
    pub namespace: &'a str,
    /// Its address: `consistentHash.useSourceIp`, and the address family
    /// preferred among the endpoints.
    pub ip: IpAddr,
}

/// Why a request has no endpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    /// The service, port or subset does not exist (as the routing engine
    /// says why).
    #[error(transparent)]
    Missing(#[from] mesh_routing::RouteError),
    /// No endpoint is ready, or every one is ejected (503, `UH`).
    #[error("{0}")]
    Unhealthy(String),
    /// The destination is at its `connectionPool.tcp.maxConnections`
    /// (503, `UO`: refused, not queued).
    #[error("{0}")]
    Overflow(String),
}

impl Services {
    /// Indexes `services`; principals of endpoints are in `trust_domain`;
    /// `destination_rules` (raw objects, as served) are compiled by the
    /// routing engine. Problems with them are in [`Services::report`].
    pub fn new(
        services: &[ServiceConfig],
        workloads: &[WorkloadConfig],
        trust_domain: &str,
        destination_rules: &[serde_json::Value],
    ) -> Self {
        let mut by_vip = HashMap::new();
        let mut by_key = HashMap::new();
        let mut by_addr: HashMap<ServiceKey, HashMap<SocketAddr, EndpointConfig>> = HashMap::new();
        let mut inputs = Vec::with_capacity(services.len());
        for svc in services {
            let key = ServiceKey {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            };
            for ip in &svc.addresses {
                for port in &svc.ports {
                    let target = Target {
                        addressed: Addressed::Service(key.clone()),
                        port: port.clone(),
                    };
                    by_vip.insert((ip.to_canonical(), port.port), target);
                }
            }
            let addrs = by_addr.entry(key.clone()).or_default();
            for e in &svc.endpoints {
                for sp in &svc.ports {
                    addrs.insert(SocketAddr::new(e.address, pod_port(e, sp)), e.clone());
                }
            }
            inputs.push(engine_input(svc));
            by_key.insert(key, svc.clone());
        }
        let objects = Objects {
            destination_rules,
            ..Objects::default()
        };
        let destinations = mesh_routing::compile(objects, inputs, &Options::default());
        let mut by_pod = HashMap::new();
        for w in workloads {
            let pod = Arc::new(PodTarget {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                hbone: w.tunnel == TunnelProtocol::Hbone,
                protocol: w.protocol,
                labels: peer_labels(
                    trust_domain,
                    &w.namespace,
                    w.workload.as_deref().unwrap_or(&w.name),
                    w.service_account.as_deref(),
                    &w.labels,
                ),
            });
            for ip in &w.addresses {
                by_pod.insert(ip.to_canonical(), Arc::clone(&pod));
            }
        }
        Self {
            by_vip,
            by_pod,
            pods: workloads.to_vec(),
            by_key,
            by_addr,
            trust_domain: trust_domain.to_owned(),
            destinations,
        }
    }

    /// The compiled destinations (and, in its report, what became of each
    /// DestinationRule).
    pub fn destinations(&self) -> &RouteTable {
        &self.destinations
    }

    /// What a CONNECT target (a VIP and port, or a pod's address and
    /// port) names: a service port first, else a pod this waypoint takes
    /// workload traffic for.
    pub fn target(&self, addr: SocketAddr) -> Option<Target> {
        let ip = addr.ip().to_canonical();
        if let Some(t) = self.by_vip.get(&(ip, addr.port())) {
            return Some(t.clone());
        }
        let pod = self.by_pod.get(&ip)?;
        Some(Target {
            port: ServicePort {
                port: addr.port(),
                target_port: None,
                protocol: pod.protocol,
            },
            addressed: Addressed::Pod(Arc::clone(pod)),
        })
    }

    /// The backend of a request or stream to `upstream`: a service
    /// endpoint ([`Services::endpoint`], with its [`Pick`]), or the pod
    /// addressed at `dialled` (its own address, as the client dialled it).
    pub fn pick(
        &self,
        balancer: &Balancer,
        upstream: &Upstream,
        dialled: SocketAddr,
        client: Client<'_>,
        tried: &[SocketAddr],
    ) -> Result<(Chosen, Option<Pick>), NoEndpoint> {
        match upstream {
            Upstream::Service {
                service,
                port,
                subset,
            } => self
                .endpoint(balancer, service, *port, subset.as_deref(), client, tried)
                .map(|(c, p)| (c, Some(p))),
            Upstream::Pod(pod) => Ok((
                Chosen {
                    addr: SocketAddr::new(dialled.ip().to_canonical(), dialled.port()),
                    hbone: pod.hbone,
                    http2: pod.protocol == PortProtocol::Http2,
                    labels: pod.labels.clone(),
                    dest: None,
                },
                None,
            )),
        }
    }

    /// Picks an endpoint of `service`:`port` (of `subset`) for `client`
    /// with `balancer`, by the destination's load-balancing policy, skipping
    /// ejected endpoints and, while others are left, the endpoints in
    /// `tried` (Istio's retries prefer other hosts). The [`Pick`] counts the
    /// request as active on the endpoint (`LEAST_REQUEST`, `maxConnections`)
    /// until it is dropped.
    pub fn endpoint(
        &self,
        balancer: &Balancer,
        service: &ServiceKey,
        port: u16,
        subset: Option<&str>,
        client: Client<'_>,
        tried: &[SocketAddr],
    ) -> Result<(Chosen, Pick), NoEndpoint> {
        let key = service.to_string();
        let dest = self
            .destinations
            .destination(&key, port, subset, client.namespace)?;
        let dialled = SocketAddr::new(client.ip, port);
        let now = Instant::now();
        let picked = match balancer.pick(&dest, client.ip, dialled, now, tried) {
            Err(PickError::NoEndpoint(_)) if !tried.is_empty() => {
                balancer.pick(&dest, client.ip, dialled, now, &[])
            }
            other => other,
        };
        let pick = picked.map_err(|e| match e {
            PickError::Overflow { .. } => NoEndpoint::Overflow(e.to_string()),
            PickError::NoEndpoint(_) | PickError::AllEjected(_) => {
                NoEndpoint::Unhealthy(e.to_string())
            }
        })?;
        let (svc, e) = self
            .by_key
            .get(service)
            .zip(
                self.by_addr
                    .get(service)
                    .and_then(|m| m.get(&pick.endpoint)),
            )
            .ok_or_else(|| {
                NoEndpoint::Unhealthy(format!("{key}: endpoint {} is gone", pick.endpoint))
            })?;
        let http2 = svc
            .ports
            .iter()
            .find(|p| p.port == port)
            .is_some_and(|p| p.protocol == PortProtocol::Http2);
        let chosen = Chosen {
            addr: pick.endpoint,
            hbone: e.tunnel == TunnelProtocol::Hbone,
            http2,
            labels: self.endpoint_labels(svc, e),
            dest: Some(dest),
        };
        Ok((chosen, pick))
    }

    /// Records a try's result at `chosen` for outlier detection (Envoy's
    /// consecutive 5xx and gateway errors, the destination's
    /// `outlierDetection`); logs an ejection.
    pub fn report(&self, balancer: &Balancer, chosen: &Chosen, result: TryResult) {
        let Some(dest) = &chosen.dest else {
            return;
        };
        let outcome = match result {
            TryResult::Status(s) => HttpOutcome::of_status(s),
            TryResult::Failure => HttpOutcome::GatewayError,
        };
        if balancer.http_result(dest, chosen.addr, Instant::now(), outcome) == Ejection::Ejected {
            tracing::warn!(destination = %dest.key, endpoint = %chosen.addr, "endpoint ejected by outlier detection");
        }
    }

    /// Every HBONE pod (service endpoints and the pods this waypoint takes
    /// workload traffic for) by address, and how to reach it; the identity
    /// is the pod's service account (`default` when unnamed, as in
    /// Kubernetes) in its namespace.
    pub fn hbone_targets(&self, trust_domain: &TrustDomain) -> HashMap<IpAddr, HboneTarget> {
        let mut targets = HashMap::new();
        let mut add = |namespace: &str, sa: Option<&str>, address: IpAddr, port: Option<u16>| {
            let sa = sa.unwrap_or("default");
            let Ok(identity) = SpiffeId::new(trust_domain.clone(), namespace, sa) else {
                tracing::warn!(%address, namespace, service_account = sa, "pod identity is not a valid SPIFFE ID; its requests fail");
                return;
            };
            let hbone = SocketAddr::new(address, port.unwrap_or(HBONE_PORT));
            targets.insert(address.to_canonical(), HboneTarget { hbone, identity });
        };
        for svc in self.by_key.values() {
            for e in svc
                .endpoints
                .iter()
                .filter(|e| e.tunnel == TunnelProtocol::Hbone)
            {
                add(
                    &svc.namespace,
                    e.service_account.as_deref(),
                    e.address,
                    e.hbone_port,
                );
            }
        }
        for w in self
            .pods
            .iter()
            .filter(|w| w.tunnel == TunnelProtocol::Hbone)
        {
            for ip in &w.addresses {
                add(
                    &w.namespace,
                    w.service_account.as_deref(),
                    *ip,
                    w.hbone_port,
                );
            }
        }
        targets
    }

    fn endpoint_labels(&self, svc: &ServiceConfig, e: &EndpointConfig) -> PeerLabels {
        peer_labels(
            &self.trust_domain,
            &svc.namespace,
            e.workload.as_deref().unwrap_or(UNKNOWN),
            e.service_account.as_deref(),
            &e.labels,
        )
    }
}

/// The telemetry labels of a pod of `workload` in `namespace` running as
/// `service_account`, from its `labels` (Istio's canonical-name rules).
fn peer_labels(
    trust_domain: &str,
    namespace: &str,
    workload: &str,
    service_account: Option<&str>,
    labels: &std::collections::BTreeMap<String, String>,
) -> PeerLabels {
    let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
    let mut p = PeerLabels::unknown();
    p.namespace = namespace.to_owned();
    if let Some(sa) = service_account {
        p.principal = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}");
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
    .unwrap_or_else(|| workload.to_owned());
    p.canonical_revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());
    p.workload = workload.to_owned();
    p
}

/// The `destination_service*` labels of a service.
pub fn service_labels(key: &ServiceKey) -> ServiceLabels {
    ServiceLabels {
        host: format!("{}.{}.svc.{CLUSTER_DOMAIN}", key.name, key.namespace),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
    }
}

/// The pod's port for `sp`: the endpoint's own, else the target port, else
/// the service port.
fn pod_port(e: &EndpointConfig, sp: &ServicePort) -> u16 {
    e.port.or(sp.target_port).unwrap_or(sp.port)
}

/// A service as the routing engine takes it: ports named by their number
/// (the waypoint's file has no port names), every endpoint ready.
fn engine_input(svc: &ServiceConfig) -> ServiceInput {
    ServiceInput {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        vips: svc.addresses.clone(),
        ports: svc
            .ports
            .iter()
            .map(|p| (p.port.to_string(), p.port))
            .collect(),
        endpoints: svc
            .endpoints
            .iter()
            .map(|e| EndpointInput {
                ip: e.address,
                ports: svc
                    .ports
                    .iter()
                    .map(|sp| (sp.port.to_string(), pod_port(e, sp)))
                    .collect(),
                labels: e.labels.clone(),
            })
            .collect(),
    }
}
