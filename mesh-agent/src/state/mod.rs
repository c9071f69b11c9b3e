//! The store every part of the agent reads: the node, its workloads and which
//! of them are enrolled. Sources (`sync`) publish whole snapshots; readers
//! take the latest `Arc<Snapshot>` and never see a half-applied change.
//!
//! Policies are compiled here, once per change, by [`compile_policies`]:
//! every snapshot carries the compiled policy store and its report next to
//! the raw policies, so readers (the proxy's authorization) only decide.
#![forbid(unsafe_code)]

mod findings;
mod policies;
mod routes;
mod waypoint;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use tokio::sync::watch;

pub use policies::{
    CompiledPolicies, DEFAULT_ROOT_NAMESPACE, Finding, PolicyDocument, PolicyReport,
    compile_policies, rejects_policy,
};
pub use routes::compile_routes;
use routes::log_routes;
pub use waypoint::{
    AllowedNamespaces, GATEWAY_MANAGED_LABEL, GATEWAY_MANAGED_WAYPOINT, NamespaceSelector,
    RefusedBinding, SelectorRequirement, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL,
    USE_WAYPOINT_NONE, WAYPOINT_FOR_LABEL, WAYPOINT_HBONE_PORT, Waypoint, WaypointEndpoint,
    WaypointError, WaypointFor, WaypointGateway, WaypointRef, WaypointSource, pod_waypoint,
    service_waypoint, waypoint_gateways,
};

/// What the agent knows about its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name (Kubernetes `spec.nodeName`).
    pub name: String,
    /// Addresses whose inbound connections bypass capture: the node's own
    /// addresses, from which kubelet health probes come.
    pub probe_sources: Vec<IpAddr>,
}

/// A workload (pod) the agent knows about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Service account (part of the SPIFFE identity).
    pub service_account: String,
    /// Pod UID, when known.
    pub uid: Option<String>,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (for example `/var/run/netns/x` or `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The pod's cgroup directory, when known (informational: enrollment is by netns).
    pub cgroup: Option<PathBuf>,
    /// Whether the pod's traffic goes through the mesh.
    pub enrolled: bool,
    /// Destination ports of the pod's outbound connections that bypass the mesh.
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports of the pod's inbound connections that bypass the mesh.
    pub exclude_inbound_ports: Vec<u16>,
    /// The pod's labels (policy selectors); empty for the file source.
    pub labels: BTreeMap<String, String>,
    /// The node the pod runs on when it is not this agent's node (then it has
    /// no netns here: the agent only needs its addresses and identity, to
    /// tunnel to it). `None`: a local pod.
    pub node: Option<String>,
    /// The waypoint the pod's labels (or its namespace's) name
    /// ([`pod_waypoint`]); whether traffic addressed to the pod goes
    /// through it is [`Snapshot::pod_waypoint_in_force`].
    pub waypoint: Option<Waypoint>,
}

impl Workload {
    /// Whether `id` (a verified identity, in the mesh's trust domain) is this
    /// pod's: its namespace and service account.
    pub fn has_identity(&self, id: &crate::identity::SpiffeId) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.service_account
    }

    /// Whether the pod runs on `node` (this agent's node).
    pub fn is_local(&self, node: &NodeInfo) -> bool {
        self.node.as_deref().is_none_or(|n| n == node.name)
    }

    /// The pod's SPIFFE identity in `trust_domain` (from its namespace and
    /// service account): the one place a workload's identity is derived.
    pub fn identity(
        &self,
        trust_domain: &crate::identity::TrustDomain,
    ) -> Result<crate::identity::SpiffeId, crate::identity::SpiffeIdError> {
        crate::identity::SpiffeId::new(trust_domain.clone(), &self.namespace, &self.service_account)
    }

    /// `namespace/name`, the key used in logs and maps.
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Identifies a workload: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One consistent view of everything the sources know.
///
/// Two snapshots are equal when their sources' content is: `compiled` and
/// `index` are derived from it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Bumped on every published change.
    pub generation: u64,
    /// The node.
    pub node: NodeInfo,
    /// Workloads by key.
    pub workloads: BTreeMap<WorkloadKey, Workload>,
    /// Services by `namespace/name` (the Kubernetes source; empty for the file source).
    pub services: BTreeMap<ServiceKey, Service>,
    /// Istio security policies as the API server returned them.
    pub policies: Policies,
    /// `policies` compiled (the store decisions are made with, and the
    /// report), set by [`Store::publish_snapshot`]: what a source puts here
    /// is replaced. Shared between generations while `policies` do not change.
    pub compiled: Arc<CompiledPolicies>,
    /// Traffic-management objects as served (issue 11), compiled into
    /// routes by the routing engine.
    pub routing: RoutingObjects,
    /// `routing` compiled with `services` (and the pods' labels) into the
    /// table the proxy routes service connections with, and its report; set
    /// by [`Store::publish_snapshot`] and [`Store::publish`] (what a source
    /// puts here is replaced), shared between generations while `routing`,
    /// `services` and `workloads` do not change.
    pub routes: Arc<crate::routing::RouteTable>,
    /// Waypoint Gateways (`gateway.networking.k8s.io/v1`), by name and
    /// namespace: who may bind to a waypoint across namespaces
    /// ([`Snapshot::binding_allowed`]).
    pub waypoint_gateways: BTreeMap<waypoint::WaypointRef, waypoint::WaypointGateway>,
    /// Namespace labels by namespace (for a Gateway's namespace selector).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Address indexes, built on first use (a snapshot never changes).
    pub index: Index,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        // Destructured so that a new field must be considered here.
        let Snapshot {
            generation,
            node,
            workloads,
            services,
            policies,
            compiled: _,
            routing,
            routes: _,
            waypoint_gateways,
            namespace_labels,
            index: _,
        } = self;
        *generation == other.generation
            && *node == other.node
            && *workloads == other.workloads
            && *services == other.services
            && *policies == other.policies
            && *routing == other.routing
            && *waypoint_gateways == other.waypoint_gateways
            && *namespace_labels == other.namespace_labels
    }
}
impl Eq for Snapshot {}

/// Lookup tables of a snapshot, built lazily once: the proxy resolves the
/// address of every connection, which must not scan every workload and
/// service of the cluster.
#[derive(Default)]
pub struct Index(std::sync::OnceLock<Tables>);

#[derive(Default)]
struct Tables {
    workloads: HashMap<IpAddr, WorkloadKey>,
    services: HashMap<IpAddr, ServiceKey>,
    /// The waypoints carrying traffic to each destination address
    /// ([`Snapshot::is_waypoint_of`]).
    waypoints_by_destination: HashMap<IpAddr, BTreeSet<waypoint::WaypointRef>>,
}

impl Index {
    fn tables(&self, snap: &Snapshot) -> &Tables {
        self.0.get_or_init(|| {
            let mut t = Tables::default();
            for (k, w) in &snap.workloads {
                for ip in &w.ips {
                    t.workloads
                        .entry(canonical(*ip))
                        .or_insert_with(|| k.clone());
                }
            }
            for (k, s) in &snap.services {
                for ip in &s.vips {
                    t.services
                        .entry(canonical(*ip))
                        .or_insert_with(|| k.clone());
                }
            }
            t.waypoints_by_destination = snap.waypoints_by_destination();
            t
        })
    }
}

// The index is derived data: a copy starts empty, and it never makes two
// snapshots differ.
impl Clone for Index {
    fn clone(&self) -> Self {
        Self::default()
    }
}
impl PartialEq for Index {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Index {}
impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Index")
    }
}

/// Identifies a service: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service: its virtual IPs and ports, and its ready endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// The cluster IPs (one per family); empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// The service ports.
    pub ports: Vec<ServicePort>,
    /// Ready endpoints (from the service's EndpointSlices), sorted by address.
    pub endpoints: Vec<Endpoint>,
    /// The waypoint its traffic goes through (`istio.io/use-waypoint` on
    /// the service or its namespace, [`service_waypoint`]), if any; in
    /// force as [`Snapshot::service_waypoint_in_force`] says.
    pub waypoint: Option<Waypoint>,
    /// Which traffic this service takes when it is a waypoint's Service
    /// (its `istio.io/waypoint-for` label, [`WaypointFor::from_labels`]).
    pub waypoint_traffic: WaypointFor,
}

/// One port of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name (`""` when the service has a single unnamed port).
    pub name: String,
    /// The port on the VIP.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// A ready endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's address.
    pub ip: IpAddr,
    /// Target port by service port name.
    pub ports: BTreeMap<String, u16>,
    /// The pod behind the endpoint, when the slice names it.
    pub workload: Option<WorkloadKey>,
    /// The node the endpoint runs on, when the slice names it.
    pub node_name: Option<String>,
}

impl Service {
    /// The ready `ip:port` targets for a connection to the VIP's `port`
    /// (empty when the port is not a TCP port of the service or nothing is ready).
    pub fn targets(&self, port: u16) -> Vec<SocketAddr> {
        let Some(sp) = self
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == "TCP")
        else {
            return Vec::new();
        };
        self.endpoints
            .iter()
            .filter_map(|e| e.ports.get(&sp.name).map(|p| SocketAddr::new(e.ip, *p)))
            .collect()
    }
}

/// Istio security policies, raw (`serde_json::Value` objects as served, sorted
/// by namespace and name, `managedFields` dropped); the policy engine parses them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    /// `security.istio.io` AuthorizationPolicy objects.
    pub authorization: Vec<serde_json::Value>,
    /// `security.istio.io` PeerAuthentication objects.
    pub peer_authentication: Vec<serde_json::Value>,
}

/// Traffic-management objects, raw (`serde_json::Value` objects as served,
/// sorted by namespace and name, `managedFields` dropped); the routing
/// engine parses and compiles them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingObjects {
    /// `networking.istio.io` DestinationRule objects.
    pub destination_rules: Vec<serde_json::Value>,
    /// `networking.istio.io` VirtualService objects.
    pub virtual_services: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io` TCPRoute objects.
    pub tcp_routes: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` HTTPRoute objects: not the node
    /// agent's (L4) but the waypoint's, which builds its routes from them.
    pub http_routes: Vec<serde_json::Value>,
}

impl Snapshot {
    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let key = self.index.tables(self).workloads.get(&canonical(ip))?;
        self.workloads.get(key)
    }

    /// Workloads whose traffic goes through the mesh.
    pub fn enrolled(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().filter(|w| w.enrolled)
    }

    /// Enrolled workloads on this agent's node: the ones it captures.
    pub fn local_enrolled(&self) -> impl Iterator<Item = &Workload> {
        self.workloads
            .values()
            .filter(|w| w.enrolled && w.is_local(&self.node))
    }

    /// The service whose virtual IP is `ip`, if any.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        let key = self.index.tables(self).services.get(&canonical(ip))?;
        self.services.get(key)
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// What a source had to refuse: input that did not validate, while the last
/// good snapshot stays in force. Shown in `/config_dump` (`sources`), so an
/// operator (and a test) sees a refused file without reading the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejections {
    /// How many inputs were refused since start.
    pub count: u64,
    /// Why the last one was (the error, with the field path).
    pub last_error: Option<String>,
}

/// A kind of object a source cannot read, so it counts as empty (the
/// agent keeps running without it). Shown in `/config_dump` (`sources`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MissingKind {
    /// The resource (`destinationrules.networking.istio.io`).
    pub resource: String,
    /// Why it cannot be read.
    pub reason: MissingReason,
}

/// Why a source cannot read a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MissingReason {
    /// The API server does not serve it (`404`: its CRD is not installed).
    NotServed,
    /// The agent's service account may not list/watch it (`403`).
    Forbidden,
}

impl MissingReason {
    /// `not_served` / `forbidden`, as `/config_dump` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            MissingReason::NotServed => "not_served",
            MissingReason::Forbidden => "forbidden",
        }
    }
}

/// The store: sources publish, readers subscribe.
#[derive(Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Istio's root namespace, which policies are compiled for.
    root_namespace: Arc<str>,
    /// What routing objects are compiled with (the root namespace too).
    route_options: Arc<mesh_routing::Options>,
    /// Inputs the sources refused.
    rejections: Arc<std::sync::Mutex<Rejections>>,
    /// Kinds a source cannot read (counted as empty).
    missing: Arc<std::sync::Mutex<Vec<MissingKind>>>,
    /// Compile findings already logged (each is logged when it appears).
    logged: Arc<findings::LoggedFindings>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store (generation 0) compiling policies for Istio's default
    /// root namespace ([`DEFAULT_ROOT_NAMESPACE`]).
    pub fn new() -> Self {
        Self::with_root_namespace(DEFAULT_ROOT_NAMESPACE)
    }

    /// An empty store (generation 0) compiling policies for `root_namespace`
    /// (the agent's `--root-namespace`: its policies apply mesh-wide).
    pub fn with_root_namespace(root_namespace: &str) -> Self {
        let initial = Snapshot {
            compiled: Arc::new(compile_policies(&Policies::default(), root_namespace)),
            ..Snapshot::default()
        };
        let (tx, _) = watch::channel(Arc::new(initial));
        Self {
            tx: Arc::new(tx),
            root_namespace: root_namespace.into(),
            route_options: Arc::new(mesh_routing::Options {
                root_namespace: root_namespace.into(),
                ..mesh_routing::Options::default()
            }),
            rejections: Arc::default(),
            missing: Arc::default(),
            logged: Arc::default(),
        }
    }

    /// This store with `exportTo` as the default of VirtualServices that set
    /// none (Istio's `defaultVirtualServiceExportTo`; `*` by default, `.`
    /// keeps a namespace's VirtualServices to its own clients). Set before
    /// the first publication.
    #[must_use]
    pub fn with_default_virtual_service_export_to(mut self, export_to: Vec<String>) -> Self {
        self.route_options = Arc::new(mesh_routing::Options {
            default_virtual_service_export_to: export_to,
            ..(*self.route_options).clone()
        });
        self
    }

    /// Replaces the kinds the source cannot read (sorted, as given).
    pub fn set_missing_kinds(&self, mut kinds: Vec<MissingKind>) {
        kinds.sort();
        *self
            .missing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = kinds;
    }

    /// The kinds the source cannot read, sorted.
    pub fn missing_kinds(&self) -> Vec<MissingKind> {
        self.missing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A source refused its input (`error` says why); the current snapshot
    /// stays as it is.
    pub fn record_rejection(&self, error: String) {
        let mut r = self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.count += 1;
        r.last_error = Some(error);
    }

    /// What the sources refused so far.
    pub fn rejections(&self) -> Rejections {
        self.rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The root namespace policies are compiled for.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every published change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Replaces node and workloads (services and policies stay); returns the
    /// new generation. Publishes nothing (and returns the current generation)
    /// when nothing changed.
    pub fn publish(&self, node: NodeInfo, workloads: BTreeMap<WorkloadKey, Workload>) -> u64 {
        let ignored = self.tx.borrow().ignored_pod_waypoints();
        let refused = self.tx.borrow().refused_waypoint_bindings();
        let mut generation = 0;
        let mut recompiled = false;
        self.tx.send_if_modified(|current| {
            if current.node == node && current.workloads == workloads {
                generation = current.generation;
                return false;
            }
            generation = current.generation + 1;
            let routes = if current.workloads == workloads {
                current.routes.clone()
            } else {
                recompiled = true;
                Arc::new(compile_routes(
                    &current.routing,
                    &current.services,
                    &workloads,
                    &self.route_options,
                ))
            };
            *current = Arc::new(Snapshot {
                generation,
                node,
                workloads,
                services: current.services.clone(),
                policies: current.policies.clone(),
                compiled: current.compiled.clone(),
                routing: current.routing.clone(),
                routes,
                waypoint_gateways: current.waypoint_gateways.clone(),
                namespace_labels: current.namespace_labels.clone(),
                index: Index::default(),
            });
            true
        });
        if recompiled {
            let current = self.current();
            log_routes(&current.routes, generation, &self.logged);
            waypoint::report_ignored_pod_waypoints(&ignored, &current);
        }
        waypoint::report_refused_bindings(&refused, &self.current());
        generation
    }

    /// Replaces everything but the generation with `next`'s content;
    /// returns the new generation, or the current one when nothing changed.
    ///
    /// When `next.policies` differ from the current ones (and on the first
    /// publication), they are compiled ([`compile_policies`]) and the
    /// report is logged once, after the snapshot is visible to readers;
    /// otherwise the current compiled policies are shared with the new
    /// snapshot.
    pub fn publish_snapshot(&self, next: Snapshot) -> u64 {
        // Compile before taking the lock, so readers never wait on it.
        let fresh = (self.tx.borrow().policies != next.policies)
            .then(|| Arc::new(compile_policies(&next.policies, &self.root_namespace)));
        let compile_next = |next: &Snapshot| {
            Arc::new(compile_routes(
                &next.routing,
                &next.services,
                &next.workloads,
                &self.route_options,
            ))
        };
        let fresh_routes =
            routes_inputs_differ(&self.tx.borrow(), &next).then(|| compile_next(&next));
        let ignored = self.tx.borrow().ignored_pod_waypoints();
        let refused = self.tx.borrow().refused_waypoint_bindings();
        let mut generation = 0;
        let mut applied = None;
        let mut routes_applied = None;
        self.tx.send_if_modified(|current| {
            let policies_changed = current.policies != next.policies;
            if !policies_changed
                && current.node == next.node
                && current.workloads == next.workloads
                && current.services == next.services
                && current.routing == next.routing
                && current.waypoint_gateways == next.waypoint_gateways
                && current.namespace_labels == next.namespace_labels
            {
                generation = current.generation;
                return false;
            }
            let compiled = match (policies_changed, &fresh) {
                (false, _) => current.compiled.clone(),
                (true, Some(fresh)) => fresh.clone(),
                // Another publisher changed the policies since the check
                // above (sources publish one at a time: rare).
                (true, None) => Arc::new(compile_policies(&next.policies, &self.root_namespace)),
            };
            if policies_changed || current.generation == 0 {
                applied = Some(compiled.clone());
            }
            let routes_changed = routes_inputs_differ(current, &next);
            let routes = match (routes_changed, &fresh_routes) {
                (false, _) => current.routes.clone(),
                (true, Some(fresh)) => fresh.clone(),
                // Another publisher changed the inputs since the check above.
                (true, None) => compile_next(&next),
            };
            if routes_changed {
                routes_applied = Some(routes.clone());
            }
            generation = current.generation + 1;
            *current = Arc::new(Snapshot {
                generation,
                compiled,
                routes,
                ..next
            });
            true
        });
        if let Some(compiled) = applied {
            compiled.log(generation, &self.logged);
        }
        if let Some(routes) = routes_applied {
            log_routes(&routes, generation, &self.logged);
            waypoint::report_ignored_pod_waypoints(&ignored, &self.current());
        }
        waypoint::report_refused_bindings(&refused, &self.current());
        generation
    }
}

/// Whether the inputs of the route table differ between `a` and `b`.
fn routes_inputs_differ(a: &Snapshot, b: &Snapshot) -> bool {
    a.routing != b.routing || a.services != b.services || a.workloads != b.workloads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_inputs_are_counted_and_the_snapshot_stays() {
        let store = Store::new();
        let before = store.current().generation;
        assert_eq!(store.rejections(), Rejections::default());
        store.record_rejection("policies[0].metadata.name: missing".into());
        store.record_rejection("bad YAML at line 3".into());
        let r = store.rejections();
        assert_eq!(r.count, 2);
        assert_eq!(r.last_error.as_deref(), Some("bad YAML at line 3"));
        assert_eq!(store.current().generation, before);
        // Clones share the record (the file source and admin hold clones).
        assert_eq!(store.clone().rejections().count, 2);
    }

    fn workload(name: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            uid: None,
            ips: vec![ip.parse().expect("test ip")],
            netns: PathBuf::from("/var/run/netns/x"),
            cgroup: None,
            enrolled: true,
            exclude_outbound_ports: vec![],
            exclude_inbound_ports: vec![],
            labels: BTreeMap::new(),
            node: None,
            waypoint: None,
        }
    }

    #[test]
    fn publish_bumps_generation_only_on_change() {
        let store = Store::new();
        let w = workload("a", "198.18.1.10");
        let map: BTreeMap<_, _> = [(w.key(), w)].into();
        assert_eq!(store.publish(NodeInfo::default(), map.clone()), 1);
        assert_eq!(store.publish(NodeInfo::default(), map), 1);
        assert_eq!(store.publish(NodeInfo::default(), BTreeMap::new()), 2);
    }

    #[test]
    fn publish_snapshot_replaces_everything_and_publish_keeps_services() {
        let store = Store::new();
        let w = workload("a", "198.18.1.10");
        let svc = Service {
            name: "web".into(),
            namespace: "default".into(),
            vips: vec!["10.96.0.1".parse().expect("vip")],
            ..Default::default()
        };
        let key = ServiceKey {
            namespace: "default".into(),
            name: "web".into(),
        };
        let snap = Snapshot {
            workloads: [(w.key(), w)].into(),
            services: [(key.clone(), svc)].into(),
            ..Default::default()
        };
        assert_eq!(store.publish_snapshot(snap.clone()), 1);
        assert_eq!(store.publish_snapshot(snap), 1, "unchanged");
        let vip = "10.96.0.1".parse().expect("vip");
        assert!(store.current().service_by_vip(vip).is_some());
        // The file source's publish replaces workloads only.
        assert_eq!(store.publish(NodeInfo::default(), BTreeMap::new()), 2);
        assert!(store.current().services.contains_key(&key));
        assert!(store.current().workloads.is_empty());
    }

    #[test]
    fn lookup_by_v4_mapped_address() {
        let w = workload("a", "198.18.1.10");
        let snap = Snapshot {
            workloads: [(w.key(), w)].into(),
            ..Default::default()
        };
        let mapped: IpAddr = "::ffff:198.18.1.10".parse().expect("test ip");
        assert_eq!(
            snap.workload_by_ip(mapped).map(|w| w.name.as_str()),
            Some("a")
        );
    }
}
