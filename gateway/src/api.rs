//! Publishing over HTTP: `POST /publish/{channel}` (raw body) and `POST /api/publish`
//! (JSON, one or many channels). Both take their message apart and hand it to the one
//! publish path ([`crate::publish`]): API key, rate limit, checks, publish.

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{
        Path, RawQuery, State,
        rejection::{BytesRejection, JsonRejection, PathRejection},
    },
    http::{HeaderMap, StatusCode},
};
use shared::protocol::{PublishRequest, PublishResponse, PublishResult, error_code};

use crate::{
    error::ApiError,
    publish::rejected,
    server::{ConnCtx, Query},
    state::AppState,
};

/// `POST /publish/{channel}`: the raw body is the payload; `?event=` names an event.
pub async fn publish_raw(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    channel: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PublishResult>, ApiError> {
    let publishing = &state.publishing;
    let who = publishing.authenticate(&headers, ctx.map(|c| c.peer.ip()))?;
    publishing.charge(who, 1)?;
    let Path(channel) = channel.map_err(|_| {
        rejected(ApiError::new(
            StatusCode::BAD_REQUEST,
            error_code::INVALID_CHANNEL,
            "invalid channel: the path must be /publish/<channel> with a UTF-8 channel name",
        ))
    })?;
    let body = body.map_err(|r| {
        rejected(body_error(&state, r.status(), format!("cannot read body: {}", r.body_text())))
    })?;
    let query = Query::parse(query.as_deref());
    let event = query.get("event").map(str::to_owned);
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    rejected(ApiError::bad_request("the Idempotency-Key header must be visible ASCII"))
                })?
                .to_owned(),
        ),
    };
    publishing.check(&channel, event.as_deref(), &body, idempotency_key.as_deref())?;
    publishing.publish(&state.hub, channel, body, event, idempotency_key).await.map(Json)
}

/// `POST /api/publish`: JSON `{"channel" | "channels", "data", "event"?, "idempotency_key"?}`.
pub async fn publish_json(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    headers: HeaderMap,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Json<PublishResponse>, ApiError> {
    let publishing = &state.publishing;
    let who = publishing.authenticate(&headers, ctx.map(|c| c.peer.ip()))?;
    let Json(req) = body.map_err(|r| rejected(body_error(&state, r.status(), r.body_text())))?;
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
    let data = Bytes::from(req.data);
    let mut results = Vec::with_capacity(channels.len());
    for channel in channels {
        let result = publishing
            .publish(&state.hub, channel, data.clone(), req.event.clone(), req.idempotency_key.clone())
            .await?;
        results.push(result);
    }
    Ok(Json(PublishResponse { results }))
}

/// The answer to a body that could not be read: too large, or else `text`.
fn body_error(state: &AppState, status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(state.config.limits.max_payload_bytes)
    } else {
        ApiError::bad_request(text)
    }
}
