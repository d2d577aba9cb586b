//! The node's sharded subscriptions on a Redis Cluster: one task owns a link per master
//! ([`link`]), its own slot map ([`slots`]) and the channels the hub wants, and keeps
//! every wanted channel `SSUBSCRIBE`d on the master that serves its slot.
//!
//! State follows the pushes, in the order each master sent them: a confirmation makes a
//! channel live on that link (and, for a channel that had lost its subscription, starts
//! its replay from history before any of its new messages is handed on); an
//! unsolicited `sunsubscribe` (the slot moved, or the master was demoted) or a dropped
//! link sends the channel back to be subscribed where the refreshed map says its slot
//! lives. The map is refreshed then, on `MOVED`, and every few seconds. Readiness is
//! down while any master lacks a link or any channel waits to be resubscribed.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use metrics::{counter, gauge};
use redis::PushKind;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod events;

use super::{
    COMMAND_TIMEOUT,
    link::{self, Batch, LinkId, SubReply, Tagged},
    slots::{self, SlotMap},
};
use crate::{
    broker::{LinkState, Ready, Sink},
    metrics as m,
};

/// How often the task looks at its timers (probes, retries, refreshes).
const TICK: Duration = Duration::from_millis(100);
/// How often each link is probed with PING.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How long a link may stay silent with a request out before it counts as wedged.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the slot map is read when nothing asks for it.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// Least time between two slot map reads.
const REFRESH_GAP: Duration = Duration::from_millis(100);
/// How long a channel whose `SSUBSCRIBE` was refused waits before the next try.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// First and longest wait before reconnecting to a master that could not be reached.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most commands in one batch.
const BATCH: usize = 1000;

/// A subscription change the hub asks for.
pub(in crate::broker::cluster) enum Cmd {
    /// Subscribe a channel; set the flag once messages flow.
    Sub(Arc<str>, Arc<Ready>),
    /// Unsubscribe a channel.
    Unsub(Arc<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To be subscribed where its slot lives.
    Idle,
    /// Queued or sent on that link, not confirmed yet.
    Pending(LinkId),
    /// Confirmed on that link.
    Active(LinkId),
}

struct Want {
    slot: u16,
    state: State,
    /// It lost its subscription: replay from history once it is back.
    lost: bool,
    /// Not to be tried again before then (after a refusal).
    not_before: Option<Instant>,
    /// Flags to set once it is live.
    ready: Vec<Arc<Ready>>,
}

struct Link {
    addr: String,
    /// `None` while connecting.
    conn: Option<redis::aio::MultiplexedConnection>,
    /// Since when a request (connect, batch or probe) is out, if one is.
    busy_since: Option<Instant>,
    unsubs: Vec<Arc<str>>,
    subs: Vec<Arc<str>>,
    last_heard: Instant,
    last_probe: Instant,
}

enum Event {
    Connected(LinkId, redis::RedisResult<redis::aio::MultiplexedConnection>),
    Batch(LinkId, Batch, Result<Vec<SubReply>, String>),
    Probe(LinkId, Result<(), String>),
    /// A slot map read by the refresh with that number, and the URL of the node that
    /// answered.
    Map(u64, Result<(SlotMap, String), String>),
}

pub(in crate::broker::cluster) struct Subscriber {
    seeds: Vec<String>,
    /// `user:pass@` (or empty), to reach the masters the map names.
    credentials: String,
    library: Arc<str>,
    sink: Weak<dyn Sink>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    push_tx: mpsc::UnboundedSender<Tagged>,
    pushes: mpsc::UnboundedReceiver<Tagged>,
    link_state: watch::Sender<LinkState>,
    map: Option<SlotMap>,
    wants: HashMap<Arc<str>, Want>,
    links: HashMap<LinkId, Link>,
    by_addr: HashMap<String, LinkId>,
    next_id: LinkId,
    ops: FuturesUnordered<BoxFuture<'static, Event>>,
    refreshing: bool,
    refresh_asked: bool,
    /// Refreshes started so far (each map read carries its number).
    refreshes: u64,
    /// Slots whose master dropped them: the first refresh whose map may say where they
    /// live now, and that master's address. A map read before, or one from another
    /// node whose view still names that master, would send the slot back to it, which
    /// (demoted to a replica) takes a subscription and then misses messages while it
    /// resyncs. Maps are read from these masters first: they know where the slots went.
    unsure: HashMap<u16, (u64, String)>,
    last_refresh: Option<Instant>,
    backoff: HashMap<String, (Instant, Duration)>,
    /// Channels resubscribed whose replay has not been started yet.
    restored: Vec<Arc<str>>,
    ever_up: bool,
    down_since: Option<Instant>,
}

impl Subscriber {
    pub(in crate::broker::cluster) fn new(
        seeds: Vec<String>,
        library: Arc<str>,
        sink: Weak<dyn Sink>,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        link_state: watch::Sender<LinkState>,
    ) -> Self {
        let credentials = seeds.first().map(|s| crate::config::cluster_url::credentials(s).to_owned());
        let (push_tx, pushes) = mpsc::unbounded_channel();
        Self {
            seeds,
            credentials: credentials.unwrap_or_default(),
            library,
            sink,
            cmds,
            push_tx,
            pushes,
            link_state,
            map: None,
            wants: HashMap::new(),
            links: HashMap::new(),
            by_addr: HashMap::new(),
            next_id: 1,
            ops: FuturesUnordered::new(),
            refreshing: false,
            refresh_asked: true,
            refreshes: 0,
            unsure: HashMap::new(),
            last_refresh: None,
            backoff: HashMap::new(),
            restored: Vec::new(),
            ever_up: false,
            down_since: Some(Instant::now()),
        }
    }

    pub(in crate::broker::cluster) async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut changed = true;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    changed = self.on_push(push);
                    // Take what else has come, in order, before looking at timers again.
                    for _ in 0..1024 {
                        let Ok(push) = self.pushes.try_recv() else { break };
                        changed |= self.on_push(push);
                    }
                    self.flush_restored();
                }
                Some(event) = self.ops.next(), if !self.ops.is_empty() => self.on_event(event),
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.apply(cmd);
                    while let Ok(cmd) = self.cmds.try_recv() {
                        self.apply(cmd);
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
            if changed {
                self.schedule();
                self.update_link_state();
            }
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Sub(ch, ready) => {
                let want = self.wants.entry(ch.clone()).or_insert_with(|| Want {
                    slot: slots::slot(ch.as_bytes()),
                    state: State::Idle,
                    lost: false,
                    not_before: None,
                    ready: Vec::new(),
                });
                if matches!(want.state, State::Active(_)) {
                    ready.set();
                } else {
                    want.ready.push(ready);
                }
            }
            Cmd::Unsub(ch) => {
                let Some(want) = self.wants.remove(&ch) else { return };
                match want.state {
                    State::Active(id) => {
                        if let Some(link) = self.links.get_mut(&id) {
                            link.unsubs.push(ch);
                        }
                    }
                    // Not sent yet: forget it. Sent: its confirmation finds it unwanted.
                    State::Pending(id) => {
                        if let Some(link) = self.links.get_mut(&id) {
                            link.subs.retain(|c| *c != ch);
                        }
                    }
                    State::Idle => {}
                }
            }
        }
    }

    /// Handles one push; returns whether subscription state changed.
    fn on_push(&mut self, (id, push): Tagged) -> bool {
        let Some(link) = self.links.get_mut(&id) else { return false }; // a replaced link's
        link.last_heard = Instant::now();
        if push.kind == PushKind::SMessage {
            // The payload is moved out, not copied: the hub shares it from here on.
            let mut data = push.data.into_iter();
            let (Some(redis::Value::BulkString(name)), Some(redis::Value::BulkString(payload))) =
                (data.next(), data.next())
            else {
                return false;
            };
            let Ok(name) = std::str::from_utf8(&name) else { return false };
            if self.wants.contains_key(name) {
                self.flush_restored();
                if let Some(hub) = self.sink.upgrade() {
                    hub.deliver(name, Bytes::from(payload));
                }
            }
            return false;
        }
        let Some(name) = link::push_channel(&push.data) else {
            if push.kind == PushKind::Disconnection {
                self.drop_link(id, "connection closed");
                return true;
            }
            return false;
        };
        let Ok(name) = std::str::from_utf8(name) else { return false };
        match push.kind {
            PushKind::SSubscribe => {
                match self.wants.get_mut(name) {
                    Some(want) if want.state == State::Pending(id) => {
                        want.state = State::Active(id);
                        if std::mem::take(&mut want.lost) {
                            self.restored.push(Arc::from(name));
                        }
                        want.ready.drain(..).for_each(|r| r.set());
                    }
                    Some(want) if want.state == State::Active(id) => {}
                    // Unwanted meanwhile, or wanted on another link now.
                    _ => link.unsubs.push(Arc::from(name)),
                }
                true
            }
            PushKind::SUnsubscribe => {
                if let Some(want) = self.wants.get_mut(name)
                    && want.state == State::Active(id)
                {
                    // Not asked for: the slot left this master (migrated, or failed over).
                    debug!(channel = %crate::error::quote(name), addr = %link.addr, "slot moved; resubscribing");
                    want.state = State::Idle;
                    want.lost = true;
                    self.refresh_asked = true;
                    // Not back on this node by the map it has just contradicted.
                    if let Some(map) = &mut self.map {
                        map.forget(want.slot);
                    }
                    self.unsure.insert(want.slot, (self.refreshes + 1, link.addr.clone()));
                }
                true
            }
            _ => false,
        }
    }

    /// Starts the replay of the channels resubscribed since the last call, before any
    /// of their new messages is delivered.
    fn flush_restored(&mut self) {
        if self.restored.is_empty() {
            return;
        }
        let channels = std::mem::take(&mut self.restored);
        debug!(channels = channels.len(), "sharded subscriptions restored; replaying history");
        if let Some(hub) = self.sink.upgrade() {
            hub.channels_restored(&channels);
        }
    }

    /// Opens links to masters that lack one, queues idle channels on their master's
    /// link, and sends each idle link its queue.
    fn schedule(&mut self) {
        let Some(map) = &self.map else { return };
        let now = Instant::now();
        for addr in map.masters() {
            if self.by_addr.contains_key(addr) || self.backoff.get(addr).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.links.insert(
                id,
                Link {
                    addr: addr.to_owned(),
                    conn: None,
                    busy_since: Some(now),
                    unsubs: Vec::new(),
                    subs: Vec::new(),
                    last_heard: now,
                    last_probe: now,
                },
            );
            self.by_addr.insert(addr.to_owned(), id);
            let url = format!("redis://{}{addr}", self.credentials);
            let connect = link::connect(id, url, self.library.clone(), self.push_tx.clone());
            self.ops.push(connect.map(move |r| Event::Connected(id, r)).boxed());
        }
        for (ch, want) in &mut self.wants {
            if want.state != State::Idle || want.not_before.is_some_and(|t| t > now) {
                continue;
            }
            let Some(&id) = map.owner(want.slot).and_then(|a| self.by_addr.get(a)) else { continue };
            let Some(link) = self.links.get_mut(&id).filter(|l| l.conn.is_some()) else { continue };
            link.subs.push(ch.clone());
            want.state = State::Pending(id);
            want.not_before = None;
        }
        for (&id, link) in &mut self.links {
            let Some(conn) = &link.conn else { continue };
            if link.busy_since.is_some() || (link.subs.is_empty() && link.unsubs.is_empty()) {
                continue;
            }
            let unsubs: Vec<_> = link.unsubs.drain(..link.unsubs.len().min(BATCH)).collect();
            let subs: Vec<_> = link.subs.drain(..link.subs.len().min(BATCH - unsubs.len())).collect();
            let batch = Batch { unsubs, subs };
            link.busy_since = Some(now);
            let conn = conn.clone();
            self.ops.push(
                async move {
                    let result = link::send_batch(conn, &batch).await;
                    Event::Batch(id, batch, result)
                }
                .boxed(),
            );
        }
    }

    /// Forgets a broken link: its channels go back to be subscribed where their slot
    /// lives (those that were live replay their gap once back), the map is read again.
    fn drop_link(&mut self, id: LinkId, why: &str) {
        let Some(link) = self.links.remove(&id) else { return };
        if self.by_addr.get(&link.addr) == Some(&id) {
            self.by_addr.remove(&link.addr);
        }
        let mut lost = 0;
        for want in self.wants.values_mut() {
            match want.state {
                State::Active(l) if l == id => {
                    want.state = State::Idle;
                    want.lost = true;
                    lost += 1;
                }
                State::Pending(l) if l == id => want.state = State::Idle,
                _ => {}
            }
        }
        let (_, last) = self.backoff.get(&link.addr).copied().unwrap_or((Instant::now(), BACKOFF_MIN / 2));
        let delay = (last * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        self.backoff.insert(link.addr.clone(), (Instant::now() + jitter(delay), delay));
        self.refresh_asked = true;
        warn!(addr = %link.addr, error = why, channels = lost, "redis cluster master link down");
    }

    /// Up when every master has a link and no channel waits to be resubscribed.
    fn update_link_state(&mut self) {
        let up = self.map.as_ref().is_some_and(|map| {
            map.masters().iter().all(|a| {
                self.by_addr.get(*a).and_then(|id| self.links.get(id)).is_some_and(|l| l.conn.is_some())
            })
        }) && !self.wants.values().any(|w| w.lost);
        let was_up = *self.link_state.borrow() == LinkState::Up;
        if up == was_up {
            return;
        }
        if up {
            self.link_state.send_replace(LinkState::Up);
            gauge!(m::BROKER_LINK_UP).set(1.0);
            if self.ever_up {
                counter!(m::BROKER_RECONNECTS_TOTAL).increment(1);
                if let Some(since) = self.down_since.take() {
                    counter!(m::BROKER_OUTAGE_SECONDS)
                        .increment(since.elapsed().as_secs_f64().round() as u64);
                }
                info!(channels = self.wants.len(), "redis cluster links restored, channels resubscribed");
            } else {
                self.down_since = None;
                info!(masters = self.by_addr.len(), "redis cluster links up");
            }
            self.ever_up = true;
        } else {
            self.link_state.send_replace(LinkState::Down);
            gauge!(m::BROKER_LINK_UP).set(0.0);
            self.down_since = Some(Instant::now());
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so nodes don't reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}
