//! A message on its way to subscribers, with each wire encoding computed at most once
//! and shared (as `Bytes`) by every subscriber that needs it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use shared::{EnvelopeRef, StreamPos};

use crate::wire::{chunk, ws_frame};

/// One message for one channel, shared by every local subscriber via `Arc`.
#[derive(Debug)]
pub struct Delivery {
    /// The channel.
    pub channel: Arc<str>,
    /// History position, when the publisher assigned one.
    pub id: Option<Box<str>>,
    /// `id` parsed, for ordering and de-duplication.
    pub pos: Option<StreamPos>,
    /// Not a message but a notice that history could not cover a gap on `channel`.
    pub reset: bool,
    /// Part of the burst that ends an outage recovery (replayed from history, or held
    /// back while the replay was read): the node's own catch-up, handed to every
    /// subscriber at once, so it does not count against their queue limits.
    pub catch_up: bool,
    /// Event name, when the publisher named one.
    pub event: Option<Box<str>>,
    /// The payload as text (invalid UTF-8 is replaced, since every wire format is text).
    pub data: Bytes,
    /// Node-local sequence number within the channel (long-poll cursors).
    pub seq: u64,
    /// Publish time in ms since the Unix epoch, when the publisher stamped one.
    pub published_ms: Option<u64>,
    sse: OnceLock<Bytes>,
    sse_body: OnceLock<Bytes>,
    sse_json: OnceLock<Bytes>,
    sse_chunk: OnceLock<Bytes>,
    sse_json_chunk: OnceLock<Bytes>,
    json: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
    ws_frame: OnceLock<Bytes>,
}

impl Delivery {
    /// Builds a delivery; `data` is made valid UTF-8 here, once.
    pub fn new(
        channel: Arc<str>,
        id: Option<Box<str>>,
        event: Option<Box<str>>,
        data: Bytes,
        seq: u64,
        published_ms: Option<u64>,
    ) -> Self {
        let data = match std::str::from_utf8(&data) {
            Ok(_) => data,
            Err(_) => Bytes::from(String::from_utf8_lossy(&data).into_owned()),
        };
        let pos = id.as_deref().and_then(|i| i.parse().ok());
        Self {
            channel,
            id,
            pos,
            reset: false,
            catch_up: false,
            event,
            data,
            seq,
            published_ms,
            sse: OnceLock::new(),
            sse_body: OnceLock::new(),
            sse_json: OnceLock::new(),
            sse_chunk: OnceLock::new(),
            sse_json_chunk: OnceLock::new(),
            json: OnceLock::new(),
            ws: OnceLock::new(),
            ws_frame: OnceLock::new(),
        }
    }

    /// A notice that messages of `channel` were missed and cannot be recovered.
    pub fn reset(channel: Arc<str>, seq: u64) -> Self {
        let mut d = Self::new(channel, None, None, Bytes::new(), seq, None);
        d.reset = true;
        d
    }

    fn reset_json(&self) -> String {
        serde_json::json!({ "channel": &*self.channel }).to_string()
    }

    /// The payload as `&str` (always valid: checked in `new`).
    pub fn data_str(&self) -> &str {
        std::str::from_utf8(&self.data).unwrap_or_default()
    }

    /// The SSE event (`id:`, `event:`, `data:` lines), plain format. A reset is
    /// `event: reset` with `{"channel":...}` as data.
    pub fn sse(&self) -> &Bytes {
        self.sse.get_or_init(|| {
            let mut s = String::new();
            if self.reset {
                shared::sse::encode_event(&mut s, None, Some("reset"), &self.reset_json());
            } else {
                shared::sse::encode_event(&mut s, self.id.as_deref(), self.event.as_deref(), self.data_str());
            }
            Bytes::from(s)
        })
    }

    /// The SSE event without its `id:` line, for streams that write a compound id of
    /// their own in front of it.
    pub fn sse_body(&self, json: bool) -> Bytes {
        if json {
            let mut s = String::new();
            let data = std::str::from_utf8(self.json()).unwrap_or_default();
            shared::sse::encode_event(&mut s, None, self.event.as_deref(), data);
            return Bytes::from(s);
        }
        self.sse_body
            .get_or_init(|| {
                let mut s = String::new();
                shared::sse::encode_event(&mut s, None, self.event.as_deref(), self.data_str());
                Bytes::from(s)
            })
            .clone()
    }

    /// The JSON envelope `{"channel","id","event","data"}` (long-poll, SSE `format=json`).
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            let env = EnvelopeRef {
                channel: &self.channel,
                id: self.id.as_deref(),
                event: self.event.as_deref(),
                data: self.data_str(),
            };
            Bytes::from(serde_json::to_vec(&env).expect("envelope serializes"))
        })
    }

    /// The SSE event carrying the JSON envelope as data (`format=json`).
    pub fn sse_json(&self) -> Bytes {
        if self.reset {
            return self.sse().clone();
        }
        self.sse_json
            .get_or_init(|| {
                // The envelope has no raw line breaks, so it is one `data:` line.
                let json = self.json();
                let mut s = String::with_capacity(json.len() + 32);
                shared::sse::encode_event(
                    &mut s,
                    self.id.as_deref(),
                    self.event.as_deref(),
                    std::str::from_utf8(json).unwrap_or_default(),
                );
                Bytes::from(s)
            })
            .clone()
    }

    /// [`Self::sse`] (with `json`, [`Self::sse_json`]) framed as one HTTP/1.1 chunk,
    /// written as is to every subscriber's socket.
    pub fn sse_chunk(&self, json: bool) -> &Bytes {
        let cell = if json { &self.sse_json_chunk } else { &self.sse_chunk };
        cell.get_or_init(|| {
            let event = if json { self.sse_json() } else { self.sse().clone() };
            chunk::frame(&event)
        })
    }

    /// The WebSocket text frame `{"type":"message",...}`.
    pub fn ws(&self) -> &Bytes {
        self.ws.get_or_init(|| {
            if self.reset {
                return Bytes::from(
                    serde_json::to_vec(&shared::protocol::ServerFrame::Reset {
                        channel: self.channel.to_string(),
                    })
                    .expect("frame serializes"),
                );
            }
            let json = self.json();
            let mut v = Vec::with_capacity(json.len() + 17);
            v.extend_from_slice(br#"{"type":"message","#);
            v.extend_from_slice(&json[1..]);
            Bytes::from(v)
        })
    }

    /// [`Self::ws`] as a whole WebSocket text frame, header included. Server frames are
    /// not masked, so every subscriber's socket gets these same bytes.
    pub fn ws_frame(&self) -> &Bytes {
        self.ws_frame.get_or_init(|| Bytes::from(ws_frame::encode(ws_frame::opcode::TEXT, self.ws())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(data: &[u8]) -> Delivery {
        Delivery::new("news".into(), Some("1-0".into()), None, Bytes::copy_from_slice(data), 1, None)
    }

    #[test]
    fn encodings_match_the_contract() {
        let d = delivery("a\nb ✓".as_bytes());
        assert_eq!(&d.sse()[..], "id: 1-0\ndata: a\ndata: b ✓\n\n".as_bytes());
        assert_eq!(&d.json()[..], r#"{"channel":"news","id":"1-0","event":null,"data":"a\nb ✓"}"#.as_bytes());
        let ws: shared::protocol::ServerFrame = serde_json::from_slice(d.ws()).unwrap();
        assert_eq!(
            ws,
            shared::protocol::ServerFrame::Message {
                channel: "news".into(),
                id: Some("1-0".into()),
                event: None,
                data: "a\nb ✓".into()
            }
        );
        assert_eq!(
            &d.sse_json()[..],
            format!("id: 1-0\ndata: {}\n\n", std::str::from_utf8(d.json()).unwrap()).as_bytes()
        );
    }

    #[test]
    fn encodings_are_computed_once_and_shared() {
        let d = delivery(b"x");
        assert_eq!(d.ws().as_ptr(), d.ws().as_ptr());
        assert_eq!(d.sse().as_ptr(), d.sse().as_ptr());
        assert_eq!(d.ws_frame().as_ptr(), d.ws_frame().as_ptr());
        assert_eq!(d.sse_json().as_ptr(), d.sse_json().as_ptr());
        assert_eq!(&d.sse_chunk(false)[..], b"11\r\nid: 1-0\ndata: x\n\n\r\n");
        assert_eq!(chunk::data(d.sse_chunk(true)), d.sse_json());
        assert_eq!(&d.ws_frame()[2..], &d.ws()[..], "a short frame: two header bytes");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let d = delivery(b"ok \xff end");
        assert_eq!(d.data_str(), "ok \u{fffd} end");
    }
}
