//! The public listener's accept loop: HTTP/1.1 with upgrades, one task per connection.
//!
//! Unlike `axum::serve`, every connection gets a [`ConnCtx`] in its request extensions
//! with a `close` token: the hub cancels it to cut off a slow consumer (after a short
//! grace for a final frame), and shutdown makes idle keep-alive connections close.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::Request,
    http::{HeaderValue, header},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{Instrument, debug, warn};

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

/// Serves `router` on `listener` until `shutdown`; connection tasks join `tracker`. A
/// client gets `header_timeout` to send each request head (slow-loris protection);
/// streams get `drain_window` to end themselves after shutdown. A client IP opening more
/// than `connect_rate_per_ip` connections a second (0: no limit) gets 429 instead.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    header_timeout: Duration,
    drain_window: Duration,
    connect_rate_per_ip: u32,
) {
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
        let router = router.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("conn", peer = %peer);
        tracker
            .spawn(serve_conn(stream, peer, router, shutdown, header_timeout, drain_window).instrument(span));
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

async fn serve_conn(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
    header_timeout: Duration,
    drain_window: Duration,
) {
    let ctx = ConnCtx { peer, close: CancellationToken::new() };
    let close = ctx.close.clone();
    let svc = tower::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ctx.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(err) = r { debug!(%err, "connection ended with an error") }
        }
        _ = close.cancelled() => {
            let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
        }
        _ = shutdown.cancelled() => {
            // Idle keep-alive connections close now; a streaming response ends itself
            // at its turn in the drain window.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(drain_window + CLOSE_GRACE * 2, conn.as_mut()).await;
        }
    }
}
