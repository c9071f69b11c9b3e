//! Authorization of inbound connections: the current policy store (rebuilt
//! from the state's policies on every change), the decision for each new
//! connection, and the re-check of open ones when policies change (a
//! connection that is now denied is closed, and that is logged).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    policy::{Connection, Decision, PolicyStore, WorkloadRef},
    state::{Policies, WorkloadKey},
};

/// Istio's default root namespace (mesh-wide policies live there).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The attributes a decision is made on, owned (kept for re-checks).
#[derive(Clone, Debug)]
pub struct Subject {
    /// The verified peer identity (`spiffe://…`), `None` for plaintext.
    pub principal: Option<String>,
    /// The client address (from `forwarded` for HBONE, the peer for plaintext).
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

/// The authorizer.
pub struct Authz {
    root_namespace: String,
    store: RwLock<Arc<PolicyStore>>,
    applied: Mutex<Option<Policies>>,
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
    /// An authorizer with no policies (everything allowed) and `root_namespace`.
    pub fn new(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            store: RwLock::new(Arc::new(PolicyStore::new(root_namespace))),
            applied: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// The current policy store.
    pub fn current(&self) -> Arc<PolicyStore> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Decides a new connection (the caller reports the decision).
    pub fn check(&self, subject: &Subject) -> Decision {
        let decision = subject.decide(&self.current());
        for audit in decision.audited_by() {
            tracing::info!(policy = %audit, dst_workload = %subject.workload, src = %subject.source_ip, "connection matched an AUDIT policy");
        }
        decision
    }

    /// Registers an allowed connection for re-checks on policy changes.
    pub fn track(self: &Arc<Self>, subject: Subject) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Open {
                    subject,
                    cancel: cancel.clone(),
                },
            );
        Tracked {
            authz: self.clone(),
            id,
            cancel,
        }
    }

    /// Rebuilds the store when `policies` differ from the last applied set,
    /// logs what the engine rejected or narrowed, and closes open connections
    /// the new policies deny. Returns how many were closed.
    pub fn update(&self, policies: &Policies) -> usize {
        {
            let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
            if applied.as_ref() == Some(policies) {
                return 0;
            }
            *applied = Some(policies.clone());
        }
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        let docs = policies
            .authorization
            .iter()
            .chain(&policies.peer_authentication);
        for (i, doc) in docs.enumerate() {
            let parsed = match serde_yaml::to_value(doc) {
                Ok(value) => crate::policy::parse_value(value, i),
                Err(e) => {
                    tracing::error!(document = i, error = %e, "policy rejected: not representable");
                    continue;
                }
            };
            resources.extend(parsed.resources);
            errors.extend(parsed.errors);
        }
        let (store, report) = PolicyStore::build(&self.root_namespace, &resources);
        for e in errors.iter().chain(&report.errors) {
            tracing::error!(error = %e, "policy rejected");
        }
        for w in &report.warnings {
            tracing::warn!(warning = %w, "policy enforced more strictly than written");
        }
        tracing::info!(
            authorization_policies = store.authorization_policy_count(),
            peer_authentications = store.peer_authentication_count(),
            rejected = errors.len() + report.errors.len(),
            "policies applied"
        );
        let store = Arc::new(store);
        *self.store.write().unwrap_or_else(PoisonError::into_inner) = store.clone();
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for conn in open.values() {
            if let Decision::Deny { reason, .. } = conn.subject.decide(&store) {
                tracing::info!(
                    dst_workload = %conn.subject.workload,
                    src = %conn.subject.source_ip,
                    src_identity = conn.subject.principal.as_deref().unwrap_or("none"),
                    dst = %conn.subject.destination,
                    reason = %reason,
                    "open connection closed by policy change"
                );
                conn.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
