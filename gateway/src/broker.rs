//! The broker: how a node hears about messages published anywhere in the cluster.
//!
//! Two implementations: [`memory`] (one process, no Redis) and [`redis`] (one dedicated
//! pub/sub connection per node plus a pool for publishing). The hub tells the broker
//! which channels have local subscribers; the broker hands every message for those
//! channels to the hub through [`Sink`]. Brokers know nothing of wire formats.

pub mod memory;
pub mod redis;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, watch};

/// Receives messages from the broker (implemented by the hub).
pub trait Sink: Send + Sync + 'static {
    /// One message published to `channel`, as raw bytes (possibly a gateway frame).
    fn deliver(&self, channel: &str, payload: Bytes);
    /// The link to the broker came back after an outage (messages may have been missed).
    fn link_restored(&self) {}
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Publish {
    /// Target channel (already validated).
    pub channel: String,
    /// Payload.
    pub data: Bytes,
    /// Optional event name (already validated).
    pub event: Option<String>,
}

/// What a publish achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Assigned history position, if any.
    pub id: Option<String>,
    /// Whether any node (or, in memory, any local client) had subscribers.
    pub subscribed: bool,
}

/// Why a broker operation failed; shown to clients only as "broker unavailable".
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
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
    /// Publishes a message to every node.
    fn publish(&self, msg: Publish) -> BoxFuture<'_, Result<PublishOutcome, BrokerError>>;
    /// The link state, watched by readiness and metrics.
    fn link(&self) -> watch::Receiver<LinkState>;
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
    let header = shared::envelope::FrameHeader { id: None, event: msg.event.clone(), ts: None };
    Bytes::from(shared::envelope::encode_frame(&header, &msg.data))
}
