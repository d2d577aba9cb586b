//! The published payload: `{"seq":<u64>,"ch":<idx>,"t":<unix µs>,"pad":"xxxx…"}`.
//!
//! `t` is the message's *scheduled* send time, so latency measured against it includes
//! any delay of the publisher itself (open-loop measurement: a stall anywhere shows up
//! instead of being hidden by the publisher slowing down).

use std::fmt::Write as _;

/// Published once to every channel before an Nchan long-poll run's subscribers connect:
/// a new long-poll subscriber gets the oldest buffered message at once, so this answer
/// confirms its subscription (as the gateway's first `timeout=0` poll does) and gives it
/// the message id to poll on from. Not a payload; subscribers skip it.
pub const NCHAN_MARKER: &str = "loadgen-subscribe-marker";

/// The fields a subscriber reads back out of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Global sequence number (0-based, across all channels).
    pub seq: u64,
    /// Channel index the message was published to.
    pub ch: u64,
    /// Scheduled send time, microseconds since the Unix epoch.
    pub t_us: u64,
}

/// Writes a payload into `out` (cleared first), padded with `x` to `size` bytes when
/// `size` is larger than the fields need.
pub fn encode(p: Payload, size: usize, out: &mut String) {
    out.clear();
    write!(out, "{{\"seq\":{},\"ch\":{},\"t\":{},\"pad\":\"", p.seq, p.ch, p.t_us)
        .expect("writing to a String");
    let fixed = out.len() + 2;
    out.extend(std::iter::repeat_n('x', size.saturating_sub(fixed)));
    out.push_str("\"}");
}

/// Reads the fields back; `None` when the text is not a payload of this format.
pub fn decode(s: &str) -> Option<Payload> {
    let rest = s.strip_prefix("{\"seq\":")?;
    let (seq, rest) = number(rest)?;
    let rest = rest.strip_prefix(",\"ch\":")?;
    let (ch, rest) = number(rest)?;
    let rest = rest.strip_prefix(",\"t\":")?;
    let (t_us, rest) = number(rest)?;
    if !(rest.starts_with(",\"pad\":\"") || rest.starts_with('}')) {
        return None;
    }
    Some(Payload { seq, ch, t_us })
}

fn number(s: &str) -> Option<(u64, &str)> {
    let end = s.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 || end > 20 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let p = Payload { seq: 12345, ch: 7, t_us: 1_700_000_000_123_456 };
        let mut s = String::new();
        for size in [0, 10, 60, 100, 1000] {
            encode(p, size, &mut s);
            assert_eq!(decode(&s), Some(p), "{s}");
            assert!(s.len() >= size);
            if size >= 60 {
                assert_eq!(s.len(), size, "{s}");
            }
            assert!(serde_json::from_str::<serde_json::Value>(&s).is_ok(), "valid JSON: {s}");
        }
        encode(p, 0, &mut s);
        assert_eq!(s, r#"{"seq":12345,"ch":7,"t":1700000000123456,"pad":""}"#);
    }

    #[test]
    fn rejects_other_text() {
        assert_eq!(decode("hello"), None);
        assert_eq!(decode(r#"{"seq":1,"ch":2}"#), None);
        assert_eq!(decode(r#"{"seq":,"ch":2,"t":3}"#), None);
        assert_eq!(decode(r#"{"seq":1,"ch":2,"t":3}"#), Some(Payload { seq: 1, ch: 2, t_us: 3 }));
        assert_eq!(decode(r#"{"seq":99999999999999999999999,"ch":2,"t":3}"#), None);
    }
}
