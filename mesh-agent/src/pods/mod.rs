//! Per-pod enrollment: the in-pod listeners, the map entries that make the
//! kernel programs capture the pod, and the pod's `sk_lookup` link.
//!
//! Order matters so that no step opens a window of leaked plaintext or of
//! spurious drops: enrolling opens the listeners first, then publishes the
//! inbound steering (listener, addresses, `sk_lookup`), and only then the
//! outbound capture (netns cookie). Un-enrolling runs the same steps backwards.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use aya::maps::{HashMap, MapData, SockMap};
use mesh_common::{
    INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, IpKey, LISTENER_HBONE, LISTENER_PLAINTEXT,
    LISTENERS_PER_POD, MAX_PODS, OUTBOUND_PORT, PodSlot, PortKey, direction, maps,
};
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::{
        Datapath, DatapathError, ip_key,
        netns::{self, NetnsError, NetnsId, NetnsWorker, ReservedNetns},
    },
    identity::SpiffeId,
    proxy::{PodContext, PodListeners, Proxy},
    state::{Snapshot, Workload, WorkloadKey},
};

/// Why a pod could not be enrolled. Other pods are not affected.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The pod's network namespace cannot be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// An in-pod listener cannot be opened.
    #[error(
        "cannot open the in-pod listener {addr}: {source} (is something in the pod already bound to it?)"
    )]
    Listener {
        /// The listener address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A datapath (map, link) operation failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// All pod slots are taken.
    #[error("this agent already enrolls {MAX_PODS} pods, its maximum")]
    SlotsExhausted,
    /// The pod's namespace or service account cannot form a SPIFFE identity.
    #[error("the pod has no valid identity: {0}")]
    Identity(#[from] crate::identity::SpiffeIdError),
    /// The pod's netns is the agent's or the host's: enrolling it would
    /// capture the node's own processes under the pod's identity.
    #[error(
        "the pod's network namespace {} ({id}) is {what}: refusing to enroll it, which would capture the node's own traffic under the pod's identity; give the pod's own netns path",
        path.display()
    )]
    ReservedNetns {
        /// The pod's netns path.
        path: std::path::PathBuf,
        /// The namespace it names.
        id: NetnsId,
        /// Which reserved namespace it is.
        what: &'static str,
    },
    /// Another pod claims the same netns.
    #[error(
        "the pod's network namespace {} ({id}) is also claimed by pod {other}: one netns cannot carry two pods' identities, so this pod is refused (a pod already enrolled keeps working); check both pods' netns paths",
        path.display()
    )]
    SharedNetns {
        /// The pod's netns path.
        path: std::path::PathBuf,
        /// The namespace it names.
        id: NetnsId,
        /// The other pod claiming it.
        other: WorkloadKey,
    },
}

struct EnrolledPod {
    workload: Workload,
    identity: SpiffeId,
    cookie: u64,
    /// The netns it is enrolled in (no other pod may claim it).
    netns_id: NetnsId,
    slot: u32,
    cancel: CancellationToken,
    /// Duplicates of the listener fds, to shut them down synchronously on
    /// un-enrollment (so a re-enrollment can bind the same ports at once).
    listener_fds: Vec<std::net::TcpListener>,
    _worker: Arc<NetnsWorker>,
}

/// The result of one reconciliation.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Pods enrolled after the pass.
    pub enrolled: usize,
    /// Pods newly enrolled in this pass.
    pub added: Vec<WorkloadKey>,
    /// Pods un-enrolled in this pass.
    pub removed: Vec<WorkloadKey>,
    /// Pods that should be enrolled but are not, with why.
    pub failed: Vec<(WorkloadKey, String)>,
}

/// Keeps the kernel's view of enrolled pods equal to the store's.
pub struct Enroller {
    dp: Datapath,
    enrolled_netns: HashMap<MapData, u64, PodSlot>,
    pod_addrs: HashMap<MapData, IpKey, PodSlot>,
    excluded: HashMap<MapData, PortKey, u8>,
    probe_sources: HashMap<MapData, IpKey, u8>,
    listeners: SockMap<MapData>,
    pods: BTreeMap<WorkloadKey, EnrolledPod>,
    free_slots: Vec<u32>,
    proxy: Proxy,
    reserved: ReservedNetns,
}

impl Enroller {
    /// Takes the maps it writes out of the datapath.
    pub fn new(mut dp: Datapath, proxy: Proxy) -> Result<Self, DatapathError> {
        Ok(Self {
            enrolled_netns: dp.take_map(maps::ENROLLED_NETNS)?,
            pod_addrs: dp.take_map(maps::POD_ADDRS)?,
            excluded: dp.take_map(maps::EXCLUDED_PORTS)?,
            probe_sources: dp.take_map(maps::PROBE_SOURCES)?,
            listeners: dp.take_map(maps::INBOUND_LISTENERS)?,
            dp,
            pods: BTreeMap::new(),
            free_slots: (0..MAX_PODS).rev().collect(),
            proxy,
            reserved: ReservedNetns::new(std::path::Path::new("/proc")),
        })
    }

    /// Also refuses the host's netns as seen through `proc_root` (the host's
    /// `/proc` mounted in the agent's container, where `/proc/1` is not the
    /// host's init).
    pub fn refuse_host_netns(&mut self, proc_root: &std::path::Path) {
        self.reserved.add(
            &proc_root.join("1/ns/net"),
            "the host's network namespace (init's)",
        );
    }

    /// Makes the enrolled set equal to the snapshot's enrolled pods, then
    /// removes kernel state no current pod owns (left by a previous agent or
    /// a failed step).
    pub fn reconcile(&mut self, snap: &Snapshot) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let desired: BTreeMap<&WorkloadKey, &Workload> = snap
            .workloads
            .iter()
            .filter(|(_, w)| w.enrolled && w.is_local(&snap.node))
            .collect();

        let stale: Vec<WorkloadKey> = self
            .pods
            .iter()
            .filter(|(k, p)| desired.get(k).is_none_or(|w| **w != p.workload))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            let Some(pod) = self.pods.remove(&key) else {
                continue;
            };
            match desired.get(&key) {
                // Same netns: update in place. Capture never lapses (no
                // plaintext window) and the listeners keep their sockets.
                Some(w) if w.netns == pod.workload.netns => {
                    let mut pod = pod;
                    match self.update(&mut pod, w) {
                        Ok(()) => tracing::info!(pod = %key, ips = ?w.ips, "pod updated"),
                        Err(e) => {
                            tracing::error!(pod = %key, error = %e, "pod update failed; keeping its previous settings");
                            report.failed.push((key.clone(), e.to_string()));
                        }
                    }
                    self.pods.insert(key, pod);
                }
                Some(_) => {
                    self.unenroll(pod);
                    tracing::info!(pod = %key, "pod moved to another netns; re-enrolling");
                }
                None => {
                    self.unenroll(pod);
                    tracing::info!(pod = %key, "pod unenrolled");
                    report.removed.push(key);
                }
            }
        }
        // The pods to enroll now, with the netns each names: no two pods
        // may share one (the kernel knows a netns by its cookie only), and
        // none may be the agent's or the host's.
        // (Identified one at a time, without holding the files open.)
        let new: Vec<(&WorkloadKey, &Workload, Result<NetnsId, NetnsError>)> = desired
            .iter()
            .filter(|(k, _)| !self.pods.contains_key(**k))
            .map(|(k, w)| (*k, *w, netns::open(&w.netns).map(|(_, id)| id)))
            .collect();
        let mut claims: std::collections::HashMap<NetnsId, Vec<&WorkloadKey>> =
            std::collections::HashMap::new();
        for (key, _, opened) in &new {
            if let Ok(id) = opened {
                claims.entry(*id).or_default().push(key);
            }
        }
        for (key, workload, opened) in new {
            let checked = opened.map_err(EnrollError::from).and_then(|id| {
                self.check_netns(key, workload, id, &claims)?;
                Ok(id)
            });
            match checked.and_then(|id| self.enroll(workload, id)) {
                Ok(pod) => {
                    tracing::info!(
                        pod = %key,
                        netns = %workload.netns.display(),
                        netns_cookie = pod.cookie,
                        slot = pod.slot,
                        ips = ?workload.ips,
                        "pod enrolled"
                    );
                    self.pods.insert(key.clone(), pod);
                    report.added.push(key.clone());
                }
                Err(e) => {
                    tracing::error!(pod = %key, error = %e, "pod enrollment failed");
                    report.failed.push((key.clone(), e.to_string()));
                }
            }
        }
        if let Err(e) = self.sync_probe_sources(&snap.node.probe_sources) {
            tracing::error!(error = %e, "cannot update probe sources");
        }
        if let Err(e) = self.sweep() {
            tracing::error!(error = %e, "cannot remove stale datapath state");
        }
        // Forget certificates and TLS configurations of pods no longer here.
        let identities: Vec<SpiffeId> = self.pods.values().map(|p| p.identity.clone()).collect();
        self.proxy.retain_identities(&identities);
        report.enrolled = self.pods.len();
        report
    }

    /// Refuses a netns that is reserved (the agent's, the host's), enrolled
    /// for another pod, or claimed by another pod of this pass (`claims`).
    fn check_netns(
        &self,
        key: &WorkloadKey,
        w: &Workload,
        id: NetnsId,
        claims: &std::collections::HashMap<NetnsId, Vec<&WorkloadKey>>,
    ) -> Result<(), EnrollError> {
        if let Some(what) = self.reserved.reserved(id) {
            return Err(EnrollError::ReservedNetns {
                path: w.netns.clone(),
                id,
                what,
            });
        }
        let enrolled = self
            .pods
            .iter()
            .find(|(k, p)| *k != key && p.netns_id == id)
            .map(|(k, _)| k);
        let arriving = claims
            .get(&id)
            .and_then(|keys| keys.iter().find(|k| **k != key).copied());
        match enrolled.or(arriving) {
            Some(other) => Err(EnrollError::SharedNetns {
                path: w.netns.clone(),
                id,
                other: other.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Enrolls a pod in the netns `netns_id` (checked): the worker enters
    /// that namespace, or nothing if the path names another one by now.
    fn enroll(&mut self, w: &Workload, netns_id: NetnsId) -> Result<EnrolledPod, EnrollError> {
        let identity = SpiffeId::new(self.proxy.trust_domain(), &w.namespace, &w.service_account)?;
        let (ns, id) = netns::open(&w.netns)?;
        if id != netns_id {
            return Err(NetnsError::Changed(w.netns.clone()).into());
        }
        let worker = Arc::new(NetnsWorker::spawn_in(&w.name, &w.netns, ns)?);
        let (listeners, cookie) = worker.run_blocking(open_listeners)??;
        // The same namespace under another (dev, ino) cannot happen; the
        // cookie is what the kernel keys capture on, so check it too.
        if let Some((other, _)) = self.pods.iter().find(|(_, p)| p.cookie == cookie) {
            return Err(EnrollError::SharedNetns {
                path: w.netns.clone(),
                id: netns_id,
                other: other.clone(),
            });
        }
        let listener_fds = listeners
            .outbound
            .iter()
            .chain([&listeners.inbound_plaintext, &listeners.inbound_hbone])
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| EnrollError::Listener {
                addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
                source,
            })?;
        let slot = self.free_slots.pop().ok_or(EnrollError::SlotsExhausted)?;
        let result = self.publish(w, cookie, slot, &listeners);
        if let Err(e) = result {
            self.withdraw(w, cookie, slot);
            self.free_slots.push(slot);
            return Err(e);
        }
        let cancel = self.serve(w, &identity, cookie, &worker, listeners);
        Ok(EnrolledPod {
            workload: w.clone(),
            identity,
            cookie,
            netns_id,
            slot,
            cancel,
            listener_fds,
            _worker: worker,
        })
    }

    /// Starts the proxy on a pod's listeners; returns what stops it.
    fn serve(
        &self,
        w: &Workload,
        identity: &SpiffeId,
        cookie: u64,
        worker: &Arc<NetnsWorker>,
        listeners: PodListeners,
    ) -> CancellationToken {
        let cancel = CancellationToken::new();
        let ctx = Arc::new(PodContext {
            key: w.key(),
            ips: w.ips.clone(),
            netns_cookie: cookie,
            worker: worker.clone(),
            identity: identity.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
        });
        self.proxy.serve_pod(ctx, listeners, cancel.clone());
        cancel
    }

    /// Applies a changed workload (same netns) without un-enrolling: new map
    /// entries are written (stale ones go in the sweep), and the accept loops
    /// restart with the new context on the same listening sockets, whose
    /// queued connections are not lost.
    fn update(&mut self, pod: &mut EnrolledPod, w: &Workload) -> Result<(), EnrollError> {
        let identity = SpiffeId::new(self.proxy.trust_domain(), &w.namespace, &w.service_account)?;
        let listeners =
            pod_listeners(&pod.listener_fds).map_err(|source| EnrollError::Listener {
                addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
                source,
            })?;
        self.publish(w, pod.cookie, pod.slot, &listeners)?;
        pod.cancel.cancel();
        pod.cancel = self.serve(w, &identity, pod.cookie, &pod._worker, listeners);
        pod.workload = w.clone();
        pod.identity = identity;
        Ok(())
    }

    /// Writes the pod's kernel state: inbound first, outbound capture last.
    fn publish(
        &mut self,
        w: &Workload,
        cookie: u64,
        slot: u32,
        l: &PodListeners,
    ) -> Result<(), EnrollError> {
        let value = PodSlot {
            slot,
            _pad: 0,
            netns_cookie: cookie,
        };
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| DatapathError::Map {
                map,
                message: e.to_string(),
            }
        };
        for (kind, listener) in [
            (LISTENER_PLAINTEXT, &l.inbound_plaintext),
            (LISTENER_HBONE, &l.inbound_hbone),
        ] {
            self.listeners
                .set(slot * LISTENERS_PER_POD + kind, listener, 0)
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
        }
        for (ports, dir) in [
            (&w.exclude_outbound_ports, direction::OUTBOUND),
            (&w.exclude_inbound_ports, direction::INBOUND),
        ] {
            for port in ports {
                let key = PortKey {
                    netns_cookie: cookie,
                    port: *port,
                    direction: dir,
                    _pad: [0; 5],
                };
                self.excluded
                    .insert(&key, &1, 0)
                    .map_err(map_err(maps::EXCLUDED_PORTS))?;
            }
        }
        for ip in &w.ips {
            self.pod_addrs
                .insert(&ip_key(*ip), &value, 0)
                .map_err(map_err(maps::POD_ADDRS))?;
        }
        let ns = File::open(&w.netns).map_err(|source| NetnsError::Open {
            path: w.netns.clone(),
            source,
        })?;
        self.dp.attach_sk_lookup(&ns, cookie)?;
        self.enrolled_netns
            .insert(&cookie, &value, 0)
            .map_err(map_err(maps::ENROLLED_NETNS))?;
        Ok(())
    }

    /// Removes the pod's kernel state: outbound capture first. Best effort:
    /// every step runs; failures are logged (the sweep retries them).
    fn withdraw(&mut self, w: &Workload, cookie: u64, slot: u32) {
        let log = |what: &str, r: Result<(), String>| {
            if let Err(e) = r {
                tracing::debug!(pod = %w.key(), what, error = %e, "withdraw step failed");
            }
        };
        log(
            "enrolled_netns",
            self.enrolled_netns
                .remove(&cookie)
                .map_err(|e| e.to_string()),
        );
        log(
            "sk_lookup",
            self.dp.detach_sk_lookup(cookie).map_err(|e| e.to_string()),
        );
        for ip in &w.ips {
            log(
                "pod_addrs",
                self.pod_addrs
                    .remove(&ip_key(*ip))
                    .map_err(|e| e.to_string()),
            );
        }
        for (ports, dir) in [
            (&w.exclude_outbound_ports, direction::OUTBOUND),
            (&w.exclude_inbound_ports, direction::INBOUND),
        ] {
            for port in ports {
                let key = PortKey {
                    netns_cookie: cookie,
                    port: *port,
                    direction: dir,
                    _pad: [0; 5],
                };
                log(
                    "excluded_ports",
                    self.excluded.remove(&key).map_err(|e| e.to_string()),
                );
            }
        }
        for kind in [LISTENER_PLAINTEXT, LISTENER_HBONE] {
            let index = slot * LISTENERS_PER_POD + kind;
            log(
                "listeners",
                self.listeners
                    .clear_index(&index)
                    .map_err(|e| e.to_string()),
            );
        }
    }

    fn unenroll(&mut self, pod: EnrolledPod) {
        self.withdraw(&pod.workload, pod.cookie, pod.slot);
        // Stops the accept loops. Shutting the listening sockets down here
        // (not when the tasks drop them) frees their ports at once.
        // Open connections finish on their own.
        pod.cancel.cancel();
        for l in &pod.listener_fds {
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Both);
        }
        self.free_slots.push(pod.slot);
    }

    fn sync_probe_sources(&mut self, sources: &[IpAddr]) -> Result<(), DatapathError> {
        let want: HashSet<IpKey> = sources.iter().map(|ip| ip_key(*ip)).collect();
        let have: Vec<IpKey> = self.probe_sources.keys().filter_map(Result::ok).collect();
        let err = |e: aya::maps::MapError| DatapathError::Map {
            map: maps::PROBE_SOURCES,
            message: e.to_string(),
        };
        for key in have.iter().filter(|k| !want.contains(k)) {
            self.probe_sources.remove(key).map_err(err)?;
        }
        for key in want.iter().filter(|k| !have.contains(k)) {
            self.probe_sources.insert(key, &1, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Deletes map entries and sk_lookup pins that no enrolled pod owns.
    fn sweep(&mut self) -> Result<(), DatapathError> {
        let cookies: BTreeSet<u64> = self.pods.values().map(|p| p.cookie).collect();
        let addrs: HashSet<IpKey> = self
            .pods
            .values()
            .flat_map(|p| p.workload.ips.iter().map(|ip| ip_key(*ip)))
            .collect();
        let ports: HashSet<PortKey> = self
            .pods
            .values()
            .flat_map(|p| {
                let out = p
                    .workload
                    .exclude_outbound_ports
                    .iter()
                    .map(move |port| (p.cookie, *port, direction::OUTBOUND));
                let inb = p
                    .workload
                    .exclude_inbound_ports
                    .iter()
                    .map(move |port| (p.cookie, *port, direction::INBOUND));
                out.chain(inb)
            })
            .map(|(netns_cookie, port, direction)| PortKey {
                netns_cookie,
                port,
                direction,
                _pad: [0; 5],
            })
            .collect();
        let mut swept = 0usize;
        let stale: Vec<u64> = self
            .enrolled_netns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !cookies.contains(k))
            .collect();
        for key in &stale {
            let _ = self.enrolled_netns.remove(key);
        }
        swept += stale.len();
        let stale: Vec<IpKey> = self
            .pod_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !addrs.contains(k))
            .collect();
        for key in &stale {
            let _ = self.pod_addrs.remove(key);
        }
        swept += stale.len();
        let stale: Vec<PortKey> = self
            .excluded
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !ports.contains(k))
            .collect();
        for key in &stale {
            let _ = self.excluded.remove(key);
        }
        swept += stale.len();
        for cookie in self.dp.pinned_sk_lookup_cookies()? {
            if !cookies.contains(&cookie) {
                self.dp.detach_sk_lookup(cookie)?;
                swept += 1;
            }
        }
        if swept > 0 {
            tracing::info!(entries = swept, "removed stale datapath state");
        }
        Ok(())
    }

    /// Stops every pod's listeners, leaving the kernel state pinned: captured
    /// traffic fails closed until the next agent takes over.
    pub fn shutdown(&mut self) {
        for pod in self.pods.values() {
            pod.cancel.cancel();
            // Leave the listening sockets' reuseport groups and the sockmap
            // at once, so that a successor agent (which bound the same ports
            // with SO_REUSEPORT and put its own sockets in the sockmap) takes
            // every new connection; open connections keep being served.
            // Connections still in the accept queues move to the successor's
            // listeners (`tcp_migrate_req`, set at enrollment), not reset;
            // with no successor they are reset (fail closed).
            for l in &pod.listener_fds {
                let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Un-enrolls every pod and removes its kernel state (before `uninstall`).
    pub fn unenroll_all(&mut self) {
        let pods = std::mem::take(&mut self.pods);
        for (_, pod) in pods {
            self.unenroll(pod);
        }
    }
}

/// Fresh handles on a pod's listening sockets (duplicated fds, so the
/// sockets live on when one set is dropped), in `listener_fds` order:
/// outbound..., plaintext, HBONE.
fn pod_listeners(fds: &[std::net::TcpListener]) -> std::io::Result<PodListeners> {
    let mut dups = fds
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect::<std::io::Result<Vec<_>>>()?;
    let (Some(inbound_hbone), Some(inbound_plaintext)) = (dups.pop(), dups.pop()) else {
        return Err(std::io::Error::other(
            "the pod has fewer listeners than expected",
        ));
    };
    Ok(PodListeners {
        outbound: dups,
        inbound_plaintext,
        inbound_hbone,
    })
}

/// The pod netns' `net.ipv4.tcp_migrate_req` (Linux 5.14+), seen from a
/// thread inside that netns.
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `net.ipv4.tcp_migrate_req` in the pod's netns (runs inside it).
///
/// During an upgrade both agents' listeners share each in-pod port
/// (`SO_REUSEPORT`); the kernel spreads new connections over both (for the
/// outbound port by hash, for `sk_lookup`-steered ones by the reuseport
/// selection after the lookup). When the old agent stops it shuts its
/// listeners down; without migration, the connections still queued in their
/// accept queues (and half-open ones) are reset. With it, the kernel moves
/// them to the successor's listener of the same group, and that listener
/// alone gets new ones: no connection is lost. Only listeners in a reuseport
/// group are affected (the pod's own apps' ones too, to the same effect).
fn enable_accept_queue_migration() {
    match std::fs::read_to_string(MIGRATE_REQ_SYSCTL) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(MIGRATE_REQ_SYSCTL, "1") {
                tracing::warn!(sysctl = MIGRATE_REQ_SYSCTL, error = %e, "cannot enable accept-queue migration in the pod; connections queued at an upgrade may be reset");
            }
        }
        Err(e) => {
            tracing::warn!(sysctl = MIGRATE_REQ_SYSCTL, error = %e, "no accept-queue migration in this kernel (5.14+ needed); connections queued at an upgrade may be reset");
        }
    }
}

/// Opens the pod's listeners; runs inside the pod's netns. Returns them with
/// the netns cookie.
fn open_listeners() -> Result<(PodListeners, u64), EnrollError> {
    enable_accept_queue_migration();
    let open = |addr: SocketAddr, dual_stack: bool| {
        netns::listener(addr, dual_stack).map_err(|source| EnrollError::Listener { addr, source })
    };
    let out4 = open(
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        false,
    )?;
    let cookie = netns::netns_cookie(&out4).map_err(|source| EnrollError::Listener {
        addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        source,
    })?;
    let mut outbound = vec![out4];
    // IPv6 may be disabled in the pod: then there is nothing to capture on v6.
    match open(
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
        false,
    ) {
        Ok(l) => outbound.push(l),
        Err(e) => tracing::debug!(error = %e, "no IPv6 outbound listener"),
    }
    // One dual-stack socket is the sk_lookup target for both families. It
    // must be bound to the wildcard: binding a specific IPv6 address makes a
    // socket v6-only, and sk_lookup refuses v6-only sockets for IPv4 lookups.
    // (The bind address matters little otherwise: sk_lookup ignores it.)
    let steered = |port: u16| match open(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true)
    {
        Ok(l) => Ok(l),
        Err(_) => open(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), false),
    };
    let inbound_plaintext = steered(INBOUND_PLAINTEXT_PORT)?;
    let inbound_hbone = steered(INBOUND_HBONE_PORT)?;
    Ok((
        PodListeners {
            outbound,
            inbound_plaintext,
            inbound_hbone,
        },
        cookie,
    ))
}
