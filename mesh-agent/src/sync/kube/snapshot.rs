//! The snapshot builder: from the caches' live objects, where the enrolled
//! local pods were found and the configuration to the [`Snapshot`] the
//! source publishes, and the enrollment decisions. Pure: no I/O and no
//! logging; [`build`] returns what changed since the previous decisions and
//! the sync loop logs it.
//!
//! Building takes two steps because finding pods' processes is I/O:
//! [`to_locate`] names the pods to look for, the loop looks, then [`build`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    config::KubeConfig,
    model::{self, Enrollment, ObjKey, PodFacts, ServiceFacts, SliceFacts},
    watch::Kind,
};
use crate::{
    state::{NodeInfo, Policies, RoutingObjects, Snapshot, Workload, WorkloadKey},
    sync::discovery::PodLocation,
};

/// The live objects a snapshot is built from, borrowed from the caches.
#[derive(Clone, Debug)]
pub struct Objects<'a> {
    /// Pods of every node.
    pub pods: &'a BTreeMap<ObjKey, PodFacts>,
    /// Namespaces' labels.
    pub namespaces: &'a BTreeMap<ObjKey, BTreeMap<String, String>>,
    /// Services.
    pub services: &'a BTreeMap<ObjKey, ServiceFacts>,
    /// EndpointSlices.
    pub slices: &'a BTreeMap<ObjKey, SliceFacts>,
    /// This node's addresses (at most one Node is watched).
    pub nodes: &'a BTreeMap<ObjKey, Vec<IpAddr>>,
    /// The custom resources kept raw, by kind.
    pub raw: BTreeMap<Kind, &'a BTreeMap<ObjKey, serde_json::Value>>,
}

impl Objects<'_> {
    /// The raw objects of `kind` (none when the kind is not watched).
    fn raw(&self, kind: Kind) -> Vec<serde_json::Value> {
        self.raw
            .get(&kind)
            .map(|objects| objects.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The pods published (scheduled, running, with addresses, not on the
    /// host network), each with its enrollment decided.
    fn pods<'s>(
        &'s self,
        cfg: &'s KubeConfig,
    ) -> impl Iterator<Item = (&'s PodFacts, Enrollment)> + 's {
        self.pods
            .values()
            .filter(|p| {
                !p.node_name.is_empty() && !p.host_network && !p.terminal && !p.ips.is_empty()
            })
            .map(move |p| {
                let e = model::enrollment(
                    &p.labels,
                    &p.namespace,
                    self.namespaces.get(&(String::new(), p.namespace.clone())),
                    &cfg.excluded_namespaces,
                );
                (p, e)
            })
    }
}

/// The UIDs of the enrolled pods of this node: the ones whose processes
/// must be found before they can be published.
pub fn to_locate(objects: &Objects<'_>, cfg: &KubeConfig) -> BTreeSet<String> {
    objects
        .pods(cfg)
        .filter(|(p, e)| e.enrolled && p.node_name == cfg.node_name)
        .map(|(p, _)| p.uid.clone())
        .collect()
}

/// The enrollment decisions of one publication, compared with the next's
/// to report changes once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Each local pod's enrollment and its reason.
    pub intents: BTreeMap<WorkloadKey, (bool, &'static str)>,
    /// UIDs of enrolled pods whose processes are not found yet (left out).
    pub waiting: BTreeSet<String>,
}

impl Decisions {
    /// Whether the local pod `key` was decided enrolled.
    pub fn enrolled(&self, key: &WorkloadKey) -> bool {
        self.intents.get(key).is_some_and(|(enrolled, _)| *enrolled)
    }
}

/// What changed since the previous decisions, in pod order, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A local pod's enrollment was decided anew (first seen, or changed).
    Decided {
        /// The pod.
        pod: WorkloadKey,
        /// Enrolled or not.
        enrolled: bool,
        /// Why.
        reason: &'static str,
    },
    /// An enrolled pod's processes are not found yet: it is left out.
    Waiting {
        /// The pod.
        pod: WorkloadKey,
        /// Its UID.
        uid: String,
    },
    /// The processes of a pod that was waiting were found.
    Found {
        /// The pod.
        pod: WorkloadKey,
        /// The process whose namespace is used.
        pid: u32,
    },
}

/// A built snapshot and the decisions behind it.
#[derive(Clone, Debug)]
pub struct Built {
    /// The snapshot to publish (generation 0: the store numbers it).
    pub snapshot: Snapshot,
    /// This publication's decisions (the next build's `previous`).
    pub decisions: Decisions,
    /// What changed since `previous`.
    pub changes: Vec<Change>,
}

/// Builds the snapshot: local pods (enrolled ones with their netns and
/// cgroup from `locations`, left out while not found), remote pods (with
/// their node, for their addresses and identity), services joined with
/// their slices, the policies, the traffic-management objects, and the
/// node's probe sources.
pub fn build(
    objects: &Objects<'_>,
    cfg: &KubeConfig,
    locations: &BTreeMap<String, PodLocation>,
    previous: &Decisions,
) -> Built {
    let mut decisions = Decisions::default();
    let mut changes = Vec::new();
    let mut workloads = BTreeMap::new();
    for (pod, e) in objects.pods(cfg) {
        let key = pod.key();
        let mut w = Workload {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            uid: Some(pod.uid.clone()),
            ips: pod.ips.clone(),
            labels: pod.labels.clone(),
            enrolled: e.enrolled,
            exclude_outbound_ports: pod.exclude_outbound_ports.clone(),
            exclude_inbound_ports: pod.exclude_inbound_ports.clone(),
            waypoint: crate::state::pod_waypoint(
                &pod.namespace,
                &pod.labels,
                objects
                    .namespaces
                    .get(&(String::new(), pod.namespace.clone())),
            ),
            ..Workload::default()
        };
        if pod.node_name != cfg.node_name {
            w.node = Some(pod.node_name.clone());
            workloads.insert(key, w);
            continue;
        }
        if previous.intents.get(&key) != Some(&(e.enrolled, e.reason)) {
            changes.push(Change::Decided {
                pod: key.clone(),
                enrolled: e.enrolled,
                reason: e.reason,
            });
        }
        decisions
            .intents
            .insert(key.clone(), (e.enrolled, e.reason));
        if e.enrolled {
            let Some(loc) = locations.get(&pod.uid) else {
                if !previous.waiting.contains(&pod.uid) {
                    changes.push(Change::Waiting {
                        pod: key,
                        uid: pod.uid.clone(),
                    });
                }
                decisions.waiting.insert(pod.uid.clone());
                continue;
            };
            if previous.waiting.contains(&pod.uid) {
                changes.push(Change::Found {
                    pod: key.clone(),
                    pid: loc.pid,
                });
            }
            w.netns = loc.netns.clone();
            w.cgroup = Some(loc.cgroup.clone());
        }
        workloads.insert(key, w);
    }

    let mut probe_sources = cfg.probe_sources.clone();
    for addrs in objects.nodes.values() {
        probe_sources.extend(addrs.iter().copied());
    }
    probe_sources.sort();
    probe_sources.dedup();
    let snapshot = Snapshot {
        generation: 0,
        node: NodeInfo {
            name: cfg.node_name.clone(),
            probe_sources,
        },
        workloads,
        services: model::build_services(objects.services, objects.slices, objects.namespaces),
        policies: Policies {
            authorization: objects.raw(Kind::AuthorizationPolicies),
            peer_authentication: objects.raw(Kind::PeerAuthentications),
        },
        routing: RoutingObjects {
            destination_rules: objects.raw(Kind::DestinationRules),
            virtual_services: objects.raw(Kind::VirtualServices),
            tcp_routes: objects.raw(Kind::TcpRoutes),
            http_routes: objects.raw(Kind::HttpRoutes),
        },
        waypoint_gateways: crate::state::waypoint_gateways(&objects.raw(Kind::Gateways)),
        namespace_labels: objects
            .namespaces
            .iter()
            .map(|((_, name), labels)| (name.clone(), labels.clone()))
            .collect(),
        ..Default::default()
    };
    Built {
        snapshot,
        decisions,
        changes,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::state::ServiceKey;

    const NODE: &str = "n1";

    /// The caches' contents, owned, for [`Objects`] to borrow.
    #[derive(Default)]
    struct Fixture {
        pods: BTreeMap<ObjKey, PodFacts>,
        namespaces: BTreeMap<ObjKey, BTreeMap<String, String>>,
        services: BTreeMap<ObjKey, ServiceFacts>,
        slices: BTreeMap<ObjKey, SliceFacts>,
        nodes: BTreeMap<ObjKey, Vec<IpAddr>>,
        authorization: BTreeMap<ObjKey, serde_json::Value>,
        peer_authentication: BTreeMap<ObjKey, serde_json::Value>,
        destination_rules: BTreeMap<ObjKey, serde_json::Value>,
        virtual_services: BTreeMap<ObjKey, serde_json::Value>,
        tcp_routes: BTreeMap<ObjKey, serde_json::Value>,
        http_routes: BTreeMap<ObjKey, serde_json::Value>,
        gateways: BTreeMap<ObjKey, serde_json::Value>,
    }

    impl Fixture {
        fn objects(&self) -> Objects<'_> {
            Objects {
                pods: &self.pods,
                namespaces: &self.namespaces,
                services: &self.services,
                slices: &self.slices,
                nodes: &self.nodes,
                raw: [
                    (Kind::AuthorizationPolicies, &self.authorization),
                    (Kind::PeerAuthentications, &self.peer_authentication),
                    (Kind::DestinationRules, &self.destination_rules),
                    (Kind::VirtualServices, &self.virtual_services),
                    (Kind::TcpRoutes, &self.tcp_routes),
                    (Kind::HttpRoutes, &self.http_routes),
                    (Kind::Gateways, &self.gateways),
                ]
                .into(),
            }
        }

        fn pod(&mut self, ns: &str, name: &str, node: &str, ip: &str) -> &mut PodFacts {
            let facts = PodFacts {
                name: name.into(),
                namespace: ns.into(),
                uid: format!("uid-{name}"),
                node_name: node.into(),
                service_account: "default".into(),
                ips: vec![ip.parse().expect("test ip")],
                labels: BTreeMap::new(),
                host_network: false,
                terminal: false,
                exclude_outbound_ports: Vec::new(),
                exclude_inbound_ports: Vec::new(),
            };
            let key = (ns.to_owned(), name.to_owned());
            self.pods.entry(key).or_insert(facts)
        }

        fn namespace(&mut self, ns: &str, labels: &[(&str, &str)]) {
            self.namespaces.insert(
                (String::new(), ns.into()),
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
    }

    fn label(pod: &mut PodFacts, value: &str) {
        pod.labels
            .insert(model::DATAPLANE_MODE_LABEL.into(), value.into());
    }

    fn cfg() -> KubeConfig {
        KubeConfig::new(NODE)
    }

    fn located(uids: &[&str]) -> BTreeMap<String, PodLocation> {
        uids.iter()
            .enumerate()
            .map(|(i, uid)| {
                let pid = 100 + i as u32;
                (
                    (*uid).to_owned(),
                    PodLocation {
                        pid,
                        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
                        cgroup: PathBuf::from(format!("/sys/fs/cgroup/pod-{uid}")),
                    },
                )
            })
            .collect()
    }

    fn key(ns: &str, name: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn local_pods_are_located_and_remote_pods_carry_their_node() {
        let mut f = Fixture::default();
        f.namespace("shop", &[(model::DATAPLANE_MODE_LABEL, "ambient")]);
        f.pod("shop", "web", NODE, "10.0.1.5");
        f.pod("shop", "db", "n2", "10.0.2.7");
        let cfg = cfg();
        let objects = f.objects();
        assert_eq!(
            to_locate(&objects, &cfg),
            ["uid-web".to_owned()].into(),
            "only local enrolled pods are looked for"
        );
        let built = build(
            &objects,
            &cfg,
            &located(&["uid-web"]),
            &Decisions::default(),
        );
        let web = &built.snapshot.workloads[&key("shop", "web")];
        assert!(web.enrolled && web.node.is_none());
        assert_eq!(web.netns, PathBuf::from("/proc/100/ns/net"));
        assert_eq!(
            web.cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/pod-uid-web"))
        );
        assert_eq!(web.uid.as_deref(), Some("uid-web"));
        let db = &built.snapshot.workloads[&key("shop", "db")];
        assert_eq!(db.node.as_deref(), Some("n2"));
        assert!(
            db.enrolled,
            "a remote pod keeps its enrollment (the proxy tunnels to it)"
        );
        assert!(db.netns.as_os_str().is_empty() && db.cgroup.is_none());
        assert_eq!(
            built.decisions.intents.keys().collect::<Vec<_>>(),
            vec![&key("shop", "web")],
            "decisions are about local pods only"
        );
        assert_eq!(built.snapshot.node.name, NODE);
    }

    #[test]
    fn enrollment_follows_pod_and_namespace_labels_and_opt_out() {
        let mut f = Fixture::default();
        f.namespace("amb", &[(model::DATAPLANE_MODE_LABEL, "ambient")]);
        f.namespace("plain", &[]);
        f.pod("amb", "by-namespace", NODE, "10.0.1.1");
        label(f.pod("amb", "opted-out", NODE, "10.0.1.2"), "none");
        label(f.pod("plain", "by-pod", NODE, "10.0.1.3"), "ambient");
        f.pod("plain", "unlabelled", NODE, "10.0.1.4");
        f.pod("unknown-ns", "no-namespace-object", NODE, "10.0.1.5");
        let cfg = cfg();
        let objects = f.objects();
        let uids = to_locate(&objects, &cfg);
        let built = build(
            &objects,
            &cfg,
            &located(&uids.iter().map(String::as_str).collect::<Vec<_>>()),
            &Decisions::default(),
        );
        let enrolled = |ns, name| built.snapshot.workloads[&key(ns, name)].enrolled;
        assert!(enrolled("amb", "by-namespace"));
        assert!(!enrolled("amb", "opted-out"));
        assert!(enrolled("plain", "by-pod"));
        assert!(!enrolled("plain", "unlabelled"));
        assert!(!enrolled("unknown-ns", "no-namespace-object"));
        assert_eq!(
            uids,
            ["uid-by-namespace".to_owned(), "uid-by-pod".to_owned()].into()
        );
        // Every local pod's decision is reported once, with its reason...
        let decided: Vec<_> = built
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Decided {
                    pod,
                    enrolled,
                    reason,
                } => Some((pod.name.as_str(), *enrolled, *reason)),
                _ => None,
            })
            .collect();
        assert_eq!(decided.len(), 5, "{decided:?}");
        assert!(decided.contains(&(
            "opted-out",
            false,
            "pod label istio.io/dataplane-mode=none (opted out)"
        )));
        // ... and not again while it holds; a label change is reported.
        let again = build(
            &objects,
            &cfg,
            &located(&["uid-by-namespace", "uid-by-pod"]),
            &built.decisions,
        );
        assert!(again.changes.is_empty(), "{:?}", again.changes);
        label(f.pod("plain", "unlabelled", NODE, "10.0.1.4"), "ambient");
        let objects = f.objects();
        let changed = build(
            &objects,
            &cfg,
            &located(&["uid-by-namespace", "uid-by-pod", "uid-unlabelled"]),
            &again.decisions,
        );
        assert_eq!(
            changed.changes,
            vec![Change::Decided {
                pod: key("plain", "unlabelled"),
                enrolled: true,
                reason: "pod label istio.io/dataplane-mode=ambient",
            }]
        );
    }

    #[test]
    fn excluded_namespaces_never_enroll() {
        let mut f = Fixture::default();
        f.namespace("kube-system", &[(model::DATAPLANE_MODE_LABEL, "ambient")]);
        f.namespace("monitoring", &[(model::DATAPLANE_MODE_LABEL, "ambient")]);
        label(f.pod("kube-system", "dns", NODE, "10.0.1.1"), "ambient");
        f.pod("monitoring", "prom", NODE, "10.0.1.2");
        let mut cfg = cfg();
        cfg.excluded_namespaces.insert("monitoring".into());
        let objects = f.objects();
        assert!(to_locate(&objects, &cfg).is_empty());
        let built = build(&objects, &cfg, &BTreeMap::new(), &Decisions::default());
        for (ns, name) in [("kube-system", "dns"), ("monitoring", "prom")] {
            let w = &built.snapshot.workloads[&key(ns, name)];
            assert!(!w.enrolled, "{ns}/{name}");
            assert_eq!(
                built.decisions.intents[&key(ns, name)],
                (false, "system namespace, never enrolled")
            );
        }
    }

    #[test]
    fn a_pod_waiting_for_discovery_is_left_out_until_found() {
        let mut f = Fixture::default();
        label(f.pod("shop", "web", NODE, "10.0.1.5"), "ambient");
        let cfg = cfg();
        let objects = f.objects();
        let waiting = build(&objects, &cfg, &BTreeMap::new(), &Decisions::default());
        assert!(waiting.snapshot.workloads.is_empty());
        assert_eq!(waiting.decisions.waiting, ["uid-web".to_owned()].into());
        assert!(waiting.decisions.enrolled(&key("shop", "web")));
        assert_eq!(
            waiting.changes[1..],
            [Change::Waiting {
                pod: key("shop", "web"),
                uid: "uid-web".into()
            }]
        );
        // Still not found: left out, not reported again.
        let still = build(&objects, &cfg, &BTreeMap::new(), &waiting.decisions);
        assert!(still.snapshot.workloads.is_empty() && still.changes.is_empty());
        // Found: published with its location, the finding reported.
        let found = build(&objects, &cfg, &located(&["uid-web"]), &still.decisions);
        assert_eq!(
            found.changes,
            vec![Change::Found {
                pod: key("shop", "web"),
                pid: 100
            }]
        );
        assert!(found.decisions.waiting.is_empty());
        assert_eq!(
            found.snapshot.workloads[&key("shop", "web")].netns,
            PathBuf::from("/proc/100/ns/net")
        );
    }

    #[test]
    fn unpublishable_pods_are_left_out() {
        let mut f = Fixture::default();
        f.namespace("shop", &[(model::DATAPLANE_MODE_LABEL, "ambient")]);
        f.pod("shop", "unscheduled", "", "10.0.1.1");
        f.pod("shop", "host", NODE, "10.0.1.2").host_network = true;
        f.pod("shop", "done", NODE, "10.0.1.3").terminal = true;
        f.pod("shop", "no-ip", NODE, "10.0.1.4").ips.clear();
        let cfg = cfg();
        let objects = f.objects();
        assert!(to_locate(&objects, &cfg).is_empty());
        let built = build(&objects, &cfg, &BTreeMap::new(), &Decisions::default());
        assert!(built.snapshot.workloads.is_empty());
        assert!(built.changes.is_empty() && built.decisions == Decisions::default());
    }

    #[test]
    fn probe_sources_merge_flags_and_node_addresses() {
        let mut f = Fixture::default();
        f.nodes.insert(
            (String::new(), NODE.into()),
            vec![
                "10.0.0.9".parse().expect("ip"),
                "10.0.0.1".parse().expect("ip"),
            ],
        );
        let mut cfg = cfg();
        cfg.probe_sources = vec![
            "10.0.0.9".parse().expect("ip"),
            "fd00::1".parse().expect("ip"),
        ];
        let built = build(&f.objects(), &cfg, &BTreeMap::new(), &Decisions::default());
        let want: Vec<IpAddr> = ["10.0.0.1", "10.0.0.9", "fd00::1"]
            .iter()
            .map(|ip| ip.parse().expect("ip"))
            .collect();
        assert_eq!(
            built.snapshot.node.probe_sources, want,
            "sorted, without duplicates"
        );
    }

    #[test]
    fn services_take_the_waypoint_of_their_label_or_their_namespace() {
        use crate::state::{USE_WAYPOINT_LABEL, WaypointSource};
        let mut f = Fixture::default();
        f.namespace("shop", &[(USE_WAYPOINT_LABEL, "shop-wp")]);
        for (name, label) in [
            ("plain", None),
            ("own", Some("own-wp")),
            ("out", Some("none")),
            ("shop-wp", None),
        ] {
            f.services.insert(
                ("shop".into(), name.into()),
                ServiceFacts {
                    name: name.into(),
                    namespace: "shop".into(),
                    vips: Vec::new(),
                    ports: Vec::new(),
                    labels: label
                        .map(|v| [(USE_WAYPOINT_LABEL.to_owned(), v.to_owned())].into())
                        .unwrap_or_default(),
                },
            );
        }
        f.services.insert(
            ("other".into(), "web".into()),
            ServiceFacts {
                name: "web".into(),
                namespace: "other".into(),
                vips: Vec::new(),
                ports: Vec::new(),
                labels: BTreeMap::new(),
            },
        );
        let built = build(
            &f.objects(),
            &cfg(),
            &BTreeMap::new(),
            &Decisions::default(),
        );
        let waypoint = |ns: &str, name: &str| {
            built.snapshot.services[&ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            }]
                .waypoint
                .as_ref()
                .map(|w| (w.reference.to_string(), w.from))
        };
        assert_eq!(
            waypoint("shop", "plain"),
            Some(("shop/shop-wp".into(), WaypointSource::Namespace))
        );
        assert_eq!(
            waypoint("shop", "own"),
            Some(("shop/own-wp".into(), WaypointSource::Service))
        );
        assert_eq!(waypoint("shop", "out"), None, "none opts out");
        assert_eq!(
            waypoint("shop", "shop-wp"),
            None,
            "the waypoint's own Service"
        );
        assert_eq!(waypoint("other", "web"), None, "unlabelled namespace");
    }

    #[test]
    fn services_and_policies_are_built() {
        let mut f = Fixture::default();
        f.services.insert(
            ("shop".into(), "web".into()),
            ServiceFacts {
                name: "web".into(),
                namespace: "shop".into(),
                vips: vec!["10.96.0.10".parse().expect("ip")],
                ports: Vec::new(),
                labels: BTreeMap::new(),
            },
        );
        f.slices.insert(
            ("shop".into(), "web-abc".into()),
            SliceFacts {
                namespace: "shop".into(),
                service: "web".into(),
                ports: BTreeMap::new(),
                endpoints: vec![(
                    "10.0.1.5".parse().expect("ip"),
                    Some(key("shop", "web-0")),
                    Some(NODE.to_owned()),
                )],
            },
        );
        f.authorization.insert(
            ("shop".into(), "deny".into()),
            serde_json::json!({"kind": "AuthorizationPolicy"}),
        );
        let built = build(
            &f.objects(),
            &cfg(),
            &BTreeMap::new(),
            &Decisions::default(),
        );
        let svc = &built.snapshot.services[&ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        }];
        assert_eq!(svc.vips, vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(svc.endpoints.len(), 1);
        assert_eq!(svc.endpoints[0].workload, Some(key("shop", "web-0")));
        assert_eq!(built.snapshot.policies.authorization.len(), 1);
        assert!(built.snapshot.policies.peer_authentication.is_empty());
    }

    /// Gateways and namespace labels reach the snapshot: a cross-namespace
    /// waypoint binding is decided with them.
    #[test]
    fn gateways_and_namespace_labels_decide_cross_namespace_waypoints() {
        let mut f = Fixture::default();
        f.namespace("t", &[("tenant", "trusted")]);
        f.gateways.insert(
            ("victim".into(), "wp".into()),
            serde_json::json!({"kind": "Gateway", "metadata": {"namespace": "victim", "name": "wp"},
                "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008,
                "protocol": "HBONE", "allowedRoutes": {"namespaces": {"from": "Selector",
                "selector": {"matchLabels": {"tenant": "trusted"}}}}}]}}),
        );
        let built = build(
            &f.objects(),
            &cfg(),
            &BTreeMap::new(),
            &Decisions::default(),
        );
        let w = crate::state::WaypointRef {
            namespace: "victim".into(),
            name: "wp".into(),
        };
        assert!(built.snapshot.waypoint_gateways.contains_key(&w));
        assert!(built.snapshot.binding_allowed(&w, "t"));
        assert!(!built.snapshot.binding_allowed(&w, "other"));
    }

    #[test]
    fn routing_objects_are_built_in_namespace_and_name_order() {
        let mut f = Fixture::default();
        for (ns, name) in [("shop", "web"), ("plain", "api"), ("shop", "db")] {
            f.destination_rules.insert(
                (ns.into(), name.into()),
                serde_json::json!({"kind": "DestinationRule", "metadata": {"namespace": ns, "name": name}}),
            );
        }
        f.virtual_services.insert(
            ("shop".into(), "web".into()),
            serde_json::json!({"kind": "VirtualService"}),
        );
        f.tcp_routes.insert(
            ("shop".into(), "web".into()),
            serde_json::json!({"kind": "TCPRoute"}),
        );
        f.http_routes.insert(
            ("shop".into(), "web".into()),
            serde_json::json!({"kind": "HTTPRoute"}),
        );
        let built = build(
            &f.objects(),
            &cfg(),
            &BTreeMap::new(),
            &Decisions::default(),
        );
        let routing = &built.snapshot.routing;
        let names: Vec<String> = routing
            .destination_rules
            .iter()
            .map(|o| format!("{}/{}", o["metadata"]["namespace"], o["metadata"]["name"]))
            .collect();
        assert_eq!(
            names,
            ["\"plain\"/\"api\"", "\"shop\"/\"db\"", "\"shop\"/\"web\""]
        );
        assert_eq!(
            routing.virtual_services,
            [serde_json::json!({"kind": "VirtualService"})]
        );
        assert_eq!(
            routing.tcp_routes,
            [serde_json::json!({"kind": "TCPRoute"})]
        );
        assert_eq!(
            routing.http_routes,
            [serde_json::json!({"kind": "HTTPRoute"})]
        );
        assert!(built.snapshot.policies.authorization.is_empty());
    }
}
