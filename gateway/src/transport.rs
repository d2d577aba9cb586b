//! Client transports, one module per wire protocol. Each has one entry, `open`, that
//! checks a subscriber's request and opens its session from the request's parts and
//! the node's state; the routes turn the result into an answer. Transports know the
//! hub (subscribe, replay, publish), never the broker.
//!
//! This module holds what they share: channel checks, resume
//! positions and the drain turn; [`guard`] counts connections.

pub mod guard;
pub mod poll;
pub mod sse;
pub mod ws;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use shared::{Resume, StreamPos};

pub use self::guard::{ConnGuard, admit};
use crate::{config::Limits, error::ApiError, hub::Delivery};

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

    /// Places `channel` where a replay left it ([`Replay::position`]): at a position, or
    /// nowhere (history holds nothing to de-duplicate against).
    ///
    /// [`Replay::position`]: crate::hub::Replay::position
    pub fn place(&mut self, channel: &Arc<str>, pos: Option<StreamPos>) {
        match pos {
            Some(pos) => self.set(channel, pos),
            None => self.0.retain(|(c, _)| c != channel),
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

/// How many channel resumes one connection may make per minute: each one replays
/// history, so a client resubscribing with an old position again and again would make
/// the node send far more than it receives.
#[derive(Debug)]
pub struct ResumeBudget {
    window: Instant,
    used: u32,
}

impl Default for ResumeBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl ResumeBudget {
    /// The window a budget counts over.
    pub const WINDOW: Duration = Duration::from_secs(60);

    /// A fresh budget.
    pub fn new() -> Self {
        Self { window: Instant::now(), used: 0 }
    }

    /// Takes `n` resumes out of `max` for the current window; false when over.
    pub fn take(&mut self, n: usize, max: usize) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Self::WINDOW {
            (self.window, self.used) = (now, 0);
        }
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if self.used.saturating_add(n) as usize > max {
            return false;
        }
        self.used += n;
        true
    }
}

/// Parses a client's resume id (`Last-Event-ID`, `last_event_id`, WS `since`).
pub fn parse_resume(s: &str) -> Result<Resume, ApiError> {
    Resume::parse(s)
        .map_err(|e| ApiError::bad_request(format!("invalid last event id {}: {e}", crate::error::quote(s))))
}
