//! What one subscriber saw: the seqs of its channel it received (a bitset), and from
//! that the deliveries it missed, duplicated or got out of order.

use crate::{payload::Payload, report::Window};

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The channel index it subscribes to.
    pub channel: u64,
    /// Whether it subscribed successfully.
    pub connected: bool,
    /// Seen seqs of its channel: bit `seq / channels`.
    bits: Vec<u64>,
    max_seq: Option<u64>,
    /// First copies received (any window).
    pub unique: u64,
    /// Extra copies.
    pub duplicates: u64,
    /// Arrivals after a higher seq.
    pub reordered: u64,
    /// Messages for another channel or an unplanned seq.
    pub unexpected: u64,
    /// Messages not in the payload format.
    pub bad_payload: u64,
    /// Why and when (µs since the epoch) the connection was lost, if it was.
    pub disconnect: Option<(String, u64)>,
}

/// Whether a delivery was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First copy.
    New,
    /// A copy of a seq already seen.
    Duplicate,
    /// Not a message this subscriber should get.
    Unexpected,
}

impl Tracker {
    /// A tracker for a subscriber of channel `channel`.
    pub fn new(channel: u64) -> Self {
        Self { channel, ..Default::default() }
    }

    /// Records a delivery; seqs at or above `seq_limit` were never planned.
    pub fn record(&mut self, p: Payload, channels: u64, seq_limit: u64) -> Seen {
        if p.ch != self.channel || p.seq % channels != p.ch || p.seq >= seq_limit {
            self.unexpected += 1;
            return Seen::Unexpected;
        }
        let k = p.seq / channels;
        let (word, bit) = ((k / 64) as usize, k % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        self.bits[word] |= 1 << bit;
        self.unique += 1;
        match self.max_seq {
            Some(m) if p.seq < m => self.reordered += 1,
            _ => self.max_seq = Some(p.seq),
        }
        Seen::New
    }

    fn has(&self, k: u64) -> bool {
        self.bits.get((k / 64) as usize).is_some_and(|w| w & (1 << (k % 64)) != 0)
    }

    /// Deliveries expected in `w` and how many of them are missing: the seqs of this
    /// subscriber's channel in the measured window, published while it was connected.
    pub fn tally(&self, w: &Window, channels: u64) -> (u64, u64) {
        if !self.connected {
            return (0, 0);
        }
        let end = match &self.disconnect {
            Some((_, at)) => w.end_seq.min(w.scheduled_by(*at)),
            None => w.end_seq,
        };
        let (mut expected, mut missing) = (0, 0);
        let mut s = first_on_channel(w.measure_from, self.channel, channels);
        while s < end {
            if w.failed.binary_search(&s).is_err() {
                expected += 1;
                if !self.has(s / channels) {
                    missing += 1;
                }
            }
            s += channels;
        }
        (expected, missing)
    }
}

/// The first seq at or after `from` that goes to channel `c` of `m`.
pub fn first_on_channel(from: u64, c: u64, m: u64) -> u64 {
    let r = from % m;
    if r <= c { from - r + c } else { from - r + m + c }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64, channels: u64) -> Payload {
        Payload { seq, ch: seq % channels, t_us: 0 }
    }

    #[test]
    fn tracker_counts_missing_duplicates_and_order() {
        let m = 4;
        let mut t = Tracker::new(1);
        t.connected = true;
        // Channel 1 of 4 gets seqs 1, 5, 9, 13, 17, ...
        for seq in [1, 5, 13, 9, 13] {
            t.record(p(seq, m), m, 100);
        }
        assert_eq!((t.unique, t.duplicates, t.reordered), (4, 1, 1));
        assert_eq!(t.record(p(2, m), m, 100), Seen::Unexpected);
        assert_eq!(t.record(p(101, m), m, 100), Seen::Unexpected);
        // Window: seqs 4..20 sent → channel 1 expects 5, 9, 13, 17; 17 is missing.
        let w = Window { measure_from: 4, end_seq: 20, t0_us: 0, rate: 1e6, failed: vec![] };
        assert_eq!(t.tally(&w, m), (4, 1));
        // A failed publish is not expected.
        let w2 = Window { failed: vec![17], ..w.clone() };
        assert_eq!(t.tally(&w2, m), (3, 0));
        // Dropped at t=10µs (seqs 0..=10 scheduled at 1 µs each): expects 5, 9 only.
        t.disconnect = Some(("eof".into(), 10));
        assert_eq!(t.tally(&w, m), (2, 0));
        // Never connected: nothing expected.
        assert_eq!(Tracker::new(1).tally(&w, m), (0, 0));
    }

    #[test]
    fn first_seq_of_a_channel() {
        assert_eq!(first_on_channel(0, 3, 10), 3);
        assert_eq!(first_on_channel(13, 3, 10), 13);
        assert_eq!(first_on_channel(14, 3, 10), 23);
        assert_eq!(first_on_channel(7, 0, 1), 7);
    }
}
