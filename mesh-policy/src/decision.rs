//! What the store answers: the effective mTLS mode of a port and the
//! decision for a connection, with the policy that made it.

use std::fmt;

use crate::error::PolicyName;

/// The effective PeerAuthentication mode of a workload port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum MtlsMode {
    /// Plaintext inbound is rejected.
    Strict,
    /// mTLS and plaintext are accepted (plaintext is authorized with no
    /// principal). The default.
    Permissive,
    /// Written `DISABLE`. The node agent cannot turn mutual TLS off for
    /// mesh (HBONE) traffic, so this behaves like [`MtlsMode::Permissive`],
    /// as in Istio ambient.
    Disable,
}

impl MtlsMode {
    /// Whether a plaintext connection is accepted.
    pub fn accepts_plaintext(self) -> bool {
        !matches!(self, MtlsMode::Strict)
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// The effective mode and the PeerAuthentication that decided it (`None`:
/// the built-in default, PERMISSIVE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsSetting {
    /// The mode.
    pub mode: MtlsMode,
    /// The deciding policy.
    pub policy: Option<PolicyName>,
}

/// Why a connection is denied; `Display` is the text of the deny log line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum DenyReason {
    /// Plaintext to a workload port whose mode is STRICT.
    MtlsRequired {
        /// The PeerAuthentication that made it STRICT.
        policy: Option<PolicyName>,
    },
    /// A DENY policy matched.
    DeniedBy(PolicyName),
    /// A CUSTOM policy matched: the agent cannot call the external
    /// authorizer, so it denies (fail closed).
    CustomUnsupported(PolicyName),
    /// A rejected (malformed) DENY/CUSTOM policy applies to the workload:
    /// it denies everything (fail closed).
    RejectedPolicy(PolicyName),
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatched,
}

impl DenyReason {
    /// The policy named in the reason, if any.
    pub fn policy(&self) -> Option<&PolicyName> {
        match self {
            DenyReason::MtlsRequired { policy } => policy.as_ref(),
            DenyReason::DeniedBy(p)
            | DenyReason::CustomUnsupported(p)
            | DenyReason::RejectedPolicy(p) => Some(p),
            DenyReason::NoAllowMatched => None,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::MtlsRequired { policy: Some(p) } => {
                write!(
                    f,
                    "plaintext rejected: PeerAuthentication {p} requires mTLS (STRICT)"
                )
            }
            DenyReason::MtlsRequired { policy: None } => {
                write!(f, "plaintext rejected: mTLS required (STRICT)")
            }
            DenyReason::DeniedBy(p) => write!(f, "denied by AuthorizationPolicy {p}"),
            DenyReason::CustomUnsupported(p) => write!(
                f,
                "denied by AuthorizationPolicy {p}: action CUSTOM cannot be enforced here, there is no external authorizer (fail closed)"
            ),
            DenyReason::RejectedPolicy(p) => write!(
                f,
                "denied by AuthorizationPolicy {p}, which was rejected as malformed (fail closed)"
            ),
            DenyReason::NoAllowMatched => f.write_str("no ALLOW policy matched"),
        }
    }
}

/// The decision for one connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Decision {
    /// Let it through.
    Allow {
        /// The ALLOW policy that matched; `None` when no ALLOW policy
        /// applies to the workload.
        allowed_by: Option<PolicyName>,
        /// AUDIT (and dry-run) policies that matched: to be counted and
        /// logged.
        audited_by: Vec<PolicyName>,
    },
    /// Close it (the client must see a reset).
    Deny {
        /// Why; names the policy, or says no ALLOW policy matched.
        reason: DenyReason,
        /// AUDIT (and dry-run) policies that matched.
        audited_by: Vec<PolicyName>,
    },
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The deny reason, if denied.
    pub fn deny_reason(&self) -> Option<&DenyReason> {
        match self {
            Decision::Deny { reason, .. } => Some(reason),
            Decision::Allow { .. } => None,
        }
    }

    /// The AUDIT policies that matched.
    pub fn audited_by(&self) -> &[PolicyName] {
        match self {
            Decision::Allow { audited_by, .. } | Decision::Deny { audited_by, .. } => audited_by,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow {
                allowed_by: Some(p),
                ..
            } => write!(f, "allowed by AuthorizationPolicy {p}"),
            Decision::Allow {
                allowed_by: None, ..
            } => f.write_str("allowed (no ALLOW policy applies)"),
            Decision::Deny { reason, .. } => reason.fmt(f),
        }
    }
}
