//! The message envelope clients see, and how the gateway frames messages on Redis.
//!
//! A raw `PUBLISH news hello` carries only the payload. Messages the gateway publishes
//! itself may carry an event name or a history position; on Redis these are framed as
//! [`FRAME_MAGIC`], a one-line JSON header, a newline, then the payload bytes verbatim,
//! so payloads are never re-escaped and `redis-cli SUBSCRIBE` still shows them readably.

use serde::{Deserialize, Serialize};

/// One delivered message, as clients receive it in JSON form (WebSocket, long-poll,
/// SSE with `format=json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Channel the message was published to.
    pub channel: String,
    /// History position, when the message has one; resume from it.
    pub id: Option<String>,
    /// Event name, when the publisher named one.
    pub event: Option<String>,
    /// The payload, verbatim.
    pub data: String,
}

/// Borrowed form of [`Envelope`], for serializing without copying.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EnvelopeRef<'a> {
    /// Channel the message was published to.
    pub channel: &'a str,
    /// History position, if any.
    pub id: Option<&'a str>,
    /// Event name, if any.
    pub event: Option<&'a str>,
    /// The payload.
    pub data: &'a str,
}

/// First bytes of a gateway-framed Redis payload. A NUL byte never starts text that
/// people publish by hand, so raw payloads are not mistaken for frames.
pub const FRAME_MAGIC: &[u8] = b"\x00fo1\n";

/// Header of a gateway-framed payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameHeader {
    /// History position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Event name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Publish time, milliseconds since the Unix epoch (for latency measurement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// What makes a retried publish the same message (its idempotency key or stream
    /// sequence): a node drops a repeat that a failover let through with a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Frames a payload with a header for publishing on Redis.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(header).expect("header serializes");
    let mut out = Vec::with_capacity(FRAME_MAGIC.len() + head.len() + 1 + payload.len());
    out.extend_from_slice(FRAME_MAGIC);
    out.extend_from_slice(&head);
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Splits a Redis payload into header and payload. Raw payloads come back with an
/// empty header and unchanged; a frame with a broken header is treated as raw, so a
/// message is never lost to a parse error.
pub fn decode_frame(raw: &[u8]) -> (FrameHeader, &[u8]) {
    if let Some(rest) = raw.strip_prefix(FRAME_MAGIC)
        && let Some(nl) = rest.iter().position(|&b| b == b'\n')
        && let Ok(header) = serde_json::from_slice::<FrameHeader>(&rest[..nl])
    {
        return (header, &rest[nl + 1..]);
    }
    (FrameHeader::default(), raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_keeps_payload_verbatim() {
        let header = FrameHeader { id: Some("1-0".into()), event: Some("score".into()), ts: None, key: None };
        let payload = "line 1\nline 2\r\nünïcødé \0 end".as_bytes();
        let framed = encode_frame(&header, payload);
        let (h, p) = decode_frame(&framed);
        assert_eq!(h, header);
        assert_eq!(p, payload);
    }

    #[test]
    fn raw_and_broken_frames_pass_through() {
        assert_eq!(decode_frame(b"hello"), (FrameHeader::default(), &b"hello"[..]));
        let broken = b"\x00fo1\n{not json\npayload";
        assert_eq!(decode_frame(broken), (FrameHeader::default(), &broken[..]));
    }

    #[test]
    fn envelope_json_has_all_fields() {
        let json =
            serde_json::to_string(&EnvelopeRef { channel: "c", id: None, event: Some("e"), data: "d\n" })
                .unwrap();
        assert_eq!(json, r#"{"channel":"c","id":null,"event":"e","data":"d\n"}"#);
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back.data, "d\n");
    }
}
