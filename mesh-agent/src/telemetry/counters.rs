//! The proxy's counters: what `/stats` shows as its `proxy` part and the
//! agent logs when it stops. The proxy reports events
//! ([`ProxyEvent`], through [`Telemetry::count`](super::Telemetry::count));
//! connections' results and bytes are derived from their trackers' close
//! ([`ConnectionTracker::close`](super::ConnectionTracker::close)) and from
//! refusals ([`Telemetry::refused`](super::Telemetry::refused)), so each
//! thing is counted in one place.

use std::sync::atomic::{AtomicU64, Ordering};

/// Something the proxy counts when it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyEvent {
    /// An outbound (captured) connection was accepted.
    OutboundAccepted,
    /// An inbound connection (plaintext) or HBONE stream was accepted.
    InboundAccepted,
    /// A captured connection had no recorded original destination.
    NoOriginalDestination,
    /// A connection (or one endpoint of a service) was addressed to one of
    /// the agent's own listeners in the pod, and refused.
    AgentPortRefused,
    /// A tunnel (TLS + HTTP/2) connection was established by the pool.
    TunnelOpened,
    /// A tunnel stream attempt was retried (GOAWAY, `REFUSED_STREAM`,
    /// broken connection).
    StreamRetried,
    /// A tunnel stream carried its client's first bytes before the peer
    /// answered its `CONNECT` (`hbone::EarlyData`).
    StreamEarlyData,
    /// A tunnel stream failed after carrying its client's first bytes and
    /// before an answer that settles them: not retried, nor sent to another
    /// endpoint, since the destination's app may have them (the client is
    /// reset).
    StreamFailedAfterEarlyData,
    /// A connection between two pods of this node was delivered directly
    /// (the same-node fast path), not through an HBONE tunnel.
    SameNodeFastPath,
    /// A connection to a service with a waypoint was refused because the
    /// waypoint is missing, has no ready pod or could not be reached
    /// (fail closed: never sent around the waypoint).
    WaypointUnavailable,
    /// A plaintext relay direction (same-node fast path, passthrough,
    /// plaintext inbound) moved a bulk transfer by `splice(2)`.
    RelaySpliced,
    /// A plaintext relay direction's bulk transfer kept copying: it could
    /// not get a pipe (the agent's bound on pipes reached, or the process
    /// out of file descriptors).
    RelayWithoutPipe,
}

impl ProxyEvent {
    const ALL: [Self; 12] = [
        Self::OutboundAccepted,
        Self::InboundAccepted,
        Self::NoOriginalDestination,
        Self::AgentPortRefused,
        Self::TunnelOpened,
        Self::StreamRetried,
        Self::StreamEarlyData,
        Self::StreamFailedAfterEarlyData,
        Self::SameNodeFastPath,
        Self::WaypointUnavailable,
        Self::RelaySpliced,
        Self::RelayWithoutPipe,
    ];

    /// The counter's name in `/stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutboundAccepted => "outbound_accepted",
            Self::InboundAccepted => "inbound_accepted",
            Self::NoOriginalDestination => "no_original_destination",
            Self::AgentPortRefused => "agent_port_refused",
            Self::TunnelOpened => "tunnel_connections_opened",
            Self::StreamRetried => "tunnel_streams_retried",
            Self::StreamEarlyData => "tunnel_streams_early_data",
            Self::StreamFailedAfterEarlyData => "tunnel_streams_failed_after_early_data",
            Self::SameNodeFastPath => "same_node_fast_path",
            Self::WaypointUnavailable => "waypoint_unavailable",
            Self::RelaySpliced => "relay_directions_spliced",
            Self::RelayWithoutPipe => "relay_directions_without_pipe",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The proxy's counters (see the module doc for who counts what).
#[derive(Debug, Default)]
pub struct ProxyCounters {
    events: [AtomicU64; ProxyEvent::ALL.len()],
    completed: AtomicU64,
    failed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl ProxyCounters {
    /// Counts `event`.
    pub fn count(&self, event: ProxyEvent) {
        self.events[event.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many times `event` was counted.
    pub fn get(&self, event: ProxyEvent) -> u64 {
        self.events[event.index()].load(Ordering::Relaxed)
    }

    /// A tracked connection ended after relaying `sent` bytes from the
    /// client to the server and `received` back; `completed` when both
    /// directions closed cleanly, failed otherwise.
    pub(super) fn closed(&self, completed: bool, sent: u64, received: u64) {
        let result = if completed {
            &self.completed
        } else {
            &self.failed
        };
        result.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        self.bytes_received.fetch_add(received, Ordering::Relaxed);
    }

    /// A connection failed before it was tracked.
    pub(super) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter as (name, value), in a stable order: `outbound_accepted`,
    /// `inbound_accepted`, `completed`, `failed`, `no_original_destination`,
    /// `agent_port_refused`, `bytes_sent` (client to server),
    /// `bytes_received` (server to client), then the tunnel pool's, then
    /// `same_node_fast_path`, `waypoint_unavailable`,
    /// `relay_directions_spliced` and `relay_directions_without_pipe`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let e = |event: ProxyEvent| (event.as_str(), self.get(event));
        vec![
            e(ProxyEvent::OutboundAccepted),
            e(ProxyEvent::InboundAccepted),
            ("completed", v(&self.completed)),
            ("failed", v(&self.failed)),
            e(ProxyEvent::NoOriginalDestination),
            e(ProxyEvent::AgentPortRefused),
            ("bytes_sent", v(&self.bytes_sent)),
            ("bytes_received", v(&self.bytes_received)),
            e(ProxyEvent::TunnelOpened),
            e(ProxyEvent::StreamRetried),
            e(ProxyEvent::StreamEarlyData),
            e(ProxyEvent::StreamFailedAfterEarlyData),
            e(ProxyEvent::SameNodeFastPath),
            e(ProxyEvent::WaypointUnavailable),
            e(ProxyEvent::RelaySpliced),
            e(ProxyEvent::RelayWithoutPipe),
        ]
    }

    /// [`Self::snapshot`] as a JSON object (`/stats`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_its_own_counter_and_the_snapshot_names_them_all() {
        let c = ProxyCounters::default();
        for (n, event) in ProxyEvent::ALL.into_iter().enumerate() {
            for _ in 0..=n {
                c.count(event);
            }
        }
        c.closed(true, 10, 20);
        c.closed(false, 1, 2);
        c.failed();
        let snap: std::collections::BTreeMap<_, _> = c.snapshot().into_iter().collect();
        for (n, event) in ProxyEvent::ALL.into_iter().enumerate() {
            assert_eq!(snap[event.as_str()], n as u64 + 1, "{event:?}");
        }
        assert_eq!(snap["completed"], 1);
        assert_eq!(snap["failed"], 2);
        assert_eq!(snap["bytes_sent"], 11);
        assert_eq!(snap["bytes_received"], 22);
        assert_eq!(snap.len(), ProxyEvent::ALL.len() + 4);
    }
}
