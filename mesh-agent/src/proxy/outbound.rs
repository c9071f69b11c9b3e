//! The outbound listener: connections the pod's apps made, captured by
//! `cgroup/connect4/6`. The original destination comes from the kernel's
//! table. A destination that is a mesh workload is reached through an HBONE
//! tunnel under the pod's identity; any other destination is dialled
//! directly (passthrough). Either way the agent's sockets are created inside
//! the pod's netns, so traffic leaves from the pod's own address.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use mesh_common::INBOUND_HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{
    Error, PodContext, Shared,
    hbone::{self, HboneError, PoolKey},
    peer, relay, reset,
};
use crate::{
    identity::SpiffeId,
    telemetry::{Connection, Direction, ProxyEvent, SecurityPolicy, ServiceLabels},
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
            // From accept on, the agent dying resets the app (see copy::relay).
            super::copy::abort_on_close(&client);
            let task = handle(ctx.clone(), client, peer, shared.clone());
            shared.spawn_tracked(async move {
                let _permit = permit;
                task.await
            });
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

async fn handle(
    ctx: Arc<PodContext>,
    client: TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<Shared>,
) {
    let Some(dst) = shared.orig_dst.take(ctx.netns_cookie, peer_addr).await else {
        shared.telemetry.refused(&Error::NoOriginalDestination);
        tracing::warn!(pod = %ctx.key, client = %peer_addr, "no original destination for captured connection; resetting it");
        reset(client);
        return;
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
        return;
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
    // A service VIP is load-balanced over its ready endpoints, starting at a
    // rotating offset; an endpoint that refuses is skipped for the next one.
    let targets = match service {
        Some(svc) => {
            let mut targets = svc.targets(dst.port());
            // Endpoints of the family the client dialled, when there are any.
            if targets.iter().any(|t| t.is_ipv4() == dst.is_ipv4()) {
                targets.retain(|t| t.is_ipv4() == dst.is_ipv4());
            }
            if !targets.is_empty() {
                let start = shared.next_endpoint.fetch_add(1, Ordering::Relaxed) % targets.len();
                targets.rotate_left(start);
            }
            targets
        }
        None => vec![dst],
    };
    let dst_service = service.map(ServiceLabels::from_service);
    let mut last_error = Error::NoEndpoint(dst);
    let mut last_attempt: Option<Attempt> = None;
    let mut client = Some(client);
    for target in targets {
        let Some(stream) = client.take() else { break };
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
        let opened = match &peer_id {
            // The pod's certificate first: issued on first use, from the
            // cache otherwise; none (issuer down, never issued) fails closed.
            Some(id) => match shared.tls.manager().fetch(&ctx.identity).await {
                Ok(_) => open_tunnel(&ctx, target, src, id.clone(), &shared)
                    .await
                    .map(Upstream::Tunnel)
                    .map_err(Error::Tunnel),
                Err(e) => Err(Error::NoCertificate(e)),
            },
            None => ctx
                .connect(target)
                .await
                .map(Upstream::Direct)
                .map_err(|source| Error::Direct { target, source }),
        };
        let upstream = match opened {
            Ok(u) => u,
            Err(e) => {
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
                continue;
            }
        };
        let tracker = shared.telemetry.open(Connection {
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
        let never = CancellationToken::new();
        let result = match upstream {
            Upstream::Direct(tcp) => relay(stream, tcp, &never).await,
            Upstream::Tunnel((response, send, _guard)) => {
                hbone::relay_h2(stream, send, response.into_body(), &never).await
            }
        };
        tracker.close(result.sent, result.received, result.outcome.into());
        return;
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
    let tracker = shared.telemetry.open(Connection {
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
    tracker.close(0, 0, last_error.into());
    if let Some(stream) = client {
        reset(stream);
    }
}

/// Where a captured connection goes once connected.
enum Upstream {
    /// A plain TCP connection (destination outside the mesh).
    Direct(TcpStream),
    /// An HBONE stream (and the pool slot it holds).
    Tunnel(
        (
            http::Response<h2::RecvStream>,
            h2::SendStream<bytes::Bytes>,
            hbone::StreamGuard,
        ),
    ),
}

/// Opens an HBONE stream to `dst` under the pod's identity, requiring `peer_id`.
async fn open_tunnel(
    ctx: &Arc<PodContext>,
    dst: SocketAddr,
    src: SocketAddr,
    peer_id: SpiffeId,
    shared: &Arc<Shared>,
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
        address: SocketAddr::new(dst.ip(), INBOUND_HBONE_PORT),
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
            let config = shared
                .tls
                .client_config(&key.source, vec![key.destination.clone()]);
            let tls = TlsConnector::from(config)
                .connect(crate::identity::server_name(key.address.ip()), tcp)
                .await
                .map_err(|e| HboneError::Tls {
                    addr: key.address,
                    reason: crate::identity::describe_tls_error(&e),
                })?;
            hbone::client_handshake(Box::new(tls), key.address).await
        }
    };
    let (response, send, guard) = shared.pool.send(&key, request, connect).await?;
    if response.status() != http::StatusCode::OK {
        return Err(HboneError::Status {
            target: dst,
            status: response.status(),
        });
    }
    Ok((response, send, guard))
}
