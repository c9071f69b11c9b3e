//! Tokens the API server authenticated a moment ago, and whom for: so that
//! a caller repeating a valid token (a flood from one pod, an agent asking
//! for all its pods at once) costs the API server one TokenReview per
//! [`CaServerConfig::token_review_cache`](super::CaServerConfig) instead of
//! one per request, and reaches the per-node rate limit before any review.
//!
//! Only successful reviews are kept (a refused token is the failure
//! budget's, per source address), for a short time counted from when the
//! review was asked (a slow API server does not lengthen it), and never
//! past the token's own expiry (the JWT's `exp`, read unverified: the
//! review authenticated the token; its claims only shorten what is kept).
//! A token without a readable `exp` is not kept. A token revoked meanwhile
//! (its pod deleted) is still honoured that long, as the API server's own
//! token cache does (10 s for successes).
//!
//! Reviews of one token asked at the same time are one review: the first
//! request asks ([`Lookup::Lead`]), the others wait for its answer
//! ([`Lookup::Shared`]); if it fails or is cancelled, each asks for itself.
//! Bounded: at most [`MAX_ENTRIES`] tokens kept and as many reviews in
//! flight, of tokens of at most [`MAX_TOKEN_BYTES`]; past that, reviews are
//! neither kept nor shared.

use std::{
    collections::HashMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use base64::Engine;
use tokio::sync::watch;

use super::authz::Caller;

/// The most tokens kept at once, and the most reviews shared at once.
pub const MAX_ENTRIES: usize = 4096;
/// The longest token kept (a service account token is about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a review in flight has come to.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Not yet.
    Pending,
    /// The token is this caller's.
    Reviewed(Caller),
    /// The review failed (or was given up): ask again.
    Failed,
}

/// The cache: token → the caller its review described, until when; and
/// the reviews in flight, by token.
pub struct Reviewed {
    ttl: Duration,
    by_token: Mutex<HashMap<String, (Caller, Instant)>>,
    in_flight: Mutex<HashMap<String, (u64, watch::Receiver<Answer>)>>,
    next_flight: AtomicU64,
}

impl std::fmt::Debug for Reviewed {
    // Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = lock(&self.by_token).len();
        let flying = lock(&self.in_flight).len();
        f.debug_struct("Reviewed")
            .field("ttl", &self.ttl)
            .field("entries", &n)
            .field("in_flight", &flying)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What [`Reviewed::lookup`] found for a token.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// Reviewed a moment ago: its caller.
    Cached(Caller),
    /// Another request is asking the API server: wait for its [`Answer`].
    Shared(watch::Receiver<Answer>),
    /// Nobody is: ask, and give the answer to the flight.
    Lead(Flight<'a>),
}

/// A review being asked, shared with the requests that wait for it: its
/// end is given to them by [`Flight::reviewed`], or as a failure when the
/// flight is dropped without it (the review failed, or its request went
/// away).
pub struct Flight<'a> {
    reviewed: &'a Reviewed,
    /// The token and the flight's id, when it is shared.
    shared: Option<(String, u64)>,
    tx: watch::Sender<Answer>,
}

impl std::fmt::Debug for Flight<'_> {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight")
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl Flight<'_> {
    /// The review, asked at `asked`, found `caller`: kept, and given to
    /// the requests waiting for it.
    pub fn reviewed(self, token: &str, caller: &Caller, asked: Instant) {
        self.reviewed.insert(token, caller, asked);
        self.tx.send_replace(Answer::Reviewed(caller.clone()));
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let Some((token, id)) = self.shared.take() {
            let mut flying = lock(&self.reviewed.in_flight);
            if flying.get(&token).is_some_and(|(i, _)| *i == id) {
                flying.remove(&token);
            }
        }
        // Waiters not answered yet ask again.
        self.tx.send_if_modified(|a| {
            let pending = matches!(a, Answer::Pending);
            if pending {
                *a = Answer::Failed;
            }
            pending
        });
    }
}

impl Reviewed {
    /// Keeps reviews `ttl` (zero: none, and none shared).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            by_token: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
        }
    }

    /// The caller `token` was reviewed as, if that review is still kept at
    /// `now`.
    pub fn get(&self, token: &str, now: Instant) -> Option<Caller> {
        let map = lock(&self.by_token);
        let (caller, until) = map.get(token)?;
        (now < *until).then(|| caller.clone())
    }

    /// What is known of `token` at `now`: a kept review, one in flight to
    /// wait for, or none (the caller leads a new one).
    pub fn lookup(&self, token: &str, now: Instant) -> Lookup<'_> {
        if let Some(caller) = self.get(token, now) {
            return Lookup::Cached(caller);
        }
        let (tx, rx) = watch::channel(Answer::Pending);
        let mut shared = None;
        if !self.ttl.is_zero() && token.len() <= MAX_TOKEN_BYTES {
            let mut flying = lock(&self.in_flight);
            if let Some((_, waiting)) = flying.get(token) {
                return Lookup::Shared(waiting.clone());
            }
            if flying.len() < MAX_ENTRIES {
                let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                flying.insert(token.to_owned(), (id, rx));
                shared = Some((token.to_owned(), id));
            }
        }
        Lookup::Lead(Flight {
            reviewed: self,
            shared,
            tx,
        })
    }

    /// Keeps `caller` as `token`'s review, asked at `asked`: until the ttl
    /// from then or the token's `exp`, whichever is first; not at all
    /// without a readable `exp`. Expired entries go first when the cache
    /// is full.
    pub fn insert(&self, token: &str, caller: &Caller, asked: Instant) {
        self.insert_at(token, caller, asked, Instant::now(), SystemTime::now());
    }

    /// [`Self::insert`] with the clocks read at `now` and `wall`.
    fn insert_at(
        &self,
        token: &str,
        caller: &Caller,
        asked: Instant,
        now: Instant,
        wall: SystemTime,
    ) {
        if self.ttl.is_zero() || token.len() > MAX_TOKEN_BYTES {
            return;
        }
        let Some(left) = jwt_expiry(token).and_then(|exp| exp.duration_since(wall).ok()) else {
            return;
        };
        let until = match (asked.checked_add(self.ttl), now.checked_add(left)) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(u) => u,
                None => return,
            },
        };
        if until <= now {
            return;
        }
        let mut map = lock(&self.by_token);
        if map.len() >= MAX_ENTRIES && !map.contains_key(token) {
            map.retain(|_, (_, until)| now < *until);
            if map.len() >= MAX_ENTRIES {
                return;
            }
        }
        map.insert(token.to_owned(), (caller.clone(), until));
    }
}

/// The expiry a JWT claims (`exp`, seconds since the epoch), read without
/// verifying anything; `None` for anything else.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
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

    /// A JWT-shaped token named `name` whose payload is `claims`.
    fn jwt(name: &str, claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.{name}", b64(r#"{"alg":"RS256"}"#), b64(claims))
    }

    /// A token of `name` that expires `secs` after `wall`.
    fn expiring(name: &str, wall: SystemTime, secs: u64) -> String {
        let exp = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs()
            + secs;
        jwt(name, &format!(r#"{{"exp":{exp},"sub":"x"}}"#))
    }

    #[test]
    fn a_review_is_kept_for_the_ttl_only_and_the_cache_is_bounded() {
        let r = Reviewed::new(Duration::from_secs(10));
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let tok = expiring("tok", wall, 3600);
        r.insert_at(&tok, &caller("cart"), t0, t0, wall);
        assert_eq!(
            r.get(&tok, t0 + Duration::from_secs(9)),
            Some(caller("cart"))
        );
        assert_eq!(r.get(&tok, t0 + Duration::from_secs(10)), None);
        assert_eq!(r.get("other", t0), None);
        // Full of fresh entries: a new token is not kept, an expired entry
        // makes room.
        let at5 = t0 + Duration::from_secs(5);
        for i in 0..MAX_ENTRIES - 1 {
            r.insert_at(
                &expiring(&format!("t{i}"), wall, 3600),
                &caller("cart"),
                at5,
                at5,
                wall,
            );
        }
        let late = expiring("late", wall, 3600);
        let at6 = t0 + Duration::from_secs(6);
        r.insert_at(&late, &caller("web"), at6, at6, wall);
        assert_eq!(r.get(&late, at6), None);
        let at11 = t0 + Duration::from_secs(11);
        r.insert_at(&late, &caller("web"), at11, at11, wall);
        assert_eq!(r.get(&late, at11), Some(caller("web")));
        // Too long a token, or a ttl of zero: nothing kept.
        let long = jwt(&"x".repeat(MAX_TOKEN_BYTES), r#"{"exp":99999999999}"#);
        r.insert_at(&long, &caller("cart"), t0, t0, wall);
        assert_eq!(r.get(&long, t0), None);
        let off = Reviewed::new(Duration::ZERO);
        off.insert_at(&tok, &caller("cart"), t0, t0, wall);
        assert_eq!(off.get(&tok, t0), None);
    }

    /// A token expiring before the ttl is over is kept until it expires;
    /// the ttl runs from when the review was asked, not answered.
    #[test]
    fn a_review_is_kept_no_longer_than_its_token_nor_the_ttl_from_asking() {
        let r = Reviewed::new(Duration::from_secs(10));
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let soon = expiring("soon", wall, 3);
        r.insert_at(&soon, &caller("cart"), t0, t0, wall);
        assert!(r.get(&soon, t0 + Duration::from_secs(2)).is_some());
        assert_eq!(r.get(&soon, t0 + Duration::from_secs(3)), None);
        // Asked at t0, answered 8 s later: kept 2 s more, not 10.
        let slow = expiring("slow", wall, 3600);
        let answered = t0 + Duration::from_secs(8);
        r.insert_at(
            &slow,
            &caller("cart"),
            t0,
            answered,
            wall + Duration::from_secs(8),
        );
        assert!(r.get(&slow, t0 + Duration::from_secs(9)).is_some());
        assert_eq!(r.get(&slow, t0 + Duration::from_secs(10)), None);
        // Already expired: not kept.
        let gone = expiring("gone", wall - Duration::from_secs(60), 30);
        r.insert_at(&gone, &caller("cart"), t0, t0, wall);
        assert_eq!(r.get(&gone, t0), None);
    }

    /// Anything but a JWT with a numeric `exp` is not kept; hostile input
    /// is refused, never a panic.
    #[test]
    fn tokens_without_a_readable_expiry_are_not_kept() {
        let r = Reviewed::new(Duration::from_secs(10));
        let (t0, wall) = (Instant::now(), SystemTime::now());
        for token in [
            "opaque".to_owned(),
            "a.b".to_owned(),
            "a.b.c.d".to_owned(),
            "x.!!!.y".to_owned(),
            jwt("s", "not json"),
            jwt("s", r#"{"sub":"no exp"}"#),
            jwt("s", r#"{"exp":"soon"}"#),
            jwt("s", r#"{"exp":-5}"#),
            jwt("s", r#"{"exp":1.5e300}"#),
        ] {
            r.insert_at(&token, &caller("cart"), t0, t0, wall);
            assert_eq!(r.get(&token, t0), None, "{token}");
        }
        // An expiry beyond what a clock holds: not kept either.
        let overflow = jwt("overflow", &format!(r#"{{"exp":{}}}"#, u64::MAX));
        r.insert_at(&overflow, &caller("cart"), t0, t0, wall);
        assert_eq!(r.get(&overflow, t0), None);
        // A far one (the year 3000): the ttl bounds it.
        let far = jwt("far", r#"{"exp":32503680000}"#);
        r.insert_at(&far, &caller("cart"), t0, t0, wall);
        assert!(r.get(&far, t0 + Duration::from_secs(9)).is_some());
        assert_eq!(r.get(&far, t0 + Duration::from_secs(10)), None);
    }

    /// Lookups of a token under review wait for it; its answer reaches
    /// them; a flight dropped without one tells them to ask again, and the
    /// next lookup leads.
    #[tokio::test]
    async fn concurrent_lookups_share_one_review() {
        let r = Reviewed::new(Duration::from_secs(10));
        let tok = expiring("tok", SystemTime::now(), 3600);
        let Lookup::Lead(flight) = r.lookup(&tok, Instant::now()) else {
            panic!("the first lookup leads")
        };
        let Lookup::Shared(mut waiting) = r.lookup(&tok, Instant::now()) else {
            panic!("the second waits")
        };
        drop(flight);
        let answer = waiting
            .wait_for(|a| !matches!(a, Answer::Pending))
            .await
            .map(|a| a.clone());
        assert!(matches!(answer, Ok(Answer::Failed)), "{answer:?}");
        let Lookup::Lead(flight) = r.lookup(&tok, Instant::now()) else {
            panic!("after a failure, a lookup leads again")
        };
        let Lookup::Shared(mut waiting) = r.lookup(&tok, Instant::now()) else {
            panic!("waits")
        };
        flight.reviewed(&tok, &caller("cart"), Instant::now());
        let answer = waiting
            .wait_for(|a| !matches!(a, Answer::Pending))
            .await
            .map(|a| a.clone());
        assert!(matches!(answer, Ok(Answer::Reviewed(c)) if c == caller("cart")));
        assert!(matches!(r.lookup(&tok, Instant::now()), Lookup::Cached(_)));
        assert_eq!(lock(&r.in_flight).len(), 0);
        // Turned off: every lookup leads, nothing is shared.
        let off = Reviewed::new(Duration::ZERO);
        let _first = off.lookup(&tok, Instant::now());
        assert!(matches!(off.lookup(&tok, Instant::now()), Lookup::Lead(_)));
    }
}
