//! [`CertManager`]: the certificates of the node's workloads, issued on first
//! use and rotated at half-life.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, PoisonError, RwLock, Weak},
    time::{Duration, SystemTime},
};

use super::{
    CA_EXPIRY_WARNING, CaExpiry, CaValidity, CertificateProvider, IssueError, SpiffeId,
    WorkloadCert, fmt_time,
};

/// How often the sweeper checks the CA's expiry (and warns while it is
/// close); the first check is at start.
const CA_CHECK_PERIOD: Duration = Duration::from_secs(3600);

/// The longest a failed rotation waits before it is tried again (the current
/// certificate, still valid, is served meanwhile).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Per-identity certificate cache in front of a [`CertificateProvider`].
///
/// [`get`](Self::get) issues on first use and, once a certificate is past
/// half its life, replaces it before returning: rotation happens on access,
/// in the handshake that needs the certificate, so a new handshake never
/// presents a certificate past half-life. [`spawn_sweeper`](Self::spawn_sweeper)
/// also rotates idle identities in the background so that the next handshake
/// does not pay for issuance. Rotation never touches open connections: they
/// keep the session they negotiated.
///
/// If a rotation fails while the current certificate is still valid, the
/// current one is served and the rotation retried later (with a warning).
pub struct CertManager {
    provider: Arc<dyn CertificateProvider>,
    slots: RwLock<HashMap<SpiffeId, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    current: RwLock<Option<Arc<WorkloadCert>>>,
    /// Held while issuing, so concurrent handshakes issue once; holds when to
    /// retry after a failed rotation.
    issuing: Mutex<Option<SystemTime>>,
}

impl Slot {
    fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, cert: Arc<WorkloadCert>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(cert);
    }
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("trust_domain", self.provider.trust_domain())
            .field("identities", &self.identities().len())
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager issuing with `provider`.
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Self {
        Self {
            provider,
            slots: RwLock::new(HashMap::new()),
        }
    }

    /// The provider it issues with.
    pub fn provider(&self) -> &Arc<dyn CertificateProvider> {
        &self.provider
    }

    /// The current certificate for `id`: issued on first use, replaced once
    /// past half its life. Errors only when there is no valid certificate
    /// to serve.
    pub fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, IssueError> {
        let slot = self.slot(id);
        if let Some(cert) = slot.current()
            && SystemTime::now() < cert.refresh_at()
        {
            return Ok(cert);
        }
        self.refresh(id, &slot)
    }

    /// The certificate `id` has now, without issuing or rotating.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .and_then(|slot| slot.current())
    }

    /// The identities it holds certificates for.
    pub fn identities(&self) -> Vec<SpiffeId> {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Forgets every identity not in `keep` (workloads no longer on this
    /// node). Connections already using their certificates are unaffected.
    pub fn retain<'a>(&self, keep: impl IntoIterator<Item = &'a SpiffeId>) {
        let keep: HashSet<&SpiffeId> = keep.into_iter().collect();
        self.slots
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| keep.contains(id));
    }

    /// Rotates every certificate past half its life (and retries identities
    /// whose issuance failed). Returns how many were replaced.
    pub fn rotate_due(&self) -> usize {
        let slots: Vec<(SpiffeId, Arc<Slot>)> = self
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, slot)| (id.clone(), Arc::clone(slot)))
            .collect();
        let mut rotated = 0;
        for (id, slot) in slots {
            let before = slot.current();
            if before
                .as_ref()
                .is_some_and(|c| SystemTime::now() < c.refresh_at())
            {
                continue;
            }
            if let Ok(after) = self.refresh(&id, &slot)
                && before.is_none_or(|b| !Arc::ptr_eq(&b, &after))
            {
                rotated += 1;
            }
        }
        rotated
    }

    /// The validity of the CA the provider signs with, if it has one.
    pub fn ca_validity(&self) -> Option<CaValidity> {
        self.provider.ca_validity()
    }

    /// Checks the CA's validity at `now` and warns (log) when it expires
    /// within [`CA_EXPIRY_WARNING`], has expired or is not valid yet.
    /// Returns the state (none without a local CA).
    pub fn check_ca_expiry(&self, now: SystemTime) -> Option<CaExpiry> {
        let ca = self.ca_validity()?;
        let state = ca.expiry_at(now);
        let days_left = ca.expires_in(now) / 86_400;
        let not_after = fmt_time(ca.not_after);
        match state {
            CaExpiry::Valid => tracing::debug!(%not_after, days_left, "mesh CA valid"),
            CaExpiry::ExpiringSoon => tracing::warn!(
                %not_after,
                days_left,
                warn_days = CA_EXPIRY_WARNING.as_secs() / 86_400,
                "the mesh CA expires soon: install a new CA before then, or every mTLS handshake will fail"
            ),
            CaExpiry::Expired => tracing::error!(
                %not_after,
                "the mesh CA has expired: no workload certificate can be issued; install a new CA"
            ),
            CaExpiry::NotYetValid => tracing::error!(
                not_before = %fmt_time(ca.not_before),
                "the mesh CA is not valid yet: is this machine's clock right?"
            ),
        }
        Some(state)
    }

    /// Spawns a task calling [`rotate_due`](Self::rotate_due) every `period`
    /// (a tenth of the certificate TTL, capped at a minute, is a good choice),
    /// so idle identities are rotated before their next handshake, and
    /// [`check_ca_expiry`](Self::check_ca_expiry) at once (before returning) and
    /// then hourly.
    /// The task ends when the manager is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        // The first CA check runs here, before the caller goes on (and so
        // before the agent reports ready): its warning is there at start.
        self.check_ca_expiry(SystemTime::now());
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = period.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ca_checked = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let Some(manager) = weak.upgrade() else {
                    break;
                };
                if ca_checked.elapsed() >= CA_CHECK_PERIOD {
                    manager.check_ca_expiry(SystemTime::now());
                    ca_checked = tokio::time::Instant::now();
                }
                manager.rotate_due();
            }
        })
    }

    fn slot(&self, id: &SpiffeId) -> Arc<Slot> {
        if let Some(slot) = self
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            return Arc::clone(slot);
        }
        Arc::clone(
            self.slots
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(id.clone())
                .or_default(),
        )
    }

    /// Issues a certificate for `id` unless another caller just did, or a
    /// failed rotation is waiting for its retry time.
    fn refresh(&self, id: &SpiffeId, slot: &Slot) -> Result<Arc<WorkloadCert>, IssueError> {
        let mut retry_at = slot.issuing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = SystemTime::now();
        let current = slot.current();
        if let Some(cert) = &current {
            let waiting = retry_at.is_some_and(|at| now < at);
            if now < cert.refresh_at() || (waiting && !cert.is_expired_at(now)) {
                return Ok(Arc::clone(cert));
            }
        }
        match self.provider.issue(id) {
            Ok(cert) => {
                let cert = Arc::new(cert);
                tracing::info!(
                    identity = %id,
                    serial = %cert.serial_hex(),
                    not_after = %fmt_time(cert.not_after()),
                    rotated = current.is_some(),
                    "issued workload certificate"
                );
                slot.set(Arc::clone(&cert));
                *retry_at = None;
                Ok(cert)
            }
            Err(error) => match current {
                Some(cert) if !cert.is_expired_at(now) => {
                    let left = cert.not_after().duration_since(now).unwrap_or_default();
                    let delay = (left / 4).min(MAX_RETRY_DELAY);
                    tracing::warn!(
                        identity = %id,
                        %error,
                        not_after = %fmt_time(cert.not_after()),
                        retry_in = ?delay,
                        "certificate rotation failed; still serving the current certificate"
                    );
                    *retry_at = Some(now + delay);
                    Ok(cert)
                }
                _ => Err(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::identity::{LocalCa, MeshCa, TrustDomain};

    /// A manager signing with a new root CA valid for `days`.
    fn manager(days: u32) -> Arc<CertManager> {
        let td = TrustDomain::default();
        let generated = MeshCa::generate(&td, days).unwrap();
        let ca = MeshCa::from_pem(
            generated.cert_pem.as_bytes(),
            generated.key_pem.as_bytes(),
            None,
        )
        .unwrap();
        Arc::new(CertManager::new(Arc::new(LocalCa::new(Arc::new(ca), td))))
    }

    /// (The metric side, `mesh_ca_expiring`, is checked in `admin::collectors`.)
    #[test]
    fn a_ca_expiring_within_30_days_warns() {
        let now = SystemTime::now();
        let short = manager(10);
        assert_eq!(short.check_ca_expiry(now), Some(CaExpiry::ExpiringSoon));

        let long = manager(365);
        assert_eq!(long.check_ca_expiry(now), Some(CaExpiry::Valid));
        // The same CA, seen later: warned from 30 days out, then expired.
        let ca = long.ca_validity().unwrap();
        let before = |d: u64| ca.not_after - Duration::from_secs(d);
        assert_eq!(ca.expiry_at(before(31 * 86_400)), CaExpiry::Valid);
        assert_eq!(ca.expiry_at(before(30 * 86_400)), CaExpiry::ExpiringSoon);
        assert_eq!(ca.expiry_at(ca.not_after), CaExpiry::Expired);
        assert_eq!(
            ca.expiry_at(ca.not_before - Duration::from_secs(1)),
            CaExpiry::NotYetValid
        );
        assert!(ca.expires_in(ca.not_after + Duration::from_secs(60)) == -60);
    }
}
