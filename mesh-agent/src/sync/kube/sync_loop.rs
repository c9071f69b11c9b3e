//! The sync loop: applies the watch tasks' messages to the caches, handles
//! outages (logged once, their end checked with `GET /version`), reports
//! start-up progress, finds the enrolled pods' processes, and publishes the
//! snapshots [`snapshot::build`] makes, logging what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use kube::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    caches::Caches,
    config::KubeConfig,
    snapshot::{self, Change, Decisions},
    watch::{Backoff, Kind, WatchFailure},
    watches::Msg,
};
use crate::{
    state::{MissingKind, MissingReason, Store},
    sync::discovery::{Discovery, PodLocation},
};

/// How often start-up reports which kinds are still not listed.
const STARTUP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// When the changes not yet published are due, as istiod debounces its
/// pushes: once no change came for `quiet`, and at most `max` after the
/// first. A tenant updating an object in a loop makes the node rebuild
/// (compile every policy and route, re-decide every open connection) at
/// most once per `max`, not once per update. A failed publication is
/// tried again at the time [`Self::failed`] is given, changes or not.
#[derive(Debug)]
pub(super) struct Debounce {
    quiet: Duration,
    max: Duration,
    /// The first and the last change not yet published.
    pending: Option<(Instant, Instant)>,
    retry_at: Option<Instant>,
}

impl Debounce {
    pub(super) fn new(quiet: Duration, max: Duration) -> Self {
        Self {
            quiet,
            max,
            pending: None,
            retry_at: None,
        }
    }

    /// A change at `now`.
    pub(super) fn changed(&mut self, now: Instant) {
        let first = self.pending.map_or(now, |(first, _)| first);
        self.pending = Some((first, now));
    }

    /// When to publish: `None` while nothing waits.
    pub(super) fn due(&self) -> Option<Instant> {
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        let (first, last) = self.pending?;
        let quiet = last.checked_add(self.quiet).unwrap_or(last);
        let max = first.checked_add(self.max).unwrap_or(first);
        Some(quiet.min(max))
    }

    /// Everything was published.
    pub(super) fn published(&mut self) {
        self.pending = None;
        self.retry_at = None;
    }

    /// Publishing failed: try again at `at`.
    pub(super) fn failed(&mut self, at: Instant) {
        self.retry_at = Some(at);
    }
}

/// The loop's state.
pub struct SyncLoop {
    client: Client,
    cfg: KubeConfig,
    store: Store,
    synced_tx: tokio::sync::watch::Sender<bool>,
    caches: Caches,
    /// Discovery (moved into a blocking task while it scans).
    discovery: Option<Discovery>,
    /// Kinds whose last watch attempt failed with an outage-like error.
    failing: BTreeSet<Kind>,
    /// Whether the outage warning was logged and its end not yet.
    outage_logged: bool,
    /// Kinds whose absence (404) or prohibition (403) was logged.
    reported: BTreeSet<(Kind, u16)>,
    /// The enrollment decisions of the last publication, to log changes once.
    decisions: Decisions,
    /// Where the enrolled pods were found at the last publication.
    locations: BTreeMap<String, PodLocation>,
    published: bool,
    started: Instant,
    last_report: Instant,
}

impl SyncLoop {
    /// A loop publishing into `store`, telling `synced_tx` after the first publication.
    pub fn new(
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
            caches: Caches::default(),
            discovery: Some(discovery),
            failing: BTreeSet::new(),
            outage_logged: false,
            reported: BTreeSet::new(),
            decisions: Decisions::default(),
            locations: BTreeMap::new(),
            published: false,
            started: Instant::now(),
            last_report: Instant::now(),
        }
    }

    fn all_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.caches.synced(*k))
    }

    /// Runs until `cancel` or until every watch task is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        tracing::info!(
            node = %self.cfg.node_name,
            proc_root = %self.cfg.proc_root.display(),
            "kubernetes source: listing pods, namespaces, services, endpointslices, policies, routing objects"
        );
        let mut rediscover = tokio::time::interval(self.cfg.rediscover_interval);
        rediscover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut publish_backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut debounce = Debounce::new(self.cfg.debounce_quiet, self.cfg.debounce_max);
        let mut next_probe = tokio::time::Instant::now();
        loop {
            let probing = !self.failing.is_empty();
            let due = debounce.due();
            let mut publish_now = false;
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
                () = sleep_until_due(due), if due.is_some() => {
                    publish_now = true;
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
            // The first publication makes the agent ready: at once. Later
            // ones are debounced.
            if dirty {
                debounce.changed(Instant::now());
            }
            if publish_now || !self.published {
                if self.publish().await {
                    debounce.published();
                    publish_backoff.reset();
                } else {
                    debounce.failed(Instant::now() + publish_backoff.next_delay());
                }
            }
        }
    }

    /// Applies one message; returns whether the cached state changed.
    fn handle(&mut self, msg: Msg) -> bool {
        let applied = match msg {
            Msg::Failed(kind, failure) => return self.failed(kind, failure),
            Msg::Event(event) => self.caches.apply(event),
        };
        let kind = applied.kind;
        if applied.progressed && self.failing.remove(&kind) {
            tracing::debug!(kind = %kind, "watch making progress again");
            if self.failing.is_empty() && self.outage_logged {
                self.outage_logged = false;
                tracing::info!("Kubernetes API server reachable again; state converging");
            }
        }
        if applied.progressed {
            let before = self.reported.len();
            self.reported.retain(|(k, _)| *k != kind);
            if self.reported.len() != before {
                self.report_missing();
            }
        }
        applied.changed
    }

    fn failed(&mut self, kind: Kind, failure: WatchFailure) -> bool {
        match failure.code {
            Some(410) => {
                tracing::info!(kind = %kind, "watch expired (410 Gone); relisting");
                false
            }
            Some(code @ (403 | 404)) => {
                let first = self.reported.insert((kind, code));
                if first {
                    self.report_missing();
                }
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
                            "; treating it as empty (install its CRD from deploy/crds/ to use it)"
                        } else {
                            ""
                        }
                    );
                }
                if kind.optional() {
                    return self.caches.mark_absent(kind);
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

    /// Shows the kinds the server does not serve or forbids in the store
    /// (`/config_dump` `sources.missing_kinds`), not only in the log.
    fn report_missing(&self) {
        let kinds = self
            .reported
            .iter()
            .filter_map(|(kind, code)| {
                let reason = match code {
                    404 => MissingReason::NotServed,
                    403 => MissingReason::Forbidden,
                    _ => return None,
                };
                Some(MissingKind {
                    resource: kind.resource().to_owned(),
                    reason,
                })
            })
            .collect();
        self.store.set_missing_kinds(kinds);
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
            .filter(|k| !self.caches.synced(**k))
            .map(|k| k.resource())
            .collect();
        tracing::warn!(
            waited_secs = self.started.elapsed().as_secs(),
            missing = %missing.join(","),
            "still waiting for the first list from the Kubernetes API server; not ready"
        );
    }

    /// Builds and publishes a snapshot of the caches; whether it was
    /// published (a build that panicked is logged, the last published state
    /// stays in force, and the caller tries again).
    async fn publish(&mut self) -> bool {
        // One set of objects for the pods' locations and the build. This
        // task applies no event until the build is done, so the caches lend
        // them uncopied.
        let objects = self.caches.shared();
        let wanted = snapshot::to_locate(&objects.objects(), &self.cfg);
        let locations = self.locate(wanted).await;
        // Building and publishing (which compiles the policies and routes)
        // take time proportional to the cluster's objects: off mesh-main's
        // one worker, which also runs certificate rotation, the admin
        // servers and policy re-checks.
        let (cfg, previous, store) = (self.cfg.clone(), self.decisions.clone(), self.store.clone());
        let before = self.store.current().generation;
        let published = tokio::task::spawn_blocking(move || {
            let built = snapshot::build(&objects.objects(), &cfg, &locations, &previous);
            for change in &built.changes {
                Self::log(&cfg, change);
            }
            let generation = store.publish_snapshot(built.snapshot);
            (built.decisions, locations, generation)
        })
        .await;
        let generation = match published {
            Ok((decisions, locations, generation)) => {
                self.decisions = decisions;
                self.locations = locations;
                generation
            }
            Err(e) => {
                tracing::error!(error = %e, "publishing the Kubernetes state failed; the last published state stays in force, retrying");
                return false;
            }
        };
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
                destination_rules = snap.routing.destination_rules.len(),
                virtual_services = snap.routing.virtual_services.len(),
                tcp_routes = snap.routing.tcp_routes.len(),
                "kubernetes source synced"
            );
            let _ = self.synced_tx.send(true);
        } else if generation != before {
            tracing::debug!(generation, "kubernetes state published");
        }
        true
    }

    /// Logs what a build decided, before its snapshot is published (so a
    /// change is in the log by the time anything acts on it).
    fn log(cfg: &KubeConfig, change: &Change) {
        match change {
            Change::Decided {
                pod,
                enrolled,
                reason,
            } => tracing::info!(
                pod = %pod,
                enroll = *enrolled,
                reason = *reason,
                "pod enrollment decided"
            ),
            Change::Waiting { pod, uid } => tracing::info!(
                pod = %pod,
                uid = %uid,
                proc_root = %cfg.proc_root.display(),
                "no process of the pod found on this node yet; will enroll it once found"
            ),
            Change::Found { pod, pid } => {
                tracing::info!(pod = %pod, pid = *pid, "found the pod's processes")
            }
        }
    }

    /// Looks for the enrolled pods' processes again; whether anything moved
    /// (a pod found, a sandbox re-created, a process gone).
    async fn rediscovery_changed(&mut self) -> bool {
        if !self.published {
            return false;
        }
        let wanted: BTreeSet<String> = self
            .caches
            .pods()
            .values()
            .filter(|p| self.decisions.enrolled(&p.key()))
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

/// Sleeps until `due` (a `std` instant), or for ever without one.
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn changes_are_published_after_a_quiet_time_and_at_most_max_after_the_first() {
        let mut d = Debounce::new(100 * MS, 1000 * MS);
        let t0 = Instant::now();
        assert_eq!(d.due(), None, "nothing waits");
        d.changed(t0);
        assert_eq!(d.due(), Some(t0 + 100 * MS));
        // A change every 50 ms: never 100 ms of quiet, due 1 s after the
        // first all the same.
        for i in 1..=30u32 {
            d.changed(t0 + 50 * MS * i);
        }
        assert_eq!(d.due(), Some(t0 + 1000 * MS));
        d.published();
        assert_eq!(d.due(), None);
        // The next burst starts its own 1 s.
        let t1 = t0 + 2000 * MS;
        d.changed(t1);
        d.changed(t1 + 60 * MS);
        assert_eq!(d.due(), Some(t1 + 160 * MS));
    }

    #[test]
    fn a_failed_publication_is_retried_at_its_time_changes_or_not() {
        let mut d = Debounce::new(100 * MS, 1000 * MS);
        let t0 = Instant::now();
        d.changed(t0);
        d.failed(t0 + 800 * MS);
        assert_eq!(d.due(), Some(t0 + 800 * MS));
        d.changed(t0 + 900 * MS);
        assert_eq!(d.due(), Some(t0 + 800 * MS), "the retry's time holds");
        d.published();
        assert_eq!(d.due(), None);
    }
}
