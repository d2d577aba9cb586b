//! A minimal HTTP/1.1 client over a socket we opened ourselves (so each connection can
//! have its own source address): write a GET by hand, parse the response head, and
//! decode the body (chunked, sized, or until close) incrementally.

use std::io;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Longest response head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Read buffer per connection.
pub const READ_BUF: usize = 4 * 1024;

/// What went wrong talking HTTP; [`HttpError::kind`] names it for the error counts.
#[derive(Debug)]
pub enum HttpError {
    /// Socket error.
    Io(io::Error),
    /// The peer closed the connection before the response was complete.
    Eof,
    /// The response was not HTTP/1.x as expected.
    Malformed(&'static str),
}

impl HttpError {
    /// Short stable name for counting.
    pub fn kind(&self) -> String {
        match self {
            HttpError::Io(e) => crate::net::io_kind(e),
            HttpError::Eof => "eof".into(),
            HttpError::Malformed(what) => format!("bad_response_{what}"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: n`.
    Length(u64),
    /// Until the connection closes.
    Close,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Body framing.
    pub framing: Framing,
    /// Whether the server will close the connection after this response.
    pub close: bool,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The `Last-Modified` header, if any (half of an Nchan long-poll message id).
    pub last_modified: Option<String>,
    /// The `Etag` header, if any (the other half of an Nchan long-poll message id).
    pub etag: Option<String>,
}

/// Parses a response head (status line and headers, through the blank line).
pub fn parse_head(head: &[u8]) -> Result<ResponseHead, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("head_not_utf8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or(HttpError::Malformed("empty"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("status_line"));
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or(HttpError::Malformed("status_code"))?;
    let mut chunked = false;
    let mut length = None;
    let mut close = version == "HTTP/1.0";
    let mut content_type = None;
    let (mut last_modified, mut etag) = (None, None);
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(HttpError::Malformed("header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<u64>().map_err(|_| HttpError::Malformed("content_length"))?);
        } else if name.eq_ignore_ascii_case("connection") {
            if value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                close = true;
            } else if value.split(',').any(|t| t.trim().eq_ignore_ascii_case("keep-alive")) {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("last-modified") {
            last_modified = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("etag") {
            etag = Some(value.to_owned());
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        close = true;
        Framing::Close
    };
    Ok(ResponseHead { status, framing, close, content_type, last_modified, etag })
}

/// Incremental decoder of a chunked body.
#[derive(Debug, Clone, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size; `digits` seen so far.
    #[default]
    SizeStart,
    Size {
        value: u64,
        digits: u8,
    },
    /// Skipping a chunk extension up to the line end.
    Ext {
        value: u64,
    },
    /// Saw CR after the size line.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section; `empty` when the current line has no bytes yet.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the terminating chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, appending body bytes to `out`; returns how many input bytes were
    /// used (fewer than given only once the body is complete).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        use ChunkState::*;
        let bad = || HttpError::Malformed("chunk");
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                Done => return Ok(i),
                Data { left } => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 { DataCr } else { Data { left } };
                    continue;
                }
                SizeStart => match hex(b) {
                    Some(d) => Size { value: u64::from(d), digits: 1 },
                    None => return Err(bad()),
                },
                Size { value, digits } => match (hex(b), b) {
                    (Some(d), _) => {
                        if digits >= 15 {
                            return Err(bad());
                        }
                        Size { value: value * 16 + u64::from(d), digits: digits + 1 }
                    }
                    (None, b';' | b' ' | b'\t') => Ext { value },
                    (None, b'\r') => SizeLf { value },
                    (None, b'\n') => after_size(value),
                    _ => return Err(bad()),
                },
                Ext { value } => match b {
                    b'\r' => SizeLf { value },
                    b'\n' => after_size(value),
                    _ => Ext { value },
                },
                SizeLf { value } => match b {
                    b'\n' => after_size(value),
                    _ => return Err(bad()),
                },
                DataCr => match b {
                    b'\r' => DataLf,
                    b'\n' => SizeStart,
                    _ => return Err(bad()),
                },
                DataLf => match b {
                    b'\n' => SizeStart,
                    _ => return Err(bad()),
                },
                Trailer { empty } => match b {
                    b'\r' => TrailerLf { empty },
                    b'\n' if empty => Done,
                    b'\n' => Trailer { empty: true },
                    _ => Trailer { empty: false },
                },
                TrailerLf { empty } => match b {
                    b'\n' if empty => Done,
                    b'\n' => Trailer { empty: true },
                    _ => return Err(bad()),
                },
            };
            i += 1;
        }
        Ok(i)
    }
}

fn after_size(value: u64) -> ChunkState {
    if value == 0 { ChunkState::Trailer { empty: true } } else { ChunkState::Data { left: value } }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decoder of one response body, whatever its framing.
#[derive(Debug, Clone)]
pub enum BodyDecoder {
    /// Chunked.
    Chunked(ChunkedDecoder),
    /// Sized: bytes still to come.
    Length(u64),
    /// Until close.
    Close,
}

impl BodyDecoder {
    /// The decoder for a response head.
    pub fn for_head(head: &ResponseHead) -> Self {
        match head.framing {
            Framing::Chunked => BodyDecoder::Chunked(ChunkedDecoder::new()),
            Framing::Length(n) => BodyDecoder::Length(n),
            Framing::Close => BodyDecoder::Close,
        }
    }

    /// Whether the whole body has been seen (never, for read-until-close bodies).
    pub fn is_done(&self) -> bool {
        match self {
            BodyDecoder::Chunked(c) => c.is_done(),
            BodyDecoder::Length(n) => *n == 0,
            BodyDecoder::Close => false,
        }
    }

    /// Decodes `input` into `out`; returns the input bytes used.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        match self {
            BodyDecoder::Chunked(c) => c.decode(input, out),
            BodyDecoder::Length(left) => {
                let n = input.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                Ok(n)
            }
            BodyDecoder::Close => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
        }
    }
}

/// One HTTP/1.1 connection: requests written by hand, responses parsed incrementally.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    /// Bytes read but not yet consumed.
    pending: Vec<u8>,
    rbuf: Box<[u8]>,
}

impl HttpConn {
    /// Wraps a connected socket.
    pub fn new(stream: TcpStream) -> Self {
        Self { stream, pending: Vec::new(), rbuf: vec![0; READ_BUF].into_boxed_slice() }
    }

    /// Sends `GET path` with `Host` and `Accept` headers, keeping the connection alive.
    pub async fn send_get(&mut self, host: &str, path: &str, accept: &str) -> io::Result<()> {
        self.send_get_with(host, path, accept, &[]).await
    }

    /// [`HttpConn::send_get`] with extra `(name, value)` headers (values must not hold
    /// line breaks; they come from the server's own headers).
    pub async fn send_get_with(
        &mut self,
        host: &str,
        path: &str,
        accept: &str,
        extra: &[(&str, &str)],
    ) -> io::Result<()> {
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nUser-Agent: loadgen\r\n");
        for (name, value) in extra {
            req.push_str(name);
            req.push_str(": ");
            req.push_str(value);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).await
    }

    /// Reads and parses the next response head.
    pub async fn read_head(&mut self) -> Result<ResponseHead, HttpError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = find_head_end(&self.pending, scanned) {
                let head = parse_head(&self.pending[..pos]);
                self.pending.drain(..pos);
                return head;
            }
            scanned = self.pending.len().saturating_sub(3);
            if self.pending.len() > MAX_HEAD_BYTES {
                return Err(HttpError::Malformed("head_too_long"));
            }
            let n = self.stream.read(&mut self.rbuf).await?;
            if n == 0 {
                return Err(HttpError::Eof);
            }
            self.pending.extend_from_slice(&self.rbuf[..n]);
        }
    }

    /// Decodes the next bytes of the body into `out` (which is cleared first): what is
    /// already buffered, else one read from the socket. `Ok(false)` once the body has
    /// ended (a read-until-close body ends at EOF; any other body may not).
    pub async fn read_body_some(
        &mut self,
        body: &mut BodyDecoder,
        out: &mut Vec<u8>,
    ) -> Result<bool, HttpError> {
        out.clear();
        if body.is_done() {
            return Ok(false);
        }
        if !self.pending.is_empty() {
            let used = body.decode(&self.pending, out)?;
            self.pending.drain(..used);
            return Ok(true);
        }
        let n = self.stream.read(&mut self.rbuf).await?;
        if n == 0 {
            return match body {
                BodyDecoder::Close => Ok(false),
                _ => Err(HttpError::Eof),
            };
        }
        let used = body.decode(&self.rbuf[..n], out)?;
        if used < n {
            self.pending.extend_from_slice(&self.rbuf[used..n]);
        }
        Ok(true)
    }

    /// Reads a whole body (at most `limit` bytes).
    pub async fn read_body(&mut self, head: &ResponseHead, limit: usize) -> Result<Vec<u8>, HttpError> {
        let mut body = BodyDecoder::for_head(head);
        let mut all = Vec::new();
        let mut part = Vec::new();
        while self.read_body_some(&mut body, &mut part).await? {
            all.extend_from_slice(&part);
            if all.len() > limit {
                return Err(HttpError::Malformed("body_too_long"));
            }
        }
        Ok(all)
    }
}

fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|p| from + p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.close);
        assert_eq!(h.content_type.as_deref(), Some("text/event-stream"));
        let h = parse_head(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!((h.status, h.framing, h.close), (400, Framing::Length(12), true));
        let h = parse_head(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!((h.framing, h.close), (Framing::Close, true));
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
        // An Nchan long-poll answer: the message id is in Last-Modified + Etag.
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nLast-Modified: Sun, 22 Nov 2026 13:32:34 GMT\r\n\
              Connection: keep-alive\r\nEtag: 1\r\n\r\n",
        )
        .unwrap();
        assert_eq!((h.framing, h.close), (Framing::Length(7), false));
        assert_eq!(h.last_modified.as_deref(), Some("Sun, 22 Nov 2026 13:32:34 GMT"));
        assert_eq!(h.etag.as_deref(), Some("1"));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n\r\nbody", 0), Some(19));
    }

    fn chunk(s: &str) -> Vec<u8> {
        format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
    }

    fn decode_split(stream: &[u8], split: usize) -> (Vec<u8>, bool, usize) {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let a = d.decode(&stream[..split], &mut out).unwrap();
        assert_eq!(a, split, "nothing left over before the end");
        let b = d.decode(&stream[split..], &mut out).unwrap();
        (out, d.is_done(), a + b)
    }

    #[test]
    fn chunked_any_split() {
        let mut body = chunk("retry: 3000\n: ok\n\ndata: x\n");
        body.extend_from_slice(b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT");
        for split in 0..body.len() - 4 {
            let (out, done, used) = decode_split(&body, split);
            assert_eq!(out, b"retry: 3000\n: ok\n\ndata: x\nhello", "split {split}");
            assert!(done);
            assert_eq!(&body[used..], b"NEXT");
        }
    }

    #[test]
    fn chunked_sse_into_parser() {
        // A server's SSE stream: first chunk opens the stream, later chunks carry events.
        let mut stream = chunk("retry: 3000\n: ok\n\n");
        stream.extend(chunk("data: {\"seq\":1}\n\n"));
        for split in 0..stream.len() {
            let mut d = ChunkedDecoder::new();
            let mut p = shared::sse::SseParser::new();
            let mut events = Vec::new();
            let mut out = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                out.clear();
                d.decode(part, &mut out).unwrap();
                events.extend(p.feed(&out));
            }
            assert_eq!(p.comments(), 1);
            assert_eq!(events.len(), 1, "split {split}");
            assert_eq!(events[0].data, "{\"seq\":1}");
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        let mut out = Vec::new();
        assert!(ChunkedDecoder::new().decode(b"zz\r\n", &mut out).is_err());
        assert!(ChunkedDecoder::new().decode(b"2\r\nabX", &mut out).is_err());
        assert!(ChunkedDecoder::new().decode(b"ffffffffffffffffff\r\n", &mut out).is_err());
    }

    #[test]
    fn sized_body() {
        let mut d = BodyDecoder::Length(3);
        let mut out = Vec::new();
        assert_eq!(d.decode(b"abcdef", &mut out).unwrap(), 3);
        assert!(d.is_done());
        assert_eq!(out, b"abc");
    }
}
