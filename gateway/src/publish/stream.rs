//! Streaming publish: one body (a request's, or stdin) that carries many messages —
//! one per line, or one per Server-Sent Event — each published as soon as it is
//! complete, in order, several in flight at once.
//!
//! [`Splitter`] cuts bytes into numbered [`Item`]s as they arrive; [`InFlight`] keeps
//! the publishes of one stream in order with a bounded number awaiting Redis, and the
//! tally the stream's answer reports.

use std::{collections::VecDeque, future::Future, pin::Pin, str::FromStr};

use shared::sse::SseParser;

/// How a stream's body is cut into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Each line is one message (a trailing `\r` is dropped; empty lines are messages
    /// too; an unterminated last line counts at the end).
    Lines,
    /// The body is an SSE stream: each event is one message — its `data:` lines
    /// joined with `\n`, its `event:` kept; comments and `retry:` ignored; an `id:`
    /// becomes the message's idempotency key.
    Sse,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lines" => Ok(Self::Lines),
            "sse" => Ok(Self::Sse),
            other => Err(format!("unknown stream format {other:?}; use lines or sse")),
        }
    }
}

impl Format {
    /// The format's name, as `?stream=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lines => "lines",
            Self::Sse => "sse",
        }
    }

    /// What one message is called in errors: `line` or `event`.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Lines => "line",
            Self::Sse => "event",
        }
    }
}

/// One message of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its number in the stream, from 1 (the line or event number).
    pub number: u64,
    /// The payload.
    pub data: String,
    /// The SSE `event:` name, if the event had one.
    pub event: Option<String>,
    /// The SSE `id:`, when this event set one: the message's idempotency key.
    pub id: Option<String>,
}

/// Why a stream's body cannot be cut into messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// A line or event is larger than the payload limit.
    #[error("{unit} {number}: larger than the limit of {max} bytes")]
    TooLarge {
        /// `line` or `event`.
        unit: &'static str,
        /// Its number.
        number: u64,
        /// The limit.
        max: usize,
    },
    /// A line is not UTF-8.
    #[error("line {0}: not UTF-8 text")]
    NotUtf8(u64),
}

/// Cuts a stream's bytes into [`Item`]s as they arrive.
#[derive(Debug)]
pub struct Splitter {
    format: Format,
    /// Lines: the current line so far.
    line: Vec<u8>,
    /// SSE: the parser, and the bytes fed since its last event (a bound on its buffer).
    sse: SseParser,
    pending: usize,
    /// The last `id:` seen, to tell an event's own id from one carried over.
    last_id: Option<String>,
    count: u64,
    max: usize,
}

impl Splitter {
    /// A splitter for `format` refusing messages over `max_payload` bytes.
    pub fn new(format: Format, max_payload: usize) -> Self {
        Self {
            format,
            line: Vec::new(),
            sse: SseParser::new(),
            pending: 0,
            last_id: None,
            count: 0,
            max: max_payload,
        }
    }

    /// Feeds bytes; adds the messages they complete to `out`. On an error, `out` holds
    /// the messages before the bad one.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Item>) -> Result<(), SplitError> {
        match self.format {
            Format::Lines => self.feed_lines(bytes, out),
            Format::Sse => self.feed_sse(bytes, out),
        }
    }

    /// The end of the body: an unterminated last line is a message; an SSE event
    /// without its closing blank line is dropped, as the SSE standard says.
    pub fn finish(&mut self, out: &mut Vec<Item>) -> Result<(), SplitError> {
        if self.format == Format::Lines && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            out.push(self.line_item(line)?);
        }
        Ok(())
    }

    fn feed_lines(&mut self, mut bytes: &[u8], out: &mut Vec<Item>) -> Result<(), SplitError> {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&bytes[..nl]);
            bytes = &bytes[nl + 1..];
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            out.push(self.line_item(line)?);
        }
        self.line.extend_from_slice(bytes);
        if self.line.len() > self.max + 1 {
            return Err(SplitError::TooLarge { unit: "line", number: self.count + 1, max: self.max });
        }
        Ok(())
    }

    fn line_item(&mut self, line: Vec<u8>) -> Result<Item, SplitError> {
        self.count += 1;
        if line.len() > self.max {
            return Err(SplitError::TooLarge { unit: "line", number: self.count, max: self.max });
        }
        let data = String::from_utf8(line).map_err(|_| SplitError::NotUtf8(self.count))?;
        Ok(Item { number: self.count, data, event: None, id: None })
    }

    fn feed_sse(&mut self, bytes: &[u8], out: &mut Vec<Item>) -> Result<(), SplitError> {
        // Field names and line breaks around an event's data: room beyond the payload.
        const OVERHEAD: usize = 4096;
        for chunk in bytes.chunks(OVERHEAD) {
            self.pending += chunk.len();
            for ev in self.sse.feed(chunk) {
                self.pending = 0;
                self.count += 1;
                let own_id = ev.id.filter(|id| self.last_id.as_ref() != Some(id));
                if own_id.is_some() {
                    self.last_id.clone_from(&own_id);
                }
                if ev.data.len() > self.max {
                    return Err(SplitError::TooLarge { unit: "event", number: self.count, max: self.max });
                }
                out.push(Item { number: self.count, data: ev.data, event: ev.event, id: own_id });
            }
            if self.pending > self.max * 2 + OVERHEAD {
                return Err(SplitError::TooLarge { unit: "event", number: self.count + 1, max: self.max });
            }
        }
        Ok(())
    }
}

/// A stream's publish in flight: resolves to its id (`None` for a repeat whose id is
/// not known) or the error that stops the stream.
pub type Pending<'a, E> = Pin<Box<dyn Future<Output = Result<Option<String>, E>> + Send + 'a>>;

/// The publishes of one stream, in order, with at most `max` awaiting their outcome;
/// and the tally of what was published.
pub struct InFlight<'a, E> {
    pending: VecDeque<(u64, Pending<'a, E>)>,
    max: usize,
    /// Messages published (repeats of already published ones included: each is in
    /// the channel once).
    pub published: u64,
    /// The first message's id.
    pub first_id: Option<String>,
    /// The last message's id.
    pub last_id: Option<String>,
}

impl<'a, E> InFlight<'a, E> {
    /// At most `max` publishes awaiting their outcome at once.
    pub fn new(max: usize) -> Self {
        Self { pending: VecDeque::new(), max: max.max(1), published: 0, first_id: None, last_id: None }
    }

    /// Adds message `number`'s publish (already queued, so order is kept); when `max`
    /// are in flight, waits for the oldest first. The error names the message.
    pub async fn push(&mut self, number: u64, publish: Pending<'a, E>) -> Result<(), (u64, E)> {
        self.pending.push_back((number, publish));
        while self.pending.len() > self.max {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Waits for every publish in flight; the first error names its message (the
    /// ones after it still settle, so the tally is exact).
    pub async fn finish(&mut self) -> Result<(), (u64, E)> {
        let mut first_err = None;
        while !self.pending.is_empty() {
            if let Err(e) = self.settle_oldest().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn settle_oldest(&mut self) -> Result<(), (u64, E)> {
        let Some((number, publish)) = self.pending.pop_front() else { return Ok(()) };
        let id = publish.await.map_err(|e| (number, e))?;
        self.published += 1;
        if let Some(id) = id {
            if self.first_id.is_none() {
                self.first_id = Some(id.clone());
            }
            self.last_id = Some(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(format: Format, chunks: &[&[u8]]) -> Result<Vec<Item>, SplitError> {
        let mut s = Splitter::new(format, 16);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out)?;
        }
        s.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn messages_before_a_bad_one_are_kept() {
        let mut s = Splitter::new(Format::Lines, 4);
        let mut out = Vec::new();
        assert!(
            s.feed(
                b"one
two
too long
four
",
                &mut out
            )
            .is_err()
        );
        assert_eq!(data(&out), ["one", "two"]);
    }

    fn data(items: &[Item]) -> Vec<&str> {
        items.iter().map(|i| i.data.as_str()).collect()
    }

    #[test]
    fn lines_split_wherever_the_bytes_break() {
        let items = all(Format::Lines, &[b"one\ntw", b"o\r\n\nthr", b"ee"]).unwrap();
        assert_eq!(data(&items), ["one", "two", "", "three"]);
        assert_eq!(items.iter().map(|i| i.number).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(
            all(Format::Lines, &[b"a\n", b"x".repeat(17).as_slice(), b"\n"]).unwrap_err().to_string(),
            "line 2: larger than the limit of 16 bytes"
        );
        assert_eq!(all(Format::Lines, &[b"ok\n\xff\n"]).unwrap_err(), SplitError::NotUtf8(2));
    }

    #[test]
    fn sse_events_join_data_keep_events_and_take_only_their_own_ids() {
        let body: &[u8] = b": comment\nretry: 10\ndata: a\ndata: b\n\nevent: done\ndata: [DONE]\nid: k1\n\ndata: c\n\ndata: d";
        let items = all(Format::Sse, &[&body[..7], &body[7..]]).unwrap();
        assert_eq!(data(&items), ["a\nb", "[DONE]", "c"], "the unterminated last event is dropped");
        assert_eq!(items[1].event.as_deref(), Some("done"));
        assert_eq!(items[1].id.as_deref(), Some("k1"));
        assert_eq!(items[2].id, None, "an id carried over from an earlier event is not this one's key");
        let big = format!("data: {}\n\n", "x".repeat(17));
        assert_eq!(
            all(Format::Sse, &[big.as_bytes()]).unwrap_err().to_string(),
            "event 1: larger than the limit of 16 bytes"
        );
    }

    #[tokio::test]
    async fn in_flight_keeps_order_and_counts() {
        let mut f: InFlight<'_, &str> = InFlight::new(2);
        for n in 1..=3u64 {
            f.push(n, Box::pin(async move { Ok(Some(format!("{n}-0"))) })).await.unwrap();
        }
        f.push(4, Box::pin(async { Err("broker down") })).await.unwrap_or(());
        f.push(5, Box::pin(async { Ok(None) })).await.unwrap_or(());
        assert_eq!(f.finish().await, Err((4, "broker down")));
        assert_eq!((f.published, f.first_id.as_deref(), f.last_id.as_deref()), (4, Some("1-0"), Some("3-0")));
    }
}
