//! A destination's effective traffic policy (load balancing, connection
//! pool, outlier detection) and how Istio merges it: the rule's policy,
//! replaced field by field by the subset's, and replaced as a whole by a
//! matching `portLevelSettings` entry (a port-level entry does not inherit:
//! what it leaves out takes the default).

use std::time::Duration;

use serde::Serialize;

/// How an endpoint is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Lb {
    /// In turn.
    RoundRobin,
    /// Fewest active connections (Istio's default); ties in turn.
    #[default]
    LeastRequest,
    /// Uniformly random.
    Random,
    /// No choice: the connection goes to the address the client dialled.
    Passthrough,
    /// Consistent hash on the client's address (`consistentHash.useSourceIp`).
    SourceIpHash,
}

/// Outlier detection. At L4 (the node proxy) connect failures and tunnel
/// 503s count as consecutive errors that are both gateway errors and 5xx,
/// so the lower enabled threshold ([`Outlier::consecutive_errors`]) ejects;
/// at L7 (the waypoint) a response is classified and the two counters are
/// kept apart, as Envoy does ([`crate::balancer::HttpOutcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Outlier {
    /// Consecutive failures that eject an endpoint at L4: the lower of the
    /// enabled thresholds below.
    pub consecutive_errors: u32,
    /// `consecutive5xxErrors` (0: off): consecutive 5xx responses (and
    /// connection failures) that eject at L7.
    pub consecutive_5xx: u32,
    /// `consecutiveGatewayErrors` (0: off): consecutive 502/503/504
    /// responses (and connection failures) that eject at L7.
    pub consecutive_gateway: u32,
    /// Istio's analysis interval (kept for the report: ejection here is
    /// immediate and re-admission is checked on every pick, so it is never
    /// later than Istio's sweep).
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// An ejection lasts this times the times the endpoint was ejected.
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection_time: Duration,
    /// Most endpoints of a destination ejected at once, percent (at least one is allowed).
    pub max_ejection_percent: u32,
}

/// The longest ejection (Envoy's `max_ejection_time` default).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Istio's default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The effective policy of one destination (service port, optionally a subset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Endpoint choice.
    pub lb: Lb,
    /// Most concurrent connections to the destination; over it a new
    /// connection is refused (never queued). `None`: unlimited.
    pub max_connections: Option<u32>,
    /// Connect deadline per attempt ([`DEFAULT_CONNECT_TIMEOUT`] when unset).
    #[serde(serialize_with = "ser_opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Ejection of failing endpoints; `None`: off.
    pub outlier: Option<Outlier>,
}

impl Policy {
    /// The connect deadline to apply.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }
}

/// `connectionPool.tcp` as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
}

/// The settings one level (rule, subset, or port entry) sets; `None`: not set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Parts {
    pub lb: Option<Lb>,
    pub pool: Option<Pool>,
    /// `Some(None)`: set, but disabled (every threshold 0).
    pub outlier: Option<Option<Outlier>>,
}

/// A `trafficPolicy`: its own settings and its port-level entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Level {
    pub base: Parts,
    pub ports: Vec<(u16, Parts)>,
}

impl Level {
    fn at(&self, port: u16) -> Option<Parts> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, s)| *s)
    }
}

impl Parts {
    fn into_policy(self) -> Policy {
        let pool = self.pool.unwrap_or_default();
        Policy {
            lb: self.lb.unwrap_or_default(),
            max_connections: pool.max_connections,
            connect_timeout: pool.connect_timeout,
            outlier: self.outlier.flatten(),
        }
    }
}

/// Istio's `MergeTrafficPolicy` for `port`: the rule's policy (its port
/// entry replacing it when there is one), each setting the subset sets
/// replacing the rule's, then the subset's port entry replacing all.
pub(crate) fn effective(rule: Option<&Level>, subset: Option<&Level>, port: u16) -> Policy {
    let mut p = rule
        .map(|r| r.at(port).unwrap_or(r.base))
        .unwrap_or_default();
    if let Some(s) = subset {
        if s.base.lb.is_some() {
            p.lb = s.base.lb;
        }
        if s.base.pool.is_some() {
            p.pool = s.base.pool;
        }
        if s.base.outlier.is_some() {
            p.outlier = s.base.outlier;
        }
        if let Some(sp) = s.at(port) {
            p = sp;
        }
    }
    p.into_policy()
}

/// A Go-style duration as Istio accepts it (`500ms`, `10s`, `1m30s`, `1.5h`, `2us`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (write it like 500ms, 10s or 1m30s)");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}
