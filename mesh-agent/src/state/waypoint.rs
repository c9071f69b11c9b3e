//! Waypoint enrollment (issue 12, the node-agent side): which waypoint a
//! service's traffic goes through, by Istio's `istio.io/use-waypoint`
//! labels, and how a waypoint reference resolves to the pods that serve it.
//!
//! Istio's rules (`pilot/.../ambient/waypoints.go`, `getUseWaypoint` and
//! `fetchWaypointForTarget`): the label on the object itself wins — `none`
//! opts the object out even when its namespace names a waypoint — then the
//! label on its namespace; `istio.io/use-waypoint-namespace` on the same
//! object names the waypoint's namespace (default: the object's own
//! namespace). A waypoint's own Service (label
//! `gateway.istio.io/managed=istio.io-mesh-controller`, or a Service the
//! reference names itself) never has a waypoint: it would loop.
//!
//! A reference resolves to the Service of the same name and namespace (the
//! Service Istio's deployment controller makes for the waypoint Gateway):
//! its ready endpoints, each dialled on the Service's HBONE port 15008 and
//! required to prove the SPIFFE identity of the pod behind it. Unlike Istio
//! (which drops a waypoint whose Gateway never became ready), a reference
//! that does not resolve fails closed: the proxy refuses the service's
//! connections rather than send them around the waypoint.
//!
//! Which traffic a waypoint takes is its `istio.io/waypoint-for` label
//! (`service`, the default; `workload`; `all`; `none`), which Istio reads
//! on the waypoint's Gateway and its deployment controller copies to the
//! Service it makes; the agent reads it on that Service. A service uses
//! its waypoint only when the waypoint takes `service` traffic, a pod
//! (traffic addressed to the pod's own IP) only when it takes `workload`
//! traffic. A pod's waypoint comes from the pod's own label, else its
//! namespace's, with the same `none` and `-namespace` rules. A reference
//! that does not resolve fails closed when the object names it itself (a
//! service's or pod's own label) and, for services, when their namespace
//! does; a namespace's missing waypoint leaves its pods alone (Istio's
//! default waypoint takes service traffic only).
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use super::{Service, ServiceKey, Snapshot, Workload, WorkloadKey};
use crate::identity::{SpiffeId, TrustDomain};

/// The label naming the waypoint of a namespace, service or pod.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The label naming the namespace of the waypoint [`USE_WAYPOINT_LABEL`] names.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// [`USE_WAYPOINT_LABEL`] value that opts out (Istio reserves the name).
pub const USE_WAYPOINT_NONE: &str = "none";
/// The label Istio puts on a waypoint's own Service.
pub const GATEWAY_MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// [`GATEWAY_MANAGED_LABEL`] value of a waypoint.
pub const GATEWAY_MANAGED_WAYPOINT: &str = "istio.io-mesh-controller";
/// The label (on a waypoint's Gateway, copied to its Service) saying which
/// traffic the waypoint takes.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The waypoint Service's port its pods take HBONE on.
pub const WAYPOINT_HBONE_PORT: u16 = 15008;

/// A waypoint, by the name and namespace of its Gateway (and Service).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaypointRef {
    /// The waypoint's namespace.
    pub namespace: String,
    /// The waypoint's name.
    pub name: String,
}

impl std::fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl WaypointRef {
    /// The key of the waypoint's Service.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Which object's label chose the waypoint (shown in `/config_dump`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointSource {
    /// The service's own label.
    Service,
    /// The pod's own label.
    Pod,
    /// The label of the service's or pod's namespace.
    Namespace,
}

impl WaypointSource {
    /// `service` / `pod` / `namespace`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Pod => "pod",
            Self::Namespace => "namespace",
        }
    }
}

/// Which traffic a waypoint takes (`istio.io/waypoint-for` on its Service).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic addressed to a service (Istio's default).
    #[default]
    Service,
    /// Traffic addressed to a pod's own IP.
    Workload,
    /// Both.
    All,
    /// Neither.
    None,
}

impl WaypointFor {
    /// The value of `labels`' `istio.io/waypoint-for`; no label is
    /// `service`. A value Istio does not define is `None`, with a warning
    /// naming `service`: a waypoint of unknown scope takes nothing rather
    /// than traffic it was not meant for (its services fail closed through
    /// [`Snapshot::service_waypoint_in_force`] only when missing).
    pub fn from_labels(labels: &BTreeMap<String, String>, service: &ServiceKey) -> Self {
        match labels.get(WAYPOINT_FOR_LABEL).map(String::as_str) {
            None | Some("service") => Self::Service,
            Some("workload") => Self::Workload,
            Some("all") => Self::All,
            Some("none") => Self::None,
            Some(other) => {
                tracing::warn!(service = %service, value = other, "istio.io/waypoint-for is not service, workload, all or none: the waypoint takes no traffic");
                Self::None
            }
        }
    }

    /// Whether it takes traffic addressed to services.
    pub fn services(self) -> bool {
        matches!(self, Self::Service | Self::All)
    }

    /// Whether it takes traffic addressed to pods.
    pub fn workloads(self) -> bool {
        matches!(self, Self::Workload | Self::All)
    }
}

/// The waypoint a service's traffic goes through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    /// The waypoint.
    pub reference: WaypointRef,
    /// Whose label named it.
    pub from: WaypointSource,
}

/// The waypoint a label set names: `Err(())` for an explicit `none`,
/// `Ok(None)` for no label.
fn from_labels(
    labels: &BTreeMap<String, String>,
    fallback_namespace: &str,
) -> Result<Option<WaypointRef>, ()> {
    let Some(name) = labels.get(USE_WAYPOINT_LABEL) else {
        return Ok(None);
    };
    if name == USE_WAYPOINT_NONE {
        return Err(());
    }
    let namespace = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .cloned()
        .unwrap_or_else(|| fallback_namespace.to_owned());
    Ok(Some(WaypointRef {
        namespace,
        name: name.clone(),
    }))
}

/// The waypoint an object in `namespace` with `labels` names, its
/// namespace having `namespace_labels` (`None`: unknown), by Istio's
/// precedence: the object's own label (`from`; `none` opts out), then its
/// namespace's (`none` there is the same as no label). Nothing for a
/// waypoint's own objects (labelled `gateway.istio.io/managed`): it would
/// loop.
fn labelled_waypoint(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    from: WaypointSource,
) -> Option<Waypoint> {
    if labels.get(GATEWAY_MANAGED_LABEL).map(String::as_str) == Some(GATEWAY_MANAGED_WAYPOINT) {
        return None;
    }
    match from_labels(labels, namespace) {
        Err(()) => None,
        Ok(Some(reference)) => Some(Waypoint { reference, from }),
        Ok(None) => Some(Waypoint {
            reference: from_labels(namespace_labels?, namespace).ok()??,
            from: WaypointSource::Namespace,
        }),
    }
}

/// The waypoint of the service `key` with `labels`, in a namespace with
/// `namespace_labels` (`None`: unknown namespace), by Istio's precedence
/// (see the module doc).
pub fn service_waypoint(
    key: &ServiceKey,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<Waypoint> {
    let chosen = labelled_waypoint(
        &key.namespace,
        labels,
        namespace_labels,
        WaypointSource::Service,
    )?;
    // The waypoint's own Service in a namespace that uses it.
    (chosen.reference.service_key() != *key).then_some(chosen)
}

/// The waypoint a pod with `labels` in `namespace` (whose labels are
/// `namespace_labels`; `None`: unknown) names, by the same precedence as
/// [`service_waypoint`]: the pod's own label (`none` opts out), then its
/// namespace's; none for a waypoint's own pods. Whether the waypoint takes
/// the pod's traffic is decided with the snapshot
/// ([`Snapshot::pod_waypoint_in_force`]).
pub fn pod_waypoint(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<Waypoint> {
    labelled_waypoint(namespace, labels, namespace_labels, WaypointSource::Pod)
}

/// Warns when the pods [`Snapshot::ignored_pod_waypoints`] finds in
/// `after` differ from `before` (its earlier answer) and some remain.
pub(super) fn report_ignored_pod_waypoints(before: &[WorkloadKey], after: &Snapshot) {
    let now = after.ignored_pod_waypoints();
    if now.is_empty() || now == before {
        return;
    }
    let shown: Vec<String> = now.iter().take(10).map(ToString::to_string).collect();
    tracing::warn!(
        count = now.len(),
        pods = %shown.join(","),
        "pods labelled istio.io/use-waypoint name a waypoint whose istio.io/waypoint-for does not take workload traffic: connections addressed to these pods' IPs go to them directly (label the waypoint istio.io/waypoint-for: workload or all)"
    );
}

/// Which namespaces may bind their services and pods to a waypoint: the
/// `allowedRoutes.namespaces` of its Gateway's HBONE listener (Istio's
/// `makeWaypointSelector`; absent, `Same`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowedNamespaces {
    /// The waypoint's own namespace only (Gateway API's default).
    #[default]
    Same,
    /// Every namespace.
    All,
    /// Namespaces whose labels the selector matches.
    Selector(NamespaceSelector),
}

/// A Kubernetes label selector on Namespace labels (`matchLabels` and
/// `matchExpressions`, all ANDed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSelector {
    /// `matchLabels`.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist` (anything else matches nothing).
    pub operator: String,
    /// The values (`In`/`NotIn`).
    pub values: Vec<String>,
}

impl NamespaceSelector {
    /// Whether `labels` satisfy every term (Kubernetes' semantics; an
    /// unknown operator matches nothing, failing closed).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// What the agent keeps of a waypoint's Gateway
/// (`gateway.networking.k8s.io/v1`): who may bind to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointGateway {
    /// `spec.gatewayClassName`.
    pub class: String,
    /// The HBONE listener's `allowedRoutes.namespaces`.
    pub allowed: AllowedNamespaces,
}

/// The Gateway API's name for the HBONE listener's protocol.
const HBONE_PROTOCOL: &str = "HBONE";
/// At most this many selector terms are kept per Gateway (more: the
/// selector matches nothing).
const MAX_SELECTOR_TERMS: usize = 64;

/// The Gateways among `objects` (`gateway.networking.k8s.io/v1` Gateway
/// JSON, as served or as a file's `resources:`), by name and namespace; an
/// object without both is skipped. See [`WaypointGateway::from_json`].
pub fn waypoint_gateways(objects: &[serde_json::Value]) -> BTreeMap<WaypointRef, WaypointGateway> {
    objects
        .iter()
        .filter_map(|o| {
            let meta = o.get("metadata")?;
            let reference = WaypointRef {
                namespace: meta.get("namespace")?.as_str()?.to_owned(),
                name: meta.get("name")?.as_str()?.to_owned(),
            };
            Some((reference, WaypointGateway::from_json(o)))
        })
        .collect()
}

impl WaypointGateway {
    /// What a Gateway object says (Istio's `makeAllowedRoutes` for the
    /// default binding): the `allowedRoutes.namespaces` of its listener of
    /// protocol `HBONE` (the waypoint's, port 15008); no such listener, no
    /// `allowedRoutes` or no `from` is `Same`. A malformed selector, or an
    /// unknown `from`, admits no other namespace.
    pub fn from_json(gateway: &serde_json::Value) -> Self {
        let spec = gateway.get("spec");
        let class = spec
            .and_then(|s| s.get("gatewayClassName"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let listener = spec
            .and_then(|s| s.get("listeners"))
            .and_then(serde_json::Value::as_array)
            .and_then(|ls| {
                ls.iter().find(|l| {
                    l.get("protocol").and_then(serde_json::Value::as_str) == Some(HBONE_PROTOCOL)
                })
            });
        let namespaces = listener
            .and_then(|l| l.get("allowedRoutes"))
            .and_then(|a| a.get("namespaces"));
        let from = namespaces
            .and_then(|n| n.get("from"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("Same");
        let allowed = match from {
            "All" => AllowedNamespaces::All,
            "Selector" => namespaces
                .and_then(|n| n.get("selector"))
                .and_then(NamespaceSelector::from_json)
                .map_or(AllowedNamespaces::Same, AllowedNamespaces::Selector),
            _ => AllowedNamespaces::Same,
        };
        Self { class, allowed }
    }
}

impl NamespaceSelector {
    /// A `metav1.LabelSelector`; `None` when malformed or over
    /// [`MAX_SELECTOR_TERMS`].
    fn from_json(v: &serde_json::Value) -> Option<Self> {
        let mut sel = Self::default();
        if let Some(labels) = v.get("matchLabels") {
            for (k, val) in labels.as_object()? {
                sel.match_labels.insert(k.clone(), val.as_str()?.to_owned());
            }
        }
        if let Some(exprs) = v.get("matchExpressions") {
            for e in exprs.as_array()? {
                let values = match e.get("values") {
                    None => Vec::new(),
                    Some(vs) => vs
                        .as_array()?
                        .iter()
                        .map(|x| x.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()?,
                };
                sel.match_expressions.push(SelectorRequirement {
                    key: e.get("key")?.as_str()?.to_owned(),
                    operator: e.get("operator")?.as_str()?.to_owned(),
                    values,
                });
            }
        }
        (sel.match_labels.len() + sel.match_expressions.len() <= MAX_SELECTOR_TERMS).then_some(sel)
    }
}

/// A binding (a service's or pod's waypoint) the waypoint's Gateway does
/// not allow, treated as no waypoint (Istio's `AttachmentDenied`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefusedBinding {
    /// `service` or `pod`.
    pub kind: &'static str,
    /// `namespace/name` of the service or pod.
    pub object: String,
    /// The waypoint it names.
    pub waypoint: WaypointRef,
}

impl std::fmt::Display for RefusedBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.kind, self.object, self.waypoint)
    }
}

/// Warns when the bindings [`Snapshot::refused_waypoint_bindings`] finds in
/// `after` differ from `before` (its earlier answer) and some remain.
pub(super) fn report_refused_bindings(before: &[RefusedBinding], after: &Snapshot) {
    let now = after.refused_waypoint_bindings();
    if now.is_empty() || now == before {
        return;
    }
    let shown: Vec<String> = now.iter().take(10).map(ToString::to_string).collect();
    tracing::warn!(
        count = now.len(),
        bindings = %shown.join(","),
        "istio.io/use-waypoint names a waypoint in another namespace whose Gateway's HBONE listener does not allow this namespace (allowedRoutes.namespaces): no waypoint is used"
    );
}

/// Why a waypoint reference does not resolve to a pod to tunnel to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    /// No Service of the waypoint's name and namespace.
    #[error(
        "waypoint {0} not found: no Service {0} (deploy the waypoint, or remove the istio.io/use-waypoint label)"
    )]
    Missing(WaypointRef),
    /// The waypoint's Service has no TCP port 15008.
    #[error("waypoint Service {0} has no port 15008 (the waypoint's HBONE port)")]
    NoHbonePort(WaypointRef),
    /// No ready endpoint whose pod (and so identity) is known.
    #[error(
        "waypoint {0} has no ready endpoint with a known pod (is the waypoint Deployment running?)"
    )]
    NoEndpoint(WaypointRef),
}

/// One pod serving a waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointEndpoint {
    /// Its HBONE address (the pod's address, the waypoint's port 15008 target).
    pub addr: SocketAddr,
    /// The pod.
    pub workload: WorkloadKey,
    /// The identity it must prove.
    pub identity: SpiffeId,
}

impl Snapshot {
    /// Which traffic waypoint `w` takes; `None` when its Service is unknown.
    fn waypoint_scope(&self, w: &WaypointRef) -> Option<WaypointFor> {
        self.services
            .get(&w.service_key())
            .map(|s| s.waypoint_traffic)
    }

    /// The waypoint `service`'s traffic goes through, whoever connects: the
    /// one its labels name, when that waypoint takes service traffic or
    /// does not resolve (fails closed).
    pub fn service_waypoint_in_force<'s>(&self, service: &'s Service) -> Option<&'s Waypoint> {
        let w = service.waypoint.as_ref()?;
        if !self.binding_allowed(&w.reference, &service.namespace) {
            return None;
        }
        self.waypoint_scope(&w.reference)
            .is_none_or(WaypointFor::services)
            .then_some(w)
    }

    /// The waypoint traffic addressed to `pod`'s own IP goes through,
    /// whoever connects: the one its labels name, when that waypoint takes
    /// workload traffic, or when the pod's own label names a waypoint that
    /// does not resolve (fails closed; a namespace's missing waypoint
    /// leaves the pod alone, see the module doc). Never for the pods
    /// behind the waypoint's own Service (labelled ones have none at all,
    /// [`pod_waypoint`]): it would loop.
    pub fn pod_waypoint_in_force<'w>(&self, pod: &'w Workload) -> Option<&'w Waypoint> {
        let w = pod.waypoint.as_ref()?;
        if !self.binding_allowed(&w.reference, &pod.namespace) {
            return None;
        }
        if self.is_own_pod(w, &pod.key()) {
            return None;
        }
        match self.waypoint_scope(&w.reference) {
            Some(scope) => scope.workloads().then_some(w),
            None => (w.from == WaypointSource::Pod).then_some(w),
        }
    }

    /// Whether an object in `namespace` may use waypoint `w` (Istio's
    /// `AllowsAttachmentFromNamespace`): always in the waypoint's own
    /// namespace (with or without a Gateway object); from another only when
    /// the waypoint's Gateway is known and its HBONE listener's
    /// `allowedRoutes.namespaces` admits `namespace` (`All`, or a
    /// `Selector` matching its labels). An unknown Gateway admits no other
    /// namespace: a tenant cannot borrow another namespace's waypoint and
    /// its identity.
    pub fn binding_allowed(&self, w: &WaypointRef, namespace: &str) -> bool {
        if w.namespace == namespace {
            return true;
        }
        match self.waypoint_gateways.get(w).map(|g| &g.allowed) {
            None | Some(AllowedNamespaces::Same) => false,
            Some(AllowedNamespaces::All) => true,
            Some(AllowedNamespaces::Selector(sel)) => {
                let empty = BTreeMap::new();
                sel.matches(self.namespace_labels.get(namespace).unwrap_or(&empty))
            }
        }
    }

    /// Services and pods whose waypoint binding
    /// [`Snapshot::binding_allowed`] refuses (they use no waypoint), sorted:
    /// `/config_dump` `routes.refused_waypoint_bindings` and a warning when
    /// the set changes.
    pub fn refused_waypoint_bindings(&self) -> Vec<RefusedBinding> {
        let services = self.services.values().filter_map(|s| {
            let w = s.waypoint.as_ref()?;
            (!self.binding_allowed(&w.reference, &s.namespace)).then(|| RefusedBinding {
                kind: "service",
                object: format!("{}/{}", s.namespace, s.name),
                waypoint: w.reference.clone(),
            })
        });
        let pods = self.workloads.values().filter_map(|p| {
            let w = p.waypoint.as_ref()?;
            (!self.binding_allowed(&w.reference, &p.namespace)).then(|| RefusedBinding {
                kind: "pod",
                object: format!("{}/{}", p.namespace, p.name),
                waypoint: w.reference.clone(),
            })
        });
        let mut out: Vec<RefusedBinding> = services.chain(pods).collect();
        out.sort();
        out
    }

    /// Whether `source` is one of waypoint `w`'s own pods (its traffic is
    /// the waypoint's second hop, which goes direct).
    fn is_own_pod(&self, w: &Waypoint, source: &WorkloadKey) -> bool {
        self.services
            .get(&w.reference.service_key())
            .is_some_and(|s| {
                s.endpoints
                    .iter()
                    .any(|e| e.workload.as_ref() == Some(source))
            })
    }

    /// The waypoint `service`'s traffic from `source` (the connecting pod)
    /// goes through ([`Snapshot::service_waypoint_in_force`]), unless
    /// `source` is one of that waypoint's own pods.
    pub fn waypoint_for<'s>(
        &self,
        service: &'s Service,
        source: &WorkloadKey,
    ) -> Option<&'s Waypoint> {
        self.service_waypoint_in_force(service)
            .filter(|w| !self.is_own_pod(w, source))
    }

    /// The waypoint traffic from `source` addressed to `pod`'s own IP goes
    /// through ([`Snapshot::pod_waypoint_in_force`]), unless `source` is one
    /// of that waypoint's own pods.
    pub fn pod_waypoint_for<'w>(
        &self,
        pod: &'w Workload,
        source: &WorkloadKey,
    ) -> Option<&'w Waypoint> {
        self.pod_waypoint_in_force(pod)
            .filter(|w| !self.is_own_pod(w, source))
    }

    /// Pods whose own `istio.io/use-waypoint` names a waypoint that exists
    /// but does not take workload traffic (Istio ignores such a label; the
    /// agent reports it: `/config_dump` `routes.ignored_pod_waypoints` and
    /// a warning when the set changes), sorted.
    pub fn ignored_pod_waypoints(&self) -> Vec<WorkloadKey> {
        self.workloads
            .iter()
            .filter(|(_, p)| {
                p.waypoint.as_ref().is_some_and(|w| {
                    w.from == WaypointSource::Pod
                        && self
                            .waypoint_scope(&w.reference)
                            .is_some_and(|s| !s.workloads())
                })
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// For each destination address, the waypoints that carry traffic to
    /// it: its pod's own waypoint and those of the services it is an
    /// endpoint of (built once per snapshot, in its index).
    pub(super) fn waypoints_by_destination(&self) -> HashMap<IpAddr, BTreeSet<WaypointRef>> {
        let mut by_dst: HashMap<IpAddr, BTreeSet<WaypointRef>> = HashMap::new();
        for s in self.services.values() {
            let Some(w) = self.service_waypoint_in_force(s) else {
                continue;
            };
            for e in &s.endpoints {
                by_dst
                    .entry(e.ip.to_canonical())
                    .or_default()
                    .insert(w.reference.clone());
            }
        }
        for p in self.workloads.values() {
            let Some(w) = self.pod_waypoint_in_force(p) else {
                continue;
            };
            for ip in &p.ips {
                by_dst
                    .entry(ip.to_canonical())
                    .or_default()
                    .insert(w.reference.clone());
            }
        }
        by_dst
    }

    /// Whether the peer at `ip` proving `identity` is a waypoint of
    /// destination `dst`: one of the pods behind a waypoint that carries
    /// traffic to `dst` (its pod's own, or that of a service it is an
    /// endpoint of), with that pod's identity in `trust_domain`. A
    /// destination believes the `forwarded` header of such a peer only (as
    /// ztunnel's `check_from_waypoint`): the waypoint of another service,
    /// which any namespace can make of its own pods, names no client here.
    pub fn is_waypoint_of(
        &self,
        ip: IpAddr,
        identity: &SpiffeId,
        trust_domain: &TrustDomain,
        dst: IpAddr,
    ) -> bool {
        let Some(pod) = self.workload_by_ip(ip) else {
            return false;
        };
        if identity.trust_domain() != trust_domain || !pod.has_identity(identity) {
            return false;
        }
        let ip = ip.to_canonical();
        self.index
            .tables(self)
            .waypoints_by_destination
            .get(&dst.to_canonical())
            .is_some_and(|refs| {
                refs.iter().any(|w| {
                    self.services
                        .get(&w.service_key())
                        .is_some_and(|wp| wp.endpoints.iter().any(|e| e.ip.to_canonical() == ip))
                })
            })
    }

    /// The pods serving waypoint `w`, in endpoint order, with the identity
    /// each must prove in `trust_domain`; an endpoint whose pod is unknown
    /// (so is its identity) is left out.
    pub fn waypoint_endpoints(
        &self,
        w: &WaypointRef,
        trust_domain: &TrustDomain,
    ) -> Result<Vec<WaypointEndpoint>, WaypointError> {
        let svc = self
            .services
            .get(&w.service_key())
            .ok_or_else(|| WaypointError::Missing(w.clone()))?;
        let port = svc
            .ports
            .iter()
            .find(|p| p.port == WAYPOINT_HBONE_PORT && p.protocol == "TCP")
            .ok_or_else(|| WaypointError::NoHbonePort(w.clone()))?;
        let out: Vec<WaypointEndpoint> = svc
            .endpoints
            .iter()
            .filter_map(|e| {
                let key = e.workload.as_ref()?;
                let pod = self.workloads.get(key)?;
                let identity = pod.identity(trust_domain).ok()?;
                let target = e.ports.get(&port.name).copied()?;
                Some(WaypointEndpoint {
                    addr: SocketAddr::new(e.ip, target),
                    workload: key.clone(),
                    identity,
                })
            })
            .collect();
        if out.is_empty() {
            return Err(WaypointError::NoEndpoint(w.clone()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::{Endpoint, ServicePort};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn wref(ns: &str, name: &str) -> WaypointRef {
        WaypointRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn chosen(
        svc: &[(&str, &str)],
        ns: Option<&[(&str, &str)]>,
    ) -> Option<(WaypointRef, WaypointSource)> {
        let nsl = ns.map(labels);
        service_waypoint(&key("shop", "web"), &labels(svc), nsl.as_ref())
            .map(|w| (w.reference, w.from))
    }

    #[test]
    fn the_service_label_wins_over_the_namespace_and_none_opts_out() {
        let ns_wp: &[(&str, &str)] = &[(USE_WAYPOINT_LABEL, "ns-wp")];
        assert_eq!(chosen(&[], None), None, "no namespace, no label");
        assert_eq!(chosen(&[], Some(&[])), None, "no label anywhere");
        assert_eq!(
            chosen(&[], Some(ns_wp)),
            Some((wref("shop", "ns-wp"), WaypointSource::Namespace))
        );
        assert_eq!(
            chosen(&[(USE_WAYPOINT_LABEL, "svc-wp")], Some(ns_wp)),
            Some((wref("shop", "svc-wp"), WaypointSource::Service)),
            "the service's own label wins"
        );
        assert_eq!(
            chosen(&[(USE_WAYPOINT_LABEL, "none")], Some(ns_wp)),
            None,
            "none on the service opts out of the namespace's waypoint"
        );
        assert_eq!(
            chosen(&[], Some(&[(USE_WAYPOINT_LABEL, "none")])),
            None,
            "none on the namespace is no waypoint"
        );
        // A `none` on the namespace does not override the service's own label.
        assert_eq!(
            chosen(
                &[(USE_WAYPOINT_LABEL, "svc-wp")],
                Some(&[(USE_WAYPOINT_LABEL, "none")])
            ),
            Some((wref("shop", "svc-wp"), WaypointSource::Service))
        );
    }

    #[test]
    fn the_waypoint_namespace_label_is_read_on_the_object_that_names_the_waypoint() {
        assert_eq!(
            chosen(
                &[
                    (USE_WAYPOINT_LABEL, "wp"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "infra")
                ],
                None
            ),
            Some((wref("infra", "wp"), WaypointSource::Service))
        );
        assert_eq!(
            chosen(
                &[],
                Some(&[
                    (USE_WAYPOINT_LABEL, "wp"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "infra")
                ])
            ),
            Some((wref("infra", "wp"), WaypointSource::Namespace))
        );
        // The namespace's `-namespace` label does not apply to the service's own name.
        assert_eq!(
            chosen(
                &[(USE_WAYPOINT_LABEL, "wp")],
                Some(&[(USE_WAYPOINT_NAMESPACE_LABEL, "infra")])
            ),
            Some((wref("shop", "wp"), WaypointSource::Service))
        );
    }

    #[test]
    fn a_waypoints_own_service_never_goes_through_a_waypoint() {
        let ns = labels(&[(USE_WAYPOINT_LABEL, "wp")]);
        assert_eq!(
            service_waypoint(&key("shop", "wp"), &BTreeMap::new(), Some(&ns)),
            None,
            "the waypoint's Service in the namespace that uses it"
        );
        let managed = labels(&[(GATEWAY_MANAGED_LABEL, GATEWAY_MANAGED_WAYPOINT)]);
        assert_eq!(
            service_waypoint(&key("shop", "other-wp"), &managed, Some(&ns)),
            None
        );
    }

    fn pod(ns: &str, name: &str, sa: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            ips: vec![ip.parse().expect("ip")],
            netns: PathBuf::new(),
            ..Workload::default()
        }
    }

    fn service(
        ns: &str,
        name: &str,
        ports: &[(&str, u16)],
        eps: &[(&str, Option<&str>)],
    ) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            vips: vec![],
            ports: ports
                .iter()
                .map(|(n, p)| ServicePort {
                    name: (*n).into(),
                    port: *p,
                    protocol: "TCP".into(),
                })
                .collect(),
            endpoints: eps
                .iter()
                .map(|(ip, pod)| Endpoint {
                    ip: ip.parse().expect("ip"),
                    ports: ports.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect(),
                    workload: pod.map(|p| WorkloadKey {
                        namespace: ns.into(),
                        name: p.into(),
                    }),
                    node_name: None,
                })
                .collect(),
            waypoint: None,
            waypoint_traffic: WaypointFor::default(),
        }
    }

    #[test]
    fn a_reference_resolves_to_the_waypoint_pods_and_their_identity() {
        let td = TrustDomain::new("cluster.local").expect("td");
        let wp_pod = pod("shop", "wp-0", "wp-sa", "198.18.9.1");
        let mut snap = Snapshot {
            workloads: [(wp_pod.key(), wp_pod)].into(),
            ..Snapshot::default()
        };
        let r = wref("shop", "wp");
        assert_eq!(
            snap.waypoint_endpoints(&r, &td),
            Err(WaypointError::Missing(r.clone()))
        );
        snap.services.insert(
            r.service_key(),
            service("shop", "wp", &[("status", 15021)], &[]),
        );
        assert_eq!(
            snap.waypoint_endpoints(&r, &td),
            Err(WaypointError::NoHbonePort(r.clone()))
        );
        // An endpoint with no known pod has no identity to require: left out.
        snap.services.insert(
            r.service_key(),
            service("shop", "wp", &[("mesh", 15008)], &[("198.18.9.2", None)]),
        );
        assert_eq!(
            snap.waypoint_endpoints(&r, &td),
            Err(WaypointError::NoEndpoint(r.clone()))
        );
        snap.services.insert(
            r.service_key(),
            service(
                "shop",
                "wp",
                &[("mesh", 15008)],
                &[("198.18.9.1", Some("wp-0")), ("198.18.9.2", None)],
            ),
        );
        let eps = snap.waypoint_endpoints(&r, &td).expect("resolves");
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr.to_string(), "198.18.9.1:15008");
        assert_eq!(
            eps[0].identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/wp-sa"
        );
    }

    #[test]
    fn only_a_used_waypoints_pod_under_its_own_identity_is_a_waypoint_peer() {
        let td = TrustDomain::new("cluster.local").expect("td");
        let wp_pod = pod("shop", "wp-0", "wp-sa", "198.18.9.1");
        let web_pod = pod("shop", "web-0", "web", "198.18.9.5");
        let mut snap = Snapshot {
            workloads: [(wp_pod.key(), wp_pod), (web_pod.key(), web_pod)].into(),
            ..Snapshot::default()
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let wp_id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/wp-sa").expect("id");
        let web_id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").expect("id");
        snap.services.insert(
            key("shop", "wp"),
            service(
                "shop",
                "wp",
                &[("mesh", 15008)],
                &[("198.18.9.1", Some("wp-0"))],
            ),
        );
        let web_ip = ip("198.18.9.5");
        // A waypoint's Service that no service uses carries nobody's traffic.
        assert!(!snap.is_waypoint_of(ip("198.18.9.1"), &wp_id, &td, web_ip));
        let mut web = service(
            "shop",
            "web",
            &[("http", 80)],
            &[("198.18.9.5", Some("web-0"))],
        );
        web.waypoint = Some(Waypoint {
            reference: wref("shop", "wp"),
            from: WaypointSource::Service,
        });
        snap.services.insert(key("shop", "web"), web);
        // A changed snapshot is a new one (its index is built afresh), as
        // the store publishes them.
        let snap = snap.clone();
        assert!(snap.is_waypoint_of(ip("198.18.9.1"), &wp_id, &td, web_ip));
        // Another identity at the waypoint's address, the waypoint's
        // identity at another address, an unknown address: not a waypoint.
        assert!(!snap.is_waypoint_of(ip("198.18.9.1"), &web_id, &td, web_ip));
        assert!(!snap.is_waypoint_of(ip("198.18.9.5"), &wp_id, &td, web_ip));
        assert!(!snap.is_waypoint_of(ip("198.18.9.9"), &wp_id, &td, web_ip));
    }

    /// Any namespace can make a waypoint of its own pod (a Service on
    /// 15008 and a label naming it): that waypoint's `forwarded` is
    /// believed only by the destinations it carries traffic to.
    #[test]
    fn a_waypoint_is_believed_by_its_own_destinations_only() {
        let td = TrustDomain::new("cluster.local").expect("td");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let evil_wp = pod("t", "evil-0", "evil", "198.18.8.1");
        let victim = pod("shop", "db-0", "db", "198.18.9.7");
        let mut snap = Snapshot {
            workloads: [(evil_wp.key(), evil_wp), (victim.key(), victim)].into(),
            ..Snapshot::default()
        };
        snap.services.insert(
            key("t", "wp"),
            service(
                "t",
                "wp",
                &[("mesh", 15008)],
                &[("198.18.8.1", Some("evil-0"))],
            ),
        );
        let mut front = service("t", "front", &[("http", 80)], &[("198.18.8.9", None)]);
        front.waypoint = Some(Waypoint {
            reference: wref("t", "wp"),
            from: WaypointSource::Service,
        });
        snap.services.insert(key("t", "front"), front);
        let snap = snap.clone();
        let evil_id = SpiffeId::parse("spiffe://cluster.local/ns/t/sa/evil").expect("id");
        // A waypoint in use, of the tenant's own service only.
        assert!(snap.is_waypoint_of(ip("198.18.8.1"), &evil_id, &td, ip("198.18.8.9")));
        assert!(!snap.is_waypoint_of(ip("198.18.8.1"), &evil_id, &td, ip("198.18.9.7")));
    }

    /// A pod of `shop` whose labels named waypoint `shop/wp` (by `from`).
    fn pod_using(name: &str, sa: &str, ip: &str, from: WaypointSource) -> Workload {
        let mut p = pod("shop", name, sa, ip);
        p.waypoint = Some(Waypoint {
            reference: wref("shop", "wp"),
            from,
        });
        p
    }

    /// The waypoint's Service `shop/wp`: port 15008, its pod `wp-0`.
    fn wp_service() -> Service {
        service(
            "shop",
            "wp",
            &[("mesh", 15008)],
            &[("198.18.9.1", Some("wp-0"))],
        )
    }

    fn with_scope(mut svc: Service, scope: &str) -> Service {
        svc.waypoint_traffic = WaypointFor::from_labels(
            &labels(&[(WAYPOINT_FOR_LABEL, scope)]),
            &key(&svc.namespace, &svc.name),
        );
        svc
    }

    #[test]
    fn waypoint_for_reads_istios_four_values_and_no_label_is_service() {
        let k = key("shop", "wp");
        let of = |v: Option<&str>| {
            let l = v.map_or_else(BTreeMap::new, |v| labels(&[(WAYPOINT_FOR_LABEL, v)]));
            WaypointFor::from_labels(&l, &k)
        };
        assert_eq!(of(None), WaypointFor::Service);
        assert_eq!(of(Some("service")), WaypointFor::Service);
        assert_eq!(of(Some("workload")), WaypointFor::Workload);
        assert_eq!(of(Some("all")), WaypointFor::All);
        assert_eq!(of(Some("none")), WaypointFor::None);
        assert_eq!(
            of(Some("Workload")),
            WaypointFor::None,
            "not a value: takes nothing"
        );
        assert!(WaypointFor::All.services() && WaypointFor::All.workloads());
        assert!(!WaypointFor::Service.workloads() && !WaypointFor::Workload.services());
    }

    #[test]
    fn a_pods_own_label_wins_over_its_namespace_and_none_opts_out() {
        let ns = labels(&[(USE_WAYPOINT_LABEL, "ns-wp")]);
        let chosen = |pod: &[(&str, &str)], ns: Option<&BTreeMap<String, String>>| {
            pod_waypoint("shop", &labels(pod), ns).map(|w| (w.reference, w.from))
        };
        assert_eq!(chosen(&[], None), None);
        assert_eq!(
            chosen(&[], Some(&ns)),
            Some((wref("shop", "ns-wp"), WaypointSource::Namespace))
        );
        assert_eq!(
            chosen(
                &[
                    (USE_WAYPOINT_LABEL, "pod-wp"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "infra")
                ],
                Some(&ns)
            ),
            Some((wref("infra", "pod-wp"), WaypointSource::Pod))
        );
        assert_eq!(chosen(&[(USE_WAYPOINT_LABEL, "none")], Some(&ns)), None);
    }

    #[test]
    fn which_traffic_a_waypoint_takes_decides_whether_services_and_pods_use_it() {
        let wp = wref("shop", "wp");
        let mut web = service("shop", "web", &[("http", 80)], &[]);
        web.waypoint = Some(Waypoint {
            reference: wp.clone(),
            from: WaypointSource::Namespace,
        });
        let db = pod_using("db-0", "db", "198.18.9.6", WaypointSource::Pod);
        let cache = pod_using("cache-0", "cache", "198.18.9.7", WaypointSource::Namespace);
        let wp_svc = wp_service();
        let mut snap = Snapshot {
            workloads: [(db.key(), db.clone()), (cache.key(), cache.clone())].into(),
            ..Snapshot::default()
        };
        // Missing waypoint: the service and the pod that names it itself
        // fail closed (keep it); the namespace's pods are left alone.
        assert!(snap.service_waypoint_in_force(&web).is_some());
        assert!(snap.pod_waypoint_in_force(&db).is_some());
        assert!(snap.pod_waypoint_in_force(&cache).is_none());
        assert!(snap.ignored_pod_waypoints().is_empty());
        let cases = [
            // (scope, service uses it, pods use it)
            ("service", true, false),
            ("workload", false, true),
            ("all", true, true),
            ("none", false, false),
        ];
        for (scope, services, pods) in cases {
            snap.services
                .insert(key("shop", "wp"), with_scope(wp_svc.clone(), scope));
            assert_eq!(
                snap.service_waypoint_in_force(&web).is_some(),
                services,
                "{scope}"
            );
            assert_eq!(snap.pod_waypoint_in_force(&db).is_some(), pods, "{scope}");
            assert_eq!(
                snap.pod_waypoint_in_force(&cache).is_some(),
                pods,
                "{scope}"
            );
            // A pod's own label naming a waypoint that does not take its
            // traffic is reported; a namespace's is Istio's default.
            let ignored: Vec<String> = snap
                .ignored_pod_waypoints()
                .iter()
                .map(ToString::to_string)
                .collect();
            let expected: &[&str] = if pods { &[] } else { &["shop/db-0"] };
            assert_eq!(ignored, expected, "{scope}");
            // The waypoint's own pod reaches the pod directly.
            let own = WorkloadKey {
                namespace: "shop".into(),
                name: "wp-0".into(),
            };
            assert!(snap.pod_waypoint_for(&db, &own).is_none(), "{scope}");
        }
        // The waypoint's own pod, in the namespace that uses it, never goes
        // through it; nor does a pod Istio marks as a waypoint's.
        snap.services
            .insert(key("shop", "wp"), with_scope(wp_svc.clone(), "all"));
        let mut wp_pod = pod("shop", "wp-0", "wp", "198.18.9.1");
        wp_pod.waypoint = cache.waypoint.clone();
        assert!(snap.pod_waypoint_in_force(&wp_pod).is_none());
        let ns = labels(&[(USE_WAYPOINT_LABEL, "wp")]);
        let mut managed = pod("shop", "other-wp-0", "wp", "198.18.9.2");
        managed.waypoint = pod_waypoint("shop", &managed.labels, Some(&ns));
        assert!(snap.pod_waypoint_in_force(&managed).is_some());
        managed.labels.insert(
            GATEWAY_MANAGED_LABEL.into(),
            GATEWAY_MANAGED_WAYPOINT.into(),
        );
        managed.waypoint = pod_waypoint("shop", &managed.labels, Some(&ns));
        assert!(snap.pod_waypoint_in_force(&managed).is_none());
    }

    #[test]
    fn a_waypoint_only_pods_use_is_still_a_waypoint_peer() {
        let td = TrustDomain::new("cluster.local").expect("td");
        let wp_pod = pod("shop", "wp-0", "wp-sa", "198.18.9.1");
        let db = pod_using("db-0", "db", "198.18.9.6", WaypointSource::Pod);
        let wp_svc = wp_service();
        let mut snap = Snapshot {
            workloads: [(wp_pod.key(), wp_pod), (db.key(), db)].into(),
            services: [(key("shop", "wp"), wp_svc.clone())].into(),
            ..Snapshot::default()
        };
        let ip = "198.18.9.1".parse().expect("ip");
        let db_ip = "198.18.9.6".parse().expect("ip");
        let wp_id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/wp-sa").expect("id");
        // Takes service traffic only: the pod's label is not in force.
        assert!(!snap.is_waypoint_of(ip, &wp_id, &td, db_ip));
        snap.services
            .insert(key("shop", "wp"), with_scope(wp_svc, "workload"));
        // A changed snapshot is a new one (its index is built afresh).
        let snap = snap.clone();
        assert!(snap.is_waypoint_of(ip, &wp_id, &td, db_ip));
    }

    #[test]
    fn the_waypoints_own_pods_reach_the_service_directly() {
        let mut web = service("shop", "web", &[("http", 80)], &[]);
        web.waypoint = Some(Waypoint {
            reference: wref("shop", "wp"),
            from: WaypointSource::Namespace,
        });
        let wp = service(
            "shop",
            "wp",
            &[("mesh", 15008)],
            &[("198.18.9.1", Some("wp-0"))],
        );
        let snap = Snapshot {
            services: [(key("shop", "wp"), wp)].into(),
            ..Snapshot::default()
        };
        let client = WorkloadKey {
            namespace: "shop".into(),
            name: "client".into(),
        };
        let waypoint_pod = WorkloadKey {
            namespace: "shop".into(),
            name: "wp-0".into(),
        };
        assert!(snap.waypoint_for(&web, &client).is_some());
        assert!(snap.waypoint_for(&web, &waypoint_pod).is_none());
    }

    /// A service `ns/name` and a pod `ns/p` both labelled with waypoint
    /// `victim/wp` (whose Service exists), in a snapshot with `gateway`.
    fn bound_across(ns: &str, gateway: Option<serde_json::Value>) -> Snapshot {
        let r = wref("victim", "wp");
        let mut svc = service(ns, "front", &[("http", 80)], &[]);
        svc.waypoint = Some(Waypoint {
            reference: r.clone(),
            from: WaypointSource::Service,
        });
        let mut p = pod(ns, "p", "sa", "198.18.7.1");
        p.waypoint = Some(Waypoint {
            reference: r.clone(),
            from: WaypointSource::Pod,
        });
        let wp = with_scope(service("victim", "wp", &[("mesh", 15008)], &[]), "all");
        Snapshot {
            services: [(key(ns, "front"), svc), (r.service_key(), wp)].into(),
            workloads: [(p.key(), p)].into(),
            waypoint_gateways: waypoint_gateways(&gateway.into_iter().collect::<Vec<_>>()),
            namespace_labels: [
                ("t".to_owned(), labels(&[("tenant", "trusted")])),
                ("u".to_owned(), labels(&[("tenant", "other")])),
            ]
            .into(),
            ..Snapshot::default()
        }
    }

    fn gateway(allowed: Option<serde_json::Value>) -> serde_json::Value {
        let mut listener = serde_json::json!({"name": "mesh", "port": 15008, "protocol": "HBONE"});
        if let Some(a) = allowed {
            listener["allowedRoutes"] = a;
        }
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"namespace": "victim", "name": "wp"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [listener]},
        })
    }

    /// Whether the service and the pod of [`bound_across`] are bound.
    fn bound(snap: &Snapshot, ns: &str) -> (bool, bool) {
        let svc = &snap.services[&key(ns, "front")];
        let p = &snap.workloads[&WorkloadKey {
            namespace: ns.into(),
            name: "p".into(),
        }];
        let s = snap.service_waypoint_in_force(svc).is_some();
        let w = snap.pod_waypoint_in_force(p).is_some();
        assert_eq!(
            snap.refused_waypoint_bindings().len(),
            usize::from(!s) + usize::from(!w),
            "refused bindings are reported"
        );
        (s, w)
    }

    #[test]
    fn a_cross_namespace_binding_needs_the_waypoint_gateways_consent() {
        // No Gateway object: only same-namespace bindings.
        assert_eq!(bound(&bound_across("t", None), "t"), (false, false));
        // A Gateway without allowedRoutes, or `from` absent: Same.
        assert_eq!(
            bound(&bound_across("t", Some(gateway(None))), "t"),
            (false, false)
        );
        let from = |v: serde_json::Value| Some(gateway(Some(serde_json::json!({"namespaces": v}))));
        assert_eq!(
            bound(&bound_across("t", from(serde_json::json!({}))), "t"),
            (false, false)
        );
        assert_eq!(
            bound(
                &bound_across("t", from(serde_json::json!({"from": "Same"}))),
                "t"
            ),
            (false, false)
        );
        assert_eq!(
            bound(
                &bound_across("t", from(serde_json::json!({"from": "All"}))),
                "t"
            ),
            (true, true)
        );
        // `All` on a listener that is not the HBONE one does not count.
        let mut other = gateway(None);
        other["spec"]["listeners"]
            .as_array_mut()
            .expect("listeners")
            .push(
                serde_json::json!({"name": "h", "port": 80, "protocol": "HTTP",
                "allowedRoutes": {"namespaces": {"from": "All"}}}),
            );
        assert_eq!(bound(&bound_across("t", Some(other)), "t"), (false, false));
        // Selector: matchLabels and matchExpressions on the namespace's labels.
        let sel = from(serde_json::json!({"from": "Selector", "selector": {
            "matchLabels": {"tenant": "trusted"}}}));
        assert_eq!(bound(&bound_across("t", sel.clone()), "t"), (true, true));
        assert_eq!(bound(&bound_across("u", sel), "u"), (false, false));
        assert_eq!(
            bound(
                &bound_across(
                    "nolabels",
                    from(serde_json::json!({"from": "Selector", "selector": {
            "matchLabels": {"tenant": "trusted"}}}))
                ),
                "nolabels"
            ),
            (false, false)
        );
        let expr = from(serde_json::json!({"from": "Selector", "selector": {
            "matchExpressions": [{"key": "tenant", "operator": "In", "values": ["trusted", "x"]}]}}));
        assert_eq!(bound(&bound_across("t", expr.clone()), "t"), (true, true));
        assert_eq!(bound(&bound_across("u", expr), "u"), (false, false));
        // A malformed selector admits nobody else.
        let bad = from(serde_json::json!({"from": "Selector", "selector": {"matchLabels": ["x"]}}));
        assert_eq!(bound(&bound_across("t", bad), "t"), (false, false));
        // Same namespace: bound with or without a Gateway.
        assert_eq!(bound(&bound_across("victim", None), "victim"), (true, true));
        assert_eq!(
            bound(&bound_across("victim", Some(gateway(None))), "victim"),
            (true, true)
        );
    }
}
