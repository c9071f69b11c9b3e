//! Compiling objects and services into an immutable [`RouteTable`], and the
//! per-connection route decision: a hash lookup of the service by its VIP,
//! the first visible route set, the first matching rule, a weighted pick
//! among its destinations, and a lookup of the destination's endpoints and
//! policy (all precomputed). The cost does not grow with the number of
//! routes in the mesh.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    model::{self, Object, Other},
    policy::{self, Lb, Level, Outlier, Parts, Policy, Pool},
    report::{Kind, ObjectReport, Report, Status, Warning},
};

/// Compile settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cluster DNS domain of FQDN hosts (`cluster.local`).
    pub cluster_domain: String,
    /// Istio's root namespace (its DestinationRules apply mesh-wide, after
    /// the client's and the service's own).
    pub root_namespace: String,
    /// The `exportTo` of a VirtualService that sets none (Istio's mesh
    /// option `defaultVirtualServiceExportTo`, by default `["*"]`: every
    /// namespace). `["."]` keeps a tenant's VirtualService for another
    /// namespace's host to its own clients.
    pub default_virtual_service_export_to: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            default_virtual_service_export_to: vec!["*".into()],
        }
    }
}

/// A service as the engine needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInput {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Virtual IPs (connections to these are routed).
    pub vips: Vec<IpAddr>,
    /// TCP ports: (name, port).
    pub ports: Vec<(String, u16)>,
    /// Ready endpoints.
    pub endpoints: Vec<EndpointInput>,
}

/// A ready endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInput {
    /// Address.
    pub ip: IpAddr,
    /// Target port by service port name.
    pub ports: BTreeMap<String, u16>,
    /// The pod's labels (subsets select on them).
    pub labels: BTreeMap<String, String>,
}

/// The raw objects, as served (JSON values).
#[derive(Clone, Copy, Debug, Default)]
pub struct Objects<'a> {
    /// DestinationRules.
    pub destination_rules: &'a [Value],
    /// VirtualServices.
    pub virtual_services: &'a [Value],
    /// TCPRoutes.
    pub tcp_routes: &'a [Value],
}

/// The most subsets a DestinationRule may define.
pub const MAX_SUBSETS: usize = 256;

/// Namespaces an object is visible to (Istio's `exportTo`; a GAMMA
/// consumer route's own namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Export {
    /// Every namespace (`*`, or no `exportTo`).
    All,
    /// These namespaces only (a set: looked up on every new connection,
    /// whatever the length of an object's list).
    Only(BTreeSet<String>),
}

impl Export {
    /// `exportTo` of an object in namespace `own`: `.` is `own`, `~` none.
    pub fn parse(list: &[String], own: &str) -> Self {
        if list.is_empty() || list.iter().any(|n| n == "*") {
            return Self::All;
        }
        Self::Only(
            list.iter()
                .map(|n| if n == "." { own.to_string() } else { n.clone() })
                .filter(|n| n != "~")
                .collect(),
        )
    }

    /// Visible to namespace `ns` only.
    pub fn only(ns: &str) -> Self {
        Self::Only(BTreeSet::from([ns.to_owned()]))
    }
    /// Whether clients of namespace `ns` see the object.
    pub fn visible_to(&self, ns: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(set) => set.contains(ns),
        }
    }
}

/// One destination: a service port, optionally narrowed to a subset, with
/// its endpoints and effective policy. Shared by every route to it.
#[derive(Debug)]
pub struct Dest {
    /// `namespace/name:port` or `namespace/name:port/subset`: the key of
    /// its balancer state (connection counts, cursor).
    pub key: Arc<str>,
    /// `namespace/name:port`: the destination without its subset (a metric label).
    pub destination: Arc<str>,
    /// `namespace/name` of the service.
    pub service: Arc<str>,
    /// The service port.
    pub port: u16,
    /// The subset, if any.
    pub subset: Option<Arc<str>>,
    /// Endpoint addresses (`ip:targetPort`), sorted.
    pub endpoints: Vec<SocketAddr>,
    /// The effective policy.
    pub policy: Policy,
    /// Where its policy comes from (`DestinationRule ns/name`), if a rule.
    pub rule: Option<Arc<str>>,
}

#[derive(Debug)]
struct Match {
    port: Option<u16>,
    subnets: Vec<IpNet>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
}

impl Match {
    fn matches(&self, req: &Request<'_>) -> bool {
        self.port.is_none_or(|p| p == req.destination.port())
            && (self.subnets.is_empty()
                || self
                    .subnets
                    .iter()
                    .any(|n| n.contains(&req.destination.ip().to_canonical())))
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| ns == req.source_namespace)
            && self
                .source_labels
                .iter()
                .all(|(k, v)| req.source_labels.get(k) == Some(v))
    }
}

/// Where a weighted share goes.
#[derive(Clone, Debug)]
enum Target {
    Service {
        svc: usize,
        port: Option<u16>,
        subset: Option<String>,
    },
    /// The destination does not exist: connections fail with this reason.
    Missing(Arc<str>),
}

#[derive(Debug)]
struct Weighted {
    weight: u64,
    target: Target,
}

#[derive(Debug)]
struct Rule {
    /// Empty: every connection.
    matches: Vec<Match>,
    dests: Vec<Weighted>,
    total: u64,
}

/// The routes one object gives one service.
#[derive(Debug)]
struct RouteSet {
    name: Arc<str>,
    namespace: String,
    export: Export,
    /// A TCPRoute attached to one port of the service.
    port: Option<u16>,
    /// Shared by every service the object names (compiled once).
    rules: Arc<[Rule]>,
}

/// The destinations one DestinationRule gives one service.
#[derive(Debug)]
struct RuleSet {
    name: Arc<str>,
    namespace: String,
    export: Export,
    /// In the service's namespace or the root namespace: a candidate for
    /// every client it is exported to. A rule in another namespace applies
    /// to its own namespace's clients only (Istio's lookup: the client's
    /// namespace, the service's, the root namespace).
    for_every_client: bool,
    whole: Vec<(u16, Arc<Dest>)>,
    subsets: HashMap<String, Vec<(u16, Arc<Dest>)>>,
}

#[derive(Debug)]
struct Svc {
    key: Arc<str>,
    namespace: String,
    input: ServiceInput,
    routes: Vec<RouteSet>,
    rules: Vec<RuleSet>,
    plain: Vec<(u16, Arc<Dest>)>,
}

/// A connection to route.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The address the client dialled (a service VIP and port).
    pub destination: SocketAddr,
    /// The client's address.
    pub source: IpAddr,
    /// The client pod's namespace.
    pub source_namespace: &'a str,
    /// The client pod's labels.
    pub source_labels: &'a BTreeMap<String, String>,
}

/// A route decision: the destination to pick an endpoint from.
#[derive(Clone, Debug)]
pub struct Routed {
    /// The route that chose it (`VirtualService ns/name`, `TCPRoute ns/name`); `None`: the service's default.
    pub route: Option<Arc<str>>,
    /// The destination.
    pub dest: Arc<Dest>,
}

/// Why a connection to a service has nowhere to go.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The dialled port is not a TCP port of the service.
    #[error("service {service} has no TCP port {port}")]
    NoSuchPort {
        /// `namespace/name`.
        service: Arc<str>,
        /// The port.
        port: u16,
    },
    /// The route's destination does not exist (no such service, port or subset).
    #[error("route {route} sends to a destination that does not exist: {reason}")]
    MissingDestination {
        /// The route.
        route: Arc<str>,
        /// What is missing, and what to fix.
        reason: Arc<str>,
    },
}

impl RouteError {
    /// The route that failed, if a route did.
    pub fn route(&self) -> Option<&Arc<str>> {
        match self {
            Self::MissingDestination { route, .. } => Some(route),
            Self::NoSuchPort { .. } => None,
        }
    }
}

/// The compiled routing of the mesh: immutable, shared between connections.
#[derive(Debug, Default)]
pub struct RouteTable {
    id: u64,
    services: Vec<Svc>,
    by_vip: HashMap<IpAddr, usize>,
    by_name: HashMap<Arc<str>, usize>,
    report: Report,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// `Some(value)` when `json` deserializes as `T`; else the error with its field path.
fn parse<T: DeserializeOwned>(json: &Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

/// The warning of an HTTP-only field (`connectionPool.http`,
/// `consistentHash.httpHeaderName`, ...), which the node proxy cannot apply.
pub const NEEDS_L7: &str = "needs L7 (a waypoint): not applied by the node proxy";

/// What an ignored field is, for its warning.
fn unsupported(field: &str) -> &'static str {
    match field {
        "http" | "httpHeaderName" | "httpCookie" | "httpQueryParameterName" => NEEDS_L7,
        "tls" => "TLS settings/routes are not applied: the mesh's own HBONE mTLS is used",
        _ => "not supported at L4: ignored",
    }
}

fn warn_other(warnings: &mut Vec<Warning>, at: &str, other: &Other) {
    for k in other.keys() {
        warnings.push(Warning {
            field: format!("{at}.{k}"),
            message: unsupported(k).into(),
        });
    }
}

struct Compiler<'a> {
    opts: &'a Options,
    services: Vec<Svc>,
    by_name: HashMap<Arc<str>, usize>,
    report: Report,
}

type Reject = (String, String);

impl Compiler<'_> {
    /// The service a host names, seen from `namespace`: `name`,
    /// `name.namespace`, `name.namespace.svc` or `name.namespace.svc.<domain>`.
    fn host(&self, host: &str, namespace: &str) -> Result<usize, String> {
        if host.contains('*') {
            return Err(format!(
                "wildcard host {host:?} is not supported by the node proxy: name one service"
            ));
        }
        let suffix = format!(".svc.{}", self.opts.cluster_domain);
        let bare = host
            .strip_suffix(&suffix)
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        let (name, ns) = match bare.split_once('.') {
            None => (bare, namespace),
            Some((name, ns)) if !ns.contains('.') => (name, ns),
            Some(_) => return Err(format!("host {host:?} is not a service of this cluster")),
        };
        self.by_name
            .get(format!("{ns}/{name}").as_str())
            .copied()
            .ok_or_else(|| format!("no service {ns}/{name} (host {host:?})"))
    }

    fn meta(json: &Value) -> (String, String) {
        let m: model::Metadata = json
            .get("metadata")
            .and_then(|m| serde_json::from_value(m.clone()).ok())
            .unwrap_or_default();
        (
            m.namespace.unwrap_or_else(|| "default".into()),
            m.name.unwrap_or_default(),
        )
    }

    fn push(&mut self, kind: Kind, ns: &str, name: &str, r: Result<Vec<Warning>, Status>) {
        let (status, warnings) = match r {
            Ok(w) => (Status::Applied, w),
            Err(s) => (s, Vec::new()),
        };
        self.report.objects.push(ObjectReport {
            kind,
            namespace: ns.into(),
            name: name.into(),
            status,
            warnings,
        });
    }

    fn check_meta(json: &Value, group: &str, kind: &str) -> Result<(), Reject> {
        let api = json.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if api.split('/').next() != Some(group) {
            return Err((
                "apiVersion".into(),
                format!("{api:?} is not a {group} version"),
            ));
        }
        if json.get("kind").and_then(Value::as_str) != Some(kind) {
            return Err(("kind".into(), format!("expected {kind}")));
        }
        match json.pointer("/metadata/name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => Ok(()),
            _ => Err(("metadata.name".into(), "missing".into())),
        }
    }

    fn rejected((field, reason): Reject) -> Status {
        Status::Rejected { field, reason }
    }

    // ---- DestinationRule -------------------------------------------------

    fn destination_rule(&mut self, json: &Value) {
        let (ns, name) = Self::meta(json);
        let r = self.destination_rule_inner(json, &ns, &name);
        self.push(Kind::DestinationRule, &ns, &name, r);
    }

    fn destination_rule_inner(
        &mut self,
        json: &Value,
        ns: &str,
        name: &str,
    ) -> Result<Vec<Warning>, Status> {
        Self::check_meta(json, "networking.istio.io", "DestinationRule").map_err(Self::rejected)?;
        let obj: Object<model::DestinationRuleSpec> = parse(json).map_err(Self::rejected)?;
        let spec = obj.spec;
        if spec.other.contains_key("workloadSelector") {
            // Applying it to every client would misroute the others.
            return Err(Status::NotApplied {
                reason: "spec.workloadSelector (a rule for some clients only) is not supported by the node proxy: not applied".into(),
            });
        }
        let mut w = Vec::new();
        warn_other(&mut w, "spec", &spec.other);
        let top = match &spec.traffic_policy {
            Some(tp) => Some(level(tp, "spec.trafficPolicy", &mut w).map_err(Self::rejected)?),
            None => None,
        };
        // Each subset keeps its own endpoints per port: bounded, so one
        // object cannot make every node's compilation hold subsets x ports
        // x endpoints without end.
        if spec.subsets.len() > MAX_SUBSETS {
            return Err(Self::rejected((
                "spec.subsets".into(),
                format!(
                    "{} subsets: at most {MAX_SUBSETS} are supported",
                    spec.subsets.len()
                ),
            )));
        }
        let mut subsets = Vec::new();
        let mut names = HashSet::new();
        for (i, s) in spec.subsets.iter().enumerate() {
            let at = format!("spec.subsets[{i}]");
            if s.name.is_empty() {
                return Err(Self::rejected((format!("{at}.name"), "missing".into())));
            }
            if !names.insert(s.name.as_str()) {
                return Err(Self::rejected((
                    format!("{at}.name"),
                    format!("subset {:?} is defined twice", s.name),
                )));
            }
            warn_other(&mut w, &at, &s.other);
            let lvl = match &s.traffic_policy {
                Some(tp) => Some(
                    level(tp, &format!("{at}.trafficPolicy"), &mut w).map_err(Self::rejected)?,
                ),
                None => None,
            };
            subsets.push((s.name.clone(), s.labels.clone(), lvl));
        }
        let svc = match self.host(&spec.host, ns) {
            Ok(svc) => svc,
            Err(reason) => {
                // Valid, but for no service known now: nothing to apply yet.
                w.push(Warning {
                    field: "spec.host".into(),
                    message: reason,
                });
                return Ok(w);
            }
        };
        let rule_name: Arc<str> = format!("{ns}/{name}").into();
        let s = &self.services[svc];
        let mk = |subset: Option<&(String, BTreeMap<String, String>, Option<Level>)>| {
            s.input
                .ports
                .iter()
                .map(|(pname, port)| {
                    let policy = policy::effective(
                        top.as_ref(),
                        subset.and_then(|(_, _, l)| l.as_ref()),
                        *port,
                    );
                    let labels = subset.map(|(_, l, _)| l);
                    (
                        *port,
                        Arc::new(dest(
                            s,
                            pname,
                            *port,
                            subset.map(|(n, _, _)| n.as_str()),
                            labels,
                            policy,
                            Some(rule_name.clone()),
                        )),
                    )
                })
                .collect::<Vec<_>>()
        };
        let whole = mk(None);
        let by_subset = subsets
            .iter()
            .map(|sub| (sub.0.clone(), mk(Some(sub))))
            .collect();
        let set = RuleSet {
            name: rule_name.clone(),
            namespace: ns.into(),
            export: Export::parse(&spec.export_to, ns),
            // Set once the root namespace's rank is known (`compile`).
            for_every_client: false,
            whole,
            subsets: by_subset,
        };
        self.services[svc].rules.push(set);
        Ok(w)
    }

    // ---- VirtualService --------------------------------------------------

    fn virtual_service(&mut self, json: &Value) {
        let (ns, name) = Self::meta(json);
        let r = self.virtual_service_inner(json, &ns, &name);
        self.push(Kind::VirtualService, &ns, &name, r);
    }

    fn virtual_service_inner(
        &mut self,
        json: &Value,
        ns: &str,
        name: &str,
    ) -> Result<Vec<Warning>, Status> {
        Self::check_meta(json, "networking.istio.io", "VirtualService").map_err(Self::rejected)?;
        let obj: Object<model::VirtualServiceSpec> = parse(json).map_err(Self::rejected)?;
        let spec = obj.spec;
        if spec.hosts.is_empty() {
            return Err(Self::rejected((
                "spec.hosts".into(),
                "at least one host is required".into(),
            )));
        }
        if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh") {
            return Err(Status::NotApplied {
                reason: format!(
                    "bound to gateways {:?}, not to the mesh (add \"mesh\" to spec.gateways)",
                    spec.gateways
                ),
            });
        }
        if spec.tcp.is_empty() {
            let l7: Vec<&str> = ["http", "tls"]
                .into_iter()
                .filter(|k| spec.other.contains_key(*k))
                .collect();
            return Err(if l7.is_empty() {
                Status::NotApplied {
                    reason: "no tcp routes".into(),
                }
            } else {
                Status::NeedsL7 {
                    reason: format!(
                        "only {} routes: they need L7 (a waypoint); the node proxy applies tcp routes only",
                        l7.join(" and ")
                    ),
                }
            });
        }
        let mut w = Vec::new();
        warn_other(&mut w, "spec", &spec.other);
        let route_name: Arc<str> = format!("VirtualService/{ns}/{name}").into();
        let mut rules = Vec::new();
        for (i, r) in spec.tcp.iter().enumerate() {
            let at = format!("spec.tcp[{i}]");
            warn_other(&mut w, &at, &r.other);
            let mut matches = Vec::new();
            let mut for_gateways_only = 0;
            for (j, m) in r.matches.iter().enumerate() {
                let mat = format!("{at}.match[{j}]");
                warn_other(&mut w, &mat, &m.other);
                if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
                    for_gateways_only += 1;
                    continue;
                }
                matches.push(l4_match(m, &mat).map_err(Self::rejected)?);
            }
            if for_gateways_only > 0 && matches.is_empty() {
                continue; // every match is for gateways
            }
            if r.route.is_empty() {
                return Err(Self::rejected((
                    format!("{at}.route"),
                    "at least one destination is required".into(),
                )));
            }
            let single = r.route.len() == 1;
            let mut dests = Vec::new();
            for (k, d) in r.route.iter().enumerate() {
                let dat = format!("{at}.route[{k}]");
                warn_other(&mut w, &dat, &d.other);
                let weight = match d.weight {
                    _ if single => 100,
                    None => 0,
                    Some(x) if (0..=i64::from(u32::MAX)).contains(&x) => x as u64,
                    Some(x) => {
                        return Err(Self::rejected((
                            format!("{dat}.weight"),
                            format!("{x} is not a weight (0 or more)"),
                        )));
                    }
                };
                let port = match d.destination.port {
                    None => None,
                    Some(p) => Some(port16(p.number).map_err(|reason| {
                        Self::rejected((format!("{dat}.destination.port.number"), reason))
                    })?),
                };
                let target = match self.host(&d.destination.host, ns) {
                    Ok(svc) => Target::Service {
                        svc,
                        port,
                        subset: d.destination.subset.clone(),
                    },
                    Err(reason) => {
                        w.push(Warning {
                            field: format!("{dat}.destination.host"),
                            message: format!("{reason}: connections routed here fail"),
                        });
                        Target::Missing(reason.into())
                    }
                };
                dests.push(Weighted { weight, target });
            }
            let total: u64 = dests.iter().map(|d| d.weight).sum();
            if total == 0 {
                w.push(Warning {
                    field: format!("{at}.route"),
                    message: "every weight is 0: connections matching this route fail".into(),
                });
            } else if !single && total != 100 {
                w.push(Warning {
                    field: format!("{at}.route"),
                    message: format!("weights sum to {total}, not 100: used as proportions"),
                });
            }
            rules.push(Rule {
                matches,
                dests,
                total,
            });
        }
        let export = if spec.export_to.is_empty() {
            Export::parse(&self.opts.default_virtual_service_export_to, ns)
        } else {
            Export::parse(&spec.export_to, ns)
        };
        // One compiled copy of the rules for every host: an object naming
        // a service many times costs one entry, not one copy each.
        let rules: Arc<[Rule]> = rules.into();
        let mut named = HashSet::new();
        for (i, host) in spec.hosts.iter().enumerate() {
            match self.host(host, ns) {
                Ok(svc) if !named.insert(svc) => w.push(Warning {
                    field: format!("spec.hosts[{i}]"),
                    message: format!("{host:?} names a service an earlier host names: ignored"),
                }),
                Ok(svc) => {
                    let set = RouteSet {
                        name: route_name.clone(),
                        namespace: ns.into(),
                        export: export.clone(),
                        port: None,
                        rules: Arc::clone(&rules),
                    };
                    self.services[svc].routes.push(set);
                }
                Err(reason) => w.push(Warning {
                    field: format!("spec.hosts[{i}]"),
                    message: reason,
                }),
            }
        }
        Ok(w)
    }

    // ---- TCPRoute --------------------------------------------------------

    fn tcp_route(&mut self, json: &Value) {
        let (ns, name) = Self::meta(json);
        let r = self.tcp_route_inner(json, &ns, &name);
        self.push(Kind::TcpRoute, &ns, &name, r);
    }

    fn tcp_route_inner(
        &mut self,
        json: &Value,
        ns: &str,
        name: &str,
    ) -> Result<Vec<Warning>, Status> {
        Self::check_meta(json, "gateway.networking.k8s.io", "TCPRoute").map_err(Self::rejected)?;
        let obj: Object<model::TcpRouteSpec> = parse(json).map_err(Self::rejected)?;
        let spec = obj.spec;
        let mut w = Vec::new();
        warn_other(&mut w, "spec", &spec.other);
        let is_core = |g: &Option<String>| g.as_deref().is_none_or(|g| g.is_empty() || g == "core");
        let mut parents = Vec::new();
        for (i, p) in spec.parent_refs.iter().enumerate() {
            let at = format!("spec.parentRefs[{i}]");
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            if kind != "Service" || !is_core(&p.group) {
                w.push(Warning {
                    field: at,
                    message: format!(
                        "parent {kind} {}: not a Service, so not the mesh: ignored by the node proxy",
                        p.name
                    ),
                });
                continue;
            }
            if p.section_name.is_some() {
                w.push(Warning {
                    field: format!("{at}.sectionName"),
                    message: "not supported for a Service parent (use port): ignored, the route applies to every port".into(),
                });
            }
            let port = match p.port {
                None => None,
                Some(x) => Some(
                    port16(x).map_err(|reason| Self::rejected((format!("{at}.port"), reason)))?,
                ),
            };
            let pns = p.namespace.as_deref().unwrap_or(ns);
            match self.by_name.get(format!("{pns}/{}", p.name).as_str()) {
                // GAMMA: a route in the service's namespace (a producer
                // route) applies to every client; one in another namespace
                // (a consumer route), to the clients of its own namespace only.
                Some(svc) => parents.push((
                    *svc,
                    port,
                    if pns == ns {
                        Export::All
                    } else {
                        Export::only(ns)
                    },
                )),
                None => w.push(Warning {
                    field: format!("{at}.name"),
                    message: format!("no service {pns}/{}", p.name),
                }),
            }
        }
        if spec.parent_refs.is_empty()
            || spec
                .parent_refs
                .iter()
                .all(|p| p.kind.as_deref().unwrap_or("Gateway") != "Service")
        {
            return Err(Status::NotApplied {
                reason: "no parentRef is a Service: attached to gateways, not the mesh".into(),
            });
        }
        let Some(rule) = spec.rules.first() else {
            return Err(Self::rejected((
                "spec.rules".into(),
                "at least one rule is required".into(),
            )));
        };
        if spec.rules.len() > 1 {
            w.push(Warning {
                field: "spec.rules".into(),
                message: "only the first rule is applied (TCPRoute rules have no matches)".into(),
            });
        }
        let unknown_rule: Other = rule
            .other
            .iter()
            .filter(|(k, _)| k.as_str() != "name")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        warn_other(&mut w, "spec.rules[0]", &unknown_rule);
        let mut dests = Vec::new();
        for (k, b) in rule.backend_refs.iter().enumerate() {
            let at = format!("spec.rules[0].backendRefs[{k}]");
            let weight = match b.weight {
                None => 1,
                Some(x) if (0..=1_000_000).contains(&x) => x as u64,
                Some(x) => {
                    return Err(Self::rejected((
                        format!("{at}.weight"),
                        format!("{x} is not a weight (0 to 1000000)"),
                    )));
                }
            };
            let kind = b.kind.as_deref().unwrap_or("Service");
            let target = if kind != "Service" || !is_core(&b.group) {
                Target::Missing(
                    format!("backend kind {kind} is not supported (Service only)").into(),
                )
            } else if b.namespace.as_deref().is_some_and(|n| n != ns) {
                Target::Missing(
                    format!(
                        "backend {}/{} is in another namespace: ReferenceGrant is not supported, so it is refused",
                        b.namespace.as_deref().unwrap_or(ns),
                        b.name
                    )
                    .into(),
                )
            } else {
                let Some(p) = b.port else {
                    return Err(Self::rejected((
                        format!("{at}.port"),
                        "a Service backend needs a port".into(),
                    )));
                };
                let port = port16(p).map_err(|r| Self::rejected((format!("{at}.port"), r)))?;
                match self.by_name.get(format!("{ns}/{}", b.name).as_str()) {
                    Some(svc) => Target::Service {
                        svc: *svc,
                        port: Some(port),
                        subset: None,
                    },
                    None => Target::Missing(format!("no service {ns}/{}", b.name).into()),
                }
            };
            if let Target::Missing(reason) = &target {
                w.push(Warning {
                    field: at,
                    message: format!("{reason}: connections routed here fail"),
                });
            }
            dests.push(Weighted { weight, target });
        }
        let total = dests.iter().map(|d| d.weight).sum();
        if total == 0 {
            w.push(Warning {
                field: "spec.rules[0].backendRefs".into(),
                message: "no backend with a weight: connections fail".into(),
            });
        }
        let name: Arc<str> = format!("TCPRoute/{ns}/{name}").into();
        for (svc, port, export) in parents {
            let set = RouteSet {
                name: name.clone(),
                namespace: ns.into(),
                export,
                port,
                rules: Arc::new([Rule {
                    matches: Vec::new(),
                    dests: dests
                        .iter()
                        .map(|d| Weighted {
                            weight: d.weight,
                            target: d.target.clone(),
                        })
                        .collect(),
                    total,
                }]),
            };
            self.services[svc].routes.push(set);
        }
        Ok(w)
    }
}

fn port16(n: u32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{n} is not a port (1-65535)"))
}

fn l4_match(m: &model::L4Match, at: &str) -> Result<Match, Reject> {
    let port = match m.port {
        None => None,
        Some(p) => Some(port16(p).map_err(|r| (format!("{at}.port"), r))?),
    };
    let mut subnets = Vec::new();
    for (i, s) in m.destination_subnets.iter().enumerate() {
        let net = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                (
                    format!("{at}.destinationSubnets[{i}]"),
                    format!("{s:?} is not an address or CIDR"),
                )
            })?;
        subnets.push(net);
    }
    Ok(Match {
        port,
        subnets,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
    })
}

fn level(tp: &model::TrafficPolicy, at: &str, w: &mut Vec<Warning>) -> Result<Level, Reject> {
    warn_other(w, at, &tp.other);
    let base = parts(
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        at,
        w,
    )?;
    let mut ports = Vec::new();
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pat = format!("{at}.portLevelSettings[{i}]");
        warn_other(w, &pat, &p.other);
        let Some(sel) = p.port else {
            return Err((format!("{pat}.port"), "a port is required".into()));
        };
        let port = port16(sel.number).map_err(|r| (format!("{pat}.port.number"), r))?;
        let s = parts(
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            &pat,
            w,
        )?;
        ports.push((port, s));
    }
    Ok(Level { base, ports })
}

fn parts(
    lb: Option<&model::LoadBalancer>,
    pool: Option<&model::ConnectionPool>,
    od: Option<&model::OutlierDetection>,
    at: &str,
    w: &mut Vec<Warning>,
) -> Result<Parts, Reject> {
    let dur = |s: &Option<String>, field: &str| -> Result<Option<std::time::Duration>, Reject> {
        s.as_deref()
            .map(policy::parse_duration)
            .transpose()
            .map_err(|r| (field.to_string(), r))
    };
    let lb = match lb {
        None => None,
        Some(lb) => {
            let lat = format!("{at}.loadBalancer");
            warn_other(w, &lat, &lb.other);
            match (&lb.simple, &lb.consistent_hash) {
                (Some(_), Some(_)) => {
                    return Err((lat, "set either simple or consistentHash, not both".into()));
                }
                (Some(s), None) => Some(match s {
                    model::SimpleLb::Unspecified
                    | model::SimpleLb::LeastConn
                    | model::SimpleLb::LeastRequest => Lb::LeastRequest,
                    model::SimpleLb::Random => Lb::Random,
                    model::SimpleLb::Passthrough => Lb::Passthrough,
                    model::SimpleLb::RoundRobin => Lb::RoundRobin,
                }),
                (None, Some(ch)) => {
                    let cat = format!("{lat}.consistentHash");
                    warn_other(w, &cat, &ch.other);
                    if ch.use_source_ip == Some(true) {
                        Some(Lb::SourceIpHash)
                    } else {
                        // Only L7 keys: Istio's default stands.
                        None
                    }
                }
                (None, None) => None,
            }
        }
    };
    let pool = match pool {
        None => None,
        Some(p) => {
            let pat = format!("{at}.connectionPool");
            warn_other(w, &pat, &p.other);
            let tcp = p.tcp.clone().unwrap_or_default();
            warn_other(w, &format!("{pat}.tcp"), &tcp.other);
            let max_connections = match tcp.max_connections {
                None => None,
                Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => Some(n as u32),
                Some(n) => {
                    return Err((
                        format!("{pat}.tcp.maxConnections"),
                        format!("{n} is not a connection limit (1 or more)"),
                    ));
                }
            };
            Some(Pool {
                max_connections,
                connect_timeout: dur(&tcp.connect_timeout, &format!("{pat}.tcp.connectTimeout"))?,
            })
        }
    };
    let outlier = match od {
        None => None,
        Some(o) => {
            let oat = format!("{at}.outlierDetection");
            warn_other(w, &oat, &o.other);
            if o.consecutive_errors.is_some() {
                w.push(Warning {
                    field: format!("{oat}.consecutiveErrors"),
                    message: "deprecated: read as consecutive5xxErrors".into(),
                });
            }
            let five = o
                .consecutive_5xx_errors
                .or(o.consecutive_errors)
                .unwrap_or(5);
            let gw = o.consecutive_gateway_errors.unwrap_or(0);
            // At L4 a failure is both a gateway error and a 5xx: the lower
            // enabled threshold ejects first.
            let threshold = [five, gw].into_iter().filter(|n| *n > 0).min();
            let pct = match o.max_ejection_percent {
                None => 10,
                Some(p) if (0..=100).contains(&p) => p as u32,
                Some(p) => {
                    return Err((
                        format!("{oat}.maxEjectionPercent"),
                        format!("{p} is not a percentage (0-100)"),
                    ));
                }
            };
            let interval = dur(&o.interval, &format!("{oat}.interval"))?
                .unwrap_or(std::time::Duration::from_secs(10));
            let base = dur(&o.base_ejection_time, &format!("{oat}.baseEjectionTime"))?
                .unwrap_or(std::time::Duration::from_secs(30));
            Some(threshold.map(|consecutive_errors| Outlier {
                consecutive_errors,
                consecutive_5xx: five,
                consecutive_gateway: gw,
                interval,
                base_ejection_time: base,
                max_ejection_percent: pct,
            }))
        }
    };
    Ok(Parts { lb, pool, outlier })
}

/// The destination `svc:port` (its port named `pname`), narrowed to the
/// endpoints with `labels` when a subset.
fn dest(
    s: &Svc,
    pname: &str,
    port: u16,
    subset: Option<&str>,
    labels: Option<&BTreeMap<String, String>>,
    policy: Policy,
    rule: Option<Arc<str>>,
) -> Dest {
    let mut endpoints: Vec<SocketAddr> = s
        .input
        .endpoints
        .iter()
        .filter(|e| labels.is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
        .filter_map(|e| e.ports.get(pname).map(|p| SocketAddr::new(e.ip, *p)))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    Dest {
        key: match subset {
            Some(sub) => format!("{}:{port}/{sub}", s.key),
            None => format!("{}:{port}", s.key),
        }
        .into(),
        destination: format!("{}:{port}", s.key).into(),
        service: s.key.clone(),
        port,
        subset: subset.map(Into::into),
        endpoints,
        policy,
        rule,
    }
}

/// Why an object is invalid on its own: the field path and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// Where (`spec.tcp[0].route[1].weight`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// Validates one routing object (DestinationRule, VirtualService, TCPRoute)
/// on its own, as [`compile`] would read it: `Err` when compiling would
/// reject it (with its field path). What depends on the mesh's services
/// (hosts that name no service yet) and what is reported but valid (L7-only
/// fields, gateway-only objects) is not an error. For sources that refuse
/// invalid input before publishing it (a workload file).
pub fn validate(object: &Value) -> Result<(), Invalid> {
    let one = std::slice::from_ref(object);
    let mut objects = Objects::default();
    match object.get("kind").and_then(Value::as_str) {
        Some("DestinationRule") => objects.destination_rules = one,
        Some("VirtualService") => objects.virtual_services = one,
        Some("TCPRoute") => objects.tcp_routes = one,
        other => {
            return Err(Invalid {
                field: "kind".into(),
                reason: format!(
                    "{other:?} is not a routing kind (DestinationRule, VirtualService, TCPRoute)"
                ),
            });
        }
    }
    let table = compile(objects, Vec::new(), &Options::default());
    match table.report.objects.first().map(|o| &o.status) {
        Some(Status::Rejected { field, reason }) => Err(Invalid {
            field: field.clone(),
            reason: reason.clone(),
        }),
        _ => Ok(()),
    }
}

/// Compiles `objects` against `services` into a table and its report.
/// Invalid objects are rejected (with the field path) one by one: the
/// others apply.
pub fn compile(objects: Objects<'_>, services: Vec<ServiceInput>, opts: &Options) -> RouteTable {
    let mut c = Compiler {
        opts,
        services: Vec::with_capacity(services.len()),
        by_name: HashMap::with_capacity(services.len()),
        report: Report::default(),
    };
    for input in services {
        let key: Arc<str> = format!("{}/{}", input.namespace, input.name).into();
        if c.by_name.contains_key(&key) {
            continue;
        }
        c.by_name.insert(key.clone(), c.services.len());
        let mut svc = Svc {
            key,
            namespace: input.namespace.clone(),
            input,
            routes: Vec::new(),
            rules: Vec::new(),
            plain: Vec::new(),
        };
        svc.plain = svc
            .input
            .ports
            .iter()
            .map(|(n, p)| {
                (
                    *p,
                    Arc::new(dest(&svc, n, *p, None, None, Policy::default(), None)),
                )
            })
            .collect();
        c.services.push(svc);
    }
    for dr in objects.destination_rules {
        c.destination_rule(dr);
    }
    for vs in objects.virtual_services {
        c.virtual_service(vs);
    }
    for tr in objects.tcp_routes {
        c.tcp_route(tr);
    }
    // Precedence among candidates: the service's own namespace, then the
    // root namespace, then the rest in input (name) order; the client's own
    // namespace is preferred at decision time.
    let root = opts.root_namespace.clone();
    for s in &mut c.services {
        let own = s.namespace.clone();
        let rank = |ns: &str| u8::from(ns != own) + u8::from(ns != root && ns != own);
        s.routes.sort_by_key(|r| rank(&r.namespace));
        s.rules.sort_by_key(|r| rank(&r.namespace));
        for r in &mut s.rules {
            r.for_every_client = rank(&r.namespace) < 2;
        }
    }
    // Objects are not merged: where several route one service (or several
    // rules cover one host), one applies per client; say so on the others.
    let mut shadowed: Vec<(Kind, String, String, Warning)> = Vec::new();
    for s in &c.services {
        let routes: Vec<&str> = s.routes.iter().map(|r| &*r.name).collect();
        for later in routes.iter().skip(1) {
            let (kind, rest) = later.split_once('/').unwrap_or(("", later));
            let (ns, name) = rest.split_once('/').unwrap_or(("", rest));
            let kind = if kind == "TCPRoute" {
                Kind::TcpRoute
            } else {
                Kind::VirtualService
            };
            shadowed.push((kind, ns.into(), name.into(), Warning {
                field: "spec".into(),
                message: format!(
                    "service {} is also routed by {}, which takes precedence for clients that see both (route objects are not merged)",
                    s.key, routes[0]
                ),
            }));
        }
        for other in s.rules.iter().filter(|r| !r.for_every_client) {
            let (ns, name) = other.name.split_once('/').unwrap_or(("", &other.name));
            shadowed.push((Kind::DestinationRule, ns.into(), name.into(), Warning {
                field: "metadata.namespace".into(),
                message: format!(
                    "applies to the clients of namespace {} only: a DestinationRule for service {} applies to every client only from the service's namespace or the root namespace",
                    other.namespace, s.key
                ),
            }));
        }
        for later in s.rules.iter().skip(1) {
            let (ns, name) = later.name.split_once('/').unwrap_or(("", &later.name));
            shadowed.push((Kind::DestinationRule, ns.into(), name.into(), Warning {
                field: "spec.host".into(),
                message: format!(
                    "service {} also has DestinationRule {}, which takes precedence for clients that see both (rules are not merged)",
                    s.key, s.rules[0].name
                ),
            }));
        }
    }
    for (kind, ns, name, warning) in shadowed {
        if let Some(o) = c
            .report
            .objects
            .iter_mut()
            .find(|o| o.kind == kind && o.namespace == ns && o.name == name)
            && !o.warnings.contains(&warning)
        {
            o.warnings.push(warning);
        }
    }
    let mut by_vip = HashMap::new();
    for (i, s) in c.services.iter().enumerate() {
        for vip in &s.input.vips {
            by_vip.entry(vip.to_canonical()).or_insert(i);
        }
    }
    RouteTable {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        services: c.services,
        by_vip,
        by_name: c.by_name,
        report: c.report,
    }
}

/// The first of `items` visible to `ns`, preferring those in `ns`.
fn pick_visible<'a, T>(
    items: &'a [T],
    ns: &str,
    of: impl Fn(&T) -> (&str, &Export, bool),
) -> Option<&'a T> {
    let usable = |i: &&T| {
        let (_, e, ok) = of(i);
        ok && e.visible_to(ns)
    };
    items
        .iter()
        .filter(usable)
        .find(|i| of(i).0 == ns)
        .or_else(|| items.iter().find(usable))
}

impl RouteTable {
    /// This compilation's id (distinct per compile: balancer state is
    /// pruned when it changes).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What became of each object.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The VIPs of the service `namespace/name`, if the table has it.
    pub fn service_vips(&self, key: &str) -> Option<&[IpAddr]> {
        self.by_name
            .get(key)
            .map(|i| self.services[*i].input.vips.as_slice())
    }

    /// Whether `ip` is a service VIP (connections to it are routed).
    pub fn is_service(&self, ip: IpAddr) -> bool {
        self.by_vip.contains_key(&ip.to_canonical())
    }

    /// Routes a connection: `None` when its destination is not a service
    /// VIP (a pod IP, an address outside the mesh: not re-routed).
    /// `random` draws the weighted destination (uniform `u64`).
    pub fn route(&self, req: &Request<'_>, random: u64) -> Option<Result<Routed, RouteError>> {
        let svc_i = *self.by_vip.get(&req.destination.ip().to_canonical())?;
        let svc = &self.services[svc_i];
        let port = req.destination.port();
        let set = pick_visible(&svc.routes, req.source_namespace, |r| {
            (
                r.namespace.as_str(),
                &r.export,
                r.port.is_none_or(|p| p == port),
            )
        });
        let chosen = set.and_then(|set| {
            set.rules
                .iter()
                .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
                .map(|r| (set, r))
        });
        let Some((set, rule)) = chosen else {
            return Some(
                self.dest(svc_i, port, None, req.source_namespace)
                    .map(|dest| Routed { route: None, dest })
                    .map_err(|reason| match reason {
                        DestError::NoPort => RouteError::NoSuchPort {
                            service: svc.key.clone(),
                            port,
                        },
                        DestError::Missing(reason) => RouteError::MissingDestination {
                            route: svc.key.clone(),
                            reason,
                        },
                    }),
            );
        };
        let missing = |reason: Arc<str>| RouteError::MissingDestination {
            route: set.name.clone(),
            reason,
        };
        if rule.total == 0 {
            return Some(Err(missing("every destination has weight 0".into())));
        }
        let mut x = random % rule.total;
        let target = rule
            .dests
            .iter()
            .find(|d| {
                if x < d.weight {
                    true
                } else {
                    x -= d.weight;
                    false
                }
            })
            .map(|d| &d.target);
        let result = match target {
            Some(Target::Service {
                svc,
                port: dport,
                subset,
            }) => {
                let to = &self.services[*svc];
                // No port named: the dialled one if the service has it, else its only one.
                let p = dport.or_else(|| {
                    if to.input.ports.iter().any(|(_, p)| *p == port) {
                        Some(port)
                    } else if to.input.ports.len() == 1 {
                        Some(to.input.ports[0].1)
                    } else {
                        None
                    }
                });
                match p {
                    None => Err(missing(
                        format!(
                            "service {} has several ports and none is {port}: set destination.port",
                            to.key
                        )
                        .into(),
                    )),
                    Some(p) => self
                        .dest(*svc, p, subset.as_deref(), req.source_namespace)
                        .map_err(|e| match e {
                            DestError::NoPort => {
                                missing(format!("service {} has no TCP port {p}", to.key).into())
                            }
                            DestError::Missing(r) => missing(r),
                        }),
                }
            }
            Some(Target::Missing(reason)) => Err(missing(reason.clone())),
            None => Err(missing("no destination".into())),
        };
        Some(result.map(|dest| Routed {
            route: Some(set.name.clone()),
            dest,
        }))
    }

    /// The destination `port` of the service `key` (`namespace/name`),
    /// narrowed to `subset`, as a client in `client_ns` sees it (the
    /// DestinationRule visible to it, Istio's lookup order): its endpoints
    /// and effective policy. For a proxy that routes by its own rules (the
    /// L7 waypoint) and only needs the destination.
    pub fn destination(
        &self,
        key: &str,
        port: u16,
        subset: Option<&str>,
        client_ns: &str,
    ) -> Result<Arc<Dest>, RouteError> {
        let Some(&svc) = self.by_name.get(key) else {
            return Err(RouteError::MissingDestination {
                route: key.into(),
                reason: format!("no service {key}").into(),
            });
        };
        self.dest(svc, port, subset, client_ns)
            .map_err(|e| match e {
                DestError::NoPort => RouteError::NoSuchPort {
                    service: self.services[svc].key.clone(),
                    port,
                },
                DestError::Missing(reason) => RouteError::MissingDestination {
                    route: self.services[svc].key.clone(),
                    reason,
                },
            })
    }

    fn dest(
        &self,
        svc: usize,
        port: u16,
        subset: Option<&str>,
        client_ns: &str,
    ) -> Result<Arc<Dest>, DestError> {
        let s = &self.services[svc];
        let find = |list: &[(u16, Arc<Dest>)]| {
            list.iter()
                .find(|(p, _)| *p == port)
                .map(|(_, d)| d.clone())
                .ok_or(DestError::NoPort)
        };
        let rule = pick_visible(&s.rules, client_ns, |r| {
            let candidate = r.for_every_client || r.namespace == client_ns;
            (r.namespace.as_str(), &r.export, candidate)
        });
        match (subset, rule) {
            (None, None) => find(&s.plain),
            (None, Some(r)) => find(&r.whole),
            (Some(sub), Some(r)) => match r.subsets.get(sub) {
                Some(list) => find(list),
                None => Err(DestError::Missing(
                    format!(
                        "subset {sub:?} of {} is not defined by DestinationRule {}",
                        s.key, r.name
                    )
                    .into(),
                )),
            },
            (Some(sub), None) => Err(DestError::Missing(
                format!(
                    "subset {sub:?} of {}: no DestinationRule for the service defines it",
                    s.key
                )
                .into(),
            )),
        }
    }

    /// Every endpoint address of every destination (the balancer keeps state for these only).
    pub fn endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.services.iter().flat_map(|s| {
            s.plain
                .iter()
                .chain(s.rules.iter().flat_map(|r| r.whole.iter()))
                .flat_map(|(_, d)| d.endpoints.iter().copied())
        })
    }

    /// The effective routing of every service, for the CLI and `/config_dump`.
    pub fn view(&self) -> Vec<ServiceView> {
        self.services
            .iter()
            .map(|s| {
                let routes = s
                    .routes
                    .iter()
                    .map(|r| RouteView {
                        name: r.name.to_string(),
                        port: r.port,
                        export_to: match &r.export {
                            Export::All => vec!["*".into()],
                            Export::Only(l) => l.iter().cloned().collect(),
                        },
                        rules: r
                            .rules
                            .iter()
                            .map(|rule| {
                                rule.dests
                                    .iter()
                                    .map(|d| WeightView {
                                        weight: d.weight,
                                        destination: match &d.target {
                                            Target::Service { svc, port, subset } => {
                                                let mut t = self.services[*svc].key.to_string();
                                                if let Some(p) = port {
                                                    t.push_str(&format!(":{p}"));
                                                }
                                                if let Some(sub) = subset {
                                                    t.push_str(&format!("/{sub}"));
                                                }
                                                t
                                            }
                                            Target::Missing(r) => format!("(missing: {r})"),
                                        },
                                    })
                                    .collect()
                            })
                            .collect(),
                    })
                    .collect();
                let mut dests: Vec<Arc<Dest>> = match s.rules.first() {
                    Some(r) => r
                        .whole
                        .iter()
                        .chain(r.subsets.values().flatten())
                        .map(|(_, d)| d.clone())
                        .collect(),
                    None => s.plain.iter().map(|(_, d)| d.clone()).collect(),
                };
                dests.sort_by(|a, b| a.key.cmp(&b.key));
                ServiceView {
                    service: s.key.to_string(),
                    vips: s.input.vips.clone(),
                    routes,
                    destinations: dests,
                }
            })
            .collect()
    }
}

enum DestError {
    NoPort,
    Missing(Arc<str>),
}

/// One service's effective routing.
#[derive(Clone, Debug)]
pub struct ServiceView {
    /// `namespace/name`.
    pub service: String,
    /// Its VIPs.
    pub vips: Vec<IpAddr>,
    /// Route sets, in precedence order.
    pub routes: Vec<RouteView>,
    /// Its destinations (per port and subset), as seen from the service's own namespace.
    pub destinations: Vec<Arc<Dest>>,
}

/// A route set of a service.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RouteView {
    /// `VirtualService/ns/name` or `TCPRoute/ns/name`.
    pub name: String,
    /// The port it is attached to, if one.
    pub port: Option<u16>,
    /// Namespaces it is visible to.
    pub export_to: Vec<String>,
    /// Per rule, its weighted destinations.
    pub rules: Vec<Vec<WeightView>>,
}

/// A weighted destination of a rule.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightView {
    /// Relative share.
    pub weight: u64,
    /// `namespace/name[:port][/subset]`, or why it is missing.
    pub destination: String,
}
