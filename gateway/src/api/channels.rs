//! `GET /api/channels/{channel}`: a channel's subscribers over every live node
//! (`{"channel","subscribers","nodes"}`). On the public listener it needs the publish
//! API key when keys are configured; the admin listener serves it without one.

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
};
use serde_json::{Value, json};
use shared::protocol::error_code;

use crate::{error::ApiError, state::AppState};

/// The public route: checks the API key, then answers.
pub async fn occupancy(
    State(state): State<AppState>,
    headers: HeaderMap,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    state.publishing.authenticate(&headers, None)?;
    answer(&state, channel).await
}

/// The answer for `channel`, on either listener.
pub async fn answer(
    state: &AppState,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Ok(Path(channel)) = channel else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, error_code::INVALID_CHANNEL, "invalid channel"));
    };
    shared::validate_channel(&channel, state.config.limits.max_channel_len)
        .map_err(|e| ApiError::invalid_channel(&channel, e))?;
    match state.hub.occupancy(&channel).await {
        Ok(o) => Ok(Json(json!({ "channel": channel, "subscribers": o.subscribers, "nodes": o.nodes }))),
        Err(err) => {
            tracing::warn!(%err, "occupancy unavailable");
            Err(ApiError::broker_unavailable())
        }
    }
}
