//! Istio-compatible L4 traffic management for the mesh agent (and, later,
//! its L7 waypoint): `networking.istio.io/v1` `DestinationRule` and
//! `VirtualService` (`tcp:` routes), and Gateway API `TCPRoute`
//! (`v1alpha2`) attached to a `Service` (GAMMA), compiled with the mesh's
//! services into an immutable [`RouteTable`]; plus the runtime
//! [`Balancer`] state (connection counts, outlier ejection, cursors) that
//! survives recompiles.
//!
//! A connection to a service VIP:port is routed in two steps, both cheap
//! and independent of how many routes the mesh has:
//! [`RouteTable::route`] (VIP lookup, the first visible route set, the
//! first matching rule, a weighted pick of a destination: a service port,
//! optionally a subset) and [`Balancer::pick`] (an endpoint of the
//! destination by its load-balancing policy, within `maxConnections`,
//! skipping ejected endpoints). A connection to anything else (a pod IP) is
//! not routed.
//!
//! ```
//! use std::{collections::BTreeMap, time::Instant};
//! use mesh_routing::{Balancer, EndpointInput, Objects, Options, Request, ServiceInput, compile};
//!
//! let dr: serde_json::Value = serde_json::json!({
//!   "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
//!   "metadata": {"name": "web", "namespace": "shop"},
//!   "spec": {"host": "web", "subsets": [
//!     {"name": "v1", "labels": {"version": "v1"}},
//!     {"name": "v2", "labels": {"version": "v2"}}]}});
//! let vs: serde_json::Value = serde_json::json!({
//!   "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
//!   "metadata": {"name": "web", "namespace": "shop"},
//!   "spec": {"hosts": ["web.shop.svc.cluster.local"], "tcp": [{"route": [
//!     {"destination": {"host": "web", "subset": "v2"}, "weight": 100}]}]}});
//! let ep = |ip: &str, v: &str| EndpointInput {
//!     ip: ip.parse().unwrap(),
//!     ports: BTreeMap::from([("tcp".to_string(), 8080)]),
//!     labels: BTreeMap::from([("version".to_string(), v.to_string())]),
//! };
//! let web = ServiceInput {
//!     namespace: "shop".into(), name: "web".into(),
//!     vips: vec!["10.96.0.10".parse().unwrap()],
//!     ports: vec![("tcp".into(), 80)],
//!     endpoints: vec![ep("10.0.0.1", "v1"), ep("10.0.0.2", "v2")],
//! };
//! let (drs, vss) = ([dr], [vs]);
//! let objects = Objects { destination_rules: &drs, virtual_services: &vss, tcp_routes: &[] };
//! let table = compile(objects, vec![web], &Options::default());
//! assert!(table.report().is_clean());
//! let labels = BTreeMap::new();
//! let req = Request {
//!     destination: "10.96.0.10:80".parse().unwrap(),
//!     source: "10.0.1.5".parse().unwrap(),
//!     source_namespace: "shop",
//!     source_labels: &labels,
//! };
//! let balancer = Balancer::with_seed(7);
//! let routed = table.route(&req, balancer.random()).unwrap().unwrap();
//! assert_eq!(routed.route.as_deref(), Some("VirtualService/shop/web"));
//! assert_eq!(routed.dest.subset.as_deref(), Some("v2"));
//! let pick = balancer.pick(&routed.dest, req.source, req.destination, Instant::now(), &[]).unwrap();
//! assert_eq!(pick.endpoint.to_string(), "10.0.0.2:8080");
//! ```
//!
//! # Semantics and deviations
//!
//! - Hosts: `name` (in the object's namespace), `name.namespace`,
//!   `name.namespace.svc` and `name.namespace.svc.<cluster domain>`.
//!   Wildcards are reported and not applied.
//! - Several objects for one service: the one in the client's namespace,
//!   else the service's namespace, else the root namespace, else the first
//!   by namespace/name, among those whose `exportTo` includes the client's
//!   namespace (a VirtualService without one: `Options::
//!   default_virtual_service_export_to`, Istio's `defaultVirtualServiceExportTo`).
//! - Policy merge as Istio's `MergeTrafficPolicy`: subset settings replace
//!   the rule's setting by setting; a matching `portLevelSettings` entry
//!   replaces all of them (what it leaves out takes the default).
//! - Default load balancing is LEAST_REQUEST (Istio's), ties broken in
//!   turn; LEAST_REQUEST is exact (fewest active connections of the node's
//!   agent), not Envoy's power-of-two sample.
//! - Outlier detection: a connect failure, connect timeout or tunnel 503
//!   counts as both a gateway and a 5xx error, so the lower enabled of
//!   `consecutiveGatewayErrors` and `consecutive5xxErrors` (default 5)
//!   ejects; ejection is immediate and re-admission happens at the first
//!   pick after `baseEjectionTime` × times ejected (at most 300 s or the
//!   base), rather than at Istio's `interval` sweep; the multiplier decays
//!   by one per `interval` the endpoint stays healthy after re-admission. `maxEjectionPercent`
//!   of a destination's endpoints (default 10 %, at least one) may be
//!   ejected at once. With every endpoint ejected, connections fail
//!   (Istio's default `minHealthPercent` 0: no panic mode).
//! - L7-only fields (`http:`/`tls:` routes, `connectionPool.http`,
//!   header/cookie hashing, `tls` origination, ...) are listed as warnings
//!   in the [`Report`]; a VirtualService with only L7 routes is
//!   [`Status::NeedsL7`] and not applied.
//! - TCPRoute: `parentRefs` of kind `Service` attach it (optionally to one
//!   port); other parents are reported. Only the first rule applies. As
//!   in GAMMA, a route in the service's namespace applies to every client,
//!   one in another namespace to the clients of its own namespace only.
//!   Cross-namespace `backendRefs` need a ReferenceGrant, which is not
//!   read: they are refused (connections routed there fail with a reason).
//! - Objects are not merged: one route object and one DestinationRule
//!   apply per client and service; the shadowed ones carry a warning. A
//!   DestinationRule with `workloadSelector` is not applied.
#![forbid(unsafe_code)]

mod balancer;
pub mod bench;
pub mod model;
mod policy;
mod report;
mod table;
#[cfg(test)]
mod tests;

pub use balancer::{Balancer, Ejection, EndpointStatus, HttpOutcome, Pick, PickError, mix};
pub use policy::{DEFAULT_CONNECT_TIMEOUT, Lb, MAX_EJECTION_TIME, Outlier, Policy};
pub use report::{Kind, ObjectReport, Report, Status, Warning};
pub use table::{
    Dest, EndpointInput, Export, Invalid, MAX_SUBSETS, NEEDS_L7, Objects, Options, Request,
    RouteError, RouteTable, RouteView, Routed, ServiceInput, ServiceView, WeightView, compile,
    validate,
};
