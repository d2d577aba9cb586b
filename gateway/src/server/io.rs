//! The byte streams a connection can end up on: the accepted socket itself, the socket
//! behind bytes already read from it (handed to hyper), or hyper's upgraded connection.

use std::{
    future::Future,
    io::IoSlice,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A connection taken over after its request head (WebSocket sessions run on it).
#[derive(Debug)]
pub enum Io {
    /// The accepted socket, served without hyper.
    Tcp(TcpStream),
    /// A connection hyper upgraded (it had served another request first).
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

/// A socket with bytes already read from it in front: what hyper gets when the lean path
/// hands a connection over mid-way.
#[derive(Debug)]
pub struct Prefixed {
    prefix: Bytes,
    io: TcpStream,
}

impl Prefixed {
    /// `prefix` is read first, then `io`.
    pub fn new(prefix: Bytes, io: TcpStream) -> Self {
        Self { prefix, io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Tcp($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Upgraded($io) => {
                let $io = Pin::new($io);
                $e
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(io) => io.is_write_vectored(),
            Io::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// Writes what of `bufs` the stream takes without waiting, advancing `bufs` past it:
/// `Ready(Ok)` when all of it went out, `Pending` when the rest must wait.
pub fn poll_write_now<W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    bufs: &mut [&[u8]],
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    loop {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else { return Poll::Ready(Ok(())) };
        let rest = &bufs[first..];
        let written = if rest[1..].iter().all(|b| b.is_empty()) {
            // One buffer: `write` costs the kernel less than `writev`.
            Pin::new(&mut *io).poll_write(cx, rest[0])
        } else {
            let mut slices = [IoSlice::new(&[]); 16];
            let k = rest.len().min(slices.len());
            for (slice, buf) in slices.iter_mut().zip(rest) {
                *slice = IoSlice::new(buf);
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k])
        };
        let mut n = match written {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        for b in bufs[first..].iter_mut() {
            let take = n.min(b.len());
            *b = &b[take..];
            n -= take;
            if n == 0 {
                break;
            }
        }
    }
}

/// [`poll_write_now`] as a future that never waits: the common case of a write the
/// socket takes at once costs no future state beyond two references.
pub fn write_now<'a, W: AsyncWrite + Unpin + ?Sized>(
    io: &'a mut W,
    bufs: &'a mut [&[u8]],
) -> impl Future<Output = Poll<std::io::Result<()>>> + 'a {
    std::future::poll_fn(move |cx| Poll::Ready(poll_write_now(io, bufs, cx)))
}

/// Writes all of `bufs` (in order) with as few writes as the stream allows, without
/// copying them together. `bufs` is advanced as they go out, so after an interruption
/// it holds what is left.
pub async fn write_all_bufs<W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    bufs: &mut [&[u8]],
) -> std::io::Result<()> {
    std::future::poll_fn(|cx| poll_write_now(io, bufs, cx)).await
}

/// [`write_all_bufs`] that gives up with [`std::io::ErrorKind::TimedOut`] once the
/// stream has taken no byte for `stall`: a peer that stops reading (its receive window
/// and our send buffer full) cannot hold a write, and the task waiting in it, forever.
/// Every byte that goes out restarts the clock, so a slow but reading peer is not cut
/// off by this; its queue's limits deal with it.
pub async fn write_all_bufs_within<W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    bufs: &mut [&[u8]],
    stall: Duration,
) -> std::io::Result<()> {
    let timer = tokio::time::sleep(stall);
    tokio::pin!(timer);
    std::future::poll_fn(|cx| {
        let before = remaining(bufs);
        if let Poll::Ready(r) = poll_write_now(io, bufs, cx) {
            return Poll::Ready(r);
        }
        if remaining(bufs) < before {
            timer.as_mut().reset(tokio::time::Instant::now() + stall);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Whether a write failed because it stalled ([`write_all_bufs_within`]).
pub fn is_stall(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::TimedOut
}

/// What the lean path does when a write to a subscriber failed with `err`: a stall is
/// counted (`gateway_limit_rejections_total{limit="write_stall"}`) and `close` — the
/// token of the connection's inbox — cancelled, so its session ends and records a slow
/// consumer (the hub never cancels it without kicking the inbox first).
pub fn stalled(err: &std::io::Error, close: &tokio_util::sync::CancellationToken) {
    if is_stall(err) {
        metrics::counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "write_stall").increment(1);
        close.cancel();
    }
}

fn remaining(bufs: &[&[u8]]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts at most 3 bytes per write, so every partial-write path runs.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_writes_keep_order_and_skip_empties() {
        let mut w = Trickle(Vec::new());
        write_all_bufs(&mut w, &mut [b"", b"hello", b"", b" ", b"world!"]).await.unwrap();
        assert_eq!(w.0, b"hello world!");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut p = Prefixed::new(Bytes::from_static(b"GET"), socket);
        let mut got = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut p, &mut got).await.unwrap();
        assert_eq!(&got, b"GE");
    }

    #[tokio::test]
    async fn a_write_that_takes_nothing_for_the_bound_gives_up() {
        let stall = Duration::from_millis(300);
        // A peer that reads nothing: the pipe fills, then the write waits.
        let (mut w, mut r) = tokio::io::duplex(16);
        let data = [7u8; 64];
        let started = std::time::Instant::now();
        let err = write_all_bufs_within(&mut w, &mut [&data], stall).await.unwrap_err();
        assert!(is_stall(&err), "{err}");
        assert!(started.elapsed() >= stall && started.elapsed() < stall * 10, "{:?}", started.elapsed());
        // A peer that reads a little now and then keeps the write going past the bound.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut chunk = [0u8; 8];
            while got < 16 + 64 {
                tokio::time::sleep(stall / 3).await;
                got += tokio::io::AsyncReadExt::read(&mut r, &mut chunk).await.unwrap();
            }
            got
        });
        let started = std::time::Instant::now();
        write_all_bufs_within(&mut w, &mut [&data], stall).await.expect("progress keeps it going");
        assert!(started.elapsed() > stall, "the write outlasted the bound: {:?}", started.elapsed());
        assert_eq!(reader.await.unwrap(), 16 + 64);
    }
}
