//! WebSocket: `GET /ws[?channel=a]`, JSON text frames.
//!
//! The upgrade is done here with tokio-tungstenite directly, so per-connection buffers
//! are small (the library default read buffer is 128 KiB). One task per connection
//! selects over the client's frames, its inbox, pings and shutdown. Client ops:
//! `subscribe`, `unsubscribe`, `publish` (when enabled), `ping`. Close codes: 1000
//! normal, 1002 protocol error, 1008 slow consumer / policy, 1009 message too big,
//! 1011 server error, 1012 server restarting (reconnect elsewhere), 4001 token expired.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use axum::{
    extract::{RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper_util::rt::TokioIo;
use shared::protocol::{CLIENT_OPS, ClientOp, ServerFrame, error_code as code};
use tokio::time::Instant;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message, Utf8Bytes,
        error::{CapacityError, Error as WsError},
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{Instrument, debug};

use shared::{Resume, StreamPos, protocol::Since};

use super::{
    ConnGuard, Positions, Query, Replay, check_channels, drain_turn, parse_resume, replay, wait_ready,
};
use crate::{
    app::AppState,
    auth::Claims,
    broker::Publish,
    config::Limits,
    delivery::Delivery,
    error::{ApiError, quote},
    hub::{Hub, Inbox, Subscription, Transport},
};

/// Read buffer per connection; messages from clients are small ops (it grows for a
/// larger one, up to the message size limit).
const READ_BUFFER: usize = 1024;
/// Write buffer per connection before a flush is forced.
const WRITE_BUFFER: usize = 16 * 1024;
/// Most frames written before one flush.
const MAX_BATCH: usize = 64;
/// Close code when the subscriber's token expires: reconnect with a fresh token.
pub const TOKEN_EXPIRED: u16 = 4001;
/// How long a closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /ws`: validates the upgrade request and hands the socket to a session task.
pub async fn handler(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    mut req: Request,
) -> Result<Response, ApiError> {
    let key = check_upgrade(req.headers())?;
    check_origin(req.headers(), &state.config.allowed_origins)?;
    let mut query = Query::parse(query.as_deref());
    let channels = check_channels(std::mem::take(&mut query.channels), &state.config.limits, false)?;
    let claims = state.authorize(req.headers(), query.get("token"), &channels)?;
    super::admit(state.config.limits.max_connections)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let max_msg = state.config.limits.max_payload_bytes + 4096;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max_msg)
        .max_message_size(Some(max_msg))
        .max_frame_size(Some(max_msg));
    let tracker = state.tracker.clone();
    // The session outlives this request: keep the connection span (peer address) on it.
    let span = tracing::debug_span!(parent: tracing::Span::current(), "ws");
    tracker.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(err) => {
                    debug!(%err, "websocket upgrade failed");
                    return;
                }
            };
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config)).await;
            Session::new(state, claims).run(socket, channels).await;
        }
        .instrument(span),
    );
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a valid header"),
    );
    Ok(resp)
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

fn check_upgrade(h: &HeaderMap) -> Result<String, ApiError> {
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
        .map(str::to_owned)
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key header"))
}

/// Why a session ended.
enum End {
    ClientClosed,
    ClientGone,
    Slow,
    Shutdown,
    Timeout,
    Expired,
    TooBig,
    Protocol,
    Internal,
}

/// One WebSocket connection's state.
pub struct Session {
    hub: Arc<Hub>,
    limits: Limits,
    ws_publish: bool,
    shutdown: CancellationToken,
    drain_window: Duration,
    ping_every: Duration,
    inbox: Arc<Inbox>,
    rx: crate::hub::InboxRx,
    subs: HashMap<Arc<str>, Subscription>,
    positions: Positions,
    guard: ConnGuard,
    /// The subscriber's token claims when auth is on.
    claims: Option<Claims>,
}

impl Session {
    /// A session with an empty subscription set.
    pub fn new(state: AppState, claims: Option<Claims>) -> Self {
        let (inbox, rx) = Inbox::new(Transport::Ws, &state.config.limits, CancellationToken::new());
        Self {
            hub: state.hub.clone(),
            limits: state.config.limits.clone(),
            ws_publish: state.config.ws_publish,
            shutdown: state.shutdown.clone(),
            drain_window: state.config.timers.drain_window,
            ping_every: state.config.timers.ws_ping,
            inbox,
            rx,
            subs: HashMap::new(),
            positions: Positions::default(),
            guard: ConnGuard::new(Transport::Ws),
            claims,
        }
    }

    /// Runs the session over any socket of WebSocket messages until it ends.
    pub async fn run<S>(mut self, mut ws: S, initial: Vec<String>)
    where
        S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    {
        if !initial.is_empty() && self.subscribe(&mut ws, initial, None).await.is_err() {
            return;
        }
        let mut ping = tokio::time::interval_at(Instant::now() + self.ping_every, self.ping_every);
        let mut last_seen = Instant::now();
        // Created once: a fresh `cancelled()` future per loop turn registers and
        // unregisters a waiter every time, which showed up in profiles.
        let closed = self.inbox.closed().clone().cancelled_owned();
        let mut shutdown = drain_turn(self.shutdown.clone(), self.drain_window);
        tokio::pin!(closed);
        let expiry = tokio::time::sleep(self.claims.as_ref().map_or(Duration::MAX / 4, Claims::remaining));
        tokio::pin!(expiry);
        let end = loop {
            tokio::select! {
                biased;
                _ = &mut expiry, if self.claims.is_some() => break End::Expired,
                _ = &mut closed => break End::Slow,
                _ = &mut shutdown => break End::Shutdown,
                d = self.rx.recv() => {
                    let Some(d) = d else { break End::Internal };
                    if let Err(end) = self.write_batch(&mut ws, d, closed.as_mut(), shutdown.as_mut()).await { break end }
                }
                msg = ws.next() => {
                    last_seen = Instant::now();
                    match msg {
                        None => break End::ClientGone,
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => break End::TooBig,
                        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))) => break End::ClientGone,
                        Some(Err(err)) => {
                            debug!(%err, "websocket protocol error");
                            break End::Protocol;
                        }
                        Some(Ok(Message::Text(text))) => {
                            if self.handle_op(&mut ws, &text).await.is_err() { break End::ClientGone }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let f = error(code::BAD_REQUEST, "binary frames are not supported; send JSON text frames");
                            if send(&mut ws, &f).await.is_err() { break End::ClientGone }
                        }
                        Some(Ok(Message::Close(_))) => break End::ClientClosed,
                        Some(Ok(_)) => {} // ping (answered by tungstenite), pong, raw frame
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > self.ping_every * 2 { break End::Timeout }
                    if ws.send(Message::Ping(Bytes::new())).await.is_err() { break End::ClientGone }
                }
            }
        };
        self.finish(&mut ws, end).await;
    }

    async fn write_batch<S>(
        &mut self,
        ws: &mut S,
        first: Arc<Delivery>,
        closed: Pin<&mut WaitForCancellationFutureOwned>,
        shutdown: Pin<&mut (dyn std::future::Future<Output = ()> + Send)>,
    ) -> Result<(), End>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let (rx, positions) = (&mut self.rx, &mut self.positions);
        let write = async move {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(d) = next.take() {
                if positions.accept(&d) {
                    ws.feed(text_frame(&d)).await.map_err(|_| End::ClientGone)?;
                }
                n += 1;
                if n < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            ws.flush().await.map_err(|_| End::ClientGone)
        };
        // A client that stops reading blocks the write; its inbox then overflows and the
        // hub closes it, which ends the wait here too (as does shutdown).
        tokio::select! {
            r = write => r,
            _ = closed => Err(End::Slow),
            _ = shutdown => Err(End::Shutdown),
        }
    }

    async fn handle_op<S>(&mut self, ws: &mut S, text: &str) -> Result<(), WsError>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let op = match serde_json::from_str::<ClientOp>(text) {
            Ok(op) => op,
            Err(err) => return send(ws, &op_error(text, &err)).await,
        };
        match op {
            ClientOp::Subscribe { channels, since } => self.subscribe(ws, channels, since).await,
            ClientOp::Unsubscribe { channels } => {
                let mut left = Vec::with_capacity(channels.len());
                for ch in channels {
                    self.subs.remove(ch.as_str());
                    left.push(ch);
                }
                send(ws, &ServerFrame::Unsubscribed { channels: left }).await
            }
            ClientOp::Publish { channel, data, event } => {
                let frame = self.publish(channel, data, event).await;
                send(ws, &frame).await
            }
            ClientOp::Ping { id } => send(ws, &ServerFrame::Pong { id }).await,
        }
    }

    async fn subscribe<S>(
        &mut self,
        ws: &mut S,
        channels: Vec<String>,
        since: Option<Since>,
    ) -> Result<(), WsError>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let channels = match check_channels(channels, &self.limits, true) {
            Ok(c) => c,
            Err(e) => return send(ws, &error(e.code, &e.message)).await,
        };
        if let Err(e) = crate::auth::check_channels(self.claims.as_ref(), &channels) {
            return send(ws, &error(e.code, &e.message)).await;
        }
        let resume: Vec<(String, StreamPos)> = match since_positions(&channels, since) {
            Ok(r) => r,
            Err(e) => return send(ws, &error(e.code, &e.message)).await,
        };
        let new: Vec<&String> = channels.iter().filter(|c| !self.subs.contains_key(c.as_str())).collect();
        let total = self.subs.len() + new.len();
        if total > self.limits.max_channels_per_connection {
            let e = ApiError::too_many_channels(total, self.limits.max_channels_per_connection);
            return send(ws, &error(e.code, &e.message)).await;
        }
        let mut readies = Vec::with_capacity(new.len());
        for ch in new {
            let (sub, ready) = self.hub.subscribe(ch, &self.inbox);
            self.subs.insert(sub.channel().clone(), sub);
            readies.push(ready);
        }
        wait_ready(readies).await;
        // Replay after the live subscription is ready, so nothing falls in between;
        // live messages that overlap the replay are dropped by `positions`.
        let mut replays = Vec::with_capacity(resume.len());
        for (ch, from) in resume {
            let Some(name) = self.subs.get_key_value(ch.as_str()).map(|(k, _)| k.clone()) else { continue };
            self.positions.set(&name, from);
            replays.push(replay(&self.hub, &name, from).await);
        }
        let recovered = !replays.is_empty() && replays.iter().all(|r| matches!(r, Replay::Messages(_)));
        send(ws, &ServerFrame::Subscribed { channels, recovered }).await?;
        for r in replays {
            match r {
                Replay::Messages(ms) => {
                    for d in ms {
                        if self.positions.accept(&d) {
                            ws.feed(text_frame(&d)).await?;
                        }
                    }
                }
                Replay::Reset(d) => {
                    metrics::counter!(crate::metrics::RESETS_TOTAL, "transport" => "ws").increment(1);
                    ws.feed(text_frame(&d)).await?;
                }
            }
        }
        ws.flush().await
    }

    async fn publish(&self, channel: String, data: String, event: Option<String>) -> ServerFrame {
        if !self.ws_publish {
            return error(code::FORBIDDEN, "publishing over WebSocket is disabled on this server");
        }
        if self.claims.as_ref().is_some_and(|c| !c.publish) {
            return error(code::FORBIDDEN, "the token does not allow publishing (claim \"pub\": true)");
        }
        if let Err(e) = shared::validate_channel(&channel, self.limits.max_channel_len) {
            let e = ApiError::invalid_channel(&channel, e);
            return error(e.code, &e.message);
        }
        if let Some(ev) = &event
            && let Err(e) = shared::validate_event(ev)
        {
            return error(code::INVALID_EVENT, &format!("invalid event {}: {e}", quote(ev)));
        }
        if data.len() > self.limits.max_payload_bytes {
            let e = ApiError::payload_too_large(self.limits.max_payload_bytes);
            return error(e.code, &e.message);
        }
        let msg = Publish {
            channel: channel.clone(),
            data: Bytes::from(data),
            event,
            history: true,
            idempotency_key: None,
        };
        match self.hub.broker().publish(msg).await {
            Ok(outcome) => ServerFrame::Published { channel, id: outcome.id },
            Err(err) => {
                tracing::warn!(%err, "websocket publish failed");
                let e = ApiError::broker_unavailable();
                error(e.code, &e.message)
            }
        }
    }

    async fn finish<S>(mut self, ws: &mut S, end: End)
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let (reason, close) = match end {
            End::ClientClosed | End::ClientGone => ("client_closed", None),
            End::Slow => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    let f = error(
                        code::SLOW_CONSUMER,
                        "the connection fell too far behind and is closed; reconnect",
                    );
                    send(ws, &f).await
                })
                .await;
                ("slow_consumer", Some((CloseCode::Policy, "slow consumer")))
            }
            End::Shutdown => ("shutdown", Some((CloseCode::Restart, "server restarting, reconnect"))),
            End::Timeout => ("timeout", Some((CloseCode::Away, "ping timeout"))),
            End::Expired => ("token_expired", Some((CloseCode::Library(TOKEN_EXPIRED), "token expired"))),
            End::TooBig => ("protocol_error", Some((CloseCode::Size, "message too big"))),
            End::Protocol => ("protocol_error", Some((CloseCode::Protocol, "protocol error"))),
            End::Internal => ("server_closed", Some((CloseCode::Error, "internal error"))),
        };
        self.guard.set_reason(reason);
        self.subs.clear();
        if let Some((code, why)) = close {
            let frame = CloseFrame { code, reason: Utf8Bytes::from_static(why) };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.send(Message::Close(Some(frame)))).await;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close()).await;
    }
}

/// The shared `{"type":"message",...}` (or `reset`) frame of a delivery, without a copy.
fn text_frame(d: &Delivery) -> Message {
    // The encoding is serde_json output, always UTF-8; the fallback copy never runs.
    match Utf8Bytes::try_from(d.ws().clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Text(String::from_utf8_lossy(d.ws()).into_owned().into()),
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

async fn send<S>(ws: &mut S, frame: &ServerFrame) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let text = serde_json::to_string(frame).expect("frames serialize");
    ws.send(Message::Text(text.into())).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
