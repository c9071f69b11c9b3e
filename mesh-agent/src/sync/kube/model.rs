//! What the agent keeps of each Kubernetes object, and the pure rules that
//! turn those facts into the store's model: enrollment, local pods, services.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};

use crate::state::{Endpoint, Service, ServiceKey, ServicePort, WorkloadKey};

/// The Istio ambient label read on pods and namespaces.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrolls.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that opts a pod out.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// The EndpointSlice label naming its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `(namespace, name)`; `namespace` is empty for cluster-scoped objects.
pub type ObjKey = (String, String);

/// The key of an object from its metadata, if it has a name.
pub fn obj_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjKey> {
    Some((
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone()?,
    ))
}

/// What the agent keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `metadata.uid` (finds the pod's processes on the node).
    pub uid: String,
    /// `spec.nodeName` (empty while unscheduled).
    pub node_name: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `status.podIPs` (or `status.podIP`), canonical.
    pub ips: Vec<IpAddr>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.hostNetwork`: such a pod shares the node's netns and is never enrolled.
    pub host_network: bool,
    /// Phase `Succeeded` or `Failed`: no process, nothing to enroll.
    pub terminal: bool,
    /// Destination ports whose outbound connections bypass the mesh
    /// (annotation `traffic.sidecar.istio.io/excludeOutboundPorts`).
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports whose inbound connections bypass the mesh
    /// (annotation `traffic.sidecar.istio.io/excludeInboundPorts`).
    pub exclude_inbound_ports: Vec<u16>,
}

/// Istio's annotation listing outbound ports to leave alone.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Istio's annotation listing inbound ports to leave alone.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// The ports of a comma-separated annotation value (`"53, 9100"`); entries
/// that are not ports are logged and skipped (an exclusion that cannot be
/// read is not applied: the port stays in the mesh).
pub fn annotation_ports(pod: &str, name: &str, value: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter_map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Some(port),
            _ => {
                tracing::warn!(
                    pod,
                    annotation = name,
                    entry = p,
                    "not a port; ignored (the port stays in the mesh)"
                );
                None
            }
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

impl PodFacts {
    /// The facts of `pod`; `None` without a name, namespace or UID.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .filter_map(|p| p.ip.parse::<IpAddr>().ok())
                    .map(|ip| ip.to_canonical())
                    .collect()
            })
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok())
        {
            ips.push(ip.to_canonical());
        }
        ips.dedup();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
        let annotation = |name: &str| {
            let value = meta.annotations.as_ref().and_then(|a| a.get(name));
            let pod = meta.name.as_deref().unwrap_or_default();
            value
                .map(|v| annotation_ports(pod, name, v))
                .unwrap_or_default()
        };
        Some(Self {
            name: meta.name.clone()?,
            namespace: meta.namespace.clone()?,
            uid: meta.uid.clone()?,
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            ips,
            labels: meta.labels.clone().unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminal: matches!(phase, "Succeeded" | "Failed"),
            exclude_outbound_ports: annotation(EXCLUDE_OUTBOUND_PORTS),
            exclude_inbound_ports: annotation(EXCLUDE_INBOUND_PORTS),
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[cfg(test)]
mod annotation_tests {
    use super::annotation_ports;

    #[test]
    fn exclusion_annotations_parse_leniently() {
        assert_eq!(annotation_ports("p", "a", "53, 9100,53"), vec![53, 9100]);
        assert_eq!(annotation_ports("p", "a", "x, 0, 70000, 15"), vec![15]);
        assert!(annotation_ports("p", "a", "").is_empty());
    }
}

/// The labels of a namespace, all the agent keeps of it.
pub fn namespace_labels(ns: &Namespace) -> BTreeMap<String, String> {
    ns.metadata.labels.clone().unwrap_or_default()
}

/// The node's addresses (`status.addresses` of type InternalIP/ExternalIP).
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// Whether a pod should be enrolled, and the reason shown in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// Enrolled or not.
    pub enrolled: bool,
    /// Why, for the log line.
    pub reason: &'static str,
}

/// Istio ambient's rules: `none` on the pod opts out; `ambient` on the pod
/// or on its namespace enrolls; system namespaces never enroll.
pub fn enrollment(
    pod_labels: &BTreeMap<String, String>,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    excluded_namespaces: &BTreeSet<String>,
) -> Enrollment {
    let pod_mode = pod_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    let ns_mode = namespace_labels
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    let (enrolled, reason) = if pod_mode == Some(DATAPLANE_MODE_NONE) {
        (false, "pod label istio.io/dataplane-mode=none (opted out)")
    } else if excluded_namespaces.contains(namespace) {
        (false, "system namespace, never enrolled")
    } else if pod_mode == Some(DATAPLANE_MODE_AMBIENT) {
        (true, "pod label istio.io/dataplane-mode=ambient")
    } else if ns_mode == Some(DATAPLANE_MODE_AMBIENT) {
        (true, "namespace label istio.io/dataplane-mode=ambient")
    } else {
        (
            false,
            "no istio.io/dataplane-mode=ambient label on the pod or its namespace",
        )
    };
    Enrollment { enrolled, reason }
}

/// What the agent keeps of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFacts {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Cluster IPs (none for a headless service).
    pub vips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Labels (`istio.io/use-waypoint`).
    pub labels: BTreeMap<String, String>,
}

impl ServiceFacts {
    /// The facts of `svc`; `None` for an ExternalName service or one without a name.
    pub fn from_service(svc: &K8sService) -> Option<Self> {
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return None;
        }
        let mut raw: Vec<&str> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        if raw.is_empty()
            && let Some(ip) = spec.and_then(|s| s.cluster_ip.as_deref())
        {
            raw.push(ip);
        }
        let mut vips: Vec<IpAddr> = raw
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        vips.dedup();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some(ServicePort {
                            name: p.name.clone().unwrap_or_default(),
                            port: u16::try_from(p.port).ok()?,
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            name: svc.metadata.name.clone()?,
            namespace: svc.metadata.namespace.clone()?,
            vips,
            ports,
            labels: svc.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// What the agent keeps of an EndpointSlice: its service and ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceFacts {
    /// Namespace.
    pub namespace: String,
    /// The service (label `kubernetes.io/service-name`).
    pub service: String,
    /// Port number by port name.
    pub ports: BTreeMap<String, u16>,
    /// Ready endpoints: address, pod, node.
    pub endpoints: Vec<(IpAddr, Option<WorkloadKey>, Option<String>)>,
}

impl SliceFacts {
    /// The facts of `slice`; `None` for an FQDN slice or one without a service label.
    pub fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            return None;
        }
        let namespace = slice.metadata.namespace.clone()?;
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()?;
        let ports = slice
            .ports
            .as_ref()
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p.name.clone().unwrap_or_default(),
                            u16::try_from(p.port?).ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let endpoints = slice
            .endpoints
            .iter()
            // A nil `ready` means ready (API contract).
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| {
                let pod = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        Some(WorkloadKey {
                            namespace: r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                            name: r.name.clone()?,
                        })
                    });
                e.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(move |ip| (ip.to_canonical(), pod.clone(), e.node_name.clone()))
            })
            .collect();
        Some(Self {
            namespace,
            service,
            ports,
            endpoints,
        })
    }
}

/// Joins services with their slices (VIP → ready endpoints) and decides
/// each one's waypoint from its labels and its namespace's
/// ([`crate::state::service_waypoint`]).
pub fn build_services(
    services: &BTreeMap<ObjKey, ServiceFacts>,
    slices: &BTreeMap<ObjKey, SliceFacts>,
    namespaces: &BTreeMap<ObjKey, BTreeMap<String, String>>,
) -> BTreeMap<ServiceKey, Service> {
    let mut by_service: BTreeMap<(&str, &str), Vec<&SliceFacts>> = BTreeMap::new();
    for slice in slices.values() {
        by_service
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    services
        .values()
        .map(|svc| {
            let mut endpoints: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
            for slice in by_service
                .get(&(svc.namespace.as_str(), svc.name.as_str()))
                .into_iter()
                .flatten()
            {
                for (ip, pod, node) in &slice.endpoints {
                    let e = endpoints.entry(*ip).or_insert_with(|| Endpoint {
                        ip: *ip,
                        ports: BTreeMap::new(),
                        workload: pod.clone(),
                        node_name: node.clone(),
                    });
                    e.ports
                        .extend(slice.ports.iter().map(|(k, v)| (k.clone(), *v)));
                }
            }
            let key = ServiceKey {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            };
            let waypoint = crate::state::service_waypoint(
                &key,
                &svc.labels,
                namespaces.get(&(String::new(), svc.namespace.clone())),
            );
            let waypoint_traffic = crate::state::WaypointFor::from_labels(&svc.labels, &key);
            (
                key,
                Service {
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    vips: svc.vips.clone(),
                    ports: svc.ports.clone(),
                    endpoints: endpoints.into_values().collect(),
                    waypoint,
                    waypoint_traffic,
                },
            )
        })
        .collect()
}

/// A policy object as kept: the served JSON without `metadata.managedFields`.
pub fn policy_value(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(meta) = value
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        meta.remove("managedFields");
    }
    value
}

/// A custom resource as kept ([`policy_value`]), with the `apiVersion` and
/// `kind` of the resource watched written in when the server left them out
/// (items of a list may carry none): the object as `kubectl get -o yaml`
/// prints it, the same whether it came from a list or a watch event.
pub fn raw_value(value: serde_json::Value, api_version: &str, kind: &str) -> serde_json::Value {
    let mut value = policy_value(value);
    if let Some(obj) = value.as_object_mut() {
        for (key, want) in [("apiVersion", api_version), ("kind", kind)] {
            if obj
                .get(key)
                .is_none_or(|v| v.as_str().is_none_or(str::is_empty))
            {
                obj.insert(key.into(), want.into());
            }
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_value_names_its_type_and_drops_managed_fields() {
        let v = raw_value(
            serde_json::json!({"metadata": {"name": "r", "managedFields": []}, "spec": {}}),
            "networking.istio.io/v1",
            "DestinationRule",
        );
        assert_eq!(
            v,
            serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                               "metadata": {"name": "r"}, "spec": {}})
        );
        let served =
            serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService"});
        assert_eq!(raw_value(served.clone(), "x/v1", "Other"), served);
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn enrollment_rules() {
        let excluded: BTreeSet<String> = ["kube-system".to_owned()].into();
        let ambient = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let none = labels(&[(DATAPLANE_MODE_LABEL, "none")]);
        let plain = labels(&[("app", "web")]);
        let e =
            |pod: &BTreeMap<String, String>, ns: &str, nsl: Option<&BTreeMap<String, String>>| {
                enrollment(pod, ns, nsl, &excluded).enrolled
            };
        assert!(e(&ambient, "shop", None), "pod label");
        assert!(e(&plain, "shop", Some(&ambient)), "namespace label");
        assert!(!e(&none, "shop", Some(&ambient)), "opt-out wins");
        assert!(!e(&plain, "shop", Some(&plain)), "no label");
        assert!(!e(&plain, "shop", None), "unknown namespace");
        assert!(!e(&ambient, "kube-system", Some(&ambient)), "system ns");
        let other = labels(&[(DATAPLANE_MODE_LABEL, "sidecar")]);
        assert!(!e(&other, "shop", None));
    }

    #[test]
    fn pod_facts_from_real_json() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                     "containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }))
        .expect("pod JSON");
        let f = PodFacts::from_pod(&pod).expect("facts");
        assert_eq!(f.ips.len(), 2);
        assert_eq!(f.service_account, "web");
        assert_eq!(f.node_name, "node-1");
        assert!(!f.terminal && !f.host_network);
        let bare: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.6"}
        }))
        .expect("pod JSON");
        let f = PodFacts::from_pod(&bare).expect("facts");
        assert_eq!(f.service_account, "default");
        assert!(f.terminal);
        assert_eq!(f.ips, vec!["10.0.0.6".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn services_join_ready_endpoints_across_slices() {
        let svc: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))
        .expect("service");
        let slice = |name: &str, addr: &str, ready: Option<bool>| -> EndpointSlice {
            let mut cond = serde_json::json!({});
            if let Some(r) = ready {
                cond = serde_json::json!({"ready": r});
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": if addr.contains(':') { "IPv6" } else { "IPv4" },
                "endpoints": [{"addresses": [addr], "conditions": cond,
                               "targetRef": {"kind": "Pod", "name": format!("pod-{name}"), "namespace": "shop"},
                               "nodeName": "node-1"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            }))
            .expect("slice")
        };
        let services: BTreeMap<ObjKey, ServiceFacts> = [(
            ("shop".into(), "web".into()),
            ServiceFacts::from_service(&svc).expect("facts"),
        )]
        .into();
        let slices: BTreeMap<ObjKey, SliceFacts> = [
            slice("a", "10.0.0.1", Some(true)),
            slice("b", "10.0.0.2", None),
            slice("c", "10.0.0.3", Some(false)),
            slice("d", "fd00::4", Some(true)),
        ]
        .iter()
        .map(|s| {
            (
                obj_key(&s.metadata).expect("key"),
                SliceFacts::from_slice(s).expect("facts"),
            )
        })
        .collect();
        let out = build_services(&services, &slices, &BTreeMap::new());
        let web = &out[&ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        }];
        assert_eq!(web.vips.len(), 2);
        let targets: Vec<String> = web.targets(80).iter().map(|t| t.to_string()).collect();
        assert_eq!(
            targets,
            ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::4]:8080"],
            "not-ready endpoint dropped"
        );
        assert!(web.targets(81).is_empty());
        assert_eq!(
            web.endpoints[0].workload.as_ref().map(|w| w.name.as_str()),
            Some("pod-a")
        );
    }

    #[test]
    fn external_name_services_and_fqdn_slices_are_skipped() {
        let svc: K8sService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}
        }))
        .expect("service");
        assert!(ServiceFacts::from_service(&svc).is_none());
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "ext"}},
            "addressType": "FQDN", "endpoints": []
        }))
        .expect("slice");
        assert!(SliceFacts::from_slice(&slice).is_none());
    }

    #[test]
    fn policy_value_drops_managed_fields() {
        let v = policy_value(serde_json::json!({
            "metadata": {"name": "p", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"action": "DENY"}
        }));
        assert!(v["metadata"].get("managedFields").is_none());
        assert_eq!(v["spec"]["action"], "DENY");
    }
}
