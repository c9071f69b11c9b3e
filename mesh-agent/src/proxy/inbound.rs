//! The inbound plaintext listener: connections to the pod's addresses,
//! steered here by `sk_lookup`. The original destination is the accepted
//! socket's local address (sk_lookup rewrites nothing). The agent delivers to
//! the app from inside the pod's netns, from the client's address
//! (`IP_TRANSPARENT`, see `PodContext::deliver`), a delivery `sk_lookup`
//! leaves alone by its tuple.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Error, PodContext, Shared, authz::Subject, relay, reset};
use crate::telemetry::{Connection, Direction, ProxyEvent, SecurityPolicy};

/// Accepts steered connections of one pod until cancelled.
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
        "inbound",
        &limits,
        |client, peer, permit| {
            shared.telemetry.count(ProxyEvent::InboundAccepted);
            // From accept on, the agent dying resets the app (see
            // copy::relay): `client` inherited zero linger from the listener.
            let task = handle(ctx.clone(), client, peer, shared.clone());
            shared.spawn_tracked(task, permit);
        },
    )
    .await;
}

async fn handle(ctx: Arc<PodContext>, client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
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
        shared.telemetry.refused(&Error::NotThePod(dst));
        tracing::warn!(pod = %ctx.key, dst = %dst, "inbound connection for an address that is not the pod's; resetting it");
        reset(client);
        return;
    }
    // Plaintext: no identity. STRICT PeerAuthentication and principal rules deny it.
    let snapshot = shared.store.current();
    let tracker = shared.telemetry.open(Connection {
        direction: Direction::Inbound,
        src: super::peer(&snapshot, peer, None),
        dst: super::peer(&snapshot, dst, Some(&ctx.identity)),
        dst_service: None,
        security_policy: SecurityPolicy::None,
    });
    // Delivering to the agent's own port would be accepted here again: a loop.
    if ctx.is_agent_listener(dst) {
        tracker.close(0, 0, Error::AgentPort(dst).into());
        reset(client);
        return;
    }
    let subject = Subject {
        principal: None,
        source_ip: peer.ip(),
        destination: dst,
        workload: ctx.key.clone(),
        labels: ctx.labels.clone(),
    };
    let Ok((tracked, mut tracker)) = super::authorize(&shared, subject, tracker) else {
        reset(client);
        return;
    };
    // The app sees the TCP peer as the client, as it would without the mesh.
    let (app, preserved) = ctx.deliver(dst, ctx.delivery_source(peer.ip(), dst)).await;
    tracker.set_source_preserved(preserved.is_ok(), preserved.err());
    let app = match app {
        Ok(s) => s,
        Err(source) => {
            let unreachable = Error::App {
                target: dst,
                source,
            };
            tracker.close(0, 0, unreachable.into());
            reset(client);
            return;
        }
    };
    // The agent made `app.stream`: an agent death from here resets the app.
    super::copy::abort_on_close(&app.stream);
    let result = relay(
        client,
        app.stream,
        &tracked.cancel,
        super::copy::Splice::from_setting(&shared),
    )
    .await;
    result.splicing.count(&tracker);
    tracker.close(result.sent, result.received, result.outcome.into());
}
