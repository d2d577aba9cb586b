//! A lean HTTP/1.1 path for what subscribers send: body-less `GET` requests.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer per connection for as long
//! as a response streams, which is most of an idle SSE or long-poll connection's memory.
//! Here a request head is read into a buffer that exists only while a head is being
//! read, parsed with `httparse`, answered by a lean route or the router, and the
//! response head written directly; an SSE stream, a held long-poll or a WebSocket
//! session then owns the bare socket. Anything else (a body, HTTP/1.0, another method) is handed to hyper with the
//! bytes read so far.

use std::{
    io::ErrorKind,
    task::{Context, Poll, ready},
};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version, header, response},
};
use tokio::{net::TcpStream, time::Instant};

use super::{MAX_HEADER_BYTES, io::write_all_bufs};

/// Most request headers accepted (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Bytes read per `read` call, on the stack.
const READ_CHUNK: usize = 4096;

/// One accepted connection on the lean path.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub io: TcpStream,
    /// Bytes read and not parsed yet (the start of the next request), usually empty.
    pub buf: Vec<u8>,
}

/// What reading a request head gave.
#[allow(clippy::large_enum_variant)] // short-lived: taken apart right after reading
pub enum Head {
    /// A body-less `GET` served here.
    Lean {
        /// The request, with an empty body.
        req: Request<Body>,
        /// False when the client asked to close after the answer.
        keep_alive: bool,
    },
    /// Anything else: hyper serves the connection from here on, starting with `buf`.
    Hyper,
    /// Answer this status (with `Connection: close`) and close.
    Reject(StatusCode),
    /// The client closed the connection, or sent nothing in time.
    Closed,
}

#[allow(clippy::large_enum_variant)] // short-lived, like `Head`
enum Parsed {
    Partial,
    NotLean,
    Done(Request<Body>, bool, usize),
    Bad(StatusCode),
}

impl Conn {
    /// Wraps an accepted socket.
    pub fn new(io: TcpStream) -> Self {
        Self { io, buf: Vec::new() }
    }

    /// Reads the next request head, until `deadline` (slow-loris protection).
    pub async fn read_head(&mut self, deadline: Instant) -> Head {
        loop {
            if !self.buf.is_empty() {
                match parse(&self.buf) {
                    Parsed::Done(req, keep_alive, used) => {
                        self.buf.drain(..used);
                        if self.buf.is_empty() {
                            // Don't keep the head's buffer for the connection's lifetime.
                            self.buf = Vec::new();
                        }
                        return Head::Lean { req, keep_alive };
                    }
                    Parsed::NotLean => return Head::Hyper,
                    Parsed::Bad(status) => return Head::Reject(status),
                    // What is buffered is all head: a head not complete within the
                    // limit is over it.
                    Parsed::Partial if self.buf.len() >= MAX_HEADER_BYTES => {
                        return Head::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                    }
                    Parsed::Partial => {}
                }
            }
            match tokio::time::timeout_at(deadline, read_some(&self.io, &mut self.buf)).await {
                Err(_) if self.buf.is_empty() => return Head::Closed,
                Err(_) => return Head::Reject(StatusCode::REQUEST_TIMEOUT),
                Ok(Ok(0)) | Ok(Err(_)) => return Head::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Resolves when the client closes its side (or the connection fails). With `keep`,
    /// bytes it sends meanwhile (a pipelined request) are kept in `buf` up to a head's
    /// limit; otherwise they are dropped (nothing can follow an endless response).
    pub fn poll_closed_by_client(&mut self, cx: &mut Context<'_>, keep: bool) -> Poll<()> {
        loop {
            if self.buf.len() > MAX_HEADER_BYTES {
                // Nothing more is read until the current response is done.
                return Poll::Pending;
            }
            match ready!(poll_read_some(&self.io, &mut self.buf, cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) if !keep => self.buf = Vec::new(),
                Ok(_) => {}
            }
        }
    }

    /// Writes a complete response: `head` (from [`encode_head`]) then `body`.
    pub async fn write_response(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<()> {
        write_all_bufs(&mut self.io, &mut [head, body]).await
    }
}

/// Reads once (after waiting until the socket is readable) and appends to `buf`.
async fn read_some(io: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_some(io, buf, cx)).await
}

/// Polls [`read_some`]: no future to keep, so a waiting connection stays small.
fn poll_read_some(io: &TcpStream, buf: &mut Vec<u8>, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    loop {
        ready!(io.poll_read_ready(cx))?;
        match try_read_into(io, buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

/// The read buffer lives on the stack, not in the connection's future.
fn try_read_into(io: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = io.try_read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // Once the method is known, anything but GET goes to hyper right away.
            return match req.method {
                Some(m) if m != "GET" => Parsed::NotLean,
                _ => Parsed::Partial,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Err(_) => return Parsed::Bad(StatusCode::BAD_REQUEST),
    };
    // A head that arrived whole in one read may be longer than the limit.
    if used > MAX_HEADER_BYTES {
        return Parsed::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return Parsed::NotLean;
    }
    // One copy of the head; the URI and every header value are slices of it (a copy
    // each was most of a request's allocations).
    let head = bytes::Bytes::copy_from_slice(&buf[..used]);
    // `part` is a slice of `buf` (httparse borrows from it): the same bytes of `head`.
    let shared = |part: &[u8]| {
        if part.is_empty() {
            return bytes::Bytes::new(); // may point anywhere
        }
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        head.slice(start..start + part.len())
    };
    let path = match req.path {
        Some(p) if !p.is_empty() => shared(p.as_bytes()),
        _ => bytes::Bytes::from_static(b"/"),
    };
    let Ok(uri) = Uri::from_maybe_shared(path) else { return Parsed::Bad(StatusCode::BAD_REQUEST) };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let value = shared(h.value);
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_maybe_shared(value))
        else {
            return Parsed::Bad(StatusCode::BAD_REQUEST);
        };
        if name == header::CONTENT_LENGTH {
            if value.as_bytes() != b"0" {
                return Parsed::NotLean;
            }
        } else if name == header::TRANSFER_ENCODING || name == header::EXPECT {
            return Parsed::NotLean;
        } else if name == header::CONNECTION && has_token(&value, "close") {
            keep_alive = false;
        }
        map.append(name, value);
    }
    if bad_host(Version::HTTP_11, &map) {
        return Parsed::Bad(StatusCode::BAD_REQUEST);
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    Parsed::Done(request, keep_alive, used)
}

/// Whether a request's `Host` is missing or repeated where HTTP/1.1 requires exactly
/// one (RFC 9112 §3.2: answered 400); HTTP/1.0 requests need none.
pub(super) fn bad_host(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11 && headers.get_all(header::HOST).iter().count() != 1
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// How the body after a response head is delimited.
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    /// `Content-Length`.
    Length(usize),
    /// `Transfer-Encoding: chunked` (an endless stream).
    Chunked,
    /// No body: `101 Switching Protocols`.
    None,
}

/// The bytes of a response head.
pub fn encode_head(parts: &response::Parts, framing: Framing, close: bool) -> Vec<u8> {
    let mut out = head_start(parts, close);
    head_end(&mut out, framing, close);
    out
}

/// The status line and the response's own headers (without `Connection` when the
/// connection closes after it): what a held response keeps instead of its `HeaderMap`.
pub fn head_start(parts: &response::Parts, close: bool) -> Vec<u8> {
    let mut out = lean_head(parts.status, []);
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::DATE {
            continue;
        }
        if close && name == header::CONNECTION {
            continue;
        }
        push_header(&mut out, name, value.as_bytes());
    }
    out
}

/// Starts a head without a `Response` (the lean routes): the `HTTP/1.1` status line and
/// these header fields, as [`head_start`] writes them; room is left for CORS, framing
/// and `Date`.
pub fn lean_head<'a>(
    status: StatusCode,
    headers: impl IntoIterator<Item = (&'a HeaderName, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(320);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        push_header(&mut out, name, value);
    }
    out
}

/// Appends one `name: value` line to a head being written.
pub fn push_header(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Ends a head begun with [`head_start`]: framing, `Connection: close`, `Date`.
pub fn head_end(out: &mut Vec<u8>, framing: Framing, close: bool) {
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// The head of a bare status answer with no body (a refused request head).
pub fn status_head(status: StatusCode) -> Vec<u8> {
    let (parts, _) = axum::http::Response::builder().status(status).body(()).expect("valid").into_parts();
    encode_head(&parts, Framing::Length(0), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(raw: &str) -> (Request<Body>, bool, usize) {
        match parse(raw.as_bytes()) {
            Parsed::Done(r, k, n) => (r, k, n),
            _ => panic!("not parsed: {raw:?}"),
        }
    }

    #[test]
    fn parses_a_get_and_leaves_what_follows() {
        let raw = "GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 5-0\r\n\r\nGET /";
        let (req, keep_alive, used) = done(raw);
        assert_eq!(req.uri().path(), "/sse");
        assert_eq!(req.uri().query(), Some("channel=a"));
        assert_eq!(req.headers()["last-event-id"], "5-0");
        assert!(keep_alive);
        assert_eq!(&raw[used..], "GET /");
    }

    #[test]
    fn header_values_and_the_uri_are_the_request_bytes() {
        let raw = "GET /ws?channel=a%20b&token=t HTTP/1.1\r\nHost: x:1\r\nX-Empty:\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nUpgrade: websocket\r\n\r\n";
        let (req, keep_alive, used) = done(raw);
        assert_eq!(used, raw.len());
        assert!(keep_alive);
        assert_eq!(req.uri().path(), "/ws");
        assert_eq!(req.uri().query(), Some("channel=a%20b&token=t"));
        assert_eq!(req.headers()["host"], "x:1");
        assert_eq!(req.headers()["x-empty"], "");
        assert_eq!(req.headers()["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(req.headers()["upgrade"], "websocket");
    }

    #[test]
    fn bodies_other_methods_and_http10_go_to_hyper() {
        for raw in [
            "POST /publish/a HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
            "POST /publish/a HTTP/1.1\r\ncontent-le",
            "GET /poll HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            "GET /poll HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /poll HTTP/1.0\r\n\r\n",
        ] {
            assert!(matches!(parse(raw.as_bytes()), Parsed::NotLean), "{raw:?}");
        }
    }

    #[test]
    fn close_partial_and_bad_heads() {
        assert!(!done("GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n").1);
        for raw in ["GET / HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"] {
            assert!(matches!(parse(raw.as_bytes()), Parsed::Bad(StatusCode::BAD_REQUEST)), "{raw:?}");
        }
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEADER_BYTES));
        assert!(matches!(parse(big.as_bytes()), Parsed::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)));
        assert!(matches!(parse(b"GET /sse HTTP/1.1\r\nHost"), Parsed::Partial));
        assert!(matches!(
            parse(b"GET /sse HTTP/1.1\r\nBad Header: x\r\n\r\n"),
            Parsed::Bad(StatusCode::BAD_REQUEST)
        ));
        let many = (0..200).map(|i| format!("x-{i}: v\r\n")).collect::<String>();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse(raw.as_bytes()), Parsed::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)));
    }

    #[test]
    fn response_heads_carry_framing_and_close() {
        let (mut parts, _) = axum::http::Response::new(()).into_parts();
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let head = String::from_utf8(encode_head(&parts, Framing::Chunked, true)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"), "{head}");
        assert!(head.contains("\r\ntransfer-encoding: chunked\r\nconnection: close\r\ndate: "), "{head}");
        assert!(!head.contains("99") && head.ends_with("\r\n\r\n"), "{head}");
    }
}
