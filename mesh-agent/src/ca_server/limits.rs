//! The CA server's bounds: fixed limits, and the per-node token bucket.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// The largest request message (a CSR is at most a few KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest response message.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Headers (the token is the largest, ~1 KiB).
pub const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;
/// Concurrent streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Deadline of one request, the API calls included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long (clients reconnect): a shutdown
/// never waits on idle connections longer, and rotated serving
/// certificates reach every client.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// How many rate-limit buckets are kept (distinct nodes); beyond it, idle
/// (full) buckets are dropped, and if none is, new callers are refused.
pub const MAX_BUCKETS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key (a node): `rate` requests per second, up to
/// `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    max_buckets: usize,
}

impl RateLimiter {
    /// `rate` per second (positive), `burst` at least 1.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self::with_capacity(rate, burst, MAX_BUCKETS)
    }

    fn with_capacity(rate: f64, burst: u32, max_buckets: usize) -> Self {
        Self {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                1.0
            },
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            max_buckets,
        }
    }

    /// Takes one token of `key`'s bucket at `now`, or says how long until
    /// one is there.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_buckets {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, rate, burst, now) < burst);
            if buckets.len() >= self.max_buckets {
                return Err(Duration::from_secs(1));
            }
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(bucket, self.rate, self.burst, now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

impl RateLimiter {
    /// Gives back a token [`Self::check`] took from `key` (up to the burst).
    pub fn give_back(&self, key: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }
}

fn refill(b: &Bucket, rate: f64, burst: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check("node/a", t0).unwrap();
        }
        let wait = limiter.check("node/a", t0).unwrap_err();
        limiter.give_back("node/a");
        limiter.check("node/a", t0).unwrap();
        limiter.check("node/a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another node has its own bucket.
        limiter.check("node/b", t0).unwrap();
        // Half a second later one more token is there, and only one.
        let t1 = t0 + Duration::from_millis(500);
        limiter.check("node/a", t1).unwrap();
        limiter.check("node/a", t1).unwrap_err();
    }

    #[test]
    fn buckets_are_bounded() {
        let limiter = RateLimiter::with_capacity(1.0, 1, 2);
        let t0 = Instant::now();
        limiter.check("a", t0).unwrap();
        limiter.check("b", t0).unwrap();
        // Both buckets are in use: a third caller is refused.
        limiter.check("c", t0).unwrap_err();
        // Once they refilled they are dropped, and room is made.
        limiter.check("c", t0 + Duration::from_secs(2)).unwrap();
    }
}
