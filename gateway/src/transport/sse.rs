//! Server-Sent Events: `GET /sse?channel=a&channel=b[&format=json]`.
//!
//! The response is an endless `text/event-stream`. Each message is pre-encoded once per
//! format and shared; when several are queued they go out in one chunk. Heartbeat
//! comments keep proxies from timing the stream out. On shutdown the stream sends a
//! `retry:` hint and ends; a slow consumer is told why (`event: disconnect`) and cut off.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Extension,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{HeaderValue, header},
    response::Response,
};
use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ConnGuard, Query, check_channels, wait_ready};
use crate::{
    app::AppState,
    delivery::Delivery,
    error::ApiError,
    hub::{Inbox, Kick, Subscription, Transport},
    server::ConnCtx,
};

/// Most bytes coalesced into one chunk when messages queue up.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// `GET /sse`.
pub async fn handler(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = Query::parse(query.as_deref());
    let json = match query.get("format") {
        None | Some("") | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown format {}; use format=json or leave it out",
                crate::error::quote(other)
            )));
        }
    };
    let channels = check_channels(query.channels, &state.config.limits, true)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let close = ctx.map(|Extension(c)| c.close).unwrap_or_default();
    let (inbox, rx) = Inbox::new(Transport::Sse, state.config.limits.queue_size, close);
    let mut subs = Vec::with_capacity(channels.len());
    let mut readies = Vec::with_capacity(channels.len());
    for ch in &channels {
        let (sub, ready) = state.hub.subscribe(ch, &inbox);
        subs.push(sub);
        readies.push(ready);
    }
    wait_ready(readies).await;
    tracing::debug!(channels = channels.len(), "sse stream opened");
    let stream = SseStream {
        rx,
        inbox,
        _subs: subs,
        guard: ConnGuard::new(Transport::Sse),
        shutdown: state.shutdown.clone(),
        heartbeat: state.config.timers.sse_heartbeat,
        retry: state.config.timers.sse_retry,
        json,
        started: false,
        done: false,
    };
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), s))
    }));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

struct SseStream {
    rx: mpsc::Receiver<Arc<Delivery>>,
    inbox: Arc<Inbox>,
    _subs: Vec<Subscription>,
    guard: ConnGuard,
    shutdown: CancellationToken,
    heartbeat: Duration,
    retry: Duration,
    json: bool,
    started: bool,
    done: bool,
}

impl SseStream {
    fn encode(&self, d: &Delivery) -> Bytes {
        if self.json { d.sse_json() } else { d.sse().clone() }
    }

    /// The next chunk to write, or `None` when the stream ends.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            // Opens the stream at once (headers and a first byte reach the client) and
            // sets the reconnect delay.
            return Some(Bytes::from(format!("retry: {}\n: ok\n\n", self.retry.as_millis())));
        }
        tokio::select! {
            biased;
            _ = self.inbox.closed().cancelled() => {
                self.done = true;
                let (reason, message) = match self.inbox.kicked() {
                    Some(Kick::SlowConsumer) => {
                        ("slow_consumer", "the connection fell too far behind and was closed; reconnect")
                    }
                    None => ("server_closed", "the server closed the connection; reconnect"),
                };
                self.guard.set_reason(reason);
                Some(disconnect_event(reason, message))
            }
            _ = self.shutdown.cancelled() => {
                self.done = true;
                self.guard.set_reason("shutdown");
                let mut s = String::new();
                shared::sse::encode_retry(&mut s, self.retry.as_millis() as u64);
                let tail = disconnect_event("shutting_down", "this node is restarting; reconnect");
                Some(Bytes::from([s.as_bytes(), &tail].concat()))
            }
            d = self.rx.recv() => {
                let first = self.encode(d.as_deref()?);
                let Ok(next) = self.rx.try_recv() else { return Some(first) };
                let mut buf = BytesMut::with_capacity(first.len() * 2);
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&self.encode(&next));
                while buf.len() < MAX_BATCH_BYTES {
                    let Ok(d) = self.rx.try_recv() else { break };
                    buf.extend_from_slice(&self.encode(&d));
                }
                Some(buf.freeze())
            }
            _ = tokio::time::sleep(self.heartbeat) => Some(Bytes::from_static(b":\n\n")),
        }
    }
}

fn disconnect_event(reason: &str, message: &str) -> Bytes {
    let data = serde_json::json!({ "reason": reason, "message": message }).to_string();
    let mut s = String::new();
    shared::sse::encode_event(&mut s, None, Some("disconnect"), &data);
    Bytes::from(s)
}
