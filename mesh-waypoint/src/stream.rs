//! In-memory plumbing between an HBONE stream and what is inside it: the
//! pipe both directions are copied through, and a stream with its first
//! bytes (read for protocol detection) put back in front.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

/// The in-memory pipe between an HBONE stream and the inner protocol.
pub(crate) const PIPE: usize = 64 * 1024;

/// Copies between the HBONE stream and the in-memory pipe until both
/// directions end; an error resets the HTTP/2 stream, and so does `idle`,
/// if given, without a byte moved either way (everything inside the
/// stream, HTTP or TCP, goes through here: the inner side sees its pipe
/// close). Returns why it reset the stream: the inner side's relays
/// must then end too (a half-closed pipe does not end a relay whose
/// backend says nothing).
pub(crate) async fn pipe(
    io: DuplexStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    idle: Option<Duration>,
) -> io::Result<()> {
    let (mut r, mut w) = tokio::io::split(io);
    let start = Instant::now();
    // Milliseconds from `start` of the last byte moved.
    let last = AtomicU64::new(0);
    let moved = || {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
    };
    let up = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            buf.reserve(16 * 1024);
            if r.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true)
                    .map_err(io::Error::other)?;
                return io::Result::Ok(());
            }
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed"))?
                    .map_err(io::Error::other)?;
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(io::Error::other)?;
                moved();
            }
        }
    };
    let down = async {
        while let Some(data) = recv.data().await {
            let data = data.map_err(io::Error::other)?;
            w.write_all(&data).await?;
            moved();
            let _ = recv.flow_control().release_capacity(data.len());
        }
        w.shutdown().await
    };
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let Some(at) = since.checked_add(idle).and_then(|d| start.checked_add(d)) else {
                return std::future::pending().await;
            };
            if Instant::now() >= at {
                return idle;
            }
            tokio::time::sleep_until(at.into()).await;
        }
    };
    let ended = tokio::select! {
        (a, b) = async { tokio::join!(up, down) } => a.and(b),
        idle = watchdog => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no byte either way for {} s", idle.as_secs_f64()),
        )),
    };
    if let Err(e) = &ended {
        tracing::debug!(error = %e, "tunnel stream reset");
        send.send_reset(h2::Reason::CANCEL);
    }
    ended
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind {
    pub(crate) prefix: Bytes,
    pub(crate) io: DuplexStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let part = self.prefix.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
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
}
