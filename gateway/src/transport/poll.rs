//! Long-poll: `GET /poll?channel=a&cursor=...&timeout=25`, or `since=<id>` instead of a
//! cursor (the syntax of SSE's `last_event_id`; `0` is the start of retained history).
//!
//! Answers at once when messages after the cursor are buffered, else holds the request
//! until one arrives or the timeout passes. The body is
//! `{"messages":[envelope...],"cursor":"..."}` built from the shared JSON encodings.
//! Between polls the hub keeps the channel subscribed and buffered, so the next poll
//! with the returned cursor misses nothing. A cursor this node cannot place (it came
//! from another node or an earlier run, or the buffer was overrun) gets
//! `"reset": true` with the affected channels, then live messages.
//!

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use shared::StreamPos;

use super::{ConnGuard, Positions, check_channels};
use crate::{
    error::ApiError,
    hub::{Delivery, Inbox},
    metrics::ConnKind,
    server::{ConnCtx, Opened, Query, Takeover},
    state::AppState,
};

/// Positions per channel on one node run, carried opaquely by the client.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Cursor {
    /// The node run (hub epoch) the positions belong to.
    e: u64,
    /// Last seen position per channel in this node's buffer.
    p: BTreeMap<String, u64>,
    /// Last seen history position per channel: valid on every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    h: BTreeMap<String, String>,
}

impl Cursor {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("cursor serializes"))
    }

    fn decode(s: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// The response header fields of an answer.
static ANSWER_HEADERS: [(header::HeaderName, HeaderValue); 2] = [
    (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
];

/// `GET /poll`: checks the request and returns at once; the wait for the answer is a
/// [`Takeover::Later`] the connection runs, so a held poll keeps only its own state.
pub async fn open(state: &AppState, req: &Parts, ctx: &ConnCtx) -> Result<Opened, ApiError> {
    let answer = prepare(state.clone(), &req.headers, req.uri.query(), ctx)?;
    Ok(Opened {
        status: StatusCode::OK,
        headers: &ANSWER_HEADERS,
        extra: None,
        body: Takeover::Later(Box::pin(answer)),
    })
}

/// Checks a poll (timeout, cursor, channels, token, capacity) and returns the wait for
/// its answer.
fn prepare(
    state: AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    ctx: &ConnCtx,
) -> Result<impl std::future::Future<Output = Bytes> + Send + 'static, ApiError> {
    let mut query = Query::parse(query);
    let timers = &state.config.timers;
    let timeout = match query.get("timeout") {
        None | Some("") => timers.poll_timeout,
        Some(t) => match t.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => {
                Duration::from_secs_f64(secs.min(timers.poll_max_timeout.as_secs_f64()))
            }
            _ => return Err(ApiError::bad_request("timeout must be a number of seconds, e.g. timeout=25")),
        },
    };
    let cursor = match query.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            ApiError::bad_request("invalid cursor: pass back the \"cursor\" of the previous answer unchanged")
        })?),
    };
    // Where to start without a cursor (a new page, or another transport before): the
    // syntax of SSE's `last_event_id`, `0` for the start of history. A cursor wins.
    let since = match query.get("since").filter(|s| !s.trim().is_empty()) {
        Some(s) if cursor.is_none() => Some(super::parse_resume(s)?),
        _ => None,
    };
    let channels = check_channels(std::mem::take(&mut query.channels), &state.config.limits, true)?;
    let claims = state.authorize(headers, query.get("token"), &channels)?;
    // Never hold a poll past the token's expiry.
    let timeout = claims.as_ref().map_or(timeout, |c| timeout.min(c.remaining()));
    super::admit(state.config.limits.max_connections)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    hold_new_channels(&state, &channels, ctx.peer.ip())?;
    // History positions in the cursor are checked here, so the answer can only be 200.
    let mut history = Vec::with_capacity(channels.len());
    for ch in &channels {
        history.push(match cursor.as_ref().and_then(|c| c.h.get(ch)) {
            Some(h) => Some(h.parse::<StreamPos>().map_err(|_| {
                ApiError::bad_request(
                    "invalid cursor: pass back the \"cursor\" of the previous answer unchanged",
                )
            })?),
            None => since.as_ref().and_then(|r| r.for_channel(ch)),
        });
    }
    Ok(hold(state, channels, history, cursor, timeout, ctx.close.clone()))
}

/// Each channel a poll joins stays subscribed for `--poll-keepalive-secs` after it,
/// with or without a client: bounded per client address (new channels per keep-alive
/// period, 429) and per node (503), so polls naming ever new channels cannot pile them
/// up. Channels the node holds already cost nothing.
fn hold_new_channels(state: &AppState, channels: &[String], peer: std::net::IpAddr) -> Result<(), ApiError> {
    let hub = &state.hub;
    let new = channels.iter().filter(|c| !hub.has_channel(c)).count();
    if new == 0 {
        return Ok(());
    }
    let limits = &state.config.limits;
    if hub.channel_count() + new > limits.poll_max_channels {
        metrics::counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "poll_channels").increment(1);
        return Err(ApiError::over_capacity(format!(
            "this node holds its maximum of {} channels; retry shortly or use another node",
            limits.poll_max_channels
        )));
    }
    if !state.poll_holds.take(peer, u32::try_from(new).unwrap_or(u32::MAX)) {
        return Err(ApiError::rate_limited(
            "poll_channels",
            format!(
                "this address polled more than {} new channels within {} s; reuse channels or retry later",
                limits.poll_channels_per_ip,
                state.config.timers.poll_keepalive.as_secs()
            ),
        ));
    }
    Ok(())
}

/// Joins the channels, waits for messages (or the timeout) and builds the answer.
async fn hold(
    state: AppState,
    channels: Vec<String>,
    history: Vec<Option<StreamPos>>,
    cursor: Option<Cursor>,
    timeout: Duration,
    close: tokio_util::sync::CancellationToken,
) -> Bytes {
    let hub = &state.hub;
    let foreign = cursor.as_ref().is_some_and(|c| c.e != hub.epoch());
    let (inbox, mut rx) = Inbox::new(ConnKind::Poll, &state.config.limits, close);
    let mut guard = ConnGuard::new(ConnKind::Poll);

    let mut joins = Vec::with_capacity(channels.len());
    let mut messages: Vec<Arc<Delivery>> = Vec::new();
    let mut reset_channels = Vec::new();
    let mut positions = Positions::default();
    let mut from_history = Vec::new();
    for (ch, history_pos) in channels.iter().zip(history) {
        let after = match &cursor {
            Some(c) if !foreign => c.p.get(ch).copied(),
            _ => None,
        };
        let join = hub.poll_join(ch, after, &inbox);
        if let Some(pos) = history_pos {
            positions.set(join.subscription.channel(), pos);
        }
        // A history position this node never handed out (ahead of the newest it
        // delivered) is not its own: history decides where such a client stands.
        let ours = history_pos.is_none_or(|p| join.last_pos.is_some_and(|last| p <= last));
        if after.is_some() && !join.gap && ours {
            // This node's buffer covers the gap (the usual case: same node, next poll).
            messages.extend(join.backlog.iter().cloned());
        } else if let Some(pos) = history_pos {
            from_history.push((join.subscription.channel().clone(), pos));
        } else if cursor.is_some() {
            reset_channels.push(ch.clone());
        }
        joins.push(join);
    }
    // Not needed any more: free it before the wait.
    drop(cursor);
    // Boxed: these waits are short, and the held future stays small without them.
    Box::pin(hub.wait_ready(joins.iter().map(|j| &j.subscription))).await;
    // Positions are valid on every node: read what the buffer could not give from history.
    // Their first pages share one page: an answer holds no more; the cursor goes on
    // from its last message.
    let shares = from_history.len();
    let mut unfinished = Vec::new();
    for (ch, from) in from_history {
        let replay = Box::pin(hub.replay(&ch, from, shares)).await;
        if !replay.recovered() {
            reset_channels.push(ch.to_string());
        }
        positions.place(&ch, replay.position);
        if replay.more {
            unfinished.push(ch.clone());
        }
        messages.extend(replay.messages);
    }
    // A channel this client holds no position on yet: where history stands now, so the
    // cursor resumes exactly on any node (whatever is published after this moment
    // reaches this node's subscription, or the next node's history read).
    let mut now = Vec::with_capacity(joins.len());
    for (ch, join) in channels.iter().zip(&joins) {
        now.push(match (positions.get(ch), join.last_pos) {
            (None, None) => Box::pin(hub.history_position(ch)).await,
            (_, last) => last,
        });
    }
    messages.retain(|d| positions.accept(d));
    if messages.is_empty() && reset_channels.is_empty() {
        tokio::select! {
            d = rx.recv() => {
                if let Some(d) = d {
                    messages.push(d);
                    while let Some(d) = rx.try_recv() {
                        messages.push(d);
                    }
                    // A live gap notice (history lost in a broker outage) is a reset, not
                    // a message.
                    for d in messages.iter().filter(|d| d.reset) {
                        if !reset_channels.iter().any(|c| **c == *d.channel) {
                            reset_channels.push(d.channel.to_string());
                        }
                    }
                    messages.retain(|d| !d.reset && positions.accept(d));
                }
            }
            _ = tokio::time::sleep(timeout) => {}
            _ = state.shutdown.cancelled() => guard.set_reason("shutdown"),
            _ = inbox.closed().cancelled() => guard.set_reason("server_closed"),
        }
    }
    if !reset_channels.is_empty() {
        metrics::counter!(crate::metrics::RESETS_TOTAL, "transport" => "poll")
            .increment(reset_channels.len() as u64);
    }

    let mut next = Cursor { e: hub.epoch(), p: BTreeMap::new(), h: BTreeMap::new() };
    for ((ch, join), now) in channels.iter().zip(&joins).zip(now) {
        // A replay cut at a page goes on from its last message, from history (the
        // node's buffer does not hold what came before this poll).
        if unfinished.iter().any(|u| **u == **ch) {
            if let Some(pos) = positions.get(ch) {
                next.h.insert(ch.clone(), pos.to_string());
            }
            continue;
        }
        next.p.insert(ch.clone(), join.position);
        let pos = positions.get(ch).into_iter().chain(now).max();
        if let Some(pos) = pos {
            next.h.insert(ch.clone(), pos.to_string());
        }
    }
    for d in &messages {
        if d.seq > 0 && !unfinished.iter().any(|u| *u == d.channel) {
            let pos = next.p.entry(d.channel.to_string()).or_default();
            *pos = (*pos).max(d.seq);
        }
    }
    for ch in &channels {
        hub.keep_alive(ch);
    }
    drop(joins);

    let mut body = Vec::with_capacity(64 + messages.iter().map(|d| d.json().len() + 1).sum::<usize>());
    body.extend_from_slice(br#"{"messages":["#);
    for (i, d) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(d.json());
    }
    body.extend_from_slice(br#"],"cursor":"#);
    body.extend_from_slice(serde_json::to_string(&next.encode()).expect("string").as_bytes());
    if !reset_channels.is_empty() {
        body.extend_from_slice(br#","reset":true,"reset_channels":"#);
        body.extend_from_slice(&serde_json::to_vec(&reset_channels).expect("strings serialize"));
    }
    body.push(b'}');
    Bytes::from(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = Cursor {
            e: 7,
            p: BTreeMap::from([("a".to_owned(), 3), ("b:c".to_owned(), 9)]),
            h: BTreeMap::from([("a".to_owned(), "5-1".to_owned())]),
        };
        let s = c.encode();
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe: {s}");
        assert_eq!(Cursor::decode(&s), Some(c));
        assert_eq!(Cursor::decode("not a cursor"), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("[1,2]")), None);
    }
}
