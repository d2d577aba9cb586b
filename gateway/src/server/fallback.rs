//! The rest of a connection served by hyper: requests with bodies (publishing),
//! HTTP/1.0, and anything after them on the same connection. Subscriber answers that
//! take the connection over work here too, through hyper's own bodies and upgrades.

use std::{convert::Infallible, sync::Arc};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    response::IntoResponse,
};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tower::ServiceExt;
use tracing::{Instrument, debug};

use super::{
    CLOSE_GRACE, ConnCtx, ConnSettings, MAX_HEADER_BYTES,
    io::{Io, Prefixed},
    takeover::Takeover,
};
use crate::error::ApiError;

/// Serves the rest of a connection with hyper (requests with bodies, HTTP/1.0, ...).
pub(super) async fn serve_hyper(io: Prefixed, ctx: ConnCtx, settings: Arc<ConnSettings>) {
    let close = ctx.close.clone();
    let svc_settings = settings.clone();
    let svc = tower::service_fn(move |mut req: Request<Incoming>| {
        // The same Host rule as the lean path (hyper does not check it).
        let bad_host = super::http1::bad_host(req.version(), req.headers());
        req.extensions_mut().insert(ctx.clone());
        let upgrade = req.headers().contains_key(header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
        let settings = svc_settings.clone();
        async move {
            if bad_host {
                let mut resp = ApiError::bad_request("an HTTP/1.1 request needs exactly one Host header")
                    .into_response();
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(resp);
            }
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
