//! The validity of the mesh CA certificate and where it stands at an
//! instant (valid, expiring soon, expired).

use std::time::{Duration, SystemTime};

/// How long before the mesh CA expires the agent starts warning (log and
/// `mesh_ca_expiring`): time enough to roll out a new CA.
pub const CA_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// The validity of the mesh CA certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaValidity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Where the mesh CA stands at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaExpiry {
    /// Valid for longer than [`CA_EXPIRY_WARNING`].
    Valid,
    /// Valid, but expires within [`CA_EXPIRY_WARNING`]: install a new CA.
    ExpiringSoon,
    /// Expired: no certificate can be issued.
    Expired,
    /// Not valid yet (a clock problem).
    NotYetValid,
}

impl CaValidity {
    /// The state at `now`.
    pub fn expiry_at(&self, now: SystemTime) -> CaExpiry {
        if now < self.not_before {
            CaExpiry::NotYetValid
        } else if now >= self.not_after {
            CaExpiry::Expired
        } else if self
            .not_after
            .duration_since(now)
            .is_ok_and(|left| left <= CA_EXPIRY_WARNING)
        {
            CaExpiry::ExpiringSoon
        } else {
            CaExpiry::Valid
        }
    }

    /// Seconds from `now` until the CA expires (negative once expired).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        let secs = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        secs(self.not_after).saturating_sub(secs(now))
    }
}
