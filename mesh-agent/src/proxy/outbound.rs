//! The outbound listener: connections the pod's apps made, captured by
//! `cgroup/connect4/6`. The original destination comes from the kernel's
//! table. A destination that is a mesh workload is reached through an HBONE
//! tunnel under the pod's identity; any other destination is dialled
//! directly (passthrough). Either way the agent's sockets are created inside
//! the pod's netns, so traffic leaves from the pod's own address.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use mesh_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{
    PodContext, Shared, account,
    hbone::{self, HboneError, PoolKey},
    relay, reset,
};
use crate::{identity::SpiffeId, state::Workload};

/// Accepts captured connections of one pod until cancelled.
pub async fn serve(
    ctx: Arc<PodContext>,
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(pod = %ctx.key, error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        shared
            .stats
            .outbound_accepted
            .fetch_add(1, Ordering::Relaxed);
        let (ctx, shared) = (ctx.clone(), shared.clone());
        tokio::spawn(async move { handle(ctx, client, peer, shared).await });
    }
}

/// Whether the agent must refuse to dial `dst` for this pod: loopback, or the
/// pod's own capture ports (a loop).
fn is_loop(ctx: &PodContext, dst: SocketAddr) -> bool {
    dst.ip().is_loopback()
        || (ctx.ips.contains(&dst.ip().to_canonical())
            && [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT].contains(&dst.port()))
}

async fn handle(ctx: Arc<PodContext>, client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let start = Instant::now();
    let Some(dst) = shared.orig_dst.take(ctx.netns_cookie, peer).await else {
        shared
            .stats
            .no_original_destination
            .fetch_add(1, Ordering::Relaxed);
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %ctx.key, client = %peer, "no original destination for captured connection; resetting it");
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
    let mesh_peer = snapshot
        .workload_by_ip(dst.ip())
        .filter(|w| w.enrolled)
        .cloned();
    match mesh_peer {
        Some(peer_workload) => tunnel(ctx, client, dst, &peer_workload, shared, start).await,
        None => passthrough(ctx, client, dst, shared, start).await,
    }
}

/// Plaintext to a destination outside the mesh.
async fn passthrough(
    ctx: Arc<PodContext>,
    client: TcpStream,
    dst: SocketAddr,
    shared: Arc<Shared>,
    start: Instant,
) {
    let upstream = match ctx.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                direction = "outbound",
                src_workload = %ctx.key,
                dst = %dst,
                security = "none",
                error = %e,
                duration_ms = start.elapsed().as_millis() as u64,
                "connection failed"
            );
            reset(client);
            return;
        }
    };
    let src = upstream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let result = relay(client, upstream, &CancellationToken::new()).await;
    let outcome = account(&shared.stats, &result);
    tracing::info!(
        direction = "outbound",
        src_workload = %ctx.key,
        src = %src,
        dst = %dst,
        security = "none",
        bytes_sent = result.sent,
        bytes_received = result.received,
        duration_ms = start.elapsed().as_millis() as u64,
        outcome,
        "connection closed"
    );
}

/// Through an HBONE tunnel to a mesh workload, under the pod's identity.
async fn tunnel(
    ctx: Arc<PodContext>,
    client: TcpStream,
    dst: SocketAddr,
    peer: &Workload,
    shared: Arc<Shared>,
    start: Instant,
) {
    let peer_id = match SpiffeId::new(
        shared.tls.trust_domain().clone(),
        &peer.namespace,
        &peer.service_account,
    ) {
        Ok(id) => id,
        Err(e) => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pod = %ctx.key, dst = %dst, error = %e, "destination has no valid identity; resetting");
            reset(client);
            return;
        }
    };
    let source_ip = ctx
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .unwrap_or_else(|| ctx.ips.first().copied().unwrap_or(dst.ip()));
    let key = PoolKey {
        source: ctx.identity.clone(),
        destination: peer_id.clone(),
        address: SocketAddr::new(dst.ip(), INBOUND_HBONE_PORT),
        source_ip,
    };
    let client_addr = SocketAddr::new(source_ip, client.peer_addr().map_or(0, |a| a.port()));
    let request = hbone::connect_request(
        dst,
        client_addr,
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
    let (response, send, _guard) = match opened {
        Ok(o) => o,
        Err(e) => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                direction = "outbound",
                src_workload = %ctx.key,
                src_identity = %ctx.identity,
                dst = %dst,
                dst_identity = %peer_id,
                security = "mutual_tls",
                error = %e,
                duration_ms = start.elapsed().as_millis() as u64,
                "connection failed"
            );
            reset(client);
            return;
        }
    };
    let result = hbone::relay_h2(
        client,
        send,
        response.into_body(),
        &CancellationToken::new(),
    )
    .await;
    let outcome = account(&shared.stats, &result);
    tracing::info!(
        direction = "outbound",
        src_workload = %ctx.key,
        src_identity = %ctx.identity,
        src = %client_addr,
        dst = %dst,
        dst_workload = %peer.key(),
        dst_identity = %peer_id,
        security = "mutual_tls",
        bytes_sent = result.sent,
        bytes_received = result.received,
        duration_ms = start.elapsed().as_millis() as u64,
        outcome,
        "connection closed"
    );
}
