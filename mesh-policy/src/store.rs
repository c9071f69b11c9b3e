//! The indexed policy set: which policies apply to a workload (scopes,
//! selection by labels) and in which order they decide a connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::compile;
use crate::connection::{Connection, WorkloadRef};
use crate::decision::{Decision, DenyReason, MtlsMode, MtlsSetting};
use crate::error::{PolicyName, PolicyWarning, Report};
use crate::model::Kind;
use crate::parse::{Resource, parse_documents};
use crate::rule::{CompiledAuthz, CompiledPeerAuthn, Ctx, Effect, Origin, Scope, WrittenMode};

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Selector policies filed under one label value: (full selector, policy).
type Selected<T> = Vec<(BTreeMap<String, String>, T)>;

/// Policies of one level (the mesh, or one namespace): those without a
/// selector, and those with one, indexed by one of their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bucket<T> {
    wide: Vec<T>,
    /// label key -> label value -> policies.
    by_label: HashMap<String, HashMap<String, Selected<T>>>,
}

impl<T> Default for Bucket<T> {
    fn default() -> Self {
        Self {
            wide: Vec::new(),
            by_label: HashMap::new(),
        }
    }
}

impl<T> Bucket<T> {
    fn insert(&mut self, labels: BTreeMap<String, String>, item: T) {
        let Some((k, v)) = labels.iter().next().map(|(k, v)| (k.clone(), v.clone())) else {
            self.wide.push(item);
            return;
        };
        self.by_label
            .entry(k)
            .or_default()
            .entry(v)
            .or_default()
            .push((labels, item));
    }

    /// Calls `f` on every policy selecting a workload with `labels`: each
    /// selector policy is filed under exactly one of its labels, so it is
    /// visited at most once, and only if the workload has that label.
    fn for_each<'s>(&'s self, labels: &BTreeMap<String, String>, mut f: impl FnMut(&'s T)) {
        self.wide.iter().for_each(&mut f);
        if self.by_label.is_empty() {
            return;
        }
        for (k, v) in labels {
            let Some(list) = self
                .by_label
                .get(k.as_str())
                .and_then(|m| m.get(v.as_str()))
            else {
                continue;
            };
            for (selector, item) in list {
                if selector.iter().all(|(sk, sv)| labels.get(sk) == Some(sv)) {
                    f(item);
                }
            }
        }
    }

    fn sort_by_key<K: Ord>(&mut self, mut key: impl FnMut(&T) -> K) {
        self.wide.sort_by_key(&mut key);
        for inner in self.by_label.values_mut() {
            for list in inner.values_mut() {
                list.sort_by_key(|(_, t)| key(t));
            }
        }
    }

    fn len(&self) -> usize {
        self.wide.len()
            + self
                .by_label
                .values()
                .flat_map(HashMap::values)
                .map(Vec::len)
                .sum::<usize>()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NamespacePolicies {
    authz: Bucket<Arc<CompiledAuthz>>,
    /// The namespace-wide PeerAuthentication in force (oldest).
    peer_namespace: Option<Arc<CompiledPeerAuthn>>,
    peer_workload: Bucket<Arc<CompiledPeerAuthn>>,
}

/// The policies in force, indexed for per-connection decisions that cost
/// O(policies selecting the workload): a lookup by namespace, then by the
/// workload's labels; no scan of the mesh.
///
/// Build a new store from each full snapshot of the policies
/// ([`PolicyStore::build`]) and swap it in (e.g. behind an `ArcSwap`);
/// then re-evaluate open connections.
///
/// Two stores are equal when they decide every connection alike: same
/// policies (names, rules, order, attachment), nothing of the objects'
/// metadata beyond that. An agent compares a freshly compiled store with
/// the one in force, so that an edit which changes nothing enforced (a
/// label, an annotation, a re-apply) re-checks no open connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStore {
    root_namespace: String,
    /// Root-namespace AuthorizationPolicies: without selector for every
    /// workload; with one for the matching workloads of every namespace.
    mesh: Bucket<Arc<CompiledAuthz>>,
    /// The mesh-wide PeerAuthentication in force (oldest).
    peer_mesh: Option<Arc<CompiledPeerAuthn>>,
    namespaces: HashMap<String, NamespacePolicies>,
    authz_count: usize,
    peer_count: usize,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT_NAMESPACE)
    }
}

impl PolicyStore {
    /// An empty store: every connection allowed, every port PERMISSIVE.
    /// `root_namespace` is Istio's root namespace (`istio-system` by
    /// default): its policies without selector apply to the whole mesh.
    pub fn new(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            mesh: Bucket::default(),
            peer_mesh: None,
            namespaces: HashMap::new(),
            authz_count: 0,
            peer_count: 0,
        }
    }

    /// Builds a store from a full snapshot of the policies. Malformed
    /// policies are rejected (reported, and enforced fail-closed, see
    /// [`crate::RejectEffect`]); the others are enforced. Of two objects
    /// with the same kind, namespace and name, the later one wins.
    pub fn build(root_namespace: &str, resources: &[Resource]) -> (Self, Report) {
        let mut store = Self::new(root_namespace);
        let mut report = Report::default();

        // Last one wins for duplicates (a re-applied object).
        let mut latest: BTreeMap<(Kind, &str, &str), usize> = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            let m = r.metadata();
            let key = (
                r.kind(),
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            );
            if latest.insert(key, i).is_some() {
                report.warnings.push(PolicyWarning {
                    kind: key.0,
                    policy: PolicyName::new(key.1, key.2),
                    field: "metadata.name".into(),
                    message: "defined more than once: the last definition is used".into(),
                });
            }
        }
        let mut mesh_peers: Vec<Arc<CompiledPeerAuthn>> = Vec::new();
        let mut ns_peers: HashMap<String, Vec<Arc<CompiledPeerAuthn>>> = HashMap::new();
        for &i in latest.values() {
            match &resources[i] {
                Resource::AuthorizationPolicy(ap) => {
                    if let Some((compile::Attach::Scope(scope), p)) = compile::compile_authz(
                        ap,
                        root_namespace,
                        compile::Layer::Node,
                        &mut report,
                    ) {
                        store.authz_count += 1;
                        let Scope { namespace, labels } = scope;
                        let p = Arc::new(p);
                        if namespace == root_namespace {
                            store.mesh.insert(labels, p);
                        } else {
                            store
                                .namespaces
                                .entry(namespace)
                                .or_default()
                                .authz
                                .insert(labels, p);
                        }
                    }
                }
                Resource::PeerAuthentication(pa) => {
                    if let Some((scope, p)) =
                        compile::compile_peer_authn(pa, root_namespace, &mut report)
                    {
                        store.peer_count += 1;
                        let p = Arc::new(p);
                        if !scope.labels.is_empty() {
                            store
                                .namespaces
                                .entry(scope.namespace)
                                .or_default()
                                .peer_workload
                                .insert(scope.labels, p);
                        } else if scope.namespace == root_namespace {
                            mesh_peers.push(p);
                        } else {
                            ns_peers.entry(scope.namespace).or_default().push(p);
                        }
                    }
                }
            }
        }
        let by_name = |p: &Arc<CompiledAuthz>| p.name.clone();
        store.mesh.sort_by_key(by_name);
        for ns in store.namespaces.values_mut() {
            ns.authz.sort_by_key(by_name);
            ns.peer_workload.sort_by_key(|p| p.order.clone());
        }
        store.peer_mesh = mesh_peers.into_iter().min_by(|a, b| a.order.cmp(&b.order));
        for (ns, list) in ns_peers {
            store.namespaces.entry(ns).or_default().peer_namespace =
                list.into_iter().min_by(|a, b| a.order.cmp(&b.order));
        }
        (store, report)
    }

    /// Parses `text` (YAML or JSON documents) and builds a store from it;
    /// the report has the parse errors first.
    pub fn from_text(root_namespace: &str, text: &str) -> (Self, Report) {
        let parsed = parse_documents(text);
        let (store, mut report) = Self::build(root_namespace, &parsed.resources);
        report.prepend_errors(parsed.errors);
        (store, report)
    }

    /// The root namespace.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Number of AuthorizationPolicies in force (rejected ones included
    /// when they still have a fail-closed effect).
    pub fn authorization_policy_count(&self) -> usize {
        self.authz_count
    }

    /// Number of PeerAuthentications in force.
    pub fn peer_authentication_count(&self) -> usize {
        self.peer_count
    }

    fn for_each_authz<'s>(&'s self, w: &WorkloadRef<'_>, mut f: impl FnMut(&'s CompiledAuthz)) {
        self.mesh.for_each(w.labels, |p| f(p));
        if w.namespace == self.root_namespace {
            return; // already visited as the mesh level
        }
        if let Some(ns) = self.namespaces.get(w.namespace) {
            ns.authz.for_each(w.labels, |p| f(p));
        }
    }

    /// The AuthorizationPolicies that apply to a workload, in evaluation
    /// order (for the admin API and the benchmark).
    pub fn policies_for(&self, workload: &WorkloadRef<'_>) -> Vec<PolicyName> {
        let mut out = Vec::new();
        self.for_each_authz(workload, |p| out.push(p.name.clone()));
        out
    }

    /// The effective PeerAuthentication mode of a workload port:
    /// workload policy (its `portLevelMtls` for this port first) over
    /// namespace policy over mesh policy, `UNSET` inheriting; PERMISSIVE
    /// when nothing is set.
    pub fn mtls_mode(&self, workload: &WorkloadRef<'_>, port: u16) -> MtlsMode {
        self.mtls_setting(workload, port).mode
    }

    /// [`PolicyStore::mtls_mode`] with the deciding policy.
    pub fn mtls_setting(&self, workload: &WorkloadRef<'_>, port: u16) -> MtlsSetting {
        let mut setting = MtlsSetting {
            mode: MtlsMode::Permissive,
            policy: None,
        };
        let mut apply = |mode: WrittenMode, p: &CompiledPeerAuthn| {
            let mode = match mode {
                WrittenMode::Unset => return,
                WrittenMode::Strict => MtlsMode::Strict,
                WrittenMode::Permissive => MtlsMode::Permissive,
                WrittenMode::Disable => MtlsMode::Disable,
            };
            setting = MtlsSetting {
                mode,
                policy: Some(p.name.clone()),
            };
        };
        if let Some(p) = &self.peer_mesh {
            apply(p.mode, p);
        }
        let ns = self.namespaces.get(workload.namespace);
        if workload.namespace != self.root_namespace
            && let Some(p) = ns.and_then(|ns| ns.peer_namespace.as_ref())
        {
            apply(p.mode, p);
        }
        let mut best: Option<&Arc<CompiledPeerAuthn>> = None;
        if let Some(ns) = ns {
            ns.peer_workload.for_each(workload.labels, |p| {
                if best.is_none_or(|b| p.order < b.order) {
                    best = Some(p);
                }
            });
        }
        if let Some(p) = best {
            match p.ports.get(&port) {
                Some(&m) if m != WrittenMode::Unset => apply(m, p),
                _ => apply(p.mode, p),
            }
        }
        setting
    }

    /// Decides an inbound connection to `workload`: PeerAuthentication
    /// (plaintext to a STRICT port is denied), then Istio's order — any
    /// matching DENY (or CUSTOM, or rejected DENY) denies; else, if ALLOW
    /// policies apply, one must match; else allow. AUDIT policies never
    /// change the decision; those that match are listed.
    pub fn evaluate(&self, conn: &Connection<'_>, workload: &WorkloadRef<'_>) -> Decision {
        let ctx = Ctx::new(conn);
        let mut decider = Decider::default();
        if ctx.principal.is_none() {
            let m = self.mtls_setting(workload, conn.destination_port);
            if m.mode == MtlsMode::Strict {
                decider.deny = Some(DenyReason::MtlsRequired { policy: m.policy });
            }
        }
        self.for_each_authz(workload, |p| decider.visit(p, &ctx));
        decider.finish()
    }

    /// Total policies indexed (AuthorizationPolicies and
    /// PeerAuthentications), for diagnostics.
    pub fn len(&self) -> usize {
        self.mesh.len()
            + usize::from(self.peer_mesh.is_some())
            + self
                .namespaces
                .values()
                .map(|n| {
                    n.authz.len() + n.peer_workload.len() + usize::from(n.peer_namespace.is_some())
                })
                .sum::<usize>()
    }

    /// No policy at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Istio's decision over the policies that apply, visited in order: any
/// matching DENY (or CUSTOM, or rejected DENY) denies; else, if ALLOW
/// policies apply, one must match; else allow. AUDIT policies only list.
#[derive(Default)]
pub(crate) struct Decider<'s> {
    pub(crate) deny: Option<DenyReason>,
    allow_applies: bool,
    allowed_by: Option<&'s PolicyName>,
    audited_by: Vec<PolicyName>,
}

impl<'s> Decider<'s> {
    pub(crate) fn visit(&mut self, p: &'s CompiledAuthz, ctx: &Ctx<'_>) {
        match p.effect {
            Effect::Deny => {
                if self.deny.is_none() && p.matches(ctx) {
                    self.deny = Some(match p.origin {
                        Origin::Written => DenyReason::DeniedBy(p.name.clone()),
                        Origin::Custom => DenyReason::CustomUnsupported(p.name.clone()),
                        Origin::Rejected => DenyReason::RejectedPolicy(p.name.clone()),
                    });
                }
            }
            Effect::Allow => {
                self.allow_applies = true;
                if self.allowed_by.is_none() && p.matches(ctx) {
                    self.allowed_by = Some(&p.name);
                }
            }
            Effect::Audit => {
                if p.matches(ctx) {
                    self.audited_by.push(p.name.clone());
                }
            }
        }
    }

    pub(crate) fn finish(self) -> Decision {
        let audited_by = self.audited_by;
        if let Some(reason) = self.deny {
            Decision::Deny { reason, audited_by }
        } else if self.allow_applies && self.allowed_by.is_none() {
            Decision::Deny {
                reason: DenyReason::NoAllowMatched,
                audited_by,
            }
        } else {
            Decision::Allow {
                allowed_by: self.allowed_by.cloned(),
                audited_by,
            }
        }
    }
}
