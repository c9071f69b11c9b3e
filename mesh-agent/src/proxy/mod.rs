//! The L4 proxy: the in-pod outbound listener (captured connects), the in-pod
//! inbound listener (steered by `sk_lookup`), and the byte relay between them
//! and the sockets the agent opens from inside the pod's netns.
//!
//! Plaintext for now; mutual TLS (HBONE) is the next layer.

mod copy;
mod inbound;
mod outbound;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpStream, runtime::Handle};
use tokio_util::sync::CancellationToken;

pub use copy::{RelayOutcome, RelayResult, relay};

use crate::{
    datapath::{
        OrigDstTable,
        netns::{self, NetnsWorker},
    },
    state::WorkloadKey,
};

/// How long the agent waits for an upstream or delivery connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy knows of an enrolled pod.
pub struct PodContext {
    /// The pod.
    pub key: WorkloadKey,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Cookie of the pod's netns.
    pub netns_cookie: u64,
    /// Creates sockets inside the pod's netns.
    pub worker: Arc<NetnsWorker>,
}

impl PodContext {
    /// Connects to `dst` from a socket created inside the pod's netns,
    /// marked so the kernel programs leave it alone.
    pub async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = self
            .worker
            .run(move || netns::tcp_socket(&dst, mesh_common::BYPASS_MARK))
            .await
            .map_err(std::io::Error::other)??;
        let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        match tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )),
        }
    }
}

/// The listeners opened inside a pod's netns.
pub struct PodListeners {
    /// Outbound capture: `127.0.0.1:15001` and, if the pod has IPv6, `[::1]:15001`.
    pub outbound: Vec<std::net::TcpListener>,
    /// Inbound plaintext (the `sk_lookup` target), dual-stack where possible.
    pub inbound_plaintext: std::net::TcpListener,
}

/// Counters of the proxy, for logs and metrics.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Outbound connections accepted.
    pub outbound_accepted: AtomicU64,
    /// Inbound connections accepted.
    pub inbound_accepted: AtomicU64,
    /// Connections that completed (both directions closed cleanly).
    pub completed: AtomicU64,
    /// Connections that failed or were reset.
    pub failed: AtomicU64,
    /// Outbound connections with no recorded original destination (reset).
    pub no_original_destination: AtomicU64,
    /// Bytes relayed from clients to servers.
    pub bytes_sent: AtomicU64,
    /// Bytes relayed from servers to clients.
    pub bytes_received: AtomicU64,
}

impl ProxyStats {
    /// A copy of the counters as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("outbound_accepted", v(&self.outbound_accepted)),
            ("inbound_accepted", v(&self.inbound_accepted)),
            ("completed", v(&self.completed)),
            ("failed", v(&self.failed)),
            ("no_original_destination", v(&self.no_original_destination)),
            ("bytes_sent", v(&self.bytes_sent)),
            ("bytes_received", v(&self.bytes_received)),
        ]
    }
}

/// The proxy: serves the listeners of every enrolled pod.
#[derive(Clone)]
pub struct Proxy {
    orig_dst: Arc<OrigDstTable>,
    handle: Handle,
    stats: Arc<ProxyStats>,
}

impl Proxy {
    /// A proxy that runs its tasks on `handle`.
    pub fn new(orig_dst: Arc<OrigDstTable>, handle: Handle) -> Self {
        Self {
            orig_dst,
            handle,
            stats: Arc::default(),
        }
    }

    /// The proxy's counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        self.stats.clone()
    }

    /// Starts accepting on a pod's listeners until `cancel` fires.
    pub fn serve_pod(
        &self,
        ctx: Arc<PodContext>,
        listeners: PodListeners,
        cancel: CancellationToken,
    ) {
        let _guard = self.handle.enter();
        for l in listeners.outbound {
            match into_tokio(l) {
                Ok(l) => {
                    let task = outbound::serve(
                        ctx.clone(),
                        l,
                        self.orig_dst.clone(),
                        self.stats.clone(),
                        cancel.clone(),
                    );
                    self.handle.spawn(task);
                }
                Err(e) => {
                    tracing::error!(pod = %ctx.key, error = %e, "cannot serve outbound listener")
                }
            }
        }
        match into_tokio(listeners.inbound_plaintext) {
            Ok(l) => {
                self.handle
                    .spawn(inbound::serve(ctx, l, self.stats.clone(), cancel));
            }
            Err(e) => tracing::error!(pod = %ctx.key, error = %e, "cannot serve inbound listener"),
        }
    }
}

/// Adds a finished relay to the counters; returns its outcome for the access log.
fn account(stats: &ProxyStats, result: &RelayResult) -> String {
    stats.bytes_sent.fetch_add(result.sent, Ordering::Relaxed);
    stats
        .bytes_received
        .fetch_add(result.received, Ordering::Relaxed);
    match &result.outcome {
        RelayOutcome::Closed => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
            "closed".to_owned()
        }
        RelayOutcome::Reset(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            format!("reset: {e}")
        }
    }
}

fn into_tokio(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Resets a connection (RST, not FIN): what the client of a failed or
/// refused proxied connection sees, as it would without the mesh.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
