//! Compiling the route objects (Gateway API `HTTPRoute`, Istio
//! `VirtualService` `http:` and `DestinationRule`) into one [`RouteTable`]:
//! the only place that knows both `route.rs` (the model and the HTTPRoute
//! rules) and `virtual_service.rs` (Istio's routes into that model).

use super::route::{Effect, RouteTable, ServiceKey};
use super::virtual_service;
use crate::config::{RouteObject, ServiceConfig};

impl RouteTable {
    /// Compiles `routes` against the known `services`.
    pub fn build(services: &[ServiceConfig], routes: &[RouteObject]) -> Self {
        let mut table = Self::default();
        // Subsets first: VirtualServices name them.
        for route in routes {
            if let RouteObject::Destination(dr) = route {
                virtual_service::add_destination_rule(&mut table, dr);
            }
        }
        for route in routes {
            match route {
                RouteObject::Destination(_) => {}
                RouteObject::Http(r) => table.add_route(services, r),
                RouteObject::Virtual(vs) => {
                    virtual_service::add(&mut table, services, vs);
                }
                RouteObject::Invalid { name, reason } => {
                    table.report(name, "kind".into(), reason.clone(), Effect::RouteRejected);
                }
            }
        }
        for entries in table.ports.values_mut() {
            entries.sort_by(|a, b| b.m.rank().cmp(&a.m.rank()).then_with(|| a.tie.cmp(&b.tie)));
        }
        // Istio: HTTPRoutes and VirtualServices on one service port do not
        // merge; the HTTPRoutes are used.
        let shadowed: Vec<(ServiceKey, u16)> = table
            .ordered
            .keys()
            .filter(|k| table.ports.contains_key(*k))
            .cloned()
            .collect();
        for (svc, port) in shadowed {
            let routes: Vec<String> = table.ordered[&(svc.clone(), port)]
                .iter()
                .map(|e| e.rule.route.clone())
                .collect();
            for route in routes {
                let reason =
                    format!("Service {svc} port {port} also has HTTPRoutes, which take precedence");
                table.report(
                    &route,
                    "spec.hosts".into(),
                    reason,
                    Effect::ParentNotAttached,
                );
            }
            table.ordered.remove(&(svc, port));
        }
        table
    }
}
