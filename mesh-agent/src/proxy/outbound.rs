//! The outbound listener: connections the pod's apps made, captured by
//! `cgroup/connect4/6`. The original destination comes from the kernel's
//! table; the agent dials it from inside the pod's netns and relays.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use mesh_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{PodContext, ProxyStats, account, relay, reset};
use crate::datapath::OrigDstTable;

/// Accepts captured connections of one pod until cancelled.
pub async fn serve(
    ctx: Arc<PodContext>,
    listener: TcpListener,
    orig_dst: Arc<OrigDstTable>,
    stats: Arc<ProxyStats>,
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
        stats.outbound_accepted.fetch_add(1, Ordering::Relaxed);
        let (ctx, orig_dst, stats) = (ctx.clone(), orig_dst.clone(), stats.clone());
        tokio::spawn(async move { handle(ctx, client, peer, orig_dst, stats).await });
    }
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
    peer: SocketAddr,
    orig_dst: Arc<OrigDstTable>,
    stats: Arc<ProxyStats>,
) {
    let start = Instant::now();
    let Some(dst) = orig_dst.take(ctx.netns_cookie, peer).await else {
        stats
            .no_original_destination
            .fetch_add(1, Ordering::Relaxed);
        stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %ctx.key, client = %peer, "no original destination for captured connection; resetting it");
        reset(client);
        return;
    };
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if is_loop(&ctx, dst) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %ctx.key, dst = %dst, "refusing to proxy to a loopback or capture address");
        reset(client);
        return;
    }
    let upstream = match ctx.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                direction = "outbound",
                src_workload = %ctx.key,
                dst = %dst,
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
    let result = relay(client, upstream).await;
    let outcome = account(&stats, &result);
    tracing::info!(
        direction = "outbound",
        src_workload = %ctx.key,
        src = %src,
        dst = %dst,
        bytes_sent = result.sent,
        bytes_received = result.received,
        duration_ms = start.elapsed().as_millis() as u64,
        outcome,
        "connection closed"
    );
}
