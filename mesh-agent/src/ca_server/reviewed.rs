//! Tokens the API server authenticated a moment ago, and whom for: so that
//! a caller repeating a valid token (a flood from one pod, an agent asking
//! for all its pods at once) costs the API server one TokenReview per
//! [`CaServerConfig::token_review_cache`](super::CaServerConfig) instead of
//! one per request, and reaches the per-node rate limit before any review.
//!
//! Only successful reviews are kept (a refused token is the failure
//! budget's, per source address), for a short time: a token revoked
//! meanwhile (its pod deleted) is still honoured that long, as the API
//! server's own token cache does (10 s for successes). Bounded: at most
//! [`MAX_ENTRIES`] tokens of at most [`MAX_TOKEN_BYTES`]; past that, reviews
//! are simply not kept.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::authz::Caller;

/// The most tokens kept at once.
pub const MAX_ENTRIES: usize = 4096;
/// The longest token kept (a service account token is about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The cache: token → the caller its review described, and when.
pub struct Reviewed {
    ttl: Duration,
    by_token: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl std::fmt::Debug for Reviewed {
    // Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .by_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Reviewed")
            .field("ttl", &self.ttl)
            .field("entries", &n)
            .finish()
    }
}

impl Reviewed {
    /// Keeps reviews `ttl` (zero: none).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            by_token: Mutex::new(HashMap::new()),
        }
    }

    /// The caller `token` was reviewed as, if that was less than the ttl
    /// before `now`.
    pub fn get(&self, token: &str, now: Instant) -> Option<Caller> {
        let map = self.by_token.lock().unwrap_or_else(PoisonError::into_inner);
        let (caller, at) = map.get(token)?;
        (now.saturating_duration_since(*at) < self.ttl).then(|| caller.clone())
    }

    /// Keeps `caller` as `token`'s review, made at `now`; expired entries
    /// go first when the cache is full.
    pub fn insert(&self, token: &str, caller: &Caller, now: Instant) {
        if self.ttl.is_zero() || token.len() > MAX_TOKEN_BYTES {
            return;
        }
        let mut map = self.by_token.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_ENTRIES && !map.contains_key(token) {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            if map.len() >= MAX_ENTRIES {
                return;
            }
        }
        map.insert(token.to_owned(), (caller.clone(), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca_server::authz::ServiceAccountRef;

    fn caller(name: &str) -> Caller {
        Caller {
            username: format!("system:serviceaccount:shop:{name}"),
            service_account: ServiceAccountRef {
                namespace: "shop".into(),
                name: name.into(),
            },
            pod_name: None,
            pod_uid: None,
            node_name: Some("node-a".into()),
        }
    }

    #[test]
    fn a_review_is_kept_for_the_ttl_only_and_the_cache_is_bounded() {
        let r = Reviewed::new(Duration::from_secs(10));
        let t0 = Instant::now();
        r.insert("tok", &caller("cart"), t0);
        assert_eq!(
            r.get("tok", t0 + Duration::from_secs(9)),
            Some(caller("cart"))
        );
        assert_eq!(r.get("tok", t0 + Duration::from_secs(10)), None);
        assert_eq!(r.get("other", t0), None);
        // Full of fresh entries: a new token is not kept, an expired entry
        // makes room.
        for i in 0..MAX_ENTRIES - 1 {
            r.insert(
                &format!("t{i}"),
                &caller("cart"),
                t0 + Duration::from_secs(5),
            );
        }
        r.insert("late", &caller("web"), t0 + Duration::from_secs(6));
        assert_eq!(r.get("late", t0 + Duration::from_secs(6)), None);
        r.insert("late", &caller("web"), t0 + Duration::from_secs(11));
        assert_eq!(
            r.get("late", t0 + Duration::from_secs(11)),
            Some(caller("web"))
        );
        // Too long a token, or a ttl of zero: nothing kept.
        r.insert(&"x".repeat(MAX_TOKEN_BYTES + 1), &caller("cart"), t0);
        assert_eq!(r.get(&"x".repeat(MAX_TOKEN_BYTES + 1), t0), None);
        let off = Reviewed::new(Duration::ZERO);
        off.insert("tok", &caller("cart"), t0);
        assert_eq!(off.get("tok", t0), None);
    }
}
