//! HBONE to the backend pods: a connector for hyper-util's pooled client
//! that opens each backend connection as an HTTP/2 CONNECT stream to the
//! pod's address, over an mTLS tunnel under the waypoint's identity that
//! requires the pod's identity, multiplexed on the agent's client pool
//! ([`hbone::Pool`]: one TLS connection per (waypoint, pod identity, node)).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
};

use http::{Method, Request, StatusCode, Uri};
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use mesh_agent::{
    identity::{MeshTls, SpiffeId},
    proxy::{
        hbone::{self, HboneError, Pool, PoolKey},
        limits::Bounds,
    },
};
use tokio::{io::DuplexStream, net::TcpStream};
use tokio_util::sync::CancellationToken;

use crate::services::HboneTarget;

/// Why a backend connection over HBONE cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The address is not an HBONE endpoint of the configuration.
    #[error("{0} is not an HBONE endpoint of the waypoint's configuration")]
    NotMeshed(String),
    /// The tunnel failed (connect, TLS, HTTP/2 or the peer's refusal).
    #[error(transparent)]
    Hbone(#[from] HboneError),
}

struct Inner {
    tls: Arc<MeshTls>,
    identity: SpiffeId,
    /// The tunnel window budget the pool's connections lease from.
    bounds: Arc<Bounds>,
    pool: Pool,
    targets: RwLock<Arc<HashMap<IpAddr, HboneTarget>>>,
}

/// The connector (cheap to clone).
#[derive(Clone)]
pub struct HboneConnector {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HboneConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneConnector")
            .field("targets", &self.targets().len())
            .finish_non_exhaustive()
    }
}

impl HboneConnector {
    /// Tunnels as `identity` (certificates and verification from `tls`) to
    /// `targets`, each connection's window leased from `bounds`.
    pub fn new(
        tls: Arc<MeshTls>,
        identity: SpiffeId,
        bounds: Arc<Bounds>,
        targets: HashMap<IpAddr, HboneTarget>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                tls,
                identity,
                bounds,
                pool: Pool::default(),
                targets: RwLock::new(Arc::new(targets)),
            }),
        }
    }

    fn targets(&self) -> Arc<HashMap<IpAddr, HboneTarget>> {
        Arc::clone(
            &self
                .inner
                .targets
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Replaces the HBONE endpoints (a configuration reload).
    pub fn set_targets(&self, targets: HashMap<IpAddr, HboneTarget>) {
        *self
            .inner
            .targets
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(targets);
    }

    /// Drops idle tunnel connections (run periodically).
    pub fn sweep(&self) {
        self.inner.pool.sweep();
    }

    /// An opaque TCP stream to `pod` over HBONE carrying `client`'s
    /// connection: its `forwarded` names the client, which the pod's agent
    /// believes from a waypoint (the app sees the client's address); reset
    /// when `reset` (the client's tunnel stream's) is cancelled.
    pub async fn tcp(
        &self,
        pod: SocketAddr,
        client: SocketAddr,
        reset: CancellationToken,
    ) -> Result<DuplexStream, UpstreamError> {
        let stream = Self::stream(Arc::clone(&self.inner), pod, Some((client, reset))).await?;
        Ok(stream.0.into_inner())
    }

    async fn open(inner: Arc<Inner>, uri: Uri) -> Result<HboneStream, UpstreamError> {
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let pod: SocketAddr = authority
            .parse()
            .map_err(|_| UpstreamError::NotMeshed(authority.to_owned()))?;
        // A pooled HTTP connection carries many clients' requests: no
        // `forwarded` client for it.
        Self::stream(inner, pod, None).await
    }

    /// A CONNECT stream to `pod`, naming `client` in `forwarded` when it
    /// carries one client's connection, and then reset with the client's
    /// tunnel stream (its token): a silent backend would otherwise keep
    /// the stream half-closed once the relay is gone.
    async fn stream(
        inner: Arc<Inner>,
        pod: SocketAddr,
        client: Option<(SocketAddr, CancellationToken)>,
    ) -> Result<HboneStream, UpstreamError> {
        let targets = Arc::clone(&inner.targets.read().unwrap_or_else(PoisonError::into_inner));
        let target = targets
            .get(&pod.ip().to_canonical())
            .ok_or_else(|| UpstreamError::NotMeshed(pod.to_string()))?;
        let key = PoolKey {
            source: inner.identity.clone(),
            destination: target.identity.clone(),
            address: target.hbone,
            source_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        // The waypoint's own baggage: it is the client of this hop.
        let baggage = hbone::baggage(
            inner.identity.namespace(),
            inner.identity.service_account(),
            inner.identity.service_account(),
        );
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(pod.to_string())
            .header("baggage", baggage);
        if let Some((client, _)) = &client {
            request = request.header("forwarded", format!("for=\"{client}\""));
        }
        let request = request
            .body(())
            .map_err(|_| UpstreamError::NotMeshed(pod.to_string()))?;
        let connect = || {
            let (inner, key) = (Arc::clone(&inner), key.clone());
            async move {
                let tcp = TcpStream::connect(key.address).await.map_err(|source| {
                    HboneError::Connect {
                        addr: key.address,
                        source,
                    }
                })?;
                let _ = tcp.set_nodelay(true);
                // The waypoint is every tunnel's client: the share is the
                // destination's, so one backend identity takes at most it.
                let window = inner.pool.window_for(&key);
                hbone::dial_tunnel(
                    tcp,
                    &inner.tls,
                    &key,
                    &inner.bounds,
                    &key.destination,
                    window,
                )
                .await
            }
        };
        inner
            .tls
            .manager()
            .fetch(&inner.identity)
            .await
            .map_err(|e| HboneError::Tls {
                addr: key.address,
                reason: e.to_string(),
            })?;
        let (response, send, guard) = inner.pool.send(&key, request, connect).await?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status {
                target: pod,
                status: response.status(),
            }
            .into());
        }
        let (ours, theirs) = tokio::io::duplex(crate::stream::PIPE);
        let recv = response.into_body();
        let reset = client.map(|(_, reset)| reset);
        tokio::spawn(async move {
            let _slot = guard;
            // The client's tunnel stream governs idleness (its pipe), and
            // its reset resets this stream (dropped unfinished: h2 sends
            // RST_STREAM), before the relay's end could half-close it.
            let relay = crate::stream::pipe(theirs, send, recv, None);
            match reset {
                Some(reset) => {
                    tokio::select! {
                        biased;
                        () = reset.cancelled() => {}
                        _ = relay => {}
                    }
                }
                None => {
                    let _ = relay.await;
                }
            }
        });
        Ok(HboneStream(TokioIo::new(ours)))
    }
}

impl tower_service::Service<Uri> for HboneConnector {
    type Response = HboneStream;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<HboneStream, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(Self::open(Arc::clone(&self.inner), uri))
    }
}

/// A backend connection carried by an HBONE stream.
#[derive(Debug)]
pub struct HboneStream(TokioIo<DuplexStream>);

impl Connection for HboneStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
