//! The Kubernetes source: watches the API server and publishes full snapshots
//! into the same [`Store`] as the file source.
//!
//! - **Watched**: Pods, Namespaces, Services, EndpointSlices, this Node (its
//!   addresses are kubelet probe sources), and Istio's `AuthorizationPolicy`
//!   and `PeerAuthentication` (`security.istio.io/v1`, kept raw).
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
//!   the server does not serve or forbids count as empty.

pub mod cache;
pub mod model;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::watcher,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use self::{
    cache::{KindCache, KindEvent},
    model::{PodFacts, ServiceFacts, SliceFacts},
    watch::{Backoff, Kind, WatchFailure},
};
use super::discovery::{Discovery, PodLocation};
use crate::state::{NodeInfo, Policies, Snapshot, Store, Workload, WorkloadKey};

/// How the Kubernetes source runs.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name (`NODE_NAME` from the downward API): pods with this
    /// `spec.nodeName` are local.
    pub node_name: String,
    /// The `/proc` to scan for pods' processes (`/host/proc` in the DaemonSet).
    pub proc_root: PathBuf,
    /// The host's cgroup2 mount as the agent sees it (reported pod cgroups are below it).
    pub cgroup_root: PathBuf,
    /// Addresses whose inbound connections bypass capture, besides the Node's own addresses.
    pub probe_sources: Vec<IpAddr>,
    /// Namespaces whose pods are never enrolled.
    pub excluded_namespaces: BTreeSet<String>,
    /// How often pods' processes are looked for again (new pods, re-created sandboxes).
    pub rediscover_interval: Duration,
    /// First retry delay after a watch error (doubles up to `backoff_max`).
    pub backoff_min: Duration,
    /// Longest retry delay after watch errors.
    pub backoff_max: Duration,
    /// Server-side timeout of each watch request, in seconds (`None`: kube's 290).
    pub watch_timeout_secs: Option<u32>,
}

impl KubeConfig {
    /// Defaults for `node_name`: `/proc`, `/sys/fs/cgroup`, `kube-system`
    /// excluded, rediscovery every 2 s, backoff 800 ms to 30 s (client-go's).
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            probe_sources: Vec::new(),
            excluded_namespaces: ["kube-system".to_owned()].into(),
            rediscover_interval: Duration::from_secs(2),
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            watch_timeout_secs: None,
        }
    }
}

/// The command-line flags of the Kubernetes source (`mesh-agent run --kube`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeArgs {
    /// Sync pods, services and policies from the Kubernetes API server
    /// instead of a workload file.
    #[arg(long, env = "MESH_KUBE")]
    pub kube: bool,
    /// The API server URL, spoken to in plain HTTP without authentication
    /// (`kubectl proxy`, tests). Default: the in-cluster service account, else KUBECONFIG.
    #[arg(long, env = "MESH_API_SERVER", requires = "kube")]
    pub api_server: Option<String>,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", requires = "kube")]
    pub node_name: Option<String>,
    /// Where the host's /proc is: pods' processes are found there by pod UID.
    #[arg(long, env = "MESH_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// The host's cgroup2 mount as the agent sees it (pods' cgroups are reported below it).
    #[arg(long, env = "MESH_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// An extra address whose inbound connections bypass capture (besides the
    /// Node's own addresses); repeatable.
    #[arg(
        long = "probe-source",
        env = "MESH_PROBE_SOURCES",
        value_delimiter = ','
    )]
    pub probe_sources: Vec<IpAddr>,
    /// A namespace whose pods are never enrolled, besides kube-system and the
    /// agent's own (POD_NAMESPACE); repeatable.
    #[arg(long = "exclude-namespace", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// The agent's own namespace (downward API), never enrolled.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,
}

impl KubeArgs {
    /// The source configuration these flags describe.
    pub fn config(&self) -> Result<KubeConfig, KubeError> {
        let node = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(KubeError::NoNodeName)?;
        let mut cfg = KubeConfig::new(node);
        cfg.proc_root = self.proc_root.clone();
        cfg.cgroup_root = self.cgroup_root.clone();
        cfg.probe_sources = self
            .probe_sources
            .iter()
            .map(|ip| ip.to_canonical())
            .collect();
        cfg.excluded_namespaces
            .extend(self.exclude_namespaces.iter().cloned());
        cfg.excluded_namespaces
            .extend(self.pod_namespace.iter().cloned());
        Ok(cfg)
    }

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

/// Why the Kubernetes source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No node name.
    #[error(
        "the node name is empty: set NODE_NAME from the downward API (fieldRef spec.nodeName) or pass --node-name"
    )]
    NoNodeName,
    /// No in-cluster service account and no kubeconfig.
    #[error(
        "cannot find the Kubernetes API server: {0} (run in a pod with a service account token, set KUBECONFIG, or pass --api-server)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// `--api-server` is not a URL.
    #[error("--api-server {url:?} is not a valid URL: {reason}")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The HTTP client cannot be built (TLS configuration).
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Stopped before the first complete sync.
    #[error("stopped before the first sync from the API server completed")]
    Cancelled,
}

/// A client for `api_server` (plain, no authentication: tests, `kubectl
/// proxy`), or from the environment: the in-cluster service account, else
/// `KUBECONFIG` / `~/.kube/config`.
pub async fn client(api_server: Option<&str>) -> Result<Client, KubeError> {
    let config = match api_server {
        Some(url) => {
            let uri = url.parse::<http::Uri>().map_err(|e| KubeError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Messages from the watch tasks to the sync loop.
#[derive(Debug)]
pub enum Msg {
    /// A pod event.
    Pod(KindEvent<PodFacts>),
    /// A namespace event (its labels).
    Namespace(KindEvent<BTreeMap<String, String>>),
    /// A service event.
    Service(KindEvent<ServiceFacts>),
    /// An EndpointSlice event.
    Slice(KindEvent<SliceFacts>),
    /// A Node event (its addresses).
    Node(KindEvent<Vec<IpAddr>>),
    /// An AuthorizationPolicy event (raw object).
    Authorization(KindEvent<serde_json::Value>),
    /// A PeerAuthentication event (raw object).
    PeerAuthentication(KindEvent<serde_json::Value>),
    /// A watch failed; the task retries after its backoff.
    Failed(Kind, WatchFailure),
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
    let mut tasks = spawn_watches(&client, &cfg, &tx, &cancel);
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

fn istio_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn spawn_watches(
    client: &Client,
    cfg: &KubeConfig,
    tx: &mpsc::Sender<Msg>,
    cancel: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    let base = {
        let mut c = watcher::Config::default();
        if let Some(t) = cfg.watch_timeout_secs {
            c = c.timeout(t);
        }
        c
    };
    let name_field = format!("metadata.name={}", cfg.node_name);
    let authz = istio_resource("AuthorizationPolicy", "authorizationpolicies");
    let peer = istio_resource("PeerAuthentication", "peerauthentications");
    let raw = |o: &DynamicObject| serde_json::to_value(o).ok().map(model::policy_value);
    vec![
        tokio::spawn(watch::run(
            Kind::Pods,
            Api::<Pod>::all(client.clone()),
            base.clone(),
            backoff,
            PodFacts::from_pod,
            Msg::Pod,
            tx.clone(),
            cancel.clone(),
        )),
        tokio::spawn(watch::run(
            Kind::Namespaces,
            Api::<Namespace>::all(client.clone()),
            base.clone(),
            backoff,
            |ns: &Namespace| Some(model::namespace_labels(ns)),
            Msg::Namespace,
            tx.clone(),
            cancel.clone(),
        )),
        tokio::spawn(watch::run(
            Kind::Services,
            Api::<K8sService>::all(client.clone()),
            base.clone(),
            backoff,
            ServiceFacts::from_service,
            Msg::Service,
            tx.clone(),
            cancel.clone(),
        )),
        tokio::spawn(watch::run(
            Kind::EndpointSlices,
            Api::<EndpointSlice>::all(client.clone()),
            base.clone(),
            backoff,
            SliceFacts::from_slice,
            Msg::Slice,
            tx.clone(),
            cancel.clone(),
        )),
        tokio::spawn(watch::run(
            Kind::Node,
            Api::<Node>::all(client.clone()),
            base.clone().fields(&name_field),
            backoff,
            |n: &Node| Some(model::node_addresses(n)),
            Msg::Node,
            tx.clone(),
            cancel.clone(),
        )),
        tokio::spawn(watch::run(
            Kind::AuthorizationPolicies,
            Api::<DynamicObject>::all_with(client.clone(), &authz),
            base.clone(),
            backoff,
            raw,
            Msg::Authorization,
            tx.clone(),
            cancel.clone(),
        )),
        tokio::spawn(watch::run(
            Kind::PeerAuthentications,
            Api::<DynamicObject>::all_with(client.clone(), &peer),
            base,
            backoff,
            raw,
            Msg::PeerAuthentication,
            tx.clone(),
            cancel.clone(),
        )),
    ]
}

/// How often start-up reports which kinds are still not listed.
const STARTUP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

struct SyncLoop {
    client: Client,
    cfg: KubeConfig,
    store: Store,
    synced_tx: tokio::sync::watch::Sender<bool>,
    pods: KindCache<PodFacts>,
    namespaces: KindCache<BTreeMap<String, String>>,
    services: KindCache<ServiceFacts>,
    slices: KindCache<SliceFacts>,
    node: KindCache<Vec<IpAddr>>,
    authorization: KindCache<serde_json::Value>,
    peer_authentication: KindCache<serde_json::Value>,
    /// Discovery (moved into a blocking task while it scans).
    discovery: Option<Discovery>,
    /// Kinds whose last watch attempt failed with an outage-like error.
    failing: BTreeSet<Kind>,
    /// Whether the outage warning was logged and its end not yet.
    outage_logged: bool,
    /// Kinds whose absence (404) or prohibition (403) was logged.
    reported: BTreeSet<(Kind, u16)>,
    /// Last enrollment decision per local pod, to log changes once.
    intents: BTreeMap<WorkloadKey, (bool, &'static str)>,
    /// Enrolled pods whose processes are not found yet (logged once each).
    waiting: BTreeSet<String>,
    /// Where the enrolled pods were found at the last publication.
    locations: BTreeMap<String, PodLocation>,
    published: bool,
    started: Instant,
    last_report: Instant,
}

impl SyncLoop {
    fn new(
        client: Client,
        cfg: KubeConfig,
        store: Store,
        synced_tx: tokio::sync::watch::Sender<bool>,
    ) -> Self {
        let discovery = Discovery::new(cfg.proc_root.clone(), cfg.cgroup_root.clone());
        Self {
            client,
            cfg,
            store,
            synced_tx,
            pods: KindCache::default(),
            namespaces: KindCache::default(),
            services: KindCache::default(),
            slices: KindCache::default(),
            node: KindCache::default(),
            authorization: KindCache::default(),
            peer_authentication: KindCache::default(),
            discovery: Some(discovery),
            failing: BTreeSet::new(),
            outage_logged: false,
            reported: BTreeSet::new(),
            intents: BTreeMap::new(),
            waiting: BTreeSet::new(),
            locations: BTreeMap::new(),
            published: false,
            started: Instant::now(),
            last_report: Instant::now(),
        }
    }

    fn synced(&self, kind: Kind) -> bool {
        match kind {
            Kind::Pods => self.pods.synced(),
            Kind::Namespaces => self.namespaces.synced(),
            Kind::Services => self.services.synced(),
            Kind::EndpointSlices => self.slices.synced(),
            Kind::Node => self.node.synced(),
            Kind::AuthorizationPolicies => self.authorization.synced(),
            Kind::PeerAuthentications => self.peer_authentication.synced(),
        }
    }

    fn all_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced(*k))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        tracing::info!(
            node = %self.cfg.node_name,
            proc_root = %self.cfg.proc_root.display(),
            "kubernetes source: listing pods, namespaces, services, endpointslices, policies"
        );
        let mut rediscover = tokio::time::interval(self.cfg.rediscover_interval);
        rediscover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut next_probe = tokio::time::Instant::now();
        loop {
            let probing = !self.failing.is_empty();
            let mut dirty = tokio::select! {
                _ = cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = rediscover.tick() => self.rediscovery_changed().await,
                _ = tokio::time::sleep_until(next_probe), if probing => {
                    self.probe_api_server().await;
                    next_probe = tokio::time::Instant::now() + probe_backoff.next_delay();
                    if self.failing.is_empty() {
                        probe_backoff.reset();
                    }
                    false
                }
            };
            // Coalesce a burst (a relist) into one publication.
            while let Ok(msg) = rx.try_recv() {
                dirty |= self.handle(msg);
            }
            if !self.failing.is_empty() && !probing {
                next_probe = tokio::time::Instant::now() + probe_backoff.next_delay();
            }
            if !self.all_synced() {
                self.report_startup();
                continue;
            }
            if dirty || !self.published {
                self.publish().await;
            }
        }
    }

    /// Applies one message; returns whether the cached state changed.
    fn handle(&mut self, msg: Msg) -> bool {
        let (kind, progressed, changed) = match msg {
            Msg::Failed(kind, failure) => return self.failed(kind, failure),
            Msg::Pod(ev) => (Kind::Pods, progress(&ev), self.pods.apply(ev)),
            Msg::Namespace(ev) => (Kind::Namespaces, progress(&ev), self.namespaces.apply(ev)),
            Msg::Service(ev) => (Kind::Services, progress(&ev), self.services.apply(ev)),
            Msg::Slice(ev) => (Kind::EndpointSlices, progress(&ev), self.slices.apply(ev)),
            Msg::Node(ev) => (Kind::Node, progress(&ev), self.node.apply(ev)),
            Msg::Authorization(ev) => (
                Kind::AuthorizationPolicies,
                progress(&ev),
                self.authorization.apply(ev),
            ),
            Msg::PeerAuthentication(ev) => (
                Kind::PeerAuthentications,
                progress(&ev),
                self.peer_authentication.apply(ev),
            ),
        };
        if progressed && self.failing.remove(&kind) {
            tracing::debug!(kind = %kind, "watch making progress again");
            if self.failing.is_empty() && self.outage_logged {
                self.outage_logged = false;
                tracing::info!("Kubernetes API server reachable again; state converging");
            }
        }
        if progressed {
            self.reported.retain(|(k, _)| *k != kind);
        }
        changed
    }

    fn failed(&mut self, kind: Kind, failure: WatchFailure) -> bool {
        match failure.code {
            Some(410) => {
                tracing::info!(kind = %kind, "watch expired (410 Gone); relisting");
                false
            }
            Some(code @ (403 | 404)) => {
                let first = self.reported.insert((kind, code));
                if code == 403 && first {
                    tracing::error!(
                        kind = %kind,
                        error = %failure.message,
                        "forbidden: the agent's service account may not list/watch {kind}; apply the ClusterRole in deploy/ (kubectl apply -k deploy/)"
                    );
                } else if first {
                    tracing::warn!(
                        kind = %kind,
                        "the API server does not serve {kind}{}",
                        if kind.optional() {
                            "; treating it as empty (install the CRDs in deploy/ to use policies)"
                        } else {
                            ""
                        }
                    );
                }
                if kind.optional() {
                    return self.mark_absent(kind);
                }
                false
            }
            _ => {
                self.failing.insert(kind);
                if !self.outage_logged {
                    self.outage_logged = true;
                    tracing::warn!(
                        kind = %kind,
                        error = %failure.message,
                        "lost the Kubernetes API server; keeping the last good state until it is back"
                    );
                } else {
                    tracing::debug!(kind = %kind, error = %failure.message, "watch still failing");
                }
                false
            }
        }
    }

    fn mark_absent(&mut self, kind: Kind) -> bool {
        match kind {
            Kind::Node => self.node.mark_absent(),
            Kind::AuthorizationPolicies => self.authorization.mark_absent(),
            Kind::PeerAuthentications => self.peer_authentication.mark_absent(),
            _ => false,
        }
    }

    async fn probe_api_server(&mut self) {
        match self.client.apiserver_version().await {
            Ok(info) => {
                if self.outage_logged {
                    tracing::info!(
                        version = %info.git_version,
                        "Kubernetes API server reachable again; state converging"
                    );
                }
                self.outage_logged = false;
                self.failing.clear();
            }
            Err(e) => tracing::debug!(error = %e, "API server still unreachable"),
        }
    }

    fn report_startup(&mut self) {
        if self.last_report.elapsed() < STARTUP_REPORT_INTERVAL {
            return;
        }
        self.last_report = Instant::now();
        let missing: Vec<&str> = Kind::ALL
            .iter()
            .filter(|k| !self.synced(**k))
            .map(|k| k.resource())
            .collect();
        tracing::warn!(
            waited_secs = self.started.elapsed().as_secs(),
            missing = %missing.join(","),
            "still waiting for the first list from the Kubernetes API server; not ready"
        );
    }

    async fn publish(&mut self) {
        let pods: Vec<(PodFacts, model::Enrollment)> = self
            .pods
            .live()
            .values()
            .filter(|p| {
                !p.node_name.is_empty() && !p.host_network && !p.terminal && !p.ips.is_empty()
            })
            .map(|p| {
                let e = model::enrollment(
                    &p.labels,
                    &p.namespace,
                    self.namespaces
                        .live()
                        .get(&(String::new(), p.namespace.clone())),
                    &self.cfg.excluded_namespaces,
                );
                (p.clone(), e)
            })
            .collect();
        let wanted: BTreeSet<String> = pods
            .iter()
            .filter(|(p, e)| e.enrolled && p.node_name == self.cfg.node_name)
            .map(|(p, _)| p.uid.clone())
            .collect();
        let locations = self.locate(wanted).await;

        let mut intents = BTreeMap::new();
        let mut workloads = BTreeMap::new();
        let mut waiting = BTreeSet::new();
        for (pod, e) in &pods {
            let key = pod.key();
            let mut w = Workload {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                uid: Some(pod.uid.clone()),
                ips: pod.ips.clone(),
                labels: pod.labels.clone(),
                enrolled: e.enrolled,
                exclude_outbound_ports: pod.exclude_outbound_ports.clone(),
                exclude_inbound_ports: pod.exclude_inbound_ports.clone(),
                ..Workload::default()
            };
            if pod.node_name != self.cfg.node_name {
                w.node = Some(pod.node_name.clone());
                workloads.insert(key, w);
                continue;
            }
            if self.intents.get(&key) != Some(&(e.enrolled, e.reason)) {
                tracing::info!(
                    pod = %key,
                    enroll = e.enrolled,
                    reason = e.reason,
                    "pod enrollment decided"
                );
            }
            intents.insert(key.clone(), (e.enrolled, e.reason));
            if e.enrolled {
                let Some(loc) = locations.get(&pod.uid) else {
                    if !self.waiting.contains(&pod.uid) {
                        tracing::info!(
                            pod = %key,
                            uid = %pod.uid,
                            proc_root = %self.cfg.proc_root.display(),
                            "no process of the pod found on this node yet; will enroll it once found"
                        );
                    }
                    waiting.insert(pod.uid.clone());
                    continue;
                };
                if self.waiting.contains(&pod.uid) {
                    tracing::info!(pod = %key, pid = loc.pid, "found the pod's processes");
                }
                w.netns = loc.netns.clone();
                w.cgroup = Some(loc.cgroup.clone());
            }
            workloads.insert(key, w);
        }
        self.intents = intents;
        self.waiting = waiting;
        self.locations = locations;

        let mut probe_sources = self.cfg.probe_sources.clone();
        for addrs in self.node.live().values() {
            probe_sources.extend(addrs.iter().copied());
        }
        probe_sources.sort();
        probe_sources.dedup();
        let snapshot = Snapshot {
            generation: 0,
            node: NodeInfo {
                name: self.cfg.node_name.clone(),
                probe_sources,
            },
            workloads,
            services: model::build_services(self.services.live(), self.slices.live()),
            policies: Policies {
                authorization: self.authorization.live().values().cloned().collect(),
                peer_authentication: self.peer_authentication.live().values().cloned().collect(),
            },
            index: Default::default(),
        };
        let before = self.store.current().generation;
        let generation = self.store.publish_snapshot(snapshot);
        if !self.published {
            self.published = true;
            let snap = self.store.current();
            let local = snap.workloads.values().filter(|w| w.node.is_none());
            tracing::info!(
                generation,
                local_pods = local.clone().count(),
                enrolled = local.filter(|w| w.enrolled).count(),
                remote_pods = snap.workloads.values().filter(|w| w.node.is_some()).count(),
                services = snap.services.len(),
                authorization_policies = snap.policies.authorization.len(),
                peer_authentications = snap.policies.peer_authentication.len(),
                "kubernetes source synced"
            );
            let _ = self.synced_tx.send(true);
        } else if generation != before {
            tracing::debug!(generation, "kubernetes state published");
        }
    }

    /// Looks for the enrolled pods' processes again; whether anything moved
    /// (a pod found, a sandbox re-created, a process gone).
    async fn rediscovery_changed(&mut self) -> bool {
        if !self.published {
            return false;
        }
        let wanted: BTreeSet<String> = self
            .pods
            .live()
            .values()
            .filter(|p| self.intents.get(&p.key()).is_some_and(|(e, _)| *e))
            .map(|p| p.uid.clone())
            .collect();
        let found = self.locate(wanted).await;
        found != self.locations
    }

    async fn locate(&mut self, wanted: BTreeSet<String>) -> BTreeMap<String, PodLocation> {
        let Some(mut discovery) = self.discovery.take() else {
            return BTreeMap::new();
        };
        let proc_root = discovery.proc_root().to_owned();
        match tokio::task::spawn_blocking(move || {
            let found = discovery.locate(&wanted);
            (discovery, found)
        })
        .await
        {
            Ok((discovery, found)) => {
                self.discovery = Some(discovery);
                found
            }
            Err(e) => {
                tracing::error!(error = %e, proc_root = %proc_root.display(), "pod discovery failed");
                self.discovery = Some(Discovery::new(proc_root, self.cfg.cgroup_root.clone()));
                BTreeMap::new()
            }
        }
    }
}

/// Whether an event shows the watch working (not just restarting).
fn progress<T>(ev: &KindEvent<T>) -> bool {
    !matches!(ev, KindEvent::Init)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_https_client_builds_with_the_single_tls_provider() {
        // Building the TLS configuration panics when rustls has more than one
        // crypto provider compiled in and none installed: catch that here,
        // without a server (nothing is sent).
        client(Some("https://127.0.0.1:6443"))
            .await
            .expect("https client");
        match client(Some("not a url")).await {
            Err(e) => assert!(e.to_string().contains("--api-server"), "{e}"),
            Ok(_) => panic!("a bad URL was accepted"),
        }
    }

    #[test]
    fn flags_make_the_config() {
        let args = KubeArgs {
            kube: true,
            node_name: Some("n1".into()),
            pod_namespace: Some("mesh-system".into()),
            exclude_namespaces: vec!["monitoring".into()],
            probe_sources: vec!["::ffff:10.0.0.1".parse().expect("ip")],
            ..KubeArgs::default()
        };
        let cfg = args.config().expect("config");
        assert_eq!(cfg.node_name, "n1");
        assert!(
            ["kube-system", "mesh-system", "monitoring"]
                .iter()
                .all(|ns| cfg.excluded_namespaces.contains(*ns))
        );
        assert_eq!(
            cfg.probe_sources,
            vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]
        );
        let e = KubeArgs::default().config().expect_err("no node name");
        assert!(e.to_string().contains("NODE_NAME"), "{e}");
    }
}
