//! Publishing over HTTP: `POST /publish/{channel}` (raw body) and `POST /api/publish`
//! (JSON, one or many channels), guarded by the API key(s) when configured.

use axum::{
    Json,
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
    transport::Query,
};

/// Checks the publish API key: `X-API-Key: <key>` or `Authorization: Bearer <key>`.
/// Open when no key is configured. Keys are compared in constant time.
pub fn check_api_key(headers: &HeaderMap, keys: &[Secret]) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
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
    let ok = keys.iter().fold(0u8, |acc, k| acc | k.expose().as_bytes().ct_eq(given.as_bytes()).unwrap_u8());
    if ok == 1 { Ok(()) } else { Err(unauthorized("invalid API key")) }
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
    channel: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PublishResult>, ApiError> {
    check_api_key(&headers, &state.config.api_keys).map_err(reject)?;
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
    headers: HeaderMap,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Json<PublishResponse>, ApiError> {
    check_api_key(&headers, &state.config.api_keys).map_err(reject)?;
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
        assert!(check_api_key(&h, &keys).is_ok());
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().unwrap());
        assert!(check_api_key(&h, &keys).is_ok());
        h.insert("authorization", "Bearer k3".parse().unwrap());
        assert_eq!(check_api_key(&h, &keys).unwrap_err().message, "invalid API key");
        assert!(check_api_key(&HeaderMap::new(), &[]).is_ok(), "open without keys");
    }
}
