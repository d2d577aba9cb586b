//! The demo page's answer generator, on only with `--demo-streams`: `POST /demo/answer`
//! with `{"prompt": "..."}` answers `{"channel": "demo-<random>"}` at once, then
//! publishes a made-up answer into that channel token by token — the way a model's
//! answer streams — with history, so a reader that joins late or reconnects elsewhere
//! replays it from the start. The last message has the event `done` and data `[DONE]`.
//! Publishing goes through the one publish path, like every other publish.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
};
use serde::Deserialize;

use crate::{error::ApiError, publish::message, state::AppState};

/// Time between two tokens (about 30 a second).
pub const TOKEN_EVERY: Duration = Duration::from_millis(33);
/// Longest prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 500;
/// Answers streaming at once per node; more get 429 (the endpoint is open to anyone).
pub const MAX_STREAMS: usize = 32;

/// Answers streaming now.
static STREAMS: AtomicUsize = AtomicUsize::new(0);

/// Body of `POST /demo/answer`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerRequest {
    /// What the visitor asked; echoed in the answer.
    pub prompt: String,
}

/// `POST /demo/answer`: picks a fresh channel, starts streaming into it, answers its name.
pub async fn answer(
    State(state): State<AppState>,
    body: Result<Json<AnswerRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|r| ApiError::bad_request(r.body_text()))?;
    let prompt = req.prompt.trim();
    if prompt.is_empty() || prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::bad_request(format!("prompt must be 1 to {MAX_PROMPT_CHARS} characters")));
    }
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    if STREAMS.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        STREAMS.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::rate_limited(
            "demo_streams",
            format!("{MAX_STREAMS} demo answers are streaming already; retry shortly"),
        ));
    }
    let channel = format!("demo-{:016x}", rand::random::<u64>());
    let tokens = tokens(&answer_text(prompt));
    tokio::spawn(stream(state, channel.clone(), tokens));
    Ok(Json(serde_json::json!({ "channel": channel })))
}

/// Publishes `tokens` one by one, then the `done` message; stops early at shutdown or
/// when the broker fails.
async fn stream(state: AppState, channel: String, tokens: Vec<String>) {
    let mut tick = tokio::time::interval(TOKEN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let last = [("done", "[DONE]".to_owned())];
    let messages = tokens.into_iter().map(|t| ("token", t)).chain(last);
    for (event, data) in messages {
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let msg = message(channel.clone(), data.into(), Some(event.to_owned()), None);
        let published = state.publishing.publish(&state.hub, msg);
        if let Err(err) = published.await {
            tracing::warn!(error = %err.message, "demo answer stopped: publish failed");
            break;
        }
    }
    STREAMS.fetch_sub(1, Ordering::Relaxed);
}

/// The canned answer, around the prompt.
fn answer_text(prompt: &str) -> String {
    let prompt: String = prompt.chars().filter(|c| !c.is_control()).collect();
    format!(
        "You asked: \u{201c}{prompt}\u{201d}. Here is how this gateway streams an answer like \
         this one. Each token is published with history into a channel of its own, so every \
         reader on every node sees the same tokens in the same order. A reader that joins \
         late starts from position 0 and replays what it missed before it follows live; a \
         reader whose node goes away reconnects to another one with its last id and misses \
         nothing. When the answer is complete, a last message with the event done closes \
         the stream."
    )
}

/// Splits `text` the way a model's tokens look: each word with the space before it.
fn tokens(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, word) in text.split(' ').enumerate() {
        out.push(if i == 0 { word.to_owned() } else { format!(" {word}") });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_join_back_to_the_answer() {
        let text = answer_text("why is the sky blue?\n");
        let t = tokens(&text);
        assert_eq!(t.concat(), text);
        assert!(t.len() > 50, "long enough to watch: {}", t.len());
        assert!(text.contains("\u{201c}why is the sky blue?\u{201d}"), "control characters are dropped");
    }
}
