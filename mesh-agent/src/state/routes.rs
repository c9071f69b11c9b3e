//! The one place routes are compiled (issue 11): the snapshot's
//! traffic-management objects ([`RoutingObjects`]) with its services (and
//! the pod labels subsets select on) into the [`RouteTable`] the proxy
//! routes service connections with, and the report of what is applied,
//! rejected (with the field path) or ignored (L7-only fields). The store
//! publishes the table with every snapshot, shared while its inputs do not
//! change.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, collections::HashMap, net::IpAddr};

use crate::routing::{EndpointInput, Objects, Options, RouteTable, ServiceInput, Status, compile};

use super::{RoutingObjects, Service, ServiceKey, Workload, WorkloadKey};

/// Compiles `routing` against `services`, with each endpoint's pod labels
/// from `workloads` (by the endpoint's pod, else by its address), with the
/// mesh's `options` (Istio's root namespace, the default `exportTo` of
/// VirtualServices).
pub fn compile_routes(
    routing: &RoutingObjects,
    services: &BTreeMap<ServiceKey, Service>,
    workloads: &BTreeMap<WorkloadKey, Workload>,
    options: &Options,
) -> RouteTable {
    let mut by_ip: HashMap<IpAddr, &Workload> = HashMap::new();
    for w in workloads.values() {
        for ip in &w.ips {
            by_ip.entry(ip.to_canonical()).or_insert(w);
        }
    }
    let inputs = services
        .values()
        .map(|s| ServiceInput {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vips: s.vips.clone(),
            ports: s
                .ports
                .iter()
                .filter(|p| p.protocol == "TCP")
                .map(|p| (p.name.clone(), p.port))
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    let pod = e
                        .workload
                        .as_ref()
                        .and_then(|k| workloads.get(k))
                        .or_else(|| by_ip.get(&e.ip.to_canonical()).copied());
                    EndpointInput {
                        ip: e.ip.to_canonical(),
                        ports: e.ports.clone(),
                        labels: pod.map(|w| w.labels.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
        })
        .collect();
    compile(
        Objects {
            destination_rules: &routing.destination_rules,
            virtual_services: &routing.virtual_services,
            tcp_routes: &routing.tcp_routes,
        },
        inputs,
        options,
    )
}

/// Logs a table's report (once per compile, by the store that published
/// it, at `generation`): each rejected or not-applied object and each
/// ignored field the last compile did not report, then a summary.
pub(super) fn log_routes(
    table: &RouteTable,
    generation: u64,
    logged: &super::findings::LoggedFindings,
) {
    let report = table.report();
    let mut applied = 0usize;
    let mut pass = logged.pass("routes");
    for o in &report.objects {
        let object = o.object();
        match &o.status {
            Status::Applied => applied += 1,
            Status::Rejected { field, reason } => {
                if pass.fresh(format!("rejected {object} {field} {reason}")) {
                    tracing::error!(%object, field = %field, %reason, "routing object rejected");
                }
            }
            Status::NeedsL7 { reason } => {
                if pass.fresh(format!("needs-l7 {object} {reason}")) {
                    tracing::warn!(%object, %reason, "routing object needs L7 (waypoint): not applied");
                }
            }
            Status::NotApplied { reason } => {
                if pass.fresh(format!("not-applied {object} {reason}")) {
                    tracing::warn!(%object, %reason, "routing object not applied");
                }
            }
        }
        for w in &o.warnings {
            if pass.fresh(format!("field {object} {} {}", w.field, w.message)) {
                tracing::warn!(%object, field = %w.field, reason = %w.message, "routing field not applied");
            }
        }
    }
    drop(pass);
    if !report.objects.is_empty() {
        tracing::info!(
            generation,
            objects = report.objects.len(),
            applied,
            "routes applied"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, ServicePort, Snapshot, Store};

    fn snapshot(weights: (u32, u32)) -> Snapshot {
        let pod = |name: &str, ip: &str, version: &str| Workload {
            name: name.into(),
            namespace: "shop".into(),
            ips: vec![ip.parse().expect("ip")],
            labels: BTreeMap::from([("version".to_string(), version.to_string())]),
            ..Default::default()
        };
        let pods = [
            pod("web-1", "198.18.1.11", "v1"),
            pod("web-2", "198.18.1.12", "v2"),
        ];
        let svc = Service {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec!["198.18.200.1".parse().expect("vip")],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
            }],
            endpoints: pods
                .iter()
                .map(|p| Endpoint {
                    ip: p.ips[0],
                    ports: BTreeMap::from([("http".to_string(), 8080)]),
                    workload: Some(p.key()),
                    node_name: None,
                })
                .collect(),
            waypoint: None,
            waypoint_traffic: Default::default(),
        };
        let dr = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}});
        let vs = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}],
              "tcp": [{"route": [
              {"destination": {"host": "web", "subset": "v1"}, "weight": weights.0},
              {"destination": {"host": "web", "subset": "v2"}, "weight": weights.1}]}]}});
        Snapshot {
            workloads: pods.into_iter().map(|p| (p.key(), p)).collect(),
            services: [(
                ServiceKey {
                    namespace: "shop".into(),
                    name: "web".into(),
                },
                svc,
            )]
            .into(),
            routing: RoutingObjects {
                destination_rules: vec![dr],
                virtual_services: vec![vs],
                tcp_routes: vec![],
                http_routes: vec![],
            },
            ..Default::default()
        }
    }

    #[test]
    fn subsets_select_pods_by_their_labels_and_the_report_lists_l7_fields() {
        let snap = snapshot((0, 100));
        let t = compile_routes(
            &snap.routing,
            &snap.services,
            &snap.workloads,
            &Options::default(),
        );
        let vs = &t.report().objects[1];
        assert_eq!(vs.status, Status::Applied);
        assert_eq!(vs.warnings[0].field, "spec.http");
        let labels = BTreeMap::new();
        let req = crate::routing::Request {
            destination: "198.18.200.1:80".parse().expect("addr"),
            source: "198.18.1.10".parse().expect("addr"),
            source_namespace: "shop",
            source_labels: &labels,
        };
        let r = t.route(&req, 0).expect("a service").expect("routed");
        assert_eq!(
            r.dest.endpoints,
            vec!["198.18.1.12:8080".parse().expect("addr")]
        );
    }

    /// `--default-virtual-service-export-to .`: the store compiles with it,
    /// so a VirtualService without `exportTo` routes its own namespace's
    /// clients only.
    #[test]
    fn the_store_compiles_with_the_default_virtual_service_export() {
        let labels = BTreeMap::new();
        let routed = |store: &Store, ns: &'static str| {
            let req = crate::routing::Request {
                destination: "198.18.200.1:80".parse().expect("addr"),
                source: "198.18.1.10".parse().expect("addr"),
                source_namespace: ns,
                source_labels: &labels,
            };
            store
                .current()
                .routes
                .route(&req, 0)
                .expect("a service")
                .expect("routed")
                .route
                .clone()
        };
        let everyone = Store::new();
        everyone.publish_snapshot(snapshot((0, 100)));
        assert!(routed(&everyone, "other").is_some());
        let own = Store::new().with_default_virtual_service_export_to(vec![".".into()]);
        own.publish_snapshot(snapshot((0, 100)));
        assert!(routed(&own, "shop").is_some());
        assert_eq!(routed(&own, "other"), None);
    }

    #[test]
    fn the_store_compiles_routes_once_per_change_and_shares_them_otherwise() {
        let store = Store::new();
        store.publish_snapshot(snapshot((80, 20)));
        let first = store.current().routes.clone();
        assert_eq!(first.report().objects.len(), 2);
        // Same inputs, another node name: a new generation, the same table.
        let mut same = snapshot((80, 20));
        same.node.name = "n2".into();
        store.publish_snapshot(same);
        assert!(std::sync::Arc::ptr_eq(&first, &store.current().routes));
        // Changed weights: recompiled.
        store.publish_snapshot(snapshot((0, 100)));
        assert!(!std::sync::Arc::ptr_eq(&first, &store.current().routes));
        // publish (workloads only) keeps routes while the pods are the same.
        let current = store.current();
        let routes = current.routes.clone();
        store.publish(crate::state::NodeInfo::default(), current.workloads.clone());
        assert!(std::sync::Arc::ptr_eq(&routes, &store.current().routes));
    }
}
