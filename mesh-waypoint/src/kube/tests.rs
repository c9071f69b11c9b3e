//! [`config_from_snapshot`] over snapshots whose services' waypoints are
//! decided by the agent's own rule (`service_waypoint`, from labels).

use std::{collections::BTreeMap, net::IpAddr};

use mesh_agent::state::{
    Endpoint, Service, ServiceKey, ServicePort as AgentPort, Snapshot, Workload, WorkloadKey,
    service_waypoint,
};
use serde_json::json;

use super::*;

fn me() -> WaypointName {
    WaypointRef {
        namespace: "shop".into(),
        name: "waypoint".into(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A one-port (`http` 9080 → 8080) service in `ns` with `labels`, its
/// namespace labelled `ns_labels`, with endpoints `(ip, pod)`.
fn service(
    ns: &str,
    name: &str,
    vip: &str,
    labels: &[(&str, &str)],
    ns_labels: &[(&str, &str)],
    endpoints: &[(&str, &str)],
) -> (ServiceKey, Service) {
    let key = ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    };
    let waypoint = service_waypoint(&key, &labels_of(labels), Some(&labels_of(ns_labels)));
    let svc = Service {
        name: name.into(),
        namespace: ns.into(),
        vips: vec![ip(vip)],
        ports: vec![AgentPort {
            name: "http".into(),
            port: 9080,
            protocol: "TCP".into(),
        }],
        endpoints: endpoints
            .iter()
            .map(|(addr, pod)| Endpoint {
                ip: ip(addr),
                ports: [("http".to_owned(), 8080)].into(),
                workload: Some(WorkloadKey {
                    namespace: ns.into(),
                    name: (*pod).into(),
                }),
                node_name: Some("n1".into()),
            })
            .collect(),
        waypoint,
        waypoint_traffic: mesh_agent::state::WaypointFor::default(),
    };
    (key, svc)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn labels_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels(pairs)
}

fn pod(ns: &str, name: &str, addr: &str, sa: &str, enrolled: bool, l: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        ips: vec![ip(addr)],
        enrolled,
        labels: labels(l),
        node: Some("n1".into()),
        ..Workload::default()
    }
}

fn snapshot(services: Vec<(ServiceKey, Service)>, pods: Vec<Workload>) -> Snapshot {
    Snapshot {
        services: services.into_iter().collect(),
        workloads: pods.into_iter().map(|w| (w.key(), w)).collect(),
        ..Snapshot::default()
    }
}

fn names(c: &WaypointConfig) -> Vec<(String, bool)> {
    c.services
        .iter()
        .map(|s| {
            (
                format!("{}/{}", s.namespace, s.name),
                !s.addresses.is_empty(),
            )
        })
        .collect()
}

const USE: &str = "istio.io/use-waypoint";

#[test]
fn only_the_services_labelled_for_this_waypoint_are_fronted() {
    let snap = snapshot(
        vec![
            service(
                "shop",
                "reviews",
                "10.96.0.10",
                &[(USE, "waypoint")],
                &[],
                &[],
            ),
            service("shop", "ratings", "10.96.0.11", &[(USE, "other")], &[], &[]),
            service("shop", "plain", "10.96.0.12", &[], &[], &[]),
            // Same name, another namespace's waypoint.
            service("web", "front", "10.96.0.13", &[(USE, "waypoint")], &[], &[]),
            // Another namespace naming this waypoint explicitly.
            service(
                "web",
                "api",
                "10.96.0.14",
                &[
                    (USE, "waypoint"),
                    ("istio.io/use-waypoint-namespace", "shop"),
                ],
                &[],
                &[],
            ),
        ],
        vec![],
    );
    let mut snap = snap;
    // web/api binds across namespaces: only when this waypoint's Gateway
    // allows web (no Gateway object, or one without allowedRoutes: Same).
    let own = [("shop/reviews".to_owned(), true)];
    let c = config_from_snapshot(&snap, &me(), "istio-system");
    assert_eq!(names(&c), own, "no Gateway: same namespace only");
    let gateway = |allowed: serde_json::Value| {
        json!({"kind": "Gateway", "metadata": {"namespace": "shop", "name": "waypoint"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                {"name": "mesh", "port": 15008, "protocol": "HBONE", "allowedRoutes": allowed}]}})
    };
    snap.waypoint_gateways = mesh_agent::state::waypoint_gateways(&[gateway(json!({}))]);
    let c = config_from_snapshot(&snap, &me(), "istio-system");
    assert_eq!(names(&c), own, "no allowedRoutes.namespaces: Same");
    snap.waypoint_gateways =
        mesh_agent::state::waypoint_gateways(&[gateway(json!({"namespaces": {"from": "All"}}))]);
    let c = config_from_snapshot(&snap, &me(), "istio-system");
    assert_eq!(
        names(&c),
        [("shop/reviews".into(), true), ("web/api".into(), true)]
    );
    assert_eq!(c.services[0].addresses, [ip("10.96.0.10")]);
}

#[test]
fn a_namespace_label_fronts_its_services_unless_one_opts_out() {
    let ns = [(USE, "waypoint")];
    let snap = snapshot(
        vec![
            service("shop", "reviews", "10.96.0.10", &[], &ns, &[]),
            service("shop", "ratings", "10.96.0.11", &[(USE, "none")], &ns, &[]),
            service("shop", "details", "10.96.0.12", &[(USE, "other")], &ns, &[]),
            // The waypoint's own Service never goes through itself.
            service("shop", "waypoint", "10.96.0.20", &[], &ns, &[]),
        ],
        vec![],
    );
    assert_eq!(
        names(&config_from_snapshot(&snap, &me(), "istio-system")),
        [("shop/reviews".into(), true)]
    );
}

#[test]
fn endpoints_carry_their_pods_labels_account_workload_and_tunnel() {
    let snap = snapshot(
        vec![service(
            "shop",
            "reviews",
            "10.96.0.10",
            &[(USE, "waypoint")],
            &[],
            &[
                ("10.0.0.5", "reviews-v1-7d9f8c6b5-abcde"),
                ("10.0.0.6", "reviews-v2"),
                ("10.0.0.7", "gone"),
            ],
        )],
        vec![
            pod(
                "shop",
                "reviews-v1-7d9f8c6b5-abcde",
                "10.0.0.5",
                "bookinfo-reviews",
                true,
                &[
                    ("app", "reviews"),
                    ("version", "v1"),
                    ("pod-template-hash", "7d9f8c6b5"),
                ],
            ),
            pod(
                "shop",
                "reviews-v2",
                "10.0.0.6",
                "default",
                false,
                &[("app", "reviews"), ("version", "v2")],
            ),
        ],
    );
    let c = config_from_snapshot(&snap, &me(), "istio-system");
    let s = &c.services[0];
    assert_eq!(s.ports.len(), 1);
    assert_eq!(
        (s.ports[0].port, s.ports[0].target_port),
        (9080, Some(8080))
    );
    let e: Vec<_> = s
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.port,
                e.workload.clone(),
                e.service_account.clone(),
                e.labels.get("version").cloned(),
                e.tunnel,
            )
        })
        .collect();
    assert_eq!(
        e,
        [
            (
                "10.0.0.5".into(),
                Some(8080),
                Some("reviews-v1".into()),
                Some("bookinfo-reviews".into()),
                Some("v1".into()),
                TunnelProtocol::Hbone
            ),
            (
                "10.0.0.6".into(),
                Some(8080),
                Some("reviews-v2".into()),
                Some("default".into()),
                Some("v2".into()),
                TunnelProtocol::None
            ),
            // A pod the snapshot does not know: plaintext, no labels.
            (
                "10.0.0.7".into(),
                Some(8080),
                None,
                None,
                None,
                TunnelProtocol::None
            ),
        ]
    );
}

#[test]
fn attached_routes_their_backends_and_rules_come_along_others_do_not() {
    let fronted = [(USE, "waypoint")];
    let mut snap = snapshot(
        vec![
            service(
                "shop",
                "reviews",
                "10.96.0.10",
                &fronted,
                &[],
                &[("10.0.0.5", "r1")],
            ),
            service(
                "shop",
                "reviews-v1",
                "10.96.0.21",
                &[],
                &[],
                &[("10.0.0.5", "r1")],
            ),
            service("shop", "reviews-v2", "10.96.0.22", &[], &[], &[]),
            service("shop", "ratings", "10.96.0.11", &[], &[], &[]),
            service("shop", "unrelated", "10.96.0.30", &[], &[], &[]),
        ],
        vec![],
    );
    let http = |name: &str, parent: &str, backends: &[&str]| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 9080}],
                        "rules": [{"backendRefs": backends.iter().map(|b| json!({"name": b, "port": 9080})).collect::<Vec<_>>()}]}})
    };
    snap.routing.http_routes = vec![
        http("reviews", "reviews", &["reviews-v1", "reviews-v2"]),
        http("elsewhere", "unrelated", &["ratings"]),
        // A route on a Gateway (not a mesh route).
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "ingress", "namespace": "shop"},
               "spec": {"parentRefs": [{"name": "reviews"}], "rules": []}}),
    ];
    snap.routing.virtual_services = vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "reviews-vs", "namespace": "shop"},
               "spec": {"hosts": ["reviews.shop.svc.cluster.local"],
                        "http": [{"route": [{"destination": {"host": "reviews"}}],
                                  "mirror": {"host": "ratings.shop"}}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "other", "namespace": "shop"},
               "spec": {"hosts": ["unrelated"]}}),
    ];
    snap.routing.destination_rules = vec![
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": "reviews", "namespace": "shop"}, "spec": {"host": "reviews"}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": "unrelated", "namespace": "shop"}, "spec": {"host": "unrelated"}}),
    ];
    snap.policies.authorization = vec![
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "wp", "namespace": "shop"},
               "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]}}),
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "l4", "namespace": "shop"},
               "spec": {"selector": {"matchLabels": {"app": "reviews"}}}}),
    ];
    let c = config_from_snapshot(&snap, &me(), "istio-system");
    // Fronted with its VIP; backends without theirs (never a tunnel target).
    assert_eq!(
        names(&c),
        [
            ("shop/ratings".into(), false),
            ("shop/reviews".into(), true),
            ("shop/reviews-v1".into(), false),
            ("shop/reviews-v2".into(), false),
        ]
    );
    let route_names: Vec<String> = c
        .route_objects()
        .iter()
        .map(|r| match r {
            crate::config::RouteObject::Http(h) => format!("HTTPRoute {}", h.metadata.name),
            crate::config::RouteObject::Virtual(v) => format!("VirtualService {}", v.metadata.name),
            crate::config::RouteObject::Destination(d) => {
                format!(
                    "DestinationRule {}",
                    d["metadata"]["name"].as_str().unwrap_or("")
                )
            }
            crate::config::RouteObject::Invalid { name, reason } => {
                format!("invalid {name}: {reason}")
            }
        })
        .collect();
    assert_eq!(
        route_names,
        [
            "HTTPRoute reviews",
            "VirtualService reviews-vs",
            "DestinationRule reviews"
        ]
    );
    let policy_names: Vec<&str> = c
        .policies
        .iter()
        .filter_map(|p| p.get("metadata")?.get("name")?.as_str())
        .collect();
    assert_eq!(policy_names, ["wp"]);
    // The configuration round-trips through the file format (the same
    // configuration a file would give).
    let text = serde_yaml::to_string(&c).expect("yaml");
    let back = WaypointConfig::parse(&text).expect("parses");
    assert_eq!(names(&back), names(&c));
}

#[test]
fn a_snapshot_without_labelled_services_configures_nothing() {
    let snap = snapshot(
        vec![service("shop", "reviews", "10.96.0.10", &[], &[], &[])],
        vec![],
    );
    let c = config_from_snapshot(&snap, &me(), "istio-system");
    assert!(c.services.is_empty() && c.routes.is_empty() && c.policies.is_empty());
}

#[test]
fn pods_are_fronted_when_this_waypoint_takes_workload_traffic() {
    let ns_use: &[(&str, &str)] = &[(USE, "waypoint")];
    let mk = |scope: Option<&str>| {
        let mut wp = service("shop", "waypoint", "10.96.0.99", &[], &[], &[]);
        if let Some(s) = scope {
            wp.1.waypoint_traffic = mesh_agent::state::WaypointFor::from_labels(
                &labels(&[("istio.io/waypoint-for", s)]),
                &wp.0,
            );
        }
        let mut db = pod("shop", "db-0", "10.1.0.5", "db", true, &[("app", "db")]);
        db.waypoint = mesh_agent::state::pod_waypoint("shop", &db.labels, Some(&labels(ns_use)));
        let mut own = pod(
            "shop",
            "cache-0",
            "10.1.0.6",
            "cache",
            false,
            &[(USE, "waypoint")],
        );
        own.waypoint = mesh_agent::state::pod_waypoint("shop", &own.labels, None);
        let mut out = pod("shop", "out-0", "10.1.0.7", "out", true, &[(USE, "none")]);
        out.waypoint = mesh_agent::state::pod_waypoint("shop", &out.labels, Some(&labels(ns_use)));
        let web = service("shop", "web", "10.96.0.10", &[], ns_use, &[]);
        config_from_snapshot(
            &snapshot(vec![wp, web], vec![db, own, out]),
            &me(),
            "istio-system",
        )
    };
    let pods = |c: &WaypointConfig| -> Vec<String> {
        c.workloads
            .iter()
            .map(|w| format!("{}/{} {:?}", w.namespace, w.name, w.tunnel))
            .collect()
    };
    // The default (service traffic): the service, no pod.
    let c = mk(None);
    assert!(pods(&c).is_empty());
    assert_eq!(names(&c), [("shop/web".to_owned(), true)]);
    // Workload traffic: the pods (by their label or their namespace's,
    // `none` opting out), not the service.
    let c = mk(Some("workload"));
    assert_eq!(pods(&c), ["shop/cache-0 None", "shop/db-0 Hbone"]);
    assert!(names(&c).is_empty(), "{:?}", names(&c));
    let db = c.workloads.iter().find(|w| w.name == "db-0").expect("db");
    assert_eq!(db.addresses, [ip("10.1.0.5")]);
    assert_eq!(db.service_account.as_deref(), Some("db"));
    // Both.
    let c = mk(Some("all"));
    assert_eq!(pods(&c).len(), 2);
    assert_eq!(names(&c), [("shop/web".to_owned(), true)]);
}
