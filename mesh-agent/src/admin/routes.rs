//! The `routes` part of `/config_dump` (and `mesh-agent routes`): the
//! effective routing per service — its route sets with their weighted
//! destinations, each destination's policy and endpoints with their live
//! state (active connections, ejected by outlier detection) — and the
//! report of every routing object (applied, rejected with the field path,
//! needs L7, ignored fields).
#![forbid(unsafe_code)]

use std::time::Instant;

use serde_json::{Value, json};

use crate::routing::{Balancer, RouteTable};

/// The routing of `table` with `balancer`'s state at `now`.
pub fn routes_json(table: &RouteTable, balancer: &Balancer, now: Instant) -> Value {
    let services: Vec<Value> = table
        .view()
        .into_iter()
        .map(|s| {
            json!({
                "service": s.service,
                "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "routes": s.routes,
                "destinations": s.destinations.iter().map(|d| json!({
                    "destination": d.destination.as_ref(),
                    "subset": d.subset.as_deref(),
                    "rule": d.rule.as_deref(),
                    "policy": d.policy,
                    "active": balancer.dest_active(&d.key),
                    "endpoints": d.endpoints.iter().map(|e| {
                        let st = balancer.status(*e, now);
                        json!({
                            "address": e.to_string(),
                            "active": st.active,
                            "ejected": st.ejected,
                            "times_ejected": st.times_ejected,
                            "consecutive_errors": st.consecutive_errors,
                        })
                    }).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "services": services,
        "objects": table.report().objects,
    })
}

/// The services and pods whose traffic goes through a waypoint
/// (`istio.io/use-waypoint`, in force by the waypoint's
/// `istio.io/waypoint-for`): their routing (these routes included) is the
/// waypoint's job, not the node's.
pub fn waypoints_json(snap: &crate::state::Snapshot) -> Value {
    let services = snap.services.values().filter_map(|s| {
        let w = snap.service_waypoint_in_force(s)?;
        Some(json!({
            "service": format!("{}/{}", s.namespace, s.name),
            "waypoint": w.reference.to_string(),
            "from": w.from.as_str(),
        }))
    });
    let pods = snap.workloads.values().filter_map(|p| {
        let w = snap.pod_waypoint_in_force(p)?;
        Some(json!({
            "pod": format!("{}/{}", p.namespace, p.name),
            "waypoint": w.reference.to_string(),
            "from": w.from.as_str(),
        }))
    });
    services.chain(pods).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{EndpointInput, Objects, Options, ServiceInput, compile};

    #[test]
    fn the_dump_shows_weights_subsets_endpoints_ejections_and_the_report() {
        let dr = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"host": "web", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100}},
              "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}});
        let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"hosts": ["web"], "http": [], "tcp": [{"route": [{"destination": {"host": "web", "subset": "v1"}}]}]}});
        let (drs, vss) = ([dr], [vs]);
        let table = compile(
            Objects {
                destination_rules: &drs,
                virtual_services: &vss,
                tcp_routes: &[],
            },
            vec![ServiceInput {
                namespace: "shop".into(),
                name: "web".into(),
                vips: vec!["10.96.0.1".parse().expect("vip")],
                ports: vec![("tcp".into(), 80)],
                endpoints: vec![EndpointInput {
                    ip: "10.0.0.1".parse().expect("ip"),
                    ports: [("tcp".to_string(), 8080)].into(),
                    labels: [("version".to_string(), "v1".to_string())].into(),
                }],
            }],
            &Options::default(),
        );
        let balancer = Balancer::with_seed(0);
        let now = Instant::now();
        let v1 = table
            .view()
            .into_iter()
            .flat_map(|s| s.destinations)
            .find(|d| d.subset.as_deref() == Some("v1"))
            .expect("v1");
        balancer.failure(&v1, v1.endpoints[0], now);
        let dump = routes_json(&table, &balancer, now);
        let svc = &dump["services"][0];
        assert_eq!(svc["service"], "shop/web");
        assert_eq!(svc["routes"][0]["name"], "VirtualService/shop/web");
        assert_eq!(svc["routes"][0]["rules"][0][0]["weight"], 100);
        assert_eq!(
            svc["routes"][0]["rules"][0][0]["destination"],
            "shop/web/v1"
        );
        let d = svc["destinations"]
            .as_array()
            .expect("destinations")
            .iter()
            .find(|d| d["subset"] == "v1")
            .expect("v1");
        assert_eq!(d["endpoints"][0]["address"], "10.0.0.1:8080");
        assert_eq!(d["endpoints"][0]["ejected"], true);
        assert_eq!(d["policy"]["lb"], "LEAST_REQUEST");
        assert_eq!(dump["objects"][1]["kind"], "VirtualService");
        assert_eq!(dump["objects"][1]["warnings"][0]["field"], "spec.http");
    }
}
