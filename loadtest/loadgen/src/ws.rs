//! A lean WebSocket client for subscribers: the opening handshake written by hand over a
//! socket we opened ourselves, then a small frame reader on the bare `TcpStream`.
//!
//! Memory per connection is what matters here (tens of thousands of idle subscribers
//! per process), so a connection owns no read buffer: each read goes into a per-thread
//! scratch buffer and the connection keeps only the unfinished tail of a frame (and of
//! a fragmented message), which is empty, with no allocation, while it is idle. Frames
//! are handed out as slices of the scratch buffer, without a copy.
//!
//! Server frames are unmasked; pings are answered at once with a masked pong carrying
//! the same payload (the gateway closes connections that do not answer with 1001).
//!
//! [`message_data`] pulls the payload out of the gateway's `{"type":"message",...}`
//! frames without a JSON parser and, when it holds no escapes, without a copy.

mod frame;
mod message_data;
mod reader;
#[cfg(test)]
pub(crate) mod testing;

use std::{cell::RefCell, ops::ControlFlow, pin::Pin, task::Poll};

use shared::protocol::opcode as op;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use self::frame::client_frame;
pub use self::{
    frame::End,
    message_data::with_message_data,
    reader::{FrameReader, Msg},
};
use crate::{
    http::{MAX_HEAD_BYTES, find_head_end, header, parse_head},
    net::io_kind,
};

/// Size of the per-thread read buffer.
const READ_BUF: usize = 64 << 10;

thread_local! {
    /// Every read of this thread's connections lands here.
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF].into_boxed_slice());
}

/// A WebSocket connection after the handshake.
#[derive(Debug)]
pub struct WsConn {
    stream: TcpStream,
    reader: FrameReader,
    /// Pongs to send; empty, with no allocation, between pings.
    replies: Vec<u8>,
}

impl WsConn {
    /// Sends the upgrade request for `path` (with its query) and checks the `101` answer;
    /// bytes the server sent after it are kept as the start of the frame stream.
    pub async fn connect(mut stream: TcpStream, host: &str, path: &str) -> Result<Self, String> {
        let key = generate_key();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: loadgen\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.map_err(|e| io_kind(&e))?;
        let mut buf = Vec::with_capacity(1024);
        let mut scanned = 0;
        let end = loop {
            if let Some(end) = find_head_end(&buf, scanned) {
                break end;
            }
            scanned = buf.len().saturating_sub(3);
            if buf.len() > MAX_HEAD_BYTES {
                return Err("bad_response_head_too_long".into());
            }
            buf.reserve(1024);
            if stream.read_buf(&mut buf).await.map_err(|e| io_kind(&e))? == 0 {
                return Err("eof".into());
            }
        };
        let head = parse_head(&buf[..end]).map_err(|e| e.kind())?;
        if head.status != 101 {
            return Err(format!("http_{}", head.status));
        }
        if header(&buf[..end], "sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err("ws_protocol".into());
        }
        let mut reader = FrameReader::new();
        if buf.len() > end {
            reader.pending = buf[end..].to_vec();
        }
        Ok(Self { stream, reader, replies: Vec::new() })
    }

    /// Reads once (or handles bytes kept from before) and calls `on` for each complete
    /// message, answering pings; returns what `on` broke with, if it did.
    pub async fn read<B>(&mut self, mut on: impl FnMut(Msg<'_>) -> ControlFlow<B>) -> Result<Option<B>, End> {
        let r = if self.reader.has_frame() {
            self.reader.feed(&[], &mut self.replies, &mut on)
        } else {
            let (stream, reader, replies) = (&mut self.stream, &mut self.reader, &mut self.replies);
            // The scratch buffer is borrowed only within one poll, never across a wait.
            // `poll_read` (unlike `readable` + `try_read`) takes a short read as the socket
            // drained, which saves a read that would only say `EAGAIN`.
            std::future::poll_fn(|cx| {
                READ_SCRATCH.with_borrow_mut(|buf| {
                    let mut rb = ReadBuf::new(buf);
                    match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Err(e)) => Poll::Ready(Err(End::Io(e))),
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Err(End::Eof)),
                        Poll::Ready(Ok(())) => Poll::Ready(reader.feed(rb.filled(), replies, &mut on)),
                    }
                })
            })
            .await
        };
        if let Err(End::Close(code)) = &r {
            // Answer the close, if the socket takes it at once; we close the socket anyway.
            let payload = if *code == 1005 { Vec::new() } else { code.to_be_bytes().to_vec() };
            client_frame(op::CLOSE, &payload, &mut self.replies);
            let _ = self.stream.try_write(&self.replies);
            return r;
        }
        if !self.replies.is_empty() {
            let replies = std::mem::take(&mut self.replies);
            // What was read stands even if the replies cannot be written (it may be the
            // `subscribed` frame); a socket that failed the write fails the next read too.
            let _ = self.stream.write_all(&replies).await;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::testing::{client_frames, fake_server, frame, switching};

    #[tokio::test]
    async fn handshake_keeps_frames_sent_with_the_answer() {
        let mut after = frame(true, op::TEXT, b"first");
        after.extend(frame(true, op::PING, b"hb"));
        after.extend(frame(true, op::TEXT, b"second"));
        after.extend(frame(true, op::CLOSE, &1001u16.to_be_bytes()));
        let (addr, server) = fake_server(switching, after).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut ws = WsConn::connect(stream, "example:1", "/ws?channel=a").await.unwrap();
        let (req, mut sock) = server.await.unwrap();
        assert!(req.starts_with("GET /ws?channel=a HTTP/1.1\r\nHost: example:1\r\n"), "{req}");
        assert_eq!(header(req.as_bytes(), "upgrade"), Some("websocket"));
        assert_eq!(header(req.as_bytes(), "sec-websocket-version"), Some("13"));
        let mut got = Vec::new();
        let end = loop {
            match ws
                .read(|m| {
                    got.push(format!("{m:?}"));
                    ControlFlow::<()>::Continue(())
                })
                .await
            {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(got, [r#"Text("first")"#, r#"Text("second")"#]);
        assert_eq!(end.kind(), "ws_close_1001");
        // The pong, then the close answered.
        let mut back = vec![0u8; 8 + 8];
        sock.read_exact(&mut back).await.unwrap();
        assert_eq!(
            client_frames(&back),
            [(op::PONG, b"hb".to_vec()), (op::CLOSE, 1001u16.to_be_bytes().to_vec())]
        );
    }

    #[tokio::test]
    async fn handshake_failures() {
        let (addr, _server) =
            fake_server(|_| "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".into(), vec![])
                .await;
        let r = WsConn::connect(TcpStream::connect(addr).await.unwrap(), "h", "/ws").await;
        assert_eq!(r.unwrap_err(), "http_503");
        let (addr, _server) = fake_server(|_| switching("not the key"), vec![]).await;
        let r = WsConn::connect(TcpStream::connect(addr).await.unwrap(), "h", "/ws").await;
        assert_eq!(r.unwrap_err(), "ws_protocol");
        let (addr, server) = fake_server(|_| String::new(), vec![]).await;
        let connecting = WsConn::connect(TcpStream::connect(addr).await.unwrap(), "h", "/ws");
        let (r, ()) = tokio::join!(connecting, async { drop(server.await.unwrap()) });
        assert_eq!(r.unwrap_err(), "eof");
    }

    #[tokio::test]
    async fn eof_without_close() {
        let (addr, server) = fake_server(switching, frame(true, op::TEXT, b"x")).await;
        let mut ws = WsConn::connect(TcpStream::connect(addr).await.unwrap(), "h", "/ws").await.unwrap();
        drop(server.await.unwrap());
        let mut n = 0;
        let end = loop {
            let counted = ws.read(|_| {
                n += 1;
                ControlFlow::<()>::Continue(())
            });
            if let Err(e) = counted.await {
                break e;
            }
        };
        assert_eq!((n, end.kind()), (1, "eof".to_owned()));
    }
}
