//! HTTP/1.1 chunked transfer coding (RFC 9112 §7.1): the one writer of chunk headers.
//! A message's SSE chunk is framed once and written as is to every subscriber; other
//! chunks are written as header, data and [`TRAILER`] without copying them together.

use bytes::Bytes;

/// Longest chunk header: 16 hex digits and CRLF.
pub const MAX_HEADER: usize = 18;
/// What follows a chunk's data.
pub const TRAILER: &[u8] = b"\r\n";
/// The last chunk, which ends a chunked body (no trailer fields).
pub const LAST: &[u8] = b"0\r\n\r\n";

/// Writes the header of a chunk of `len` bytes (`<hex>\r\n`) into `out`; returns its
/// length.
pub fn header(len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble];
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    digits + 2
}

/// `data` as the three pieces of one chunk (header, data, trailer), to write with one
/// vectored write; `head` holds the header's bytes.
pub fn pieces<'a>(data: &'a [u8], head: &'a mut [u8; MAX_HEADER]) -> [&'a [u8]; 3] {
    let n = header(data.len(), head);
    [&head[..n], data, TRAILER]
}

/// `data` framed as one whole chunk in one buffer.
pub fn frame(data: &[u8]) -> Bytes {
    let mut head = [0u8; MAX_HEADER];
    let n = header(data.len(), &mut head);
    let mut v = Vec::with_capacity(n + data.len() + TRAILER.len());
    v.extend_from_slice(&head[..n]);
    v.extend_from_slice(data);
    v.extend_from_slice(TRAILER);
    Bytes::from(v)
}

/// The data of a whole chunk made by [`frame`] (for writers that frame it themselves).
pub fn data(framed: &Bytes) -> Bytes {
    let start = framed.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    framed.slice(start.min(framed.len())..framed.len().saturating_sub(TRAILER.len()).max(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_headers_are_hex() {
        for (len, want) in [
            (1usize, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (0x1a2b, "1a2b\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            let mut out = [0u8; MAX_HEADER];
            let n = header(len, &mut out);
            assert_eq!(std::str::from_utf8(&out[..n]).unwrap(), want);
        }
    }

    #[test]
    fn framing_round_trips_and_pieces_match_the_frame() {
        let framed = frame(b"id: 1\ndata: x\n\n");
        assert_eq!(&framed[..], b"f\r\nid: 1\ndata: x\n\n\r\n");
        assert_eq!(&data(&framed)[..], b"id: 1\ndata: x\n\n");
        let mut head = [0u8; MAX_HEADER];
        assert_eq!(pieces(b"id: 1\ndata: x\n\n", &mut head).concat(), &framed[..]);
    }
}
