//! The Kubernetes source: watches the API server and publishes full snapshots
//! into the same [`Store`] as the file source.
//!
//! - **Watched**: Pods, Namespaces, Services, EndpointSlices, this Node (its
//!   addresses are kubelet probe sources), Istio's `AuthorizationPolicy`
//!   and `PeerAuthentication` (`security.istio.io/v1`), and the
//!   traffic-management objects `DestinationRule` and `VirtualService`
//!   (`networking.istio.io/v1`), `TCPRoute`
//!   (`gateway.networking.k8s.io/v1alpha2`) and `HTTPRoute` (`v1`, the
//!   waypoint's), all kept raw.
//! - **Observers**: [`KubeConfig::observer`] (the waypoint) runs the same
//!   source for no node: every pod is remote, nothing is enrolled.
//! - **Local and remote pods**: pods with `spec.nodeName == NODE_NAME` are
//!   this agent's (located on the node, enrolled here); pods of other nodes
//!   are published with `node: Some(name)` and no netns, for their addresses
//!   and identity (the proxy tunnels to them). Unscheduled, finished and
//!   `hostNetwork` pods are left out.
//! - **Enrollment**: Istio ambient's labels — `istio.io/dataplane-mode=ambient`
//!   on the pod or its namespace enrolls, `=none` on the pod opts out;
//!   removing the label un-enrolls. System namespaces are never enrolled.
//! - **Location**: an enrolled pod's netns and cgroup come from
//!   [`super::discovery`] (its UID in a process's cgroup path). A pod whose
//!   processes are not found yet is left out and retried on every event and
//!   every `rediscover_interval`.
//! - **Failures**: kube's watcher re-watches a dropped stream from the last
//!   resourceVersion and relists after `410 Gone`; a relist replaces a kind's
//!   objects only once complete. During an API-server outage the last good
//!   state stays published; the outage is logged once, and its end once
//!   (checked with `GET /version`), after which the watches converge.
//! - **Start-up**: nothing is published before Pods, Namespaces, Services and
//!   EndpointSlices are listed (an empty first snapshot would un-enroll every
//!   pod a previous agent enrolled); optional kinds (the CRDs, the Node) that
//!   the server does not serve or forbids count as empty, are logged once
//!   and listed in the store's missing kinds (`/config_dump` `sources`),
//!   and are picked up when they appear (the watch keeps retrying).
//!
//! One file per job: [`config`] (flags, configuration, client), [`watches`]
//! (which kinds are watched, one task each, by [`watch`]), `caches` (the
//! live objects, relists applied atomically by [`cache`]), [`snapshot`] (the
//! pure snapshot builder over [`model`]'s rules) and `sync_loop` (events,
//! outages, start-up, discovery, publication).

pub mod cache;
mod caches;
pub mod config;
pub mod model;
pub mod snapshot;
mod sync_loop;
pub mod watch;
pub mod watches;

use kube::Client;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use self::sync_loop::SyncLoop;
pub use self::{
    config::{KubeArgs, KubeConfig, KubeError, NO_NODE, client},
    watches::Msg,
};
use crate::state::Store;

impl KubeArgs {
    /// Connects, waits for the first complete sync into `store` and leaves
    /// the source running until `cancel`. Returns the node name.
    pub async fn start(
        &self,
        store: Store,
        cancel: CancellationToken,
    ) -> Result<String, KubeError> {
        let cfg = self.config()?;
        let node = cfg.node_name.clone();
        let client = client(self.api_server.as_deref()).await?;
        start(client, cfg, store, cancel).await?;
        Ok(node)
    }
}

/// The running source; dropping it does not stop it (cancel the token).
#[derive(Debug)]
pub struct KubeSource {
    /// The sync loop and the watch tasks.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Starts watching, waits for the first complete sync and publishes it into
/// `store`, then keeps the store current in the background until `cancel`.
/// While the API server cannot be reached at start-up this keeps waiting
/// (logging which kinds are missing every 10 s).
pub async fn start(
    client: Client,
    cfg: KubeConfig,
    store: Store,
    cancel: CancellationToken,
) -> Result<KubeSource, KubeError> {
    if cfg.node_name.is_empty() {
        return Err(KubeError::NoNodeName);
    }
    let (tx, rx) = mpsc::channel(1024);
    let mut tasks = watches::spawn(&client, &cfg, &tx, &cancel);
    drop(tx);
    let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
    let sync = SyncLoop::new(client, cfg, store, synced_tx);
    tasks.push(tokio::spawn(sync.run(rx, cancel.clone())));
    tokio::select! {
        _ = cancel.cancelled() => Err(KubeError::Cancelled),
        r = synced_rx.wait_for(|s| *s) => match r {
            Ok(_) => Ok(KubeSource { tasks }),
            Err(_) => Err(KubeError::Cancelled),
        },
    }
}
