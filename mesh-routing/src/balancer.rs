//! Runtime balancer state, kept across table recompiles and keyed by
//! endpoint address (and destination key): active connection counts
//! (LEAST_REQUEST, `maxConnections`), outlier detection (consecutive
//! failures eject an endpoint for `baseEjectionTime` × times ejected, never
//! more than `maxEjectionPercent` of a destination's endpoints, at least
//! one), and round-robin cursors. Time is passed in; randomness comes from a
//! seedable counter-based generator (splitmix64), so tests are deterministic.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Instant,
};

use crate::{
    policy::{Lb, MAX_EJECTION_TIME, Outlier},
    table::{Dest, RouteTable},
};

/// splitmix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function: a bijective 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_addr(ip: IpAddr, port: u16) -> u64 {
    let bits = match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let lo = bits as u64;
    let hi = (bits >> 64) as u64;
    mix(mix(lo ^ mix(hi)) ^ u64::from(port))
}

#[derive(Debug, Default)]
struct EndpointState {
    active: Arc<AtomicU32>,
    /// Consecutive failures at L4; consecutive 5xx at L7.
    consecutive_errors: u32,
    /// Consecutive gateway errors (502/503/504, connection failures) at L7.
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When `times_ejected` last changed (its decay is measured from here).
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct DestState {
    active: Arc<AtomicU32>,
    cursor: usize,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<SocketAddr, EndpointState>,
    dests: HashMap<Arc<str>, DestState>,
    table_id: u64,
}

/// The shared balancer of an agent.
#[derive(Debug)]
pub struct Balancer {
    rng: AtomicU64,
    state: Mutex<State>,
}

/// Why no endpoint was picked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The destination has no endpoint (of the family the client dialled, if it has some of that family).
    #[error("destination {0} has no ready endpoint")]
    NoEndpoint(Arc<str>),
    /// Every endpoint (not yet tried) is ejected by outlier detection.
    #[error("every endpoint of {0} is ejected by outlier detection")]
    AllEjected(Arc<str>),
    /// `connectionPool.tcp.maxConnections` reached: refused, not queued.
    #[error(
        "destination {dest} is at its maxConnections ({max}): connection refused (raise connectionPool.tcp.maxConnections)"
    )]
    Overflow {
        /// The destination.
        dest: Arc<str>,
        /// The limit.
        max: u32,
    },
}

/// An endpoint picked for a connection; holds its connection counts until
/// dropped (an RAII guard per connection).
#[derive(Debug)]
pub struct Pick {
    /// The endpoint to connect to.
    pub endpoint: SocketAddr,
    endpoint_active: Arc<AtomicU32>,
    dest_active: Arc<AtomicU32>,
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint_active.fetch_sub(1, Ordering::AcqRel);
        self.dest_active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a reported failure did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// Nothing changed beyond the count.
    None,
    /// The endpoint is now ejected (count it: `mesh_route_ejections_total`).
    Ejected,
}

/// How an HTTP request's try at an endpoint ended, for L7 outlier
/// detection (Envoy's classification).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpOutcome {
    /// A response below 500.
    Ok,
    /// A 5xx response other than 502/503/504.
    ServerError,
    /// 502, 503 or 504, or no response (connect failure, reset, timeout):
    /// both a gateway error and a 5xx.
    GatewayError,
}

impl HttpOutcome {
    /// The outcome of a response with `status`.
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Ok,
        }
    }
}

/// An endpoint's state, for the CLI and `/config_dump`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// Active connections.
    pub active: u32,
    /// Consecutive failures so far.
    pub consecutive_errors: u32,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// Times ejected (the ejection time multiplier).
    pub times_ejected: u32,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::with_seed(0)
    }
}

impl Balancer {
    /// A balancer whose random draws start from `seed` (deterministic).
    pub fn with_seed(seed: u64) -> Self {
        Self {
            rng: AtomicU64::new(seed),
            state: Mutex::default(),
        }
    }

    /// A uniform random `u64` (splitmix64; lock-free).
    pub fn random(&self) -> u64 {
        mix(self
            .rng
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the state of endpoints and destinations `table` no longer has
    /// (unless a connection still holds them). Cheap when `table` is the
    /// one seen last.
    pub fn prune(&self, table: &RouteTable) {
        let mut st = self.lock();
        if st.table_id == table.id() {
            return;
        }
        st.table_id = table.id();
        let live: std::collections::HashSet<SocketAddr> = table.endpoints().collect();
        st.endpoints
            .retain(|a, e| live.contains(a) || e.active.load(Ordering::Acquire) > 0);
        st.dests.retain(|_, d| {
            d.active.load(Ordering::Acquire) > 0 || Arc::strong_count(&d.active) > 1
        });
    }

    /// Picks an endpoint of `dest` for a connection from `source` to
    /// `dialled` at `now`, skipping `tried` (earlier attempts of the same
    /// connection). Endpoints of the dialled family are preferred when there
    /// are some. `Lb::Passthrough` picks nothing: the caller dials `dialled`.
    pub fn pick(
        &self,
        dest: &Dest,
        source: IpAddr,
        dialled: SocketAddr,
        now: Instant,
        tried: &[SocketAddr],
    ) -> Result<Pick, PickError> {
        let random = self.random();
        let mut st = self.lock();
        let same_family = dest
            .endpoints
            .iter()
            .any(|e| e.is_ipv4() == dialled.is_ipv4());
        let mut candidates: Vec<SocketAddr> = dest
            .endpoints
            .iter()
            .filter(|e| !same_family || e.is_ipv4() == dialled.is_ipv4())
            .filter(|e| !tried.contains(e))
            .copied()
            .collect();
        if candidates.is_empty() {
            return Err(PickError::NoEndpoint(dest.key.clone()));
        }
        // Re-admit endpoints whose ejection is over; drop the ejected ones.
        candidates.retain(|e| match st.endpoints.get_mut(e) {
            Some(s) => match s.ejected_until {
                Some(until) if until > now => false,
                Some(_) => {
                    s.ejected_until = None;
                    s.consecutive_errors = 0;
                    true
                }
                None => true,
            },
            None => true,
        });
        if candidates.is_empty() {
            return Err(PickError::AllEjected(dest.key.clone()));
        }
        let State {
            endpoints, dests, ..
        } = &mut *st;
        let d = dests.entry(dest.key.clone()).or_default();
        let dest_active = d.active.clone();
        if let Some(max) = dest.policy.max_connections {
            let over = dest_active
                .try_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_err();
            if over {
                return Err(PickError::Overflow {
                    dest: dest.key.clone(),
                    max,
                });
            }
        } else {
            dest_active.fetch_add(1, Ordering::AcqRel);
        }
        let n = candidates.len();
        let chosen = match dest.policy.lb {
            Lb::RoundRobin | Lb::Passthrough => {
                let c = d.cursor;
                d.cursor = d.cursor.wrapping_add(1);
                candidates[c % n]
            }
            Lb::Random => candidates[(random % n as u64) as usize],
            Lb::SourceIpHash => {
                // Rendezvous hashing: each endpoint scores hash(source, endpoint);
                // the highest wins. Stable while the set is unchanged, and
                // only the clients of a removed endpoint move.
                let s = hash_addr(source, 0);
                candidates
                    .iter()
                    .copied()
                    .max_by_key(|e| mix(s ^ hash_addr(e.ip(), e.port())))
                    .unwrap_or(candidates[0])
            }
            Lb::LeastRequest => {
                // Fewest active connections; ties in turn (from the cursor).
                let start = d.cursor % n;
                d.cursor = d.cursor.wrapping_add(1);
                (0..n)
                    .map(|i| candidates[(start + i) % n])
                    .min_by_key(|e| {
                        endpoints
                            .get(e)
                            .map_or(0, |s| s.active.load(Ordering::Acquire))
                    })
                    .unwrap_or(candidates[0])
            }
        };
        let e = endpoints.entry(chosen).or_default();
        e.active.fetch_add(1, Ordering::AcqRel);
        Ok(Pick {
            endpoint: chosen,
            endpoint_active: e.active.clone(),
            dest_active,
        })
    }

    /// A connection (or, at L7, a request) to `endpoint` of `dest` succeeded
    /// at `now`: its consecutive failures (both counters) are forgiven, and (as Envoy does) its ejection
    /// multiplier decays by one per outlier `interval` it stayed healthy.
    pub fn success(&self, dest: &Dest, endpoint: SocketAddr, now: Instant) {
        let mut st = self.lock();
        let Some(e) = st.endpoints.get_mut(&endpoint) else {
            return;
        };
        e.consecutive_errors = 0;
        e.consecutive_gateway = 0;
        if let (Some(od), Some(since)) = (dest.policy.outlier, e.since)
            && e.times_ejected > 0
            && e.ejected_until.is_none_or(|u| u <= now)
            && now.saturating_duration_since(since) >= od.interval
        {
            let intervals =
                now.saturating_duration_since(since).as_nanos() / od.interval.as_nanos().max(1);
            e.times_ejected = e
                .times_ejected
                .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
            e.since = Some(now);
        }
    }

    /// A connection to `endpoint` of `dest` failed (connect failure, timeout,
    /// tunnel 503) at `now`: counted, and the endpoint ejected when the
    /// destination's outlier detection says so.
    pub fn failure(&self, dest: &Dest, endpoint: SocketAddr, now: Instant) -> Ejection {
        self.count_failure(dest, endpoint, now, |e, od| {
            e.consecutive_errors = e.consecutive_errors.saturating_add(1);
            e.consecutive_errors >= od.consecutive_errors
        })
    }

    /// An HTTP request's try at `endpoint` of `dest` ended with `outcome`
    /// at `now` (the L7 waypoint): a response below 500 counts as a
    /// success; 5xx and gateway errors are counted apart and the endpoint
    /// is ejected when either enabled threshold (`consecutive5xxErrors`,
    /// `consecutiveGatewayErrors`) is reached.
    pub fn http_result(
        &self,
        dest: &Dest,
        endpoint: SocketAddr,
        now: Instant,
        outcome: HttpOutcome,
    ) -> Ejection {
        if outcome == HttpOutcome::Ok {
            self.success(dest, endpoint, now);
            return Ejection::None;
        }
        self.count_failure(dest, endpoint, now, |e, od| {
            e.consecutive_errors = e.consecutive_errors.saturating_add(1);
            e.consecutive_gateway = if outcome == HttpOutcome::GatewayError {
                e.consecutive_gateway.saturating_add(1)
            } else {
                0
            };
            (od.consecutive_5xx > 0 && e.consecutive_errors >= od.consecutive_5xx)
                || (od.consecutive_gateway > 0 && e.consecutive_gateway >= od.consecutive_gateway)
        })
    }

    /// Counts a failure with `count` (which says whether the endpoint's
    /// counters now reach a threshold) and ejects when they do and the
    /// destination's `maxEjectionPercent` allows it.
    fn count_failure(
        &self,
        dest: &Dest,
        endpoint: SocketAddr,
        now: Instant,
        count: impl FnOnce(&mut EndpointState, &Outlier) -> bool,
    ) -> Ejection {
        let mut st = self.lock();
        let Some(od) = dest.policy.outlier else {
            return Ejection::None;
        };
        let ejected_now = dest
            .endpoints
            .iter()
            .filter(|a| {
                st.endpoints
                    .get(a)
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|u| u > now)
            })
            .count();
        let allowed = if od.max_ejection_percent == 0 {
            0
        } else {
            (dest.endpoints.len() * od.max_ejection_percent as usize / 100).max(1)
        };
        let e = st.endpoints.entry(endpoint).or_default();
        if e.ejected_until.is_some_and(|u| u > now) {
            return Ejection::None;
        }
        if !count(e, &od) || ejected_now >= allowed {
            return Ejection::None;
        }
        e.times_ejected = e.times_ejected.saturating_add(1);
        let time = od
            .base_ejection_time
            .saturating_mul(e.times_ejected)
            .min(MAX_EJECTION_TIME.max(od.base_ejection_time));
        e.ejected_until = Some(now + time);
        e.since = Some(now + time);
        e.consecutive_errors = 0;
        e.consecutive_gateway = 0;
        Ejection::Ejected
    }

    /// The state of `endpoint` at `now`.
    pub fn status(&self, endpoint: SocketAddr, now: Instant) -> EndpointStatus {
        let st = self.lock();
        st.endpoints
            .get(&endpoint)
            .map_or(EndpointStatus::default_status(), |e| EndpointStatus {
                active: e.active.load(Ordering::Acquire),
                consecutive_errors: e.consecutive_errors,
                ejected: e.ejected_until.is_some_and(|u| u > now),
                times_ejected: e.times_ejected,
            })
    }

    /// Active connections to the destination `key`.
    pub fn dest_active(&self, key: &str) -> u32 {
        self.lock()
            .dests
            .get(key)
            .map_or(0, |d| d.active.load(Ordering::Acquire))
    }
}

impl EndpointStatus {
    fn default_status() -> Self {
        Self {
            active: 0,
            consecutive_errors: 0,
            ejected: false,
            times_ejected: 0,
        }
    }
}
