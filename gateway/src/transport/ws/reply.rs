//! What the server tells a WebSocket client besides its messages: `error` frames for
//! refused input (counted like HTTP rejections), why a session ended, and the close
//! codes of its own.

use shared::protocol::ServerFrame;

/// Close code when the subscriber's token expires: reconnect with a fresh token.
pub const TOKEN_EXPIRED: u16 = 4001;

/// An `error` frame; refusals of client input are counted like HTTP rejections.
pub fn error(code: &'static str, message: &str) -> ServerFrame {
    if code != shared::protocol::error_code::SLOW_CONSUMER {
        metrics::counter!(crate::metrics::REJECTED_TOTAL, "reason" => code).increment(1);
    }
    ServerFrame::Error { code: code.to_owned(), message: message.to_owned() }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The client sent a close frame (with this code).
    ClientClosed(Option<u16>),
    ClientGone,
    /// The hub closed it: its queue overflowed.
    Slow,
    /// A write took no byte for a ping interval: the client stopped reading.
    Stalled,
    Shutdown,
    Timeout,
    Expired,
    TooBig,
    Protocol,
    /// A text message or close reason that is not UTF-8 (1007).
    InvalidData,
    Internal,
}
