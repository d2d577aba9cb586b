//! The one publish path: every way in — `POST /publish/{channel}`, `POST /api/publish`,
//! the WebSocket `publish` op and `gateway publish` — checks a message with the same
//! rules ([`check`]) and, on a node, publishes it through the hub with the same
//! accounting ([`Publishing::publish`]). API keys and the publish rate limit live here
//! too, so each entry point only says where its message comes from; [`stream`] cuts a
//! streaming body (lines or SSE) into messages.

pub mod bodies;
pub mod stream;

use std::{future::Future, net::IpAddr};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use metrics::counter;
use shared::protocol::{PublishResult, error_code};
use subtle::ConstantTimeEq;

use self::bodies::BodyBudget;
use crate::{
    config::{Config, Limits, Secret},
    error::{ApiError, quote},
    hub::{Hub, Publish},
    metrics as m,
    ratelimit::SharedBuckets,
};

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// Who publishes, for the publish rate limit: the API key used, or the client's
/// address when publishing is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Publisher {
    /// The index of the configured API key that matched.
    Key(usize),
    /// The client's IP address (no API keys configured).
    Addr(IpAddr),
}

/// Checks one message against the limits: a valid channel name, a valid event name,
/// a payload within the size limit and valid UTF-8, and a well-formed idempotency key.
pub fn check(
    limits: &Limits,
    channel: &str,
    event: Option<&str>,
    data: &[u8],
    idempotency_key: Option<&str>,
) -> Result<(), ApiError> {
    shared::validate_channel(channel, limits.max_channel_len)
        .map_err(|e| ApiError::invalid_channel(channel, e))?;
    if let Some(e) = event {
        shared::validate_event(e).map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                error_code::INVALID_EVENT,
                format!("invalid event {}: {err}", quote(e)),
            )
        })?;
    }
    if data.len() > limits.max_payload_bytes {
        return Err(ApiError::payload_too_large(limits.max_payload_bytes));
    }
    if std::str::from_utf8(data).is_err() {
        return Err(ApiError::bad_request("payload must be UTF-8 text"));
    }
    match idempotency_key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN || k.chars().any(|c| c.is_control()) => {
            Err(ApiError::bad_request(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters without control characters"
            )))
        }
        _ => Ok(()),
    }
}

/// A node's publishing: its API keys, its publish rate limit and its limits.
#[derive(Debug)]
pub struct Publishing {
    keys: Vec<Secret>,
    limits: Limits,
    rate: SharedBuckets<Publisher>,
    bodies: BodyBudget,
}

impl Publishing {
    /// Publishing as `config` sets it up.
    pub fn new(config: &Config) -> Self {
        Self {
            keys: config.api_keys.clone(),
            limits: config.limits.clone(),
            rate: SharedBuckets::new(config.limits.publish_rate_per_key),
            bodies: BodyBudget::new(config.limits.max_body_bytes_in_flight),
        }
    }

    /// The node's budget of request-body bytes held at once.
    pub fn bodies(&self) -> &BodyBudget {
        &self.bodies
    }

    /// The limits messages are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks the publish API key (`X-API-Key: <key>` or `Authorization: Bearer <key>`)
    /// and says who publishes: the matching key, or `peer` when publishing is open.
    /// Keys are compared in constant time; every key is compared, so the time does not
    /// tell which one matched.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Option<Publisher>, ApiError> {
        if self.keys.is_empty() {
            return Ok(peer.map(Publisher::Addr));
        }
        let given = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| crate::auth::bearer(headers))
            .map(str::trim);
        let unauthorized = |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, error_code::UNAUTHORIZED, msg);
        let Some(given) = given else {
            return Err(rejected(unauthorized(
                "an API key is required: send X-API-Key or Authorization: Bearer <key>",
            )));
        };
        let mut matched = None;
        for (i, k) in self.keys.iter().enumerate() {
            if bool::from(k.expose().as_bytes().ct_eq(given.as_bytes())) {
                matched = Some(i);
            }
        }
        match matched {
            Some(i) => Ok(Some(Publisher::Key(i))),
            None => Err(rejected(unauthorized("invalid API key"))),
        }
    }

    /// Takes `messages` from `who`'s publish-rate bucket (nothing to take for an
    /// unknown publisher).
    pub fn charge(&self, who: Option<Publisher>, messages: usize) -> Result<(), ApiError> {
        let Some(who) = who else { return Ok(()) };
        let cost = u32::try_from(messages).unwrap_or(u32::MAX);
        if self.rate.take(who, cost) {
            return Ok(());
        }
        let rate = self.limits.publish_rate_per_key;
        let whom = if matches!(who, Publisher::Key(_)) { "this API key" } else { "this address" };
        Err(rejected(ApiError::rate_limited(
            "publish_rate",
            format!("more than {rate} messages a second from {whom}; retry shortly"),
        )))
    }

    /// [`check`]s a message against this node's limits; a refusal is counted.
    pub fn check(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<(), ApiError> {
        check(&self.limits, channel, event, data, idempotency_key).map_err(rejected)
    }

    /// Publishes a checked message with history through the hub. It is queued when
    /// this is called: publishes called one after another keep that order. The future
    /// borrows nothing, so a caller may keep several in flight.
    pub fn publish(
        &self,
        hub: &Hub,
        msg: Publish,
    ) -> impl Future<Output = Result<PublishResult, ApiError>> + Send + 'static {
        let channel = msg.channel.clone();
        let outcome = hub.publish(Publish { history: true, ..msg });
        async move {
            match outcome.await {
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
    }
}

/// A message with history, as the publish API takes it.
pub fn message(
    channel: String,
    data: Bytes,
    event: Option<String>,
    idempotency_key: Option<String>,
) -> Publish {
    Publish { channel, data, event, history: true, idempotency_key, sequence: None }
}

/// Counts a refused publish request and passes its error on.
pub fn rejected(err: ApiError) -> ApiError {
    counter!(m::PUBLISH_TOTAL, "result" => "rejected").increment(1);
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publishing(keys: &[&str]) -> Publishing {
        let config = Config { api_keys: keys.iter().map(|k| Secret::new(*k)).collect(), ..Config::default() };
        Publishing::new(&config)
    }

    #[test]
    fn api_key_from_either_header() {
        let p = publishing(&["k1", "k2"]);
        let mut h = HeaderMap::new();
        assert_eq!(p.authenticate(&h, None).unwrap_err().status, StatusCode::UNAUTHORIZED);
        h.insert("x-api-key", "k2".parse().unwrap());
        assert_eq!(p.authenticate(&h, None).unwrap(), Some(Publisher::Key(1)));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().unwrap());
        assert_eq!(p.authenticate(&h, None).unwrap(), Some(Publisher::Key(0)));
        h.insert("authorization", "Bearer k3".parse().unwrap());
        assert_eq!(p.authenticate(&h, None).unwrap_err().message, "invalid API key");
        let open = publishing(&[]);
        assert_eq!(open.authenticate(&HeaderMap::new(), None).unwrap(), None, "open without keys");
    }

    #[test]
    fn one_check_for_every_entry_point() {
        let limits = Limits { max_payload_bytes: 4, ..Limits::default() };
        assert!(check(&limits, "news", Some("goal"), b"1234", Some("k")).is_ok());
        assert_eq!(check(&limits, "__x", None, b"", None).unwrap_err().code, error_code::INVALID_CHANNEL);
        assert_eq!(check(&limits, "a", Some("a b"), b"", None).unwrap_err().code, error_code::INVALID_EVENT);
        assert_eq!(
            check(&limits, "a", None, b"12345", None).unwrap_err().code,
            error_code::PAYLOAD_TOO_LARGE
        );
        assert_eq!(check(&limits, "a", None, b"\xff", None).unwrap_err().code, error_code::BAD_REQUEST);
        assert_eq!(check(&limits, "a", None, b"", Some("")).unwrap_err().code, error_code::BAD_REQUEST);
    }
}
