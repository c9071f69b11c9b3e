//! The pod lifecycle with fakes of the kernel ([`PodKernel`]) and of the
//! proxy ([`PodProxy`]): no root, no eBPF, no netns. A pod's "netns" is a
//! temporary file (its identity is the file's device and inode, as for a
//! real nsfs file); its listeners are real sockets on loopback.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use super::*;
use crate::{
    datapath::DatapathError,
    identity::TrustDomain,
    proxy::ListenerSet,
    state::{NodeInfo, Snapshot},
};

/// What the fakes saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// `PodKernel::publish`.
    Publish { slot: u32, cookie: u64 },
    /// `PodKernel::withdraw`; `serving`: whether the pod's proxy was still
    /// serving its listeners at that moment.
    Withdraw {
        slot: u32,
        cookie: u64,
        serving: bool,
    },
    /// `PodProxy::open` (entered the netns, opened listeners).
    Open { cookie: u64 },
    /// `PodProxy::serve`.
    Serve { cookie: u64, identity: String },
    /// `PodKernel::sweep`, with the cookies it keeps.
    Sweep(Vec<u64>),
}

#[derive(Default)]
struct Shared {
    events: Vec<Event>,
    /// The latest serve's cancellation token of each netns cookie.
    serving: HashMap<u64, CancellationToken>,
    /// Cookies whose publish fails.
    fail_publish: HashSet<u64>,
    /// The cookie of each netns path (assigned at first open).
    cookies: HashMap<PathBuf, u64>,
    /// Identities kept by the last `retain_identities`.
    retained: Vec<String>,
}

#[derive(Clone, Default)]
struct Fakes(Arc<Mutex<Shared>>);

impl Fakes {
    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes the events seen so far.
    fn events(&self) -> Vec<Event> {
        self.with(|s| std::mem::take(&mut s.events))
    }
}

impl PodKernel for Fakes {
    fn publish(
        &mut self,
        slot: u32,
        cookie: u64,
        _pod: &PodKernelState<'_>,
        _inbound: InboundSockets<'_>,
    ) -> Result<(), PublishError> {
        self.with(|s| {
            s.events.push(Event::Publish { slot, cookie });
            if s.fail_publish.contains(&cookie) {
                return Err(DatapathError::Map {
                    map: "POD_ADDRS",
                    message: "full".into(),
                }
                .into());
            }
            Ok(())
        })
    }

    fn withdraw(&mut self, slot: u32, cookie: u64, _pod: &PodKernelState<'_>) {
        self.with(|s| {
            let serving = s.serving.get(&cookie).is_some_and(|t| !t.is_cancelled());
            s.events.push(Event::Withdraw {
                slot,
                cookie,
                serving,
            });
        });
    }

    fn sweep(&mut self, keep: &[(u64, PodKernelState<'_>)]) -> Result<(), DatapathError> {
        let mut cookies: Vec<u64> = keep.iter().map(|(c, _)| *c).collect();
        cookies.sort_unstable();
        self.with(|s| s.events.push(Event::Sweep(cookies)));
        Ok(())
    }

    fn sync_probe_sources(&mut self, _sources: &[IpAddr]) -> Result<(), DatapathError> {
        Ok(())
    }
}

fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

impl PodProxy for Fakes {
    type Netns = ();

    fn trust_domain(&self) -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn open(
        &self,
        w: &Workload,
        _netns_id: NetnsId,
    ) -> Result<((), PodListeners, u64), EnrollError> {
        let cookie = self.with(|s| {
            let next = 100 + s.cookies.len() as u64;
            let cookie = *s.cookies.entry(w.netns.clone()).or_insert(next);
            s.events.push(Event::Open { cookie });
            cookie
        });
        let listeners = PodListeners {
            first: ListenerSet {
                outbound: vec![loopback_listener()],
                inbound_plaintext: loopback_listener(),
                inbound_hbone: loopback_listener(),
            },
            more: Vec::new(),
            reply_routes: Default::default(),
        };
        Ok(((), listeners, cookie))
    }

    fn serve(
        &self,
        _w: &Workload,
        identity: &SpiffeId,
        cookie: u64,
        _netns: &(),
        _listeners: PodListeners,
    ) -> CancellationToken {
        let token = CancellationToken::new();
        self.with(|s| {
            s.events.push(Event::Serve {
                cookie,
                identity: identity.to_string(),
            });
            s.serving.insert(cookie, token.clone());
        });
        token
    }

    fn retain_identities(&self, keep: &[SpiffeId]) {
        let mut ids: Vec<String> = keep.iter().map(ToString::to_string).collect();
        ids.sort();
        self.with(|s| s.retained = ids);
    }
}

/// A directory of fake netns files, removed on drop.
struct NetnsDir(PathBuf);

impl NetnsDir {
    fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-pods-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A new fake netns named `name`.
    fn netns(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, b"").unwrap();
        path
    }
}

impl Drop for NetnsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod(name: &str, ip: &str, netns: &Path) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        ips: vec![ip.parse().unwrap()],
        netns: netns.to_owned(),
        enrolled: true,
        ..Workload::default()
    }
}

fn snapshot(pods: &[&Workload]) -> Snapshot {
    Snapshot {
        node: NodeInfo::default(),
        workloads: pods
            .iter()
            .map(|w| (w.key(), (*w).clone()))
            .collect::<BTreeMap<_, _>>(),
        ..Snapshot::default()
    }
}

fn new_enroller() -> (Enroller<Fakes, Fakes>, Fakes) {
    let fakes = Fakes::default();
    (Enroller::new(fakes.clone(), fakes.clone()), fakes)
}

fn key(name: &str) -> WorkloadKey {
    WorkloadKey {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn publish(slot: u32, cookie: u64) -> Event {
    Event::Publish { slot, cookie }
}

fn withdraw(slot: u32, cookie: u64, serving: bool) -> Event {
    Event::Withdraw {
        slot,
        cookie,
        serving,
    }
}

/// The slot the first pod gets (slots are handed out from 0).
const FIRST_SLOT: u32 = 0;

#[test]
fn enroll_opens_publishes_then_serves_each_pod_in_its_own_slot() {
    let dir = NetnsDir::new();
    let (a, b) = (
        pod("a", "10.0.0.1", &dir.netns("a")),
        pod("b", "10.0.0.2", &dir.netns("b")),
    );
    let (mut enroller, fakes) = new_enroller();
    let report = enroller.reconcile(&snapshot(&[&a, &b]));
    assert_eq!(report.enrolled, 2);
    assert_eq!(report.added, vec![key("a"), key("b")]);
    assert!(report.removed.is_empty() && report.failed.is_empty());
    assert_eq!(
        fakes.events(),
        vec![
            Event::Open { cookie: 100 },
            publish(FIRST_SLOT, 100),
            Event::Serve {
                cookie: 100,
                identity: "spiffe://cluster.local/ns/default/sa/a".into()
            },
            Event::Open { cookie: 101 },
            publish(FIRST_SLOT + 1, 101),
            Event::Serve {
                cookie: 101,
                identity: "spiffe://cluster.local/ns/default/sa/b".into()
            },
            Event::Sweep(vec![100, 101]),
        ]
    );
    assert_eq!(
        fakes.with(|s| s.retained.clone()),
        vec![
            "spiffe://cluster.local/ns/default/sa/a".to_owned(),
            "spiffe://cluster.local/ns/default/sa/b".to_owned()
        ]
    );
    // Nothing changed: nothing happens but the sweep.
    let report = enroller.reconcile(&snapshot(&[&a, &b]));
    assert_eq!(report.enrolled, 2);
    assert!(report.added.is_empty() && report.removed.is_empty());
    assert_eq!(fakes.events(), vec![Event::Sweep(vec![100, 101])]);
}

#[test]
fn update_in_place_keeps_the_slot_and_never_withdraws_capture() {
    let dir = NetnsDir::new();
    let a = pod("a", "10.0.0.1", &dir.netns("a"));
    let (mut enroller, fakes) = new_enroller();
    enroller.reconcile(&snapshot(&[&a]));
    let first = fakes.with(|s| s.serving[&100].clone());
    fakes.events();

    let mut changed = a.clone();
    changed.ips.push("10.0.0.9".parse().unwrap());
    changed.service_account = "renamed".into();
    let report = enroller.reconcile(&snapshot(&[&changed]));
    assert_eq!(report.enrolled, 1);
    assert!(report.added.is_empty() && report.removed.is_empty() && report.failed.is_empty());
    assert_eq!(
        fakes.events(),
        vec![
            publish(FIRST_SLOT, 100),
            Event::Serve {
                cookie: 100,
                identity: "spiffe://cluster.local/ns/default/sa/renamed".into()
            },
            Event::Sweep(vec![100]),
        ],
        "same slot and netns, no withdraw, no new listeners"
    );
    assert!(first.is_cancelled(), "the old accept loops stop");
    assert_eq!(
        fakes.with(|s| s.retained.clone()),
        vec!["spiffe://cluster.local/ns/default/sa/renamed".to_owned()],
        "the old identity is forgotten"
    );
}

#[test]
fn removal_withdraws_capture_before_the_listeners_stop_and_frees_the_slot() {
    let dir = NetnsDir::new();
    let (a, b) = (
        pod("a", "10.0.0.1", &dir.netns("a")),
        pod("b", "10.0.0.2", &dir.netns("b")),
    );
    let (mut enroller, fakes) = new_enroller();
    enroller.reconcile(&snapshot(&[&a]));
    fakes.events();

    let report = enroller.reconcile(&snapshot(&[]));
    assert_eq!(report.enrolled, 0);
    assert_eq!(report.removed, vec![key("a")]);
    assert_eq!(
        fakes.events(),
        vec![withdraw(FIRST_SLOT, 100, true), Event::Sweep(vec![]),],
        "capture is withdrawn while the listeners still serve"
    );
    assert!(fakes.with(|s| s.serving[&100].is_cancelled()));
    assert!(fakes.with(|s| s.retained.is_empty()));

    // The slot is free again.
    enroller.reconcile(&snapshot(&[&b]));
    assert!(fakes.events().contains(&publish(FIRST_SLOT, 101)));
}

#[test]
fn a_pod_moved_to_another_netns_is_withdrawn_then_enrolled_again() {
    let dir = NetnsDir::new();
    let a = pod("a", "10.0.0.1", &dir.netns("a"));
    let (mut enroller, fakes) = new_enroller();
    enroller.reconcile(&snapshot(&[&a]));
    fakes.events();

    let moved = pod("a", "10.0.0.1", &dir.netns("a-restarted"));
    let report = enroller.reconcile(&snapshot(&[&moved]));
    assert_eq!(report.enrolled, 1);
    assert_eq!(report.added, vec![key("a")]);
    assert!(report.removed.is_empty() && report.failed.is_empty());
    let events = fakes.events();
    assert_eq!(
        events[..3],
        [
            withdraw(FIRST_SLOT, 100, true),
            Event::Open { cookie: 101 },
            publish(FIRST_SLOT, 101),
        ]
    );
}

#[test]
fn a_failed_enrollment_withdraws_what_it_wrote_frees_its_slot_and_is_retried() {
    let dir = NetnsDir::new();
    let a = pod("a", "10.0.0.1", &dir.netns("a"));
    let (mut enroller, fakes) = new_enroller();
    fakes.with(|s| s.fail_publish.insert(100));
    let report = enroller.reconcile(&snapshot(&[&a]));
    assert_eq!(report.enrolled, 0);
    assert!(report.added.is_empty());
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, key("a"));
    assert!(
        report.failed[0].1.contains("POD_ADDRS"),
        "{}",
        report.failed[0].1
    );
    assert_eq!(
        fakes.events(),
        vec![
            Event::Open { cookie: 100 },
            publish(FIRST_SLOT, 100),
            withdraw(FIRST_SLOT, 100, false),
            Event::Sweep(vec![]),
        ],
        "never served; what was written is withdrawn"
    );

    // The next pass retries it, in the same (freed) slot.
    fakes.with(|s| s.fail_publish.clear());
    let report = enroller.reconcile(&snapshot(&[&a]));
    assert_eq!(report.added, vec![key("a")]);
    assert!(fakes.events().contains(&publish(FIRST_SLOT, 100)));
}

#[test]
fn pods_sharing_a_netns_are_refused_and_an_enrolled_one_keeps_working() {
    let dir = NetnsDir::new();
    let shared = dir.netns("shared");
    let (a, b) = (pod("a", "10.0.0.1", &shared), pod("b", "10.0.0.2", &shared));

    // Both arrive together: neither is enrolled.
    let (mut enroller, fakes) = new_enroller();
    let report = enroller.reconcile(&snapshot(&[&a, &b]));
    assert_eq!(report.enrolled, 0);
    let failed: Vec<&WorkloadKey> = report.failed.iter().map(|(k, _)| k).collect();
    assert_eq!(failed, vec![&key("a"), &key("b")]);
    assert!(
        report.failed[0].1.contains("also claimed by pod default/b"),
        "{}",
        report.failed[0].1
    );
    assert_eq!(fakes.events(), vec![Event::Sweep(vec![])]);

    // One enrolled, the other arrives later: only the newcomer is refused.
    let (mut enroller, fakes) = new_enroller();
    enroller.reconcile(&snapshot(&[&a]));
    fakes.events();
    let report = enroller.reconcile(&snapshot(&[&a, &b]));
    assert_eq!(report.enrolled, 1);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, key("b"));
    assert!(
        report.failed[0].1.contains("also claimed by pod default/a"),
        "{}",
        report.failed[0].1
    );
    assert_eq!(fakes.events(), vec![Event::Sweep(vec![100])]);
}

#[test]
fn the_agents_own_netns_is_refused() {
    let own = pod("a", "10.0.0.1", Path::new("/proc/self/ns/net"));
    let (mut enroller, fakes) = new_enroller();
    let report = enroller.reconcile(&snapshot(&[&own]));
    assert_eq!(report.enrolled, 0);
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0]
            .1
            .contains("the agent's own network namespace"),
        "{}",
        report.failed[0].1
    );
    assert_eq!(fakes.events(), vec![Event::Sweep(vec![])]);
}

#[test]
fn a_pod_without_a_valid_identity_or_netns_is_reported_and_others_enroll() {
    let dir = NetnsDir::new();
    let mut bad_id = pod("bad-id", "10.0.0.1", &dir.netns("bad-id"));
    bad_id.service_account = "Not/Valid".into();
    let gone = pod("gone", "10.0.0.2", &dir.0.join("missing"));
    let ok = pod("ok", "10.0.0.3", &dir.netns("ok"));
    let (mut enroller, fakes) = new_enroller();
    let report = enroller.reconcile(&snapshot(&[&bad_id, &gone, &ok]));
    assert_eq!(report.enrolled, 1);
    assert_eq!(report.added, vec![key("ok")]);
    let failed: Vec<&WorkloadKey> = report.failed.iter().map(|(k, _)| k).collect();
    assert_eq!(failed, vec![&key("bad-id"), &key("gone")]);
    assert!(report.failed[0].1.contains("no valid identity"));
    assert!(report.failed[1].1.contains("cannot be opened"));
    // Only the valid pod got a slot (the first one).
    assert!(fakes.events().contains(&publish(FIRST_SLOT, 100)));
}

#[test]
fn remote_and_unenrolled_pods_are_not_enrolled() {
    let dir = NetnsDir::new();
    let mut remote = pod("remote", "10.0.0.1", &dir.netns("remote"));
    remote.node = Some("other-node".into());
    let mut off = pod("off", "10.0.0.2", &dir.netns("off"));
    off.enrolled = false;
    let (mut enroller, fakes) = new_enroller();
    let report = enroller.reconcile(&snapshot(&[&remote, &off]));
    assert_eq!(report.enrolled, 0);
    assert!(report.added.is_empty() && report.failed.is_empty());
    assert_eq!(fakes.events(), vec![Event::Sweep(vec![])]);
}
