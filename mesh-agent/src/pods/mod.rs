//! The pod lifecycle: which pods are enrolled, enrolling one (its identity,
//! its in-pod listeners, its kernel state, serving it), updating it in place,
//! withdrawing it, and removing kernel state no pod owns.
//!
//! Order matters so that no step opens a window of leaked plaintext or of
//! spurious drops: enrolling opens the listeners first, then publishes the
//! inbound steering (listener, addresses, `sk_lookup`), and only then the
//! outbound capture (netns cookie). Un-enrolling runs the same steps backwards.
//!
//! The decisions live here; the kernel writes are the datapath's
//! ([`PodKernel`], [`crate::datapath::PodMaps`]) and the in-pod listeners and
//! serving are the proxy's ([`PodProxy`], [`crate::proxy::Proxy`]), so that the
//! lifecycle is tested with fakes of both (`tests.rs`). Files: this one (the
//! [`Enroller`]), `netns_claims` (reserved and shared netns refusal),
//! `proxy_seam` ([`PodProxy`] and its implementation on the proxy).
#![forbid(unsafe_code)]

mod netns_claims;
mod proxy_seam;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use mesh_common::{MAX_PODS, OUTBOUND_PORT};
use tokio_util::sync::CancellationToken;

pub use proxy_seam::PodProxy;

use crate::{
    datapath::{
        InboundSockets, PodKernel, PodKernelState, PodMaps, PublishError,
        netns::{self, NetnsError, NetnsId, ReservedNetns},
    },
    identity::SpiffeId,
    proxy::{PodListeners, Proxy},
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
    /// The pod's kernel state could not be written.
    #[error(transparent)]
    Publish(#[from] PublishError),
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

struct EnrolledPod<N> {
    workload: Workload,
    identity: SpiffeId,
    cookie: u64,
    /// The netns it is enrolled in (no other pod may claim it).
    netns_id: NetnsId,
    slot: u32,
    cancel: CancellationToken,
    /// Duplicates of the listener fds (every proxy thread's), to shut them
    /// down synchronously on un-enrollment (so a re-enrollment can bind the
    /// same ports at once) and to serve them again on an update.
    listeners: PodListeners,
    /// Keeps the pod's netns entered (its worker) while enrolled.
    netns: N,
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

/// The kernel state of workload `w`, as the datapath writes it.
fn kernel_state(w: &Workload) -> PodKernelState<'_> {
    PodKernelState {
        netns: &w.netns,
        ips: &w.ips,
        exclude_outbound_ports: &w.exclude_outbound_ports,
        exclude_inbound_ports: &w.exclude_inbound_ports,
    }
}

/// Keeps the kernel's view of enrolled pods equal to the store's: the
/// kernel side through `K` (the datapath's [`PodMaps`]), the proxy side
/// through `P` (the [`Proxy`]).
pub struct Enroller<K: PodKernel = PodMaps, P: PodProxy = Proxy> {
    kernel: K,
    proxy: P,
    pods: BTreeMap<WorkloadKey, EnrolledPod<P::Netns>>,
    free_slots: Vec<u32>,
    reserved: ReservedNetns,
}

impl<K: PodKernel, P: PodProxy> Enroller<K, P> {
    /// Enrolls pods through `kernel` and `proxy`; refuses the agent's own
    /// netns and the host's (as `/proc` shows them).
    pub fn new(kernel: K, proxy: P) -> Self {
        Self {
            kernel,
            proxy,
            pods: BTreeMap::new(),
            free_slots: (0..MAX_PODS).rev().collect(),
            reserved: ReservedNetns::new(std::path::Path::new("/proc")),
        }
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
        let mut claims = netns_claims::Claims::new();
        for (key, _, opened) in &new {
            if let Ok(id) = opened {
                claims.entry(*id).or_default().push(key);
            }
        }
        for (key, workload, opened) in new {
            let checked = opened.map_err(EnrollError::from).and_then(|id| {
                let enrolled = self.pods.iter().map(|(k, p)| (k, p.netns_id));
                netns_claims::check(&self.reserved, enrolled, &claims, key, workload, id)?;
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
        if let Err(e) = self.kernel.sync_probe_sources(&snap.node.probe_sources) {
            tracing::error!(error = %e, "cannot update probe sources");
        }
        let keep: Vec<(u64, PodKernelState<'_>)> = self
            .pods
            .values()
            .map(|p| (p.cookie, kernel_state(&p.workload)))
            .collect();
        if let Err(e) = self.kernel.sweep(&keep) {
            tracing::error!(error = %e, "cannot remove stale datapath state");
        }
        // Forget certificates and TLS configurations of pods no longer here.
        let identities: Vec<SpiffeId> = self.pods.values().map(|p| p.identity.clone()).collect();
        self.proxy.retain_identities(&identities);
        report.enrolled = self.pods.len();
        report
    }

    /// Enrolls a pod in the netns `netns_id` (checked): the proxy enters
    /// that namespace, or nothing if the path names another one by now.
    fn enroll(
        &mut self,
        w: &Workload,
        netns_id: NetnsId,
    ) -> Result<EnrolledPod<P::Netns>, EnrollError> {
        let identity = w.identity(&self.proxy.trust_domain())?;
        let (netns, listeners, cookie) = self.proxy.open(w, netns_id)?;
        // The same namespace under another (dev, ino) cannot happen; the
        // cookie is what the kernel keys capture on, so check it too.
        if let Some((other, _)) = self.pods.iter().find(|(_, p)| p.cookie == cookie) {
            return Err(EnrollError::SharedNetns {
                path: w.netns.clone(),
                id: netns_id,
                other: other.clone(),
            });
        }
        let kept = listeners.try_clone().map_err(listener_dup_error)?;
        let slot = self.free_slots.pop().ok_or(EnrollError::SlotsExhausted)?;
        let result = self
            .kernel
            .publish(slot, cookie, &kernel_state(w), inbound(&listeners));
        if let Err(e) = result {
            self.kernel.withdraw(slot, cookie, &kernel_state(w));
            self.free_slots.push(slot);
            return Err(e.into());
        }
        let cancel = self.proxy.serve(w, &identity, cookie, &netns, listeners);
        Ok(EnrolledPod {
            workload: w.clone(),
            identity,
            cookie,
            netns_id,
            slot,
            cancel,
            listeners: kept,
            netns,
        })
    }

    /// Applies a changed workload (same netns) without un-enrolling: new map
    /// entries are written (stale ones go in the sweep), and the accept loops
    /// restart with the new context on the same listening sockets, whose
    /// queued connections are not lost.
    fn update(&mut self, pod: &mut EnrolledPod<P::Netns>, w: &Workload) -> Result<(), EnrollError> {
        let identity = w.identity(&self.proxy.trust_domain())?;
        let listeners = pod.listeners.try_clone().map_err(listener_dup_error)?;
        self.kernel
            .publish(pod.slot, pod.cookie, &kernel_state(w), inbound(&listeners))?;
        pod.cancel.cancel();
        pod.cancel = self
            .proxy
            .serve(w, &identity, pod.cookie, &pod.netns, listeners);
        pod.workload = w.clone();
        pod.identity = identity;
        Ok(())
    }

    fn unenroll(&mut self, pod: EnrolledPod<P::Netns>) {
        // Capture first: the pod's traffic is not captured before the
        // listeners that would carry it stop.
        self.kernel
            .withdraw(pod.slot, pod.cookie, &kernel_state(&pod.workload));
        // Stops the accept loops. Shutting the listening sockets down here
        // (not when the tasks drop them) frees their ports at once.
        // Open connections finish on their own.
        pod.cancel.cancel();
        for l in pod.listeners.iter() {
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Both);
        }
        self.free_slots.push(pod.slot);
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
            for l in pod.listeners.iter() {
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

/// The inbound listeners of `l`, as the datapath steers to them.
fn inbound(l: &PodListeners) -> InboundSockets<'_> {
    InboundSockets {
        plaintext: &l.first.inbound_plaintext,
        hbone: &l.first.inbound_hbone,
    }
}

/// The error for listener descriptors that could not be duplicated.
fn listener_dup_error(source: std::io::Error) -> EnrollError {
    EnrollError::Listener {
        addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        source,
    }
}
