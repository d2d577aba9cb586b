//! Long-poll support: each channel a long-poll client joined keeps a short buffer of
//! recent messages (a ring) and stays subscribed for a while after each answer, so the
//! client's next poll on this node misses nothing between two requests.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use shared::StreamPos;

use super::{Channel, Delivery, Hub, Inbox, Subscription};

/// What a long-poll sees when it joins a channel.
pub struct PollJoin {
    /// The subscription (drop it when the poll answers).
    pub subscription: Subscription,
    /// Buffered messages after the cursor, oldest first.
    pub backlog: Vec<Arc<Delivery>>,
    /// The channel's position now (cursor value if nothing newer is returned).
    pub position: u64,
    /// Whether messages after the cursor may have been missed.
    pub gap: bool,
    /// The last history position this node delivered on the channel.
    pub last_pos: Option<StreamPos>,
}

impl Hub {
    /// Joins `channel` for a long-poll: returns buffered messages after `after` (when
    /// given) and subscribes `inbox` for what comes next, in one step so nothing falls
    /// between the two.
    pub fn poll_join(self: &Arc<Self>, channel: &str, after: Option<u64>, inbox: &Arc<Inbox>) -> PollJoin {
        let mut shard = self.shard(channel);
        let keep_until = Instant::now() + self.config.poll_keepalive;
        let now_seq = self.seq.load(std::sync::atomic::Ordering::Acquire);
        let cap = self.config.poll_buffer;
        let ch = self.entry(&mut shard, channel);
        ch.keep_until = Some(keep_until);
        if ch.ring.is_none() {
            ch.ring = Some(VecDeque::with_capacity(cap.min(16)));
            ch.floor = now_seq;
        }
        let ring = ch.ring.as_ref().expect("created above");
        let position = ring.back().map_or(ch.floor, |d| d.seq).max(ch.floor);
        let (backlog, gap) = match after {
            Some(after) => (
                ring.iter().filter(|d| d.seq > after).cloned().collect(),
                after < ch.floor || after > now_seq,
            ),
            None => (Vec::new(), false),
        };
        let last_pos = ch.last_pos.or(ch.head);
        let subscription = self.join_locked(ch, inbox);
        drop(shard);
        PollJoin { subscription, backlog, position, gap, last_pos }
    }

    /// Keeps `channel` subscribed for a while without a subscriber (between polls).
    pub fn keep_alive(&self, channel: &str) {
        let until = Instant::now() + self.config.poll_keepalive;
        let mut shard = self.shard(channel);
        if let Some(ch) = shard.channels.get_mut(channel) {
            ch.keep_until = Some(until);
        }
    }

    /// Keeps `delivery` in the channel's ring when long-poll clients use the channel.
    pub(super) fn buffer_for_polls(&self, ch: &mut Channel, delivery: &Arc<Delivery>) {
        if let Some(ring) = &mut ch.ring {
            if ring.len() >= self.config.poll_buffer
                && let Some(old) = ring.pop_front()
            {
                ch.floor = old.seq;
            }
            ring.push_back(delivery.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::tests::{hub, inbox};

    #[test]
    fn poll_join_returns_buffer_after_cursor_and_flags_gaps() {
        let hub = hub(0);
        let (a, _ra) = inbox(8);
        let first = hub.poll_join("c", None, &a);
        assert!(first.backlog.is_empty() && !first.gap);
        let start = first.position;
        drop(first);
        for i in 0..3 {
            hub.dispatch("c", Bytes::from(format!("m{i}")));
        }
        let j = hub.poll_join("c", Some(start), &a);
        assert_eq!(j.backlog.iter().map(|d| d.data_str().to_owned()).collect::<Vec<_>>(), ["m0", "m1", "m2"]);
        assert!(!j.gap);
        assert_eq!(j.position, j.backlog[2].seq);
        drop(j);
        for i in 3..10 {
            hub.dispatch("c", Bytes::from(format!("m{i}")));
        }
        let j = hub.poll_join("c", Some(start), &a);
        assert!(j.gap, "buffer of 4 no longer covers the cursor");
        assert_eq!(j.backlog.len(), 4);
    }
}
