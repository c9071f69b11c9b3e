//! The file source: one YAML (or JSON) document describing the node and its
//! pods, for running without a cluster (the lab, demos, debugging). The file
//! is re-read while the agent runs; a file that does not parse or validate is
//! rejected as a whole and the last good state stays in force.
//!
//! ```yaml
//! node:
//!   name: node-1
//!   probeSources: ["198.18.1.1"]     # node addresses: kubelet probes bypass capture
//! pods:
//!   - name: web
//!     namespace: default
//!     serviceAccount: web
//!     ips: ["198.18.1.10", "fd18:1::10"]
//!     netns: /var/run/netns/web
//!     cgroup: /sys/fs/cgroup/kubepods/web   # optional
//!     enrolled: true                        # default true
//!     excludeOutboundPorts: [53]
//!     excludeInboundPorts: [9100]
//!     labels: {app: web}                    # optional (selectors, istio.io/use-waypoint)
//!   - name: db                              # a pod on another node: no netns,
//!     node: node-2                          # known for its addresses and identity
//!     ips: ["198.18.2.10"]
//! policies:                                 # AuthorizationPolicy / PeerAuthentication
//!   - apiVersion: security.istio.io/v1      # objects, as `kubectl get -o yaml` prints them
//!     kind: AuthorizationPolicy
//!     metadata: {name: deny-all, namespace: default}
//!     spec: {action: DENY, rules: [{}]}
//! namespaces:                               # optional: namespaces' labels
//!   - name: default                         # (istio.io/use-waypoint)
//!     labels: {istio.io/use-waypoint: waypoint}
//! services:
//!   - name: web
//!     vips: ["198.18.200.1"]
//!     ports: [{name: tcp, port: 80, targetPort: 8080}]
//!     endpoints: [web]                      # pods of this file
//!     labels: {istio.io/use-waypoint: none} # optional (waypoint enrollment; on a
//!                                           # waypoint's Service: istio.io/waypoint-for)
//! resources:                                # any object the agent reads, verbatim:
//!   - apiVersion: networking.istio.io/v1    # AuthorizationPolicy, PeerAuthentication,
//!     kind: DestinationRule                 # DestinationRule, VirtualService, TCPRoute
//!     metadata: {name: web, namespace: default}
//!     spec:
//!       host: web
//!       subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
//!   - apiVersion: networking.istio.io/v1
//!     kind: VirtualService
//!     metadata: {name: web, namespace: default}
//!     spec:
//!       hosts: [web]
//!       tcp: [{route: [{destination: {host: web, subset: v1}, weight: 90},
//!                      {destination: {host: web, subset: v2}, weight: 10}]}]
//! ```
//!
//! Policy objects (under `policies:` or `resources:`) are checked as the API
//! server would check them (name, `apiVersion`, `kind`, one of
//! `selector`/`targetRefs`, the dry-run annotation): one it would refuse
//! rejects the file, so that no policy is silently dropped. `resources:`
//! objects are recognised by `apiVersion` and `kind` (another kind or
//! version rejects the file at `resources[i].kind` / `.apiVersion`);
//! traffic-management objects get the CRD schema's checks and defaults and
//! the routing engine's validation hook ([`super::resources`]), and are
//! published as the API server would serve them (storage version, namespace
//! `default` when none is given), sorted by namespace and name; two objects
//! of one kind with the same namespace and name reject the file.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::resources::{self, ResourceKind};
use crate::policy::Kind;
use crate::state::{
    Endpoint, NodeInfo, Policies, PolicyDocument, RoutingObjects, Service, ServiceKey, ServicePort,
    Snapshot, Store, Workload, WorkloadKey,
};

/// Why a workload file was rejected. The message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("cannot read workload file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for the model (with line and column).
    #[error("workload file {path} does not parse: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde_yaml's message: field path, line and column.
        message: String,
    },
    /// The file parses but a field is wrong.
    #[error("workload file {path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending field, for example `pods[2].ips[0]`.
        field: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileModel {
    node: NodeModel,
    #[serde(default)]
    pods: Vec<PodModel>,
    /// Istio `AuthorizationPolicy` / `PeerAuthentication` objects, as
    /// `kubectl get -o yaml` prints them.
    #[serde(default)]
    policies: Vec<serde_yaml::Value>,
    /// Services: virtual IPs load-balanced over pods of this file.
    #[serde(default)]
    services: Vec<ServiceModel>,
    /// Namespaces' labels (`istio.io/use-waypoint`).
    #[serde(default)]
    namespaces: Vec<NamespaceModel>,
    /// Any object the agent reads ([`resources::ResourceKind`]), as
    /// `kubectl get -o yaml` prints it.
    #[serde(default)]
    resources: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceModel {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePortModel>,
    /// Names of the pods (in the service's namespace) behind it, all ready.
    #[serde(default)]
    endpoints: Vec<String>,
    /// The service's labels (`istio.io/use-waypoint`).
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceModel {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServicePortModel {
    #[serde(default)]
    name: String,
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NodeModel {
    name: String,
    #[serde(default)]
    probe_sources: Vec<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodModel {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    uid: Option<String>,
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default = "default_true")]
    enrolled: bool,
    #[serde(default)]
    exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    exclude_inbound_ports: Vec<u16>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_service_account() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}

/// The parsed and validated content of a workload file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadFile {
    /// The node.
    pub node: NodeInfo,
    /// The pods, by key.
    pub workloads: BTreeMap<WorkloadKey, Workload>,
    /// The security policies. An object the API server would refuse (no
    /// or a bad `metadata.name`, an unsupported `apiVersion`, `selector`
    /// with `targetRefs`, a bad `istio.io/dry-run`) rejects the file; a
    /// malformed spec is left to the policy engine, which reports it and
    /// fails closed without rejecting the others.
    pub policies: Policies,
    /// Where each policy of the file (`policies[i]` or `resources[i]`) went
    /// in `policies`, with that field, in file order (to name a policy
    /// error by its field in the file).
    pub policy_documents: Vec<(PolicyDocument, String)>,
    /// The services, by key.
    pub services: BTreeMap<ServiceKey, Service>,
    /// The traffic-management objects of `resources:`, as the API server
    /// would serve them (storage version, schema defaults, namespace set),
    /// sorted by namespace and name.
    pub routing: RoutingObjects,
    /// The Gateways of `resources:` (who may bind to a waypoint).
    pub waypoint_gateways: BTreeMap<crate::state::WaypointRef, crate::state::WaypointGateway>,
    /// The namespaces' labels (`namespaces:`).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl WorkloadFile {
    /// `policies[i]` or `resources[i]`, the file's field of a document of
    /// [`WorkloadFile::policies`].
    pub fn policy_field(&self, document: PolicyDocument) -> Option<String> {
        self.policy_documents
            .iter()
            .find(|(d, _)| *d == document)
            .map(|(_, field)| field.clone())
    }
}

/// Parses and validates `text`, the content of the file at `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<WorkloadFile, FileError> {
    let model: FileModel = serde_yaml::from_str(text).map_err(|e| FileError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let invalid = |field: String, reason: String| FileError::Invalid {
        path: path.to_owned(),
        field,
        reason,
    };
    if !is_dns_label_ish(&model.node.name) {
        return Err(invalid(
            "node.name".into(),
            format!("{:?} is not a valid node name", model.node.name),
        ));
    }
    let mut workloads = BTreeMap::new();
    let mut owner_of_ip: HashMap<IpAddr, String> = HashMap::new();
    let mut owner_of_netns: HashMap<PathBuf, String> = HashMap::new();
    for (i, pod) in model.pods.into_iter().enumerate() {
        let at = |field: &str| format!("pods[{i}].{field}");
        if !is_dns_label_ish(&pod.name) {
            return Err(invalid(
                at("name"),
                format!("{:?} is not a valid pod name", pod.name),
            ));
        }
        if !is_dns_label_ish(&pod.namespace) {
            return Err(invalid(
                at("namespace"),
                format!("{:?} is not a valid namespace", pod.namespace),
            ));
        }
        if !is_dns_label_ish(&pod.service_account) {
            return Err(invalid(
                at("serviceAccount"),
                format!(
                    "{:?} is not a valid service account name",
                    pod.service_account
                ),
            ));
        }
        if pod.ips.is_empty() {
            return Err(invalid(
                at("ips"),
                "a pod needs at least one address".into(),
            ));
        }
        let key = WorkloadKey {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        for (j, ip) in pod.ips.iter().enumerate() {
            let ip = ip.to_canonical();
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(invalid(
                    at(&format!("ips[{j}]")),
                    format!("{ip} cannot be a pod address"),
                ));
            }
            if let Some(other) = owner_of_ip.insert(ip, key.to_string()) {
                return Err(invalid(
                    at(&format!("ips[{j}]")),
                    format!("{ip} is also the address of pod {other}"),
                ));
            }
        }
        let remote = pod.node.as_deref().is_some_and(|n| n != model.node.name);
        let netns = match (&pod.netns, remote) {
            (Some(_), true) => {
                return Err(invalid(
                    at("netns"),
                    "a pod on another node has no network namespace here: drop `netns` or `node`"
                        .into(),
                ));
            }
            (None, true) => PathBuf::new(),
            (None, false) => {
                return Err(invalid(
                    at("netns"),
                    "a pod on this node needs its network namespace path".into(),
                ));
            }
            (Some(netns), false) => {
                if !netns.is_absolute() {
                    return Err(invalid(
                        at("netns"),
                        format!("{} is not an absolute path", netns.display()),
                    ));
                }
                if pod.enrolled
                    && let Some(other) = owner_of_netns.insert(netns.clone(), key.to_string())
                {
                    return Err(invalid(
                        at("netns"),
                        format!(
                            "{} is also the network namespace of pod {other}",
                            netns.display()
                        ),
                    ));
                }
                netns.clone()
            }
        };
        for (field, ports) in [
            ("excludeOutboundPorts", &pod.exclude_outbound_ports),
            ("excludeInboundPorts", &pod.exclude_inbound_ports),
        ] {
            if let Some(j) = ports.iter().position(|p| *p == 0) {
                return Err(invalid(
                    at(&format!("{field}[{j}]")),
                    "port 0 is not a port".into(),
                ));
            }
        }
        if workloads.contains_key(&key) {
            return Err(invalid(at("name"), format!("pod {key} is listed twice")));
        }
        let mut ips: Vec<IpAddr> = pod.ips.iter().map(|ip| ip.to_canonical()).collect();
        ips.dedup();
        let mut out = pod.exclude_outbound_ports;
        out.sort_unstable();
        out.dedup();
        let mut inb = pod.exclude_inbound_ports;
        inb.sort_unstable();
        inb.dedup();
        workloads.insert(
            key,
            Workload {
                name: pod.name,
                namespace: pod.namespace,
                service_account: pod.service_account,
                uid: pod.uid,
                ips,
                netns,
                cgroup: pod.cgroup,
                enrolled: pod.enrolled,
                exclude_outbound_ports: out,
                exclude_inbound_ports: inb,
                labels: pod.labels,
                node: pod.node.filter(|_| remote),
                // Set below, with the namespaces' labels.
                waypoint: None,
            },
        );
    }
    let probe_sources = model
        .node
        .probe_sources
        .iter()
        .map(|ip| ip.to_canonical())
        .collect();
    let mut policies = Policies::default();
    let mut policy_documents = Vec::new();
    for (i, doc) in model.policies.into_iter().enumerate() {
        add_policy(
            &format!("policies[{i}]"),
            doc,
            &mut policies,
            &mut policy_documents,
        )
        .map_err(|(field, reason)| invalid(field, reason))?;
    }
    let mut routing = Routing::default();
    for (i, doc) in model.resources.into_iter().enumerate() {
        let at = format!("resources[{i}]");
        let kind = resources::recognise(&doc).map_err(|p| {
            // The label names the object by its kind: not when that is what is wrong.
            let label = if p.field == "kind" {
                String::new()
            } else {
                policy_label(&doc)
            };
            invalid(field_at(&at, &p.field), format!("{label}{}", p.message))
        })?;
        if !kind.is_routing() {
            add_policy(&at, doc, &mut policies, &mut policy_documents)
                .map_err(|(field, reason)| invalid(field, reason))?;
            continue;
        }
        let label = policy_label(&doc);
        let value = serde_json::to_value(doc)
            .map_err(|e| invalid(at.clone(), format!("not representable as JSON: {e}")))?;
        let value = resources::admit_routing(kind, value)
            .map_err(|p| invalid(field_at(&at, &p.field), format!("{label}{}", p.message)))?;
        let key = (
            kind,
            value["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        if let Some(first) = routing.insert(key.clone(), (at.clone(), value)) {
            return Err(invalid(
                format!("{at}.metadata.name"),
                format!(
                    "{} {}/{} is also {}: one object per kind, namespace and name",
                    key.0, key.1, key.2, first.0
                ),
            ));
        }
    }
    let mut routing_objects = RoutingObjects::default();
    let mut gateways = Vec::new();
    // Sorted by kind, namespace and name, as the Kubernetes source keeps them.
    for ((kind, _, _), (_, value)) in routing {
        match kind {
            ResourceKind::DestinationRule => routing_objects.destination_rules.push(value),
            ResourceKind::VirtualService => routing_objects.virtual_services.push(value),
            ResourceKind::TcpRoute => routing_objects.tcp_routes.push(value),
            ResourceKind::Gateway => gateways.push(value),
            ResourceKind::AuthorizationPolicy | ResourceKind::PeerAuthentication => {}
        }
    }
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = model
        .namespaces
        .into_iter()
        .map(|n| (n.name, n.labels))
        .collect();
    for w in workloads.values_mut() {
        w.waypoint =
            crate::state::pod_waypoint(&w.namespace, &w.labels, namespaces.get(&w.namespace));
    }
    let services = parse_services(model.services, &workloads, &owner_of_ip, &namespaces)
        .map_err(|(field, reason)| invalid(field, reason))?;
    Ok(WorkloadFile {
        services,
        node: NodeInfo {
            name: model.node.name,
            probe_sources,
        },
        workloads,
        policies,
        policy_documents,
        routing: routing_objects,
        waypoint_gateways: crate::state::waypoint_gateways(&gateways),
        namespace_labels: namespaces,
    })
}

/// The file's routing objects by kind, namespace and name, each with its
/// field in the file (`resources[i]`).
type Routing = BTreeMap<(ResourceKind, String, String), (String, serde_json::Value)>;

/// `at.field`, or `at` for the object's root.
fn field_at(at: &str, field: &str) -> String {
    if field == "(root)" {
        at.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

/// Checks the policy object `doc` (the file's field `at`) as the API
/// server would (`admission::check_object`) and adds it to `policies`,
/// remembering where it came from. Errors are `(field, reason)`.
fn add_policy(
    at: &str,
    doc: serde_yaml::Value,
    policies: &mut Policies,
    documents: &mut Vec<(PolicyDocument, String)>,
) -> Result<(), (String, String)> {
    // What the API server would refuse is refused here, file and all:
    // the engine cannot scope such an object and could only drop it (a
    // deny-all without a name would silently allow).
    if let Some(p) = crate::policy::admission::check_object(&doc)
        .into_iter()
        .next()
    {
        return Err((
            field_at(at, &p.field),
            format!("{}{}", policy_label(&doc), p.message),
        ));
    }
    let value = serde_json::to_value(doc)
        .map_err(|e| (at.to_owned(), format!("not representable as JSON: {e}")))?;
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("AuthorizationPolicy") => {
            documents.push((
                PolicyDocument {
                    kind: Kind::AuthorizationPolicy,
                    index: policies.authorization.len(),
                },
                at.to_owned(),
            ));
            policies.authorization.push(value);
        }
        Some("PeerAuthentication") => {
            documents.push((
                PolicyDocument {
                    kind: Kind::PeerAuthentication,
                    index: policies.peer_authentication.len(),
                },
                at.to_owned(),
            ));
            policies.peer_authentication.push(value);
        }
        other => {
            return Err((
                format!("{at}.kind"),
                format!("{other:?} is not AuthorizationPolicy or PeerAuthentication"),
            ));
        }
    }
    Ok(())
}

/// `"AuthorizationPolicy shop/deny-all: "`, as far as `doc` tells, to
/// name the policy in an error.
fn policy_label(doc: &serde_yaml::Value) -> String {
    let kind = doc.get("kind").and_then(serde_yaml::Value::as_str);
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or(crate::policy::parse::DEFAULT_NAMESPACE);
    match (kind, name) {
        (Some(k), Some(n)) => format!("{k} {namespace}/{n}: "),
        (Some(k), None) => format!("{k} in namespace {namespace}: "),
        _ => String::new(),
    }
}

/// Builds the services: every listed endpoint pod must exist in the
/// service's namespace; its addresses become the endpoints, with each port's
/// target port (the port itself when none is given).
fn parse_services(
    models: Vec<ServiceModel>,
    workloads: &BTreeMap<WorkloadKey, Workload>,
    owner_of_ip: &HashMap<IpAddr, String>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<BTreeMap<ServiceKey, Service>, (String, String)> {
    let mut services = BTreeMap::new();
    let mut vip_owner: HashMap<IpAddr, String> = HashMap::new();
    for (i, m) in models.into_iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        let key = ServiceKey {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
        };
        if !is_dns_label_ish(&m.name) || !is_dns_label_ish(&m.namespace) {
            return Err((at("name"), format!("{key} is not a valid service name")));
        }
        if m.vips.is_empty() {
            return Err((at("vips"), "a service needs at least one virtual IP".into()));
        }
        let vips: Vec<IpAddr> = m.vips.iter().map(|ip| ip.to_canonical()).collect();
        for (j, vip) in vips.iter().enumerate() {
            if let Some(pod) = owner_of_ip.get(vip) {
                return Err((
                    at(&format!("vips[{j}]")),
                    format!("{vip} is the address of pod {pod}"),
                ));
            }
            if let Some(other) = vip_owner.insert(*vip, key.to_string()) {
                return Err((
                    at(&format!("vips[{j}]")),
                    format!("{vip} is also the address of service {other}"),
                ));
            }
        }
        if m.ports.is_empty() {
            return Err((at("ports"), "a service needs at least one port".into()));
        }
        let mut ports = Vec::new();
        let mut targets = BTreeMap::new();
        for (j, p) in m.ports.iter().enumerate() {
            if p.port == 0 || p.target_port == Some(0) {
                return Err((at(&format!("ports[{j}]")), "port 0 is not a port".into()));
            }
            ports.push(ServicePort {
                name: p.name.clone(),
                port: p.port,
                protocol: "TCP".into(),
            });
            targets.insert(p.name.clone(), p.target_port.unwrap_or(p.port));
        }
        let mut endpoints = Vec::new();
        for (j, pod) in m.endpoints.iter().enumerate() {
            let wk = WorkloadKey {
                namespace: m.namespace.clone(),
                name: pod.clone(),
            };
            let Some(w) = workloads.get(&wk) else {
                return Err((
                    at(&format!("endpoints[{j}]")),
                    format!("no pod {wk} in this file"),
                ));
            };
            for ip in &w.ips {
                endpoints.push(Endpoint {
                    ip: *ip,
                    ports: targets.clone(),
                    workload: Some(wk.clone()),
                    node_name: w.node.clone(),
                });
            }
        }
        let waypoint =
            crate::state::service_waypoint(&key, &m.labels, namespaces.get(&m.namespace));
        let waypoint_traffic = crate::state::WaypointFor::from_labels(&m.labels, &key);
        services.insert(
            key,
            Service {
                name: m.name,
                namespace: m.namespace,
                vips,
                ports,
                endpoints,
                waypoint,
                waypoint_traffic,
            },
        );
    }
    Ok(services)
}

/// A Kubernetes-style name: 1..=253 characters of `[a-z0-9.-]`, starting and
/// ending alphanumeric.
fn is_dns_label_ish(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Reads and parses the file at `path`.
pub fn load(path: &Path) -> Result<WorkloadFile, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Publishes `file` into `store`, returning the generation.
pub fn publish(store: &Store, file: WorkloadFile) -> u64 {
    store.publish_snapshot(Snapshot {
        node: file.node,
        workloads: file.workloads,
        policies: file.policies,
        services: file.services,
        routing: file.routing,
        waypoint_gateways: file.waypoint_gateways,
        namespace_labels: file.namespace_labels,
        ..Snapshot::default()
    })
}

/// Re-reads `path` every `interval` and publishes every new valid content.
/// An invalid file is logged once per distinct content and otherwise ignored:
/// the last good state stays in force.
pub async fn watch(path: PathBuf, store: Store, interval: Duration, cancel: CancellationToken) {
    let mut last_seen: Option<Vec<u8>> = std::fs::read(&path).ok();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if last_seen.is_some() {
                    tracing::error!(file = %path.display(), error = %e, "workload file unreadable; keeping the last good state");
                    last_seen = None;
                }
                continue;
            }
        };
        if last_seen.as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        last_seen = Some(bytes.clone());
        let text = String::from_utf8_lossy(&bytes);
        match parse(&path, &text) {
            Ok(file) => {
                let generation = publish(&store, file);
                tracing::info!(file = %path.display(), generation, "workload file reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "workload file rejected; keeping the last good state");
                store.record_rejection(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node:
  name: node-1
  probeSources: ["198.18.1.1"]
pods:
  - name: a
    ips: ["198.18.1.10", "fd18:1::10"]
    netns: /var/run/netns/a
    excludeOutboundPorts: [53, 53]
  - name: b
    namespace: shop
    serviceAccount: cart
    ips: ["198.18.1.11"]
    netns: /var/run/netns/b
    enrolled: false
"#;

    fn err(text: &str) -> String {
        match parse(Path::new("w.yaml"), text) {
            Ok(f) => panic!("expected an error, parsed {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_the_documented_shape() {
        let f = parse(Path::new("w.yaml"), GOOD).expect("good file");
        assert_eq!(f.node.name, "node-1");
        assert_eq!(f.workloads.len(), 2);
        let a = &f.workloads[&WorkloadKey {
            namespace: "default".into(),
            name: "a".into(),
        }];
        assert!(a.enrolled);
        assert_eq!(a.service_account, "default");
        assert_eq!(a.exclude_outbound_ports, vec![53]);
        let b = &f.workloads[&WorkloadKey {
            namespace: "shop".into(),
            name: "b".into(),
        }];
        assert!(!b.enrolled);
        assert_eq!(b.service_account, "cart");
    }

    #[test]
    fn service_and_namespace_labels_choose_the_waypoint() {
        use crate::state::WaypointSource;
        let text = format!(
            "{GOOD}namespaces:\n  - name: default\n    labels: {{istio.io/use-waypoint: wp}}\n\
             services:\n  - name: web\n    vips: [\"198.18.200.1\"]\n    ports: [{{port: 80}}]\n    endpoints: [a]\n\
             \x20 - name: out\n    vips: [\"198.18.200.2\"]\n    ports: [{{port: 80}}]\n    labels: {{istio.io/use-waypoint: none}}\n\
             \x20 - name: cart\n    namespace: shop\n    vips: [\"198.18.200.3\"]\n    ports: [{{port: 80}}]\n\
             \x20   labels: {{istio.io/use-waypoint: edge, istio.io/use-waypoint-namespace: infra}}\n"
        );
        let f = parse(Path::new("w.yaml"), &text).expect("valid file");
        let waypoint = |ns: &str, name: &str| {
            f.services[&ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            }]
                .waypoint
                .as_ref()
                .map(|w| (w.reference.to_string(), w.from))
        };
        assert_eq!(
            waypoint("default", "web"),
            Some(("default/wp".into(), WaypointSource::Namespace))
        );
        assert_eq!(waypoint("default", "out"), None);
        assert_eq!(
            waypoint("shop", "cart"),
            Some(("infra/edge".into(), WaypointSource::Service))
        );
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e =
            err("node:\n  name: n\npods:\n  - name: a\n    ips: [\"300.1.1.1\"]\n    netns: /x\n");
        assert!(e.contains("pods[0].ips[0]") && e.contains("line 5"), "{e}");
        let e = err(
            "node:\n  name: n\npods:\n  - name: a\n    ips: [\"1.2.3.4\"]\n    netns: /x\n    colour: red\n",
        );
        assert!(
            e.contains("unknown field `colour`") && e.contains("line 7"),
            "{e}"
        );
        let e = err(
            "node:\n  name: n\npods:\n  - name: a\n    ips: [\"1.2.3.4\"]\n    netns: /x\n    excludeInboundPorts: [70000]\n",
        );
        assert!(e.contains("pods[0].excludeInboundPorts[0]"), "{e}");
    }

    #[test]
    fn semantic_errors() {
        let base = |pods: &str| format!("node:\n  name: n\npods:\n{pods}");
        let cases = [
            (
                "  - name: A\n    ips: [1.2.3.4]\n    netns: /x\n",
                "pods[0].name",
            ),
            ("  - name: a\n    ips: []\n    netns: /x\n", "pods[0].ips"),
            (
                "  - name: a\n    ips: [127.0.0.1]\n    netns: /x\n",
                "pods[0].ips[0]",
            ),
            (
                "  - name: a\n    ips: [1.2.3.4]\n    netns: x\n",
                "pods[0].netns",
            ),
            (
                "  - name: a\n    ips: [1.2.3.4]\n    netns: /x\n    excludeOutboundPorts: [0]\n",
                "pods[0].excludeOutboundPorts[0]",
            ),
            (
                "  - name: a\n    ips: [1.2.3.4]\n    netns: /x\n  - name: b\n    ips: [1.2.3.4]\n    netns: /y\n",
                "also the address of pod default/a",
            ),
            (
                "  - name: a\n    ips: [1.2.3.4]\n    netns: /x\n  - name: b\n    ips: [1.2.3.5]\n    netns: /x\n",
                "also the network namespace",
            ),
            (
                "  - name: a\n    ips: [1.2.3.4]\n    netns: /x\n  - name: a\n    ips: [1.2.3.5]\n    netns: /y\n",
                "listed twice",
            ),
        ];
        for (pods, want) in cases {
            let e = err(&base(pods));
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
        assert!(err("{{{").contains("does not parse"));
        assert!(err("pods: []\n").contains("missing field `node`"));
    }

    /// A policy object the API server would refuse rejects the file (the
    /// last good state stays in force) with the policy's field path; the
    /// engine alone could only drop it, and a dropped deny-all allows.
    #[test]
    fn policy_objects_are_checked_like_the_api_server() {
        let file = |policy: &str| format!("node:\n  name: n\npolicies:\n{policy}");
        let ok = file(
            "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: deny-all, namespace: shop, annotations: {istio.io/dry-run: '1'}}\n    spec: {action: DENY, selector: {matchLabels: {app: a}}, rules: [{}]}\n  - apiVersion: security.istio.io/v1beta1\n    kind: PeerAuthentication\n    metadata: {name: default}\n    spec: {mtls: {mode: STRICT}}\n",
        );
        let f = parse(Path::new("w.yaml"), &ok).expect("valid policies");
        assert_eq!(f.policies.authorization.len(), 1);
        assert_eq!(f.policies.peer_authentication.len(), 1);
        let cases = [
            (
                "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {namespace: shop}\n    spec: {action: DENY, rules: [{}]}\n",
                "w.yaml: policies[0].metadata.name: AuthorizationPolicy in namespace shop: missing",
            ),
            (
                "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: Deny_All, namespace: shop}\n    spec: {action: DENY, rules: [{}]}\n",
                "policies[0].metadata.name: AuthorizationPolicy shop/Deny_All: \"Deny_All\" is not a valid name",
            ),
            (
                "  - apiVersion: security.istio.io/v1alpha1\n    kind: AuthorizationPolicy\n    metadata: {name: deny-all}\n    spec: {action: DENY, rules: [{}]}\n",
                "policies[0].apiVersion: AuthorizationPolicy default/deny-all: unsupported apiVersion",
            ),
            (
                "  - kind: AuthorizationPolicy\n    metadata: {name: deny-all}\n    spec: {action: DENY, rules: [{}]}\n",
                "policies[0].apiVersion: AuthorizationPolicy default/deny-all: missing",
            ),
            (
                "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: deny-all}\n    spec: {action: DENY, selector: {matchLabels: {app: a}}, targetRefs: [{kind: Service, name: a}], rules: [{}]}\n",
                "policies[0].spec: AuthorizationPolicy default/deny-all: only one of selector, targetRef or targetRefs",
            ),
            (
                "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: deny-all, annotations: {istio.io/dry-run: tRuE}}\n    spec: {action: DENY, rules: [{}]}\n",
                "policies[0].metadata.annotations[istio.io/dry-run]: AuthorizationPolicy default/deny-all: invalid value \"tRuE\"",
            ),
            (
                "  - apiVersion: security.istio.io/v1\n    kind: Sidecar\n    metadata: {name: s}\n",
                "policies[0].kind",
            ),
            (
                "  - [a, b]\n",
                "policies[0]: expected an AuthorizationPolicy",
            ),
        ];
        for (policy, want) in cases {
            let e = err(&file(policy));
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }

    fn with_resources(resources: &str) -> String {
        format!("node:\n  name: n\nresources:\n{resources}")
    }

    /// A Gateway of `resources:` says who may bind to its waypoint.
    #[test]
    fn resources_read_a_waypoints_gateway() {
        let text = with_resources(
            "  - apiVersion: gateway.networking.k8s.io/v1\n    kind: Gateway\n    metadata: {name: wp, namespace: victim}\n    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]}\n\
             \x20 - apiVersion: gateway.networking.k8s.io/v1\n    kind: Gateway\n    metadata: {name: own}\n    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
        );
        let f = parse(Path::new("w.yaml"), &text).expect("valid resources");
        let gw = |ns: &str, name: &str| {
            f.waypoint_gateways
                .get(&crate::state::WaypointRef {
                    namespace: ns.into(),
                    name: name.into(),
                })
                .map(|g| g.allowed.clone())
        };
        assert_eq!(
            gw("victim", "wp"),
            Some(crate::state::AllowedNamespaces::All)
        );
        assert_eq!(
            gw("default", "own"),
            Some(crate::state::AllowedNamespaces::Same)
        );
    }

    /// `resources:` takes every kind the agent reads, verbatim; policies
    /// join the `policies:` ones; routing objects are stored as served,
    /// sorted by namespace and name.
    #[test]
    fn resources_take_every_kind_the_agent_reads() {
        let text = format!(
            "{}policies:\n  - apiVersion: security.istio.io/v1\n    kind: PeerAuthentication\n    metadata: {{name: default, namespace: shop}}\n    spec: {{mtls: {{mode: STRICT}}}}\n",
            with_resources(
                "  - apiVersion: networking.istio.io/v1\n    kind: VirtualService\n    metadata: {name: web, namespace: shop, resourceVersion: '7', uid: 1a2b}\n    spec: {hosts: [web], tcp: [{route: [{destination: {host: web, subset: v1}, weight: 90}, {destination: {host: web, subset: v2}, weight: 10}]}]}\n    status: {}\n\
                 \x20 - apiVersion: networking.istio.io/v1alpha3\n    kind: DestinationRule\n    metadata: {name: web, namespace: shop}\n    spec: {host: web, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n\
                 \x20 - apiVersion: networking.istio.io/v1\n    kind: DestinationRule\n    metadata: {name: api}\n    spec: {host: api.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}\n\
                 \x20 - apiVersion: gateway.networking.k8s.io/v1alpha2\n    kind: TCPRoute\n    metadata: {name: web, namespace: shop}\n    spec: {parentRefs: [{group: '', kind: Service, name: web}], rules: [{backendRefs: [{name: web-v1, port: 80, weight: 9}, {name: web-v2, port: 80}]}]}\n\
                 \x20 - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: deny-all, namespace: shop}\n    spec: {action: DENY, rules: [{}]}\n"
            )
        );
        let f = parse(Path::new("w.yaml"), &text).expect("valid resources");
        let names = |objects: &[serde_json::Value]| -> Vec<String> {
            objects
                .iter()
                .map(|o| {
                    format!(
                        "{}/{}",
                        o["metadata"]["namespace"].as_str().unwrap_or("?"),
                        o["metadata"]["name"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        };
        assert_eq!(
            names(&f.routing.destination_rules),
            ["default/api", "shop/web"]
        );
        assert_eq!(
            f.routing.destination_rules[1]["apiVersion"],
            "networking.istio.io/v1"
        );
        assert_eq!(names(&f.routing.virtual_services), ["shop/web"]);
        let vs = &f.routing.virtual_services[0];
        assert_eq!(vs["spec"]["tcp"][0]["route"][1]["weight"], 10);
        assert_eq!(vs["metadata"]["uid"], "1a2b", "verbatim, as printed");
        assert_eq!(names(&f.routing.tcp_routes), ["shop/web"]);
        assert_eq!(
            f.routing.tcp_routes[0]["spec"]["rules"][0]["backendRefs"][1]["weight"],
            1
        );
        // Policies from both keys, each named by its own field.
        assert_eq!(f.policies.authorization.len(), 1);
        assert_eq!(f.policies.peer_authentication.len(), 1);
        assert_eq!(
            f.policy_field(PolicyDocument {
                kind: Kind::AuthorizationPolicy,
                index: 0
            })
            .as_deref(),
            Some("resources[4]")
        );
        assert_eq!(
            f.policy_field(PolicyDocument {
                kind: Kind::PeerAuthentication,
                index: 0
            })
            .as_deref(),
            Some("policies[0]")
        );
        // Published with the rest.
        let store = Store::new();
        publish(&store, f.clone());
        assert_eq!(store.current().routing, f.routing);
        assert_eq!(store.current().policies, f.policies);
    }

    /// An object of another kind or version, or one the API server would
    /// refuse, rejects the file with its field path.
    #[test]
    fn resources_are_refused_with_their_field_path() {
        let dr = |meta: &str, spec: &str| {
            format!(
                "  - apiVersion: networking.istio.io/v1\n    kind: DestinationRule\n    metadata: {meta}\n    spec: {spec}\n"
            )
        };
        let cases = [
            (
                "  - apiVersion: networking.istio.io/v1\n    kind: Sidecar\n    metadata: {name: s}\n".to_owned(),
                "w.yaml: resources[0].kind: \"Sidecar\" is not an object the agent reads",
            ),
            (
                "  - apiVersion: networking.istio.io/v1\n    metadata: {name: s}\n".to_owned(),
                "resources[0].kind: missing",
            ),
            (
                "  - apiVersion: networking.istio.io/v2\n    kind: VirtualService\n    metadata: {name: s}\n    spec: {}\n".to_owned(),
                "resources[0].apiVersion: VirtualService default/s: unsupported apiVersion \"networking.istio.io/v2\"",
            ),
            (
                "  - apiVersion: security.istio.io/v1alpha1\n    kind: AuthorizationPolicy\n    metadata: {name: p}\n    spec: {}\n".to_owned(),
                "resources[0].apiVersion",
            ),
            (
                "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {namespace: shop}\n    spec: {action: DENY}\n".to_owned(),
                "resources[0].metadata.name: AuthorizationPolicy in namespace shop: missing",
            ),
            (dr("{namespace: shop}", "{host: web}"), "resources[0].metadata.name: DestinationRule in namespace shop: missing"),
            (dr("{name: web}", "{subsets: []}"), "resources[0].spec.host: DestinationRule default/web: missing"),
            (dr("{name: web}", "[host]"), "resources[0].spec: DestinationRule default/web: missing or not an object"),
            (
                format!("{}{}", dr("{name: web, namespace: shop}", "{host: web}"), dr("{name: web, namespace: shop}", "{host: web2}")),
                "resources[1].metadata.name: DestinationRule shop/web is also resources[0]",
            ),
            (
                "  - apiVersion: gateway.networking.k8s.io/v1alpha2\n    kind: TCPRoute\n    metadata: {name: r}\n    spec: {rules: [{backendRefs: [{name: b}]}]}\n".to_owned(),
                "resources[0].spec.rules[0].backendRefs[0].port: TCPRoute default/r: missing",
            ),
            ("  - just a string\n".to_owned(), "resources[0]: expected a Kubernetes object"),
            // The routing engine's own checks (mesh-routing), after the schema's.
            (
                dr("{name: web}", "{host: web, trafficPolicy: {outlierDetection: {interval: often}}}"),
                "resources[0].spec.trafficPolicy.outlierDetection.interval",
            ),
        ];
        for (resources, want) in cases {
            let e = err(&with_resources(&resources));
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
        // Same name, different kinds or namespaces: distinct objects.
        let ok = format!(
            "{}{}  - apiVersion: networking.istio.io/v1\n    kind: VirtualService\n    metadata: {{name: web}}\n    spec: {{hosts: [web]}}\n",
            dr("{name: web}", "{host: web}"),
            dr("{name: web, namespace: shop}", "{host: web}")
        );
        parse(Path::new("w.yaml"), &with_resources(&ok)).expect("distinct objects");
    }

    /// The running file source: routing objects arrive in the store, a
    /// change arrives, and an invalid file is refused (counted, with its
    /// field path) while the last good state stays in force.
    #[tokio::test]
    async fn the_watched_file_publishes_routing_objects_and_keeps_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("mesh-file-resources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("workloads.yaml");
        let vs = |w1: u32, w2: u32| {
            with_resources(&format!(
                "  - apiVersion: networking.istio.io/v1\n    kind: VirtualService\n    metadata: {{name: web, namespace: shop}}\n    spec: {{hosts: [web], tcp: [{{route: [{{destination: {{host: web, subset: v1}}, weight: {w1}}}, {{destination: {{host: web, subset: v2}}, weight: {w2}}}]}}]}}\n"
            ))
        };
        let weight = |s: &Snapshot, i: usize| {
            s.routing
                .virtual_services
                .first()
                .map(|v| v["spec"]["tcp"][0]["route"][i]["weight"].clone())
        };
        std::fs::write(&path, vs(90, 10)).expect("write");
        let store = Store::new();
        publish(&store, load(&path).expect("valid file"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch(
            path.clone(),
            store.clone(),
            Duration::from_millis(20),
            cancel.clone(),
        ));
        // Let the task read the content it starts from (the one published
        // above) before the file changes: this test's runtime has one
        // thread, so the task runs to its first wait here.
        tokio::task::yield_now().await;
        let mut rx = store.subscribe();
        assert_eq!(weight(&store.current(), 1), Some(10.into()));
        std::fs::write(&path, vs(0, 100)).expect("write");
        let changed = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|s| weight(s, 1) == Some(100.into())),
        )
        .await
        .expect("the change within the bound")
        .expect("store alive")
        .clone();
        assert_eq!(weight(&changed, 0), Some(0.into()));
        // An invalid object: refused with its field path, nothing published.
        let generation = store.current().generation;
        std::fs::write(
            &path,
            with_resources("  - apiVersion: networking.istio.io/v1\n    kind: DestinationRule\n    metadata: {name: web}\n    spec: {}\n"),
        )
        .expect("write");
        tokio::time::timeout(Duration::from_secs(30), async {
            while store.rejections().count == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the rejection within the bound");
        let r = store.rejections();
        assert!(
            r.last_error
                .as_deref()
                .is_some_and(|e| e.contains("resources[0].spec.host")),
            "{r:?}"
        );
        let now = store.current();
        assert_eq!(now.generation, generation, "the last good state stays");
        assert_eq!(weight(&now, 1), Some(100.into()));
        cancel.cancel();
        task.await.expect("watch task");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
