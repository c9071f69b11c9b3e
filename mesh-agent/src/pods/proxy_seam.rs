//! The proxy's part of a pod's lifecycle, behind the [`PodProxy`] trait so
//! that the lifecycle can be tested without entering network namespaces:
//! entering the pod's netns and opening the in-pod listeners there, serving
//! them, and forgetting identities of pods gone. [`Proxy`] is the real one.
#![forbid(unsafe_code)]

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use mesh_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio_util::sync::CancellationToken;

use super::EnrollError;
use crate::{
    datapath::netns::{self, NetnsError, NetnsId, NetnsWorker},
    identity::{SpiffeId, TrustDomain},
    proxy::{ListenerSet, PodContext, PodListeners, Proxy},
    state::Workload,
};

/// What the pod lifecycle asks of the proxy.
pub trait PodProxy {
    /// What keeps a pod's netns entered (its worker thread) while enrolled.
    type Netns;

    /// The mesh's trust domain (pods' identities are in it).
    fn trust_domain(&self) -> TrustDomain;

    /// Enters the pod's netns (if the path still names `netns_id`) and opens
    /// the in-pod listeners there. Returns them with the netns cookie.
    fn open(
        &self,
        w: &Workload,
        netns_id: NetnsId,
    ) -> Result<(Self::Netns, PodListeners, u64), EnrollError>;

    /// Starts serving a pod's listeners; returns what stops it.
    fn serve(
        &self,
        w: &Workload,
        identity: &SpiffeId,
        cookie: u64,
        netns: &Self::Netns,
        listeners: PodListeners,
    ) -> CancellationToken;

    /// Forgets certificates and TLS configurations of identities not in `keep`.
    fn retain_identities(&self, keep: &[SpiffeId]);
}

impl PodProxy for Proxy {
    type Netns = Arc<NetnsWorker>;

    fn trust_domain(&self) -> TrustDomain {
        Proxy::trust_domain(self)
    }

    fn open(
        &self,
        w: &Workload,
        netns_id: NetnsId,
    ) -> Result<(Self::Netns, PodListeners, u64), EnrollError> {
        let (ns, id) = netns::open(&w.netns)?;
        if id != netns_id {
            return Err(NetnsError::Changed(w.netns.clone()).into());
        }
        let worker = Arc::new(NetnsWorker::spawn_in(&w.name, &w.netns, ns)?);
        let threads = self.threads();
        let (listeners, cookie) = worker.run_blocking(move || open_listeners(threads))??;
        Ok((worker, listeners, cookie))
    }

    fn serve(
        &self,
        w: &Workload,
        identity: &SpiffeId,
        cookie: u64,
        netns: &Self::Netns,
        listeners: PodListeners,
    ) -> CancellationToken {
        let cancel = CancellationToken::new();
        let ctx = Arc::new(PodContext {
            key: w.key(),
            ips: w.ips.clone(),
            netns_cookie: cookie,
            worker: netns.clone(),
            identity: identity.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
            exempt: self.exemptions(),
            reply_routes: listeners.reply_routes.clone(),
        });
        self.serve_pod(ctx, listeners, cancel.clone());
        cancel
    }

    fn retain_identities(&self, keep: &[SpiffeId]) {
        Proxy::retain_identities(self, keep);
    }
}

/// The pod netns' `net.ipv4.tcp_migrate_req` (Linux 5.14+), seen from a
/// thread inside that netns.
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `net.ipv4.tcp_migrate_req` in the pod's netns (runs inside it).
///
/// During an upgrade both agents' listeners share each in-pod port
/// (`SO_REUSEPORT`); the kernel spreads new connections over both (for the
/// outbound port by hash, for `sk_lookup`-steered ones by the reuseport
/// selection after the lookup). When the old agent stops it shuts its
/// listeners down; without migration, the connections still queued in their
/// accept queues (and half-open ones) are reset. With it, the kernel moves
/// them to the successor's listener of the same group, and that listener
/// alone gets new ones: no connection is lost. Only listeners in a reuseport
/// group are affected (the pod's own apps' ones too, to the same effect).
fn enable_accept_queue_migration() {
    match std::fs::read_to_string(MIGRATE_REQ_SYSCTL) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(MIGRATE_REQ_SYSCTL, "1") {
                tracing::warn!(sysctl = MIGRATE_REQ_SYSCTL, error = %e, "cannot enable accept-queue migration in the pod; connections queued at an upgrade may be reset");
            }
        }
        Err(e) => {
            tracing::warn!(sysctl = MIGRATE_REQ_SYSCTL, error = %e, "no accept-queue migration in this kernel (5.14+ needed); connections queued at an upgrade may be reset");
        }
    }
}

/// Opens the pod's listeners, one set per proxy thread (`threads`, at
/// least one); runs inside the pod's netns. Returns them with the netns
/// cookie.
fn open_listeners(threads: usize) -> Result<(PodListeners, u64), EnrollError> {
    enable_accept_queue_migration();
    let reply_routes = crate::datapath::route_replies_to_agent();
    if let Some(reason) = &reply_routes.reason {
        tracing::warn!(ipv4 = reply_routes.v4, ipv6 = reply_routes.v6, reason = %reason, "transparent delivery unavailable in the pod for a family; its apps see the pod's own address as the client's");
    }
    let first = open_set(true)?;
    let cookie =
        netns::netns_cookie(&first.outbound[0]).map_err(|source| EnrollError::Listener {
            addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
            source,
        })?;
    // The first set decides whether the pod has IPv6; the others follow it.
    let v6 = first.outbound.len() > 1;
    let more = (1..threads)
        .map(|_| open_set(v6))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        PodListeners {
            first,
            more,
            reply_routes,
        },
        cookie,
    ))
}

/// One proxy thread's listeners (all `SO_REUSEPORT`: each port's sockets of
/// all threads, and of a successor agent during an upgrade, form one
/// group). `v6`: open the IPv6 outbound listener; for the first set, try it
/// (IPv6 may be disabled in the pod: then there is nothing to capture on v6).
fn open_set(v6: bool) -> Result<ListenerSet, EnrollError> {
    let open = |addr: SocketAddr, dual_stack: bool| {
        netns::listener(addr, dual_stack).map_err(|source| EnrollError::Listener { addr, source })
    };
    let mut outbound = vec![open(
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        false,
    )?];
    if v6 {
        match open(
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
            false,
        ) {
            Ok(l) => outbound.push(l),
            Err(e) => tracing::debug!(error = %e, "no IPv6 outbound listener"),
        }
    }
    // One dual-stack socket is the sk_lookup target for both families. It
    // must be bound to the wildcard: binding a specific IPv6 address makes a
    // socket v6-only, and sk_lookup refuses v6-only sockets for IPv4 lookups.
    // (The bind address matters little otherwise: sk_lookup ignores it.)
    let steered = |port: u16| match open(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), true)
    {
        Ok(l) => Ok(l),
        Err(_) => open(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), false),
    };
    let set = ListenerSet {
        outbound,
        inbound_plaintext: steered(INBOUND_PLAINTEXT_PORT)?,
        inbound_hbone: steered(INBOUND_HBONE_PORT)?,
    };
    // A connection accepted on the outbound or plaintext port is relayed:
    // from accept on, the agent dying must reset the app, not close it
    // cleanly (see `proxy::copy::relay`). Zero linger on the listener is
    // inherited by every socket it accepts. Not on the HBONE port: a tunnel
    // connection closes gracefully (GOAWAY first).
    for l in set.outbound.iter().chain([&set.inbound_plaintext]) {
        socket2::SockRef::from(l)
            .set_linger(Some(std::time::Duration::ZERO))
            .map_err(|source| EnrollError::Listener {
                addr: l
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
                source,
            })?;
    }
    Ok(set)
}
