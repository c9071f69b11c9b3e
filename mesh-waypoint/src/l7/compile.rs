//! Compiling the route objects (Gateway API `HTTPRoute`, Istio
//! `VirtualService` `http:` and `DestinationRule`) into one [`RouteTable`]:
//! the only place that knows both `route.rs` (the model and the HTTPRoute
//! rules) and `virtual_service.rs` (Istio's routes into that model).

use super::route::{Effect, RouteTable, ServiceKey};
use super::virtual_service;
use crate::config::{RouteObject, ServiceConfig};

impl RouteTable {
    /// Compiles `routes` against the known `services` and their
    /// `destinations` (DestinationRules are the routing engine's: their
    /// problems are reported from its report); a VirtualService without
    /// `exportTo` is exported to `default_export_to` (Istio's
    /// `defaultVirtualServiceExportTo`).
    pub fn build(
        services: &[ServiceConfig],
        destinations: &mesh_routing::RouteTable,
        routes: &[RouteObject],
        default_export_to: &[String],
    ) -> Self {
        let mut table = Self::default();
        let known = virtual_service::Known {
            services,
            destinations,
            default_export_to,
        };
        for route in routes {
            match route {
                RouteObject::Destination(_) => {}
                RouteObject::Http(r) => table.add_route(services, r),
                RouteObject::Virtual(vs) => {
                    virtual_service::add(&mut table, known, vs);
                }
                RouteObject::Invalid { name, reason } => {
                    table.report(name, "kind".into(), reason.clone(), Effect::RouteRejected);
                }
            }
        }
        table.report_destination_rules(destinations.report());
        for entries in table.ports.values_mut() {
            entries.sort_by(|a, b| b.m.rank().cmp(&a.m.rank()).then_with(|| a.tie.cmp(&b.tie)));
        }
        // Istio: HTTPRoutes and VirtualServices on one service port do not
        // merge; a producer HTTPRoute (every client sees it) is used. A
        // consumer route, seen by its own namespace only, cannot take the
        // VirtualServices from the others: `RouteTable::select` decides.
        let shadowed: Vec<(ServiceKey, u16)> = table
            .ordered
            .keys()
            .filter(|k| {
                table.ports.get(*k).is_some_and(|entries| {
                    entries
                        .iter()
                        .any(|e| e.visible == mesh_routing::Export::All)
                })
            })
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

impl RouteTable {
    /// Reports what the routing engine made of each DestinationRule:
    /// applied (accepted), rejected (with the field), and every field it
    /// ignored.
    fn report_destination_rules(&mut self, report: &mesh_routing::Report) {
        use mesh_routing::{Kind, Status};
        for o in report
            .objects
            .iter()
            .filter(|o| o.kind == Kind::DestinationRule)
        {
            let id = format!("{}/{}", o.namespace, o.name);
            match &o.status {
                Status::Applied => self.accepted.push(id.clone()),
                Status::Rejected { field, reason } => {
                    self.report(&id, field.clone(), reason.clone(), Effect::RouteRejected);
                }
                Status::NeedsL7 { reason } | Status::NotApplied { reason } => {
                    self.report(&id, "spec".into(), reason.clone(), Effect::RouteRejected);
                }
            }
            for w in &o.warnings {
                // The engine's wording is the node proxy's: an HTTP-only
                // field is not applied by this waypoint either.
                let reason = if w.message == mesh_routing::NEEDS_L7 {
                    "HTTP settings are not supported by the waypoint yet: ignored".to_owned()
                } else {
                    w.message.clone()
                };
                self.report(&id, w.field.clone(), reason, Effect::Ignored);
            }
        }
    }
}
