//! The outbound listener: connections the pod's apps made, captured by
//! `cgroup/connect4/6`. The original destination comes from the kernel's
//! table. A destination that is a mesh workload is reached through an HBONE
//! tunnel under the pod's identity; any other destination is dialled
//! directly (passthrough). Either way the agent's sockets are created inside
//! the pod's netns, so traffic leaves from the pod's own address.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use mesh_common::INBOUND_HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    Error, PodContext, Shared,
    copy::{self, RelayOutcome, RelayResult},
    hbone::{self, HboneError, PoolKey},
    peer, relay, reset, same_node,
};
use crate::{
    identity::SpiffeId,
    routing::{Ejection, Lb, PickError, Request, RouteError, Routed},
    telemetry::{Connection, Direction, ProxyEvent, RouteEvent, SecurityPolicy, ServiceLabels},
};

/// Accepts captured connections of one pod until cancelled.
pub async fn serve(
    ctx: Arc<PodContext>,
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let limits = shared.limits.clone();
    super::accept_loop(
        &ctx,
        listener,
        &cancel,
        "outbound",
        &limits,
        |client, peer, permit| {
            shared.telemetry.count(ProxyEvent::OutboundAccepted);
            // From accept on, the agent dying resets the app (see
            // copy::relay): `client` inherited zero linger from the listener.
            let task = handle(ctx.clone(), client, peer, shared.clone());
            shared.spawn_tracked(task, permit);
        },
    )
    .await;
}

/// Whether the agent must refuse to dial `dst` for this pod: loopback or
/// unspecified (the pod itself), or one of the agent's own listeners in the
/// pod (a loop).
fn is_loop(ctx: &PodContext, dst: SocketAddr) -> bool {
    let ip = dst.ip().to_canonical();
    ip.is_loopback() || ip.is_unspecified() || ctx.is_agent_listener(dst)
}

/// The last endpoint tried for a captured connection, for the telemetry
/// of a connection that nothing took.
struct Attempt {
    /// The source address the upstream connection used (pod IP, client port).
    src: SocketAddr,
    /// The endpoint.
    target: SocketAddr,
    /// Whether it was an mTLS (HBONE) attempt.
    mutual_tls: bool,
    /// The identity the endpoint had to prove, if known.
    peer_id: Option<SpiffeId>,
}

/// One captured connection, from accept to close: [`open`] finds and opens
/// its upstream, then [`Opened::relay`] relays until both sides are done.
pub(super) async fn handle(
    ctx: Arc<PodContext>,
    client: TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<Shared>,
) {
    // (A connection through a waypoint relays inside `open`, boxed.)
    let open = Box::pin(open(ctx, client, peer_addr, &shared));
    super::open_then_relay(open, Opened::relay).await;
}

/// A captured connection with its upstream open: what its relay needs and
/// nothing of the routing and attempts that found it.
struct Opened {
    /// The app's connection.
    client: TcpStream,
    upstream: Upstream,
    /// The client's first bytes, if a tunnel attempt read them.
    early: hbone::EarlyData,
    tracker: crate::telemetry::ConnectionTracker,
    /// The balancer's pick (the endpoint's and destination's connection
    /// counts), held for the connection's life: a routing change never
    /// cuts it.
    pick: Option<crate::routing::Pick>,
    /// Whether a plain relay splices bulk transfers (`--relay-splice`).
    splice: copy::Splice,
}

impl Opened {
    /// Relays until both sides are done, then reports the connection.
    /// Not an `async fn`, which would move `self` into a local beside the
    /// argument it keeps: the block uses `self`'s fields in place. It uses
    /// every field whole (an async block captures only the fields it uses,
    /// and drops the rest when it is made): the upstream's guards live
    /// until the relay ends.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep `self` twice in the task"
    )]
    fn relay(self) -> impl std::future::Future<Output = ()> {
        async move {
            let never = CancellationToken::new();
            let (sent, received, outcome) = match self.upstream {
                Upstream::Direct(tcp) => {
                    let r = relay_plain(self.client, tcp, self.early, &never, self.splice).await;
                    r.splicing.count(&self.tracker);
                    (r.sent, r.received, r.outcome.into())
                }
                Upstream::Tunnel((response, send, _guard)) => {
                    let r = hbone::relay_h2(
                        self.client,
                        send,
                        response.into_body(),
                        &never,
                        self.early,
                    )
                    .await;
                    (r.sent, r.received, r.outcome.into())
                }
                Upstream::Local(delivered) => {
                    // A policy change that denies it cuts it, as at a tunnel's end.
                    let r = relay_plain(
                        self.client,
                        delivered.app.stream,
                        self.early,
                        &delivered.tracked.cancel,
                        self.splice,
                    )
                    .await;
                    r.splicing.count(&self.tracker);
                    let outcome: crate::telemetry::Outcome = r.outcome.into();
                    let same_node::Delivered {
                        tracked, inbound, ..
                    } = *delivered;
                    drop(tracked);
                    inbound.close(r.sent, r.received, outcome.clone());
                    (r.sent, r.received, outcome)
                }
            };
            // Released before the close is counted: whoever sees the close sees the count drop.
            drop(self.pick);
            self.tracker.close(sent, received, outcome);
        }
    }
}

/// Finds and opens the upstream of a captured connection (routing, the
/// attempts over endpoints, the tunnel or same-node delivery); `None` when
/// it was refused or nothing took it, reported and reset here.
async fn open(
    ctx: Arc<PodContext>,
    client: TcpStream,
    peer_addr: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<Opened> {
    let Some(dst) = shared.orig_dst.take(ctx.netns_cookie, peer_addr).await else {
        shared.telemetry.refused(&Error::NoOriginalDestination);
        tracing::warn!(pod = %ctx.key, client = %peer_addr, "no original destination for captured connection; resetting it");
        reset(client);
        return None;
    };
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if is_loop(&ctx, dst) {
        let refused = if ctx.is_agent_listener(dst) {
            Error::AgentPort(dst)
        } else {
            Error::Loopback(dst)
        };
        shared.telemetry.refused(&refused);
        tracing::warn!(pod = %ctx.key, dst = %dst, reason = %refused, "refusing to proxy to a loopback or capture address");
        reset(client);
        return None;
    }
    // The client's port: the source port of every upstream attempt's report.
    let client_port = peer_addr.port();
    let source_for = |target: SocketAddr| {
        let ip = ctx
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == target.is_ipv4())
            .unwrap_or_else(|| ctx.ips.first().copied().unwrap_or(target.ip()));
        SocketAddr::new(ip, client_port)
    };
    let snapshot = shared.store.current();
    let service = snapshot.service_by_vip(dst.ip());
    // A service with a waypoint: the waypoint routes it (issue 12), not us.
    if let Some(svc) = service
        && let Some(w) = snapshot.waypoint_for(svc, &ctx.key)
    {
        let w = w.reference.clone();
        let labels = Some(ServiceLabels::from_service(svc));
        // Boxed, here and below: a connection task is as large as its
        // largest state, and the relay's is what idle connections keep.
        Box::pin(via_waypoint(
            &ctx,
            client,
            dst,
            &snapshot,
            labels,
            &w,
            shared,
            &source_for,
        ))
        .await;
        return None;
    }
    // A pod's own address, when the pod's waypoint takes workload traffic.
    if service.is_none()
        && let Some(pod) = snapshot.workload_by_ip(dst.ip())
        && let Some(w) = snapshot.pod_waypoint_for(pod, &ctx.key)
    {
        let w = w.reference.clone();
        Box::pin(via_waypoint(
            &ctx,
            client,
            dst,
            &snapshot,
            None,
            &w,
            shared,
            &source_for,
        ))
        .await;
        return None;
    }
    let dst_service = service.map(ServiceLabels::from_service);
    // A service VIP:port goes through its route (match, weighted
    // destination, subset, endpoint pick); any other address (a pod IP, a
    // destination outside the mesh) is dialled as it is.
    let plan = plan(&ctx, &snapshot, shared, dst, source_for(dst).ip());
    let (route, dest) = match &plan {
        Plan::Routed(r) | Plan::Passthrough(r) => (r.route.clone(), Some(r.dest.clone())),
        Plan::Failed(e) => (e.route().cloned(), None),
        Plan::Direct => (None, None),
    };
    let label_route = |tracker: &mut crate::telemetry::ConnectionTracker| {
        if let Some(d) = &dest {
            tracker.set_route(route.as_deref(), &d.destination, d.subset.as_deref());
        } else if let Some(r) = &route {
            tracker.set_route(Some(r), &dst.to_string(), None);
        }
    };
    let mut last_error = Error::NoEndpoint(dst);
    let mut last_attempt: Option<Attempt> = None;
    let mut client = Some(client);
    let mut tried: Vec<SocketAddr> = Vec::new();
    // The client's first bytes, once read for a tunnel attempt: every later
    // attempt and the relay get them first. Whether to read them is decided
    // once per connection, so bytes read by one attempt go on every later one.
    let mut early = hbone::EarlyData::default();
    let early_data = shared.tunnel_early_data.load(Ordering::Relaxed);
    while tried.len() < MAX_ATTEMPTS {
        let Some(stream) = client.take() else { break };
        let (target, pick) = match &plan {
            Plan::Direct | Plan::Passthrough(_) if tried.is_empty() => (dst, None),
            Plan::Direct | Plan::Passthrough(_) => {
                client = Some(stream);
                break;
            }
            Plan::Failed(e) => {
                last_error = Error::Route(e.clone());
                client = Some(stream);
                break;
            }
            Plan::Routed(r) => {
                match shared.balancer.pick(
                    &r.dest,
                    source_for(dst).ip(),
                    dst,
                    Instant::now(),
                    &tried,
                ) {
                    Ok(p) => (p.endpoint, Some(p)),
                    Err(e) => {
                        if let PickError::Overflow { .. } = e {
                            shared.telemetry.route_event(RouteEvent::Overflow {
                                route: r.route.as_deref(),
                                destination: &r.dest.destination,
                                subset: r.dest.subset.as_deref(),
                            });
                        }
                        // After failed attempts, the last attempt's error says more
                        // than "no endpoint left".
                        if tried.is_empty() || !matches!(e, PickError::NoEndpoint(_)) {
                            last_error = Error::Pick(e);
                        }
                        client = Some(stream);
                        break;
                    }
                }
            }
        };
        tried.push(target);
        if is_loop(&ctx, target) {
            if ctx.is_agent_listener(target) {
                shared.telemetry.count(ProxyEvent::AgentPortRefused);
            }
            last_error = Error::EndpointLoop(target);
            client = Some(stream);
            continue;
        }
        let src = source_for(target);
        let mesh_peer = snapshot.workload_by_ip(target.ip()).filter(|w| w.enrolled);
        let peer_id = match mesh_peer
            .map(|w| w.identity(shared.tls.trust_domain()))
            .transpose()
        {
            Ok(id) => id,
            Err(source) => {
                last_attempt = Some(Attempt {
                    src,
                    target,
                    mutual_tls: true,
                    peer_id: None,
                });
                last_error = Error::NoIdentity { target, source };
                client = Some(stream);
                continue;
            }
        };
        // Both pods are this agent's: no tunnel to itself (same_node.rs).
        let local = match &peer_id {
            Some(id) if shared.same_node_fast_path.load(Ordering::Relaxed) => shared
                .local
                .get(target.ip())
                .filter(|d| d.identity == *id && !d.is_agent_listener(target)),
            _ => None,
        };
        // The pod's certificate first: issued on first use, from the cache
        // otherwise; none (issuer down, never issued) fails closed. Not part
        // of the endpoint's connectTimeout, nor an error of the endpoint.
        let certificate = match &peer_id {
            Some(_) => shared
                .tls
                .manager()
                .fetch(&ctx.identity)
                .await
                .map(|_| ())
                .map_err(Error::NoCertificate),
            None => Ok(()),
        };
        // Boxed: the connect phase's state (TLS and HTTP/2 handshakes) is
        // larger than the relay's, which the task keeps for its whole life.
        let open = Box::pin(async {
            match (&peer_id, &local) {
                (Some(_), Some(dst_ctx)) => same_node::deliver(&ctx, dst_ctx, src, target, shared)
                    .await
                    .map(|d| Upstream::Local(Box::new(d))),
                (Some(id), None) => open_tunnel(
                    &ctx,
                    target,
                    SocketAddr::new(target.ip(), INBOUND_HBONE_PORT),
                    src,
                    id.clone(),
                    shared,
                    early_data.then_some((&stream, &mut early)),
                )
                .await
                .map(Upstream::Tunnel)
                .map_err(Error::Tunnel),
                (None, _) => ctx
                    .connect(target)
                    .await
                    .map(Upstream::Direct)
                    .map_err(|source| Error::Direct { target, source }),
            }
        });
        // A routed destination's connectTimeout bounds the whole attempt
        // (TCP, and for a mesh peer the tunnel's handshake and CONNECT).
        let opened = match (certificate, &plan, &dest) {
            (Err(e), _, _) => {
                drop(open);
                Err(e)
            }
            (Ok(()), Plan::Routed(_), Some(d)) => {
                let timeout = d.policy.connect_timeout();
                tokio::time::timeout(timeout, open)
                    .await
                    .unwrap_or(Err(Error::ConnectTimeout { target, timeout }))
            }
            (Ok(()), _, _) => open.await,
        };
        let upstream = match opened {
            Ok(u) => u,
            Err(e) => {
                if let (Some(d), Some(_)) = (&dest, &pick)
                    && e.is_gateway_error()
                    && shared.balancer.failure(d, target, Instant::now()) == Ejection::Ejected
                {
                    tracing::warn!(pod = %ctx.key, endpoint = %target, destination = %d.key, reason = %e, "endpoint ejected by outlier detection");
                    shared.telemetry.route_event(RouteEvent::Ejection {
                        route: route.as_deref(),
                        destination: &d.destination,
                        subset: d.subset.as_deref(),
                    });
                }
                if service.is_some() {
                    tracing::debug!(pod = %ctx.key, endpoint = %target, error = %e, "endpoint refused; trying the next one");
                }
                last_attempt = Some(Attempt {
                    src,
                    target,
                    mutual_tls: peer_id.is_some(),
                    peer_id,
                });
                last_error = e;
                client = Some(stream);
                // The client's first bytes may have reached this endpoint's
                // app: another endpoint must not get them too.
                if early.in_doubt() {
                    break;
                }
                continue;
            }
        };
        if let (Some(d), Some(_)) = (&dest, &pick) {
            shared.balancer.success(d, target, Instant::now());
        }
        let mut tracker = shared.telemetry.open(Connection {
            direction: Direction::Outbound,
            src: peer(&snapshot, src, Some(&ctx.identity)),
            dst: peer(&snapshot, target, peer_id.as_ref()),
            dst_service: dst_service.clone(),
            security_policy: if peer_id.is_some() {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::None
            },
        });
        label_route(&mut tracker);
        return Some(Opened {
            client: stream,
            upstream,
            early,
            tracker,
            pick,
            splice: copy::Splice::from_setting(shared),
        });
    }
    // Nothing took the connection: report it as what was tried (an mTLS
    // attempt to the identity the endpoint had to prove, from the client's
    // real source address) and why it failed.
    let attempt = last_attempt.unwrap_or(Attempt {
        src: source_for(dst),
        target: dst,
        mutual_tls: false,
        peer_id: None,
    });
    let mut tracker = shared.telemetry.open(Connection {
        direction: Direction::Outbound,
        src: peer(&snapshot, attempt.src, Some(&ctx.identity)),
        dst: peer(&snapshot, attempt.target, attempt.peer_id.as_ref()),
        dst_service,
        security_policy: if attempt.mutual_tls {
            SecurityPolicy::MutualTls
        } else {
            SecurityPolicy::None
        },
    });
    label_route(&mut tracker);
    tracker.close(0, 0, last_error.into());
    if let Some(stream) = client {
        reset(stream);
    }
    None
}

/// Carries a connection dialled at `dst` (a service's VIP:port, whose
/// labels are `dst_service`, or a pod's own address:port) through its
/// `waypoint`, as ztunnel does: an HBONE tunnel to one of the waypoint's
/// pods (its address, port 15008, proving the pod's identity) with a
/// `CONNECT` to `dst` itself. The service's routing (DestinationRule,
/// VirtualService) is the waypoint's job, not the node's.
/// Fails closed: a waypoint that does not resolve or whose pods all fail
/// resets the client (counted `waypoint_unavailable`, access-logged with
/// the reason and the `waypoint`); the service's endpoints are never
/// dialled instead.
#[allow(clippy::too_many_arguments)] // the connection's context
async fn via_waypoint(
    ctx: &Arc<PodContext>,
    client: TcpStream,
    dst: SocketAddr,
    snapshot: &crate::state::Snapshot,
    dst_service: Option<ServiceLabels>,
    waypoint: &crate::state::WaypointRef,
    shared: &Arc<Shared>,
    source_for: &(dyn Fn(SocketAddr) -> SocketAddr + Sync),
) {
    let refuse = |attempt: Attempt, error: Error, client: TcpStream| {
        tracing::warn!(pod = %ctx.key, dst = %dst, waypoint = %waypoint, reason = %error, "waypoint unavailable; connection refused");
        let mut tracker = shared.telemetry.open(Connection {
            direction: Direction::Outbound,
            src: peer(snapshot, attempt.src, Some(&ctx.identity)),
            dst: peer(snapshot, attempt.target, attempt.peer_id.as_ref()),
            dst_service: dst_service.clone(),
            security_policy: SecurityPolicy::MutualTls,
        });
        tracker.set_waypoint(waypoint);
        tracker.close(0, 0, error.into());
        reset(client);
    };
    let unavailable = |reason| Error::Waypoint {
        waypoint: waypoint.clone(),
        reason,
    };
    let endpoints = match snapshot.waypoint_endpoints(waypoint, shared.tls.trust_domain()) {
        Ok(e) => e,
        Err(e) => {
            let attempt = Attempt {
                src: source_for(dst),
                target: dst,
                mutual_tls: true,
                peer_id: None,
            };
            refuse(attempt, unavailable(e.into()), client);
            return;
        }
    };
    // The pod's certificate: none fails closed (not the waypoint's fault).
    if let Err(e) = shared.tls.manager().fetch(&ctx.identity).await {
        let attempt = Attempt {
            src: source_for(dst),
            target: dst,
            mutual_tls: true,
            peer_id: None,
        };
        refuse(attempt, Error::NoCertificate(e), client);
        return;
    }
    // Start at a pod chosen by the client's port (connections spread over
    // the waypoint's pods), then try the others in order.
    let start = usize::from(source_for(dst).port()) % endpoints.len();
    let mut last: Option<(Attempt, Error)> = None;
    for ep in endpoints
        .iter()
        .cycle()
        .skip(start)
        .take(endpoints.len().min(MAX_ATTEMPTS))
    {
        let src = source_for(ep.addr);
        // No early data: a waypoint may be Envoy (Istio's), whose handling
        // of data before its CONNECT answer is not ours to rely on.
        match open_tunnel(ctx, dst, ep.addr, src, ep.identity.clone(), shared, None).await {
            Ok((response, send, _guard)) => {
                let mut tracker = shared.telemetry.open(Connection {
                    direction: Direction::Outbound,
                    src: peer(snapshot, src, Some(&ctx.identity)),
                    dst: peer(snapshot, ep.addr, Some(&ep.identity)),
                    dst_service,
                    security_policy: SecurityPolicy::MutualTls,
                });
                tracker.set_waypoint(waypoint);
                let never = CancellationToken::new();
                let result = hbone::relay_h2(
                    client,
                    send,
                    response.into_body(),
                    &never,
                    hbone::EarlyData::default(),
                )
                .await;
                tracker.close(result.sent, result.received, result.outcome.into());
                return;
            }
            Err(e) => {
                tracing::debug!(pod = %ctx.key, waypoint = %waypoint, endpoint = %ep.addr, error = %e, "waypoint pod refused; trying the next one");
                let attempt = Attempt {
                    src,
                    target: ep.addr,
                    mutual_tls: true,
                    peer_id: Some(ep.identity.clone()),
                };
                last = Some((attempt, Error::Tunnel(e)));
            }
        }
    }
    let (attempt, error) = last.unwrap_or_else(|| {
        // Unreachable: `endpoints` is never empty.
        let attempt = Attempt {
            src: source_for(dst),
            target: dst,
            mutual_tls: true,
            peer_id: None,
        };
        (attempt, Error::NoEndpoint(dst))
    });
    refuse(
        attempt,
        unavailable(super::error::WaypointFailure::Unreachable(Box::new(error))),
        client,
    );
}

/// Most endpoints one captured connection tries (each failure moves on to
/// another endpoint of the same destination).
const MAX_ATTEMPTS: usize = 8;

/// How a captured connection is to be carried.
enum Plan {
    /// Not a service VIP: dialled as addressed.
    Direct,
    /// A service connection: endpoints picked from the routed destination.
    Routed(Routed),
    /// A routed destination whose load balancing is PASSTHROUGH: dialled as
    /// addressed (the route is still reported).
    Passthrough(Routed),
    /// The route leads nowhere: fail at once with the reason.
    Failed(RouteError),
}

/// Routes a connection to `dst` from this pod (at `source`): the one place
/// the proxy asks the route table (see `mesh-routing`).
fn plan(
    ctx: &PodContext,
    snapshot: &crate::state::Snapshot,
    shared: &Shared,
    dst: SocketAddr,
    source: std::net::IpAddr,
) -> Plan {
    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    let table = &snapshot.routes;
    if !table.is_service(dst.ip()) {
        return Plan::Direct;
    }
    shared.balancer.prune(table);
    let labels = snapshot
        .workloads
        .get(&ctx.key)
        .map_or(&NO_LABELS, |w| &w.labels);
    let req = Request {
        destination: dst,
        source,
        source_namespace: &ctx.key.namespace,
        source_labels: labels,
    };
    match table.route(&req, shared.balancer.random()) {
        None => Plan::Direct,
        Some(Ok(r)) if r.dest.policy.lb == Lb::Passthrough => Plan::Passthrough(r),
        Some(Ok(r)) => Plan::Routed(r),
        Some(Err(e)) => {
            tracing::debug!(pod = %ctx.key, dst = %dst, reason = %e, "route leads nowhere");
            Plan::Failed(e)
        }
    }
}

/// Where a captured connection goes once connected.
enum Upstream {
    /// A plain TCP connection (destination outside the mesh).
    Direct(TcpStream),
    /// The app's socket in another pod of this node (the same-node fast path).
    Local(Box<same_node::Delivered>),
    /// An HBONE stream (and the pool slot it holds).
    Tunnel(
        (
            http::Response<h2::RecvStream>,
            h2::SendStream<bytes::Bytes>,
            hbone::StreamGuard,
        ),
    ),
}

/// Relays `client` to a plain upstream (`server`: an endpoint outside the
/// mesh, or an app on this node), writing first what a failed tunnel
/// attempt read from the client (`early`), so no byte is lost.
async fn relay_plain(
    client: TcpStream,
    mut server: TcpStream,
    early: hbone::EarlyData,
    cancel: &CancellationToken,
    splice: copy::Splice,
) -> RelayResult {
    // From here an agent death resets the app (see `copy::relay`).
    copy::abort_on_close(&server);
    let replayed = if early.is_empty() {
        Ok(0)
    } else {
        // The replay is the relay's start: a revocation stops it.
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(RelayOutcome::Revoked),
            r = early.replay(&mut server) => r.map_err(RelayOutcome::Reset),
        }
    };
    match replayed {
        Ok(replayed) => {
            let mut r = relay(client, server, cancel, splice).await;
            r.sent += replayed;
            r
        }
        Err(outcome) => {
            reset(client);
            reset(server);
            RelayResult {
                sent: 0,
                received: 0,
                outcome,
                splicing: copy::Splicing::default(),
            }
        }
    }
}

/// Opens an HBONE stream to `dst` (the `CONNECT` target) under the pod's
/// identity, through a tunnel to `dial` (the peer's HBONE address: the
/// destination pod's, or a waypoint's) that must prove `peer_id`; with
/// `early` (a destination pod's node proxy only), the client's first bytes
/// go before the answer ([`hbone::EarlyData`]).
#[allow(clippy::too_many_arguments)] // the connection's context
async fn open_tunnel(
    ctx: &Arc<PodContext>,
    dst: SocketAddr,
    dial: SocketAddr,
    src: SocketAddr,
    peer_id: SpiffeId,
    shared: &Arc<Shared>,
    early: Option<(&TcpStream, &mut hbone::EarlyData)>,
) -> Result<
    (
        http::Response<h2::RecvStream>,
        h2::SendStream<bytes::Bytes>,
        hbone::StreamGuard,
    ),
    HboneError,
> {
    let key = PoolKey {
        source: ctx.identity.clone(),
        destination: peer_id,
        address: dial,
        source_ip: src.ip(),
    };
    let request = hbone::connect_request(
        dst,
        src,
        &hbone::baggage(&ctx.key.namespace, &ctx.key.name, &ctx.service_account),
    );
    let connect = || {
        let (ctx, shared, key) = (ctx.clone(), shared.clone(), key.clone());
        async move {
            let tcp = ctx
                .connect(key.address)
                .await
                .map_err(|source| HboneError::Connect {
                    addr: key.address,
                    source,
                })?;
            // The share is the local client's: its app opens these tunnels
            // and decides whether their data is read, so one tenant cannot
            // take the whole budget (inbound tunnels lease from it too).
            let window = shared.pools.current().window_for(&key);
            hbone::dial_tunnel(tcp, &shared.tls, &key, &shared.limits, &key.source, window).await
        }
    };
    let (response, send, guard) = shared
        .pools
        .current()
        .send_early(&key, request, early, connect)
        .await?;
    if response.status() != http::StatusCode::OK {
        return Err(HboneError::Status {
            target: dst,
            status: response.status(),
        });
    }
    Ok((response, send, guard))
}
