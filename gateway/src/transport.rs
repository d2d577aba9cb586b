//! Client transports, one module per wire protocol. Each turns subscriptions into
//! frames on a socket; they know the hub, never the broker's internals.
//!
//! This module holds what they share: query parsing, channel checks and connection
//! accounting.

pub mod poll;
pub mod sse;
pub mod ws;

use std::{sync::Arc, time::Duration};

use metrics::{counter, gauge};

use shared::{Resume, StreamPos};

use crate::{
    broker::{Ready, Recovery},
    config::Limits,
    delivery::Delivery,
    error::ApiError,
    hub::{Hub, Transport},
};

/// How long a new subscriber waits for the broker to confirm its channels before it
/// is served anyway (messages flow as soon as the link is back).
pub const READY_WAIT: Duration = Duration::from_secs(3);

/// The query string, decoded.
#[derive(Debug, Default)]
pub struct Query {
    /// Every `channel=` value, in order.
    pub channels: Vec<String>,
    /// Other parameters (last value wins).
    pub params: Vec<(String, String)>,
}

impl Query {
    /// Decodes a raw query string.
    pub fn parse(raw: Option<&str>) -> Self {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if k == "channel" {
                q.channels.push(v.into_owned());
            } else {
                q.params.push((k.into_owned(), v.into_owned()));
            }
        }
        q
    }

    /// The last value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Checks a list of channels: each valid, no more than the limit; duplicates removed.
pub fn check_channels(
    channels: Vec<String>,
    limits: &Limits,
    required: bool,
) -> Result<Vec<String>, ApiError> {
    if required && channels.is_empty() {
        return Err(ApiError::bad_request("at least one channel is required, e.g. ?channel=news"));
    }
    let mut out: Vec<String> = Vec::with_capacity(channels.len());
    for ch in channels {
        shared::validate_channel(&ch, limits.max_channel_len)
            .map_err(|e| ApiError::invalid_channel(&ch, e))?;
        if !out.contains(&ch) {
            out.push(ch);
        }
    }
    if out.len() > limits.max_channels_per_connection {
        return Err(ApiError::too_many_channels(out.len(), limits.max_channels_per_connection));
    }
    Ok(out)
}

/// Waits (bounded) until every subscription is live at the broker.
pub async fn wait_ready(readies: impl IntoIterator<Item = Arc<Ready>>) {
    let all = futures_util::future::join_all(readies.into_iter().map(|r| async move { r.wait().await }));
    if tokio::time::timeout(READY_WAIT, all).await.is_err() {
        tracing::debug!("broker subscription not confirmed in time; serving anyway");
    }
}

/// Resolves when a draining node tells this connection to reconnect.
pub type DrainTurn = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The connection's turn in a drain: shutdown, then a random delay within `window`, so
/// a node's clients reconnect elsewhere spread out instead of in one storm.
pub fn drain_turn(shutdown: tokio_util::sync::CancellationToken, window: Duration) -> DrainTurn {
    Box::pin(async move {
        shutdown.cancelled().await;
        if !window.is_zero() {
            tokio::time::sleep(window.mul_f64(rand::random::<f64>())).await;
        }
    })
}

/// Counts a client connection while it lives, and why it ended.
#[derive(Debug)]
pub struct ConnGuard {
    transport: Transport,
    reason: &'static str,
}

/// Client connections open in this process, for the connection cap.
static OPEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Refuses a new client connection when the node holds `max` already (0: no cap), so
/// an overloaded node sheds load to its peers instead of running out of descriptors.
pub fn admit(max: usize) -> Result<(), ApiError> {
    if max > 0 && OPEN.load(std::sync::atomic::Ordering::Relaxed) >= max {
        counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "max_connections").increment(1);
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            shared::protocol::error_code::OVER_CAPACITY,
            format!("this node holds its maximum of {max} connections; retry or use another node"),
        ));
    }
    Ok(())
}

/// Why connections end: the label values of `gateway_disconnects_total{reason}`.
const REASONS: [&str; 7] = [
    "client_closed",
    "slow_consumer",
    "shutdown",
    "timeout",
    "token_expired",
    "protocol_error",
    "server_closed",
];

/// The connection metrics' handles, looked up once: the `gauge!`/`counter!` macros
/// build a key (allocating its labels) and search the registry on every call, which
/// was 8 of a new connection's ~86 allocations.
struct ConnMetrics {
    open: [metrics::Gauge; 3],
    opened: [metrics::Counter; 3],
    closed: [[metrics::Counter; REASONS.len()]; 3],
}

fn conn_metrics() -> &'static ConnMetrics {
    static M: std::sync::OnceLock<ConnMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let t = |i: usize| [Transport::Sse, Transport::Ws, Transport::Poll][i].as_str();
        ConnMetrics {
            open: std::array::from_fn(|i| gauge!(crate::metrics::CONNECTIONS, "transport" => t(i))),
            opened: std::array::from_fn(|i| counter!(crate::metrics::CONNECTIONS_TOTAL, "transport" => t(i))),
            closed: std::array::from_fn(|i| {
                std::array::from_fn(|r| {
                    counter!(crate::metrics::DISCONNECTS_TOTAL, "transport" => t(i), "reason" => REASONS[r])
                })
            }),
        }
    })
}

impl ConnGuard {
    /// Counts a new connection.
    pub fn new(transport: Transport) -> Self {
        OPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let m = conn_metrics();
        m.open[transport as usize].increment(1.0);
        m.opened[transport as usize].increment(1);
        Self { transport, reason: "client_closed" }
    }

    /// Records why the connection ends (one of a small fixed set: `client_closed`,
    /// `slow_consumer`, `shutdown`, `timeout`, `token_expired`, `protocol_error`,
    /// `server_closed`).
    pub fn set_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let m = conn_metrics();
        let t = self.transport as usize;
        m.open[t].decrement(1.0);
        match REASONS.iter().position(|r| *r == self.reason) {
            Some(r) => m.closed[t][r].increment(1),
            None => counter!(crate::metrics::DISCONNECTS_TOTAL, "transport" => self.transport.as_str(), "reason" => self.reason)
                .increment(1),
        }
    }
}

/// The last history position delivered per channel on one connection. Replayed and
/// live messages can overlap while a client resumes; this drops the repeats and keeps
/// each channel in order.
#[derive(Debug, Default)]
pub struct Positions(Vec<(Arc<str>, StreamPos)>);

impl Positions {
    /// Records `d` and says whether to send it (false: already sent, or older).
    pub fn accept(&mut self, d: &Delivery) -> bool {
        let Some(pos) = d.pos else { return true };
        match self.0.iter_mut().find(|(c, _)| **c == *d.channel) {
            Some((_, last)) if pos <= *last => false,
            Some((_, last)) => {
                *last = pos;
                true
            }
            None => {
                self.0.push((d.channel.clone(), pos));
                true
            }
        }
    }

    /// Sets the position of `channel` (a client's resume point).
    pub fn set(&mut self, channel: &Arc<str>, pos: StreamPos) {
        match self.0.iter_mut().find(|(c, _)| c == channel) {
            Some((_, last)) => *last = pos,
            None => self.0.push((channel.clone(), pos)),
        }
    }

    /// The position of `channel`, if known.
    pub fn get(&self, channel: &str) -> Option<StreamPos> {
        self.0.iter().find(|(c, _)| &**c == channel).map(|(_, p)| *p)
    }

    /// All positions as a compound id `chan~pos,...`.
    pub fn compound(&self) -> String {
        shared::position::encode_compound(self.0.iter().map(|(c, p)| (&**c, *p)))
    }
}

/// What a resuming subscriber gets before live messages.
#[derive(Debug)]
pub enum Replay {
    /// The missed messages, oldest first (maybe none).
    Messages(Vec<Arc<Delivery>>),
    /// History cannot cover the gap: send this reset notice, then go live.
    Reset(Arc<Delivery>),
}

/// Reads what `channel` published after `from` from history. Call it after the live
/// subscription is ready, so nothing falls between history and live delivery.
pub async fn replay(hub: &Hub, channel: &Arc<str>, from: StreamPos) -> Replay {
    let result = hub.broker().since(channel, from).await;
    match result {
        Ok(Recovery::Covered(entries)) => {
            counter!(crate::metrics::RECOVERIES_TOTAL, "result" => "replayed").increment(1);
            counter!(crate::metrics::REPLAYED_TOTAL).increment(entries.len() as u64);
            Replay::Messages(
                entries
                    .into_iter()
                    .map(|e| {
                        Arc::new(Delivery::new(
                            channel.clone(),
                            Some(e.pos.to_string().into()),
                            e.event.map(Into::into),
                            e.data,
                            0,
                            None,
                        ))
                    })
                    .collect(),
            )
        }
        Ok(Recovery::Gap) => {
            counter!(crate::metrics::RECOVERIES_TOTAL, "result" => "reset").increment(1);
            Replay::Reset(Arc::new(Delivery::reset(channel.clone(), 0)))
        }
        Err(err) => {
            tracing::warn!(%err, "history unavailable for a resuming client; sending reset");
            counter!(crate::metrics::RECOVERIES_TOTAL, "result" => "error").increment(1);
            Replay::Reset(Arc::new(Delivery::reset(channel.clone(), 0)))
        }
    }
}

/// Parses a client's resume id (`Last-Event-ID`, `last_event_id`, WS `since`).
pub fn parse_resume(s: &str) -> Result<Resume, ApiError> {
    Resume::parse(s)
        .map_err(|e| ApiError::bad_request(format!("invalid last event id {}: {e}", crate::error::quote(s))))
}
