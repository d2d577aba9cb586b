//! Publishing over HTTP: `POST /publish/{channel}` (raw body, or with `?stream=lines|sse`
//! a stream of messages over one request) and `POST /api/publish` (JSON, one or many
//! channels). Each checks the API key and the rate on the request's head, before a byte
//! of its body is read ([`body`]), then hands its messages to the one publish path
//! ([`crate::publish`]).

pub mod body;
mod stream;

use axum::{
    Extension, Json,
    extract::{Path, RawQuery, Request, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use shared::protocol::{PublishRequest, PublishResponse, error_code};

use crate::{
    error::ApiError,
    publish::{message, rejected, stream::Format},
    server::{ConnCtx, Query},
    state::AppState,
};

/// `POST /publish/{channel}`: the raw body is the payload; `?event=` names an event;
/// `?stream=lines|sse` publishes each line or event of the body as it arrives.
pub async fn publish_raw(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    channel: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Response {
    publish_raw_inner(state, ctx, channel, query, req).await.unwrap_or_else(IntoResponse::into_response)
}

async fn publish_raw_inner(
    state: AppState,
    ctx: Option<Extension<ConnCtx>>,
    channel: Result<Path<String>, PathRejection>,
    query: Option<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let publishing = &state.publishing;
    let who = publishing.authenticate(req.headers(), ctx.map(|c| c.peer.ip()))?;
    let Path(channel) = channel.map_err(|_| {
        rejected(ApiError::new(
            StatusCode::BAD_REQUEST,
            error_code::INVALID_CHANNEL,
            "invalid channel: the path must be /publish/<channel> with a UTF-8 channel name",
        ))
    })?;
    let query = Query::parse(query.as_deref());
    let event = query.get("event").map(str::to_owned);
    if let Some(format) = query.get("stream").filter(|f| !f.is_empty()) {
        let format: Format = format.parse().map_err(|e: String| rejected(ApiError::bad_request(e)))?;
        return Ok(stream::publish(&state, who, channel, event, format, req.into_body()).await);
    }
    publishing.check(&channel, event.as_deref(), b"", None)?;
    publishing.charge(who, 1)?;
    let idempotency_key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    rejected(ApiError::bad_request("the Idempotency-Key header must be visible ASCII"))
                })?
                .to_owned(),
        ),
    };
    let limits = publishing.limits();
    let (data, _held) = body::read_body(
        req.into_body(),
        limits.max_payload_bytes,
        state.config.timers.body_idle,
        publishing.bodies(),
    )
    .await
    .map_err(rejected)?;
    publishing.check(&channel, event.as_deref(), &data, idempotency_key.as_deref())?;
    let result = publishing.publish(&state.hub, message(channel, data, event, idempotency_key)).await?;
    Ok(Json(result).into_response())
}

/// `POST /api/publish`: JSON `{"channel" | "channels", "data", "event"?, "idempotency_key"?}`.
pub async fn publish_json(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    req: Request,
) -> Result<Json<PublishResponse>, ApiError> {
    let publishing = &state.publishing;
    let who = publishing.authenticate(req.headers(), ctx.map(|c| c.peer.ip()))?;
    check_json_content_type(req.headers())?;
    // JSON escaping can grow a payload up to six times (\uXXXX); the payload itself is
    // checked against the limit after parsing.
    let max = publishing.limits().max_payload_bytes.saturating_mul(6).saturating_add(64 * 1024);
    let (bytes, _held) =
        body::read_body(req.into_body(), max, state.config.timers.body_idle, publishing.bodies())
            .await
            .map_err(rejected)?;
    let Json(req) = Json::<PublishRequest>::from_bytes(&bytes)
        .map_err(|r| rejected(ApiError::bad_request(r.body_text())))?;
    let channels = match (req.channel, req.channels) {
        (Some(c), None) => vec![c],
        (None, Some(cs)) if !cs.is_empty() => cs,
        (Some(_), Some(_)) => {
            return Err(rejected(ApiError::bad_request("give either \"channel\" or \"channels\", not both")));
        }
        _ => {
            return Err(rejected(ApiError::bad_request(
                "\"channel\" or a non-empty \"channels\" list is required",
            )));
        }
    };
    let max = publishing.limits().max_channels_per_connection;
    if channels.len() > max {
        return Err(rejected(ApiError::too_many_channels(channels.len(), max)));
    }
    for ch in &channels {
        publishing.check(ch, req.event.as_deref(), req.data.as_bytes(), req.idempotency_key.as_deref())?;
    }
    // Charged once the request is known to be valid: one token per channel published to.
    publishing.charge(who, channels.len())?;
    let data = bytes::Bytes::from(req.data);
    let mut results = Vec::with_capacity(channels.len());
    for channel in channels {
        let msg = message(channel, data.clone(), req.event.clone(), req.idempotency_key.clone());
        results.push(publishing.publish(&state.hub, msg).await?);
    }
    Ok(Json(PublishResponse { results }))
}

/// A JSON body must say so: `Content-Type: application/json` (or `application/*+json`).
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| {
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if is_json {
        Ok(())
    } else {
        Err(rejected(ApiError::bad_request("Expected request with `Content-Type: application/json`")))
    }
}
