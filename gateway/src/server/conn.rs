//! One connection's life on the lean path: read a request head, answer it (a lean
//! route or the router), and hand the connection over when the answer says so — to an
//! endless stream, a held answer, a protocol switch, or hyper for everything else.

use std::{future::Future, net::SocketAddr, sync::Arc, task::Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::debug;

use super::{
    CLOSE_GRACE, ConnCtx, ConnSettings, LeanAnswer,
    http1::{self, Framing, Head},
    io::{self, Io, Prefixed},
    takeover::{Chunk, HeldBody, StreamBody, Takeover, UpgradeFn},
};
use crate::wire::chunk;

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
pub(super) fn serve_conn(
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
                    return Box::pin(super::fallback::serve_hyper(io, ctx, settings)).await;
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
        Ok(answer) => match answer.await {
            LeanAnswer::Open(head, takeover) => return taken_over(head, takeover, keep_alive),
            LeanAnswer::Answer(resp) => resp,
        },
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
        Some(takeover) => {
            // A held request's own headers never ask to close.
            let held = matches!(takeover, Takeover::Later(_));
            taken_over(http1::head_start(&parts, held), takeover, keep_alive)
        }
    }
}

/// Who serves the connection after a taken-over answer's head (`head`, from
/// [`http1::head_start`]): heads of streams and upgrades go out with the first chunk
/// or frame (one write); a held answer keeps its head's start as bytes, smaller than a
/// `HeaderMap`, for the wait.
fn taken_over(mut head: Vec<u8>, takeover: Takeover, keep_alive: bool) -> Next {
    match takeover {
        Takeover::Later(body) => Next::Later(head, body, keep_alive),
        Takeover::Stream(body) => {
            http1::head_end(&mut head, Framing::Chunked, false);
            Next::Stream(head, body)
        }
        Takeover::Upgrade(run) => {
            http1::head_end(&mut head, Framing::None, false);
            Next::Upgrade(run, head)
        }
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
/// of forever, so a client that stops reading cannot hold its connection; before that,
/// a write that takes no byte for `write_stall` fails ([`io::stalled`]). False when it
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
                r = io::write_all_bufs_within(io, bufs, settings.write_stall) => {
                    return r.map_err(|e| io::stalled(&e, close)).is_ok();
                }
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
                    let mut head = [0u8; chunk::MAX_HEADER];
                    write_bounded(&mut conn.io, &mut chunk::pieces(&data, &mut head), close, settings).await
                }
                Some(None) => {
                    let _ = write_bounded(&mut conn.io, &mut [chunk::LAST], close, settings).await;
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
            let mut size = [0u8; chunk::MAX_HEADER];
            let [size, data, trailer] = chunk::pieces(&data, &mut size);
            write_bounded(io, &mut [&head, size, data, trailer], close, settings).await
        }
        Some(None) => {
            let _ = write_bounded(io, &mut [&head, chunk::LAST], close, settings).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio_util::task::TaskTracker;

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
            write_stall: Duration::from_secs(1),
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
