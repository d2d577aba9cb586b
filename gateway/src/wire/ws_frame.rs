//! The WebSocket wire format (RFC 6455), server side: decoding what clients send
//! (masked frames, fragmented messages, control frames) and encoding frame headers.
//!
//! Small on purpose: no extensions are negotiated, so every reserved bit must be clear.
//! The decoder holds bytes only while a frame or a fragmented message is incomplete; an
//! idle connection's decoder owns no allocation.

/// Frame opcodes (shared with the load generator's client).
pub use shared::protocol::opcode;

/// Longest frame header (2 bytes, 8 of extended length; servers send no mask).
pub const MAX_HEADER: usize = 10;

/// Writes the header of an unmasked, final frame carrying `len` payload bytes into
/// `out`; returns how many bytes it used.
pub fn encode_header(op: u8, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = 0x80 | op;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A whole frame (header and payload) in one buffer.
pub fn encode(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER];
    let n = encode_header(op, payload.len(), &mut header);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
    out
}

/// A close frame: `code` and a short `reason`.
pub fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode(opcode::CLOSE, &payload)
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping with its payload.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The client closes, with its status code if it sent one (always one a client
    /// may send: see [`valid_close_code`]).
    Close(Option<u16>),
}

/// Why the client's input cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A frame or message is larger than allowed (close code 1009).
    TooBig,
    /// The input breaks the protocol (close code 1002).
    Protocol(&'static str),
    /// A text message or a close reason is not valid UTF-8 (close code 1007, RFC 6455
    /// §8.1 and §7.4.1: data inconsistent with the message's type).
    InvalidData(&'static str),
}

/// Whether a client may send close `code` (RFC 6455 §7.4): the codes assigned for use
/// on the wire (1000–1003, 1007–1014), and those for libraries and applications
/// (3000–4999). 1004 is reserved, 1005, 1006 and 1015 must never be sent, 1016–2999 are
/// unassigned, and anything below 1000 or from 5000 on is not a status code.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Turns the bytes a client sends into [`Incoming`] messages.
#[derive(Debug)]
pub struct Decoder {
    /// Bytes not yet decoded (the start of an incomplete frame), usually empty.
    buf: Vec<u8>,
    /// A fragmented message in progress: its opcode, the payload so far, and (text) how
    /// much of it is checked UTF-8, so a bad byte fails the connection at once and
    /// nothing is checked twice.
    message: Option<(u8, Vec<u8>, usize)>,
    max_message: usize,
}

impl Decoder {
    /// A decoder refusing frames and messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self { buf: Vec::new(), message: None, max_message }
    }

    /// Adds bytes read from the client.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message or control frame, `None` when more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<Incoming>, DecodeError> {
        loop {
            let Some((fin, op, payload, used)) = self.frame()? else {
                if self.buf.is_empty() && self.buf.capacity() > 0 {
                    self.buf = Vec::new();
                }
                return Ok(None);
            };
            self.buf.drain(..used);
            if op >= opcode::CLOSE {
                return control(op, payload).map(Some);
            }
            let (op, payload, checked) = match (op, self.message.take()) {
                (opcode::CONTINUATION, Some((first, mut so_far, checked))) => {
                    if so_far.len() + payload.len() > self.max_message {
                        return Err(DecodeError::TooBig);
                    }
                    so_far.extend_from_slice(&payload);
                    (first, so_far, checked)
                }
                (opcode::CONTINUATION, None) => {
                    return Err(DecodeError::Protocol("continuation without a message"));
                }
                (_, Some(_)) => return Err(DecodeError::Protocol("new message inside a fragmented one")),
                (op, None) => (op, payload, 0),
            };
            if !fin {
                let checked = if op == opcode::TEXT { utf8_prefix(&payload, checked)? } else { 0 };
                self.message = Some((op, payload, checked));
                continue;
            }
            return match op {
                opcode::TEXT => String::from_utf8(payload)
                    .map(|t| Some(Incoming::Text(t)))
                    .map_err(|_| DecodeError::InvalidData("text message is not valid UTF-8")),
                _ => Ok(Some(Incoming::Binary(payload))),
            };
        }
    }

    /// One complete frame off the front of `buf`: `(fin, opcode, unmasked payload, bytes
    /// used)`, or `None` when it is not all there yet.
    #[allow(clippy::type_complexity)]
    fn frame(&self) -> Result<Option<(bool, u8, Vec<u8>, usize)>, DecodeError> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, op) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
        if rsv != 0 {
            return Err(DecodeError::Protocol("reserved bits set"));
        }
        if !matches!(op, 0x0..=0x2 | 0x8..=0xa) {
            return Err(DecodeError::Protocol("unknown opcode"));
        }
        if b[1] & 0x80 == 0 {
            return Err(DecodeError::Protocol("client frames must be masked"));
        }
        let (len, mut at) = match b[1] & 0x7f {
            126 => match b.get(2..4) {
                Some(x) => (u16::from_be_bytes([x[0], x[1]]) as u64, 4),
                None => return Ok(None),
            },
            127 => match b.get(2..10) {
                // RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0.
                Some(x) if x[0] & 0x80 != 0 => {
                    return Err(DecodeError::Protocol("64-bit payload length with the top bit set"));
                }
                Some(x) => (u64::from_be_bytes(x.try_into().expect("8 bytes")), 10),
                None => return Ok(None),
            },
            n => (n as u64, 2),
        };
        if op >= opcode::CLOSE && (!fin || len > 125) {
            return Err(DecodeError::Protocol("control frames must be final and at most 125 bytes"));
        }
        if len > self.max_message as u64 {
            return Err(DecodeError::TooBig);
        }
        let len = len as usize;
        let Some(mask) = b.get(at..at + 4) else { return Ok(None) };
        let mask = [mask[0], mask[1], mask[2], mask[3]];
        at += 4;
        let Some(payload) = b.get(at..at + len) else { return Ok(None) };
        let payload = payload.iter().enumerate().map(|(i, x)| x ^ mask[i & 3]).collect();
        Ok(Some((fin, op, payload, at + len)))
    }
}

/// How much of a text message in progress is valid UTF-8, checking from `from` on: all
/// of it but a code point cut at the end by the fragment boundary. Any other invalid
/// byte fails at once (RFC 6455 §8.1), not when the message is complete.
fn utf8_prefix(text: &[u8], from: usize) -> Result<usize, DecodeError> {
    match std::str::from_utf8(&text[from..]) {
        Ok(_) => Ok(text.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(DecodeError::InvalidData("text message is not valid UTF-8")),
    }
}

fn control(op: u8, payload: Vec<u8>) -> Result<Incoming, DecodeError> {
    Ok(match op {
        opcode::PING => Incoming::Ping(payload),
        opcode::PONG => Incoming::Pong,
        _ => match payload.len() {
            0 => Incoming::Close(None),
            1 => return Err(DecodeError::Protocol("close frame with a one-byte payload")),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !valid_close_code(code) {
                    return Err(DecodeError::Protocol("invalid close code"));
                }
                if std::str::from_utf8(&payload[2..]).is_err() {
                    return Err(DecodeError::InvalidData("close reason is not valid UTF-8"));
                }
                Incoming::Close(Some(code))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, x)| x ^ mask[i & 3]));
        out
    }

    fn decode_all(d: &mut Decoder) -> Vec<Result<Incoming, DecodeError>> {
        let mut out = Vec::new();
        loop {
            match d.decode() {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn whole_split_and_fragmented_messages() {
        let mut d = Decoder::new(1 << 20);
        let big = "x".repeat(70_000);
        let mut bytes = client(0x81, b"{\"op\":\"ping\"}");
        bytes.extend(client(0x01, b"frag"));
        bytes.extend(client(0x89, b"p")); // a ping between fragments
        bytes.extend(client(0x80, b"mented"));
        bytes.extend(client(0x81, big.as_bytes()));
        bytes.extend(client(0x82, &[0, 1]));
        // "€" (E2 82 AC) cut across three fragments.
        bytes.extend([client(0x01, &[0xe2]), client(0x00, &[0x82]), client(0x80, &[0xac])].concat());
        bytes.extend(client(0x8a, b""));
        bytes.extend(client(0x88, &[0x03, 0xe8, b'o', b'k']));
        // Byte by byte: every partial state is visited.
        let mut got = Vec::new();
        for b in &bytes {
            d.feed(std::slice::from_ref(b));
            got.extend(decode_all(&mut d));
        }
        assert_eq!(
            got,
            vec![
                Ok(Incoming::Text("{\"op\":\"ping\"}".into())),
                Ok(Incoming::Ping(b"p".to_vec())),
                Ok(Incoming::Text("fragmented".into())),
                Ok(Incoming::Text(big)),
                Ok(Incoming::Binary(vec![0, 1])),
                Ok(Incoming::Text("€".into())),
                Ok(Incoming::Pong),
                Ok(Incoming::Close(Some(1000))),
            ]
        );
        assert_eq!(d.buf.capacity(), 0, "nothing held once everything is decoded");
    }

    #[test]
    fn protocol_errors_and_size_limit() {
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (vec![0x81, 0x00], DecodeError::Protocol("client frames must be masked")),
            (client(0xc1, b"x"), DecodeError::Protocol("reserved bits set")),
            (client(0x83, b"x"), DecodeError::Protocol("unknown opcode")),
            (client(0x09, b"x"), DecodeError::Protocol("control frames must be final and at most 125 bytes")),
            (
                client(0x89, &[0; 126]),
                DecodeError::Protocol("control frames must be final and at most 125 bytes"),
            ),
            (client(0x80, b"x"), DecodeError::Protocol("continuation without a message")),
            (client(0x81, &[0xff, 0xfe]), DecodeError::InvalidData("text message is not valid UTF-8")),
            (
                [client(0x01, &[b'a', 0xce]), client(0x80, b"a")].concat(),
                DecodeError::InvalidData("text message is not valid UTF-8"),
            ),
            // Fails on the first fragment, without waiting for the rest.
            (client(0x01, &[b'a', 0xff]), DecodeError::InvalidData("text message is not valid UTF-8")),
            (
                [client(0x01, &[0xce]), client(0x00, &[0xba, 0xe2]), client(0x00, &[0x82, b'x'])].concat(),
                DecodeError::InvalidData("text message is not valid UTF-8"),
            ),
            (client(0x88, &[3]), DecodeError::Protocol("close frame with a one-byte payload")),
            (client(0x88, &[0x03, 0xe8, 0xff]), DecodeError::InvalidData("close reason is not valid UTF-8")),
            (client(0x81, &[b'a'; 101]), DecodeError::TooBig),
            ([client(0x01, &[b'a'; 60]), client(0x80, &[b'a'; 60])].concat(), DecodeError::TooBig),
            (
                [client(0x01, b"a"), client(0x81, b"b")].concat(),
                DecodeError::Protocol("new message inside a fragmented one"),
            ),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::new(100);
            d.feed(&bytes);
            assert_eq!(decode_all(&mut d).pop(), Some(Err(want)));
        }
        // The size is refused from the header alone, before the payload arrives.
        let mut d = Decoder::new(100);
        d.feed(&[0x81, 0x80 | 126, 0x10, 0x00]);
        assert_eq!(d.decode(), Err(DecodeError::TooBig));
        // A 64-bit length must not use its top bit, whatever the limit.
        let mut d = Decoder::new(100);
        d.feed(&[0x81, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(d.decode(), Err(DecodeError::Protocol("64-bit payload length with the top bit set")));
    }

    #[test]
    fn close_codes_a_client_may_send() {
        for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4001, 4999] {
            let mut d = Decoder::new(100);
            d.feed(&client(0x88, &code.to_be_bytes()));
            assert_eq!(d.decode(), Ok(Some(Incoming::Close(Some(code)))), "{code}");
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            let mut d = Decoder::new(100);
            d.feed(&client(0x88, &code.to_be_bytes()));
            assert_eq!(d.decode(), Err(DecodeError::Protocol("invalid close code")), "{code}");
        }
    }

    #[test]
    fn encoded_headers_use_the_shortest_length() {
        for (len, want) in [(0usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut h = [0u8; MAX_HEADER];
            assert_eq!(encode_header(opcode::TEXT, len, &mut h), want, "{len}");
            assert_eq!(h[0], 0x81);
        }
        assert_eq!(close(1012, "bye"), [0x88, 5, 0x03, 0xf4, b'b', b'y', b'e']);
    }
}
