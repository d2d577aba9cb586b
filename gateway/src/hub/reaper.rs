//! Channels whose last local subscriber left linger for `--linger-ms` (or longer,
//! while kept for long-polls), then are dropped and unsubscribed at the broker.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::Hub;

const REAP_EVERY: Duration = Duration::from_millis(200);
/// Channels a shard's table keeps room for however few it holds.
pub(super) const MIN_CAPACITY: usize = 16;

impl Hub {
    /// Takes subscriber `key` out of `channel`; an emptied channel waits for the reaper.
    pub(super) fn leave(&self, channel: &str, key: usize) {
        let mut shard = self.shard(channel);
        let Some(ch) = shard.channels.get_mut(channel) else { return };
        if ch.subs.try_remove(key).is_none() {
            return;
        }
        self.metrics.subscriptions.decrement(1.0);
        if ch.subs.is_empty() {
            let due = Instant::now() + self.config.linger;
            let due = ch.keep_until.map_or(due, |k| k.max(due));
            let name = ch.name.clone();
            shard.idle.push((name, due));
        }
    }

    /// Unsubscribes channels that have been empty for their linger time. Returns how
    /// many were removed.
    pub fn reap(&self, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            if shard.idle.is_empty() {
                continue;
            }
            let idle = std::mem::take(&mut shard.idle);
            for (name, due) in idle {
                let Some(ch) = shard.channels.get(&name) else { continue };
                if !ch.subs.is_empty() {
                    continue;
                }
                let due = ch.keep_until.map_or(due, |k| k.max(due));
                if due > now {
                    shard.idle.push((name, due));
                    continue;
                }
                shard.channels.remove(&name);
                self.broker.unsubscribe(name);
                self.metrics.channels.decrement(1.0);
                self.channel_count.fetch_sub(1, Ordering::Relaxed);
                removed += 1;
            }
            // A table never shrinks by itself: after a burst of channels is gone, give
            // back what is four times more than needed (keeping room for a few).
            let len = shard.channels.len();
            if shard.channels.capacity() > 4 * len.max(MIN_CAPACITY) {
                shard.channels.shrink_to((2 * len).max(MIN_CAPACITY));
            }
        }
        removed
    }

    /// Runs the reaper until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => { self.reap(Instant::now()); }
            }
        }
    }
}
