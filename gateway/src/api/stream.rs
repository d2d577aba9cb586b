//! `POST /publish/{channel}?stream=lines|sse`: a streaming publish. Each line (or SSE
//! event) of the body is published as soon as it arrives — with history, in order,
//! several in flight at once — and the answer comes when the body ends:
//! `{"channel","published","first_id","last_id"}`. A bad line or event stops the stream
//! with an error naming its number; what came before it stays published, and the error
//! answer says how much that was.

use axum::{
    Json,
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use shared::protocol::error_code;
use tokio::time::Instant;

use super::body::next_chunk;
use crate::{
    error::ApiError,
    hub::{Publish, Sequence},
    publish::{
        Publisher, rejected,
        stream::{Format, InFlight, Item, Pending, SplitError, Splitter},
    },
    state::AppState,
};

/// Publishes of one stream awaiting Redis at once (more waits for the oldest, which
/// slows the reading of the body: back-pressure on the publisher). Enough to keep
/// Redis busy from one stream; small enough that a thousand streams behind a slow
/// Redis hold tens of MiB, not hundreds.
const MAX_IN_FLIGHT: usize = 256;

/// The answer to a streaming publish.
#[derive(Debug, Serialize)]
struct StreamAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    channel: String,
    published: u64,
    first_id: Option<String>,
    last_id: Option<String>,
}

/// Runs a streaming publish to `channel` from `body`.
pub async fn publish(
    state: &AppState,
    who: Option<Publisher>,
    channel: String,
    event: Option<String>,
    format: Format,
    body: Body,
) -> Response {
    let mut tally = InFlight::new(MAX_IN_FLIGHT);
    let mut result = run(state, who, &channel, event, format, body, &mut tally).await;
    if result.is_err() {
        // What was queued before the stream stopped is published (or not): count it.
        if let Err((n, e)) = tally.finish().await {
            result = result.and(Err(failed(format, n, e)));
        }
    }
    let (status, error, message) = match result {
        Ok(()) => (StatusCode::OK, None, None),
        Err(e) => (e.status, Some(e.code), Some(e.message)),
    };
    let answer = StreamAnswer {
        error,
        message,
        channel,
        published: tally.published,
        first_id: tally.first_id,
        last_id: tally.last_id,
    };
    let mut resp = (status, Json(answer)).into_response();
    if status != StatusCode::OK {
        metrics::counter!(crate::metrics::REJECTED_TOTAL, "reason" => error.unwrap_or_default()).increment(1);
        // The rest of the body is not read.
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn run<'a>(
    state: &'a AppState,
    who: Option<Publisher>,
    channel: &str,
    event: Option<String>,
    format: Format,
    mut body: Body,
    tally: &mut InFlight<'a, ApiError>,
) -> Result<(), ApiError> {
    let publishing = &state.publishing;
    publishing.check(channel, event.as_deref(), b"", None)?;
    let (limits, timers) = (publishing.limits(), &state.config.timers);
    // A stream holds at most one message being read: that much of the body budget.
    let mut held = publishing.bodies().hold();
    held.grow(limits.max_payload_bytes).map_err(rejected)?;
    let mut splitter = Splitter::new(format, limits.max_payload_bytes);
    let stream = rand::random::<u64>();
    let deadline = Instant::now() + timers.stream_max;
    let mut read = 0usize;
    let mut seq = 0u64;
    let mut publish = |item: Item| {
        let event = item.event.or_else(|| event.clone());
        let unit = format.unit();
        let number = item.number;
        let named = |e: ApiError| ApiError { message: format!("{unit} {number}: {}", e.message), ..e };
        publishing
            .check(channel, event.as_deref(), item.data.as_bytes(), item.id.as_deref())
            .map_err(named)?;
        publishing.charge(who, 1).map_err(named)?;
        seq += 1;
        let msg = Publish {
            channel: channel.to_owned(),
            data: item.data.into(),
            event,
            history: true,
            idempotency_key: item.id,
            sequence: Some(Sequence { stream, n: seq }),
        };
        let outcome = publishing.publish(&state.hub, msg);
        let pending: Pending<'a, ApiError> = Box::pin(async move { outcome.await.map(|r| r.id) });
        Ok::<_, ApiError>((number, pending))
    };
    let mut items = Vec::new();
    loop {
        let idle = timers.body_idle.min(deadline.saturating_duration_since(Instant::now()));
        let chunk = match next_chunk(&mut body, idle).await {
            Ok(chunk) => chunk,
            Err(_) if Instant::now() >= deadline => {
                return Err(rejected(ApiError::request_timeout(format!(
                    "the stream lasted longer than {} s; what came before was published",
                    timers.stream_max.as_secs()
                ))));
            }
            Err(e) => return Err(rejected(e)),
        };
        let split = match &chunk {
            Some(chunk) => {
                read += chunk.len();
                if read > limits.stream_max_bytes {
                    return Err(rejected(ApiError::payload_too_large(limits.stream_max_bytes)));
                }
                splitter.feed(chunk, &mut items)
            }
            None => splitter.finish(&mut items),
        };
        // The messages before a bad one are published; then the stream stops.
        for item in items.drain(..) {
            let (number, pending) = publish(item)?;
            tally.push(number, pending).await.map_err(|(n, e)| failed(format, n, e))?;
        }
        split.map_err(|e| rejected(split_error(e)))?;
        if chunk.is_none() {
            break;
        }
    }
    tally.finish().await.map_err(|(n, e)| failed(format, n, e))
}

fn split_error(e: SplitError) -> ApiError {
    match e {
        SplitError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, error_code::PAYLOAD_TOO_LARGE, e.to_string())
        }
        SplitError::NotUtf8(_) => ApiError::bad_request(e.to_string()),
    }
}

/// A publish of the stream failed: the error names the message.
fn failed(format: Format, number: u64, e: ApiError) -> ApiError {
    ApiError { message: format!("{} {number}: {}", format.unit(), e.message), ..e }
}
