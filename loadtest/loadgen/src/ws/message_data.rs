//! Reading the payload out of the gateway's message frames without a JSON parser.

use std::cell::RefCell;

thread_local! {
    /// Payloads with escapes are decoded into this.
    static DATA_SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The payload of one of the gateway's message frames,
/// `{"type":"message","channel":"…","id":…,"event":…,"data":"…"}`, read without a JSON
/// parser: borrowed from `text` when it holds no escapes, else decoded into `scratch`.
/// `None` for any other frame, or anything unusual in this one (a `\u` escape, fields
/// in another order): those go through `serde_json`.
pub fn message_data<'a>(text: &'a str, scratch: &'a mut String) -> Option<&'a str> {
    let rest = text.strip_prefix(r#"{"type":"message","channel":"#)?;
    let rest = skip_plain_string(rest)?.strip_prefix(r#","id":"#)?;
    let rest = skip_null_or_plain_string(rest)?.strip_prefix(r#","event":"#)?;
    let data = skip_null_or_plain_string(rest)?.strip_prefix(r#","data":""#)?.strip_suffix("\"}")?;
    match data.bytes().position(|b| b == b'"' || b == b'\\' || b < 0x20) {
        None => Some(data),
        Some(first) => unescape(data, first, scratch),
    }
}

/// Calls `f` with the payload of a gateway message frame (see [`message_data`]), using
/// this thread's scratch buffer; `false` when `text` is not such a frame.
pub fn with_message_data(text: &str, f: impl FnOnce(&str)) -> bool {
    DATA_SCRATCH.with_borrow_mut(|scratch| match message_data(text, scratch) {
        Some(data) => {
            f(data);
            true
        }
        None => false,
    })
}

/// Skips a JSON string without escapes at the start of `s`; returns what follows it.
fn skip_plain_string(s: &str) -> Option<&str> {
    let body = s.strip_prefix('"')?;
    let end = body.bytes().position(|b| b == b'"' || b == b'\\')?;
    (body.as_bytes()[end] == b'"').then(|| &body[end + 1..])
}

/// Skips `null` or a JSON string without escapes.
fn skip_null_or_plain_string(s: &str) -> Option<&str> {
    s.strip_prefix("null").or_else(|| skip_plain_string(s))
}

/// Decodes the body of a JSON string (`first` is the first byte needing care) into
/// `out`; `None` for a `\u` escape or anything invalid.
fn unescape<'a>(s: &str, first: usize, out: &'a mut String) -> Option<&'a str> {
    out.clear();
    let b = s.as_bytes();
    let (mut i, mut run) = (first, 0);
    while i < b.len() {
        match b[i] {
            b'\\' => {
                out.push_str(&s[run..i]);
                out.push(match b.get(i + 1)? {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\x08',
                    b'f' => '\x0c',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    _ => return None,
                });
                i += 2;
                run = i;
            }
            b'"' => return None,
            c if c < 0x20 => return None,
            _ => i += 1,
        }
    }
    out.push_str(&s[run..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway's message frame for `data` (as `Delivery::ws` builds it).
    fn gateway_frame(id: Option<&str>, event: Option<&str>, data: &str) -> String {
        let env = shared::EnvelopeRef { channel: "lg1-0", id, event, data };
        let json = serde_json::to_string(&env).unwrap();
        format!(r#"{{"type":"message",{}"#, &json[1..])
    }

    #[test]
    fn message_data_fast_path() {
        let mut scratch = String::new();
        // A loadgen payload: its quotes arrive escaped.
        let mut payload = String::new();
        crate::payload::encode(
            crate::payload::Payload { seq: 42, ch: 0, t_us: 1_700_000_000_000_000 },
            100,
            &mut payload,
        );
        let text = gateway_frame(None, None, &payload);
        assert!(text.contains(r#""data":"{\"seq\":42,\"ch\":0,"#), "{text}");
        assert_eq!(message_data(&text, &mut scratch), Some(payload.as_str()));
        // No escapes: borrowed from the frame itself.
        let text = gateway_frame(Some("1700000000000-0"), Some("tick"), "plain ✓ data");
        let data = message_data(&text, &mut scratch).unwrap();
        assert_eq!(data, "plain ✓ data");
        assert!(text.as_bytes().as_ptr_range().contains(&data.as_ptr()));
        // Every simple escape.
        for data in ["a\\b", "line\nbreak\r\t", "\"quoted\"", "ends with \\", "/", ""] {
            let text = gateway_frame(Some("1-0"), None, data);
            assert_eq!(message_data(&text, &mut scratch), Some(data), "{text}");
        }
        // A \u escape, other frames and reordered fields: left to serde_json.
        assert_eq!(message_data(&gateway_frame(None, None, "ctl\u{1}"), &mut scratch), None);
        for other in [
            r#"{"type":"subscribed","channels":["lg1-0"],"recovered":false}"#,
            r#"{"type":"reset","channel":"lg1-0"}"#,
            r#"{"type":"error","code":"slow_consumer","message":"x"}"#,
            r#"{"type":"message","data":"x","channel":"c","id":null,"event":null}"#,
            r#"{"type":"message","channel":"c","id":null,"event":null,"data":"x","extra":"y"}"#,
            r#"{"type":"message","channel":"c","id":null,"event":null,"data":"x\"}"#,
            r#"{"type":"message","channel":"c\"","id":null,"event":null,"data":"x"}"#,
        ] {
            assert_eq!(message_data(other, &mut scratch), None, "{other}");
        }
        let mut seen = String::new();
        assert!(with_message_data(&gateway_frame(None, None, "{\"a\":1}"), |d| seen.push_str(d)));
        assert_eq!(seen, "{\"a\":1}");
        assert!(!with_message_data("{}", |_| unreachable!()));
    }
}
