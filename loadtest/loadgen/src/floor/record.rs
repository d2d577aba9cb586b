//! The records `floor fanout` sends: a fixed size, the message's seq and its scheduled
//! send time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes per record: the size of the payloads in `bench.sh`.
pub const RECORD: usize = 100;

pub(super) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// Record `seq` sent as scheduled at `sched_ns` (nanoseconds since the epoch).
pub(super) fn encode(seq: u64, sched_ns: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&sched_ns.to_le_bytes());
    out.resize(start + RECORD, b'x');
}

pub(super) fn decode(rec: &[u8]) -> (u64, u64) {
    let seq = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
    let sched = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
    (seq, sched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_at_the_fixed_size() {
        let mut buf = Vec::new();
        encode(7, 1_700_000_000_123_456_789, &mut buf);
        encode(8, 42, &mut buf);
        assert_eq!(buf.len(), 2 * RECORD);
        assert_eq!(decode(&buf[..RECORD]), (7, 1_700_000_000_123_456_789));
        assert_eq!(decode(&buf[RECORD..]), (8, 42));
    }
}
