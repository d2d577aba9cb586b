//! The hub: this node's registry of channels and their local subscribers.
//!
//! Channels live in shards (a mutex each) so unrelated channels don't contend. A
//! channel's first local subscriber makes the hub subscribe it at the broker; after its
//! last one leaves, it lingers briefly and is then unsubscribed by the reaper. Dispatch
//! builds one shared [`Delivery`] per message and `try_send`s it into each subscriber's
//! bounded inbox; a full inbox gets the slow-consumer policy (the connection is closed
//! with a reason) and never delays anyone else.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use metrics::{Counter, Gauge, counter, gauge};
use shared::{StreamPos, envelope::FrameHeader};
use slab::Slab;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{Broker, HistoryEntry, Ready, Recovery, Sink},
    delivery::Delivery,
    metrics as m,
};

const SHARDS: usize = 64;
const REAP_EVERY: Duration = Duration::from_millis(200);

/// The transport a subscriber uses; a metric label, nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Server-Sent Events.
    Sse = 0,
    /// WebSocket.
    Ws = 1,
    /// HTTP long-poll.
    Poll = 2,
}

impl Transport {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Ws => "ws",
            Self::Poll => "poll",
        }
    }
    const ALL: [Transport; 3] = [Self::Sse, Self::Ws, Self::Poll];
}

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Its inbox overflowed.
    SlowConsumer,
}

/// A connection's inbox: the sending half of its bounded queue, and how to close it.
/// The queue is bounded twice: in messages (`queue_size`) and in payload bytes
/// (`queue_bytes`); a message always fits an empty queue, whatever its size.
///
/// The queue is a `VecDeque` behind a mutex held for a push or a pop, not a tokio
/// channel: an idle connection's inbox is one small allocation (a bounded tokio
/// channel costs about 800 bytes per connection before its first message).
#[derive(Debug)]
pub struct Inbox {
    queue: Mutex<Queue>,
    close: CancellationToken,
    kick: OnceLock<Kick>,
    transport: Transport,
    max_bytes: usize,
    /// Most messages queued.
    capacity: usize,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Arc<Delivery>>,
    /// Payload bytes of `items`.
    bytes: usize,
    /// The receiver, when it waits for the next delivery.
    waker: Option<std::task::Waker>,
    /// False once the receiver is gone: nothing is queued any more.
    open: bool,
}

/// Queue capacity kept when a queue drains after a burst.
const KEEP_CAPACITY: usize = 8;

impl Queue {
    fn pop(&mut self) -> Option<Arc<Delivery>> {
        let d = self.items.pop_front()?;
        self.bytes -= d.data.len();
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
    pub fn try_recv(&mut self) -> Result<Arc<Delivery>, mpsc::error::TryRecvError> {
        self.inbox.lock().pop().ok_or(mpsc::error::TryRecvError::Empty)
    }

    /// Polls for the next delivery (for hand-written streams and futures).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Arc<Delivery>>> {
        let mut q = self.inbox.lock();
        match q.pop() {
            Some(d) => std::task::Poll::Ready(Some(d)),
            None => {
                if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    q.waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
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
        q.bytes = 0;
        drop(q); // the deliveries are released outside the lock
        drop(items);
    }
}

impl Inbox {
    /// Creates an inbox bounded by `limits.queue_size` messages and `limits.queue_bytes`
    /// payload bytes; `close` is cancelled when the hub kicks it.
    pub fn new(
        transport: Transport,
        limits: &crate::config::Limits,
        close: CancellationToken,
    ) -> (Arc<Self>, InboxRx) {
        let inbox = Arc::new(Self {
            queue: Mutex::new(Queue { items: VecDeque::new(), bytes: 0, waker: None, open: true }),
            close,
            kick: OnceLock::new(),
            transport,
            max_bytes: limits.queue_bytes,
            capacity: limits.queue_size.max(1),
        });
        (inbox.clone(), InboxRx { inbox })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Only plain data behind it: a panic elsewhere leaves nothing inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Payload bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Queues `d`, or says which limit it would break (nothing queued then).
    fn offer(&self, d: &Arc<Delivery>) -> Result<(), Offer> {
        let len = d.data.len();
        let mut q = self.lock();
        if !q.open {
            return Err(Offer::Closed);
        }
        if q.items.len() >= self.capacity {
            return Err(Offer::Full("queue_messages"));
        }
        if q.bytes > 0 && q.bytes + len > self.max_bytes {
            return Err(Offer::Full("queue_bytes"));
        }
        q.bytes += len;
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

    fn kick_out(&self, why: Kick) {
        if self.kick.set(why).is_ok() {
            self.close.cancel();
        }
    }
}

enum Offer {
    /// The queue is full by this limit (`queue_messages` or `queue_bytes`).
    Full(&'static str),
    /// The connection is gone.
    Closed,
}

struct Sub {
    inbox: Arc<Inbox>,
}

struct Channel {
    name: Arc<str>,
    subs: Slab<Sub>,
    /// Recent messages for long-poll clients, created on the first poll.
    ring: Option<VecDeque<Arc<Delivery>>>,
    /// Messages with `seq <= floor` are not in the ring: a cursor below it has a gap.
    floor: u64,
    ready: Arc<Ready>,
    /// Keep the channel subscribed until then even with no subscribers (long-poll).
    keep_until: Option<Instant>,
    /// Last history position dispatched here; older or equal ones are duplicates.
    last_pos: Option<StreamPos>,
    /// The channel's newest history position when this node subscribed it: where an
    /// outage replay starts if no history message has arrived here since. Not used for
    /// de-duplication (it may arrive after newer live messages).
    head: Option<StreamPos>,
    /// While history is replayed after a broker outage, live payloads wait here.
    recovering: Option<Vec<Bytes>>,
}

#[derive(Default)]
struct Shard {
    channels: HashMap<Arc<str>, Channel>,
    /// Channels that became empty, with the earliest time they may be reaped.
    idle: Vec<(Arc<str>, Instant)>,
}

/// Settings of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Delay before unsubscribing an empty channel.
    pub linger: Duration,
    /// Messages kept per channel for long-poll.
    pub poll_buffer: usize,
    /// How long a long-poll answer keeps its channels subscribed.
    pub poll_keepalive: Duration,
}

struct HubMetrics {
    delivered: [Counter; 3],
    slow: [Counter; 3],
    dropped_slow: Counter,
    broker_messages: Counter,
    dispatch_latency: metrics::Histogram,
    channels: Gauge,
    subscriptions: Gauge,
}

/// The node-local registry of channels and subscribers.
pub struct Hub {
    me: Weak<Hub>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    broker: Arc<dyn Broker>,
    config: HubConfig,
    /// Node-wide message sequence (long-poll cursors); increases by one per message.
    seq: AtomicU64,
    epoch: u64,
    metrics: HubMetrics,
}

/// A subscriber's place in a channel; dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<Hub>,
    channel: Arc<str>,
    key: usize,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("channel", &self.channel).finish()
    }
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &Arc<str> {
        &self.channel
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.leave(&self.channel, self.key);
    }
}

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
    /// Set once the broker subscription is live.
    pub ready: Arc<Ready>,
    /// The last history position this node delivered on the channel.
    pub last_pos: Option<StreamPos>,
}

impl Hub {
    /// Creates the hub; `make_broker` gets the sink the broker must deliver to.
    pub fn new(config: HubConfig, make_broker: impl FnOnce(Weak<dyn Sink>) -> Arc<dyn Broker>) -> Arc<Self> {
        Arc::new_cyclic(|weak: &Weak<Hub>| {
            let sink: Weak<dyn Sink> = weak.clone();
            let metrics = HubMetrics {
                delivered: Transport::ALL.map(|t| counter!(m::DELIVERIES_TOTAL, "transport" => t.as_str())),
                slow: Transport::ALL.map(|t| counter!(m::SLOW_CONSUMER_TOTAL, "transport" => t.as_str())),
                dropped_slow: counter!(m::DROPPED_TOTAL, "reason" => "slow_consumer"),
                broker_messages: counter!(m::BROKER_MESSAGES_TOTAL),
                dispatch_latency: metrics::histogram!(m::DISPATCH_LATENCY),
                channels: gauge!(m::CHANNELS),
                subscriptions: gauge!(m::SUBSCRIPTIONS),
            };
            Hub {
                me: weak.clone(),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                hasher: RandomState::new(),
                broker: make_broker(sink),
                config,
                seq: AtomicU64::new(0),
                epoch: rand::random::<u64>() >> 12,
                metrics,
            }
        })
    }

    /// The broker this hub subscribes through.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// A random number identifying this process; long-poll cursors carry it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(channel) as usize) % self.shards.len();
        // A panic while holding a shard lock leaves only plain data behind: keep going.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry<'a>(&self, shard: &'a mut Shard, channel: &str) -> &'a mut Channel {
        if !shard.channels.contains_key(channel) {
            let name: Arc<str> = Arc::from(channel);
            let ready = Ready::new();
            self.broker.subscribe(name.clone(), ready.clone());
            self.metrics.channels.increment(1.0);
            self.fetch_head(name.clone(), ready.clone());
            shard.channels.insert(
                name.clone(),
                Channel {
                    name,
                    subs: Slab::new(),
                    ring: None,
                    floor: 0,
                    ready,
                    keep_until: None,
                    last_pos: None,
                    head: None,
                    recovering: None,
                },
            );
        }
        shard.channels.get_mut(channel).expect("inserted above")
    }

    /// Learns where `channel`'s history stands once its subscription is live, so an
    /// outage before its first history message can still be replayed.
    fn fetch_head(&self, name: Arc<str>, ready: Arc<Ready>) {
        let (Ok(rt), Some(hub)) = (tokio::runtime::Handle::try_current(), self.me.upgrade()) else { return };
        rt.spawn(async move {
            if tokio::time::timeout(crate::transport::READY_WAIT, ready.wait()).await.is_err() {
                return;
            }
            let Ok(Some(head)) = hub.broker.head(&name).await else { return };
            if let Some(ch) = hub.shard(&name).channels.get_mut(&name) {
                ch.head = Some(head);
            }
        });
    }

    /// Adds `inbox` as a subscriber of `channel` (already validated).
    pub fn subscribe(self: &Arc<Self>, channel: &str, inbox: &Arc<Inbox>) -> (Subscription, Arc<Ready>) {
        let mut shard = self.shard(channel);
        let ch = self.entry(&mut shard, channel);
        let key = ch.subs.insert(Sub { inbox: inbox.clone() });
        let sub = Subscription { hub: self.clone(), channel: ch.name.clone(), key };
        let ready = ch.ready.clone();
        drop(shard);
        self.metrics.subscriptions.increment(1.0);
        (sub, ready)
    }

    /// Joins `channel` for a long-poll: returns buffered messages after `after` (when
    /// given) and subscribes `inbox` for what comes next, in one step so nothing falls
    /// between the two.
    pub fn poll_join(self: &Arc<Self>, channel: &str, after: Option<u64>, inbox: &Arc<Inbox>) -> PollJoin {
        let mut shard = self.shard(channel);
        let keep_until = Instant::now() + self.config.poll_keepalive;
        let now_seq = self.seq.load(Ordering::Acquire);
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
        let key = ch.subs.insert(Sub { inbox: inbox.clone() });
        let subscription = Subscription { hub: self.clone(), channel: ch.name.clone(), key };
        let ready = ch.ready.clone();
        let last_pos = ch.last_pos.or(ch.head);
        drop(shard);
        self.metrics.subscriptions.increment(1.0);
        PollJoin { subscription, backlog, position, gap, ready, last_pos }
    }

    /// Keeps `channel` subscribed for a while without a subscriber (between polls).
    pub fn keep_alive(&self, channel: &str) {
        let until = Instant::now() + self.config.poll_keepalive;
        let mut shard = self.shard(channel);
        if let Some(ch) = shard.channels.get_mut(channel) {
            ch.keep_until = Some(until);
        }
    }

    fn leave(&self, channel: &str, key: usize) {
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

    /// Number of local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.shard(channel).channels.get(channel).map_or(0, |c| c.subs.len())
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
                removed += 1;
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

    /// Fans one message from the broker out to the local subscribers of `channel`.
    pub fn dispatch(&self, channel: &str, payload: Bytes) {
        self.metrics.broker_messages.increment(1);
        let mut shard = self.shard(channel);
        let Some(ch) = shard.channels.get_mut(channel) else { return };
        if let Some(waiting) = &mut ch.recovering {
            waiting.push(payload);
            return;
        }
        let (header, data) = shared::envelope::decode_frame(&payload);
        let data = payload.slice_ref(data);
        self.dispatch_locked(ch, header, data);
    }

    fn dispatch_locked(&self, ch: &mut Channel, header: FrameHeader, data: Bytes) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let delivery = Delivery::new(
            ch.name.clone(),
            header.id.map(Into::into),
            header.event.map(Into::into),
            data,
            seq,
            header.ts,
        );
        if let Some(pos) = delivery.pos {
            if ch.last_pos.is_some_and(|last| pos <= last) {
                return; // already delivered (replay overlapping live delivery)
            }
            ch.last_pos = Some(pos);
        }
        if let Some(ts) = delivery.published_ms {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let ms = (now.as_millis() as u64).saturating_sub(ts);
            self.metrics.dispatch_latency.record(ms as f64 / 1000.0);
        }
        let delivery = Arc::new(delivery);
        if let Some(ring) = &mut ch.ring {
            if ring.len() >= self.config.poll_buffer
                && let Some(old) = ring.pop_front()
            {
                ch.floor = old.seq;
            }
            ring.push_back(delivery.clone());
        }
        self.fan_out(ch, &delivery);
    }

    /// Hands `delivery` to every subscriber's inbox; kicks those whose inbox is full.
    fn fan_out(&self, ch: &Channel, delivery: &Arc<Delivery>) {
        let mut delivered = [0u64; 3];
        let mut slow = [0u64; 3];
        for (_, sub) in ch.subs.iter() {
            let inbox = &sub.inbox;
            // An atomic load; `CancellationToken::is_cancelled` takes a lock and was the
            // hottest user-space function of the fan-out loop.
            if inbox.kick.get().is_some() {
                continue;
            }
            match inbox.offer(delivery) {
                Ok(()) => delivered[inbox.transport as usize] += 1,
                Err(Offer::Full(limit)) => {
                    inbox.kick_out(Kick::SlowConsumer);
                    slow[inbox.transport as usize] += 1;
                    counter!(m::LIMIT_REJECTIONS_TOTAL, "limit" => limit).increment(1);
                }
                Err(Offer::Closed) => {}
            }
        }
        for t in Transport::ALL {
            let i = t as usize;
            if delivered[i] > 0 {
                self.metrics.delivered[i].increment(delivered[i]);
            }
            if slow[i] > 0 {
                self.metrics.slow[i].increment(slow[i]);
                self.metrics.dropped_slow.increment(slow[i]);
                tracing::debug!(transport = t.as_str(), count = slow[i], "slow consumers disconnected");
            }
        }
    }

    /// Starts recovery after a broker outage: every channel that has seen history
    /// messages holds its live messages from now on (this runs before the broker reads
    /// anything from the new link, so no live message can overtake the replay). Returns
    /// the channels and the positions to replay from.
    fn begin_recovery(&self) -> Vec<(Arc<str>, StreamPos)> {
        let mut todo = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for ch in shard.channels.values_mut() {
                if let Some(pos) = ch.last_pos.or(ch.head) {
                    ch.recovering.get_or_insert_with(Vec::new);
                    todo.push((ch.name.clone(), pos));
                }
            }
        }
        todo
    }

    /// Replays, per channel, what was published during the outage (then the live
    /// messages that waited), or tells subscribers about the gap when history cannot
    /// cover it.
    async fn finish_recovery(self: Arc<Self>, todo: Vec<(Arc<str>, StreamPos)>) {
        for (name, from) in todo {
            let result = self.broker.since(&name, from).await;
            let mut shard = self.shard(&name);
            let Some(ch) = shard.channels.get_mut(&*name) else { continue };
            match result {
                Ok(Recovery::Covered(entries)) => {
                    counter!(m::RECOVERIES_TOTAL, "result" => "replayed").increment(1);
                    counter!(m::REPLAYED_TOTAL).increment(entries.len() as u64);
                    for e in entries {
                        self.dispatch_entry(ch, e);
                    }
                }
                Ok(Recovery::Gap) | Err(_) => {
                    let why = if result.is_ok() { "reset" } else { "error" };
                    counter!(m::RECOVERIES_TOTAL, "result" => why).increment(1);
                    tracing::warn!(
                        channel = %crate::error::quote(&name),
                        %from,
                        why,
                        "history cannot cover the outage; clients get a reset"
                    );
                    let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
                    self.fan_out(ch, &Arc::new(Delivery::reset(ch.name.clone(), seq)));
                }
            }
            for payload in ch.recovering.take().unwrap_or_default() {
                let (header, data) = shared::envelope::decode_frame(&payload);
                let data = payload.slice_ref(data);
                self.dispatch_locked(ch, header, data);
            }
        }
    }

    fn dispatch_entry(&self, ch: &mut Channel, e: HistoryEntry) {
        let header = FrameHeader { id: Some(e.pos.to_string()), event: e.event, ts: None };
        self.dispatch_locked(ch, header, e.data);
    }
}

impl Sink for Hub {
    fn deliver(&self, channel: &str, payload: Bytes) {
        self.dispatch(channel, payload);
    }

    fn link_restored(&self) {
        let todo = self.begin_recovery();
        if let Some(hub) = self.me.upgrade() {
            tokio::spawn(hub.finish_recovery(todo));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    fn hub(linger_ms: u64) -> Arc<Hub> {
        Hub::new(
            HubConfig {
                linger: Duration::from_millis(linger_ms),
                poll_buffer: 4,
                poll_keepalive: Duration::from_millis(0),
            },
            |sink| {
                let history = crate::broker::HistoryConfig {
                    max_len: 100,
                    max_age: Duration::from_secs(3600),
                    idempotency_window: Duration::from_secs(60),
                };
                Arc::new(MemoryBroker::new(sink, history))
            },
        )
    }

    fn inbox(cap: usize) -> (Arc<Inbox>, InboxRx) {
        inbox_bytes(cap, usize::MAX)
    }

    fn inbox_bytes(cap: usize, bytes: usize) -> (Arc<Inbox>, InboxRx) {
        let limits = crate::config::Limits { queue_size: cap, queue_bytes: bytes, ..Default::default() };
        Inbox::new(Transport::Ws, &limits, CancellationToken::new())
    }

    #[test]
    fn byte_budget_kicks_a_backlogged_inbox_and_counts_what_is_taken() {
        let hub = hub(0);
        let (slow, _rs) = inbox_bytes(100, 10);
        let (fast, mut rf) = inbox_bytes(100, 10);
        let _s1 = hub.subscribe("c", &slow);
        let _s2 = hub.subscribe("c", &fast);
        hub.dispatch("c", Bytes::from_static(b"0123456789abcdef"));
        assert_eq!(slow.kicked(), None, "an empty queue takes a message of any size");
        assert_eq!(fast.queued_bytes(), 16);
        assert_eq!(rf.try_recv().unwrap().data.len(), 16);
        assert_eq!(fast.queued_bytes(), 0, "taking a message frees its bytes");
        hub.dispatch("c", Bytes::from_static(b"x"));
        assert_eq!(slow.kicked(), Some(Kick::SlowConsumer), "16 queued + 1 > 10");
        assert_eq!(slow.queued_bytes(), 16, "the refused message is not counted");
        assert_eq!(fast.kicked(), None);
        assert_eq!(&rf.try_recv().unwrap().data[..], b"x");
    }

    #[test]
    fn dispatch_shares_one_delivery_between_subscribers() {
        let hub = hub(0);
        let (a, mut ra) = inbox(8);
        let (b, mut rb) = inbox(8);
        let _sa = hub.subscribe("c", &a);
        let _sb = hub.subscribe("c", &b);
        hub.dispatch("c", Bytes::from_static(b"hi"));
        let (da, db) = (ra.try_recv().unwrap(), rb.try_recv().unwrap());
        assert!(Arc::ptr_eq(&da, &db));
        assert_eq!(&da.data[..], b"hi");
        hub.dispatch("other", Bytes::from_static(b"x"));
        assert!(ra.try_recv().is_err(), "no delivery for other channels");
    }

    #[test]
    fn full_inbox_is_kicked_and_others_still_get_messages() {
        let hub = hub(0);
        let (slow, _rs) = inbox(2);
        let (fast, mut rf) = inbox(100);
        let _s1 = hub.subscribe("c", &slow);
        let _s2 = hub.subscribe("c", &fast);
        for i in 0..10 {
            hub.dispatch("c", Bytes::from(format!("m{i}")));
        }
        assert_eq!(slow.kicked(), Some(Kick::SlowConsumer));
        assert!(slow.closed().is_cancelled());
        let got: Vec<_> = std::iter::from_fn(|| rf.try_recv().ok()).collect();
        assert_eq!(got.len(), 10);
        assert_eq!(&got[9].data[..], b"m9");
    }

    #[test]
    fn empty_channels_linger_then_are_reaped() {
        let hub = hub(50);
        let (a, _ra) = inbox(8);
        let (sub, _) = hub.subscribe("c", &a);
        assert_eq!(hub.subscriber_count("c"), 1);
        drop(sub);
        assert_eq!(hub.reap(Instant::now()), 0, "still lingering");
        let (sub, _) = hub.subscribe("c", &a);
        assert_eq!(hub.reap(Instant::now() + Duration::from_secs(1)), 0, "came back in time");
        drop(sub);
        assert_eq!(hub.reap(Instant::now() + Duration::from_secs(1)), 1);
        assert_eq!(hub.subscriber_count("c"), 0);
    }

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
