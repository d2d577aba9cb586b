//! Where each channel's history stood when this node subscribed it (its head), so a
//! broker outage before the channel's first history message can still be replayed, and
//! a first long-poll cursor carries a position.
//!
//! New channels wait in one queue that at most [`WORKERS`] tasks drain, each reading one
//! head at a time once the channel's subscription is live. It was a task and a Redis
//! round trip per new channel, all in flight at once: 6.6 KB each (heap profile, 212 MB
//! for 32,000 channels subscribed within a second), and the allocator kept that memory
//! afterwards (96,000 channels left a node at 606 MB instead of 74 MB). Queued, a channel
//! costs 40 bytes until its turn.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::{Hub, READY_WAIT};
use crate::broker::Ready;

/// Most heads read at once (each holds a pooled Redis connection while it runs).
pub(super) const WORKERS: usize = 8;
/// How long a worker waits for one channel's subscription before it goes on to the
/// next and puts that one back in the queue.
const PATIENCE: Duration = Duration::from_millis(50);

/// Channels whose head is still to be read.
#[derive(Default)]
pub(super) struct Heads(Mutex<Queue>);

#[derive(Default)]
pub(super) struct Queue {
    /// Channel, its subscription's ready flag, and how long to wait for that flag.
    pub(super) todo: VecDeque<(Arc<str>, Arc<Ready>, Instant)>,
    /// Tasks draining `todo`.
    pub(super) workers: usize,
}

impl Heads {
    pub(super) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Hub {
    /// Reads `name`'s head once `ready` is set (waiting at most [`READY_WAIT`]), unless
    /// the channel is gone by then. Without a runtime (plain unit tests) it does nothing.
    pub(super) fn want_head(&self, name: Arc<str>, ready: Arc<Ready>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let mut q = self.heads.lock();
        q.todo.push_back((name, ready, Instant::now() + READY_WAIT));
        if q.workers >= WORKERS {
            return;
        }
        let Some(hub) = self.me.upgrade() else { return };
        q.workers += 1;
        drop(q);
        rt.spawn(hub.read_heads());
    }

    /// One worker: reads queued heads one at a time until the queue is empty.
    async fn read_heads(self: Arc<Self>) {
        loop {
            let next = {
                let mut q = self.heads.lock();
                let next = q.todo.pop_front();
                if next.is_none() {
                    q.workers -= 1;
                    q.todo.shrink_to_fit();
                }
                next
            };
            let Some((name, ready, deadline)) = next else { return };
            if !self.wants_head(&name, &ready) {
                continue; // reaped meanwhile, or read by a long-poll already
            }
            // A channel whose subscription is slow (its master down, say) must not hold
            // up the ones behind it: give it a moment, then put it back in the queue.
            let wait = deadline.min(Instant::now() + PATIENCE);
            if tokio::time::timeout_at(wait, ready.wait()).await.is_err() {
                if Instant::now() < deadline {
                    self.heads.lock().todo.push_back((name, ready, deadline));
                }
                continue;
            }
            if !self.wants_head(&name, &ready) {
                continue;
            }
            let Ok(head) = self.broker.head(&name).await else { continue };
            if let Some(ch) = self.shard(&name).channels.get_mut(&name)
                && Arc::ptr_eq(&ch.ready, &ready)
            {
                ch.head = ch.head.or(head);
                ch.head_read = true;
            }
        }
    }

    /// Whether `name` is still the channel subscribed with `ready` (not reaped, nor
    /// reaped and created again) and its head is still unknown.
    fn wants_head(&self, name: &str, ready: &Arc<Ready>) -> bool {
        self.shard(name).channels.get(name).is_some_and(|ch| Arc::ptr_eq(&ch.ready, ready) && !ch.head_read)
    }
}
