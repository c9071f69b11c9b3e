//! The inbound HBONE listener (`sk_lookup` steers port 15008 of the pod's
//! addresses here): terminate mutual TLS presenting the pod's identity,
//! verify the peer's SPIFFE identity (the TLS layer does: chain to the mesh
//! root, our trust domain), then answer each HTTP/2 CONNECT as Istio does:
//! 200 and a relay to the app, 400 for a bad method or a target that is not
//! this pod, 503 when the app cannot be reached.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    Error, PodContext, Shared,
    authz::Subject,
    hbone,
    limits::{self, Expiry},
    reset,
};
use crate::{
    identity::{SpiffeId, describe_tls_error, peer_identity},
    telemetry::{Connection, Direction, ProxyEvent, SecurityPolicy},
};

/// Accepts tunnel connections of one pod until cancelled.
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
        "hbone",
        &limits,
        |tcp, peer, permit| {
            // Before the handshake: on the thread running the fewest
            // connection tasks (see `threads`).
            let here = super::threads::current().unwrap_or(0);
            let tunnel = shared.threads.hold_tunnel(shared.threads.least_loaded(here));
            let target = tunnel.index();
            if target == here {
                let task = connection(ctx.clone(), tcp, peer, shared.clone(), cancel.clone());
                return shared.spawn_tracked(task, (permit, tunnel));
            }
            // Moved: off this thread's reactor, onto the other's (two
            // epoll_ctl calls, once per tunnel connection).
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(pod = %ctx.key, src = %peer, error = %e, "HBONE connection dropped: cannot hand it to another proxy thread");
                    return;
                }
            };
            let (ctx, shared_task, cancel) = (ctx.clone(), shared.clone(), cancel.clone());
            let task = async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => connection(ctx, tcp, peer, shared_task, cancel).await,
                    Err(e) => {
                        tracing::warn!(pod = %ctx.key, src = %peer, error = %e, "HBONE connection dropped: cannot hand it to another proxy thread");
                    }
                }
            };
            shared.spawn_tracked_on(target, task, (permit, tunnel));
        },
    )
    .await;
}

async fn connection(
    ctx: Arc<PodContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let bounds = shared.limits.clone();
    let limits = bounds.limits().clone();
    // Held from accept to the first CONNECT: idle sockets cannot pile up.
    let mut handshake = match bounds.handshake(peer.ip()) {
        Ok(p) => Some(p),
        Err(_) => return reset(tcp),
    };
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    // `TCP_NODELAY` is inherited from the listener (`datapath::netns`).
    // The pod's certificate (issued on first use; cached otherwise). None:
    // the connection is dropped before TLS, as a handshake could only fail.
    match tokio::time::timeout_at(deadline, shared.tls.manager().fetch(&ctx.identity)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(pod = %ctx.key, src = %peer, reason = %e, "HBONE handshake rejected");
            return reset(tcp);
        }
        Err(_) => {
            tracing::warn!(pod = %ctx.key, src = %peer, reason = "no certificate issued within the handshake timeout", "HBONE handshake rejected");
            return reset(tcp);
        }
    }
    let acceptor = TlsAcceptor::from(shared.tls.server_config(&ctx.identity));
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(mut tls)) => {
            hbone::size_tls_buffer(tls.get_mut().1);
            tls
        }
        Ok(Err(e)) => {
            tracing::warn!(pod = %ctx.key, src = %peer, reason = %describe_tls_error(&e), "HBONE handshake rejected");
            return;
        }
        Err(_) => {
            bounds.expired(Expiry::Handshake);
            let reason = format!(
                "no TLS handshake within {} s",
                limits.handshake_timeout.as_secs_f64()
            );
            tracing::warn!(pod = %ctx.key, src = %peer, reason, "HBONE handshake rejected");
            return;
        }
    };
    let peer_id = match tls.get_ref().1.peer_certificates().map(peer_identity) {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            tracing::warn!(pod = %ctx.key, src = %peer, reason = %e, "HBONE handshake rejected");
            return;
        }
        None => {
            tracing::warn!(pod = %ctx.key, src = %peer, reason = "no client certificate", "HBONE handshake rejected");
            return;
        }
    };
    // Held for the connection's life: the peer's slot and the connection
    // window it grants (what the peer can make this connection buffer).
    let Ok(mut tunnel) = bounds.tunnel(&peer_id, hbone::CONNECTION_WINDOW) else {
        tracing::debug!(pod = %ctx.key, src = %peer, src_identity = %peer_id, "HBONE connection refused: the peer holds its maximum of connections");
        return;
    };
    let handshake_result = tokio::time::timeout_at(
        deadline,
        hbone::server_handshake(tls, limits.max_streams_per_connection, tunnel.window()),
    )
    .await;
    let mut conn = match handshake_result {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(pod = %ctx.key, src = %peer, src_identity = %peer_id, error = %e, "HBONE HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            bounds.expired(Expiry::Handshake);
            tracing::warn!(pod = %ctx.key, src = %peer, src_identity = %peer_id, deadline_s = limits.handshake_timeout.as_secs_f64(), "HBONE connection closed: no HTTP/2 handshake in time");
            return;
        }
    };
    // On cancel (the agent stops, an upgrade): GOAWAY, then keep accepting.
    // Streams the peer opened before it saw the GOAWAY are served; h2 ends
    // `accept` once the last one finishes. The peer's pool retries streams
    // past the GOAWAY's last stream id on another connection. h2 lowers that
    // id from the highest only once the peer answers the GOAWAY's PING; a
    // peer that never does could go on opening streams, served with what
    // this connection knew before the cancel. So past `GOAWAY_GRACE` a new
    // stream is refused (`REFUSED_STREAM`: unprocessed, safe to retry).
    let mut going_away: Option<Instant> = None;
    let activity = limits::Activity::new();
    let mut expired = false;
    loop {
        let idle = activity.deadline(&limits);
        let next = tokio::select! {
            _ = cancel.cancelled(), if going_away.is_none() => {
                conn.graceful_shutdown();
                going_away = Some(Instant::now());
                continue;
            }
            n = conn.accept() => n,
            _ = activity.changed() => continue,
            // A window reduced by the budget grows back as it frees.
            window = tunnel.grown(), if tunnel.reduced() => {
                conn.set_target_window_size(window);
                continue;
            }
            _ = sleep_until(idle.map(|(at, _)| at)) => {
                // Re-checked: a stream may have opened since.
                match activity.deadline(&limits) {
                    Some((at, why)) if at <= Instant::now() => {
                        bounds.expired(why);
                        tracing::info!(pod = %ctx.key, src = %peer, src_identity = %peer_id, reason = why.as_str(), "HBONE connection closed: no stream in time");
                        conn.graceful_shutdown();
                        expired = true;
                        None
                    }
                    _ => continue,
                }
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, mut respond)) => {
                handshake.take();
                if going_away.is_some_and(|at| at.elapsed() >= limits::GOAWAY_GRACE) {
                    tracing::debug!(pod = %ctx.key, src = %peer, src_identity = %peer_id, "HBONE stream refused: the connection is going away");
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                let permit = match bounds.stream(&peer_id) {
                    Ok(p) => p,
                    Err(refusal) => {
                        tracing::debug!(pod = %ctx.key, src = %peer, src_identity = %peer_id, limit = refusal.as_str(), "HBONE stream refused by a limit");
                        hbone::respond_status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                        continue;
                    }
                };
                let open = activity.stream();
                let (ctx, peer_id) = (ctx.clone(), peer_id.clone());
                let task = stream(ctx, req, respond, peer, peer_id, shared.clone());
                shared.spawn_tracked(task, (permit, open));
            }
            Err(e) => {
                tracing::debug!(pod = %ctx.key, src = %peer, error = %e, "HBONE connection ended");
                break;
            }
        }
    }
    drop(handshake);
    // Drive the connection until its remaining streams finish (a peer closed
    // for a deadline has none and gets a bounded grace to take its GOAWAY).
    let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
    if expired {
        let _ = tokio::time::timeout(limits::GOAWAY_GRACE, closed).await;
    } else {
        let _ = closed.await;
    }
}

/// Sleeps until `at`, or forever without a deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// One tunnel stream, from its `CONNECT` to its end: [`open_stream`]
/// decides and delivers, then [`OpenStream::relay`] relays.
pub(super) async fn stream(
    ctx: Arc<PodContext>,
    req: Request<RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: SpiffeId,
    shared: Arc<Shared>,
) {
    let open = Box::pin(open_stream(ctx, req, respond, peer, peer_id, &shared));
    super::open_then_relay(open, OpenStream::relay).await;
}

/// An authorized stream with its app connected and its `200` sent: what
/// its relay needs.
struct OpenStream {
    /// The app's connection (and its delivery's exemption, kept for the
    /// connection's life).
    app: super::AppConnection,
    send: h2::SendStream<Bytes>,
    body: RecvStream,
    /// Policy's hold: a change that denies the connection cancels it.
    tracked: super::authz::Tracked,
    tracker: crate::telemetry::ConnectionTracker,
}

impl OpenStream {
    /// Relays until both sides are done, then reports the connection.
    /// Not an `async fn`, which would move `self` into a local beside the
    /// argument it keeps: the block uses `self`'s fields in place.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep `self` twice in the task"
    )]
    fn relay(self) -> impl std::future::Future<Output = ()> {
        async move {
            // Whole, not field by field (an async block captures only the
            // fields it uses): the delivery's exemption and the policy's
            // hold must live until the relay ends.
            let super::AppConnection {
                stream,
                _tuple: _exempt,
            } = self.app;
            let tracked = self.tracked;
            // The agent made `stream`: an agent death from here resets the app.
            super::copy::abort_on_close(&stream);
            let result = hbone::relay_h2(
                stream,
                self.send,
                self.body,
                &tracked.cancel,
                hbone::EarlyData::default(),
            )
            .await;
            // relay_h2 counts from the TCP side (the app): swap to client -> server.
            self.tracker
                .close(result.received, result.sent, result.outcome.into());
        }
    }
}

/// Decides a tunnel stream (its target, policy, the app's source address)
/// and connects the app; `None` when it was refused or failed, answered
/// and reported here.
async fn open_stream(
    ctx: Arc<PodContext>,
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: SpiffeId,
    shared: &Shared,
) -> Option<OpenStream> {
    let start = Instant::now();
    shared.telemetry.count(ProxyEvent::InboundAccepted);
    // The source is the tunnel's TCP peer, as ztunnel has it: policy and
    // telemetry never use an address the peer chose. Its `forwarded` header
    // is kept as information only.
    let claimed = hbone::forwarded_for(&req);
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, refused: Error| {
        shared.telemetry.refused(&refused);
        let status = refused.connect_status();
        tracing::info!(
            direction = "inbound",
            dst_workload = %ctx.key,
            src = %peer,
            src_identity = %peer_id,
            forwarded_for = claimed.map(tracing::field::display),
            security = "mutual_tls",
            status = status.as_u16(),
            reason = %refused,
            duration_ms = start.elapsed().as_millis() as u64,
            "connection failed"
        );
        hbone::respond_status(respond, status);
    };
    let Ok(target) = hbone::connect_target(&req) else {
        let bad = Error::BadRequest {
            method: req.method().clone(),
            uri: req.uri().clone(),
        };
        refuse(&mut respond, bad);
        return None;
    };
    if !ctx.ips.contains(&target.ip()) {
        refuse(&mut respond, Error::TargetNotThePod(target));
        return None;
    }
    // Delivering to the agent's own port would come back into the agent: a loop.
    if ctx.is_agent_listener(target) {
        refuse(&mut respond, Error::AgentPort(target));
        return None;
    }
    let snapshot = shared.store.current();
    let mut tracker = shared.telemetry.open(Connection {
        direction: Direction::Inbound,
        src: super::peer(&snapshot, peer, Some(&peer_id)),
        dst: super::peer(&snapshot, target, Some(&ctx.identity)),
        dst_service: None,
        security_policy: SecurityPolicy::MutualTls,
    });
    tracker.set_forwarded_for(claimed);
    let subject = Subject {
        principal: Some(peer_id.to_string()),
        source_ip: peer.ip(),
        destination: target,
        workload: ctx.key.clone(),
        labels: ctx.labels.clone(),
    };
    let (tracked, mut tracker) = match super::authorize(shared, subject, tracker) {
        Ok(allowed) => allowed,
        Err(status) => {
            hbone::respond_status(&mut respond, status);
            return None;
        }
    };
    // The app sees the tunnel's TCP peer as the client when it is a known
    // workload's address (never an address the peer only claims), except
    // from the destination's own waypoint: its verified identity and
    // address are a pod's of a waypoint carrying traffic to this pod (its
    // own, or a service's it serves), and its `forwarded` names the known
    // workload whose connection it carries (ztunnel's rule). Policy and telemetry keep the peer.
    // (An agent's `forwarded` names its own TCP source: nothing to check.)
    let client = match claimed {
        Some(c)
            if c.ip() != peer.ip().to_canonical()
                && snapshot.workload_by_ip(c.ip()).is_some()
                && snapshot.is_waypoint_of(
                    peer.ip(),
                    &peer_id,
                    shared.tls.trust_domain(),
                    target.ip(),
                ) =>
        {
            c.ip()
        }
        _ => peer.ip(),
    };
    // The tunnel's own peer must also prove its address's workload: a peer
    // whose certificate is another's is at an address it should not have
    // (a waypoint's named client was proven by the waypoint check above).
    let source = match snapshot.workload_by_ip(client) {
        Some(w) if client != peer.ip() || w.has_identity(&peer_id) => {
            ctx.delivery_source(client, target)
        }
        Some(_) => Err("identity_mismatch"),
        None => Err("client_not_a_known_workload"),
    };
    // A peer that resets the stream while the app is being connected (up
    // to the connect timeout) takes back what the stream holds at once: the
    // connect is dropped with its socket and exemptions.
    let delivered = tokio::select! {
        d = ctx.deliver(target, source) => Ok(d),
        gone = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            Err(gone.map_or_else(|e| e, h2::Error::from))
        }
    };
    let (app, preserved) = match delivered {
        Ok(d) => d,
        Err(e) => {
            tracker.close(0, 0, Error::StreamGone(e).into());
            return None;
        }
    };
    tracker.set_source_preserved(preserved.is_ok(), preserved.err());
    let app = match app {
        Ok(s) => s,
        Err(source) => {
            let unreachable = Error::App { target, source };
            let status = unreachable.connect_status();
            tracker.close(0, 0, unreachable.into());
            hbone::respond_status(&mut respond, status);
            return None;
        }
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_else(|_| Response::new(()));
    let send = match respond.send_response(response, false) {
        Ok(s) => s,
        Err(e) => {
            tracker.close(0, 0, Error::StreamGone(e).into());
            reset(app.stream);
            return None;
        }
    };
    Some(OpenStream {
        app,
        send,
        body: req.into_body(),
        tracked,
        tracker,
    })
}
