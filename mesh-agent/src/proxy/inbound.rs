//! The inbound plaintext listener: connections to the pod's addresses,
//! steered here by `sk_lookup`. The original destination is the accepted
//! socket's local address (sk_lookup rewrites nothing). The agent delivers to
//! the app from inside the pod's netns over loopback, which `sk_lookup`
//! leaves alone.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{PodContext, ProxyStats, account, relay, reset};

/// Accepts steered connections of one pod until cancelled.
pub async fn serve(
    ctx: Arc<PodContext>,
    listener: TcpListener,
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
                tracing::warn!(pod = %ctx.key, error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.inbound_accepted.fetch_add(1, Ordering::Relaxed);
        let (ctx, stats) = (ctx.clone(), stats.clone());
        tokio::spawn(async move { handle(ctx, client, peer, stats).await });
    }
}

async fn handle(ctx: Arc<PodContext>, client: TcpStream, peer: SocketAddr, stats: Arc<ProxyStats>) {
    let start = Instant::now();
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            tracing::warn!(pod = %ctx.key, error = %e, "inbound connection without a local address");
            reset(client);
            return;
        }
    };
    if !ctx.ips.contains(&dst.ip()) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %ctx.key, dst = %dst, "inbound connection for an address that is not the pod's; resetting it");
        reset(client);
        return;
    }
    let app = match ctx.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                direction = "inbound",
                dst_workload = %ctx.key,
                src = %peer,
                dst = %dst,
                error = %e,
                duration_ms = start.elapsed().as_millis() as u64,
                "connection failed"
            );
            reset(client);
            return;
        }
    };
    let result = relay(client, app).await;
    let outcome = account(&stats, &result);
    tracing::info!(
        direction = "inbound",
        dst_workload = %ctx.key,
        src = %peer,
        dst = %dst,
        bytes_sent = result.sent,
        bytes_received = result.received,
        duration_ms = start.elapsed().as_millis() as u64,
        outcome,
        "connection closed"
    );
}
