//! The WebSocket frame format: frame headers, masked client frames, close codes, and
//! what ends a connection.

use std::{
    hash::{BuildHasher, Hasher, RandomState},
    io,
};

use shared::protocol::opcode as op;

use crate::net::io_kind;

/// Largest frame or message accepted: loadgen's payloads are at most 1 MiB, and the
/// gateway's message frame adds the envelope and a few escapes.
pub const MAX_MESSAGE: usize = 2 << 20;

/// Why a connection cannot be read any further.
#[derive(Debug)]
pub enum End {
    /// The server sent a close frame with this code (1005 when it had none).
    Close(u16),
    /// The connection ended without a close frame.
    Eof,
    /// A socket error.
    Io(io::Error),
    /// The server broke the protocol (what it did, for debugging).
    Protocol(#[allow(dead_code)] &'static str),
    /// A frame or message larger than [`MAX_MESSAGE`].
    TooBig,
    /// A text message that is not UTF-8.
    BadUtf8,
}

impl End {
    /// Short stable name for the error counts (the names tungstenite's errors had).
    pub fn kind(&self) -> String {
        match self {
            End::Close(code) => format!("ws_close_{code}"),
            End::Eof => "eof".into(),
            End::Io(e) => io_kind(e),
            End::Protocol(_) => "ws_protocol".into(),
            End::TooBig => "ws_capacity".into(),
            End::BadUtf8 => "ws_other".into(),
        }
    }
}

/// Where the frame at the start of a buffer lies, once its header is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) fin: bool,
    pub(super) op: u8,
    /// Payload start (header length).
    pub(super) start: usize,
    /// Frame end.
    pub(super) end: usize,
}

/// Parses the header of the frame at the start of `buf`: `Ok(Ok(head))` when the whole
/// frame is there, `Ok(Err(n))` when `n` bytes in all are needed to get further.
pub(super) fn head(buf: &[u8]) -> Result<Result<Head, usize>, End> {
    let [b0, b1, ..] = *buf else { return Ok(Err(2)) };
    if b0 & 0x70 != 0 {
        return Err(End::Protocol("reserved bits set"));
    }
    if b1 & 0x80 != 0 {
        return Err(End::Protocol("masked frame from the server"));
    }
    let (fin, op) = (b0 & 0x80 != 0, b0 & 0x0f);
    let control = op >= op::CLOSE;
    match op {
        op::CONTINUATION | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG => {}
        _ => return Err(End::Protocol("unknown opcode")),
    }
    let (start, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(Err(4)),
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            None => return Ok(Err(10)),
        },
        n => (2, u64::from(n)),
    };
    if control && (!fin || len > 125) {
        return Err(End::Protocol("fragmented or long control frame"));
    }
    if len > MAX_MESSAGE as u64 {
        return Err(End::TooBig);
    }
    let end = start + len as usize;
    Ok(if buf.len() >= end { Ok(Head { fin, op, start, end }) } else { Err(end) })
}

/// Appends a masked client frame (FIN set) to `out`.
pub(super) fn client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= 125, "control frames only");
    let mask = (RandomState::new().build_hasher().finish() as u32).to_le_bytes();
    out.push(0x80 | opcode);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// The status code of a close frame's payload (1005 when it has none).
pub(super) fn close_code(payload: &[u8]) -> Result<u16, End> {
    match payload {
        [] => Ok(1005),
        [_] => Err(End::Protocol("close frame with a one-byte payload")),
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
    }
}
