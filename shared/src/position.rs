//! History positions: Redis stream ids `<ms>-<seq>`, totally ordered per channel and
//! valid on every node. Multi-channel SSE streams carry a compound id
//! `chan~pos,chan~pos` (`~` and `,` never occur in channel names).

use std::{fmt, str::FromStr};

/// A position in a channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamPos {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl StreamPos {
    /// The position before any message: "from the beginning of history".
    pub const ZERO: StreamPos = StreamPos { ms: 0, seq: 0 };
}

impl fmt::Display for StreamPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A string that is not a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPosition;

impl fmt::Display for BadPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a message id (expected <ms>-<seq>, e.g. 1700000000000-0)")
    }
}

impl std::error::Error for BadPosition {}

impl FromStr for StreamPos {
    type Err = BadPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(BadPosition)?;
        let num = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadPosition);
            }
            p.parse::<u64>().map_err(|_| BadPosition)
        };
        Ok(StreamPos { ms: num(ms)?, seq: num(seq)? })
    }
}

/// Separates channel and position inside a compound id.
pub const COMPOUND_SEP: char = '~';

/// Formats a compound id for several channels.
pub fn encode_compound<'a>(items: impl IntoIterator<Item = (&'a str, StreamPos)>) -> String {
    let mut out = String::new();
    for (ch, pos) in items {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(ch);
        out.push(COMPOUND_SEP);
        out.push_str(&pos.to_string());
    }
    out
}

/// A resume position as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// One position (a single-channel stream's id).
    One(StreamPos),
    /// Positions per channel (a compound id).
    PerChannel(Vec<(String, StreamPos)>),
}

impl Resume {
    /// Parses `pos` or `chan~pos,chan~pos`; a position `0` is [`StreamPos::ZERO`],
    /// "from the start of retained history".
    pub fn parse(s: &str) -> Result<Self, BadPosition> {
        let s = s.trim();
        let pos = |p: &str| if p == "0" { Ok(StreamPos::ZERO) } else { p.parse() };
        if !s.contains(COMPOUND_SEP) {
            return pos(s).map(Resume::One);
        }
        s.split(',')
            .map(|part| {
                let (ch, p) = part.rsplit_once(COMPOUND_SEP).ok_or(BadPosition)?;
                if ch.is_empty() {
                    return Err(BadPosition);
                }
                Ok((ch.to_owned(), pos(p)?))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Resume::PerChannel)
    }

    /// The position for `channel`, if this resume names one.
    pub fn for_channel(&self, channel: &str) -> Option<StreamPos> {
        match self {
            Resume::One(p) => Some(*p),
            Resume::PerChannel(v) => v.iter().find(|(c, _)| c == channel).map(|(_, p)| *p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_format_and_order() {
        let a: StreamPos = "1700000000000-0".parse().unwrap();
        let b: StreamPos = "1700000000000-12".parse().unwrap();
        let c: StreamPos = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        for bad in ["", "1", "-1", "1-", "a-1", "1-2-3", "+1-0", " 1-0"] {
            assert!(bad.parse::<StreamPos>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compound_ids_round_trip() {
        let p1: StreamPos = "5-1".parse().unwrap();
        let p2: StreamPos = "6-0".parse().unwrap();
        let s = encode_compound([("news", p1), ("a:b@c", p2)]);
        assert_eq!(s, "news~5-1,a:b@c~6-0");
        let r = Resume::parse(&s).unwrap();
        assert_eq!(r.for_channel("a:b@c"), Some(p2));
        assert_eq!(r.for_channel("other"), None);
        assert_eq!(Resume::parse("5-1").unwrap().for_channel("any"), Some(p1));
        assert!(Resume::parse("news~x").is_err());
        assert!(Resume::parse("~1-0").is_err(), "a compound part needs a channel");
        assert_eq!(Resume::parse("0").unwrap(), Resume::One(StreamPos::ZERO), "position 0");
        assert_eq!(Resume::parse("news~0,b~1-0").unwrap().for_channel("news"), Some(StreamPos::ZERO));
        assert!(Resume::parse("00").is_err() && Resume::parse("0-").is_err());
    }
}
