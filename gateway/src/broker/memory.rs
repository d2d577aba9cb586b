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
    /// When the last message was appended (ms since the epoch).
    appended_ms: u64,
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Stream>,
    idempotency: HashMap<(String, String), (String, Instant)>,
    last_pos: StreamPos,
    /// When expired streams are next dropped (ms since the epoch).
    next_sweep_ms: u64,
}

/// A stream is dropped this long after its last message on top of the age limit, as
/// Redis expires its key (`KEY_TTL_MS` in `fanout.lua`). Without it every channel ever
/// published with history stayed in memory, e.g. each `--demo-streams` answer's channel.
const KEY_GRACE_MS: u64 = 3_600_000;
/// How often expired streams and idempotency keys are looked for, at most.
const SWEEP_EVERY_MS: u64 = 60_000;

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
        stream.entries.push_back((
            HistoryEntry { pos, event: msg.event.clone(), data: msg.data.clone(), key: None },
            now,
        ));
        stream.last = pos;
        stream.appended_ms = now;
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

    /// How long a stream outlives its last message.
    fn key_ttl_ms(&self) -> u64 {
        self.history.max_age.as_millis() as u64 + KEY_GRACE_MS
    }

    /// Drops the streams whose key Redis would have expired by `now`, and idempotency
    /// keys past their window; at most every [`SWEEP_EVERY_MS`].
    fn sweep(&self, st: &mut State, now: u64) {
        if now < st.next_sweep_ms {
            return;
        }
        st.next_sweep_ms = now + SWEEP_EVERY_MS;
        let ttl = self.key_ttl_ms();
        st.streams.retain(|_, s| now.saturating_sub(s.appended_ms) < ttl);
        st.idempotency.retain(|_, (_, at)| at.elapsed() < self.history.idempotency_window);
        if st.streams.capacity() > 4 * st.streams.len().max(16) {
            st.streams.shrink_to(2 * st.streams.len());
        }
    }

    /// `channel`'s stream unless it has expired (a sweep may not have dropped it yet).
    fn stream<'a>(&self, st: &'a State, channel: &str, now: u64) -> Option<&'a Stream> {
        st.streams.get(channel).filter(|s| now.saturating_sub(s.appended_ms) < self.key_ttl_ms())
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
            self.sweep(&mut st, now);
            let (pos, duplicate) = self.append(&mut st, &msg, now);
            let header =
                FrameHeader { id: Some(pos.to_string()), event: msg.event.clone(), ts: Some(now), key: None };
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
        let result = match self.stream(&st, channel, now_ms()) {
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
        let head = self.stream(&self.state(), channel, now_ms()).map(|s| s.last);
        Box::pin(async move { Ok(head) })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    struct NoSink;
    impl Sink for NoSink {
        fn deliver(&self, _: &str, _: Bytes) {}
    }

    fn broker() -> MemoryBroker {
        let history = HistoryConfig {
            max_len: 10,
            max_age: Duration::from_secs(60),
            idempotency_window: Duration::from_secs(300),
        };
        MemoryBroker::new(Weak::<NoSink>::new(), history)
    }

    fn publish(b: &MemoryBroker, st: &mut State, channel: &str, now: u64) -> StreamPos {
        let msg = Publish {
            channel: channel.into(),
            data: Bytes::from_static(b"m"),
            history: true,
            ..Default::default()
        };
        b.sweep(st, now);
        b.append(st, &msg, now).0
    }

    #[test]
    fn streams_expire_like_redis_keys_and_are_dropped() {
        let b = broker();
        let ttl = b.key_ttl_ms();
        let mut st = State::default();
        let t0 = 1_000_000;
        for i in 0..1000 {
            publish(&b, &mut st, &format!("once-{i}"), t0);
        }
        publish(&b, &mut st, "busy", t0);
        assert!(b.stream(&st, "once-1", t0 + ttl - 1).is_some(), "kept until the key's time to live");
        assert!(b.stream(&st, "once-1", t0 + ttl).is_none(), "gone for since/head once expired");
        publish(&b, &mut st, "busy", t0 + ttl - 1000);
        assert_eq!(st.streams.len(), 1001, "nothing expired yet");
        publish(&b, &mut st, "busy", t0 + ttl + SWEEP_EVERY_MS);
        assert_eq!(
            st.streams.keys().collect::<Vec<_>>(),
            ["busy"],
            "a later publish drops the expired streams"
        );
        assert!(st.streams.capacity() < 1000, "and their table space");
    }
}
