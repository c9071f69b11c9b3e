//! A criterion-free micro-benchmark of a routing decision
//! ([`RouteTable::route`] + [`Balancer::pick`]), callable from `cargo xtask
//! bench`: it shows that the cost does not grow with the number of routes
//! in the mesh.

use std::{
    collections::BTreeMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    Balancer, EndpointInput, Objects, Options, Request, RouteTable, ServiceInput, compile,
};

/// Result of [`bench_decision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchResult {
    /// Services with a VirtualService 80/20 split and a DestinationRule (two subsets) each.
    pub routes_in_mesh: usize,
    /// Decisions run.
    pub iterations: usize,
    /// Total time.
    pub total: Duration,
}

impl BenchResult {
    /// Mean time of one decision.
    pub fn per_decision(&self) -> Duration {
        self.total / u32::try_from(self.iterations.max(1)).unwrap_or(u32::MAX)
    }
}

fn vip(i: usize) -> IpAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    IpAddr::V4(Ipv4Addr::from(0x0A60_0000 + i))
}

/// A mesh of `n_routes` services, each with 4 endpoints (2 `v1`, 2 `v2`),
/// a DestinationRule (subsets v1/v2, LEAST_REQUEST) and a VirtualService
/// splitting 80/20.
pub fn mesh(n_routes: usize) -> RouteTable {
    let mut services = Vec::with_capacity(n_routes);
    let mut drs = Vec::with_capacity(n_routes);
    let mut vss = Vec::with_capacity(n_routes);
    for i in 0..n_routes {
        let ns = format!("ns-{}", i / 100);
        let name = format!("svc-{i}");
        let endpoints = (0..4u32)
            .map(|e| EndpointInput {
                ip: IpAddr::V4(Ipv4Addr::from(
                    0x0A00_0000 + (u32::try_from(i).unwrap_or(0) << 2) + e,
                )),
                ports: BTreeMap::from([("tcp".to_string(), 8080)]),
                labels: BTreeMap::from([(
                    "version".to_string(),
                    if e < 2 { "v1" } else { "v2" }.to_string(),
                )]),
            })
            .collect();
        services.push(ServiceInput {
            namespace: ns.clone(),
            name: name.clone(),
            vips: vec![vip(i)],
            ports: vec![("tcp".into(), 80)],
            endpoints,
        });
        drs.push(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"host": name, "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
              "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}));
        vss.push(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"hosts": [name], "tcp": [{"route": [
              {"destination": {"host": name, "subset": "v1"}, "weight": 80},
              {"destination": {"host": name, "subset": "v2"}, "weight": 20}]}]}}),
        );
    }
    compile(
        Objects {
            destination_rules: &drs,
            virtual_services: &vss,
            tcp_routes: &[],
        },
        services,
        &Options::default(),
    )
}

/// Times `iterations` decisions (route + pick, the pick released at once)
/// for connections to one service of a mesh of `n_routes` routed services.
pub fn bench_decision(n_routes: usize, iterations: usize) -> BenchResult {
    let table = mesh(n_routes.max(1));
    let balancer = Balancer::with_seed(1);
    let labels = BTreeMap::new();
    let req = Request {
        destination: SocketAddr::new(vip(n_routes / 2), 80),
        source: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
        source_namespace: "client",
        source_labels: &labels,
    };
    let now = Instant::now();
    let start = Instant::now();
    for _ in 0..iterations {
        if let Some(Ok(routed)) = table.route(black_box(&req), balancer.random()) {
            let pick = balancer.pick(&routed.dest, req.source, req.destination, now, &[]);
            black_box(&pick);
        }
    }
    BenchResult {
        routes_in_mesh: n_routes,
        iterations,
        total: start.elapsed(),
    }
}
