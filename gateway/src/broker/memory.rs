//! The in-process broker: one node, no Redis. Publishing hands the message straight to
//! this node's hub.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, Weak},
};

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Broker, BrokerError, LinkState, Publish, PublishOutcome, Ready, Sink};

/// Broker for a single node.
pub struct MemoryBroker {
    sink: Weak<dyn Sink>,
    channels: Mutex<HashSet<Arc<str>>>,
    link: watch::Sender<LinkState>,
}

impl MemoryBroker {
    /// A broker delivering to `sink`.
    pub fn new(sink: Weak<dyn Sink>) -> Self {
        Self { sink, channels: Mutex::default(), link: watch::Sender::new(LinkState::Up) }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<Arc<str>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Broker for MemoryBroker {
    fn subscribe(&self, channel: Arc<str>, ready: Arc<Ready>) {
        self.channels().insert(channel);
        ready.set();
    }

    fn unsubscribe(&self, channel: Arc<str>) {
        self.channels().remove(&channel);
    }

    fn publish(&self, msg: Publish) -> BoxFuture<'_, Result<PublishOutcome, BrokerError>> {
        let subscribed = self.channels().contains(msg.channel.as_str());
        if let Some(sink) = self.sink.upgrade() {
            sink.deliver(&msg.channel, super::frame(&msg));
        }
        Box::pin(async move { Ok(PublishOutcome { id: None, subscribed }) })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
