//! Turning the bytes a server sends into messages: frames completed across reads,
//! fragmented messages put together, pings answered.

use std::ops::ControlFlow;

use shared::protocol::opcode as op;

use super::frame::{End, Head, MAX_MESSAGE, client_frame, close_code, head};

/// A complete message from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    /// A text message (valid UTF-8).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// Turns the bytes the server sends into messages; answers pings.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// The start of a frame not complete yet (or, after a stop, frames not handled
    /// yet); empty, with no allocation, while the connection is idle.
    pub(super) pending: Vec<u8>,
    /// A fragmented message in progress: its opcode and its payload so far.
    message: Option<(u8, Vec<u8>)>,
}

impl FrameReader {
    /// A reader at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the bytes kept hold a whole frame (or a bad header) to handle without
    /// reading.
    pub(super) fn has_frame(&self) -> bool {
        !self.pending.is_empty() && !matches!(head(&self.pending), Ok(Err(_)))
    }

    /// Handles `input` (what was just read) after the bytes kept from before: calls `on`
    /// for each complete message and appends a pong for each ping to `replies`. When `on`
    /// breaks, the bytes not handled yet are kept for the next call and its value is
    /// returned.
    pub fn feed<B>(
        &mut self,
        mut input: &[u8],
        replies: &mut Vec<u8>,
        on: &mut impl FnMut(Msg<'_>) -> ControlFlow<B>,
    ) -> Result<Option<B>, End> {
        // First the frame begun in an earlier read, completed from the input.
        while !self.pending.is_empty() {
            match head(&self.pending)? {
                Err(need) => {
                    let take = (need - self.pending.len()).min(input.len());
                    if take == 0 {
                        return Ok(None);
                    }
                    self.pending.reserve_exact(need - self.pending.len());
                    self.pending.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
                Ok(h) => {
                    let mut pending = std::mem::take(&mut self.pending);
                    let r = self.frame(h, &pending, replies, on);
                    if pending.len() > h.end {
                        pending.drain(..h.end);
                        self.pending = pending;
                    }
                    if let Some(b) = r? {
                        self.pending.extend_from_slice(input);
                        return Ok(Some(b));
                    }
                }
            }
        }
        // Then frames straight from the input.
        while !input.is_empty() {
            match head(input)? {
                Err(need) => {
                    let mut tail = Vec::with_capacity(need.max(input.len()));
                    tail.extend_from_slice(input);
                    self.pending = tail;
                    return Ok(None);
                }
                Ok(h) => {
                    let r = self.frame(h, input, replies, on)?;
                    input = &input[h.end..];
                    if let Some(b) = r {
                        self.pending.extend_from_slice(input);
                        return Ok(Some(b));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Handles one complete frame at the start of `buf`.
    fn frame<B>(
        &mut self,
        h: Head,
        buf: &[u8],
        replies: &mut Vec<u8>,
        on: &mut impl FnMut(Msg<'_>) -> ControlFlow<B>,
    ) -> Result<Option<B>, End> {
        let payload = &buf[h.start..h.end];
        match h.op {
            op::PING => {
                client_frame(op::PONG, payload, replies);
                Ok(None)
            }
            op::PONG => Ok(None),
            op::CLOSE => Err(End::Close(close_code(payload)?)),
            op::CONTINUATION => {
                let Some((_, so_far)) = &mut self.message else {
                    return Err(End::Protocol("continuation without a message"));
                };
                if so_far.len() + payload.len() > MAX_MESSAGE {
                    return Err(End::TooBig);
                }
                so_far.extend_from_slice(payload);
                if !h.fin {
                    return Ok(None);
                }
                let (opcode, whole) = self.message.take().expect("a message in progress");
                deliver(opcode, &whole, on)
            }
            _ => {
                if self.message.is_some() {
                    return Err(End::Protocol("new message inside a fragmented one"));
                }
                if h.fin {
                    return deliver(h.op, payload, on);
                }
                self.message = Some((h.op, payload.to_vec()));
                Ok(None)
            }
        }
    }
}

fn deliver<B>(
    opcode: u8,
    payload: &[u8],
    on: &mut impl FnMut(Msg<'_>) -> ControlFlow<B>,
) -> Result<Option<B>, End> {
    let msg = if opcode == op::TEXT {
        Msg::Text(std::str::from_utf8(payload).map_err(|_| End::BadUtf8)?)
    } else {
        Msg::Binary(payload)
    };
    Ok(match on(msg) {
        ControlFlow::Continue(()) => None,
        ControlFlow::Break(b) => Some(b),
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::ws::testing::{client_frames, frame};

    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(String),
        /// A binary message's length and byte sum (they can be big).
        Binary(usize, u64),
    }

    fn binary(b: &[u8]) -> Got {
        Got::Binary(b.len(), b.iter().map(|&x| u64::from(x)).sum())
    }

    /// Feeds `parts` in order; returns the messages, the replies and how it ended.
    fn feed_all(parts: &[&[u8]]) -> (Vec<Got>, Vec<u8>, Option<End>) {
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        let mut replies = Vec::new();
        for part in parts {
            let res = r.feed(part, &mut replies, &mut |m| {
                got.push(match m {
                    Msg::Text(t) => Got::Text(t.to_owned()),
                    Msg::Binary(b) => binary(b),
                });
                ControlFlow::<()>::Continue(())
            });
            if let Err(e) = res {
                return (got, replies, Some(e));
            }
        }
        (got, replies, None)
    }

    fn sample_stream() -> (Vec<u8>, Vec<Got>) {
        let medium = "0123456789".repeat(30);
        let big = vec![7u8; 70_000];
        let mut s = frame(true, op::TEXT, b"hello");
        s.extend(frame(true, op::TEXT, medium.as_bytes()));
        s.extend(frame(true, op::PING, b"pp"));
        s.extend(frame(true, op::BINARY, &big));
        s.extend(frame(false, op::TEXT, "frag ".as_bytes()));
        s.extend(frame(true, op::PING, b""));
        s.extend(frame(false, op::CONTINUATION, "men".as_bytes()));
        s.extend(frame(true, op::PONG, b"x"));
        s.extend(frame(true, op::CONTINUATION, "ted ✓".as_bytes()));
        s.extend(frame(true, op::TEXT, b""));
        let want = vec![
            Got::Text("hello".into()),
            Got::Text(medium),
            binary(&big),
            Got::Text("frag mented ✓".into()),
            Got::Text(String::new()),
        ];
        (s, want)
    }

    #[test]
    fn frames_split_at_every_byte() {
        let (s, want) = sample_stream();
        let pongs = vec![(op::PONG, b"pp".to_vec()), (op::PONG, Vec::new())];
        let (got, replies, end) = feed_all(&[&s]);
        assert!(end.is_none());
        assert_eq!(got, want);
        assert_eq!(client_frames(&replies), pongs);
        // Every split in two (stepping through the big frame's payload faster).
        let mut split = 0;
        while split <= s.len() {
            let (got, replies, end) = feed_all(&[&s[..split], &s[split..]]);
            assert!(end.is_none(), "split {split}");
            assert_eq!(got, want, "split {split}");
            assert_eq!(client_frames(&replies), pongs, "split {split}");
            split += if (400..70_300).contains(&split) { 997 } else { 1 };
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        let (got, replies, end) = feed_all(&bytes);
        assert!(end.is_none());
        assert_eq!(got, want);
        assert_eq!(client_frames(&replies), pongs);
    }

    #[test]
    fn lengths_of_every_size() {
        for n in [0, 125, 126, 127, 65_535, 65_536, 100_000] {
            let payload = vec![b'a'; n];
            let f = frame(true, op::TEXT, &payload);
            let header = match n {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(f.len(), header + n);
            let (got, _, end) = feed_all(&[&f]);
            assert!(end.is_none());
            assert_eq!(got, [Got::Text(String::from_utf8(payload).unwrap())], "{n}");
        }
        // A non-minimal 64-bit length is still read.
        let mut f = vec![0x81, 127, 0, 0, 0, 0, 0, 0, 0, 3];
        f.extend_from_slice(b"abc");
        assert_eq!(feed_all(&[&f]).0, [Got::Text("abc".into())]);
    }

    #[test]
    fn close_codes() {
        let code = |payload: &[u8]| match feed_all(&[&frame(true, op::CLOSE, payload)]).2 {
            Some(End::Close(c)) => Ok(c),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(code(&[]), Ok(1005));
        assert_eq!(code(&[0x03, 0xe9]), Ok(1001));
        assert_eq!(code(b"\x03\xe8bye"), Ok(1000));
        assert!(code(&[3]).is_err());
        assert_eq!(End::Close(1001).kind(), "ws_close_1001");
        // Messages before the close are delivered.
        let mut s = frame(true, op::TEXT, b"last");
        s.extend(frame(true, op::CLOSE, &[0x03, 0xf0]));
        let (got, _, end) = feed_all(&[&s]);
        assert_eq!(got, [Got::Text("last".into())]);
        assert!(matches!(end, Some(End::Close(1008))));
    }

    #[test]
    fn protocol_errors() {
        let err = |bytes: &[u8]| feed_all(&[bytes]).2.map(|e| e.kind());
        assert_eq!(err(&[0x81, 0x81, 1, 2, 3, 4, b'x']).as_deref(), Some("ws_protocol"), "masked");
        assert_eq!(err(&[0xc1, 0]).as_deref(), Some("ws_protocol"), "reserved bit");
        assert_eq!(err(&[0x83, 0]).as_deref(), Some("ws_protocol"), "opcode");
        assert_eq!(err(&[0x09, 0]).as_deref(), Some("ws_protocol"), "fragmented ping");
        assert_eq!(err(&frame(true, op::PING, &[0; 126])).as_deref(), Some("ws_protocol"));
        assert_eq!(err(&frame(true, op::CONTINUATION, b"x")).as_deref(), Some("ws_protocol"));
        let mut two = frame(false, op::TEXT, b"a");
        two.extend(frame(true, op::TEXT, b"b"));
        assert_eq!(err(&two).as_deref(), Some("ws_protocol"));
        assert_eq!(err(&frame(true, op::TEXT, b"\xff")).as_deref(), Some("ws_other"));
        // Too big: refused from the header alone.
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_MESSAGE as u64 + 1).to_be_bytes());
        assert_eq!(err(&huge).as_deref(), Some("ws_capacity"));
        // Fragments adding up to too much.
        let mut parts = frame(false, op::BINARY, &vec![0; MAX_MESSAGE]);
        parts.extend(frame(true, op::CONTINUATION, b"x"));
        assert_eq!(err(&parts).as_deref(), Some("ws_capacity"));
    }

    #[test]
    fn a_stop_keeps_the_rest() {
        let mut s = frame(true, op::TEXT, b"one");
        s.extend(frame(true, op::TEXT, b"two"));
        s.extend(frame(true, op::TEXT, b"thr"));
        for split in 0..=s.len() {
            let mut r = FrameReader::new();
            let mut replies = Vec::new();
            let seen = RefCell::new(Vec::new());
            let mut stop_at_one = |m: Msg<'_>| match m {
                Msg::Text("one") => ControlFlow::Break(1),
                Msg::Text(t) => {
                    seen.borrow_mut().push(t.to_owned());
                    ControlFlow::Continue(())
                }
                Msg::Binary(_) => unreachable!(),
            };
            let mut stopped = r.feed(&s[..split], &mut replies, &mut stop_at_one).unwrap();
            if stopped.is_none() {
                stopped = r.feed(&s[split..], &mut replies, &mut stop_at_one).unwrap();
                assert!(seen.borrow().is_empty());
                assert_eq!(stopped, Some(1), "split {split}");
                assert!(r.has_frame());
                assert_eq!(r.feed(&[], &mut replies, &mut stop_at_one).unwrap(), None);
            } else {
                assert_eq!(stopped, Some(1));
                r.feed(&[], &mut replies, &mut stop_at_one).unwrap();
                r.feed(&s[split..], &mut replies, &mut stop_at_one).unwrap();
            }
            assert_eq!(*seen.borrow(), ["two", "thr"], "split {split}");
            assert!(r.pending.is_empty() && r.pending.capacity() == 0, "split {split}");
            assert!(!r.has_frame());
        }
    }

    #[test]
    fn idle_reader_holds_no_allocation() {
        let mut r = FrameReader::new();
        let f = frame(true, op::TEXT, &[b'z'; 200]);
        let mut replies = Vec::new();
        let mut on = |_: Msg<'_>| ControlFlow::<()>::Continue(());
        r.feed(&f[..50], &mut replies, &mut on).unwrap();
        assert_eq!(r.pending.capacity(), f.len(), "sized to the frame at once");
        r.feed(&f[50..], &mut replies, &mut on).unwrap();
        assert_eq!(r.pending.capacity(), 0);
        assert!(r.message.is_none());
    }
}
