//! [`CertManager`]: the certificates of the node's workloads, issued on first
//! use, rotated ahead of expiry, retried with backoff through issuer outages.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{BuildHasher, Hasher, RandomState},
    sync::{
        Arc, Mutex, PoisonError, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use super::{
    CA_EXPIRY_WARNING, CaExpiry, CaValidity, CertificateProvider, IssueError, IssuerInfo, SpiffeId,
    WorkloadCert, fmt_time,
};

/// How often the sweeper checks the CA's expiry (and warns while it is
/// close); the first check is at start.
const CA_CHECK_PERIOD: Duration = Duration::from_secs(3600);

/// The first retry after a failed issuance waits about this long; each
/// further failure doubles it, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);

/// The longest a failed issuance waits before it is tried again (the current
/// certificate, while still valid, is served meanwhile).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// How long one issuance may take (a CA that does not answer is an outage,
/// not a hang).
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);

/// Per-identity certificate cache in front of a [`CertificateProvider`].
///
/// The proxy awaits [`fetch`](Self::fetch) before a handshake: it issues on
/// first use (one issuance per identity however many connections wait for
/// it) and returns the current certificate otherwise. rustls' certificate
/// callbacks then read it with [`get`](Self::get), which never issues and
/// never returns an expired certificate.
///
/// Rotation happens ahead of expiry, between 40 % and 50 % of the
/// certificate's life (jittered so that a node's identities, and the nodes
/// of a cluster, do not all ask the CA at once): in the background, by
/// [`spawn_sweeper`](Self::spawn_sweeper) and when a `fetch` finds the
/// certificate due. Rotation never touches open connections: they keep the
/// session they negotiated.
///
/// If an issuance fails, the current certificate is served while it is
/// valid and the issuance is retried with exponential backoff and jitter
/// (from 0.5 s up to a minute, and at most a quarter of the time left); an
/// identity without a valid certificate fails its handshakes until the
/// issuer answers, and `fetch` fails fast (without asking the CA again)
/// until the backoff has passed.
pub struct CertManager {
    provider: Arc<dyn CertificateProvider>,
    slots: RwLock<HashMap<SpiffeId, Arc<Slot>>>,
    stats: IssueStats,
}

/// Issuance outcomes since start, for the metrics and `mesh-agent certs`.
#[derive(Default)]
struct IssueStats {
    issued: AtomicU64,
    failed: AtomicU64,
    last_failure: Mutex<Option<IssueFailure>>,
}

/// The last failed issuance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueFailure {
    /// The identity it was for.
    pub identity: SpiffeId,
    /// Why it failed.
    pub error: String,
    /// When.
    pub at: SystemTime,
}

/// Counts of issuances since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssueCounts {
    /// Certificates issued.
    pub issued: u64,
    /// Issuances that failed.
    pub failed: u64,
    /// The last failure, if any.
    pub last_failure: Option<IssueFailure>,
}

struct Held {
    cert: Arc<WorkloadCert>,
    /// When to replace it (jittered, before half-life).
    refresh_at: SystemTime,
}

#[derive(Default)]
struct Slot {
    current: RwLock<Option<Arc<Held>>>,
    /// Held while issuing, so concurrent callers issue once; the state of
    /// failed attempts.
    issuing: tokio::sync::Mutex<Attempts>,
}

#[derive(Default)]
struct Attempts {
    /// Consecutive failures.
    failures: u32,
    /// No new attempt before this.
    retry_at: Option<SystemTime>,
    /// The last failure's message.
    last_error: Option<String>,
}

impl Slot {
    fn held(&self) -> Option<Arc<Held>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, held: Held) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(held));
    }

    /// The certificate, if it is valid at `now`.
    fn valid(&self, now: SystemTime) -> Option<Arc<Held>> {
        self.held().filter(|h| !h.cert.is_expired_at(now))
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

/// A uniformly random fraction in `[0, 1)` (std's randomly keyed hasher: no
/// dependency, and this only spreads timers).
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// When to replace `cert`: at 40-50 % of its life, at random.
fn jittered_refresh(cert: &WorkloadCert) -> SystemTime {
    let life = cert
        .not_after()
        .duration_since(cert.issued_at())
        .unwrap_or(Duration::ZERO);
    cert.issued_at() + life.mul_f64(0.4 + 0.1 * random_fraction())
}

/// The wait after `failures` consecutive failures: doubling from
/// [`FIRST_RETRY_DELAY`] up to [`MAX_RETRY_DELAY`], at most a quarter of
/// `left` (the current certificate's time left) when there is one, with
/// "equal jitter" (half fixed, half random).
fn retry_delay(failures: u32, left: Option<Duration>) -> Duration {
    let doubling = FIRST_RETRY_DELAY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let mut delay = doubling.min(MAX_RETRY_DELAY);
    if let Some(left) = left {
        delay = delay.min(left / 4).max(Duration::from_millis(100));
    }
    delay / 2 + (delay / 2).mul_f64(random_fraction())
}

impl CertManager {
    /// A manager issuing with `provider`.
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Self {
        Self {
            provider,
            slots: RwLock::new(HashMap::new()),
            stats: IssueStats::default(),
        }
    }

    /// The provider it issues with.
    pub fn provider(&self) -> &Arc<dyn CertificateProvider> {
        &self.provider
    }

    /// The issuer, as shown to the operator.
    pub fn issuer(&self) -> IssuerInfo {
        self.provider.describe()
    }

    /// Issuances and failures since start.
    pub fn issue_counts(&self) -> IssueCounts {
        IssueCounts {
            issued: self.stats.issued.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            last_failure: self
                .stats
                .last_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// The certificate to present for `id` now: the current one, if it has
    /// not expired. Never issues (rustls asks from synchronous callbacks);
    /// [`fetch`](Self::fetch) first.
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.existing(id)?
            .valid(SystemTime::now())
            .map(|h| Arc::clone(&h.cert))
    }

    /// A valid certificate for `id`: the current one (starting its rotation
    /// in the background when due), or a new one, issued now (once, however
    /// many callers wait). Errors when there is no valid certificate and
    /// issuing failed (or failed recently: see [`IssueError::Backoff`]).
    pub async fn fetch(self: &Arc<Self>, id: &SpiffeId) -> Result<Arc<WorkloadCert>, IssueError> {
        let slot = self.slot(id);
        let now = SystemTime::now();
        if let Some(held) = slot.valid(now) {
            if now >= held.refresh_at {
                self.spawn_refresh(id.clone(), Arc::clone(&slot));
            }
            return Ok(Arc::clone(&held.cert));
        }
        self.refresh(id, &slot).await
    }

    /// Starts issuing for each of `ids` that has no certificate yet, in the
    /// background (a workload arriving on the node): its first connection
    /// does not wait for the CA.
    pub fn prefetch<'a>(self: &Arc<Self>, ids: impl IntoIterator<Item = &'a SpiffeId>) {
        for id in ids {
            let slot = self.slot(id);
            if slot.held().is_none() {
                self.spawn_refresh(id.clone(), slot);
            }
        }
    }

    /// The certificate `id` has now (even expired), without issuing or rotating.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.existing(id)?.held().map(|h| Arc::clone(&h.cert))
    }

    /// The identities it holds certificates for (or is issuing for).
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

    /// Rotates every certificate that is due (and retries identities whose
    /// issuance failed, once their backoff has passed). Returns how many
    /// were replaced.
    pub async fn rotate_due(&self) -> usize {
        let slots: Vec<(SpiffeId, Arc<Slot>)> = self
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, slot)| (id.clone(), Arc::clone(slot)))
            .collect();
        let mut rotated = 0;
        for (id, slot) in slots {
            let before = slot.held();
            let now = SystemTime::now();
            if before.as_ref().is_some_and(|h| now < h.refresh_at) {
                continue;
            }
            if let Ok(after) = self.refresh(&id, &slot).await
                && before.is_none_or(|b| !Arc::ptr_eq(&b.cert, &after))
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
                manager.rotate_due().await;
            }
        })
    }

    fn existing(&self, id: &SpiffeId) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn slot(&self, id: &SpiffeId) -> Arc<Slot> {
        if let Some(slot) = self.existing(id) {
            return slot;
        }
        Arc::clone(
            self.slots
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(id.clone())
                .or_default(),
        )
    }

    /// Issues in a background task unless an issuance is already running.
    fn spawn_refresh(self: &Arc<Self>, id: SpiffeId, slot: Arc<Slot>) {
        if slot.issuing.try_lock().is_err() {
            return;
        }
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            let _ = manager.refresh(&id, &slot).await;
        });
    }

    /// Issues a certificate for `id` unless another caller just did, or a
    /// failed attempt is waiting for its retry time; returns the valid
    /// certificate there is afterwards.
    async fn refresh(&self, id: &SpiffeId, slot: &Slot) -> Result<Arc<WorkloadCert>, IssueError> {
        let mut attempts = slot.issuing.lock().await;
        let now = SystemTime::now();
        let current = slot.valid(now);
        if let Some(held) = &current
            && now < held.refresh_at
        {
            // Issued by the caller we waited for.
            return Ok(Arc::clone(&held.cert));
        }
        if let Some(at) = attempts.retry_at
            && now < at
        {
            return match current {
                Some(held) => Ok(Arc::clone(&held.cert)),
                None => Err(IssueError::Backoff {
                    id: id.clone(),
                    last_error: attempts.last_error.clone().unwrap_or_default(),
                    retry_in: at.duration_since(now).unwrap_or_default(),
                }),
            };
        }
        let issued = match tokio::time::timeout(ISSUE_TIMEOUT, self.provider.issue(id)).await {
            Ok(Ok(cert)) if cert.is_expired_at(SystemTime::now()) => Err(IssueError::Invalid {
                id: id.clone(),
                reason: format!(
                    "it expired at {}: is this machine's clock right?",
                    fmt_time(cert.not_after())
                ),
            }),
            Ok(result) => result,
            Err(_) => Err(IssueError::Unavailable {
                id: id.clone(),
                endpoint: self.provider.describe().endpoint,
                reason: format!("no answer within {} s", ISSUE_TIMEOUT.as_secs()),
            }),
        };
        match issued {
            Ok(cert) => {
                let cert = Arc::new(cert);
                tracing::info!(
                    identity = %id,
                    serial = %cert.serial_hex(),
                    not_after = %fmt_time(cert.not_after()),
                    rotated = current.is_some(),
                    "issued workload certificate"
                );
                slot.set(Held {
                    refresh_at: jittered_refresh(&cert),
                    cert: Arc::clone(&cert),
                });
                *attempts = Attempts::default();
                self.stats.issued.fetch_add(1, Ordering::Relaxed);
                Ok(cert)
            }
            Err(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                *self
                    .stats
                    .last_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(IssueFailure {
                    identity: id.clone(),
                    error: error.to_string(),
                    at: now,
                });
                attempts.failures = attempts.failures.saturating_add(1);
                let left = current
                    .as_ref()
                    .map(|h| h.cert.not_after().duration_since(now).unwrap_or_default());
                let delay = retry_delay(attempts.failures, left);
                attempts.retry_at = Some(now + delay);
                attempts.last_error = Some(error.to_string());
                match current {
                    Some(held) => {
                        tracing::warn!(
                            identity = %id,
                            %error,
                            not_after = %fmt_time(held.cert.not_after()),
                            time_left_s = left.unwrap_or_default().as_secs(),
                            failures = attempts.failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "certificate rotation failed; still serving the current certificate"
                        );
                        Ok(Arc::clone(&held.cert))
                    }
                    None => {
                        tracing::error!(
                            identity = %id,
                            %error,
                            failures = attempts.failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "certificate issuance failed; the workload's mTLS connections fail until it succeeds"
                        );
                        Err(error)
                    }
                }
            }
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
