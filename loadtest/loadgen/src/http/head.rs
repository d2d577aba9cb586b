//! Response heads: the status line and the headers loadgen reads (framing, keep-alive,
//! content type, Nchan's message id), and what can go wrong reading them.

use std::io;

/// Longest response head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

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

/// Where the head at the start of `buf` ends (just past its blank line), looking from `from` on.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|p| from + p + 4)
}

/// The value of header `name` (lower case) in a response head.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
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
}
