//! Why the proxy did not carry a connection, or stopped carrying it: one
//! typed error for every path (outbound, inbound plaintext, inbound HBONE,
//! the relays), mapped once — here — to what telemetry reports (the access
//! log's `outcome`, `reason` and `policy`, the `response_flags` label, the
//! proxy's counters) and to the status an HBONE `CONNECT` is answered with.

use std::{io, net::SocketAddr};

use http::StatusCode;

use super::{copy::RelayOutcome, hbone::HboneError};
use crate::{
    identity::SpiffeIdError,
    policy::DenyReason,
    routing::{PickError, RouteError},
    telemetry::{Failure, FailureKind, Outcome, ProxyEvent},
};

/// Why the proxy refused, failed or cut a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel recorded no original destination for a captured
    /// connection (the datapath was reinstalled under it, or the record was
    /// evicted).
    #[error("no original destination recorded for the captured connection")]
    NoOriginalDestination,
    /// The destination is the pod itself (loopback or the unspecified
    /// address): proxying it would loop.
    #[error("{0} is the pod's own loopback or unspecified address: refused (a loop)")]
    Loopback(SocketAddr),
    /// The destination is one of the agent's own listeners in the pod.
    #[error(
        "{0} is one of the agent's own ports in the pod (15001, 15006, 15008), not an app: \
         refused, as delivering it would loop back into the agent"
    )]
    AgentPort(SocketAddr),
    /// A service address with no ready endpoint for the port.
    #[error("service {0} has no ready endpoint")]
    NoEndpoint(SocketAddr),
    /// A service endpoint that is the pod itself or one of the agent's own
    /// ports in the pod.
    #[error(
        "endpoint {0} is this pod's loopback or one of the agent's own ports in it: refused (a loop)"
    )]
    EndpointLoop(SocketAddr),
    /// A mesh workload whose identity cannot be formed.
    #[error("{target} has no valid identity: {source}")]
    NoIdentity {
        /// The endpoint.
        target: SocketAddr,
        /// Why.
        source: SpiffeIdError,
    },
    /// The pod has no valid certificate to present (the issuer is down or
    /// refuses): no mTLS connection is made for it.
    #[error("no certificate for the pod's identity: {0}")]
    NoCertificate(#[source] crate::identity::IssueError),
    /// The HBONE tunnel failed: connect, mTLS (identity check) or the
    /// peer's refusal (HTTP status).
    #[error(transparent)]
    Tunnel(#[from] HboneError),
    /// A destination outside the mesh could not be reached.
    #[error("cannot connect to {target}: {source}")]
    Direct {
        /// The destination.
        target: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// An inbound connection to an address that is not the pod's.
    #[error("{0} is not one of the pod's addresses")]
    NotThePod(SocketAddr),
    /// An HBONE request that is not a `CONNECT` to an address.
    #[error("bad HBONE request: {method} {uri}")]
    BadRequest {
        /// The request's method.
        method: http::Method,
        /// The request's URI.
        uri: http::Uri,
    },
    /// An HBONE `CONNECT` to an address that is not the pod's.
    #[error("CONNECT target {0} is not this pod")]
    TargetNotThePod(SocketAddr),
    /// An authorization policy (or the absence of an ALLOW one) denies the
    /// connection.
    #[error("{0}")]
    Denied(DenyReason),
    /// The app in the pod could not be reached.
    #[error("cannot reach the app at {target}: {source} (is the app listening on that port?)")]
    App {
        /// The app's address.
        target: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The tunnel stream ended before the agent could answer the `CONNECT`.
    #[error("tunnel stream gone before the response: {0}")]
    StreamGone(#[source] h2::Error),
    /// A side of the relay failed or reset the connection.
    #[error(transparent)]
    Relay(io::Error),
    /// A policy change denies the open connection, so the relay was cut.
    #[error("closed by a policy change")]
    Revoked,
    /// The route of a service connection leads nowhere (a missing
    /// destination service, port or subset): failed at once.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// No endpoint of the routed destination could be taken: none ready,
    /// every one ejected, or the destination at its `maxConnections`
    /// (refused, never queued).
    #[error(transparent)]
    Pick(#[from] PickError),
    /// An endpoint did not answer within the destination's `connectTimeout`.
    #[error(
        "connecting to {target} timed out after {}ms (the DestinationRule's connectionPool.tcp.connectTimeout)",
        timeout.as_millis()
    )]
    ConnectTimeout {
        /// The endpoint.
        target: SocketAddr,
        /// The deadline.
        timeout: std::time::Duration,
    },
    /// The service has a waypoint (`istio.io/use-waypoint`) that cannot
    /// take the connection: refused, never sent around the waypoint.
    #[error(
        "waypoint {waypoint} unavailable, connection refused (fail closed, the service's traffic never bypasses its waypoint): {reason}"
    )]
    Waypoint {
        /// The waypoint.
        waypoint: crate::state::WaypointRef,
        /// Why it cannot take it.
        reason: WaypointFailure,
    },
}

/// Why a waypoint cannot take a connection.
#[derive(Debug, thiserror::Error)]
pub enum WaypointFailure {
    /// The reference resolves to no pod (no Service, no HBONE port, no ready pod).
    #[error(transparent)]
    Resolve(#[from] crate::state::WaypointError),
    /// Every pod of the waypoint tried failed (the last error).
    #[error("unreachable: {0}")]
    Unreachable(#[source] Box<Error>),
}

impl Error {
    /// The status an HBONE `CONNECT` that failed so is answered with: 400
    /// for a request the agent will never serve, 401 for a denial, 503 for
    /// a destination it cannot reach now.
    pub fn connect_status(&self) -> StatusCode {
        match self {
            Self::Denied(_) | Self::Revoked => StatusCode::UNAUTHORIZED,
            Self::BadRequest { .. }
            | Self::TargetNotThePod(_)
            | Self::AgentPort(_)
            | Self::Loopback(_)
            | Self::EndpointLoop(_)
            | Self::NotThePod(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl Failure for Error {
    fn kind(&self) -> FailureKind {
        match self {
            Self::NoEndpoint(_)
            | Self::EndpointLoop(_)
            | Self::NoIdentity { .. }
            | Self::NoCertificate(_)
            | Self::Tunnel(_)
            | Self::Direct { .. }
            | Self::App { .. }
            | Self::Route(_)
            | Self::Pick(_)
            | Self::ConnectTimeout { .. }
            | Self::Waypoint { .. } => FailureKind::ConnectFailed,
            Self::Denied(_) | Self::Revoked => FailureKind::Denied,
            Self::Relay(_) => FailureKind::Reset,
            Self::NoOriginalDestination
            | Self::Loopback(_)
            | Self::AgentPort(_)
            | Self::NotThePod(_)
            | Self::BadRequest { .. }
            | Self::TargetNotThePod(_)
            | Self::StreamGone(_) => FailureKind::Error,
        }
    }

    fn policy(&self) -> Option<String> {
        match self {
            Self::Denied(reason) => reason.policy().map(ToString::to_string),
            _ => None,
        }
    }

    fn event(&self) -> Option<ProxyEvent> {
        match self {
            Self::NoOriginalDestination => Some(ProxyEvent::NoOriginalDestination),
            Self::AgentPort(_) => Some(ProxyEvent::AgentPortRefused),
            Self::Waypoint { .. } => Some(ProxyEvent::WaypointUnavailable),
            _ => None,
        }
    }
}

impl Error {
    /// Whether this failure of an attempt to reach an endpoint counts for
    /// outlier detection (an L4 gateway error): a connect failure or
    /// timeout, a failed tunnel handshake, a tunnel answered 502/503/504.
    /// A denial (401/403) or a local refusal does not.
    pub fn is_gateway_error(&self) -> bool {
        match self {
            Self::Direct { .. } | Self::ConnectTimeout { .. } => true,
            Self::Tunnel(HboneError::Status { status, .. }) => matches!(
                *status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            Self::Tunnel(HboneError::Connect { .. } | HboneError::Tls { .. }) => true,
            _ => false,
        }
    }
}

impl From<Error> for Outcome {
    fn from(e: Error) -> Self {
        Outcome::failed(e)
    }
}

/// How a relay ended, as telemetry reports it.
impl From<RelayOutcome> for Outcome {
    fn from(end: RelayOutcome) -> Self {
        match end {
            RelayOutcome::Closed => Outcome::Closed,
            RelayOutcome::Reset(e) => Error::Relay(e).into(),
            RelayOutcome::Revoked => Error::Revoked.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ResponseFlags;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn each_error_maps_once_to_the_access_log_flags_and_status() {
        let c = addr("198.18.2.10:8080");
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let cases: Vec<(Error, &str, ResponseFlags, StatusCode)> = vec![
            (
                Error::Tunnel(HboneError::Status {
                    target: c,
                    status: StatusCode::UNAUTHORIZED,
                }),
                "connect_failed",
                ResponseFlags::ConnectFailure,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::App {
                    target: c,
                    source: refused(),
                },
                "connect_failed",
                ResponseFlags::ConnectFailure,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::Denied(DenyReason::NoAllowMatched),
                "denied",
                ResponseFlags::Denied,
                StatusCode::UNAUTHORIZED,
            ),
            (
                Error::Revoked,
                "denied",
                ResponseFlags::Denied,
                StatusCode::UNAUTHORIZED,
            ),
            (
                Error::Relay(io::Error::from(io::ErrorKind::ConnectionReset)),
                "reset",
                ResponseFlags::None,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::AgentPort(addr("198.18.2.10:15006")),
                "error",
                ResponseFlags::None,
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (error, outcome, flags, status) in cases {
            assert_eq!(error.connect_status(), status, "{error}");
            let o = Outcome::failed(error);
            assert_eq!((o.as_str(), o.response_flags()), (outcome, flags), "{o:?}");
        }
    }

    #[test]
    fn connect_failures_timeouts_and_tunnel_503s_feed_outlier_detection_denials_do_not() {
        let c = addr("198.18.2.10:8080");
        let status = |status| Error::Tunnel(HboneError::Status { target: c, status });
        assert!(status(StatusCode::SERVICE_UNAVAILABLE).is_gateway_error());
        assert!(!status(StatusCode::UNAUTHORIZED).is_gateway_error());
        assert!(
            Error::Direct {
                target: c,
                source: io::Error::from(io::ErrorKind::ConnectionRefused),
            }
            .is_gateway_error()
        );
        let timeout = Error::ConnectTimeout {
            target: c,
            timeout: std::time::Duration::from_millis(300),
        };
        assert!(timeout.is_gateway_error());
        assert!(
            timeout.to_string().contains("timed out after 300ms"),
            "{timeout}"
        );
        assert!(!Error::EndpointLoop(c).is_gateway_error());
        assert_eq!(
            Outcome::failed(timeout).as_str(),
            "connect_failed",
            "a timeout is a connect failure"
        );
    }

    #[test]
    fn texts_the_tests_and_operators_read_stay() {
        let o = Outcome::failed(Error::Revoked);
        assert_eq!(o.reason().as_deref(), Some("closed by a policy change"));
        assert_eq!(o.policy(), None);
        let waypoint = Error::Waypoint {
            waypoint: crate::state::WaypointRef {
                namespace: "shop".into(),
                name: "wp".into(),
            },
            reason: WaypointFailure::Resolve(crate::state::WaypointError::NoEndpoint(
                crate::state::WaypointRef {
                    namespace: "shop".into(),
                    name: "wp".into(),
                },
            )),
        };
        assert_eq!(waypoint.event(), Some(ProxyEvent::WaypointUnavailable));
        let o = Outcome::failed(waypoint);
        assert_eq!(o.as_str(), "connect_failed");
        let text = o.reason().unwrap_or_default();
        assert!(
            text.starts_with("waypoint shop/wp unavailable") && text.contains("no ready endpoint"),
            "{text}"
        );
        let own = Error::AgentPort(addr("198.18.2.10:15006")).to_string();
        assert!(
            own.contains("one of the agent's own ports in the pod"),
            "{own}"
        );
        let tunnel = Error::from(HboneError::Status {
            target: addr("198.18.2.10:8080"),
            status: StatusCode::UNAUTHORIZED,
        });
        assert!(tunnel.to_string().contains("HTTP 401"), "{tunnel}");
        assert_eq!(
            Error::AgentPort(addr("198.18.2.10:15006")).event(),
            Some(ProxyEvent::AgentPortRefused)
        );
    }

    #[test]
    fn an_unreachable_tunnel_port_suggests_what_blocks_it() {
        let peer = addr("198.18.2.10:15008");
        let tunnel = |kind: io::ErrorKind| {
            Error::from(HboneError::Connect {
                addr: peer,
                source: io::Error::from(kind),
            })
            .to_string()
        };
        for kind in [io::ErrorKind::ConnectionRefused, io::ErrorKind::TimedOut] {
            let text = tunnel(kind);
            assert!(
                text.contains("is a NetworkPolicy or firewall blocking port 15008?"),
                "{text}"
            );
        }
        // Nothing suggests a filter when the error is local.
        let text = tunnel(io::ErrorKind::PermissionDenied);
        assert!(!text.contains("NetworkPolicy"), "{text}");
    }
}
