//! A connection's inbox: the bounded queue between the hub's fan-out and the
//! connection's writer. Fan-out never waits on it: a message that does not fit is
//! refused, and the hub then closes the connection as a slow consumer.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    task::{Context, Poll, Waker},
};

use tokio_util::sync::CancellationToken;

use super::Delivery;
use crate::{config::Limits, metrics::ConnKind};

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Its inbox overflowed.
    SlowConsumer,
}

/// A connection's inbox: the sending half of its bounded queue, and how to close it.
/// The queue is bounded twice: in messages (`queue_size`) and in payload bytes
/// (`queue_bytes`); a message always fits an empty queue, whatever its size. The
/// catch-up burst of an outage recovery ([`Delivery::catch_up`]) is queued beyond the
/// bounds: it arrives all at once through no fault of the subscriber, and counting it
/// would disconnect every subscriber of a busy channel after each broker outage.
///
/// The queue is a `VecDeque` behind a mutex held for a push or a pop, not a tokio
/// channel: an idle connection's inbox is one small allocation (a bounded tokio
/// channel costs about 800 bytes per connection before its first message).
#[derive(Debug)]
pub struct Inbox {
    queue: Mutex<Queue>,
    close: CancellationToken,
    kick: OnceLock<Kick>,
    /// The connection's kind, a metric label.
    pub(super) kind: ConnKind,
    max_bytes: usize,
    /// Most messages queued.
    capacity: usize,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Arc<Delivery>>,
    /// How many of `items` count against the limits (all but catch-up deliveries).
    counted: usize,
    /// Payload bytes of the counted `items`.
    bytes: usize,
    /// The receiver, when it waits for the next delivery.
    waker: Option<Waker>,
    /// False once the receiver is gone: nothing is queued any more.
    open: bool,
}

/// Queue capacity kept when a queue drains after a burst.
const KEEP_CAPACITY: usize = 8;

impl Queue {
    fn pop(&mut self) -> Option<Arc<Delivery>> {
        let d = self.items.pop_front()?;
        if !d.catch_up {
            self.counted -= 1;
            self.bytes -= d.data.len();
        }
        if self.items.is_empty() && self.items.capacity() > KEEP_CAPACITY {
            self.items.shrink_to(KEEP_CAPACITY);
        }
        Some(d)
    }
}

/// The receiving half of an [`Inbox`]: hands out queued deliveries and keeps the
/// inbox's byte count.
#[derive(Debug)]
pub struct InboxRx {
    inbox: Arc<Inbox>,
}

impl InboxRx {
    /// The next delivery; `None` once the inbox is gone.
    pub async fn recv(&mut self) -> Option<Arc<Delivery>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&mut self) -> Option<Arc<Delivery>> {
        self.inbox.lock().pop()
    }

    /// Polls for the next delivery (for hand-written streams and futures).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Delivery>>> {
        let mut q = self.inbox.lock();
        match q.pop() {
            Some(d) => Poll::Ready(Some(d)),
            None => {
                if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    q.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for InboxRx {
    fn drop(&mut self) {
        let mut q = self.inbox.lock();
        q.open = false;
        q.waker = None;
        let items = std::mem::take(&mut q.items);
        q.counted = 0;
        q.bytes = 0;
        drop(q); // the deliveries are released outside the lock
        drop(items);
    }
}

impl Inbox {
    /// Creates an inbox bounded by `limits.queue_size` messages and `limits.queue_bytes`
    /// payload bytes; `close` is cancelled when the hub kicks it.
    pub fn new(kind: ConnKind, limits: &Limits, close: CancellationToken) -> (Arc<Self>, InboxRx) {
        let inbox = Arc::new(Self {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                counted: 0,
                bytes: 0,
                waker: None,
                open: true,
            }),
            close,
            kick: OnceLock::new(),
            kind,
            max_bytes: limits.queue_bytes,
            capacity: limits.queue_size.max(1),
        });
        (inbox.clone(), InboxRx { inbox })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Only plain data behind it: a panic elsewhere leaves nothing inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Payload bytes queued now (those that count against the limit).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Queues `d`, or says which limit it would break (nothing queued then).
    pub(super) fn offer(&self, d: &Arc<Delivery>) -> Result<(), Offer> {
        let len = d.data.len();
        let mut q = self.lock();
        if !q.open {
            return Err(Offer::Closed);
        }
        if !d.catch_up {
            if q.counted >= self.capacity {
                return Err(Offer::Full("queue_messages"));
            }
            if q.bytes > 0 && q.bytes + len > self.max_bytes {
                return Err(Offer::Full("queue_bytes"));
            }
            q.counted += 1;
            q.bytes += len;
        }
        q.items.push_back(d.clone());
        let waker = q.waker.take();
        drop(q);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Cancelled when the hub closes this connection.
    pub fn closed(&self) -> &CancellationToken {
        &self.close
    }

    /// Why the hub closed the connection, if it did.
    pub fn kicked(&self) -> Option<Kick> {
        self.kick.get().copied()
    }

    /// Whether the hub has closed this connection: an atomic load (a token's
    /// `is_cancelled` takes a lock, and this runs once per subscriber per message).
    pub(super) fn is_kicked(&self) -> bool {
        self.kick.get().is_some()
    }

    /// Closes the connection for `why` (once).
    pub(super) fn kick_out(&self, why: Kick) {
        if self.kick.set(why).is_ok() {
            self.close.cancel();
        }
    }
}

/// Why an inbox refused a message.
pub(super) enum Offer {
    /// The queue is full by this limit (`queue_messages` or `queue_bytes`).
    Full(&'static str),
    /// The connection is gone.
    Closed,
}
