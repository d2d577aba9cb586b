//! The in-process broker: one node, no Redis. Publishing hands the message straight to
//! this node's hub; history lives in memory with the same limits and the same
//! coverage rules as the Redis streams.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::future::BoxFuture;
use shared::{
    StreamPos,
    envelope::{FrameHeader, encode_frame},
};
use tokio::sync::watch;

use super::{
    Broker, BrokerError, HistoryEntry, LinkState, Page, Publish, PublishOutcome, Ready, Recovery, Sink,
};
use crate::config::HistoryConfig;

#[derive(Default)]
struct Stream {
    entries: VecDeque<(HistoryEntry, u64)>,
    last: StreamPos,
    max_deleted: StreamPos,
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Stream>,
    idempotency: HashMap<(String, String), (String, Instant)>,
    last_pos: StreamPos,
}

/// Broker for a single node.
pub struct MemoryBroker {
    sink: Weak<dyn Sink>,
    /// Channels with local interest. Taken under hub shard locks, so never held while
    /// calling into the hub.
    channels: Mutex<HashSet<Arc<str>>>,
    /// History; held while delivering so messages reach the hub in position order.
    state: Mutex<State>,
    history: HistoryConfig,
    link: watch::Sender<LinkState>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl MemoryBroker {
    /// A broker delivering to `sink`.
    pub fn new(sink: Weak<dyn Sink>, history: HistoryConfig) -> Self {
        metrics::gauge!(crate::metrics::BROKER_LINK_UP).set(1.0);
        Self {
            sink,
            channels: Mutex::default(),
            state: Mutex::default(),
            history,
            link: watch::Sender::new(LinkState::Up),
        }
    }

    fn channels(&self) -> MutexGuard<'_, HashSet<Arc<str>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends to history; returns the new position (or the original one for a repeat).
    fn append(&self, st: &mut State, msg: &Publish, now: u64) -> (StreamPos, bool) {
        if let Some(key) = &msg.idempotency_key {
            let k = (msg.channel.clone(), key.clone());
            st.idempotency.retain(|_, (_, at)| at.elapsed() < self.history.idempotency_window);
            if let Some((id, _)) = st.idempotency.get(&k) {
                return (id.parse().unwrap_or_default(), true);
            }
        }
        let pos = if now > st.last_pos.ms {
            StreamPos { ms: now, seq: 0 }
        } else {
            StreamPos { ms: st.last_pos.ms, seq: st.last_pos.seq + 1 }
        };
        st.last_pos = pos;
        let stream = st.streams.entry(msg.channel.clone()).or_default();
        stream
            .entries
            .push_back((HistoryEntry { pos, event: msg.event.clone(), data: msg.data.clone() }, now));
        stream.last = pos;
        let max_age = self.history.max_age.as_millis() as u64;
        while stream.entries.len() > self.history.max_len
            || stream.entries.front().is_some_and(|(_, at)| max_age > 0 && now.saturating_sub(*at) > max_age)
        {
            if let Some((e, _)) = stream.entries.pop_front() {
                stream.max_deleted = e.pos;
            }
        }
        if let Some(key) = &msg.idempotency_key {
            st.idempotency.insert((msg.channel.clone(), key.clone()), (pos.to_string(), Instant::now()));
        }
        (pos, false)
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

    fn publish(&self, msg: Publish) -> BoxFuture<'static, Result<PublishOutcome, BrokerError>> {
        let now = now_ms();
        let mut st = self.state();
        let subscribed = self.channels().contains(msg.channel.as_str());
        let (payload, id, duplicate) = if msg.history {
            let (pos, duplicate) = self.append(&mut st, &msg, now);
            let header = FrameHeader { id: Some(pos.to_string()), event: msg.event.clone(), ts: Some(now) };
            (encode_frame(&header, &msg.data).into(), Some(pos.to_string()), duplicate)
        } else {
            (super::frame(&msg), None, false)
        };
        if !duplicate && let Some(sink) = self.sink.upgrade() {
            sink.deliver(&msg.channel, payload);
        }
        drop(st);
        Box::pin(async move { Ok(PublishOutcome { id, subscribed: subscribed && !duplicate, duplicate }) })
    }

    fn since<'a>(
        &'a self,
        channel: &'a str,
        from: StreamPos,
        page: Page,
    ) -> BoxFuture<'a, Result<Recovery, BrokerError>> {
        // The same rules as `fanout_since` in the Redis Function library.
        let st = self.state();
        let result = match st.streams.get(channel) {
            None if from == StreamPos::ZERO => Recovery::Covered(Vec::new()),
            None => Recovery::Gap { entries: Vec::new(), head: None },
            Some(s) if from == s.last => Recovery::Covered(Vec::new()),
            Some(s) => {
                let after = page.cut(s.entries.iter().filter(|(e, _)| e.pos > from).map(|(e, _)| e.clone()));
                let covered = if from == StreamPos::ZERO {
                    s.max_deleted == StreamPos::ZERO
                } else {
                    s.entries.iter().any(|(e, _)| e.pos == from)
                };
                match (covered, from == StreamPos::ZERO) {
                    (true, _) => Recovery::Covered(after),
                    // From the start: what is left after the trimmed part.
                    (false, true) => Recovery::Gap { entries: after, head: Some(s.last) },
                    (false, false) => Recovery::Gap { entries: Vec::new(), head: Some(s.last) },
                }
            }
        };
        Box::pin(async move { Ok(result) })
    }

    fn head<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Option<StreamPos>, BrokerError>> {
        let head = self.state().streams.get(channel).map(|s| s.last);
        Box::pin(async move { Ok(head) })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
