//! How a subscriber's answer leaves the request/response world: an [`Opened`] session
//! names its response head and a [`Takeover`] — an endless stream, a body known later,
//! or a protocol switch — that the connection itself serves, so nothing of the router
//! or of hyper stays allocated while a subscriber idles.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::Stream;

use super::io::Io;
use crate::wire::chunk;

/// An endless body (SSE), written chunk by chunk as it comes.
pub type StreamBody = Pin<Box<dyn Stream<Item = Chunk> + Send>>;

/// A body known later (a held long-poll).
pub type HeldBody = Pin<Box<dyn Future<Output = Bytes> + Send>>;

/// Runs a session on a connection that switched protocols: it gets the connection, any
/// bytes the client sent after its request head, and the `101` head to write first
/// (empty when it is out already), so the head can go out with the first frame.
pub type UpgradeFn = Box<dyn FnOnce(Io, Bytes, Vec<u8>) -> UpgradedSession + Send>;

/// What runs on an upgraded connection until it ends.
pub type UpgradedSession = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a handler hands to the connection instead of an ordinary body: the connection
/// (not the router) then serves the rest. Attach it to a response with
/// [`Takeover::attach`].
pub enum Takeover {
    /// An endless body (SSE): each item is written as it comes (chunked).
    Stream(StreamBody),
    /// A body that is known later (a held long-poll).
    Later(HeldBody),
    /// The connection switches protocols (WebSocket) after a `101` head.
    Upgrade(UpgradeFn),
}

impl Takeover {
    /// Attaches this takeover to `resp`, whose own body is then ignored.
    pub fn attach(self, resp: &mut Response) {
        resp.extensions_mut().insert(TakeoverSlot(Arc::new(Mutex::new(Some(self)))));
    }

    /// The takeover attached to a response, if any.
    pub fn take(ext: &mut axum::http::Extensions) -> Option<Self> {
        ext.remove::<TakeoverSlot>()?.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Response extensions must be `Clone + Sync`; the takeover is taken out exactly once.
#[derive(Clone)]
struct TakeoverSlot(Arc<Mutex<Option<Takeover>>>);

/// A piece of an endless body ([`Takeover::Stream`]).
#[derive(Debug)]
pub enum Chunk {
    /// Bytes to send as one chunk.
    Data(Bytes),
    /// A whole HTTP/1.1 chunk (`<hex>\r\n<data>\r\n`), framed once and shared by every
    /// connection that sends it: written as is, with one `write`.
    Framed(Bytes),
}

impl Chunk {
    /// The data, without chunk framing (for hyper, which frames it itself).
    pub fn into_data(self) -> Bytes {
        match self {
            Chunk::Data(data) => data,
            Chunk::Framed(framed) => chunk::data(&framed),
        }
    }
}

/// A subscriber session a transport opened: the status and header fields of its
/// response head (its fixed ones, and at most one computed per request), and what the
/// connection serves after the head. The routes add CORS and framing.
pub struct Opened {
    /// Status of the answer (`200`, or `101` for an upgrade).
    pub status: StatusCode,
    /// The transport's fixed header fields.
    pub headers: &'static [(HeaderName, HeaderValue)],
    /// A header field computed for this request (e.g. `Sec-WebSocket-Accept`).
    pub extra: Option<(HeaderName, HeaderValue)>,
    /// What follows the head.
    pub body: Takeover,
}

impl Opened {
    /// The header fields, fixed ones first.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.headers.iter().chain(&self.extra).map(|(n, v)| (n, v))
    }
}

impl IntoResponse for Opened {
    fn into_response(self) -> Response {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        for (name, value) in self.headers.iter().chain(&self.extra) {
            h.insert(name, value.clone());
        }
        self.body.attach(&mut resp);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_chunk_gives_back_its_data() {
        let framed = chunk::frame(b"data: x\n\n");
        assert_eq!(&Chunk::Framed(framed).into_data()[..], b"data: x\n\n");
        assert_eq!(&Chunk::Data(Bytes::from_static(b"y")).into_data()[..], b"y");
    }
}
