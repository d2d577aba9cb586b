//! Server-Sent Events: `GET /sse?channel=a&channel=b[&format=json]`.
//!
//! The response is an endless `text/event-stream`. Each message is pre-encoded once per
//! format and shared; when several are queued they go out in one chunk. Heartbeat
//! comments keep proxies from timing the stream out. On shutdown the stream sends a
//! `retry:` hint and ends; a slow consumer is told why (`event: disconnect`) and cut off.
//!
//! The stream is a [`Takeover::Stream`]: the connection writes it on the bare socket,
//! and a single message goes out as its shared, already framed HTTP chunk.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::Bytes,
    http::{HeaderValue, StatusCode, header, request::Parts},
};
use bytes::BytesMut;
use futures_util::Stream;
use shared::StreamPos;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::{ConnGuard, DrainTurn, Positions, check_channels, drain_turn, parse_resume};
use crate::{
    error::ApiError,
    hub::{Delivery, Hub, Inbox, InboxRx, Kick, Replay, Subscription},
    metrics::ConnKind,
    server::{Chunk, ConnCtx, Opened, Query, Takeover, signal::Quiet},
    state::AppState,
};

/// Most bytes coalesced into one chunk when messages queue up.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Deliveries are checked for before the other signals; every this many turns the
/// signals come first, so a flood of messages cannot hide a drain or an expiry.
const SIGNALS_EVERY: u32 = 16;

/// The response header fields of a stream.
static STREAM_HEADERS: [(header::HeaderName, HeaderValue); 3] = [
    (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8")),
    (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    (header::HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no")),
];

/// `GET /sse`: checks a stream request (resume id, format, channels, token, capacity),
/// subscribes, waits until the subscriptions are live, reads what a resuming client
/// missed, and opens the stream.
pub async fn open(state: &AppState, req: &Parts, ctx: &ConnCtx) -> Result<Opened, ApiError> {
    let headers = &req.headers;
    let mut query = Query::parse(req.uri.query());
    let resume =
        match headers.get("last-event-id").and_then(|v| v.to_str().ok()).or(query.get("last_event_id")) {
            Some(id) if !id.trim().is_empty() => Some(parse_resume(id)?),
            _ => None,
        };
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
    let channels = check_channels(std::mem::take(&mut query.channels), &state.config.limits, true)?;
    let claims = state.authorize(headers, query.get("token"), &channels)?;
    super::admit(state.config.limits.max_connections)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let hub = &state.hub;
    let (inbox, rx) = Inbox::new(ConnKind::Sse, &state.config.limits, ctx.close.clone());
    let subs: Vec<Subscription> = channels.iter().map(|ch| hub.subscribe(ch, &inbox)).collect();
    hub.wait_ready(&subs).await;
    // Resume: what each channel missed since the client's last id, read by the stream
    // a page at a time once the live subscription is in place, so nothing falls in
    // between and a long gap is never held whole.
    let replay = resume.as_ref().and_then(|resume| {
        let todo: VecDeque<_> = subs
            .iter()
            .filter_map(|sub| {
                resume.for_channel(sub.channel()).map(|from| (sub.channel().clone(), from, true))
            })
            .collect();
        (!todo.is_empty()).then(|| Box::new(Replaying { hub: hub.clone(), todo, reading: None }))
    });
    tracing::debug!(channels = channels.len(), resumed = resume.is_some(), "sse stream opened");
    let inbox_closed = inbox.closed().clone().cancelled_owned();
    let stream = SseStream {
        multi: channels.len() > 1,
        positions: Positions::default(),
        replay,
        rx,
        inbox,
        _subs: subs,
        guard: ConnGuard::new(ConnKind::Sse),
        closed: Quiet::new(Box::pin(inbox_closed)),
        shutdown_wait: Quiet::new(drain_turn(state.shutdown.clone(), state.config.timers.drain_window)),
        beat: Box::pin(tokio::time::sleep(state.config.timers.sse_heartbeat)),
        last_write: tokio::time::Instant::now(),
        expiry: claims.map(|c| Box::pin(tokio::time::sleep(c.remaining()))),
        heartbeat: state.config.timers.sse_heartbeat,
        retry: state.config.timers.sse_retry,
        json,
        started: false,
        done: false,
        turns: 0,
    };
    Ok(Opened {
        status: StatusCode::OK,
        headers: &STREAM_HEADERS,
        extra: None,
        body: Takeover::Stream(Box::pin(stream)),
    })
}

struct SseStream {
    /// Several channels: ids are compound (`chan~pos,...`), written per connection.
    multi: bool,
    positions: Positions,
    /// A resume in progress: history, sent before live messages.
    replay: Option<Box<Replaying>>,
    rx: InboxRx,
    inbox: Arc<Inbox>,
    _subs: Vec<Subscription>,
    guard: ConnGuard,
    /// Kept across chunks: re-creating these futures per message registers a waiter
    /// or a timer each time.
    closed: Quiet<Pin<Box<WaitForCancellationFutureOwned>>>,
    shutdown_wait: Quiet<DrainTurn>,
    beat: Pin<Box<Sleep>>,
    /// A heartbeat is due `heartbeat` after the last write, whatever it was.
    last_write: Instant,
    /// When the subscriber's token expires (auth on): the stream ends then.
    expiry: Option<Pin<Box<Sleep>>>,
    heartbeat: Duration,
    retry: Duration,
    json: bool,
    started: bool,
    done: bool,
    /// Counts polls, for [`SIGNALS_EVERY`].
    turns: u32,
}

impl SseStream {
    /// The bytes for `d`, or `None` when it repeats something already sent.
    fn encode(&mut self, d: &Delivery) -> Option<Bytes> {
        if !self.positions.accept(d) {
            return None;
        }
        Some(self.encode_accepted(d))
    }

    /// The bytes for `d` (already checked against `positions`).
    fn encode_accepted(&self, d: &Delivery) -> Bytes {
        if self.per_connection(d) {
            let body = d.sse_body(self.json);
            let id = self.positions.compound();
            let mut buf = BytesMut::with_capacity(id.len() + 5 + body.len());
            buf.extend_from_slice(b"id: ");
            buf.extend_from_slice(id.as_bytes());
            buf.extend_from_slice(b"\n");
            buf.extend_from_slice(&body);
            return buf.freeze();
        }
        if self.json { d.sse_json() } else { d.sse().clone() }
    }

    /// Whether `d`'s event differs per connection: several channels give a compound id.
    fn per_connection(&self, d: &Delivery) -> bool {
        self.multi && d.pos.is_some()
    }

    /// The next page of the resume, as one chunk; `Ready(None)` once it is done.
    fn poll_replay(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            let Some(r) = self.replay.as_mut() else { return Poll::Ready(None) };
            let Some(reading) = &mut r.reading else {
                let Some((channel, from, first)) = r.todo.front().cloned() else {
                    self.replay = None;
                    return Poll::Ready(None);
                };
                let hub = r.hub.clone();
                r.reading = Some(Box::pin(async move {
                    if first {
                        hub.replay(&channel, from, 1).await
                    } else {
                        hub.replay_more(&channel, from).await
                    }
                }));
                continue;
            };
            let page = ready!(reading.as_mut().poll(cx));
            r.reading = None;
            let (channel, _, _) = r.todo.pop_front().expect("a page of the front channel");
            if let Some(next) = page.more.then(|| page.messages.last().and_then(|d| d.pos)).flatten() {
                r.todo.push_front((channel.clone(), next, false));
            }
            if !page.recovered() {
                metrics::counter!(crate::metrics::RESETS_TOTAL, "transport" => "sse").increment(1);
            }
            self.positions.place(&channel, page.position);
            let mut buf = BytesMut::new();
            for d in page.into_deliveries() {
                if let Some(b) = self.encode(&d) {
                    buf.extend_from_slice(&b);
                }
            }
            if !buf.is_empty() {
                self.last_write = Instant::now();
                return Poll::Ready(Some(buf.freeze()));
            }
        }
    }

    /// Ends the stream with an `event: disconnect` saying why the hub closed it.
    fn end_closed(&mut self) -> Bytes {
        self.done = true;
        let (reason, message) = match self.inbox.kicked() {
            Some(Kick::SlowConsumer) => {
                ("slow_consumer", "the connection fell too far behind and was closed; reconnect")
            }
            None => ("server_closed", "the server closed the connection; reconnect"),
        };
        self.guard.set_reason(reason);
        disconnect_event(reason, message)
    }

    /// The chunk for `first` and whatever else is queued (up to [`MAX_BATCH_BYTES`]), or
    /// `None` when all of it repeats what was already sent.
    fn batch(&mut self, first: &Delivery) -> Option<Chunk> {
        let Some(next) = self.rx.try_recv() else {
            if !self.positions.accept(first) {
                return None;
            }
            self.last_write = Instant::now();
            // One message: its shared, already framed chunk, unless its id is this
            // connection's own.
            if !self.per_connection(first) {
                return Some(Chunk::Framed(first.sse_chunk(self.json).clone()));
            }
            return Some(Chunk::Data(self.encode_accepted(first)));
        };
        let first = self.encode(first);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&first.unwrap_or_default());
        let mut next = Some(next);
        while let Some(d) = next.take() {
            if let Some(b) = self.encode(&d) {
                buf.extend_from_slice(&b);
            }
            if buf.len() < MAX_BATCH_BYTES {
                next = self.rx.try_recv();
            }
        }
        if buf.is_empty() {
            return None;
        }
        self.last_write = Instant::now();
        Some(Chunk::Data(buf.freeze()))
    }

    /// The signals other than a delivery, in priority order; `None` when none fired.
    fn poll_signals(&mut self, cx: &mut Context<'_>) -> Option<Bytes> {
        if let Some(expiry) = &mut self.expiry
            && expiry.as_mut().poll(cx).is_ready()
        {
            self.done = true;
            self.guard.set_reason("token_expired");
            return Some(disconnect_event("token_expired", "the token expired; reconnect with a fresh one"));
        }
        if self.closed.poll(cx).is_ready() {
            return Some(self.end_closed());
        }
        if self.shutdown_wait.poll(cx).is_ready() {
            self.done = true;
            self.guard.set_reason("shutdown");
            let mut s = String::new();
            shared::sse::encode_retry(&mut s, self.retry.as_millis() as u64);
            let tail = disconnect_event("shutting_down", "this node is restarting; reconnect");
            return Some(Bytes::from([s.as_bytes(), &tail].concat()));
        }
        None
    }

    /// A heartbeat comment when one is due. The timer is re-armed from the last write,
    /// so a busy stream sends no heartbeats and costs no timer work per message.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> Option<Bytes> {
        while self.beat.as_mut().poll(cx).is_ready() {
            let due = self.last_write + self.heartbeat;
            let now = Instant::now();
            if due > now {
                self.beat.as_mut().reset(due);
                continue;
            }
            self.last_write = now;
            self.beat.as_mut().reset(now + self.heartbeat);
            // A fired timer keeps no waker: poll it once so the next beat wakes us.
            let _ = self.beat.as_mut().poll(cx);
            return Some(Bytes::from_static(b":\n\n"));
        }
        None
    }
}

impl Stream for SseStream {
    type Item = Chunk;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        self.get_mut().next_chunk(cx)
    }
}

impl SseStream {
    fn next_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.started {
            self.started = true;
            // Opens the stream at once (headers and a first byte reach the client) and
            // sets the reconnect delay.
            let head = format!("retry: {}\n: ok\n\n", self.retry.as_millis());
            let mut buf = BytesMut::from(head.as_bytes());
            // Registers the signals and the heartbeat (later polls after a chunk skip
            // them until a wake-up).
            if let Some(b) = self.poll_signals(cx) {
                buf.extend_from_slice(&b);
            } else {
                let _ = self.poll_heartbeat(cx);
            }
            return Poll::Ready(Some(Chunk::Data(buf.freeze())));
        }
        // An atomic load: a kicked stream stops at once, without touching its token.
        if self.inbox.kicked().is_some() {
            return Poll::Ready(Some(Chunk::Data(self.end_closed())));
        }
        self.turns = self.turns.wrapping_add(1);
        if self.turns.is_multiple_of(SIGNALS_EVERY)
            && let Some(b) = self.poll_signals(cx)
        {
            return Poll::Ready(Some(Chunk::Data(b)));
        }
        // A resume's history comes before any live message (those wait in the inbox).
        if self.replay.is_some() {
            match self.poll_replay(cx) {
                Poll::Ready(Some(b)) => return Poll::Ready(Some(Chunk::Data(b))),
                Poll::Ready(None) => {}
                Poll::Pending => {
                    return match self.poll_signals(cx) {
                        Some(b) => Poll::Ready(Some(Chunk::Data(b))),
                        None => Poll::Pending,
                    };
                }
            }
        }
        // Deliveries first: the other signals are polled only when none is waiting, so a
        // message costs no lock or timer work.
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => match self.batch(&d) {
                    Some(b) => return Poll::Ready(Some(b)),
                    None => continue, // a repeat of a replayed message
                },
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => break,
            }
        }
        if let Some(b) = self.poll_signals(cx).or_else(|| self.poll_heartbeat(cx)) {
            return Poll::Ready(Some(Chunk::Data(b)));
        }
        Poll::Pending
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        // A client that stopped reading is cut off before the stream is polled again:
        // record why here, where it is known for sure. Either the hub kicked it (its
        // queue overflowed), or the connection gave up on a stalled write and cancelled
        // the close token itself (the hub never cancels it without a kick).
        match self.inbox.kicked() {
            Some(Kick::SlowConsumer) => self.guard.set_reason("slow_consumer"),
            None if !self.done && self.inbox.closed().is_cancelled() => {
                self.guard.set_reason("slow_consumer");
                metrics::counter!(crate::metrics::SLOW_CONSUMER_TOTAL, "transport" => "sse").increment(1);
            }
            None => {}
        }
    }
}

/// A resume in progress: channels whose history is still to send, each with the
/// position it goes on from and whether that read is its first page; the page being
/// read. Boxed in the stream, so a stream that resumes nothing pays one pointer.
struct Replaying {
    hub: Arc<Hub>,
    todo: VecDeque<(Arc<str>, StreamPos, bool)>,
    reading: Option<Pin<Box<dyn Future<Output = Replay> + Send>>>,
}

fn disconnect_event(reason: &str, message: &str) -> Bytes {
    let data = serde_json::json!({ "reason": reason, "message": message }).to_string();
    let mut s = String::new();
    shared::sse::encode_event(&mut s, None, Some("disconnect"), &data);
    Bytes::from(s)
}
