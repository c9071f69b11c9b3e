//! Operator-facing surfaces: logging and the access log, Prometheus
//! metrics, the admin endpoint (`/config_dump`, `/logging`, `/stats`,
//! `/connections`), readiness — everything an operator reads to see what
//! the mesh does on a node without reading code.
//!
//! [`Admin`] holds the shared state; the agent creates one at start, serves
//! it ([`Admin::start`]) and registers its parts' views. The proxy reports
//! through [`Telemetry`] (`admin.telemetry()`, from [`crate::telemetry`]);
//! admin serves what it collects and adds its own collectors
//! ([`collectors`]) to its metrics registry. Nothing but `agent.rs` and
//! `cli` imports this module.
#![forbid(unsafe_code)]

pub mod certs;
pub mod collectors;
pub mod config_dump;
pub mod kernel;
pub mod logging;
pub mod readiness;
pub mod routes;
pub mod server;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    time::{Instant, SystemTime},
};

use serde_json::{Value, json};

pub use certs::{CertificateInfo, CertificateSource, Certificates};
pub use config_dump::ConfigDump;
pub use kernel::{KernelSource, PinnedKernel};
pub use readiness::{BlockReady, Readiness};
pub use server::AdminState;

use crate::{
    datapath::LoadSummary,
    pods::ReconcileReport,
    state::{Snapshot, Store, WorkloadKey},
    telemetry::{Metrics, Telemetry},
};

/// The default admin address (loopback only: it changes the log level).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// The default metrics address when the agent's pod IP is not known
/// (loopback: metrics name every workload and SPIFFE ID of the node, so
/// they are not served to pods or the node's links unless asked for).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15020";
/// The metrics port (on the pod IP, or loopback).
pub const METRICS_PORT: u16 = 15020;
/// The default readiness address (all addresses: kubelet probes the pod
/// IP; it tells ready or not, nothing else).
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";

/// Where the agent serves its HTTP endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// `/config_dump`, `/logging`, `/stats`, `/connections`.
    pub admin_addr: SocketAddr,
    /// `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`.
    pub readiness_addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        // The DEFAULT_*_ADDR constants, as addresses.
        Self {
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
        }
    }
}

/// The addresses the servers actually listen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listeners {
    /// The admin server.
    pub admin: SocketAddr,
    /// The metrics server.
    pub metrics: SocketAddr,
    /// The readiness server.
    pub readiness: SocketAddr,
}

impl std::fmt::Display for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "admin={},metrics={},readiness={}",
            self.admin, self.metrics, self.readiness
        )
    }
}

/// Why the admin servers could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A listen address is taken or not available.
    #[error(
        "cannot listen on {addr} for the {what} endpoint: {source} (is another mesh-agent running in this network namespace? choose another address with {flag})"
    )]
    Bind {
        /// Which endpoint.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The option that sets it.
        flag: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Enrollment as the control loop last reported it.
#[derive(Debug, Default)]
struct EnrollmentState {
    passes: u64,
    generation: u64,
    enrolled: usize,
    failed: BTreeMap<WorkloadKey, String>,
}

/// The agent's observability state: metrics, certificates, readiness,
/// config dump and stats parts, open connections.
#[derive(Clone, Debug)]
pub struct Admin {
    state: Arc<AdminState>,
    kernel: Option<Arc<dyn KernelSource>>,
    enrollment: Arc<RwLock<EnrollmentState>>,
    info: Arc<RwLock<serde_json::Map<String, Value>>>,
    started: Instant,
}

impl Admin {
    /// The state of an agent whose datapath is pinned under `pin_dir`.
    pub fn new(pin_dir: &Path) -> Self {
        Self::with_kernel(Some(Arc::new(PinnedKernel::new(pin_dir.to_owned()))))
    }

    /// The state with the kernel read through `kernel` (none: no kernel
    /// metrics or counters).
    pub fn with_kernel(kernel: Option<Arc<dyn KernelSource>>) -> Self {
        let certificates = Certificates::default();
        let mut metrics = Metrics::new();
        collectors::register(&mut metrics, kernel.clone(), certificates.clone());
        let metrics = Arc::new(metrics);
        let admin = Self {
            state: Arc::new(AdminState {
                config_dump: ConfigDump::new(),
                stats: ConfigDump::new(),
                telemetry: Telemetry::new(metrics),
                certificates,
                readiness: Readiness::new(),
                log: logging::LogControl::global(),
            }),
            kernel,
            enrollment: Arc::default(),
            info: Arc::default(),
            started: Instant::now(),
        };
        admin.register_builtin();
        admin
    }

    /// The same state with another log control (tests).
    pub fn with_log(mut self, log: logging::LogControl) -> Self {
        let mut state = (*self.state).clone();
        state.log = log;
        self.state = Arc::new(state);
        self
    }

    /// What the routes serve from.
    pub fn state(&self) -> &Arc<AdminState> {
        &self.state
    }

    /// What the proxy reports through.
    pub fn telemetry(&self) -> &Telemetry {
        &self.state.telemetry
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.telemetry.metrics
    }

    /// The agent's certificates (set their source with [`Certificates::set_source`]).
    pub fn certificates(&self) -> &Certificates {
        &self.state.certificates
    }

    /// Readiness (block it with [`Readiness::block`]).
    pub fn readiness(&self) -> &Readiness {
        &self.state.readiness
    }

    /// `/config_dump` (register parts with [`ConfigDump::register`]).
    pub fn config_dump(&self) -> &ConfigDump {
        &self.state.config_dump
    }

    /// `/stats` (register parts with [`ConfigDump::register`]).
    pub fn stats(&self) -> &ConfigDump {
        &self.state.stats
    }

    /// Adds `key` to the `agent` part of the config dump (for example
    /// `sources` or `listeners`).
    pub fn set_info(&self, key: &str, value: Value) {
        self.info
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned(), value);
    }

    fn register_builtin(&self) {
        let (state, info, started) = (self.state.clone(), self.info.clone(), self.started);
        let started_at = certs::rfc3339(SystemTime::now());
        self.config_dump().register("agent", move || {
            let mut out = info.read().unwrap_or_else(PoisonError::into_inner).clone();
            let ready = state.readiness.state();
            out.insert("version".into(), env!("CARGO_PKG_VERSION").into());
            out.insert(
                "ready".into(),
                (ready == readiness::ReadyState::Ready).into(),
            );
            let waiting = match ready {
                readiness::ReadyState::Waiting(w) => w,
                readiness::ReadyState::ShuttingDown => vec!["shutdown".into()],
                readiness::ReadyState::Ready => Vec::new(),
            };
            out.insert("waiting_for".into(), waiting.into());
            out.insert("started_at".into(), started_at.clone().into());
            out.insert("uptime_seconds".into(), started.elapsed().as_secs().into());
            out.insert(
                "open_connections".into(),
                state.telemetry.connections.len().into(),
            );
            Value::Object(out)
        });
        let certificates = self.state.certificates.clone();
        self.config_dump().register("ca", move || {
            let now = SystemTime::now();
            certificates.ca().map_or(Value::Null, |ca| {
                json!({
                    "not_before": certs::rfc3339(ca.not_before),
                    "not_after": certs::rfc3339(ca.not_after),
                    "expires_in_seconds": ca.expires_in(now),
                    "state": format!("{:?}", ca.expiry_at(now)),
                })
            })
        });
        let certificates = self.state.certificates.clone();
        self.config_dump().register("issuer", move || {
            certificates.issuer().map_or(Value::Null, |i| i.to_json())
        });
        let certificates = self.state.certificates.clone();
        self.config_dump().register("certificates", move || {
            let now = SystemTime::now();
            certificates.list().iter().map(|c| c.to_json(now)).collect()
        });
        if let Some(kernel) = self.kernel.clone() {
            self.stats()
                .register("kernel", move || kernel::counters_json(kernel.as_ref()));
        }
        let connections = self.state.telemetry.connections.clone();
        self.stats()
            .register("connections", move || json!({ "open": connections.len() }));
        let counters = self.state.telemetry.counters.clone();
        self.stats().register("proxy", move || counters.to_json());
    }

    /// Binds the three servers and serves them on `handle`'s runtime until
    /// it shuts down. Returns the addresses bound (useful with port 0).
    pub fn start(
        &self,
        cfg: &AdminConfig,
        handle: &tokio::runtime::Handle,
    ) -> Result<Listeners, AdminError> {
        let bind = |what, addr: SocketAddr, flag| {
            let map = |source| AdminError::Bind {
                what,
                addr,
                flag,
                source,
            };
            let l = std::net::TcpListener::bind(addr).map_err(map)?;
            l.set_nonblocking(true).map_err(map)?;
            let local = l.local_addr().map_err(map)?;
            let _guard = handle.enter();
            let l = tokio::net::TcpListener::from_std(l).map_err(map)?;
            Ok::<_, AdminError>((l, local))
        };
        let (admin, admin_addr) = bind("admin", cfg.admin_addr, "--admin-addr")?;
        let (metrics, metrics_addr) = bind("metrics", cfg.metrics_addr, "--metrics-addr")?;
        let (ready, ready_addr) = bind("readiness", cfg.readiness_addr, "--readiness-addr")?;
        handle.spawn(server::serve(
            admin,
            self.state.clone(),
            server::admin_route,
            server::ListenerCaps::ADMIN,
        ));
        handle.spawn(server::serve(
            metrics,
            self.state.clone(),
            server::metrics_route,
            server::ListenerCaps::ADMIN,
        ));
        handle.spawn(server::serve(
            ready,
            self.state.clone(),
            server::readiness_route,
            server::ListenerCaps::READINESS,
        ));
        let listeners = Listeners {
            admin: admin_addr,
            metrics: metrics_addr,
            readiness: ready_addr,
        };
        self.set_info(
            "listeners",
            json!({
                "admin": admin_addr.to_string(),
                "metrics": metrics_addr.to_string(),
                "readiness": ready_addr.to_string(),
            }),
        );
        Ok(listeners)
    }

    /// Registers the views of the store: `node`, `workloads` (with each
    /// pod's enrollment as the kernel and the control loop report it),
    /// `services`, `policies`, `routing_objects` and `sources`.
    pub fn register_store(&self, store: &Store) {
        let s = store.clone();
        self.config_dump()
            .register("node", move || node_json(&s.current()));
        let (s, kernel, enrollment) = (store.clone(), self.kernel.clone(), self.enrollment.clone());
        self.config_dump().register("workloads", move || {
            let pods = kernel
                .as_ref()
                .and_then(|k| k.pod_addrs().ok())
                .unwrap_or_default();
            let enrollment = enrollment.read().unwrap_or_else(PoisonError::into_inner);
            workloads_json(&s.current(), &pods, &enrollment.failed)
        });
        let s = store.clone();
        self.config_dump()
            .register("services", move || services_json(&s.current()));
        let s = store.clone();
        self.config_dump().register("policies", move || {
            let snap = s.current();
            let report = &snap.compiled.report;
            json!({
                "authorization": snap.policies.authorization,
                "peer_authentication": snap.policies.peer_authentication,
                "errors": report.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "warnings": report.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        });
        let s = store.clone();
        self.config_dump().register("routing_objects", move || {
            routing_objects_json(&s.current())
        });
        let s = store.clone();
        self.config_dump().register("sources", move || {
            let r = s.rejections();
            let missing: Vec<Value> = s
                .missing_kinds()
                .iter()
                .map(|m| json!({"kind": m.resource, "reason": m.reason.as_str()}))
                .collect();
            json!({ "rejected": r.count, "last_error": r.last_error, "missing_kinds": missing })
        });
        let enrollment = self.enrollment.clone();
        self.config_dump().register("enrollment", move || {
            let e = enrollment.read().unwrap_or_else(PoisonError::into_inner);
            json!({
                "passes": e.passes,
                "generation": e.generation,
                "enrolled": e.enrolled,
                "failed": e.failed.iter().map(|(k, v)| json!({"pod": k.to_string(), "error": v})).collect::<Vec<_>>(),
            })
        });
    }

    /// Registers the `routes` part: the effective routing of the store's
    /// current route table with the proxy's balancer state (issue 11), and
    /// the services and pods whose traffic a waypoint routes instead (issue 12).
    pub fn register_routes(&self, store: &Store, balancer: Arc<crate::routing::Balancer>) {
        let s = store.clone();
        self.config_dump().register("routes", move || {
            let snap = s.current();
            let mut v = routes::routes_json(&snap.routes, &balancer, std::time::Instant::now());
            v["waypoints"] = routes::waypoints_json(&snap);
            v["ignored_pod_waypoints"] = snap
                .ignored_pod_waypoints()
                .iter()
                .map(ToString::to_string)
                .collect();
            v["refused_waypoint_bindings"] = snap
                .refused_waypoint_bindings()
                .iter()
                .map(ToString::to_string)
                .collect();
            v
        });
    }

    /// Registers the `datapath` part: kernel, programs attached, features
    /// probed, pin directory, cgroup and map occupancy.
    pub fn register_datapath(
        &self,
        summary: &LoadSummary,
        features: &[(&'static str, bool)],
        pin_dir: &Path,
        cgroup: &Path,
    ) {
        let fixed = json!({
            "kernel": summary.kernel,
            "programs": summary.programs.iter().map(|(name, readopted)| json!({"name": name, "readopted": readopted})).collect::<Vec<_>>(),
            "features": features.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "pin_dir": pin_dir.display().to_string(),
            "cgroup": cgroup.display().to_string(),
        });
        let kernel = self.kernel.clone();
        self.config_dump().register("datapath", move || {
            let mut out = fixed.clone();
            if let (Some(k), Value::Object(o)) = (&kernel, &mut out) {
                o.insert(
                    "maps".into(),
                    serde_json::to_value(k.occupancy()).unwrap_or(Value::Null),
                );
            }
            out
        });
    }

    /// What the control loop reports through after each enrollment pass;
    /// holds readiness back until the first pass.
    pub fn enrollment_hooks(&self) -> EnrollmentHooks {
        EnrollmentHooks {
            metrics: self.metrics().clone(),
            state: self.enrollment.clone(),
            block: Some(self.readiness().block("workloads")),
        }
    }
}

/// The control loop's reporting: enrolled-pod gauge, enrollment failures
/// for `/config_dump`, and readiness after the first pass.
#[derive(Debug)]
pub struct EnrollmentHooks {
    metrics: Arc<Metrics>,
    state: Arc<RwLock<EnrollmentState>>,
    block: Option<BlockReady>,
}

impl EnrollmentHooks {
    /// An enrollment pass over the snapshot `generation` ended with `report`.
    /// The first call lets readiness go.
    pub fn applied(&mut self, generation: u64, report: &ReconcileReport) {
        self.metrics.set_enrolled_pods(report.enrolled);
        self.metrics.set_enrollment_failed(report.failed.len());
        {
            let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
            s.passes += 1;
            s.generation = generation;
            s.enrolled = report.enrolled;
            s.failed = report.failed.iter().cloned().collect();
        }
        self.block.take();
    }
}

fn node_json(snap: &Snapshot) -> Value {
    json!({
        "name": snap.node.name,
        "probe_sources": snap.node.probe_sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "generation": snap.generation,
    })
}

fn workloads_json(
    snap: &Snapshot,
    pods: &[kernel::KernelPodAddr],
    failed: &BTreeMap<WorkloadKey, String>,
) -> Value {
    snap.workloads
        .iter()
        .map(|(key, w)| {
            let in_kernel = pods.iter().find(|p| w.ips.contains(&p.ip));
            let (status, error) = match (w.enrolled, in_kernel, failed.get(key)) {
                (false, _, _) => ("not enrolled", None),
                (true, Some(_), _) => ("enrolled", None),
                (true, None, Some(e)) => ("failed", Some(e.clone())),
                (true, None, None) => ("pending", None),
            };
            json!({
                "namespace": w.namespace,
                "name": w.name,
                "service_account": w.service_account,
                "uid": w.uid,
                "ips": w.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "netns": w.netns.display().to_string(),
                "cgroup": w.cgroup.as_ref().map(|c| c.display().to_string()),
                "enrolled": w.enrolled,
                "exclude_outbound_ports": w.exclude_outbound_ports,
                "exclude_inbound_ports": w.exclude_inbound_ports,
                "labels": w.labels,
                "status": status,
                "error": error,
                "slot": in_kernel.map(|p| p.slot),
                "netns_cookie": in_kernel.map(|p| p.netns_cookie),
            })
        })
        .collect()
}

/// The traffic-management objects as the sources gave them (raw, like
/// `policies`), with a count per kind.
fn routing_objects_json(snap: &Snapshot) -> Value {
    let r = &snap.routing;
    json!({
        "counts": {
            "destination_rules": r.destination_rules.len(),
            "virtual_services": r.virtual_services.len(),
            "tcp_routes": r.tcp_routes.len(),
            "http_routes": r.http_routes.len(),
        },
        "destination_rules": r.destination_rules,
        "virtual_services": r.virtual_services,
        "tcp_routes": r.tcp_routes,
        "http_routes": r.http_routes,
    })
}

fn services_json(snap: &Snapshot) -> Value {
    snap.services
        .values()
        .map(|s| {
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol})).collect::<Vec<_>>(),
                "endpoints": s.endpoints.iter().map(|e| json!({
                    "ip": e.ip.to_string(),
                    "ports": e.ports,
                    "workload": e.workload.as_ref().map(ToString::to_string),
                    "node": e.node_name,
                })).collect::<Vec<_>>(),
                "waypoint": s.waypoint.as_ref().map(|w| json!({
                    "namespace": w.reference.namespace,
                    "name": w.reference.name,
                    "from": w.from.as_str(),
                })),
            })
        })
        .collect()
}
