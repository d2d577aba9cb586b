//! Errors shown to HTTP clients: a status, a stable code and a human message as JSON
//! (`{"error":"code","message":"..."}`), never internals. Each one is counted.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use shared::protocol::{ErrorBody, error_code as code};

use crate::metrics as m;

/// An error answer to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code from [`shared::protocol::error_code`].
    pub code: &'static str,
    /// Explanation for people.
    pub message: String,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    /// 400 with `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code::BAD_REQUEST, message)
    }
    /// 400 for a channel name that breaks the rules.
    pub fn invalid_channel(name: &str, err: shared::ChannelError) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            code::INVALID_CHANNEL,
            format!("invalid channel {}: {err}", quote(name)),
        )
    }
    /// 400 for more channels than allowed.
    pub fn too_many_channels(asked: usize, max: usize) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            code::TOO_MANY_CHANNELS,
            format!("{asked} channels requested, at most {max} per connection"),
        )
    }
    /// 413 for an oversized payload.
    pub fn payload_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::PAYLOAD_TOO_LARGE,
            format!("payload larger than the limit of {max} bytes"),
        )
    }
    /// 503 while the broker cannot be reached.
    pub fn broker_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::BROKER_UNAVAILABLE,
            "the message broker is unavailable, try again shortly",
        )
    }
    /// 429 when a rate limit (`limit`: `connect_rate`, `publish_rate`) trips; counted
    /// by limit too.
    pub fn rate_limited(limit: &'static str, message: impl Into<String>) -> Self {
        metrics::counter!(m::LIMIT_REJECTIONS_TOTAL, "limit" => limit).increment(1);
        Self::new(StatusCode::TOO_MANY_REQUESTS, code::RATE_LIMITED, message)
    }
    /// 408 when a request body stops arriving.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, code::REQUEST_TIMEOUT, message)
    }
    /// 503 when the node holds as much as it may (connections, bodies in flight).
    pub fn over_capacity(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code::OVER_CAPACITY, message)
    }
    /// 503 while the node shuts down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::SHUTTING_DOWN,
            "this node is shutting down, reconnect",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!(m::REJECTED_TOTAL, "reason" => self.code).increment(1);
        let mut resp = (self.status, Json(ErrorBody { error: self.code.to_owned(), message: self.message }))
            .into_response();
        // The request body may be left unread: say so instead of letting a keep-alive
        // client send its next request on a connection the server then drops.
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::UNAUTHORIZED
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
        ) {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            // Only `/ws` asks for an upgrade: name the protocol and its one version
            // (RFC 6455 §4.4), so a client with another version knows what to speak.
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        resp
    }
}

/// Quotes client input for messages and logs: control characters escaped, long input cut.
pub fn quote(input: &str) -> String {
    const MAX: usize = 80;
    let mut s: String = input.chars().take(MAX).collect();
    if s.len() < input.len() {
        s.push('…');
    }
    format!("\"{}\"", s.escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_and_truncates() {
        assert_eq!(quote("a\nb"), r#""a\nb""#);
        assert_eq!(quote(&"x".repeat(100)).chars().count(), 83);
    }
}
