//! Authorization of inbound connections: the decision for each new
//! connection, with the policies compiled in the current snapshot (the state
//! compiles them, once per change), and the re-check of open ones when the
//! compiled policies change (a connection that is now denied is closed, and
//! that is logged).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

pub use crate::state::DEFAULT_ROOT_NAMESPACE;
use crate::{
    policy::{Connection, Decision, PolicyStore, WorkloadRef},
    state::{CompiledPolicies, Snapshot, Store, WorkloadKey},
};

/// The attributes a decision is made on, owned (kept for re-checks).
#[derive(Clone, Debug)]
pub struct Subject {
    /// The verified peer identity (`spiffe://…`), `None` for plaintext.
    pub principal: Option<String>,
    /// The client address: the connection's peer (for HBONE, the tunnel's
    /// TCP peer, never a header the peer sends).
    pub source_ip: IpAddr,
    /// The destination the client asked for.
    pub destination: SocketAddr,
    /// The destination workload.
    pub workload: WorkloadKey,
    /// Its labels (policy selectors).
    pub labels: BTreeMap<String, String>,
}

impl Subject {
    fn decide(&self, store: &PolicyStore) -> Decision {
        let conn = Connection {
            source_principal: self.principal.as_deref(),
            source_ip: self.source_ip,
            remote_ip: None,
            destination_ip: self.destination.ip(),
            destination_port: self.destination.port(),
        };
        let workload = WorkloadRef {
            namespace: &self.workload.namespace,
            labels: &self.labels,
        };
        store.evaluate(&conn, &workload)
    }
}

struct Open {
    subject: Subject,
    cancel: CancellationToken,
}

impl Open {
    /// Decides the connection again with `store` and cancels it if that
    /// denies it (logged with `cause`); whether it did.
    fn redecide(&self, store: &PolicyStore, cause: &'static str) -> bool {
        let Decision::Deny { reason, .. } = self.subject.decide(store) else {
            return false;
        };
        tracing::info!(
            dst_workload = %self.subject.workload,
            src = %self.subject.source_ip,
            src_identity = self.subject.principal.as_deref().unwrap_or("none"),
            dst = %self.subject.destination,
            reason = %reason,
            cause,
            "open connection closed by policy change"
        );
        self.cancel.cancel();
        true
    }
}

/// A new connection's decision, with the compiled policies it was made
/// with (for [`Authz::track`]).
pub struct Checked {
    /// The decision.
    pub decision: Decision,
    policies: Arc<CompiledPolicies>,
}

/// The authorizer.
pub struct Authz {
    /// The state: each decision reads the compiled policies of its snapshot.
    store: Store,
    /// The compiled policies open connections were last checked against.
    applied: Mutex<Arc<CompiledPolicies>>,
    open: Mutex<HashMap<u64, Open>>,
    next_id: AtomicU64,
}

/// Keeps a connection registered for re-checks; unregisters on drop.
pub struct Tracked {
    authz: Arc<Authz>,
    id: u64,
    /// Fires when a policy change denies the connection.
    pub cancel: CancellationToken,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.authz
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Authz {
    /// An authorizer deciding with the policies `store` publishes.
    pub fn new(store: Store) -> Self {
        let applied = store.current().compiled.clone();
        Self {
            store,
            applied: Mutex::new(applied),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Decides a new connection (the caller reports the decision).
    pub fn check(&self, subject: &Subject) -> Checked {
        let policies = self.store.current().compiled.clone();
        let decision = subject.decide(&policies.store);
        for audit in decision.audited_by() {
            tracing::info!(policy = %audit, dst_workload = %subject.workload, src = %subject.source_ip, "connection matched an AUDIT policy");
        }
        Checked { decision, policies }
    }

    /// Registers a connection `checked` allowed for re-checks on policy
    /// changes. A change published after the decision may have been
    /// re-checked before the connection was registered here; so once it is
    /// registered, if other policies are in force than it was decided with,
    /// it is decided again with them (and cancelled at once if denied).
    /// Under the lock `recheck` walks with: either that walk sees this
    /// connection, or its policies were published before this looks.
    pub fn track(self: &Arc<Self>, subject: Subject, checked: Checked) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let conn = Open {
            subject,
            cancel: cancel.clone(),
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.store.current().compiled.clone();
        if !same_policies(&now, &checked.policies) {
            conn.redecide(&now.store, "published_during_authorization");
        }
        open.insert(id, conn);
        drop(open);
        Tracked {
            authz: self.clone(),
            id,
            cancel,
        }
    }

    /// Re-checks open connections against `snapshot` and closes those now
    /// denied. A connection is decided again when the compiled policies
    /// differ in content from the ones open connections were last checked
    /// against (an edit that changes nothing enforced — a label, an
    /// annotation, a re-apply — re-decides nothing), or when its workload's
    /// labels (the policies' selectors) have changed since its last
    /// decision: a pod relabelled into a DENY's selector, or out of an
    /// ALLOW's, loses its open connections as it would on a policy change.
    pub fn recheck(&self, snapshot: &Snapshot) -> Rechecked {
        let compiled = &snapshot.compiled;
        let policies_changed = {
            let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = !same_policies(&applied, compiled);
            *applied = compiled.clone();
            changed
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut done = Rechecked::default();
        for conn in open.values_mut() {
            let relabelled = match snapshot.workloads.get(&conn.subject.workload) {
                Some(w) if w.labels != conn.subject.labels => {
                    conn.subject.labels = w.labels.clone();
                    true
                }
                _ => false,
            };
            if !(policies_changed || relabelled) || conn.cancel.is_cancelled() {
                continue;
            }
            let cause = if relabelled { "relabelled" } else { "policies" };
            done.decided += 1;
            if conn.redecide(&compiled.store, cause) {
                done.closed += 1;
            }
        }
        done
    }
}

/// What [`Authz::recheck`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rechecked {
    /// Open connections decided again.
    pub decided: usize,
    /// Of those, the ones now denied and closed.
    pub closed: usize,
}

/// Whether `a` and `b` decide every connection alike: the same compiled
/// policies, or equal ones (compared only when they are not the same).
fn same_policies(a: &Arc<CompiledPolicies>, b: &Arc<CompiledPolicies>) -> bool {
    Arc::ptr_eq(a, b) || a.store == b.store
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Policies, Snapshot};

    fn subject() -> Subject {
        Subject {
            principal: Some("spiffe://cluster.local/ns/shop/sa/front".into()),
            source_ip: "10.0.0.7".parse().expect("ip"),
            destination: "10.0.1.9:8080".parse().expect("addr"),
            workload: WorkloadKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            labels: BTreeMap::new(),
        }
    }

    /// One AuthorizationPolicy in namespace `shop`: `name` with `spec`.
    fn policy(name: &str, spec: &str) -> Policies {
        let yaml = format!(
            "{{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: {name}, namespace: shop}}, spec: {spec}}}"
        );
        Policies {
            authorization: vec![serde_yaml::from_str(&yaml).expect("test policy")],
            peer_authentication: vec![],
        }
    }

    fn deny_all() -> Policies {
        policy("deny-all", "{action: DENY, rules: [{}]}")
    }

    #[test]
    fn decides_with_the_published_policies_and_rechecks_on_change_only() {
        let store = Store::new();
        let authz = Arc::new(Authz::new(store.clone()));
        let checked = authz.check(&subject());
        assert!(checked.decision.is_allowed());
        let tracked = authz.track(subject(), checked);
        // A change that is not a policy change re-checks nothing.
        store.publish(Default::default(), Default::default());
        assert_eq!(authz.recheck(&store.current()).closed, 0);

        store.publish_snapshot(Snapshot {
            policies: deny_all(),
            ..Default::default()
        });
        // New connections are decided with the published policies at once.
        assert!(!authz.check(&subject()).decision.is_allowed());
        let snapshot = store.current();
        assert_eq!(authz.recheck(&snapshot).closed, 1);
        assert!(tracked.cancel.is_cancelled());
        // Applied once: the same policies again close nothing more.
        assert_eq!(authz.recheck(&snapshot), Rechecked::default());
    }

    /// An edit that changes nothing enforced (the object's labels and
    /// annotations, as a tenant's apply loop would) compiles to an equal
    /// store: open connections are not decided again. A change of a rule is.
    #[test]
    fn an_edit_that_changes_nothing_enforced_rechecks_nothing() {
        let allow = |meta: &str| {
            let yaml = format!(
                "{{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: allow-front, namespace: shop{meta}}}, spec: {{action: ALLOW, rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/front]}}}}]}}]}}}}"
            );
            Policies {
                authorization: vec![serde_yaml::from_str(&yaml).expect("test policy")],
                peer_authentication: vec![],
            }
        };
        let store = Store::new();
        store.publish_snapshot(Snapshot {
            policies: allow(""),
            ..Default::default()
        });
        let authz = Arc::new(Authz::new(store.clone()));
        let checked = authz.check(&subject());
        assert!(checked.decision.is_allowed());
        let tracked = authz.track(subject(), checked);
        assert_eq!(authz.recheck(&store.current()), Rechecked::default());
        let before = store.current().compiled.clone();
        for n in 0..3 {
            store.publish_snapshot(Snapshot {
                policies: allow(&format!(
                    ", resourceVersion: '{n}', labels: {{edit: e{n}}}, annotations: {{note: n{n}}}"
                )),
                ..Default::default()
            });
            let now = store.current();
            assert!(
                !Arc::ptr_eq(&before, &now.compiled),
                "the edit was compiled anew"
            );
            assert_eq!(authz.recheck(&now), Rechecked::default(), "edit {n}");
        }
        // A rule changes: every open connection is decided again.
        store.publish_snapshot(Snapshot {
            policies: policy(
                "allow-front",
                "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/other]}}]}]}",
            ),
            ..Default::default()
        });
        assert_eq!(
            authz.recheck(&store.current()),
            Rechecked {
                decided: 1,
                closed: 1
            }
        );
        assert!(tracked.cancel.is_cancelled());
    }

    #[test]
    fn a_policy_change_during_authorization_still_reaches_the_connection() {
        let store = Store::new();
        let authz = Arc::new(Authz::new(store.clone()));
        // Allowed with the policies of the moment...
        let checked = authz.check(&subject());
        assert!(checked.decision.is_allowed());
        // ...then a deny-all is published and re-checked before the
        // connection is registered: the re-check cannot see it.
        store.publish_snapshot(Snapshot {
            policies: deny_all(),
            ..Default::default()
        });
        assert_eq!(authz.recheck(&store.current()).closed, 0);
        let tracked = authz.track(subject(), checked);
        assert!(
            tracked.cancel.is_cancelled(),
            "the connection outlived a deny-all"
        );
        // Decided with the policies in force: nothing to do again.
        let checked = authz.check(&subject());
        assert!(!checked.decision.is_allowed());
    }

    #[test]
    fn a_pod_relabelled_into_a_denys_selector_loses_its_open_connections() {
        use crate::state::Workload;
        let policies = policy(
            "deny-db",
            "{selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}",
        );
        let pod = |app: &str| Workload {
            name: "web".into(),
            namespace: "shop".into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ..Workload::default()
        };
        let with = |w: Workload| Snapshot {
            policies: policies.clone(),
            workloads: [(w.key(), w)].into(),
            ..Default::default()
        };
        let store = Store::new();
        store.publish_snapshot(with(pod("web")));
        let authz = Arc::new(Authz::new(store.clone()));
        let subject = Subject {
            labels: pod("web").labels,
            ..subject()
        };
        let checked = authz.check(&subject);
        assert!(checked.decision.is_allowed());
        let tracked = authz.track(subject, checked);
        // The same policies, the pod's labels changed: into the DENY.
        store.publish_snapshot(with(pod("db")));
        assert_eq!(authz.recheck(&store.current()).closed, 1);
        assert!(tracked.cancel.is_cancelled());
    }
}
