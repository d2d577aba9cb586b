//! The public listener: the accept loop (with the per-IP connect rate limit) and one
//! task per connection, HTTP/1.1 with upgrades.
//!
//! Unlike `axum::serve`, every connection gets a [`ConnCtx`] with a `close` token: the
//! hub cancels it to cut off a slow consumer (after a short grace for a final frame),
//! and shutdown makes idle keep-alive connections close.
//!
//! - [`conn`]: a connection's life: subscribers' body-less `GET`s are read by
//!   [`http1`] and answered by a [`LeanRoute`] without the router; a subscription then
//!   hands the bare socket to its transport through a [`Takeover`], so an idle
//!   subscriber holds no HTTP buffers at all. Everything else goes to hyper
//!   (`fallback`).
//! - [`takeover`]: what a transport hands to the connection; [`io`]: the byte streams
//!   a connection can end up on; [`signal`]: cheap checks of rarely firing signals;
//!   [`Query`]: a request's query string.

mod conn;
mod fallback;
pub mod fdlimit;
mod http1;
pub mod io;
mod query;
pub mod signal;
pub mod takeover;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::Request,
    http::{HeaderValue, header},
    response::Response,
};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, warn};

pub use self::{
    http1::{lean_head, push_header},
    query::Query,
    takeover::{Chunk, HeldBody, Opened, StreamBody, Takeover, UpgradeFn, UpgradedSession},
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
pub type LeanRoute = Arc<dyn Fn(Request, &ConnCtx) -> Result<LeanFuture, Request> + Send + Sync>;

/// The answer of a [`LeanRoute`], once its session is open (or refused).
pub type LeanFuture = Pin<Box<dyn Future<Output = LeanAnswer> + Send>>;

/// What a [`LeanRoute`] answers.
pub enum LeanAnswer {
    /// An opened session: the start of its head (the status line and header fields,
    /// as [`lean_head`] writes them; the connection adds framing and `Date`) and what
    /// follows it.
    Open(Vec<u8>, Takeover),
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

/// Settings every connection task needs, shared.
struct ConnSettings {
    router: Router,
    lean: Option<LeanRoute>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    drain_window: Duration,
    /// Longest a write may take no byte before the connection is given up on.
    write_stall: Duration,
}

/// Serves `routes` on `listener` until `shutdown`; connection tasks join `tracker`. A
/// client gets `header_timeout` to send each request head (slow-loris protection);
/// streams get `drain_window` to end themselves after shutdown; a write on the lean path
/// (an SSE stream, a long-poll or any other answer) that takes no byte for `write_stall`
/// closes the connection (a client that stopped reading). A client IP opening more than
/// `connect_rate_per_ip` connections a second (0: no limit) gets 429 instead.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    drain_window: Duration,
    write_stall: Duration,
    connect_rate_per_ip: u32,
) {
    let settings = Arc::new(ConnSettings {
        router: routes.router,
        lean: routes.lean,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        header_timeout,
        drain_window,
        write_stall,
    });
    // Only this loop touches it: no lock needed.
    let mut per_ip = crate::ratelimit::Buckets::<std::net::IpAddr>::new(connect_rate_per_ip);
    // Failed accepts since the last warning (at most one a second).
    let (mut failed, mut warned) = (0u64, None::<std::time::Instant>);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning,
                    // and say so once a second, not twenty times.
                    failed += 1;
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        warn!(%err, failed, "accept failed (out of file descriptors? see `ulimit -Hn`)");
                        (failed, warned) = (0, Some(std::time::Instant::now()));
                    }
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
        tracker.spawn(conn::serve_conn(stream, peer, settings.clone()).instrument(span));
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
