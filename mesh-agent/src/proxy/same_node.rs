//! The same-node fast path (issue 13): a connection from one of this
//! agent's pods to another needs no tunnel. The agent owns both ends: it
//! knows the client pod's identity (it captured the connect in that pod's
//! netns) as surely as a verified certificate would tell it, so it runs the
//! destination side of an HBONE stream here, in process — the same
//! authorization (AuthorizationPolicy with the client's principal,
//! PeerAuthentication as mutual TLS), the same inbound telemetry and access
//! log, the same transparent delivery from the client's address, the same
//! re-check of open connections when policies change — and relays between
//! the two sockets without TLS and HTTP/2 in between. Nothing leaves the
//! agent's memory in plaintext that did not before: the bytes go from the
//! client's socket to the app's, both inside their pods.
//!
//! What fails closed over HBONE fails closed here: no certificate for
//! either pod (issuer down, never issued), a denial, an app that does not
//! answer. The outbound side sees those as the HBONE status the
//! destination side would have answered.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
};

use super::{Error, PodContext, Shared, authorize, authz, hbone::HboneError, peer};
use crate::telemetry::{Connection, ConnectionTracker, Direction, ProxyEvent, SecurityPolicy};

/// The pods this agent serves, by address: registered when their listeners
/// start, removed when they stop (a pod leaving the mesh, or being
/// re-enrolled under a new context).
#[derive(Default)]
pub struct LocalPods {
    by_ip: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
}

impl LocalPods {
    /// Registers `ctx` under each of its addresses.
    pub fn insert(&self, ctx: &Arc<PodContext>) {
        let mut map = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        for ip in &ctx.ips {
            map.insert(ip.to_canonical(), ctx.clone());
        }
    }

    /// Removes `ctx`'s addresses that still name `ctx` (not a newer
    /// context of the same pod).
    pub fn remove(&self, ctx: &Arc<PodContext>) {
        let mut map = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        for ip in &ctx.ips {
            if map
                .get(&ip.to_canonical())
                .is_some_and(|c| Arc::ptr_eq(c, ctx))
            {
                map.remove(&ip.to_canonical());
            }
        }
    }

    /// The pod served at `ip`, if this agent serves one there.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        self.by_ip
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip.to_canonical())
            .cloned()
    }

    /// How many addresses are registered.
    pub fn len(&self) -> usize {
        self.by_ip
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no address is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An allowed same-node connection, delivered: the app's socket, its
/// registration for policy re-checks and its inbound telemetry.
pub struct Delivered {
    /// The connection to the app, inside the destination pod (held until
    /// the relay ends).
    pub app: super::AppConnection,
    /// Cancelled when a policy change denies the connection.
    pub tracked: authz::Tracked,
    /// The destination side's report (closed by the caller with the relay's bytes).
    pub inbound: ConnectionTracker,
}

/// The destination half of a same-node connection from `client` (at
/// `src`) to `target` in `dst`: what an HBONE stream's destination does
/// (see [`super::inbound_hbone`]), with the client's identity known
/// first-hand. Errors are those the client side would see from the
/// destination agent (`HboneError::Status`), so the outbound report is the
/// same with and without the fast path.
pub async fn deliver(
    client: &PodContext,
    dst: &PodContext,
    src: SocketAddr,
    target: SocketAddr,
    shared: &Shared,
) -> Result<Delivered, Error> {
    let status = |status| Error::Tunnel(HboneError::Status { target, status });
    // Fail closed as a tunnel would: the destination side needs its
    // certificate for the handshake (the client's is checked by the caller).
    shared
        .tls
        .manager()
        .fetch(&dst.identity)
        .await
        .map_err(Error::NoCertificate)?;
    shared.telemetry.count(ProxyEvent::InboundAccepted);
    shared.telemetry.count(ProxyEvent::SameNodeFastPath);
    let snapshot = shared.store.current();
    let tracker = shared.telemetry.open(Connection {
        direction: Direction::Inbound,
        src: peer(&snapshot, src, Some(&client.identity)),
        dst: peer(&snapshot, target, Some(&dst.identity)),
        dst_service: None,
        security_policy: SecurityPolicy::MutualTls,
    });
    let subject = authz::Subject {
        principal: Some(client.identity.to_string()),
        source_ip: src.ip(),
        destination: target,
        workload: dst.key.clone(),
        labels: dst.labels.clone(),
    };
    let (tracked, mut inbound) = authorize(shared, subject, tracker).map_err(status)?;
    let source = dst.delivery_source(src.ip(), target);
    let (app, preserved) = dst.deliver(target, source).await;
    inbound.set_source_preserved(preserved.is_ok(), preserved.err());
    match app {
        Ok(app) => Ok(Delivered {
            app,
            tracked,
            inbound,
        }),
        Err(source) => {
            let unreachable = Error::App { target, source };
            let code = unreachable.connect_status();
            inbound.close(0, 0, unreachable.into());
            Err(status(code))
        }
    }
}
