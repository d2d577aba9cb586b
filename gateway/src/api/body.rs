//! Reading publish request bodies safely: only after the API key passed (the handlers'
//! job), never longer than the body keeps arriving (`--body-timeout-secs`, then 408),
//! never larger than its limit (413), and within a node-wide budget of body bytes held
//! at once (`--max-body-bytes-in-flight`, then 503), so slow or huge bodies cannot pin
//! a node's memory.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// The node's budget of request-body bytes held at once.
#[derive(Debug)]
pub struct BodyBudget {
    held: AtomicUsize,
    max: usize,
}

/// Bytes taken from a [`BodyBudget`]; given back on drop.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl BodyBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { held: AtomicUsize::new(0), max }
    }

    /// An empty hold to grow as a body arrives.
    pub fn hold(&self) -> Held<'_> {
        Held { budget: self, bytes: 0 }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

impl Held<'_> {
    /// Takes `n` more bytes, or refuses when the node holds its budget already.
    pub fn grow(&mut self, n: usize) -> Result<(), ApiError> {
        let budget = self.budget;
        let before = budget.held.fetch_add(n, Ordering::AcqRel);
        if before + n > budget.max {
            budget.held.fetch_sub(n, Ordering::AcqRel);
            metrics::counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "body_bytes").increment(1);
            return Err(ApiError::over_capacity(
                "this node holds as many request bodies as it may; retry shortly or use another node",
            ));
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_size_and_frees_on_drop() {
        let budget = BodyBudget::new(10);
        let mut a = budget.hold();
        a.grow(6).unwrap();
        let mut b = budget.hold();
        assert_eq!(b.grow(5).unwrap_err().status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        b.grow(4).unwrap();
        assert_eq!(budget.held(), 10);
        drop(a);
        assert_eq!(budget.held(), 4);
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
