//! The byte streams a connection can end up on: the accepted socket itself, the socket
//! behind bytes already read from it (handed to hyper), or hyper's upgraded connection.

use std::{
    future::Future,
    io::IoSlice,
    pin::Pin,
    task::{Context, Poll},
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
}
