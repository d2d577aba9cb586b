//! A minimal HTTP/1.1 client over a socket we opened ourselves (so each connection can
//! have its own source address): write a GET by hand, parse the response head, and
//! decode the body (chunked, sized, or until close) incrementally. The reading side
//! works on any byte stream, e.g. the read half of a streaming `POST` whose body another
//! task writes.

mod body;
mod head;

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

pub use self::{
    body::BodyDecoder,
    head::{HttpError, MAX_HEAD_BYTES, ResponseHead, find_head_end, header, parse_head},
};

/// Read buffer per connection.
pub const READ_BUF: usize = 4 * 1024;

/// One HTTP/1.1 connection: requests written by hand, responses parsed incrementally.
#[derive(Debug)]
pub struct HttpConn<S = TcpStream> {
    stream: S,
    /// Bytes read but not yet consumed.
    pending: Vec<u8>,
    rbuf: Box<[u8]>,
}

impl<S> HttpConn<S> {
    /// Wraps a connected socket (or the read half of one).
    pub fn new(stream: S) -> Self {
        Self { stream, pending: Vec::new(), rbuf: vec![0; READ_BUF].into_boxed_slice() }
    }
}

impl<S: AsyncWrite + Unpin> HttpConn<S> {
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
}

impl<S: AsyncRead + Unpin> HttpConn<S> {
    /// Reads and parses the next response head. Cancel-safe: bytes read before a
    /// cancellation stay buffered for the next call.
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
