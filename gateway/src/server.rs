//! The public listener's accept loop: HTTP/1.1 with upgrades, one task per connection.
//!
//! Unlike `axum::serve`, every connection gets a [`ConnCtx`] in its request extensions
//! with a `close` token: the hub cancels it to cut off a slow consumer (after a short
//! grace for a final frame), and shutdown makes idle keep-alive connections close.
//!
//! Subscribers' requests (body-less `GET`s) are read and answered by `http1` without
//! hyper, and a subscription response hands the bare socket to its transport through a
//! [`Takeover`]: an idle subscriber then holds no HTTP buffers at all. Subscribers'
//! requests there skip the router too ([`LeanRoute`]). Everything else goes to hyper.

mod http1;
pub mod io;
pub mod signal;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{Instrument, debug, warn};

use self::{
    http1::{Framing, Head},
    io::{Io, Prefixed},
};

/// Longest request head accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Time a closed connection gets to flush its final frame before the socket is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Pending connections the kernel queues before `accept` (the default 128 overflows
/// under connection bursts: clients then wait a full SYN retry, about a second).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Per-connection context handed to handlers.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    /// The client's address.
    pub peer: SocketAddr,
    /// Cancel to close this HTTP connection (after [`CLOSE_GRACE`]).
    pub close: CancellationToken,
}

/// A route the lean path answers without the router; a request that is not its own is
/// handed back. Used for subscribers (WebSocket upgrades, SSE streams, long-polls),
/// which need none of the router's request and response types.
pub type LeanRoute = Arc<dyn Fn(Request, &ConnCtx) -> Result<Lean, Request> + Send + Sync>;

pub use self::http1::{lean_head, push_header};

/// An endless body (SSE), written chunk by chunk as it comes.
pub type StreamBody = Pin<Box<dyn Stream<Item = Chunk> + Send>>;

/// A body known later (a held long-poll).
pub type HeldBody = Pin<Box<dyn Future<Output = Bytes> + Send>>;

/// When a [`LeanRoute`] answers.
pub enum Lean {
    /// At once.
    Now(LeanAnswer),
    /// Once this future is done (a subscription waiting for its broker).
    Later(Pin<Box<dyn Future<Output = LeanAnswer> + Send>>),
}

/// What a [`LeanRoute`] answers. Heads are the status line and headers, as
/// [`http1::head_start`] makes them; the connection adds framing and `Date`.
pub enum LeanAnswer {
    /// Switch protocols: the session, and the start of the `101` head.
    Upgrade(UpgradeFn, Vec<u8>),
    /// An endless chunked body after this head start.
    Stream(Vec<u8>, StreamBody),
    /// A body known once this future is done (a held long-poll), after this head start.
    Held(Vec<u8>, HeldBody),
    /// Answer this response (a refused request).
    Answer(Response),
}

/// What the public listener serves.
pub struct Routes {
    /// Every request.
    pub router: Router,
    /// Tried first for requests on the lean path.
    pub lean: Option<LeanRoute>,
}

/// Serves `routes` on `listener` until `shutdown`; connection tasks join `tracker`. A
/// client gets `header_timeout` to send each request head (slow-loris protection);
/// streams get `drain_window` to end themselves after shutdown. A client IP opening more
/// than `connect_rate_per_ip` connections a second (0: no limit) gets 429 instead.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    drain_window: Duration,
    connect_rate_per_ip: u32,
) {
    let settings = Arc::new(ConnSettings {
        router: routes.router,
        lean: routes.lean,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        header_timeout,
        drain_window,
    });
    // Only this loop touches it: no lock needed.
    let mut per_ip = crate::ratelimit::Buckets::<std::net::IpAddr>::new(connect_rate_per_ip);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if !per_ip.take(peer.ip(), 1, std::time::Instant::now()) {
            debug!(%peer, "connect rate limit");
            tracker.spawn(refuse_rate_limited(stream, header_timeout, connect_rate_per_ip));
            continue;
        }
        let span = tracing::debug_span!("conn", peer = %peer);
        tracker.spawn(serve_conn(stream, peer, settings.clone()).instrument(span));
    }
}

/// Answers the connection's first request with 429 `rate_limited` and closes it.
async fn refuse_rate_limited(stream: tokio::net::TcpStream, header_timeout: Duration, rate: u32) {
    use axum::response::IntoResponse;
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let mut r = crate::error::ApiError::rate_limited(
            "connect_rate",
            format!("more than {rate} new connections a second from this address; retry shortly"),
        )
        .into_response();
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        std::future::ready(Ok::<_, std::convert::Infallible>(r))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    if let Err(err) = tokio::time::timeout(header_timeout + CLOSE_GRACE, conn).await.unwrap_or(Ok(())) {
        debug!(%err, "refused connection ended with an error");
    }
}

/// What a handler hands to the connection instead of an ordinary body: the connection
/// (not the router) then serves the rest, so nothing of the router or of hyper stays
/// allocated while a subscriber idles. Attach it with [`Takeover::attach`].
pub enum Takeover {
    /// An endless body (SSE): each item is written as it comes (chunked).
    Stream(StreamBody),
    /// A body that is known later (a held long-poll).
    Later(HeldBody),
    /// The connection switches protocols (WebSocket) after a `101` head: the function
    /// gets the connection, any bytes the client sent after its request head, and the
    /// `101` head to write.
    Upgrade(UpgradeFn),
}

/// Runs a session on a connection that switched protocols: it gets the connection, any
/// bytes the client sent after its request head, and the `101` head to write first
/// (empty when it is out already), so the head can go out with the first frame.
pub type UpgradeFn = Box<dyn FnOnce(Io, Bytes, Vec<u8>) -> UpgradedSession + Send>;

/// What runs on an upgraded connection until it ends.
pub type UpgradedSession = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Takeover {
    /// Attaches this takeover to `resp`, whose own body is then ignored.
    pub fn attach(self, resp: &mut Response) {
        resp.extensions_mut().insert(TakeoverSlot(Arc::new(Mutex::new(Some(self)))));
    }

    fn take(ext: &mut axum::http::Extensions) -> Option<Self> {
        ext.remove::<TakeoverSlot>()?.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

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
            Chunk::Framed(framed) => {
                let start = framed.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
                framed.slice(start.min(framed.len())..framed.len().saturating_sub(2).max(start))
            }
        }
    }
}

/// Response extensions must be `Clone + Sync`; the takeover is taken out exactly once.
#[derive(Clone)]
struct TakeoverSlot(Arc<Mutex<Option<Takeover>>>);

/// Settings every connection task needs, shared.
struct ConnSettings {
    router: Router,
    lean: Option<LeanRoute>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    drain_window: Duration,
}

/// What a connection does after a request was read and answered (or taken over).
enum Next {
    /// Read the next request.
    KeepAlive,
    /// Close the connection.
    Close,
    /// hyper serves the rest of the connection.
    Hyper,
    /// Hold the request until its body is ready, then answer it (long-poll).
    /// `.0` is the start of the response head ([`http1::head_start`]).
    Later(Vec<u8>, HeldBody, bool),
    /// Write this head and endless body.
    Stream(Vec<u8>, StreamBody),
    /// Run this session on the connection; it writes the `101` head (`.1`).
    Upgrade(UpgradeFn, Vec<u8>),
}

/// Serves one connection: body-less `GET`s (what subscribers send) on the lean path,
/// and the connection's first other request and everything after it with hyper.
///
/// This future lives as long as the connection, so everything a request needs only
/// briefly (parsing, routing, writing) runs in boxed futures that are gone once done.
// Not an `async fn`, which would store its arguments twice in the future.
fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<ConnSettings>,
) -> impl Future<Output = ()> + Send {
    let ctx = ConnCtx { peer, close: CancellationToken::new() };
    let mut conn = http1::Conn::new(stream);
    async move {
        loop {
            match Box::pin(answer(&mut conn, &ctx, &settings)).await {
                Next::KeepAlive => {}
                Next::Close => return,
                Next::Hyper => {
                    let io = Prefixed::new(Bytes::from(std::mem::take(&mut conn.buf)), conn.io);
                    return Box::pin(serve_hyper(io, ctx, settings)).await;
                }
                Next::Stream(head, body) => {
                    return Box::pin(serve_stream(conn, head, body, &ctx.close, &settings)).await;
                }
                Next::Upgrade(run, head) => {
                    let http1::Conn { io, buf } = conn;
                    return run(Io::Tcp(io), Bytes::from(buf), head).await;
                }
                Next::Later(head, body, keep_alive) => {
                    if !Box::pin(answer_later(&mut conn, head, body, keep_alive, &ctx, &settings)).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Waits for a held request's body, then answers; false when the connection must close
/// (also when the client went away meanwhile).
async fn answer_later(
    conn: &mut http1::Conn,
    head: Vec<u8>,
    body: HeldBody,
    keep_alive: bool,
    ctx: &ConnCtx,
    settings: &ConnSettings,
) -> bool {
    let mut body = body;
    let body = std::future::poll_fn(|cx| {
        if let Poll::Ready(b) = body.as_mut().poll(cx) {
            return Poll::Ready(Some(b));
        }
        conn.poll_closed_by_client(cx, true).map(|()| None)
    })
    .await;
    match body {
        Some(body) => respond(conn, head, body, keep_alive, ctx, settings).await,
        None => false, // the client went away
    }
}

/// Reads one request and answers it, or says who takes the connection over.
async fn answer(conn: &mut http1::Conn, ctx: &ConnCtx, settings: &ConnSettings) -> Next {
    let deadline = tokio::time::Instant::now() + settings.header_timeout;
    let head = tokio::select! {
        biased;
        // Idle keep-alive connections close at shutdown.
        _ = settings.shutdown.cancelled() => return Next::Close,
        head = conn.read_head(deadline) => head,
    };
    let (req, keep_alive) = match head {
        Head::Lean { req, keep_alive } => (req, keep_alive),
        Head::Hyper => return Next::Hyper,
        Head::Reject(status) => {
            let head = http1::status_head(status);
            let _ = tokio::time::timeout(CLOSE_GRACE, conn.write_response(&head, &[])).await;
            return Next::Close;
        }
        Head::Closed => return Next::Close,
    };
    let lean = match &settings.lean {
        Some(lean) => lean(req, ctx),
        None => Err(req),
    };
    let resp = match lean {
        Ok(lean) => {
            let answer = match lean {
                Lean::Now(answer) => answer,
                Lean::Later(later) => later.await,
            };
            match answer {
                LeanAnswer::Upgrade(run, mut head) => {
                    http1::head_end(&mut head, Framing::None, false);
                    return Next::Upgrade(run, head);
                }
                LeanAnswer::Stream(mut head, body) => {
                    http1::head_end(&mut head, Framing::Chunked, false);
                    return Next::Stream(head, body);
                }
                LeanAnswer::Held(head, body) => return Next::Later(head, body, keep_alive),
                LeanAnswer::Answer(resp) => resp,
            }
        }
        Err(mut req) => {
            req.extensions_mut().insert(ctx.clone());
            let Ok(resp) = settings.router.clone().oneshot(req).await;
            resp
        }
    };
    let (mut parts, body) = resp.into_parts();
    match Takeover::take(&mut parts.extensions) {
        None => match http_body_util::BodyExt::collect(body).await {
            Ok(body) => {
                let head = http1::head_start(&parts, true);
                let ok = respond(conn, head, body.to_bytes(), keep_alive, ctx, settings).await;
                if ok { Next::KeepAlive } else { Next::Close }
            }
            Err(err) => {
                debug!(%err, "response body failed");
                Next::Close
            }
        },
        // The head's start as bytes: smaller than the `HeaderMap` for the wait. A held
        // request's own headers never ask to close.
        Some(Takeover::Later(body)) => Next::Later(http1::head_start(&parts, true), body, keep_alive),
        // Heads of streams and upgrades go out with the first chunk or frame: one write.
        Some(Takeover::Stream(body)) => {
            Next::Stream(http1::encode_head(&parts, Framing::Chunked, false), body)
        }
        Some(Takeover::Upgrade(run)) => Next::Upgrade(run, http1::encode_head(&parts, Framing::None, false)),
    }
}

/// Writes a whole response (`head` from [`http1::head_start`]); false when the
/// connection must close after it.
async fn respond(
    conn: &mut http1::Conn,
    mut head: Vec<u8>,
    body: Bytes,
    keep_alive: bool,
    ctx: &ConnCtx,
    settings: &ConnSettings,
) -> bool {
    let close = !keep_alive || settings.shutdown.is_cancelled() || ctx.close.is_cancelled();
    http1::head_end(&mut head, Framing::Length(body.len()), close);
    write_bounded(&mut conn.io, &mut [&head, &body], &ctx.close, settings).await && !close
}

/// Writes `bufs`; once the connection is closed by the hub or the node shuts down, a
/// write that waits gets a bounded time ([`CLOSE_GRACE`], or the drain window) instead
/// of forever, so a client that stops reading cannot hold its connection. False when it
/// failed.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn write_bounded<'a>(
    io: &'a mut TcpStream,
    bufs: &'a mut [&[u8]],
    close: &'a CancellationToken,
    settings: &'a ConnSettings,
) -> impl Future<Output = bool> + Send + 'a {
    async move {
        // Most writes finish at once; only one that has to wait watches the signals, in
        // a boxed future, so a connection's state stays small.
        if let Poll::Ready(r) = io::write_now(io, bufs).await {
            return r.is_ok();
        }
        Box::pin(async move {
            let limit = tokio::select! {
                biased;
                r = io::write_all_bufs(io, bufs) => return r.is_ok(),
                _ = close.cancelled() => CLOSE_GRACE,
                _ = settings.shutdown.cancelled() => settings.drain_window + CLOSE_GRACE * 2,
            };
            // `bufs` was advanced past what went out: write the rest.
            matches!(tokio::time::timeout(limit, io::write_all_bufs(io, bufs)).await, Ok(Ok(())))
        })
        .await
    }
}

/// Writes `head`, then an endless body as chunks until it ends or the client goes away.
#[allow(clippy::manual_async_fn)] // an `async fn` would store the connection twice
fn serve_stream<'a>(
    mut conn: http1::Conn,
    head: Vec<u8>,
    mut body: StreamBody,
    close: &'a CancellationToken,
    settings: &'a ConnSettings,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        if !Box::pin(write_stream_head(&mut conn.io, head, &mut body, close, settings)).await {
            return;
        }
        loop {
            let next = std::future::poll_fn(|cx| {
                if let Poll::Ready(chunk) = body.as_mut().poll_next(cx) {
                    return Poll::Ready(Some(chunk));
                }
                conn.poll_closed_by_client(cx, false).map(|()| None)
            })
            .await;
            let ok = match next {
                None => return, // the client went away
                Some(Some(Chunk::Framed(framed))) => {
                    write_bounded(&mut conn.io, &mut [&framed], close, settings).await
                }
                Some(Some(Chunk::Data(data))) => {
                    let mut size = [0u8; 18];
                    let n = io::chunk_header(data.len(), &mut size);
                    write_bounded(&mut conn.io, &mut [&size[..n], &data, b"\r\n"], close, settings).await
                }
                Some(None) => {
                    let _ = write_bounded(&mut conn.io, &mut [b"0\r\n\r\n"], close, settings).await;
                    return;
                }
            };
            if !ok {
                return;
            }
        }
    }
}

/// Writes a stream's head, together with its first chunk when that is ready at once (a
/// subscription comment usually is): one write instead of two per new subscriber.
/// False when the connection must close. (The chunk framing mirrors `serve_stream`'s loop,
/// which writes inline on purpose: a shared helper's state made every stream's
/// long-lived future 168 bytes bigger.)
async fn write_stream_head(
    io: &mut TcpStream,
    head: Vec<u8>,
    body: &mut StreamBody,
    close: &CancellationToken,
    settings: &ConnSettings,
) -> bool {
    match futures_util::FutureExt::now_or_never(body.next()) {
        None => write_bounded(io, &mut [&head], close, settings).await,
        Some(Some(Chunk::Framed(framed))) => write_bounded(io, &mut [&head, &framed], close, settings).await,
        Some(Some(Chunk::Data(data))) => {
            let mut size = [0u8; 18];
            let n = io::chunk_header(data.len(), &mut size);
            write_bounded(io, &mut [&head, &size[..n], &data, b"\r\n"], close, settings).await
        }
        Some(None) => {
            let _ = write_bounded(io, &mut [&head, b"0\r\n\r\n"], close, settings).await;
            false
        }
    }
}

/// Serves the rest of a connection with hyper (requests with bodies, HTTP/1.0, ...).
async fn serve_hyper(io: Prefixed, ctx: ConnCtx, settings: Arc<ConnSettings>) {
    let close = ctx.close.clone();
    let svc_settings = settings.clone();
    let svc = tower::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ctx.clone());
        let upgrade = req.headers().contains_key(header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
        let settings = svc_settings.clone();
        async move {
            let Ok(mut resp) = settings.router.clone().oneshot(req.map(Body::new)).await;
            let takeover = Takeover::take(resp.extensions_mut());
            if matches!(takeover, Some(Takeover::Stream(_) | Takeover::Later(_))) {
                // The router sized the placeholder body; the real one comes later.
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            match takeover {
                None => {}
                Some(Takeover::Stream(body)) => {
                    *resp.body_mut() = Body::from_stream(body.map(|c| Ok::<_, Infallible>(c.into_data())));
                }
                Some(Takeover::Later(body)) => {
                    let once = futures_util::stream::once(body).map(Ok::<_, Infallible>);
                    *resp.body_mut() = Body::from_stream(once);
                }
                Some(Takeover::Upgrade(run)) => match upgrade {
                    Some(upgrade) => {
                        let session = async move {
                            match upgrade.await {
                                Ok(upgraded) => {
                                    run(Io::Upgraded(TokioIo::new(upgraded)), Bytes::new(), Vec::new()).await
                                }
                                Err(err) => debug!(%err, "upgrade failed"),
                            }
                        };
                        settings.tracker.spawn(session.in_current_span());
                    }
                    None => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
                },
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc)).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(err) = r { debug!(%err, "connection ended with an error") }
        }
        _ = close.cancelled() => {
            let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
        }
        _ = settings.shutdown.cancelled() => {
            // Idle keep-alive connections close now; a streaming response ends itself
            // at its turn in the drain window.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(settings.drain_window + CLOSE_GRACE * 2, conn.as_mut()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These futures live as long as their connection, so their size is part of every
    /// idle connection's memory. The bounds are loose (compilers differ) but catch a
    /// request-scoped future inlined into them by mistake.
    #[tokio::test]
    async fn long_lived_connection_futures_stay_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Arc::new(ConnSettings {
            router: Router::new(),
            lean: None,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            header_timeout: Duration::from_secs(1),
            drain_window: Duration::from_secs(1),
        });
        let ctx = ConnCtx { peer: addr, close: CancellationToken::new() };
        let conn = http1::Conn::new(TcpStream::connect(addr).await.unwrap());
        let stream = serve_stream(
            conn,
            Vec::new(),
            Box::pin(futures_util::stream::empty::<Chunk>()),
            &ctx.close,
            &settings,
        );
        assert!(std::mem::size_of_val(&stream) <= 512, "serve_stream: {}", std::mem::size_of_val(&stream));
        let conn = serve_conn(TcpStream::connect(addr).await.unwrap(), addr, settings.clone());
        assert!(std::mem::size_of_val(&conn) <= 384, "serve_conn: {}", std::mem::size_of_val(&conn));
    }
}
