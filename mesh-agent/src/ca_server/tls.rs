//! The CA server's TLS: its own certificate (DNS names, signed by the mesh
//! CA at start and re-signed at half-life), TLS 1.3 with the mesh's crypto
//! provider, and the accept loop that hands finished handshakes to tonic.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::limits::HANDSHAKE_TIMEOUT;
use crate::identity::{ALPN_H2, MeshCa, SignError, crypto_provider};
use crate::keyed::{KeyPermit, PerKey};

/// How soon a failed re-signing of the serving certificate is retried.
const RETRY: Duration = Duration::from_secs(30);

/// The serving certificate in force, swapped on rotation.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

fn sign(
    ca: &MeshCa,
    names: &[String],
    ttl: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), SignError> {
    let (chain, key, not_after) = ca.sign_server_cert(names, ttl)?;
    let certified =
        CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|e| SignError::Crypto {
            detail: e.to_string(),
        })?;
    Ok((Arc::new(certified), not_after))
}

/// Signs the first serving certificate (an error stops the server from
/// starting) and keeps re-signing it at half-life until `cancel`.
pub fn serving_cert(
    ca: Arc<MeshCa>,
    names: Vec<String>,
    ttl: Duration,
    cancel: CancellationToken,
) -> Result<Arc<ServingCert>, SignError> {
    let (first, mut not_after) = sign(&ca, &names, ttl)?;
    let cert = Arc::new(ServingCert {
        current: RwLock::new(first),
    });
    let rotating = Arc::clone(&cert);
    tokio::spawn(async move {
        let mut issued = SystemTime::now();
        loop {
            let life = not_after.duration_since(issued).unwrap_or(Duration::ZERO);
            let wait = (life / 2).max(Duration::from_secs(1));
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match sign(&ca, &names, ttl) {
                Ok((next, end)) => {
                    *rotating.current.write().unwrap_or_else(|e| e.into_inner()) = next;
                    issued = SystemTime::now();
                    not_after = end;
                    tracing::info!(dns_names = ?names, "CA server certificate rotated");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-sign the CA server certificate; retrying");
                    issued = SystemTime::now();
                    not_after = issued + RETRY * 2;
                }
            }
        }
    });
    Ok(cert)
}

/// TLS 1.3 only, ALPN h2, no client certificate (callers authenticate
/// with their token).
pub fn server_config(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The caller's address, in each request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// A connection after its handshake, holding its place under the
/// connection limit until closed.
pub struct TlsConn {
    io: TlsStream<TcpStream>,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _source: KeyPermit<IpAddr>,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerAddr;

    fn connect_info(&self) -> PeerAddr {
        PeerAddr(self.peer)
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts on `listener` until `cancel`: at most `max_connections` open,
/// and `per_source` from one address (beyond, new ones are closed at once:
/// no certificate is needed to hold a connection, so one source must not
/// take every agent's), each handshake under a deadline in its own task;
/// finished ones go to the returned channel.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    max_connections: usize,
    per_source: usize,
    cancel: CancellationToken,
) -> mpsc::Receiver<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let sources = PerKey::new(per_source.max(1));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "CA server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(source) = sources.try_acquire(&peer.ip().to_canonical()) else {
                tracing::debug!(%peer, per_source, "CA server connection limit per source reached; connection closed");
                continue;
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(%peer, max_connections, "CA server connection limit reached; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let _ = tx
                            .send(Ok(TlsConn {
                                io,
                                peer,
                                _permit: permit,
                                _source: source,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "CA server TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, "CA server TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
