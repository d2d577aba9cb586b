//! Reading publish request bodies safely: only after the API key passed (the handlers'
//! job), never longer than the body keeps arriving (`--body-timeout-secs`, then 408),
//! never larger than its limit (413), and within a node-wide budget of body bytes held
//! at once (`--max-body-bytes-in-flight`, then 503), so slow or huge bodies cannot pin
//! a node's memory.

use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::{
    error::ApiError,
    publish::bodies::{BodyBudget, Held},
};

/// The next piece of a body: `Ok(None)` at its end; 408 when nothing arrives for
/// `idle`; 400 when the client's side of it fails.
pub async fn next_chunk(body: &mut Body, idle: Duration) -> Result<Option<Bytes>, ApiError> {
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(ApiError::request_timeout(format!(
                    "the request body sent nothing for {} s",
                    idle.as_secs()
                )));
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(ApiError::bad_request(format!("cannot read body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
        // Trailers: nothing to publish.
    }
}

/// Reads a whole body of at most `max` bytes, holding its bytes in `budget` while it
/// is read; the returned hold keeps them counted until dropped.
pub async fn read_body<'a>(
    mut body: Body,
    max: usize,
    idle: Duration,
    budget: &'a BodyBudget,
) -> Result<(Bytes, Held<'a>), ApiError> {
    let mut held = budget.hold();
    let mut out = BytesMut::new();
    while let Some(chunk) = next_chunk(&mut body, idle).await? {
        if out.len() + chunk.len() > max {
            return Err(ApiError::payload_too_large(max));
        }
        held.grow(chunk.len())?;
        out.extend_from_slice(&chunk);
    }
    Ok((out.freeze(), held))
}
