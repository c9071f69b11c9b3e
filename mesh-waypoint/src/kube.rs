//! Kubernetes mode: the waypoint's configuration derived from the node
//! agent's Kubernetes source (`mesh_agent::sync::kube`, run as an
//! observer: every pod remote, nothing enrolled), one snapshot at a time.
//!
//! [`config_from_snapshot`] is the whole decision (pure):
//! - **Fronted services**: those whose waypoint (`istio.io/use-waypoint` on
//!   the Service or its namespace, by Istio's precedence: the agent's
//!   `state::waypoint`, already resolved in the snapshot, in force when
//!   this waypoint's `istio.io/waypoint-for` takes service traffic) is this
//!   one. They keep their cluster IPs: a tunnel to one of them is served.
//! - **Fronted pods**: those whose waypoint (the pod's label or its
//!   namespace's) is this one when it takes workload traffic
//!   (`istio.io/waypoint-for: workload` or `all`): a tunnel to a pod's own
//!   address is served, with the pod as the backend.
//! - **Backends**: the Services the fronted services' routes send to
//!   (HTTPRoute `backendRefs`, VirtualService destinations and mirrors),
//!   without their cluster IPs: reachable as route backends only, never as
//!   a tunnel target (the node agents send only the fronted services here).
//! - **Endpoints**: each ready endpoint with its pod's labels and service
//!   account; pods enrolled in the mesh (ambient) are reached over HBONE.
//! - **Routes**: HTTPRoutes whose `parentRefs` name a fronted Service,
//!   VirtualServices whose `hosts` name one, DestinationRules whose `host`
//!   names a fronted or backend Service.
//! - **Policies**: AuthorizationPolicies with `targetRef`/`targetRefs`
//!   (the waypoint's kind of policy; which apply is decided when they are
//!   compiled).
//!
//! [`follow`] applies a new configuration ([`Shared::reload`]) whenever a
//! snapshot changes it.

use std::{collections::BTreeSet, sync::Arc};

use mesh_agent::state::{ServiceKey as AgentServiceKey, Snapshot, Store, WaypointRef, Workload};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{
        EndpointConfig, GatewayRef, PortProtocol, ServiceConfig, ServicePort, TunnelProtocol,
        WaypointConfig, WorkloadConfig,
    },
    shared::Shared,
};

/// The waypoint this process is: its Gateway's (and Service's) name and
/// namespace.
pub type WaypointName = WaypointRef;

/// The label Kubernetes puts on a Deployment's pods (its ReplicaSet's hash).
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The configuration of waypoint `me` in `snap` (see the module doc).
/// `root_namespace` is Istio's root namespace: its policies that target
/// the `istio-waypoint` GatewayClass apply to this waypoint too.
pub fn config_from_snapshot(
    snap: &Snapshot,
    me: &WaypointName,
    root_namespace: &str,
) -> WaypointConfig {
    let fronted: BTreeSet<AgentServiceKey> = snap
        .services
        .iter()
        .filter(|(_, s)| {
            snap.service_waypoint_in_force(s)
                .is_some_and(|w| w.reference == *me)
        })
        .map(|(k, _)| k.clone())
        .collect();
    let mut routes = Vec::new();
    let mut backends = BTreeSet::new();
    for route in &snap.routing.http_routes {
        let ns = namespace_of(route);
        let attached = array(route, &["spec", "parentRefs"]).any(|p| {
            let group = text(p, "group").unwrap_or("gateway.networking.k8s.io");
            let kind = text(p, "kind").unwrap_or("Gateway");
            (group.is_empty() || group == "core")
                && kind == "Service"
                && text(p, "name").is_some_and(|name| {
                    fronted.contains(&key(text(p, "namespace").unwrap_or(ns), name))
                })
        });
        if !attached {
            continue;
        }
        for rule in array(route, &["spec", "rules"]) {
            for b in array(rule, &["backendRefs"]) {
                let kind = text(b, "kind").unwrap_or("Service");
                if let (Some(name), "Service") = (text(b, "name"), kind) {
                    backends.insert(key(text(b, "namespace").unwrap_or(ns), name));
                }
            }
        }
        routes.push(route.clone());
    }
    for vs in &snap.routing.virtual_services {
        let ns = namespace_of(vs);
        let attached = array(vs, &["spec", "hosts"])
            .filter_map(serde_json::Value::as_str)
            .any(|h| fronted.contains(&host_key(h, ns)));
        if !attached {
            continue;
        }
        for http in array(vs, &["spec", "http"]) {
            let mirror = http.get("mirror").into_iter();
            let routed = array(http, &["route"]).filter_map(|r| r.get("destination"));
            for dest in routed.chain(mirror) {
                if let Some(host) = text(dest, "host") {
                    backends.insert(host_key(host, ns));
                }
            }
        }
        routes.push(vs.clone());
    }
    let known = |k: &AgentServiceKey| fronted.contains(k) || backends.contains(k);
    for dr in &snap.routing.destination_rules {
        let ns = namespace_of(dr);
        if text_at(dr, &["spec", "host"]).is_some_and(|h| known(&host_key(h, ns))) {
            routes.push(dr.clone());
        }
    }
    let services = snap
        .services
        .iter()
        .filter(|(k, _)| known(k))
        .map(|(k, s)| service_config(snap, s, fronted.contains(k)))
        .collect();
    let policies = snap
        .policies
        .authorization
        .iter()
        .filter(|p| {
            p.get("spec")
                .is_some_and(|s| s.get("targetRef").is_some() || s.get("targetRefs").is_some())
        })
        .filter_map(to_yaml)
        .collect();
    let workloads = snap
        .workloads
        .values()
        .filter(|p| {
            snap.pod_waypoint_in_force(p)
                .is_some_and(|w| w.reference == *me)
        })
        .map(workload_config)
        .collect();
    WaypointConfig {
        services,
        workloads,
        routes: routes.iter().filter_map(to_yaml).collect(),
        policies,
        gateway: Some(GatewayRef {
            name: me.name.clone(),
            namespace: me.namespace.clone(),
        }),
        root_namespace: Some(root_namespace.to_owned()),
    }
}

/// One Service as the waypoint needs it: its TCP ports, its ready
/// endpoints with their pods' labels, and its cluster IPs when `fronted`.
fn service_config(snap: &Snapshot, s: &mesh_agent::state::Service, fronted: bool) -> ServiceConfig {
    let tcp: Vec<&mesh_agent::state::ServicePort> =
        s.ports.iter().filter(|p| p.protocol == "TCP").collect();
    let ports = tcp
        .iter()
        .map(|p| ServicePort {
            port: p.port,
            // The endpoints' port for this service port (the first
            // endpoint's; a single-port service's endpoints carry theirs).
            target_port: s
                .endpoints
                .iter()
                .find_map(|e| e.ports.get(&p.name).copied()),
            protocol: PortProtocol::Auto,
        })
        .collect();
    let single = (tcp.len() == 1).then(|| tcp[0].name.as_str());
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| {
            let pod = e.workload.as_ref().and_then(|k| snap.workloads.get(k));
            EndpointConfig {
                address: e.ip,
                port: single.and_then(|name| e.ports.get(name).copied()),
                workload: pod.map(workload_name),
                service_account: pod.map(|w| w.service_account.clone()),
                labels: pod.map(|w| w.labels.clone()).unwrap_or_default(),
                tunnel: pod.map_or(TunnelProtocol::None, tunnel_of),
                hbone_port: None,
            }
        })
        .collect();
    ServiceConfig {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        addresses: if fronted { s.vips.clone() } else { Vec::new() },
        ports,
        endpoints,
    }
}

/// How the waypoint reaches pod `w`: over HBONE when it is enrolled in
/// the mesh (its agent requires mTLS), else in plaintext.
fn tunnel_of(w: &Workload) -> TunnelProtocol {
    if w.enrolled {
        TunnelProtocol::Hbone
    } else {
        TunnelProtocol::None
    }
}

/// A pod whose workload traffic this waypoint takes.
fn workload_config(w: &Workload) -> WorkloadConfig {
    WorkloadConfig {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.ips.clone(),
        workload: Some(workload_name(w)),
        service_account: Some(w.service_account.clone()),
        labels: w.labels.clone(),
        tunnel: tunnel_of(w),
        hbone_port: None,
        protocol: PortProtocol::Auto,
    }
}

/// The pod's workload name for telemetry: its Deployment's (the pod name
/// without the ReplicaSet and pod suffixes), else the pod's.
fn workload_name(w: &Workload) -> String {
    w.labels
        .get(POD_TEMPLATE_HASH)
        .and_then(|hash| w.name.split_once(&format!("-{hash}-")))
        .map_or_else(|| w.name.clone(), |(deployment, _)| deployment.to_owned())
}

fn key(namespace: &str, name: &str) -> AgentServiceKey {
    AgentServiceKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// An Istio host (`name`, `name.ns`, `name.ns.svc[.cluster.local]`) as a
/// Service key, `ns` when it does not say.
fn host_key(host: &str, ns: &str) -> AgentServiceKey {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default();
    key(parts.next().unwrap_or(ns), name)
}

fn text<'v>(v: &'v serde_json::Value, field: &str) -> Option<&'v str> {
    v.get(field).and_then(serde_json::Value::as_str)
}

fn text_at<'v>(v: &'v serde_json::Value, path: &[&str]) -> Option<&'v str> {
    path.iter()
        .try_fold(v, |v, f| v.get(f))
        .and_then(serde_json::Value::as_str)
}

fn array<'v>(
    v: &'v serde_json::Value,
    path: &[&str],
) -> impl Iterator<Item = &'v serde_json::Value> + use<'v> {
    path.iter()
        .try_fold(v, |v, f| v.get(f))
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
}

fn namespace_of(v: &serde_json::Value) -> &str {
    text_at(v, &["metadata", "namespace"]).unwrap_or("default")
}

fn to_yaml(v: &serde_json::Value) -> Option<serde_yaml::Value> {
    match serde_yaml::to_value(v) {
        Ok(y) => Some(y),
        Err(e) => {
            tracing::warn!(error = %e, "object not representable as YAML; left out of the waypoint configuration");
            None
        }
    }
}

/// Applies [`config_from_snapshot`] of every snapshot `store` publishes
/// that changes it, until `cancel`; the missing kinds the source reports
/// (CRDs not installed, kinds forbidden) are logged when they change.
pub async fn follow(
    store: Store,
    shared: Arc<Shared>,
    me: WaypointName,
    cancel: CancellationToken,
) {
    let mut rx = store.subscribe();
    let mut last: Option<serde_json::Value> = None;
    let mut missing = Vec::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        let config = config_from_snapshot(&snap, &me, store.root_namespace());
        let now = serde_json::to_value(&config).ok();
        if now.is_none() || now != last {
            let generation = shared.reload(&config);
            tracing::info!(
                waypoint = %me,
                snapshot = snap.generation,
                generation,
                services = config.services.iter().filter(|s| !s.addresses.is_empty()).count(),
                backends = config.services.iter().filter(|s| s.addresses.is_empty()).count(),
                routes = config.routes.len(),
                policies = config.policies.len(),
                "waypoint configuration from kubernetes"
            );
            last = now;
        }
        let kinds: Vec<String> = store
            .missing_kinds()
            .iter()
            .map(|m| format!("{}:{}", m.resource, m.reason.as_str()))
            .collect();
        if kinds != missing {
            if !kinds.is_empty() {
                tracing::warn!(
                    kinds = %kinds.join(","),
                    "kinds not read from the API server (CRD not installed, or forbidden by RBAC): objects of these kinds do not configure the waypoint"
                );
            }
            missing = kinds;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests;
