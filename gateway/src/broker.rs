//! The broker: how a node hears about messages published anywhere in the cluster.
//!
//! Three implementations: [`memory`] (one process, no Redis), [`redis`] (one dedicated
//! pub/sub connection per node plus a pool for publishing) and [`cluster`] (Redis
//! Cluster: sharded pub/sub, one subscriber link per master). The hub tells the broker
//! which channels have local subscribers; the broker hands every message for those
//! channels to the hub through [`Sink`]. Brokers know nothing of wire formats.

pub mod cluster;
pub mod memory;
pub mod redis;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use shared::StreamPos;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Receives messages from the broker (implemented by the hub).
pub trait Sink: Send + Sync + 'static {
    /// One message published to `channel`, as raw bytes (possibly a gateway frame).
    fn deliver(&self, channel: &str, payload: Bytes);
    /// The link to the broker came back after an outage (messages may have been missed).
    /// Called before any message from the new link is delivered.
    fn link_restored(&self) {}
    /// The subscription of `channels` alone came back (a Redis Cluster master's link was
    /// rebuilt, or their slot moved and they were subscribed where it lives now): the
    /// same as [`Sink::link_restored`] for these channels only. Called before any of
    /// their messages from the new subscription is delivered.
    fn channels_restored(&self, _channels: &[Arc<str>]) {
        self.link_restored();
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct Publish {
    /// Target channel (already validated).
    pub channel: String,
    /// Payload.
    pub data: Bytes,
    /// Optional event name (already validated).
    pub event: Option<String>,
    /// Append to the channel's history (and get a position) before publishing.
    pub history: bool,
    /// Suppresses a repeat of the same publish within the idempotency window.
    pub idempotency_key: Option<String>,
    /// Its place in a publishing stream: such messages are published in order and
    /// exactly once, also when a lost reply makes the broker send them again.
    pub sequence: Option<Sequence>,
}

/// A message's place in one publishing stream (one streaming request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// Names the stream; unique per streaming request.
    pub stream: u64,
    /// 1 for the stream's first message, then 2, 3...
    pub n: u64,
}

/// What a publish achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Assigned history position, if any.
    pub id: Option<String>,
    /// Whether any node (or, in memory, any local client) had subscribers.
    pub subscribed: bool,
    /// The idempotency key was seen before: nothing was published again and `id` is
    /// the original message's.
    pub duplicate: bool,
}

/// One message read back from history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Its position.
    pub pos: StreamPos,
    /// Event name, if any.
    pub event: Option<String>,
    /// Payload.
    pub data: Bytes,
    /// The publish's idempotency key or stream sequence, when it had one (see
    /// `FrameHeader::key`).
    pub key: Option<String>,
}

/// What history can say about the messages after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// History covers the gap: these are all the messages after it, oldest first.
    Covered(Vec<HistoryEntry>),
    /// History cannot cover the gap: messages after the position are lost (trimmed,
    /// expired, or history was wiped and began again), or the position is after the
    /// newest message (a forged id, or one from a wiped history).
    Gap {
        /// For position 0 ("from the start"), what history still holds, oldest first;
        /// for other positions nothing (a resume never floods a client).
        entries: Vec<HistoryEntry>,
        /// History's newest position, if it holds any: a client ahead of it goes on
        /// from here.
        head: Option<StreamPos>,
    },
}

/// How much of history one read returns: at most `max_count` messages, and none more
/// once their payloads reach `max_bytes` (at least one). A replay reads page after page,
/// so what it holds at once is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Most messages.
    pub max_count: usize,
    /// Payload bytes after which no more are added.
    pub max_bytes: usize,
}

impl Page {
    /// Whether `entries` fill a page, so more may follow them.
    pub fn is_full(&self, entries: &[HistoryEntry]) -> bool {
        entries.len() >= self.max_count
            || entries.iter().map(|e| e.data.len()).sum::<usize>() >= self.max_bytes
    }

    /// The first entries of `all` that make a page.
    pub fn cut(&self, all: impl IntoIterator<Item = HistoryEntry>) -> Vec<HistoryEntry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in all {
            if out.len() >= self.max_count || (!out.is_empty() && bytes >= self.max_bytes) {
                break;
            }
            bytes += e.data.len();
            out.push(e);
        }
        out
    }
}

/// How long a node's reported subscriber count stays valid: a node that stops
/// reporting (it died) drops out of the sums by itself after this.
pub const OCCUPANCY_TTL: std::time::Duration = std::time::Duration::from_secs(15);

/// A channel's subscribers over the nodes that reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Subscribers, summed.
    pub subscribers: u64,
    /// Nodes with at least one subscriber.
    pub nodes: u64,
}

/// Why a broker operation failed; shown to clients only as "broker unavailable".
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Redis answered something this gateway does not understand.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// No pooled connection could be had.
    #[error("redis pool: {0}")]
    Pool(String),
}

/// Whether the link to the broker is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connected and subscribed.
    Up,
    /// Down; reconnecting.
    Down,
}

/// A one-shot "subscription is live" flag that many subscribers can await.
#[derive(Debug, Default)]
pub struct Ready {
    set: AtomicBool,
    notify: Notify,
}

impl Ready {
    /// A flag that is not yet set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Marks the subscription live and wakes all waiters.
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
    /// Waits until set.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// A message broker shared by all nodes.
pub trait Broker: Send + Sync + 'static {
    /// Starts listening to `channel`; `ready` is set once messages flow.
    fn subscribe(&self, channel: Arc<str>, ready: Arc<Ready>);
    /// Stops listening to `channel`.
    fn unsubscribe(&self, channel: Arc<str>);
    /// Publishes a message to every node. The message is queued when this is called,
    /// not when the future is first polled: history publishes called one after another
    /// are published in that order. The future borrows nothing: a caller may keep
    /// several in flight.
    fn publish(&self, msg: Publish) -> BoxFuture<'static, Result<PublishOutcome, BrokerError>>;
    /// The messages of `channel` after `from` (at most a `page` of them), and whether
    /// history still covers them.
    fn since<'a>(
        &'a self,
        channel: &'a str,
        from: StreamPos,
        page: Page,
    ) -> BoxFuture<'a, Result<Recovery, BrokerError>>;
    /// The position of the newest message in `channel`'s history, if any.
    fn head<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Option<StreamPos>, BrokerError>>;
    /// The link state, watched by readiness and metrics.
    fn link(&self) -> watch::Receiver<LinkState>;
    /// Records node `node`'s local subscriber counts of `counts`' channels where every
    /// node can read them, for [`OCCUPANCY_TTL`] (0 removes the entry). Nothing to do
    /// for a broker that spans one node.
    fn report_occupancy(
        &self,
        _node: u64,
        _counts: Vec<(Arc<str>, usize)>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
    /// The subscribers of `channel` reported by every live node but `node` (this one,
    /// which knows its own count better), or `None` for a broker that spans one node.
    fn occupancy<'a>(
        &'a self,
        _channel: &'a str,
        _node: u64,
    ) -> BoxFuture<'a, Result<Option<Occupancy>, BrokerError>> {
        Box::pin(async { Ok(None) })
    }
    /// Short name for logs: `memory` or `redis`.
    fn kind(&self) -> &'static str;
}

/// The bytes to put on the wire for `msg`: the payload itself, or a gateway frame when
/// it carries an event name.
pub fn frame(msg: &Publish) -> Bytes {
    // A payload that happens to start like a frame is framed too, so it arrives verbatim.
    if msg.event.is_none() && !msg.data.starts_with(shared::envelope::FRAME_MAGIC) {
        return msg.data.clone();
    }
    let header = shared::envelope::FrameHeader { id: None, event: msg.event.clone(), ts: None, key: None };
    Bytes::from(shared::envelope::encode_frame(&header, &msg.data))
}

/// Most history publishes sent to Redis as one pipeline.
pub(crate) const MAX_BATCH: usize = 512;

/// The next pipeline's worth of a publish queue: waits for one job, then takes what
/// else is queued already, up to [`MAX_BATCH`], in order (recorded in
/// `gateway_publish_batch_messages`). `None` on shutdown or once the queue is closed.
pub(crate) async fn next_batch<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    shutdown: &CancellationToken,
) -> Option<Vec<T>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        job = rx.recv() => job?,
    };
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    metrics::histogram!(crate::metrics::PUBLISH_BATCH).record(batch.len() as f64);
    Some(batch)
}
