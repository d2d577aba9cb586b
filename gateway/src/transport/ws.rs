//! WebSocket: `GET /ws[?channel=a]`, JSON text frames.
//!
//! The handler answers the upgrade (`101`) and hands the bare connection to a
//! [`Session`] (see `server::Takeover`), which speaks the protocol itself ([`frame`]):
//! it holds no read or write buffer while idle, and a message's frame is encoded once
//! per delivery and written as is to every subscriber's socket. One task per connection
//! waits for the client's frames, its inbox, pings and shutdown. Client ops:
//! `subscribe`, `unsubscribe`, `publish` (when enabled), `ping`. Close codes: 1000
//! normal, 1001 ping timeout, 1002 protocol error, 1008 slow consumer / policy, 1009
//! message too big, 1011 server error, 1012 server restarting (reconnect elsewhere),
//! 4001 token expired.

pub mod frame;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::{RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use shared::protocol::{CLIENT_OPS, ClientOp, ServerFrame, error_code as code};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::Instant,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use shared::{Resume, StreamPos, protocol::Since};

use self::frame::{DecodeError, Decoder, Incoming, opcode};
use super::{
    ConnGuard, DrainTurn, Positions, Query, Replay, check_channels, drain_turn, parse_resume, replay,
    wait_ready,
};
use crate::{
    app::AppState,
    auth::Claims,
    broker::Publish,
    delivery::Delivery,
    error::{ApiError, quote},
    hub::{Inbox, InboxRx, Subscription, Transport},
    server::{
        ConnCtx, Takeover,
        io::{write_all_bufs, write_now},
        signal::Quiet,
    },
};

/// Bytes read from the socket per call, on the stack.
const READ_CHUNK: usize = 4096;
/// Most frames written in one batch (one `writev`).
const MAX_BATCH: usize = 64;
/// Close code when the subscriber's token expires: reconnect with a fresh token.
pub const TOKEN_EXPIRED: u16 = 4001;
/// How long a closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Deliveries are checked for before the other signals; every this many turns the
/// signals come first, so a flood of messages cannot hide a drain.
const SIGNALS_EVERY: u32 = 16;

/// `GET /ws`: validates the upgrade request and hands the connection to a [`Session`].
pub async fn handler(
    State(state): State<AppState>,
    ctx: Option<axum::Extension<ConnCtx>>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    // The connection's own close token (nothing else watches it once upgraded).
    let close = ctx.map(|axum::Extension(c)| c.close).unwrap_or_default();
    let (run, accept) = accept(&state, req.headers(), query.as_deref(), close)?;
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a valid header"));
    Takeover::Upgrade(run).attach(&mut resp);
    Ok(resp)
}

/// `GET /ws` on the lean path, without the router (`app::lean_routes`): the same checks
/// and session as [`handler`], and the start of the `101` head (status line and
/// headers, as `http1::head_start` writes them; the caller adds the CORS headers).
pub fn lean_upgrade(
    state: &AppState,
    req: &Request,
    ctx: &ConnCtx,
) -> Result<(crate::server::UpgradeFn, Vec<u8>), ApiError> {
    let (run, accept) = accept(state, req.headers(), req.uri().query(), ctx.close.clone())?;
    let head = crate::server::lean_head(
        StatusCode::SWITCHING_PROTOCOLS,
        &[
            (&header::CONNECTION, b"upgrade"),
            (&header::UPGRADE, b"websocket"),
            (&header::SEC_WEBSOCKET_ACCEPT, accept.as_bytes()),
        ],
    );
    Ok((run, head))
}

/// Checks an upgrade request (headers, origin, channels, token, capacity) and returns
/// the session to run on the upgraded connection and the `Sec-WebSocket-Accept` value.
fn accept(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    close: CancellationToken,
) -> Result<(crate::server::UpgradeFn, String), ApiError> {
    let key = check_upgrade(headers)?;
    check_origin(headers, &state.config.allowed_origins)?;
    let mut query = Query::parse(query);
    let channels = check_channels(std::mem::take(&mut query.channels), &state.config.limits, false)?;
    let claims = state.authorize(headers, query.get("token"), &channels)?;
    super::admit(state.config.limits.max_connections)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let state = state.clone();
    let run =
        move |io: crate::server::io::Io, leftover: Bytes, head: Vec<u8>| -> crate::server::UpgradedSession {
            Box::pin(Session::new(state, claims, close, io, &leftover, head).run(channels))
        };
    Ok((Box::new(run), derive_accept_key(key.as_bytes())))
}

/// Cross-site WebSocket hijacking guard: a browser always sends `Origin`; when an
/// allowlist is configured, upgrades from other origins are refused. Clients that send
/// no `Origin` (servers, CLIs) are not browsers acting for a user and pass.
fn check_origin(h: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = h.get(header::ORIGIN) else { return Ok(()) };
    if allowed.is_empty() || allowed.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(origin.as_bytes())) {
        return Ok(());
    }
    let shown = crate::error::quote(&String::from_utf8_lossy(origin.as_bytes()));
    Err(ApiError::new(StatusCode::FORBIDDEN, code::FORBIDDEN, format!("origin {shown} is not allowed")))
}

fn check_upgrade(h: &HeaderMap) -> Result<&str, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            code::BAD_REQUEST,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).and_then(|v| v.to_str().ok()) != Some("13") {
        return Err(ApiError::bad_request("unsupported Sec-WebSocket-Version; only 13 is supported"));
    }
    h.get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key header"))
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent a close frame (with this code).
    ClientClosed(Option<u16>),
    ClientGone,
    Slow,
    Shutdown,
    Timeout,
    Expired,
    TooBig,
    Protocol,
    Internal,
}

/// What woke the session.
enum Event {
    Delivery(Option<Arc<Delivery>>),
    Client(Result<Incoming, End>),
    Timer,
    Shutdown,
}

/// One WebSocket connection: its socket, subscriptions and timers.
pub struct Session<S> {
    io: S,
    decoder: Decoder,
    state: AppState,
    inbox: Arc<Inbox>,
    rx: InboxRx,
    subs: Vec<Subscription>,
    positions: Positions,
    guard: ConnGuard,
    /// The subscriber's token claims when auth is on.
    claims: Option<Box<Claims>>,
    /// This connection's turn to be told to reconnect when the node drains (polled
    /// only after it fired: it is checked on every wake-up).
    shutdown: Quiet<DrainTurn>,
    /// Bytes that go out before anything else: the `101` head until the first frame
    /// (one write for both), or the rest of frames whose write was cut short (kick or
    /// drain), so the client still sees whole frames before the closing ones.
    unsent: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A session on `io` with an empty subscription set; `leftover` is what the client
    /// sent after its upgrade request, `head` the `101` response head still to write
    /// (empty if it is out). `close` is cancelled when the hub closes the connection.
    pub fn new(
        state: AppState,
        claims: Option<Claims>,
        close: CancellationToken,
        io: S,
        leftover: &[u8],
        head: Vec<u8>,
    ) -> Self {
        let limits = &state.config.limits;
        let (inbox, rx) = Inbox::new(Transport::Ws, limits, close);
        let mut decoder = Decoder::new(limits.max_payload_bytes + 4096);
        decoder.feed(leftover);
        let shutdown = Quiet::new(drain_turn(state.shutdown.clone(), state.config.timers.drain_window));
        Self {
            io,
            decoder,
            inbox,
            rx,
            subs: Vec::new(),
            positions: Positions::default(),
            guard: ConnGuard::new(Transport::Ws),
            claims: claims.map(Box::new),
            shutdown,
            unsent: head,
            state,
        }
    }

    /// Subscribes `initial`, then runs the session until it ends.
    // Not an `async fn`: that would store the session twice in its future (once as the
    // argument, once as the local), and this future lives as long as the connection.
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self, initial: Vec<String>) -> impl Future<Output = ()> + Send {
        async move {
            let first = if initial.is_empty() {
                self.write(&mut []).await // just the head
            } else {
                Box::pin(self.subscribe(initial, None)).await
            };
            if let Err(end) = first {
                return Box::pin(self.finish(end)).await;
            }
            let ping_every = self.state.config.timers.ws_ping;
            let expires = self.claims.as_ref().map(|c| Instant::now() + c.remaining());
            let mut next_ping = Instant::now() + ping_every;
            let mut last_seen = Instant::now();
            // One timer for pings and the token's expiry.
            let timer = tokio::time::sleep_until(expires.map_or(next_ping, |e| e.min(next_ping)));
            tokio::pin!(timer);
            let mut turns = 0u32;
            let end = loop {
                // An atomic load: a kicked session stops without touching its token.
                if self.inbox.kicked().is_some() {
                    break End::Slow;
                }
                turns = turns.wrapping_add(1);
                let signals_first = turns.is_multiple_of(SIGNALS_EVERY);
                let (rx, io, decoder, shutdown) =
                    (&mut self.rx, &mut self.io, &mut self.decoder, &mut self.shutdown);
                let event = std::future::poll_fn(|cx| {
                    if signals_first && shutdown.poll(cx).is_ready() {
                        return Poll::Ready(Event::Shutdown);
                    }
                    if let Poll::Ready(d) = rx.poll_recv(cx) {
                        return Poll::Ready(Event::Delivery(d));
                    }
                    if !signals_first && shutdown.poll(cx).is_ready() {
                        return Poll::Ready(Event::Shutdown);
                    }
                    if let Poll::Ready(r) = poll_client(io, decoder, cx) {
                        return Poll::Ready(Event::Client(r));
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Timer);
                    }
                    Poll::Pending
                })
                .await;
                let result = match event {
                    Event::Shutdown => Err(End::Shutdown),
                    Event::Delivery(None) => Err(End::Internal),
                    Event::Delivery(Some(d)) => self.write_batch(d).await,
                    Event::Client(Err(end)) => Err(end),
                    Event::Client(Ok(msg)) => {
                        last_seen = Instant::now();
                        match msg {
                            Incoming::Text(text) => Box::pin(self.handle_op(&text)).await,
                            Incoming::Binary(_) => {
                                let f = error(
                                    code::BAD_REQUEST,
                                    "binary frames are not supported; send JSON text frames",
                                );
                                Box::pin(self.send(&f)).await
                            }
                            Incoming::Ping(payload) => {
                                Box::pin(self.write_frame(opcode::PONG, &payload)).await
                            }
                            Incoming::Pong => Ok(()),
                            Incoming::Close(code) => Err(End::ClientClosed(code)),
                        }
                    }
                    Event::Timer => {
                        let now = Instant::now();
                        if expires.is_some_and(|e| now >= e) {
                            Err(End::Expired)
                        } else if now >= next_ping && last_seen.elapsed() > ping_every * 2 {
                            Err(End::Timeout)
                        } else {
                            let result = if now >= next_ping {
                                Box::pin(self.write_frame(opcode::PING, &[])).await
                            } else {
                                Ok(())
                            };
                            if now >= next_ping {
                                next_ping = now + ping_every;
                            }
                            timer.as_mut().reset(expires.map_or(next_ping, |e| e.min(next_ping)));
                            result
                        }
                    }
                };
                if let Err(end) = result {
                    break end;
                }
            };
            Box::pin(self.finish(end)).await;
        }
    }

    /// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]) in one go; each
    /// message's frame is the shared encoding, written without a copy.
    async fn write_batch(&mut self, first: Arc<Delivery>) -> Result<(), End> {
        let Ok(second) = self.rx.try_recv() else {
            if !self.positions.accept(&first) {
                return Ok(());
            }
            return self.write(&mut [first.ws_frame()]).await;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH.min(16));
        batch.push(first);
        batch.push(second);
        while batch.len() < MAX_BATCH {
            let Ok(d) = self.rx.try_recv() else { break };
            batch.push(d);
        }
        batch.retain(|d| self.positions.accept(d));
        let mut bufs: Vec<&[u8]> = batch.iter().map(|d| &d.ws_frame()[..]).collect();
        self.write(&mut bufs).await
    }

    /// Writes `bufs`. A client that stops reading blocks the write; its inbox then
    /// overflows and the hub closes it, which ends the wait (as does the drain).
    async fn write(&mut self, bufs: &mut [&[u8]]) -> Result<(), End> {
        if !self.unsent.is_empty() {
            let first = std::mem::take(&mut self.unsent);
            let mut all: Vec<&[u8]> = std::iter::once(&first[..]).chain(bufs.iter().copied()).collect();
            return Box::pin(self.write_out(&mut all)).await;
        }
        self.write_out(bufs).await
    }

    async fn write_out(&mut self, bufs: &mut [&[u8]]) -> Result<(), End> {
        // Most writes finish at once; only one that has to wait watches the signals, in
        // a boxed future, so the session's state stays small.
        match write_now(&mut self.io, bufs).await {
            Poll::Ready(r) => r.map_err(|_| End::ClientGone),
            Poll::Pending => Box::pin(self.write_slow(bufs)).await,
        }
    }

    /// The rest of a write that has to wait: until done, a kick or the drain.
    async fn write_slow(&mut self, bufs: &mut [&[u8]]) -> Result<(), End> {
        let Self { io, inbox, shutdown, unsent, .. } = self;
        let end = tokio::select! {
            biased;
            r = write_all_bufs(io, bufs) => return r.map_err(|_| End::ClientGone),
            _ = inbox.closed().cancelled() => End::Slow,
            _ = std::future::poll_fn(|cx| shutdown.poll(cx)) => End::Shutdown,
        };
        // `bufs` was advanced past what went out.
        for b in bufs.iter() {
            unsent.extend_from_slice(b);
        }
        Err(end)
    }

    /// Writes one frame.
    async fn write_frame(&mut self, op: u8, payload: &[u8]) -> Result<(), End> {
        let mut header = [0u8; frame::MAX_HEADER];
        let n = frame::encode_header(op, payload.len(), &mut header);
        self.write(&mut [&header[..n], payload]).await
    }

    /// Sends a JSON frame.
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), End> {
        let text = serde_json::to_vec(frame).expect("frames serialize");
        self.write_frame(opcode::TEXT, &text).await
    }

    async fn handle_op(&mut self, text: &str) -> Result<(), End> {
        let op = match serde_json::from_str::<ClientOp>(text) {
            Ok(op) => op,
            Err(err) => return self.send(&op_error(text, &err)).await,
        };
        match op {
            ClientOp::Subscribe { channels, since } => self.subscribe(channels, since).await,
            ClientOp::Unsubscribe { channels } => {
                self.subs.retain(|s| !channels.iter().any(|c| **c == **s.channel()));
                self.send(&ServerFrame::Unsubscribed { channels }).await
            }
            ClientOp::Publish { channel, data, event } => {
                let frame = match self.check_publish(channel, data, event) {
                    Ok(msg) => publish(self.state.hub.clone(), msg).await,
                    Err(frame) => frame,
                };
                self.send(&frame).await
            }
            ClientOp::Ping { id } => self.send(&ServerFrame::Pong { id }).await,
        }
    }

    async fn subscribe(&mut self, channels: Vec<String>, since: Option<Since>) -> Result<(), End> {
        let limits = &self.state.config.limits;
        let channels = match check_channels(channels, limits, true) {
            Ok(c) => c,
            Err(e) => return self.send(&error(e.code, &e.message)).await,
        };
        if let Err(e) = crate::auth::check_channels(self.claims.as_deref(), &channels) {
            return self.send(&error(e.code, &e.message)).await;
        }
        let resume: Vec<(String, StreamPos)> = match since_positions(&channels, since) {
            Ok(r) => r,
            Err(e) => return self.send(&error(e.code, &e.message)).await,
        };
        let new: Vec<&String> =
            channels.iter().filter(|c| !self.subs.iter().any(|s| **s.channel() == ***c)).collect();
        let total = self.subs.len() + new.len();
        if total > limits.max_channels_per_connection {
            let e = ApiError::too_many_channels(total, limits.max_channels_per_connection);
            return self.send(&error(e.code, &e.message)).await;
        }
        let mut readies = Vec::with_capacity(new.len());
        self.subs.reserve_exact(new.len());
        for ch in new {
            let (sub, ready) = self.state.hub.subscribe(ch, &self.inbox);
            self.subs.push(sub);
            readies.push(ready);
        }
        if !self.unsent.is_empty() && (!resume.is_empty() || !readies.iter().all(|r| r.is_set())) {
            self.write(&mut []).await?; // the head need not wait for the broker
        }
        wait_ready(readies).await;
        // Replay after the live subscription is ready, so nothing falls in between;
        // live messages that overlap the replay are dropped by `positions`.
        let mut replays = Vec::with_capacity(resume.len());
        for (ch, from) in resume {
            let Some(name) = self.subs.iter().find(|s| **s.channel() == *ch).map(|s| s.channel().clone())
            else {
                continue;
            };
            self.positions.set(&name, from);
            replays.push(replay(&self.state.hub, &name, from).await);
        }
        let recovered = !replays.is_empty() && replays.iter().all(|r| matches!(r, Replay::Messages(_)));
        self.send(&ServerFrame::Subscribed { channels, recovered }).await?;
        let mut out = Vec::new();
        for r in replays {
            match r {
                Replay::Messages(ms) => out.extend(ms.into_iter().filter(|d| self.positions.accept(d))),
                Replay::Reset(d) => {
                    metrics::counter!(crate::metrics::RESETS_TOTAL, "transport" => "ws").increment(1);
                    out.push(d);
                }
            }
        }
        let mut bufs: Vec<&[u8]> = out.iter().map(|d| &d.ws_frame()[..]).collect();
        self.write(&mut bufs).await
    }

    /// The message a `publish` op asks for, or the error frame refusing it.
    fn check_publish(
        &self,
        channel: String,
        data: String,
        event: Option<String>,
    ) -> Result<Publish, ServerFrame> {
        let limits = &self.state.config.limits;
        if !self.state.config.ws_publish {
            return Err(error(code::FORBIDDEN, "publishing over WebSocket is disabled on this server"));
        }
        if self.claims.as_ref().is_some_and(|c| !c.publish) {
            return Err(error(code::FORBIDDEN, "the token does not allow publishing (claim \"pub\": true)"));
        }
        if let Err(e) = shared::validate_channel(&channel, limits.max_channel_len) {
            let e = ApiError::invalid_channel(&channel, e);
            return Err(error(e.code, &e.message));
        }
        if let Some(ev) = &event
            && let Err(e) = shared::validate_event(ev)
        {
            return Err(error(code::INVALID_EVENT, &format!("invalid event {}: {e}", quote(ev))));
        }
        if data.len() > limits.max_payload_bytes {
            let e = ApiError::payload_too_large(limits.max_payload_bytes);
            return Err(error(e.code, &e.message));
        }
        Ok(Publish { channel, data: Bytes::from(data), event, history: true, idempotency_key: None })
    }

    /// Says goodbye (why, with a close frame), then closes the connection.
    async fn finish(mut self, end: End) {
        let (reason, close): (&'static str, Option<(u16, &'static str)>) = match end {
            End::ClientClosed(code) => ("client_closed", code.map(|c| (c, ""))),
            End::ClientGone => ("client_closed", None),
            End::Slow => ("slow_consumer", Some((1008, "slow consumer"))),
            End::Shutdown => ("shutdown", Some((1012, "server restarting, reconnect"))),
            End::Timeout => ("timeout", Some((1001, "ping timeout"))),
            End::Expired => ("token_expired", Some((TOKEN_EXPIRED, "token expired"))),
            End::TooBig => ("protocol_error", Some((1009, "message too big"))),
            End::Protocol => ("protocol_error", Some((1002, "protocol error"))),
            End::Internal => ("server_closed", Some((1011, "internal error"))),
        };
        self.guard.set_reason(reason);
        self.subs.clear();
        if end == End::ClientGone {
            return;
        }
        let mut out = std::mem::take(&mut self.unsent);
        if end == End::Slow {
            let f = error(code::SLOW_CONSUMER, "the connection fell too far behind and is closed; reconnect");
            out.extend(frame::encode(opcode::TEXT, &serde_json::to_vec(&f).expect("frames serialize")));
        }
        match (end, close) {
            // A close frame without a code is answered the same way.
            (End::ClientClosed(None), _) => out.extend(frame::encode(opcode::CLOSE, &[])),
            (_, Some((code, why))) => out.extend(frame::close(code, why)),
            _ => {}
        }
        let io = &mut self.io;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            io.write_all(&out).await?;
            io.shutdown().await?;
            // Read until the client closes too (its close frame, then EOF), so the
            // socket is not reset with our frames still unread.
            let mut sink = [0u8; 512];
            while io.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

/// Publishes for a client: the `published` frame with the id, or an error frame.
async fn publish(hub: Arc<crate::hub::Hub>, msg: Publish) -> ServerFrame {
    let channel = msg.channel.clone();
    match hub.broker().publish(msg).await {
        Ok(outcome) => ServerFrame::Published { channel, id: outcome.id },
        Err(err) => {
            tracing::warn!(%err, "websocket publish failed");
            let e = ApiError::broker_unavailable();
            error(e.code, &e.message)
        }
    }
}

/// Polls for the client's next message; `Err` ends the session.
fn poll_client<S: AsyncRead + Unpin>(
    io: &mut S,
    decoder: &mut Decoder,
    cx: &mut Context<'_>,
) -> Poll<Result<Incoming, End>> {
    loop {
        match decoder.decode() {
            Ok(Some(m)) => return Poll::Ready(Ok(m)),
            Ok(None) => {}
            Err(DecodeError::TooBig) => return Poll::Ready(Err(End::TooBig)),
            Err(DecodeError::Protocol(why)) => {
                debug!(why, "websocket protocol error");
                return Poll::Ready(Err(End::Protocol));
            }
        }
        // The read buffer lives on the stack, only for this call.
        // Uninitialized: most polls find nothing to read, and zeroing 4 KiB per wake-up
        // showed in profiles.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => decoder.feed(buf.filled()),
            Poll::Ready(_) => return Poll::Ready(Err(End::ClientGone)),
        }
    }
}

/// The resume position per channel from a `subscribe` op's `since`.
fn since_positions(channels: &[String], since: Option<Since>) -> Result<Vec<(String, StreamPos)>, ApiError> {
    match since {
        None => Ok(Vec::new()),
        Some(Since::One(s)) => {
            let resume = parse_resume(&s)?;
            Ok(channels.iter().filter_map(|c| resume.for_channel(c).map(|p| (c.clone(), p))).collect())
        }
        Some(Since::PerChannel(map)) => map
            .into_iter()
            .filter(|(c, _)| channels.contains(c))
            .map(|(c, s)| match parse_resume(&s)? {
                Resume::One(p) => Ok((c, p)),
                Resume::PerChannel(_) => {
                    Err(ApiError::bad_request("a per-channel \"since\" value must be one id"))
                }
            })
            .collect(),
    }
}

/// An `error` frame; refusals of client input are counted like HTTP rejections.
fn error(code: &'static str, message: &str) -> ServerFrame {
    if code != shared::protocol::error_code::SLOW_CONSUMER {
        metrics::counter!(crate::metrics::REJECTED_TOTAL, "reason" => code).increment(1);
    }
    ServerFrame::Error { code: code.to_owned(), message: message.to_owned() }
}

/// Explains why a text frame is not a valid op.
fn op_error(text: &str, err: &serde_json::Error) -> ServerFrame {
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    match value.as_ref().and_then(|v| v.get("op")).map(|op| op.as_str()) {
        None => error(code::BAD_REQUEST, "expected a JSON object with an \"op\" field"),
        Some(Some(op)) if !CLIENT_OPS.contains(&op) => error(
            code::UNKNOWN_OP,
            &format!("unknown op {}; expected one of {}", quote(op), CLIENT_OPS.join(", ")),
        ),
        Some(None) => error(code::BAD_REQUEST, "\"op\" must be a string"),
        Some(Some(_)) => error(code::BAD_REQUEST, &format!("malformed op: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppState {
        let hub = crate::hub::Hub::new(
            crate::hub::HubConfig { linger: Duration::ZERO, poll_buffer: 4, poll_keepalive: Duration::ZERO },
            |sink| {
                let history = crate::broker::HistoryConfig {
                    max_len: 100,
                    max_age: Duration::from_secs(3600),
                    idempotency_window: Duration::from_secs(60),
                };
                Arc::new(crate::broker::memory::MemoryBroker::new(sink, history))
            },
        );
        AppState {
            hub,
            config: Arc::new(crate::config::Config::default()),
            shutdown: CancellationToken::new(),
            tracker: tokio_util::task::TaskTracker::new(),
            auth: None,
            publish_limit: Arc::new(crate::ratelimit::SharedBuckets::new(0)),
        }
    }

    /// A masked client frame.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        assert!(payload.len() < 126);
        let mut out = vec![b0, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Reads one short server frame: `(opcode, payload)`.
    async fn server_frame(io: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.unwrap();
        let len = match head[1] {
            126 => {
                let mut l = [0u8; 2];
                io.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    }

    #[tokio::test]
    async fn a_session_speaks_the_protocol_over_any_stream() {
        let state = state();
        let hub = state.hub.clone();
        let (server, mut client) = tokio::io::duplex(4096);
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let session = Session::new(state, None, CancellationToken::new(), server, &[], head.to_vec());
        let run = session.run(vec!["news".into()]);
        // The session lives as long as its connection: its future is idle memory.
        assert!(std::mem::size_of_val(&run) <= 1280, "session future: {}", std::mem::size_of_val(&run));
        let task = tokio::spawn(run);
        let mut got = [0u8; 36];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, head, "the 101 head comes first, then the frames");
        let (op, payload) = server_frame(&mut client).await;
        assert_eq!(op, opcode::TEXT);
        assert!(matches!(serde_json::from_slice(&payload).unwrap(), ServerFrame::Subscribed { .. }));
        // A delivery goes out as the shared frame.
        hub.dispatch("news", Bytes::from_static(b"hello"));
        let (_, payload) = server_frame(&mut client).await;
        let frame: ServerFrame = serde_json::from_slice(&payload).unwrap();
        assert!(matches!(frame, ServerFrame::Message { ref data, .. } if data == "hello"), "{frame:?}");
        // Ops, and pings of the protocol itself.
        client.write_all(&client_frame(0x81, br#"{"op":"ping","id":7}"#)).await.unwrap();
        let (_, payload) = server_frame(&mut client).await;
        assert_eq!(
            serde_json::from_slice::<ServerFrame>(&payload).unwrap(),
            ServerFrame::Pong { id: Some(serde_json::json!(7)) }
        );
        client.write_all(&client_frame(0x89, b"hb")).await.unwrap();
        assert_eq!(server_frame(&mut client).await, (opcode::PONG, b"hb".to_vec()));
        // A close is answered with the same code, then the session ends.
        client.write_all(&client_frame(0x88, &1000u16.to_be_bytes())).await.unwrap();
        assert_eq!(server_frame(&mut client).await, (opcode::CLOSE, 1000u16.to_be_bytes().to_vec()));
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("session ended").unwrap();
        assert_eq!(hub.subscriber_count("news"), 0, "unsubscribed when it ended");
    }

    #[test]
    fn op_errors_tell_unknown_from_malformed() {
        let e = |t: &str| match op_error(t, &serde_json::from_str::<ClientOp>(t).unwrap_err()) {
            ServerFrame::Error { code, .. } => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(e("not json"), code::BAD_REQUEST);
        assert_eq!(e(r#"{"op":"dance"}"#), code::UNKNOWN_OP);
        assert_eq!(e(r#"{"op":"subscribe"}"#), code::BAD_REQUEST);
        assert_eq!(e(r#"{"op":5}"#), code::BAD_REQUEST);
        assert_eq!(e("[]"), code::BAD_REQUEST);
    }
}
