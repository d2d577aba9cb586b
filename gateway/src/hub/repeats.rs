//! The keys of a channel's recent messages, to drop a repeat that history positions
//! cannot catch: a publish retried after a Redis Cluster failover, whose first attempt
//! was delivered by the old master but never reached its replica, is published again
//! by the new master under a new (higher) id. Both carry the same key (the publish's
//! idempotency key or stream sequence) in their frame, so the second is dropped here.

use std::{
    collections::{HashSet, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// How long a key is remembered: far longer than a failover and a publisher's retries.
const WINDOW: Duration = Duration::from_secs(60);
/// Most keys remembered per channel; the oldest go first. A retry comes within a few
/// seconds, so on a busy channel the last few thousand messages are enough.
const MAX_KEYS: usize = 4096;

/// Recently delivered keys of one channel, oldest first, remembered by a keyed 64-bit
/// hash (two messages with different keys collide about once in 2^64 / 4096 messages,
/// and nobody outside the process can aim for it). Empty (no allocation) for a channel
/// whose messages carry no keys.
#[derive(Debug, Default)]
pub(super) struct RecentKeys {
    order: VecDeque<(u64, Instant)>,
    set: HashSet<u64>,
}

/// The process's key for hashing repeat keys.
fn hasher() -> &'static RandomState {
    static STATE: OnceLock<RandomState> = OnceLock::new();
    STATE.get_or_init(RandomState::new)
}

impl RecentKeys {
    /// Whether `key` was delivered within the window; remembers it if not.
    pub(super) fn seen(&mut self, key: &str, now: Instant) -> bool {
        while let Some(&(h, at)) = self.order.front()
            && now.saturating_duration_since(at) > WINDOW
        {
            self.order.pop_front();
            self.set.remove(&h);
        }
        let h = hasher().hash_one(key);
        if self.set.contains(&h) {
            return true;
        }
        if self.order.len() == MAX_KEYS
            && let Some((old, _)) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back((h, now));
        self.set.insert(h);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_repeats_only_within_the_window() {
        let mut r = RecentKeys::default();
        let t = Instant::now();
        assert!(!r.seen("ik1", t));
        assert!(!r.seen("ik2", t));
        assert!(r.seen("ik1", t + Duration::from_secs(1)));
        assert!(!r.seen("ik1", t + WINDOW + Duration::from_secs(1)), "forgotten after the window");
    }

    #[test]
    fn the_oldest_keys_go_first() {
        let mut r = RecentKeys::default();
        let t = Instant::now();
        for i in 0..=MAX_KEYS {
            assert!(!r.seen(&format!("k{i}"), t));
        }
        assert!(!r.seen("k0", t), "k0 was pushed out");
        assert!(r.seen(&format!("k{MAX_KEYS}"), t));
    }
}
