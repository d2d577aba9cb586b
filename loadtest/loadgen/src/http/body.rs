//! Response bodies: chunked, sized or until close, decoded incrementally.

use super::head::{Framing, HttpError, ResponseHead};

/// Incremental decoder of a chunked body.
#[derive(Debug, Clone, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size; `digits` seen so far.
    #[default]
    SizeStart,
    Size {
        value: u64,
        digits: u8,
    },
    /// Skipping a chunk extension up to the line end.
    Ext {
        value: u64,
    },
    /// Saw CR after the size line.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section; `empty` when the current line has no bytes yet.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the terminating chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, appending body bytes to `out`; returns how many input bytes were
    /// used (fewer than given only once the body is complete).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        use ChunkState::*;
        let bad = || HttpError::Malformed("chunk");
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                Done => return Ok(i),
                Data { left } => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 { DataCr } else { Data { left } };
                    continue;
                }
                SizeStart => match hex(b) {
                    Some(d) => Size { value: u64::from(d), digits: 1 },
                    None => return Err(bad()),
                },
                Size { value, digits } => match (hex(b), b) {
                    (Some(d), _) => {
                        if digits >= 15 {
                            return Err(bad());
                        }
                        Size { value: value * 16 + u64::from(d), digits: digits + 1 }
                    }
                    (None, b';' | b' ' | b'\t') => Ext { value },
                    (None, b'\r') => SizeLf { value },
                    (None, b'\n') => after_size(value),
                    _ => return Err(bad()),
                },
                Ext { value } => match b {
                    b'\r' => SizeLf { value },
                    b'\n' => after_size(value),
                    _ => Ext { value },
                },
                SizeLf { value } => match b {
                    b'\n' => after_size(value),
                    _ => return Err(bad()),
                },
                DataCr => match b {
                    b'\r' => DataLf,
                    b'\n' => SizeStart,
                    _ => return Err(bad()),
                },
                DataLf => match b {
                    b'\n' => SizeStart,
                    _ => return Err(bad()),
                },
                Trailer { empty } => match b {
                    b'\r' => TrailerLf { empty },
                    b'\n' if empty => Done,
                    b'\n' => Trailer { empty: true },
                    _ => Trailer { empty: false },
                },
                TrailerLf { empty } => match b {
                    b'\n' if empty => Done,
                    b'\n' => Trailer { empty: true },
                    _ => return Err(bad()),
                },
            };
            i += 1;
        }
        Ok(i)
    }
}

fn after_size(value: u64) -> ChunkState {
    if value == 0 { ChunkState::Trailer { empty: true } } else { ChunkState::Data { left: value } }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decoder of one response body, whatever its framing.
#[derive(Debug, Clone)]
pub enum BodyDecoder {
    /// Chunked.
    Chunked(ChunkedDecoder),
    /// Sized: bytes still to come.
    Length(u64),
    /// Until close.
    Close,
}

impl BodyDecoder {
    /// The decoder for a response head.
    pub fn for_head(head: &ResponseHead) -> Self {
        match head.framing {
            Framing::Chunked => BodyDecoder::Chunked(ChunkedDecoder::new()),
            Framing::Length(n) => BodyDecoder::Length(n),
            Framing::Close => BodyDecoder::Close,
        }
    }

    /// Whether the whole body has been seen (never, for read-until-close bodies).
    pub fn is_done(&self) -> bool {
        match self {
            BodyDecoder::Chunked(c) => c.is_done(),
            BodyDecoder::Length(n) => *n == 0,
            BodyDecoder::Close => false,
        }
    }

    /// Decodes `input` into `out`; returns the input bytes used.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        match self {
            BodyDecoder::Chunked(c) => c.decode(input, out),
            BodyDecoder::Length(left) => {
                let n = input.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                Ok(n)
            }
            BodyDecoder::Close => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: &str) -> Vec<u8> {
        format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
    }

    fn decode_split(stream: &[u8], split: usize) -> (Vec<u8>, bool, usize) {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let a = d.decode(&stream[..split], &mut out).unwrap();
        assert_eq!(a, split, "nothing left over before the end");
        let b = d.decode(&stream[split..], &mut out).unwrap();
        (out, d.is_done(), a + b)
    }

    #[test]
    fn chunked_any_split() {
        let mut body = chunk("retry: 3000\n: ok\n\ndata: x\n");
        body.extend_from_slice(b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT");
        for split in 0..body.len() - 4 {
            let (out, done, used) = decode_split(&body, split);
            assert_eq!(out, b"retry: 3000\n: ok\n\ndata: x\nhello", "split {split}");
            assert!(done);
            assert_eq!(&body[used..], b"NEXT");
        }
    }

    #[test]
    fn chunked_sse_into_parser() {
        // A server's SSE stream: first chunk opens the stream, later chunks carry events.
        let mut stream = chunk("retry: 3000\n: ok\n\n");
        stream.extend(chunk("data: {\"seq\":1}\n\n"));
        for split in 0..stream.len() {
            let mut d = ChunkedDecoder::new();
            let mut p = shared::sse::SseParser::new();
            let mut events = Vec::new();
            let mut out = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                out.clear();
                d.decode(part, &mut out).unwrap();
                events.extend(p.feed(&out));
            }
            assert_eq!(p.comments(), 1);
            assert_eq!(events.len(), 1, "split {split}");
            assert_eq!(events[0].data, "{\"seq\":1}");
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        let mut out = Vec::new();
        assert!(ChunkedDecoder::new().decode(b"zz\r\n", &mut out).is_err());
        assert!(ChunkedDecoder::new().decode(b"2\r\nabX", &mut out).is_err());
        assert!(ChunkedDecoder::new().decode(b"ffffffffffffffffff\r\n", &mut out).is_err());
    }

    #[test]
    fn sized_body() {
        let mut d = BodyDecoder::Length(3);
        let mut out = Vec::new();
        assert_eq!(d.decode(b"abcdef", &mut out).unwrap(), 3);
        assert!(d.is_done());
        assert_eq!(out, b"abc");
    }
}
