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

use std::{
    cell::RefCell,
    hash::{BuildHasher, Hasher, RandomState},
    io,
    ops::ControlFlow,
    pin::Pin,
    task::Poll,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::{
    http::{MAX_HEAD_BYTES, parse_head},
    net::io_kind,
};

/// Largest frame or message accepted: loadgen's payloads are at most 1 MiB, and the
/// gateway's message frame adds the envelope and a few escapes.
pub const MAX_MESSAGE: usize = 2 << 20;
/// Size of the per-thread read buffer.
const READ_BUF: usize = 64 << 10;

thread_local! {
    /// Every read of this thread's connections lands here.
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF].into_boxed_slice());
    /// Payloads with escapes are decoded into this.
    static DATA_SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

use shared::protocol::opcode as op;

/// A complete message from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    /// A text message (valid UTF-8).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// Why a connection cannot be read any further.
#[derive(Debug)]
pub enum End {
    /// The server sent a close frame with this code (1005 when it had none).
    Close(u16),
    /// The connection ended without a close frame.
    Eof,
    /// A socket error.
    Io(io::Error),
    /// The server broke the protocol (what it did, for debugging).
    Protocol(#[allow(dead_code)] &'static str),
    /// A frame or message larger than [`MAX_MESSAGE`].
    TooBig,
    /// A text message that is not UTF-8.
    BadUtf8,
}

impl End {
    /// Short stable name for the error counts (the names tungstenite's errors had).
    pub fn kind(&self) -> String {
        match self {
            End::Close(code) => format!("ws_close_{code}"),
            End::Eof => "eof".into(),
            End::Io(e) => io_kind(e),
            End::Protocol(_) => "ws_protocol".into(),
            End::TooBig => "ws_capacity".into(),
            End::BadUtf8 => "ws_other".into(),
        }
    }
}

/// Where the frame at the start of a buffer lies, once its header is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    fin: bool,
    op: u8,
    /// Payload start (header length).
    start: usize,
    /// Frame end.
    end: usize,
}

/// Parses the header of the frame at the start of `buf`: `Ok(Ok(head))` when the whole
/// frame is there, `Ok(Err(n))` when `n` bytes in all are needed to get further.
fn head(buf: &[u8]) -> Result<Result<Head, usize>, End> {
    let [b0, b1, ..] = *buf else { return Ok(Err(2)) };
    if b0 & 0x70 != 0 {
        return Err(End::Protocol("reserved bits set"));
    }
    if b1 & 0x80 != 0 {
        return Err(End::Protocol("masked frame from the server"));
    }
    let (fin, op) = (b0 & 0x80 != 0, b0 & 0x0f);
    let control = op >= op::CLOSE;
    match op {
        op::CONTINUATION | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG => {}
        _ => return Err(End::Protocol("unknown opcode")),
    }
    let (start, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(Err(4)),
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            None => return Ok(Err(10)),
        },
        n => (2, u64::from(n)),
    };
    if control && (!fin || len > 125) {
        return Err(End::Protocol("fragmented or long control frame"));
    }
    if len > MAX_MESSAGE as u64 {
        return Err(End::TooBig);
    }
    let end = start + len as usize;
    Ok(if buf.len() >= end { Ok(Head { fin, op, start, end }) } else { Err(end) })
}

/// Appends a masked client frame (FIN set) to `out`.
fn client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= 125, "control frames only");
    let mask = (RandomState::new().build_hasher().finish() as u32).to_le_bytes();
    out.push(0x80 | opcode);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// Turns the bytes the server sends into messages; answers pings.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// The start of a frame not complete yet (or, after a stop, frames not handled
    /// yet); empty, with no allocation, while the connection is idle.
    pending: Vec<u8>,
    /// A fragmented message in progress: its opcode and its payload so far.
    message: Option<(u8, Vec<u8>)>,
}

impl FrameReader {
    /// A reader at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the bytes kept hold a whole frame (or a bad header) to handle without
    /// reading.
    fn has_frame(&self) -> bool {
        !self.pending.is_empty() && !matches!(head(&self.pending), Ok(Err(_)))
    }

    /// Handles `input` (what was just read) after the bytes kept from before: calls `on`
    /// for each complete message and appends a pong for each ping to `replies`. When `on`
    /// breaks, the bytes not handled yet are kept for the next call and its value is
    /// returned.
    pub fn feed<B>(
        &mut self,
        mut input: &[u8],
        replies: &mut Vec<u8>,
        on: &mut impl FnMut(Msg<'_>) -> ControlFlow<B>,
    ) -> Result<Option<B>, End> {
        // First the frame begun in an earlier read, completed from the input.
        while !self.pending.is_empty() {
            match head(&self.pending)? {
                Err(need) => {
                    let take = (need - self.pending.len()).min(input.len());
                    if take == 0 {
                        return Ok(None);
                    }
                    self.pending.reserve_exact(need - self.pending.len());
                    self.pending.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
                Ok(h) => {
                    let mut pending = std::mem::take(&mut self.pending);
                    let r = self.frame(h, &pending, replies, on);
                    if pending.len() > h.end {
                        pending.drain(..h.end);
                        self.pending = pending;
                    }
                    if let Some(b) = r? {
                        self.pending.extend_from_slice(input);
                        return Ok(Some(b));
                    }
                }
            }
        }
        // Then frames straight from the input.
        while !input.is_empty() {
            match head(input)? {
                Err(need) => {
                    let mut tail = Vec::with_capacity(need.max(input.len()));
                    tail.extend_from_slice(input);
                    self.pending = tail;
                    return Ok(None);
                }
                Ok(h) => {
                    let r = self.frame(h, input, replies, on)?;
                    input = &input[h.end..];
                    if let Some(b) = r {
                        self.pending.extend_from_slice(input);
                        return Ok(Some(b));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Handles one complete frame at the start of `buf`.
    fn frame<B>(
        &mut self,
        h: Head,
        buf: &[u8],
        replies: &mut Vec<u8>,
        on: &mut impl FnMut(Msg<'_>) -> ControlFlow<B>,
    ) -> Result<Option<B>, End> {
        let payload = &buf[h.start..h.end];
        match h.op {
            op::PING => {
                client_frame(op::PONG, payload, replies);
                Ok(None)
            }
            op::PONG => Ok(None),
            op::CLOSE => Err(End::Close(close_code(payload)?)),
            op::CONTINUATION => {
                let Some((_, so_far)) = &mut self.message else {
                    return Err(End::Protocol("continuation without a message"));
                };
                if so_far.len() + payload.len() > MAX_MESSAGE {
                    return Err(End::TooBig);
                }
                so_far.extend_from_slice(payload);
                if !h.fin {
                    return Ok(None);
                }
                let (opcode, whole) = self.message.take().expect("a message in progress");
                deliver(opcode, &whole, on)
            }
            _ => {
                if self.message.is_some() {
                    return Err(End::Protocol("new message inside a fragmented one"));
                }
                if h.fin {
                    return deliver(h.op, payload, on);
                }
                self.message = Some((h.op, payload.to_vec()));
                Ok(None)
            }
        }
    }
}

fn deliver<B>(
    opcode: u8,
    payload: &[u8],
    on: &mut impl FnMut(Msg<'_>) -> ControlFlow<B>,
) -> Result<Option<B>, End> {
    let msg = if opcode == op::TEXT {
        Msg::Text(std::str::from_utf8(payload).map_err(|_| End::BadUtf8)?)
    } else {
        Msg::Binary(payload)
    };
    Ok(match on(msg) {
        ControlFlow::Continue(()) => None,
        ControlFlow::Break(b) => Some(b),
    })
}

/// The status code of a close frame's payload (1005 when it has none).
fn close_code(payload: &[u8]) -> Result<u16, End> {
    match payload {
        [] => Ok(1005),
        [_] => Err(End::Protocol("close frame with a one-byte payload")),
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
    }
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
            if let Some(p) = buf.get(scanned..).and_then(|b| b.windows(4).position(|w| w == b"\r\n\r\n")) {
                break scanned + p + 4;
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

/// The value of header `name` (lower case) in a response head.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The payload of one of the gateway's message frames,
/// `{"type":"message","channel":"…","id":…,"event":…,"data":"…"}`, read without a JSON
/// parser: borrowed from `text` when it holds no escapes, else decoded into `scratch`.
/// `None` for any other frame, or anything unusual in this one (a `\u` escape, fields
/// in another order): those go through `serde_json`.
pub fn message_data<'a>(text: &'a str, scratch: &'a mut String) -> Option<&'a str> {
    let rest = text.strip_prefix(r#"{"type":"message","channel":"#)?;
    let rest = skip_plain_string(rest)?.strip_prefix(r#","id":"#)?;
    let rest = skip_null_or_plain_string(rest)?.strip_prefix(r#","event":"#)?;
    let data = skip_null_or_plain_string(rest)?.strip_prefix(r#","data":""#)?.strip_suffix("\"}")?;
    match data.bytes().position(|b| b == b'"' || b == b'\\' || b < 0x20) {
        None => Some(data),
        Some(first) => unescape(data, first, scratch),
    }
}

/// Calls `f` with the payload of a gateway message frame (see [`message_data`]), using
/// this thread's scratch buffer; `false` when `text` is not such a frame.
pub fn with_message_data(text: &str, f: impl FnOnce(&str)) -> bool {
    DATA_SCRATCH.with_borrow_mut(|scratch| match message_data(text, scratch) {
        Some(data) => {
            f(data);
            true
        }
        None => false,
    })
}

/// Skips a JSON string without escapes at the start of `s`; returns what follows it.
fn skip_plain_string(s: &str) -> Option<&str> {
    let body = s.strip_prefix('"')?;
    let end = body.bytes().position(|b| b == b'"' || b == b'\\')?;
    (body.as_bytes()[end] == b'"').then(|| &body[end + 1..])
}

/// Skips `null` or a JSON string without escapes.
fn skip_null_or_plain_string(s: &str) -> Option<&str> {
    s.strip_prefix("null").or_else(|| skip_plain_string(s))
}

/// Decodes the body of a JSON string (`first` is the first byte needing care) into
/// `out`; `None` for a `\u` escape or anything invalid.
fn unescape<'a>(s: &str, first: usize, out: &'a mut String) -> Option<&'a str> {
    out.clear();
    let b = s.as_bytes();
    let (mut i, mut run) = (first, 0);
    while i < b.len() {
        match b[i] {
            b'\\' => {
                out.push_str(&s[run..i]);
                out.push(match b.get(i + 1)? {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\x08',
                    b'f' => '\x0c',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    _ => return None,
                });
                i += 2;
                run = i;
            }
            b'"' => return None,
            c if c < 0x20 => return None,
            _ => i += 1,
        }
    }
    out.push_str(&s[run..]);
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unmasked server frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n <= 0xffff => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(String),
        /// A binary message's length and byte sum (they can be big).
        Binary(usize, u64),
    }

    fn binary(b: &[u8]) -> Got {
        Got::Binary(b.len(), b.iter().map(|&x| u64::from(x)).sum())
    }

    /// Feeds `parts` in order; returns the messages, the replies and how it ended.
    fn feed_all(parts: &[&[u8]]) -> (Vec<Got>, Vec<u8>, Option<End>) {
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        let mut replies = Vec::new();
        for part in parts {
            let res = r.feed(part, &mut replies, &mut |m| {
                got.push(match m {
                    Msg::Text(t) => Got::Text(t.to_owned()),
                    Msg::Binary(b) => binary(b),
                });
                ControlFlow::<()>::Continue(())
            });
            if let Err(e) = res {
                return (got, replies, Some(e));
            }
        }
        (got, replies, None)
    }

    /// Unmasks the client frames in `bytes`: (opcode, payload) each.
    fn client_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0] & 0xf0, 0x80, "FIN, no reserved bits");
            assert_eq!(bytes[1] & 0x80, 0x80, "client frames are masked");
            let len = (bytes[1] & 0x7f) as usize;
            assert!(len <= 125);
            let mask = &bytes[2..6];
            let payload = bytes[6..6 + len].iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m).collect();
            out.push((bytes[0] & 0x0f, payload));
            bytes = &bytes[6 + len..];
        }
        out
    }

    fn sample_stream() -> (Vec<u8>, Vec<Got>) {
        let medium = "0123456789".repeat(30);
        let big = vec![7u8; 70_000];
        let mut s = frame(true, op::TEXT, b"hello");
        s.extend(frame(true, op::TEXT, medium.as_bytes()));
        s.extend(frame(true, op::PING, b"pp"));
        s.extend(frame(true, op::BINARY, &big));
        s.extend(frame(false, op::TEXT, "frag ".as_bytes()));
        s.extend(frame(true, op::PING, b""));
        s.extend(frame(false, op::CONTINUATION, "men".as_bytes()));
        s.extend(frame(true, op::PONG, b"x"));
        s.extend(frame(true, op::CONTINUATION, "ted ✓".as_bytes()));
        s.extend(frame(true, op::TEXT, b""));
        let want = vec![
            Got::Text("hello".into()),
            Got::Text(medium),
            binary(&big),
            Got::Text("frag mented ✓".into()),
            Got::Text(String::new()),
        ];
        (s, want)
    }

    #[test]
    fn frames_split_at_every_byte() {
        let (s, want) = sample_stream();
        let pongs = vec![(op::PONG, b"pp".to_vec()), (op::PONG, Vec::new())];
        let (got, replies, end) = feed_all(&[&s]);
        assert!(end.is_none());
        assert_eq!(got, want);
        assert_eq!(client_frames(&replies), pongs);
        // Every split in two (stepping through the big frame's payload faster).
        let mut split = 0;
        while split <= s.len() {
            let (got, replies, end) = feed_all(&[&s[..split], &s[split..]]);
            assert!(end.is_none(), "split {split}");
            assert_eq!(got, want, "split {split}");
            assert_eq!(client_frames(&replies), pongs, "split {split}");
            split += if (400..70_300).contains(&split) { 997 } else { 1 };
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        let (got, replies, end) = feed_all(&bytes);
        assert!(end.is_none());
        assert_eq!(got, want);
        assert_eq!(client_frames(&replies), pongs);
    }

    #[test]
    fn lengths_of_every_size() {
        for n in [0, 125, 126, 127, 65_535, 65_536, 100_000] {
            let payload = vec![b'a'; n];
            let f = frame(true, op::TEXT, &payload);
            let header = match n {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(f.len(), header + n);
            let (got, _, end) = feed_all(&[&f]);
            assert!(end.is_none());
            assert_eq!(got, [Got::Text(String::from_utf8(payload).unwrap())], "{n}");
        }
        // A non-minimal 64-bit length is still read.
        let mut f = vec![0x81, 127, 0, 0, 0, 0, 0, 0, 0, 3];
        f.extend_from_slice(b"abc");
        assert_eq!(feed_all(&[&f]).0, [Got::Text("abc".into())]);
    }

    #[test]
    fn close_codes() {
        let code = |payload: &[u8]| match feed_all(&[&frame(true, op::CLOSE, payload)]).2 {
            Some(End::Close(c)) => Ok(c),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(code(&[]), Ok(1005));
        assert_eq!(code(&[0x03, 0xe9]), Ok(1001));
        assert_eq!(code(b"\x03\xe8bye"), Ok(1000));
        assert!(code(&[3]).is_err());
        assert_eq!(End::Close(1001).kind(), "ws_close_1001");
        // Messages before the close are delivered.
        let mut s = frame(true, op::TEXT, b"last");
        s.extend(frame(true, op::CLOSE, &[0x03, 0xf0]));
        let (got, _, end) = feed_all(&[&s]);
        assert_eq!(got, [Got::Text("last".into())]);
        assert!(matches!(end, Some(End::Close(1008))));
    }

    #[test]
    fn protocol_errors() {
        let err = |bytes: &[u8]| feed_all(&[bytes]).2.map(|e| e.kind());
        assert_eq!(err(&[0x81, 0x81, 1, 2, 3, 4, b'x']).as_deref(), Some("ws_protocol"), "masked");
        assert_eq!(err(&[0xc1, 0]).as_deref(), Some("ws_protocol"), "reserved bit");
        assert_eq!(err(&[0x83, 0]).as_deref(), Some("ws_protocol"), "opcode");
        assert_eq!(err(&[0x09, 0]).as_deref(), Some("ws_protocol"), "fragmented ping");
        assert_eq!(err(&frame(true, op::PING, &[0; 126])).as_deref(), Some("ws_protocol"));
        assert_eq!(err(&frame(true, op::CONTINUATION, b"x")).as_deref(), Some("ws_protocol"));
        let mut two = frame(false, op::TEXT, b"a");
        two.extend(frame(true, op::TEXT, b"b"));
        assert_eq!(err(&two).as_deref(), Some("ws_protocol"));
        assert_eq!(err(&frame(true, op::TEXT, b"\xff")).as_deref(), Some("ws_other"));
        // Too big: refused from the header alone.
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_MESSAGE as u64 + 1).to_be_bytes());
        assert_eq!(err(&huge).as_deref(), Some("ws_capacity"));
        // Fragments adding up to too much.
        let mut parts = frame(false, op::BINARY, &vec![0; MAX_MESSAGE]);
        parts.extend(frame(true, op::CONTINUATION, b"x"));
        assert_eq!(err(&parts).as_deref(), Some("ws_capacity"));
    }

    #[test]
    fn a_stop_keeps_the_rest() {
        let mut s = frame(true, op::TEXT, b"one");
        s.extend(frame(true, op::TEXT, b"two"));
        s.extend(frame(true, op::TEXT, b"thr"));
        for split in 0..=s.len() {
            let mut r = FrameReader::new();
            let mut replies = Vec::new();
            let seen = RefCell::new(Vec::new());
            let mut stop_at_one = |m: Msg<'_>| match m {
                Msg::Text("one") => ControlFlow::Break(1),
                Msg::Text(t) => {
                    seen.borrow_mut().push(t.to_owned());
                    ControlFlow::Continue(())
                }
                Msg::Binary(_) => unreachable!(),
            };
            let mut stopped = r.feed(&s[..split], &mut replies, &mut stop_at_one).unwrap();
            if stopped.is_none() {
                stopped = r.feed(&s[split..], &mut replies, &mut stop_at_one).unwrap();
                assert!(seen.borrow().is_empty());
                assert_eq!(stopped, Some(1), "split {split}");
                assert!(r.has_frame());
                assert_eq!(r.feed(&[], &mut replies, &mut stop_at_one).unwrap(), None);
            } else {
                assert_eq!(stopped, Some(1));
                r.feed(&[], &mut replies, &mut stop_at_one).unwrap();
                r.feed(&s[split..], &mut replies, &mut stop_at_one).unwrap();
            }
            assert_eq!(*seen.borrow(), ["two", "thr"], "split {split}");
            assert!(r.pending.is_empty() && r.pending.capacity() == 0, "split {split}");
            assert!(!r.has_frame());
        }
    }

    #[test]
    fn idle_reader_holds_no_allocation() {
        let mut r = FrameReader::new();
        let f = frame(true, op::TEXT, &[b'z'; 200]);
        let mut replies = Vec::new();
        let mut on = |_: Msg<'_>| ControlFlow::<()>::Continue(());
        r.feed(&f[..50], &mut replies, &mut on).unwrap();
        assert_eq!(r.pending.capacity(), f.len(), "sized to the frame at once");
        r.feed(&f[50..], &mut replies, &mut on).unwrap();
        assert_eq!(r.pending.capacity(), 0);
        assert!(r.message.is_none());
    }

    /// The gateway's message frame for `data` (as `Delivery::ws` builds it).
    fn gateway_frame(id: Option<&str>, event: Option<&str>, data: &str) -> String {
        let env = shared::EnvelopeRef { channel: "lg1-0", id, event, data };
        let json = serde_json::to_string(&env).unwrap();
        format!(r#"{{"type":"message",{}"#, &json[1..])
    }

    #[test]
    fn message_data_fast_path() {
        let mut scratch = String::new();
        // A loadgen payload: its quotes arrive escaped.
        let mut payload = String::new();
        crate::payload::encode(
            crate::payload::Payload { seq: 42, ch: 0, t_us: 1_700_000_000_000_000 },
            100,
            &mut payload,
        );
        let text = gateway_frame(None, None, &payload);
        assert!(text.contains(r#""data":"{\"seq\":42,\"ch\":0,"#), "{text}");
        assert_eq!(message_data(&text, &mut scratch), Some(payload.as_str()));
        // No escapes: borrowed from the frame itself.
        let text = gateway_frame(Some("1700000000000-0"), Some("tick"), "plain ✓ data");
        let data = message_data(&text, &mut scratch).unwrap();
        assert_eq!(data, "plain ✓ data");
        assert!(text.as_bytes().as_ptr_range().contains(&data.as_ptr()));
        // Every simple escape.
        for data in ["a\\b", "line\nbreak\r\t", "\"quoted\"", "ends with \\", "/", ""] {
            let text = gateway_frame(Some("1-0"), None, data);
            assert_eq!(message_data(&text, &mut scratch), Some(data), "{text}");
        }
        // A \u escape, other frames and reordered fields: left to serde_json.
        assert_eq!(message_data(&gateway_frame(None, None, "ctl\u{1}"), &mut scratch), None);
        for other in [
            r#"{"type":"subscribed","channels":["lg1-0"],"recovered":false}"#,
            r#"{"type":"reset","channel":"lg1-0"}"#,
            r#"{"type":"error","code":"slow_consumer","message":"x"}"#,
            r#"{"type":"message","data":"x","channel":"c","id":null,"event":null}"#,
            r#"{"type":"message","channel":"c","id":null,"event":null,"data":"x","extra":"y"}"#,
            r#"{"type":"message","channel":"c","id":null,"event":null,"data":"x\"}"#,
            r#"{"type":"message","channel":"c\"","id":null,"event":null,"data":"x"}"#,
        ] {
            assert_eq!(message_data(other, &mut scratch), None, "{other}");
        }
        let mut seen = String::new();
        assert!(with_message_data(&gateway_frame(None, None, "{\"a\":1}"), |d| seen.push_str(d)));
        assert_eq!(seen, "{\"a\":1}");
        assert!(!with_message_data("{}", |_| unreachable!()));
    }

    /// A fake server: answers the upgrade with `answer(key)`, then sends `after`.
    async fn fake_server(
        answer: impl FnOnce(&str) -> String + Send + 'static,
        after: Vec<u8>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<(String, TcpStream)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(accept(listener, answer, after)))
    }

    /// Accepts one connection, reads its upgrade request, and answers `answer(key)`
    /// followed by `after` in the same write; returns the request and the socket.
    pub(crate) async fn accept(
        listener: tokio::net::TcpListener,
        answer: impl FnOnce(&str) -> String,
        after: Vec<u8>,
    ) -> (String, TcpStream) {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        while !req.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(sock.read(&mut b).await.unwrap(), 1);
            req.push(b[0]);
        }
        let req = String::from_utf8(req).unwrap();
        let key = header(req.as_bytes(), "sec-websocket-key").unwrap().to_owned();
        let mut out = answer(&key).into_bytes();
        out.extend(after);
        sock.write_all(&out).await.unwrap();
        (req, sock)
    }

    /// A `101` answer to the upgrade with key `key`.
    pub(crate) fn switching(key: &str) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
    }

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
