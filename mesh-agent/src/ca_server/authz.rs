//! Who may get which certificate: the caller authenticated by TokenReview,
//! and Istio's NodeAuthorizer rules for a node agent asking for a pod's
//! identity (istio/istio `security/pkg/server/ca/node_auth.go`). Pure
//! functions over the caller and the pods the API server returned; the
//! service does the lookups between the steps.

use std::collections::BTreeSet;

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use tonic::Code;

use crate::identity::{SignError, SpiffeId, TrustDomain};

/// `authentication.kubernetes.io/pod-name` in a bound token's user extra.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `authentication.kubernetes.io/pod-uid` in a bound token's user extra.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `authentication.kubernetes.io/node-name` (Kubernetes 1.30+).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const SA_PREFIX: &str = "system:serviceaccount:";

/// A Kubernetes service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccountRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not a service account: write NAMESPACE/NAME, like mesh-system/mesh-agent"
            )),
        }
    }
}

/// The authenticated caller: a service account, and the pod (and node) its
/// token is bound to, when it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `system:serviceaccount:NS:SA`.
    pub username: String,
    /// The service account.
    pub service_account: ServiceAccountRef,
    /// The pod the token is bound to.
    pub pod_name: Option<String>,
    /// That pod's UID.
    pub pod_uid: Option<String>,
    /// The node the token is bound to (Kubernetes 1.30+).
    pub node_name: Option<String>,
}

impl Caller {
    /// Its own identity in `td`.
    pub fn identity(&self, td: &TrustDomain) -> Result<SpiffeId, Refusal> {
        SpiffeId::new(
            td.clone(),
            &self.service_account.namespace,
            &self.service_account.name,
        )
        .map_err(|e| Refusal::BadIdentity {
            input: self.username.clone(),
            reason: e.to_string(),
        })
    }

    /// The rate-limit key: the token's node and account, else its pod, else
    /// the account. Every pod-bound token names its node (Kubernetes 1.30+):
    /// by the node alone, any pod on it could spend the node agent's budget
    /// and stop the node's certificates.
    pub fn limit_key(&self) -> String {
        match (&self.node_name, &self.pod_name) {
            (Some(node), _) => format!("node/{node}/sa/{}", self.service_account),
            (None, Some(pod)) => format!("pod/{}/{pod}", self.service_account.namespace),
            (None, None) => format!("sa/{}", self.service_account),
        }
    }

    /// For logs: the node, when the token names one.
    pub fn node(&self) -> &str {
        self.node_name.as_deref().unwrap_or("")
    }
}

/// What the API server says about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.nodeName` (None while unscheduled).
    pub node_name: Option<String>,
}

/// Why a request was refused; each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No `authorization: Bearer` metadata.
    #[error(
        "no bearer token: send the agent's projected ServiceAccount token as `authorization: Bearer <token>`"
    )]
    NoToken,
    /// TokenReview did not authenticate the token.
    #[error("the token is not valid: {reason}")]
    BadToken {
        /// The API server's reason.
        reason: String,
    },
    /// The token is not for this CA's audience.
    #[error(
        "the token is not for audience {audience:?} (it is for {got:?}): project the token with audience {audience:?}"
    )]
    WrongAudience {
        /// Ours.
        audience: String,
        /// The ones TokenReview confirmed.
        got: Vec<String>,
    },
    /// The token is not a service account's.
    #[error(
        "{username:?} is not a Kubernetes service account; only service accounts get certificates"
    )]
    NotServiceAccount {
        /// The authenticated user.
        username: String,
    },
    /// The requested identity is not a workload SPIFFE ID.
    #[error("cannot issue for {input:?}: {reason}")]
    BadIdentity {
        /// The identity asked for.
        input: String,
        /// Why it is not one.
        reason: String,
    },
    /// The requested identity is in another trust domain.
    #[error("{id} is not in this CA's trust domain {ours}")]
    ForeignTrustDomain {
        /// The identity asked for.
        id: SpiffeId,
        /// Ours.
        ours: TrustDomain,
    },
    /// The caller asked for another identity but is not a node agent.
    #[error(
        "service account {caller} may not request certificates for other identities (it is not a trusted node agent account: --node-service-account)"
    )]
    NotNodeAgent {
        /// The caller's account.
        caller: ServiceAccountRef,
    },
    /// The caller's token is not bound to a pod.
    #[error(
        "the token of {caller} is not bound to a pod (no pod name/UID in it): use a projected ServiceAccount token"
    )]
    TokenNotPodBound {
        /// The caller's account.
        caller: ServiceAccountRef,
    },
    /// The caller's pod does not exist.
    #[error("the caller's pod {namespace}/{name} does not exist")]
    CallerPodMissing {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The caller's pod is another one now (re-created with the same name).
    #[error(
        "the caller's pod {namespace}/{name} has UID {found}, the token names {expected}: the token belongs to a pod that no longer exists"
    )]
    CallerPodUid {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The token's pod UID.
        expected: String,
        /// The pod's UID now.
        found: String,
    },
    /// The caller's pod runs as another service account.
    #[error("the caller's pod {namespace}/{name} runs as service account {found}, not {expected}")]
    CallerPodAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The token's account.
        expected: String,
        /// The pod's.
        found: String,
    },
    /// The caller's pod is on no node.
    #[error("the caller's pod {namespace}/{name} is not scheduled on a node")]
    CallerPodUnscheduled {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The token's node is not the caller pod's node.
    #[error(
        "the token is bound to node {token_node}, but the caller's pod runs on node {pod_node}"
    )]
    NodeMismatch {
        /// The token's node.
        token_node: String,
        /// The pod's node.
        pod_node: String,
    },
    /// No pod with the requested identity runs on the caller's node.
    #[error("no pod of service account {namespace}/{service_account} is scheduled on node {node}")]
    NoPodOnNode {
        /// The requested namespace.
        namespace: String,
        /// The requested service account.
        service_account: String,
        /// The caller's node.
        node: String,
    },
    /// The caller's node is over its rate.
    #[error(
        "too many certificate requests from {key}: at most {rate} per second (burst {burst}); retry in {retry_after_ms} ms"
    )]
    RateLimited {
        /// The rate-limit key (node).
        key: String,
        /// Requests per second.
        rate: f64,
        /// Burst.
        burst: u32,
        /// When a request would be accepted again.
        retry_after_ms: u64,
    },
    /// Too many requests in flight.
    #[error("the CA is handling {limit} requests already; retry")]
    Busy {
        /// The limit.
        limit: usize,
    },
    /// The Kubernetes API did not answer (fail closed).
    #[error("cannot check the request with the Kubernetes API: {detail}; retry")]
    ApiUnavailable {
        /// What failed.
        detail: String,
    },
    /// The CSR is not acceptable.
    #[error("{0}")]
    BadCsr(#[source] SignError),
    /// Signing failed on the CA's side.
    #[error("the CA cannot sign: {0}")]
    CaFailure(#[source] SignError),
}

impl Refusal {
    /// The gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            Self::NoToken | Self::BadToken { .. } | Self::WrongAudience { .. } => {
                Code::Unauthenticated
            }
            Self::NotServiceAccount { .. }
            | Self::ForeignTrustDomain { .. }
            | Self::NotNodeAgent { .. }
            | Self::TokenNotPodBound { .. }
            | Self::CallerPodMissing { .. }
            | Self::CallerPodUid { .. }
            | Self::CallerPodAccount { .. }
            | Self::CallerPodUnscheduled { .. }
            | Self::NodeMismatch { .. }
            | Self::NoPodOnNode { .. } => Code::PermissionDenied,
            Self::BadIdentity { .. } | Self::BadCsr(_) => Code::InvalidArgument,
            Self::RateLimited { .. } => Code::ResourceExhausted,
            Self::Busy { .. } | Self::ApiUnavailable { .. } => Code::Unavailable,
            Self::CaFailure(_) => Code::Internal,
        }
    }

    /// A short stable name for the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::BadToken { .. } => "bad_token",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::NotServiceAccount { .. } => "not_service_account",
            Self::BadIdentity { .. } => "bad_identity",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::NotNodeAgent { .. } => "not_node_agent",
            Self::TokenNotPodBound { .. } => "token_not_pod_bound",
            Self::CallerPodMissing { .. } => "caller_pod_missing",
            Self::CallerPodUid { .. } => "caller_pod_uid_mismatch",
            Self::CallerPodAccount { .. } => "caller_pod_account_mismatch",
            Self::CallerPodUnscheduled { .. } => "caller_pod_unscheduled",
            Self::NodeMismatch { .. } => "node_mismatch",
            Self::NoPodOnNode { .. } => "no_pod_on_node",
            Self::RateLimited { .. } => "rate_limited",
            Self::Busy { .. } => "busy",
            Self::ApiUnavailable { .. } => "api_unavailable",
            Self::BadCsr(_) => "bad_csr",
            Self::CaFailure(_) => "ca_failure",
        }
    }
}

/// The caller TokenReview describes, if it authenticated the token for
/// `audience` and the user is a service account.
pub fn caller_from_review(status: &TokenReviewStatus, audience: &str) -> Result<Caller, Refusal> {
    if status.authenticated != Some(true) {
        return Err(Refusal::BadToken {
            reason: status
                .error
                .clone()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the API server did not authenticate it".into()),
        });
    }
    let got = status.audiences.clone().unwrap_or_default();
    if !got.iter().any(|a| a == audience) {
        return Err(Refusal::WrongAudience {
            audience: audience.to_owned(),
            got,
        });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let sa = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'));
    let Some((ns, name)) = sa else {
        return Err(Refusal::NotServiceAccount { username });
    };
    let service_account = ServiceAccountRef {
        namespace: ns.to_owned(),
        name: name.to_owned(),
    };
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(Caller {
        pod_name: one(EXTRA_POD_NAME),
        pod_uid: one(EXTRA_POD_UID),
        node_name: one(EXTRA_NODE_NAME),
        username,
        service_account,
    })
}

/// The first decision, before any lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The caller gets its own identity; nothing to look up.
    Own(SpiffeId),
    /// A node agent asks for `id`: look up its pod, then the pods of its node.
    Impersonate {
        /// The requested identity.
        id: SpiffeId,
        /// The caller's pod name (from the token).
        pod_name: String,
        /// The caller's pod UID (from the token).
        pod_uid: String,
    },
}

/// Without impersonation the caller may get only its own identity; with it,
/// the identity must be a workload SPIFFE ID of our trust domain and the
/// caller a trusted node agent whose token is bound to its pod.
pub fn plan(
    caller: &Caller,
    impersonate: Option<&str>,
    td: &TrustDomain,
    node_accounts: &BTreeSet<ServiceAccountRef>,
) -> Result<Plan, Refusal> {
    let Some(requested) = impersonate else {
        return caller.identity(td).map(Plan::Own);
    };
    let id = SpiffeId::parse(requested).map_err(|e| Refusal::BadIdentity {
        input: requested.chars().take(256).collect(),
        reason: e.to_string(),
    })?;
    if id.trust_domain() != td {
        return Err(Refusal::ForeignTrustDomain {
            id,
            ours: td.clone(),
        });
    }
    if !node_accounts.contains(&caller.service_account) {
        return Err(Refusal::NotNodeAgent {
            caller: caller.service_account.clone(),
        });
    }
    let (Some(pod_name), Some(pod_uid)) = (&caller.pod_name, &caller.pod_uid) else {
        return Err(Refusal::TokenNotPodBound {
            caller: caller.service_account.clone(),
        });
    };
    Ok(Plan::Impersonate {
        id,
        pod_name: pod_name.clone(),
        pod_uid: pod_uid.clone(),
    })
}

/// The caller's node: its pod (looked up by the token's pod name in the
/// caller's namespace) must exist with the token's UID and service account,
/// be scheduled, and be on the token's node when the token names one.
pub fn caller_node(
    caller: &Caller,
    pod_uid: &str,
    pod: Option<&PodFacts>,
) -> Result<String, Refusal> {
    let namespace = caller.service_account.namespace.clone();
    let name = caller.pod_name.clone().unwrap_or_default();
    let Some(pod) = pod else {
        return Err(Refusal::CallerPodMissing { namespace, name });
    };
    if pod.uid != pod_uid {
        return Err(Refusal::CallerPodUid {
            namespace,
            name,
            expected: pod_uid.to_owned(),
            found: pod.uid.clone(),
        });
    }
    if pod.service_account != caller.service_account.name {
        return Err(Refusal::CallerPodAccount {
            namespace,
            name,
            expected: caller.service_account.name.clone(),
            found: pod.service_account.clone(),
        });
    }
    let Some(node) = pod.node_name.clone().filter(|n| !n.is_empty()) else {
        return Err(Refusal::CallerPodUnscheduled { namespace, name });
    };
    if let Some(token_node) = &caller.node_name
        && *token_node != node
    {
        return Err(Refusal::NodeMismatch {
            token_node: token_node.clone(),
            pod_node: node,
        });
    }
    Ok(node)
}

/// Whether a pod of `id`'s namespace and service account is scheduled on
/// `node` (`pods`: the namespace's pods on that node, as listed).
pub fn check_node_pods(id: &SpiffeId, node: &str, pods: &[PodFacts]) -> Result<(), Refusal> {
    let found = pods.iter().any(|p| {
        p.namespace == id.namespace()
            && p.service_account == id.service_account()
            && p.node_name.as_deref() == Some(node)
    });
    if found {
        Ok(())
    } else {
        Err(Refusal::NoPodOnNode {
            namespace: id.namespace().to_owned(),
            service_account: id.service_account().to_owned(),
            node: node.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn agents() -> BTreeSet<ServiceAccountRef> {
        ["mesh-system/mesh-agent".parse().unwrap()].into()
    }

    fn agent_on(node: Option<&str>) -> Caller {
        Caller {
            username: "system:serviceaccount:mesh-system:mesh-agent".into(),
            service_account: "mesh-system/mesh-agent".parse().unwrap(),
            pod_name: Some("mesh-agent-abcde".into()),
            pod_uid: Some("uid-agent".into()),
            node_name: node.map(str::to_owned),
        }
    }

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: Option<&str>) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            service_account: sa.into(),
            node_name: node.map(str::to_owned),
        }
    }

    fn review(user: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn token_review_makes_the_caller_or_refuses() {
        let status = review(
            "system:serviceaccount:mesh-system:mesh-agent",
            &["istio-ca"],
            &[
                (EXTRA_POD_NAME, "mesh-agent-abcde"),
                (EXTRA_POD_UID, "uid-agent"),
                (EXTRA_NODE_NAME, "node-a"),
            ],
        );
        let caller = caller_from_review(&status, "istio-ca").unwrap();
        assert_eq!(caller, agent_on(Some("node-a")));
        assert_eq!(caller.limit_key(), "node/node-a/sa/mesh-system/mesh-agent");

        let e = caller_from_review(&status, "other").unwrap_err();
        assert!(matches!(e, Refusal::WrongAudience { .. }), "{e}");
        assert_eq!(e.code(), Code::Unauthenticated);

        let mut denied = status.clone();
        denied.authenticated = Some(false);
        denied.error = Some("token has expired".into());
        let e = caller_from_review(&denied, "istio-ca").unwrap_err();
        assert!(e.to_string().contains("token has expired"), "{e}");

        let user = review("kubernetes-admin", &["istio-ca"], &[]);
        let e = caller_from_review(&user, "istio-ca").unwrap_err();
        assert!(matches!(e, Refusal::NotServiceAccount { .. }), "{e}");
        assert_eq!(e.code(), Code::PermissionDenied);
    }

    #[test]
    fn without_impersonation_the_caller_gets_its_own_identity() {
        let caller = Caller {
            username: "system:serviceaccount:shop:cart".into(),
            service_account: "shop/cart".parse().unwrap(),
            pod_name: None,
            pod_uid: None,
            node_name: None,
        };
        let plan = plan(&caller, None, &td(), &agents()).unwrap();
        assert_eq!(
            plan,
            Plan::Own(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap())
        );
    }

    #[test]
    fn impersonation_needs_a_pod_bound_node_agent_in_our_trust_domain() {
        let agent = agent_on(Some("node-a"));
        let id = "spiffe://cluster.local/ns/shop/sa/cart";
        assert!(matches!(
            plan(&agent, Some(id), &td(), &agents()).unwrap(),
            Plan::Impersonate { ref pod_uid, .. } if pod_uid == "uid-agent"
        ));
        let other_td = "spiffe://evil.example/ns/shop/sa/cart";
        let e = plan(&agent, Some(other_td), &td(), &agents()).unwrap_err();
        assert!(matches!(e, Refusal::ForeignTrustDomain { .. }), "{e}");
        let e = plan(
            &agent,
            Some("spiffe://cluster.local/admin"),
            &td(),
            &agents(),
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");

        let mut app = agent.clone();
        app.service_account = "shop/cart".parse().unwrap();
        let e = plan(&app, Some(id), &td(), &agents()).unwrap_err();
        assert!(matches!(e, Refusal::NotNodeAgent { .. }), "{e}");
        assert!(e.to_string().contains("shop/cart"), "{e}");

        let mut unbound = agent.clone();
        unbound.pod_uid = None;
        let e = plan(&unbound, Some(id), &td(), &agents()).unwrap_err();
        assert!(matches!(e, Refusal::TokenNotPodBound { .. }), "{e}");
    }

    #[test]
    fn the_callers_pod_decides_its_node() {
        let agent = agent_on(Some("node-a"));
        let mine = pod(
            "mesh-system",
            "mesh-agent-abcde",
            "uid-agent",
            "mesh-agent",
            Some("node-a"),
        );
        assert_eq!(
            caller_node(&agent, "uid-agent", Some(&mine)).unwrap(),
            "node-a"
        );
        // Without node-name in the token the pod alone decides.
        assert_eq!(
            caller_node(&agent_on(None), "uid-agent", Some(&mine)).unwrap(),
            "node-a"
        );

        let e = caller_node(&agent, "uid-agent", None).unwrap_err();
        assert!(matches!(e, Refusal::CallerPodMissing { .. }), "{e}");
        let recreated = PodFacts {
            uid: "uid-new".into(),
            ..mine.clone()
        };
        let e = caller_node(&agent, "uid-agent", Some(&recreated)).unwrap_err();
        assert!(matches!(e, Refusal::CallerPodUid { .. }), "{e}");
        let other_sa = PodFacts {
            service_account: "default".into(),
            ..mine.clone()
        };
        let e = caller_node(&agent, "uid-agent", Some(&other_sa)).unwrap_err();
        assert!(matches!(e, Refusal::CallerPodAccount { .. }), "{e}");
        let moved = PodFacts {
            node_name: Some("node-b".into()),
            ..mine.clone()
        };
        let e = caller_node(&agent, "uid-agent", Some(&moved)).unwrap_err();
        assert!(matches!(e, Refusal::NodeMismatch { .. }), "{e}");
        let pending = PodFacts {
            node_name: None,
            ..mine
        };
        let e = caller_node(&agent_on(None), "uid-agent", Some(&pending)).unwrap_err();
        assert!(matches!(e, Refusal::CallerPodUnscheduled { .. }), "{e}");
    }

    #[test]
    fn a_pod_of_the_identity_must_run_on_the_node() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        let here = pod("shop", "cart-1", "u1", "cart", Some("node-a"));
        let there = pod("shop", "cart-2", "u2", "cart", Some("node-b"));
        let other_sa = pod("shop", "web-1", "u3", "web", Some("node-a"));
        check_node_pods(&id, "node-a", &[other_sa.clone(), here]).unwrap();
        let e = check_node_pods(&id, "node-a", &[there, other_sa]).unwrap_err();
        assert!(matches!(e, Refusal::NoPodOnNode { .. }), "{e}");
        assert!(e.to_string().contains("node-a"), "{e}");
        check_node_pods(&id, "node-a", &[]).unwrap_err();
    }
}
