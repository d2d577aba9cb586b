//! Server-Sent Events framing: an encoder that keeps any payload intact and an
//! incremental parser that follows the WHATWG event-stream rules (used by tests and the
//! load generator, and by anyone writing a non-browser client).
//!
//! SSE treats CR, LF and CRLF all as line ends, so a payload line break of any kind
//! becomes a new `data:` line and reaches an `EventSource` as `\n`. Payloads that must
//! keep `\r` byte-for-byte should use `format=json`.

/// Appends one event to `out`: `id:` and `event:` lines when given, one `data:` line per
/// payload line, and the blank line that ends the event. `id` and `event` must not hold
/// CR or LF (the gateway validates them before they get here).
pub fn encode_event(out: &mut String, id: Option<&str>, event: Option<&str>, data: &str) {
    out.reserve(data.len() + 16);
    if let Some(id) = id {
        push_field(out, "id", id);
    }
    if let Some(event) = event {
        push_field(out, "event", event);
    }
    let mut rest = data;
    loop {
        match rest.find(['\r', '\n']) {
            Some(i) => {
                push_field(out, "data", &rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                push_field(out, "data", rest);
                break;
            }
        }
    }
    out.push('\n');
}

fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    if !value.is_empty() {
        out.push(' ');
        out.push_str(value);
    }
    out.push('\n');
}

/// Appends a comment line (ignored by clients; used for heartbeats).
pub fn encode_comment(out: &mut String, text: &str) {
    out.push(':');
    if !text.is_empty() {
        out.push(' ');
        out.push_str(text);
    }
    out.push_str("\n\n");
}

/// Appends a `retry:` field telling clients how long to wait before reconnecting.
pub fn encode_retry(out: &mut String, millis: u64) {
    out.push_str("retry: ");
    out.push_str(&millis.to_string());
    out.push_str("\n\n");
}

/// One dispatched event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id seen on the stream when this event was dispatched.
    pub id: Option<String>,
    /// Event type; `None` means the default `message`.
    pub event: Option<String>,
    /// Data lines joined with `\n`.
    pub data: String,
}

/// Incremental parser: feed bytes as they arrive, get whole events back.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    data: String,
    has_data: bool,
    event: Option<String>,
    last_id: Option<String>,
    retry: Option<u64>,
    comments: usize,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest `retry:` value seen, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// The last event id seen (what a browser would send as `Last-Event-ID`).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// How many comment lines (heartbeats) were seen.
    pub fn comments(&self) -> usize {
        self.comments
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut events);
                }
                b'\n' => self.end_line(&mut events),
                _ => self.line.push(b),
            }
        }
        events
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        let mut line = std::mem::take(&mut self.line);
        if !self.started {
            self.started = true;
            if line.starts_with("\u{feff}".as_bytes()) {
                line.drain(..3);
            }
        }
        let line = String::from_utf8_lossy(&line);
        if line.is_empty() {
            if self.has_data {
                events.push(SseEvent {
                    id: self.last_id.clone(),
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.data.clear();
            self.has_data = false;
            self.event = None;
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (name, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&line[..], ""),
        };
        match name {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(id: Option<&str>, event: Option<&str>, data: &str) -> String {
        let mut s = String::new();
        encode_event(&mut s, id, event, data);
        s
    }

    #[test]
    fn single_line_payload() {
        assert_eq!(encode(None, None, "hello"), "data: hello\n\n");
        assert_eq!(encode(Some("7-0"), Some("score"), "x"), "id: 7-0\nevent: score\ndata: x\n\n");
    }

    #[test]
    fn every_line_break_kind_becomes_a_data_line() {
        assert_eq!(encode(None, None, "a\nb\r\nc\rd"), "data: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(encode(None, None, "trailing\n"), "data: trailing\ndata:\n\n");
        assert_eq!(encode(None, None, ""), "data:\n\n");
        assert_eq!(encode(None, None, "\r\n\r\n"), "data:\ndata:\ndata:\n\n");
    }

    #[test]
    fn payload_cannot_inject_fields_or_events() {
        let s = encode(None, None, "x\n\nid: evil\nevent: fake\ndata: y");
        let events = SseParser::new().feed(s.as_bytes());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, None);
        assert_eq!(events[0].event, None);
        assert_eq!(events[0].data, "x\n\nid: evil\nevent: fake\ndata: y");
    }

    #[test]
    fn round_trip_normalizes_line_breaks_to_lf() {
        for payload in
            ["plain", "multi\nline\npayload", "crlf\r\nline", "cr\ronly", "ünïcødé ✓", " leading space", ""]
        {
            let s = encode(Some("1-0"), None, payload);
            let events = SseParser::new().feed(s.as_bytes());
            let expected = payload.replace("\r\n", "\n").replace('\r', "\n");
            assert_eq!(events, vec![SseEvent { id: Some("1-0".into()), event: None, data: expected }]);
        }
    }

    #[test]
    fn parser_handles_split_input_and_crlf_across_chunks() {
        let stream = b": hi\r\nretry: 1500\r\n\r\nid: 1\r\ndata: a\r\ndata: b\r\n\r\ndata: c\n\n";
        for split in 0..stream.len() {
            let mut p = SseParser::new();
            let mut events = p.feed(&stream[..split]);
            events.extend(p.feed(&stream[split..]));
            assert_eq!(events.len(), 2, "split at {split}");
            assert_eq!(events[0].data, "a\nb");
            assert_eq!(events[1].data, "c");
            assert_eq!(events[1].id.as_deref(), Some("1"));
            assert_eq!(p.retry(), Some(1500));
            assert_eq!(p.comments(), 1);
        }
    }

    #[test]
    fn comments_and_retry_encode() {
        let mut s = String::new();
        encode_comment(&mut s, "");
        encode_retry(&mut s, 2000);
        assert_eq!(s, ":\n\nretry: 2000\n\n");
        let mut p = SseParser::new();
        assert!(p.feed(s.as_bytes()).is_empty());
        assert_eq!(p.retry(), Some(2000));
    }
}
