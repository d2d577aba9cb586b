//! Types shared by the gateway and its load tools: the message envelope, the WebSocket
//! and long-poll wire protocol, channel-name rules and SSE framing.
//!
//! # Layout
//! - [`channel`]: which channel and event names are valid, and why one is not.
//! - [`envelope`]: the JSON message envelope and the framing of gateway messages on Redis.
//! - [`position`]: history positions (stream ids) and compound resume ids.
//! - [`protocol`]: WebSocket ops and frames, long-poll and publish API bodies.
//! - [`sse`]: encoding Server-Sent Events and a spec-conformant incremental parser.
//!
//! This crate knows serde, not tokio, axum or Redis, so any client can use it.

pub mod channel;
pub mod envelope;
pub mod position;
pub mod protocol;
pub mod sse;

pub use channel::{ChannelError, validate_channel, validate_event};
pub use envelope::{Envelope, EnvelopeRef};
pub use position::{Resume, StreamPos};
