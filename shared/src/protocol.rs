//! Wire protocol: WebSocket client ops and server frames, long-poll and publish bodies,
//! and the JSON error body of every HTTP endpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A WebSocket message from client to server, tagged by `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientOp {
    /// Start receiving messages of these channels.
    Subscribe {
        /// Channels to subscribe to.
        channels: Vec<String>,
        /// Resume position: the id of the last message received.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
    /// Stop receiving messages of these channels.
    Unsubscribe {
        /// Channels to leave.
        channels: Vec<String>,
    },
    /// Publish a message (only where the server allows it).
    Publish {
        /// Target channel.
        channel: String,
        /// Payload.
        data: String,
        /// Optional event name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
    },
    /// Application-level ping; answered with `pong`.
    Ping {
        /// Echoed back in the `pong`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
}

/// Names of the ops a client may send, for telling "unknown op" from "malformed op".
pub const CLIENT_OPS: &[&str] = &["subscribe", "unsubscribe", "publish", "ping"];

/// Resume position in a `subscribe` op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Since {
    /// One id, for every channel of the op.
    One(String),
    /// An id per channel.
    PerChannel(BTreeMap<String, String>),
}

/// A WebSocket message from server to client, tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// A published message.
    Message {
        /// Channel it was published to.
        channel: String,
        /// History position, if any.
        id: Option<String>,
        /// Event name, if any.
        event: Option<String>,
        /// Payload, verbatim.
        data: String,
    },
    /// Confirms a `subscribe`: messages of these channels now flow.
    Subscribed {
        /// The channels now subscribed.
        channels: Vec<String>,
        /// Whether missed messages were replayed from history.
        recovered: bool,
    },
    /// Confirms an `unsubscribe`.
    Unsubscribed {
        /// The channels left.
        channels: Vec<String>,
    },
    /// Something the client sent was refused, or the server is closing the connection.
    Error {
        /// Stable machine-readable code, see [`ErrorCode`].
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// History no longer covers the client's gap for this channel; live delivery goes on.
    Reset {
        /// The channel with the gap.
        channel: String,
    },
    /// Answer to a `ping` op.
    Pong {
        /// The ping's `id`, if it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
    /// Confirms a `publish` op.
    Published {
        /// Channel published to.
        channel: String,
        /// Assigned history position, if any.
        id: Option<String>,
    },
}

/// Error codes used in WebSocket `error` frames and HTTP error bodies.
pub mod error_code {
    /// The request or frame is malformed.
    pub const BAD_REQUEST: &str = "bad_request";
    /// A channel name breaks the rules.
    pub const INVALID_CHANNEL: &str = "invalid_channel";
    /// An event name breaks the rules.
    pub const INVALID_EVENT: &str = "invalid_event";
    /// More channels than one connection may hold.
    pub const TOO_MANY_CHANNELS: &str = "too_many_channels";
    /// The payload is larger than allowed.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// A WebSocket op this server does not know.
    pub const UNKNOWN_OP: &str = "unknown_op";
    /// Credentials are missing or wrong.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Credentials are fine but do not allow this.
    pub const FORBIDDEN: &str = "forbidden";
    /// No such route.
    pub const NOT_FOUND: &str = "not_found";
    /// The route exists but not for this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The client read too slowly and its queue overflowed; it is disconnected.
    pub const SLOW_CONSUMER: &str = "slow_consumer";
    /// The server is shutting down; reconnect (to another node).
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// The node holds its maximum number of connections; try again or another node.
    pub const OVER_CAPACITY: &str = "over_capacity";
    /// Too many connections or publishes from this client or key; retry after a second.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The message broker (Redis) is unavailable right now.
    pub const BROKER_UNAVAILABLE: &str = "broker_unavailable";
    /// The request's body stopped arriving (or a streaming publish ran too long).
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
}

/// JSON body of every HTTP error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code (see [`error_code`]).
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Body of `POST /api/publish`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// One target channel (or use `channels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Several target channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Payload.
    pub data: String,
    /// Optional event name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Optional key that suppresses duplicate publishes within a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Outcome of publishing to one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    /// The channel.
    pub channel: String,
    /// Assigned history position, or `null` for live-only delivery.
    pub id: Option<String>,
    /// Whether any gateway node had subscribers for the channel.
    pub subscribed: bool,
    /// The idempotency key was seen within its window: nothing was published again,
    /// and `id` is the first publish's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Body of a successful `POST /api/publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    /// One result per target channel, in request order.
    pub results: Vec<PublishResult>,
}

/// Body of a `GET /poll` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollResponse {
    /// Messages after the cursor, oldest first.
    pub messages: Vec<crate::Envelope>,
    /// Pass back as `cursor` on the next poll.
    pub cursor: String,
    /// True when messages may have been missed since the given cursor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// The channels with a possible gap, when `reset` is true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset_channels: Vec<String>,
}

/// WebSocket frame opcodes (RFC 6455 §5.2), for the gateway's frame codec and the load
/// generator's client.
pub mod opcode {
    /// A further fragment of a message.
    pub const CONTINUATION: u8 = 0x0;
    /// A UTF-8 text message.
    pub const TEXT: u8 = 0x1;
    /// A binary message.
    pub const BINARY: u8 = 0x2;
    /// Close (with an optional code and reason).
    pub const CLOSE: u8 = 0x8;
    /// Ping: answered with a pong carrying the same payload.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xa;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ops_parse() {
        let op: ClientOp =
            serde_json::from_str(r#"{"op":"subscribe","channels":["a","b"],"since":"5-0"}"#).unwrap();
        assert_eq!(
            op,
            ClientOp::Subscribe {
                channels: vec!["a".into(), "b".into()],
                since: Some(Since::One("5-0".into()))
            }
        );
        let op: ClientOp =
            serde_json::from_str(r#"{"op":"subscribe","channels":["a"],"since":{"a":"1-0"}}"#).unwrap();
        assert!(matches!(op, ClientOp::Subscribe { since: Some(Since::PerChannel(_)), .. }));
        assert!(serde_json::from_str::<ClientOp>(r#"{"op":"dance"}"#).is_err());
        assert!(serde_json::from_str::<ClientOp>(r#"{"op":"subscribe"}"#).is_err());
    }

    #[test]
    fn server_frames_are_tagged_by_type() {
        let json = serde_json::to_string(&ServerFrame::Reset { channel: "c".into() }).unwrap();
        assert_eq!(json, r#"{"type":"reset","channel":"c"}"#);
        let json = serde_json::to_string(&ServerFrame::Pong { id: None }).unwrap();
        assert_eq!(json, r#"{"type":"pong"}"#);
    }
}
