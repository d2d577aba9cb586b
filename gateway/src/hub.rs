//! The hub: this node's registry of channels and their local subscribers, and the one
//! way the layers above reach the broker (subscribe, publish, replay history).
//!
//! Channels live in shards (a mutex each) so unrelated channels don't contend. A
//! channel's first local subscriber makes the hub subscribe it at the broker; after its
//! last one leaves, it lingers briefly and is then unsubscribed by the reaper. Dispatch
//! builds one shared [`Delivery`] per message and offers it to each subscriber's bounded
//! [`Inbox`]; a full inbox gets the slow-consumer policy (the connection is closed with
//! a reason) and never delays anyone else.
//!
//! - [`inbox`]: the per-connection queue.
//! - [`delivery`]: one message with its wire encodings, computed once.
//! - [`heads`]: where each new channel's history stood when it was subscribed.
//! - [`reaper`]: drops channels whose last subscriber left, after their linger.
//! - [`recovery`]: the history-replay path, for resuming clients and broker outages.
//! - [`poll`]: the per-channel buffer that carries long-poll clients between polls.

mod delivery;
mod heads;
mod inbox;
mod occupancy;
mod poll;
mod reaper;
mod recovery;
mod repeats;

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use metrics::{Counter, Gauge, counter, gauge};
use shared::{StreamPos, envelope::FrameHeader};
use slab::Slab;
use tokio::sync::watch;

use self::inbox::Offer;
pub use self::{
    delivery::Delivery,
    inbox::{Inbox, InboxRx, Kick},
    poll::PollJoin,
    recovery::Replay,
};
/// What the layers above hand to [`Hub::publish`] and get back: the broker's own
/// types, reached through the hub.
pub use crate::broker::{BrokerError, LinkState, Occupancy, Publish, PublishOutcome, Sequence};
use crate::{
    broker::{Broker, Page, Ready, Sink, memory::MemoryBroker},
    config::HistoryConfig,
    metrics::{self as m, ConnKind},
};

const SHARDS: usize = 64;
/// How long a new subscriber waits for the broker to confirm its channels before it
/// is served anyway (messages flow as soon as the link is back).
pub const READY_WAIT: Duration = Duration::from_secs(3);

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
    /// Whether `head` was read (it stays `None` for a channel without history).
    head_read: bool,
    /// While history is replayed after a broker outage, live payloads wait here.
    recovering: Option<Vec<Bytes>>,
    /// Keys of recent messages that carried one, to drop a republished repeat.
    repeats: repeats::RecentKeys,
}

#[derive(Default)]
struct Shard {
    /// Boxed, so a slot is 24 bytes, not a whole `Channel`: a table has 1.1 to 2.3
    /// times as many slots as channels (it doubles, and never fills up). Unboxed, the
    /// tables took 415 bytes per channel at 32,000 channels (heap profile); boxed, 51
    /// plus the 192-byte box.
    channels: HashMap<Arc<str>, Box<Channel>>,
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
    /// How much history one read returns (a replay reads page after page).
    pub replay_page: Page,
}

impl HubConfig {
    /// The hub's settings in `config`: a replay page is what a connection's queue holds.
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            linger: config.timers.linger,
            poll_buffer: config.limits.poll_buffer,
            poll_keepalive: config.timers.poll_keepalive,
            replay_page: Page { max_count: config.limits.queue_size, max_bytes: config.limits.queue_bytes },
        }
    }
}

struct HubMetrics {
    delivered: [Counter; ConnKind::ALL.len()],
    slow: [Counter; ConnKind::ALL.len()],
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
    /// Channels held now (the `gateway_channels` gauge, readable).
    channel_count: std::sync::atomic::AtomicUsize,
    epoch: u64,
    metrics: HubMetrics,
    /// New channels whose history head is still to be read.
    heads: heads::Heads,
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

impl Hub {
    /// Creates the hub; `make_broker` gets the sink the broker must deliver to.
    pub fn new(config: HubConfig, make_broker: impl FnOnce(Weak<dyn Sink>) -> Arc<dyn Broker>) -> Arc<Self> {
        Arc::new_cyclic(|weak: &Weak<Hub>| {
            let sink: Weak<dyn Sink> = weak.clone();
            let metrics = HubMetrics {
                delivered: ConnKind::ALL.map(|k| counter!(m::DELIVERIES_TOTAL, "transport" => k.as_str())),
                slow: ConnKind::ALL.map(|k| counter!(m::SLOW_CONSUMER_TOTAL, "transport" => k.as_str())),
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
                channel_count: Default::default(),
                epoch: rand::random::<u64>() >> 12,
                metrics,
                heads: Default::default(),
            }
        })
    }

    /// A hub on the in-process broker: a single node, no Redis.
    pub fn in_memory(config: HubConfig, history: HistoryConfig) -> Arc<Self> {
        Self::new(config, |sink| Arc::new(MemoryBroker::new(sink, history)))
    }

    /// A random number identifying this process; long-poll cursors carry it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The broker's short name for logs and readiness: `memory` or `redis`.
    pub fn broker_kind(&self) -> &'static str {
        self.broker.kind()
    }

    /// The broker link's state, watched by readiness and metrics.
    pub fn link(&self) -> watch::Receiver<LinkState> {
        self.broker.link()
    }

    /// Publishes `msg` to every node through the broker. Queued when called (see
    /// [`Broker::publish`]): publishes called one after another keep that order.
    pub fn publish(
        &self,
        msg: Publish,
    ) -> impl Future<Output = Result<PublishOutcome, BrokerError>> + Send + 'static {
        self.broker.publish(msg)
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
            self.channel_count.fetch_add(1, Ordering::Relaxed);
            self.want_head(name.clone(), ready.clone());
            shard.channels.insert(
                name.clone(),
                Box::new(Channel {
                    name,
                    // Most channels have one subscriber here: not `Slab::new()`, whose first
                    // insert makes room for four.
                    subs: Slab::with_capacity(1),
                    ring: None,
                    floor: 0,
                    ready,
                    keep_until: None,
                    last_pos: None,
                    head: None,
                    head_read: false,
                    recovering: None,
                    repeats: Default::default(),
                }),
            );
        }
        shard.channels.get_mut(channel).expect("inserted above")
    }

    /// Adds `inbox` as a subscriber of `channel` (already validated).
    pub fn subscribe(self: &Arc<Self>, channel: &str, inbox: &Arc<Inbox>) -> Subscription {
        let mut shard = self.shard(channel);
        let ch = self.entry(&mut shard, channel);
        self.join_locked(ch, inbox)
    }

    fn join_locked(self: &Arc<Self>, ch: &mut Channel, inbox: &Arc<Inbox>) -> Subscription {
        let key = ch.subs.insert(Sub { inbox: inbox.clone() });
        self.metrics.subscriptions.increment(1.0);
        Subscription { hub: self.clone(), channel: ch.name.clone(), key }
    }

    /// Waits (at most [`READY_WAIT`]) until the broker has confirmed every one of
    /// `subs`, so a message published after this returns reaches them.
    pub async fn wait_ready<'a>(&self, subs: impl IntoIterator<Item = &'a Subscription>) {
        let readies: Vec<Arc<Ready>> = subs
            .into_iter()
            .filter_map(|s| self.shard(&s.channel).channels.get(&s.channel).map(|c| c.ready.clone()))
            .filter(|r| !r.is_set())
            .collect();
        if readies.is_empty() {
            return;
        }
        let all = futures_util::future::join_all(readies.iter().map(|r| r.wait()));
        if tokio::time::timeout(READY_WAIT, all).await.is_err() {
            tracing::debug!("broker subscription not confirmed in time; serving anyway");
        }
    }

    /// Whether the broker has confirmed every one of `subs` already.
    pub fn is_ready<'a>(&self, subs: impl IntoIterator<Item = &'a Subscription>) -> bool {
        subs.into_iter()
            .all(|s| self.shard(&s.channel).channels.get(&s.channel).is_none_or(|c| c.ready.is_set()))
    }

    /// Channels this node holds now (subscribed, or lingering, or kept for polls).
    pub fn channel_count(&self) -> usize {
        self.channel_count.load(Ordering::Relaxed)
    }

    /// Whether this node holds `channel` now.
    pub fn has_channel(&self, channel: &str) -> bool {
        self.shard(channel).channels.contains_key(channel)
    }

    /// Number of local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.shard(channel).channels.get(channel).map_or(0, |c| c.subs.len())
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
        self.dispatch_locked(ch, &payload, false);
    }

    /// The next node-wide sequence number.
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Dispatches a payload as it came from the broker (maybe a gateway frame);
    /// `catch_up`: part of a recovery's burst (see [`Delivery::catch_up`]).
    fn dispatch_locked(&self, ch: &mut Channel, payload: &Bytes, catch_up: bool) {
        let (header, data): (FrameHeader, _) = shared::envelope::decode_frame(payload);
        let data = payload.slice_ref(data);
        let mut d = Delivery::new(
            ch.name.clone(),
            header.id.map(Into::into),
            header.event.map(Into::into),
            data,
            self.next_seq(),
            header.ts,
        );
        d.catch_up = catch_up;
        self.deliver_locked(ch, d, header.key.as_deref());
    }

    /// Hands `delivery` to the channel's subscribers and long-poll buffer, unless it
    /// repeats a history position already delivered here, or a message that carried
    /// the same `key` lately (republished under a new id after a failover).
    fn deliver_locked(&self, ch: &mut Channel, delivery: Delivery, key: Option<&str>) {
        if let Some(pos) = delivery.pos {
            if ch.last_pos.is_some_and(|last| pos <= last) {
                return; // already delivered (replay overlapping live delivery)
            }
            ch.last_pos = Some(pos);
        }
        if let Some(key) = key
            && ch.repeats.seen(key, Instant::now())
        {
            tracing::debug!(channel = %crate::error::quote(&ch.name), "dropped a republished repeat");
            return;
        }
        if let Some(ts) = delivery.published_ms {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let ms = (now.as_millis() as u64).saturating_sub(ts);
            self.metrics.dispatch_latency.record(ms as f64 / 1000.0);
        }
        let delivery = Arc::new(delivery);
        self.buffer_for_polls(ch, &delivery);
        self.fan_out(ch, &delivery);
    }

    /// Hands `delivery` to every subscriber's inbox; kicks those whose inbox is full.
    fn fan_out(&self, ch: &Channel, delivery: &Arc<Delivery>) {
        let mut delivered = [0u64; ConnKind::ALL.len()];
        let mut slow = [0u64; ConnKind::ALL.len()];
        for (_, sub) in ch.subs.iter() {
            let inbox = &sub.inbox;
            if inbox.is_kicked() {
                continue;
            }
            match inbox.offer(delivery) {
                Ok(()) => delivered[inbox.kind as usize] += 1,
                Err(Offer::Full(limit)) => {
                    inbox.kick_out(Kick::SlowConsumer);
                    slow[inbox.kind as usize] += 1;
                    counter!(m::LIMIT_REJECTIONS_TOTAL, "limit" => limit).increment(1);
                }
                Err(Offer::Closed) => {}
            }
        }
        for k in ConnKind::ALL {
            let i = k as usize;
            if delivered[i] > 0 {
                self.metrics.delivered[i].increment(delivered[i]);
            }
            if slow[i] > 0 {
                self.metrics.slow[i].increment(slow[i]);
                self.metrics.dropped_slow.increment(slow[i]);
                tracing::debug!(transport = k.as_str(), count = slow[i], "slow consumers disconnected");
            }
        }
    }
}

impl Sink for Hub {
    fn deliver(&self, channel: &str, payload: Bytes) {
        self.dispatch(channel, payload);
    }

    fn link_restored(&self) {
        let todo = self.begin_recovery(None);
        if let Some(hub) = self.me.upgrade() {
            tokio::spawn(hub.finish_recovery(todo));
        }
    }

    fn channels_restored(&self, channels: &[Arc<str>]) {
        let todo = self.begin_recovery(Some(channels));
        if let Some(hub) = self.me.upgrade() {
            tokio::spawn(hub.finish_recovery(todo));
        }
    }
}
#[cfg(test)]
mod tests;
