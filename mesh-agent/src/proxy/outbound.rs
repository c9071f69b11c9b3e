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

use mesh_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{
    PodContext, RelayResult, Shared, account,
    hbone::{self, HboneError, PoolKey},
    peer, relay, reset,
};
use crate::{
    admin::{Connection, Direction, Outcome, SecurityPolicy, ServiceLabels},
    identity::SpiffeId,
};

/// Accepts captured connections of one pod until cancelled.
pub async fn serve(
    ctx: Arc<PodContext>,
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    super::accept_loop(&ctx, listener, &cancel, "outbound", |client, peer| {
        shared
            .stats
            .outbound_accepted
            .fetch_add(1, Ordering::Relaxed);
        let (ctx, shared) = (ctx.clone(), shared.clone());
        tokio::spawn(async move { handle(ctx, client, peer, shared).await });
    })
    .await;
}

/// Whether the agent must refuse to dial `dst` for this pod: loopback, or the
/// pod's own capture ports (a loop).
fn is_loop(ctx: &PodContext, dst: SocketAddr) -> bool {
    dst.ip().is_loopback()
        || (ctx.ips.contains(&dst.ip().to_canonical())
            && [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT].contains(&dst.port()))
}

async fn handle(
    ctx: Arc<PodContext>,
    client: TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<Shared>,
) {
    let Some(dst) = shared.orig_dst.take(ctx.netns_cookie, peer_addr).await else {
        shared
            .stats
            .no_original_destination
            .fetch_add(1, Ordering::Relaxed);
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %ctx.key, client = %peer_addr, "no original destination for captured connection; resetting it");
        reset(client);
        return;
    };
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if is_loop(&ctx, dst) {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %ctx.key, dst = %dst, "refusing to proxy to a loopback or capture address");
        reset(client);
        return;
    }
    let snapshot = shared.store.current();
    let mesh_peer = snapshot.workload_by_ip(dst.ip()).filter(|w| w.enrolled);
    let peer_id = mesh_peer.map(|w| {
        SpiffeId::new(
            shared.tls.trust_domain().clone(),
            &w.namespace,
            &w.service_account,
        )
    });
    let source_ip = ctx
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .unwrap_or_else(|| ctx.ips.first().copied().unwrap_or(dst.ip()));
    let src = SocketAddr::new(source_ip, client.peer_addr().map_or(0, |a| a.port()));
    let tracker = shared.telemetry.open(Connection {
        direction: Direction::Outbound,
        src: peer(&snapshot, src, Some(&ctx.identity)),
        dst: peer(
            &snapshot,
            dst,
            peer_id.as_ref().and_then(|r| r.as_ref().ok()),
        ),
        dst_service: snapshot
            .service_by_vip(dst.ip())
            .map(ServiceLabels::from_service),
        security_policy: if mesh_peer.is_some() {
            SecurityPolicy::MutualTls
        } else {
            SecurityPolicy::None
        },
    });
    let result = match peer_id {
        Some(Ok(peer_id)) => tunnel(&ctx, client, dst, src, peer_id, &shared).await,
        Some(Err(e)) => {
            reset(client);
            Err(format!("the destination has no valid identity: {e}"))
        }
        None => passthrough(&ctx, client, dst, &shared).await,
    };
    match result {
        Ok(r) => {
            let outcome = account(&shared.stats, &r);
            tracker.close(r.sent, r.received, outcome);
        }
        Err(e) => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracker.close(0, 0, Outcome::ConnectFailed(e));
        }
    }
}

/// Plaintext to a destination outside the mesh.
async fn passthrough(
    ctx: &PodContext,
    client: TcpStream,
    dst: SocketAddr,
    _shared: &Shared,
) -> Result<RelayResult, String> {
    match ctx.connect(dst).await {
        Ok(upstream) => Ok(relay(client, upstream, &CancellationToken::new()).await),
        Err(e) => {
            reset(client);
            Err(e.to_string())
        }
    }
}

/// Through an HBONE tunnel to a mesh workload, under the pod's identity.
async fn tunnel(
    ctx: &Arc<PodContext>,
    client: TcpStream,
    dst: SocketAddr,
    src: SocketAddr,
    peer_id: SpiffeId,
    shared: &Arc<Shared>,
) -> Result<RelayResult, String> {
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
    let opened =
        shared
            .pool
            .send(&key, request, connect)
            .await
            .and_then(|(response, send, guard)| {
                if response.status() == http::StatusCode::OK {
                    Ok((response, send, guard))
                } else {
                    Err(HboneError::Status {
                        target: dst,
                        status: response.status(),
                    })
                }
            });
    match opened {
        Ok((response, send, _guard)) => Ok(hbone::relay_h2(
            client,
            send,
            response.into_body(),
            &CancellationToken::new(),
        )
        .await),
        Err(e) => {
            reset(client);
            Err(e.to_string())
        }
    }
}
