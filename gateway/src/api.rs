//! Publishing over HTTP: `POST /publish/{channel}` (raw body) and `POST /api/publish`
//! (JSON, one or many channels), guarded by the API key(s) when configured.

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{
        Path, RawQuery, State,
        rejection::{BytesRejection, JsonRejection, PathRejection},
    },
    http::{HeaderMap, StatusCode},
};
use metrics::counter;
use shared::protocol::{PublishRequest, PublishResponse, PublishResult, error_code};
use subtle::ConstantTimeEq;

use crate::{
    app::AppState,
    broker::Publish,
    config::Secret,
    error::{ApiError, quote},
    metrics as m,
    server::ConnCtx,
    transport::Query,
};

/// Who publishes, for the publish rate limit: the API key used, or the client's
/// address when publishing is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Publisher {
    /// The index of the configured API key that matched.
    Key(usize),
    /// The client's IP address (no API keys configured).
    Addr(std::net::IpAddr),
}

/// Checks the publish API key: `X-API-Key: <key>` or `Authorization: Bearer <key>`.
/// Open when no key is configured. Keys are compared in constant time; every key is
/// compared, so the time does not tell which one matched. Returns the matching key's
/// index (`None` when publishing is open).
pub fn check_api_key(headers: &HeaderMap, keys: &[Secret]) -> Result<Option<usize>, ApiError> {
    if keys.is_empty() {
        return Ok(None);
    }
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        })
        .map(str::trim);
    let unauthorized = |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, error_code::UNAUTHORIZED, msg);
    let Some(given) = given else {
        return Err(unauthorized("an API key is required: send X-API-Key or Authorization: Bearer <key>"));
    };
    let mut matched = None;
    for (i, k) in keys.iter().enumerate() {
        if bool::from(k.expose().as_bytes().ct_eq(given.as_bytes())) {
            matched = Some(i);
        }
    }
    match matched {
        Some(i) => Ok(Some(i)),
        None => Err(unauthorized("invalid API key")),
    }
}

/// Takes `messages` from the publish-rate bucket of the publisher (`key`, the index
/// [`check_api_key`] returned, or else the client's address).
fn take_publish_tokens(
    state: &AppState,
    key: Option<usize>,
    ctx: Option<&ConnCtx>,
    messages: usize,
) -> Result<(), ApiError> {
    let who = match (key, ctx) {
        (Some(i), _) => Publisher::Key(i),
        (None, Some(ctx)) => Publisher::Addr(ctx.peer.ip()),
        (None, None) => return Ok(()),
    };
    let cost = u32::try_from(messages).unwrap_or(u32::MAX);
    if state.publish_limit.take(who, cost) {
        return Ok(());
    }
    let rate = state.config.limits.publish_rate_per_key;
    let whom = if key.is_some() { "this API key" } else { "this address" };
    Err(reject(ApiError::rate_limited(
        "publish_rate",
        format!("more than {rate} messages a second from {whom}; retry shortly"),
    )))
}

fn check_payload(state: &AppState, len: usize) -> Result<(), ApiError> {
    let max = state.config.limits.max_payload_bytes;
    if len > max { Err(ApiError::payload_too_large(max)) } else { Ok(()) }
}

fn check_event(event: Option<&str>) -> Result<(), ApiError> {
    match event {
        Some(e) => shared::validate_event(e).map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                error_code::INVALID_EVENT,
                format!("invalid event {}: {err}", quote(e)),
            )
        }),
        None => Ok(()),
    }
}

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

fn check_idempotency_key(key: Option<&str>) -> Result<(), ApiError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN || k.chars().any(|c| c.is_control()) => {
            Err(ApiError::bad_request(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters without control characters"
            )))
        }
        _ => Ok(()),
    }
}

async fn publish_one(state: &AppState, msg: Publish) -> Result<PublishResult, ApiError> {
    let channel = msg.channel.clone();
    match state.hub.broker().publish(msg).await {
        Ok(outcome) => {
            let result = if outcome.duplicate { "duplicate" } else { "ok" };
            counter!(m::PUBLISH_TOTAL, "result" => result).increment(1);
            Ok(PublishResult {
                channel,
                id: outcome.id,
                subscribed: outcome.subscribed,
                duplicate: outcome.duplicate,
            })
        }
        Err(err) => {
            counter!(m::PUBLISH_TOTAL, "result" => "broker_error").increment(1);
            tracing::warn!(%err, "publish failed");
            Err(ApiError::broker_unavailable())
        }
    }
}

fn reject(err: ApiError) -> ApiError {
    counter!(m::PUBLISH_TOTAL, "result" => "rejected").increment(1);
    err
}

/// `POST /publish/{channel}`: the raw body is the payload; `?event=` names an event.
pub async fn publish_raw(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    channel: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PublishResult>, ApiError> {
    let key = check_api_key(&headers, &state.config.api_keys).map_err(reject)?;
    take_publish_tokens(&state, key, ctx.as_deref(), 1)?;
    let Path(channel) = channel.map_err(|_| {
        reject(ApiError::new(
            StatusCode::BAD_REQUEST,
            error_code::INVALID_CHANNEL,
            "invalid channel: the path must be /publish/<channel> with a UTF-8 channel name",
        ))
    })?;
    shared::validate_channel(&channel, state.config.limits.max_channel_len)
        .map_err(|e| reject(ApiError::invalid_channel(&channel, e)))?;
    let body = body.map_err(|r| {
        reject(if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.config.limits.max_payload_bytes)
        } else {
            ApiError::bad_request(format!("cannot read body: {}", r.body_text()))
        })
    })?;
    check_payload(&state, body.len()).map_err(reject)?;
    if std::str::from_utf8(&body).is_err() {
        return Err(reject(ApiError::bad_request("payload must be UTF-8 text")));
    }
    let query = Query::parse(query.as_deref());
    let event = query.get("event").map(str::to_owned);
    check_event(event.as_deref()).map_err(reject)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    reject(ApiError::bad_request("the Idempotency-Key header must be visible ASCII"))
                })?
                .to_owned(),
        ),
    };
    check_idempotency_key(idempotency_key.as_deref()).map_err(reject)?;
    publish_one(&state, Publish { channel, data: body, event, history: true, idempotency_key })
        .await
        .map(Json)
}

/// `POST /api/publish`: JSON `{"channel" | "channels", "data", "event"?}`.
pub async fn publish_json(
    State(state): State<AppState>,
    ctx: Option<Extension<ConnCtx>>,
    headers: HeaderMap,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Json<PublishResponse>, ApiError> {
    let key = check_api_key(&headers, &state.config.api_keys).map_err(reject)?;
    let Json(req) = body.map_err(|r| {
        reject(if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.config.limits.max_payload_bytes)
        } else {
            ApiError::bad_request(r.body_text())
        })
    })?;
    let channels = match (req.channel, req.channels) {
        (Some(c), None) => vec![c],
        (None, Some(cs)) if !cs.is_empty() => cs,
        (Some(_), Some(_)) => {
            return Err(reject(ApiError::bad_request("give either \"channel\" or \"channels\", not both")));
        }
        _ => {
            return Err(reject(ApiError::bad_request(
                "\"channel\" or a non-empty \"channels\" list is required",
            )));
        }
    };
    check_idempotency_key(req.idempotency_key.as_deref()).map_err(reject)?;
    let limits = &state.config.limits;
    if channels.len() > limits.max_channels_per_connection {
        return Err(reject(ApiError::too_many_channels(channels.len(), limits.max_channels_per_connection)));
    }
    for ch in &channels {
        shared::validate_channel(ch, limits.max_channel_len)
            .map_err(|e| reject(ApiError::invalid_channel(ch, e)))?;
    }
    check_event(req.event.as_deref()).map_err(reject)?;
    check_payload(&state, req.data.len()).map_err(reject)?;
    // Charged once the request is known to be valid: one token per channel published to.
    take_publish_tokens(&state, key, ctx.as_deref(), channels.len())?;
    let data = Bytes::from(req.data);
    let mut results = Vec::with_capacity(channels.len());
    for channel in channels {
        results.push(
            publish_one(
                &state,
                Publish {
                    channel,
                    data: data.clone(),
                    event: req.event.clone(),
                    history: true,
                    idempotency_key: req.idempotency_key.clone(),
                },
            )
            .await?,
        );
    }
    Ok(Json(PublishResponse { results }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_from_either_header() {
        let keys = vec![Secret::new("k1"), Secret::new("k2")];
        let mut h = HeaderMap::new();
        assert_eq!(check_api_key(&h, &keys).unwrap_err().status, StatusCode::UNAUTHORIZED);
        h.insert("x-api-key", "k2".parse().unwrap());
        assert_eq!(check_api_key(&h, &keys).unwrap(), Some(1));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().unwrap());
        assert_eq!(check_api_key(&h, &keys).unwrap(), Some(0));
        h.insert("authorization", "Bearer k3".parse().unwrap());
        assert_eq!(check_api_key(&h, &keys).unwrap_err().message, "invalid API key");
        assert_eq!(check_api_key(&HeaderMap::new(), &[]).unwrap(), None, "open without keys");
    }
}
