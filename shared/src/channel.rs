//! Channel and event-name rules, shared so clients can check names before sending them.
//!
//! A channel name is 1 to `max_len` bytes of ASCII letters, digits and `_ - . : @ / =`,
//! and does not start with `__` (reserved for the gateway's own channels). Those
//! characters are safe in URLs, Redis channel names, SSE fields and JSON without escaping.

use std::fmt;

/// Default longest channel name, in bytes.
pub const DEFAULT_MAX_CHANNEL_LEN: usize = 128;
/// Longest event name, in bytes.
pub const MAX_EVENT_LEN: usize = 64;
/// Prefix reserved for channels the gateway uses itself (link probes).
pub const RESERVED_PREFIX: &str = "__";

/// Why a channel or event name was refused; the `Display` text is shown to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// The name is empty.
    Empty,
    /// The name is longer than allowed.
    TooLong {
        /// Length of the refused name in bytes.
        len: usize,
        /// Longest allowed length.
        max: usize,
    },
    /// The name holds a character outside the allowed set.
    InvalidChar {
        /// The first offending character.
        ch: char,
        /// Its byte offset in the name.
        at: usize,
    },
    /// The name starts with the reserved prefix `__`.
    Reserved,
    /// An event name holds a control character or white space.
    InvalidEventChar {
        /// The first offending character.
        ch: char,
        /// Its byte offset in the name.
        at: usize,
    },
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("name is empty"),
            Self::TooLong { len, max } => write!(f, "name is {len} bytes long, the limit is {max}"),
            Self::InvalidChar { ch, at } => write!(
                f,
                "character '{}' at byte {at} is not allowed (use letters, digits and _-.:@/=)",
                ch.escape_default()
            ),
            Self::InvalidEventChar { ch, at } => write!(
                f,
                "character '{}' at byte {at} is not allowed (no spaces or control characters)",
                ch.escape_default()
            ),
            Self::Reserved => write!(f, "names starting with {RESERVED_PREFIX:?} are reserved"),
        }
    }
}

impl std::error::Error for ChannelError {}

fn channel_char_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/' | b'=')
}

/// Checks a channel name against the rules above.
pub fn validate_channel(name: &str, max_len: usize) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > max_len {
        return Err(ChannelError::TooLong { len: name.len(), max: max_len });
    }
    if let Some((at, ch)) = name.char_indices().find(|&(_, c)| !c.is_ascii() || !channel_char_ok(c as u8)) {
        return Err(ChannelError::InvalidChar { ch, at });
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(ChannelError::Reserved);
    }
    Ok(())
}

/// Checks an event name: 1 to [`MAX_EVENT_LEN`] bytes, no control characters and no
/// spaces, so it can never inject SSE fields (CR, LF) or break a header line.
pub fn validate_event(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_EVENT_LEN {
        return Err(ChannelError::TooLong { len: name.len(), max: MAX_EVENT_LEN });
    }
    if let Some((at, ch)) = name.char_indices().find(|&(_, c)| c.is_control() || c.is_whitespace()) {
        return Err(ChannelError::InvalidEventChar { ch, at });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_names() {
        for name in ["news", "chat:room-1", "user@42/inbox", "a.b_c=d", "X"] {
            assert_eq!(validate_channel(name, DEFAULT_MAX_CHANNEL_LEN), Ok(()), "{name}");
        }
        let longest = "a".repeat(DEFAULT_MAX_CHANNEL_LEN);
        assert_eq!(validate_channel(&longest, DEFAULT_MAX_CHANNEL_LEN), Ok(()));
    }

    #[test]
    fn refuses_bad_names_with_a_reason() {
        assert_eq!(validate_channel("", 10), Err(ChannelError::Empty));
        assert_eq!(validate_channel("abcdefghijk", 10), Err(ChannelError::TooLong { len: 11, max: 10 }));
        assert_eq!(validate_channel("a b", 10), Err(ChannelError::InvalidChar { ch: ' ', at: 1 }));
        assert_eq!(validate_channel("ok\r\nX", 10), Err(ChannelError::InvalidChar { ch: '\r', at: 2 }));
        assert_eq!(validate_channel("né", 10), Err(ChannelError::InvalidChar { ch: 'é', at: 1 }));
        assert_eq!(validate_channel("a*", 10), Err(ChannelError::InvalidChar { ch: '*', at: 1 }));
        assert_eq!(validate_channel("__probe", 10), Err(ChannelError::Reserved));
        let msg = validate_channel("a\nb", 10).unwrap_err().to_string();
        assert!(msg.contains("\\n"), "control characters are escaped in messages: {msg}");
    }

    #[test]
    fn event_names_cannot_inject_fields() {
        assert_eq!(validate_event("score-update"), Ok(()));
        assert!(validate_event("a\nid: 5").is_err());
        assert!(validate_event("a\rb").is_err());
        assert!(validate_event("a\0").is_err());
        assert!(validate_event("two words").is_err());
        assert!(validate_event("").is_err());
        assert!(validate_event(&"e".repeat(MAX_EVENT_LEN + 1)).is_err());
    }
}
