//! The node's dedicated pub/sub connection: a single task owns it, applies the hub's
//! subscribe/unsubscribe commands in batches (one `SUBSCRIBE a b c` for many channels),
//! reads messages and hands them to the hub without ever waiting on clients, probes the
//! link for a silent wedge, and when the link drops it reconnects with exponential
//! backoff and jitter and resubscribes every live channel. When the master moves
//! (Sentinel), the link to the old one is dropped and the task reconnects to the new one
//! at once: readiness fails meanwhile, and the hub replays what was missed, as after
//! any outage.

use std::{
    collections::HashSet,
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{StreamExt, future::BoxFuture};
use metrics::{counter, gauge};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{COMMAND_TIMEOUT, master::Master, script};
use crate::{
    broker::{LinkState, Ready, Sink},
    metrics as m,
};

/// First reconnect delay; doubles up to [`BACKOFF_MAX`], each with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the pub/sub link is probed with PING: a silently wedged link (a paused
/// Redis, a dead peer behind a NAT) shows up within about `HEALTH_EVERY * 2 +
/// HEALTH_TIMEOUT`.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How long the link may stay silent (no message, no answer to an outstanding probe)
/// before it counts as down. Messages count as life: under a burst the probe's answer
/// waits behind them, and a busy link is not a dead one.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Most channels in one SUBSCRIBE/UNSUBSCRIBE command.
const BATCH: usize = 1000;

/// A subscription change the hub asks for.
pub(super) enum Cmd {
    /// Subscribe a channel; set the flag once messages flow.
    Sub(Arc<str>, Arc<Ready>),
    /// Unsubscribe a channel.
    Unsub(Arc<str>),
}

pub(super) struct PubSubTask {
    master: Master,
    sink: Weak<dyn Sink>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    link: watch::Sender<LinkState>,
    /// Channels the hub wants.
    wanted: HashSet<Arc<str>>,
    /// Ready flags to set once the current link has subscribed their channel.
    waiting: Vec<(Arc<str>, Arc<Ready>)>,
    /// Function library to (re)load whenever the link comes up.
    library: Arc<str>,
}

/// The link failed; reconnect.
struct LinkLost(String);

impl PubSubTask {
    pub(super) fn new(
        master: Master,
        sink: Weak<dyn Sink>,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        link: watch::Sender<LinkState>,
        library: Arc<str>,
    ) -> Self {
        Self { master, sink, cmds, link, wanted: HashSet::new(), waiting: Vec::new(), library }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_up = false;
        let mut down_since = Some(std::time::Instant::now());
        loop {
            let master = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = self.master.node() => m,
            };
            let (err, generation) = match master {
                // `node` waited for one already: ask again at once.
                Err(e) => {
                    debug!(error = %e, "no redis master to link to yet");
                    continue;
                }
                Ok(node) => {
                    let connect = tokio::time::timeout(COMMAND_TIMEOUT, node.client.get_async_pubsub());
                    let result = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = connect => r,
                    };
                    let err = match result {
                        Ok(Ok(pubsub)) => {
                            backoff = BACKOFF_MIN;
                            match self.serve(&node, pubsub, &shutdown, &mut ever_up, &mut down_since).await {
                                Ok(()) => return,
                                Err(LinkLost(why)) => {
                                    // Maybe a failover: have the master checked now.
                                    self.master.suspect();
                                    why
                                }
                            }
                        }
                        Ok(Err(e)) => {
                            self.master.check_error(&e);
                            e.to_string()
                        }
                        Err(_) => "connect timed out".to_owned(),
                    };
                    (format!("{err} (master {})", node.addr), node.generation)
                }
            };
            if *self.link.borrow() == LinkState::Up {
                self.link.send_replace(LinkState::Down);
                gauge!(m::BROKER_LINK_UP).set(0.0);
                down_since = Some(std::time::Instant::now());
            }
            let delay = jitter(backoff);
            warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "redis pub/sub link down");
            backoff = (backoff * 2).min(BACKOFF_MAX);
            // A new master ends the wait: it is where the link goes next.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = self.master.moved(generation) => {}
            }
        }
    }

    /// Serves one connection until shutdown (`Ok`) or link loss (`Err`).
    async fn serve(
        &mut self,
        node: &super::master::MasterNode,
        pubsub: redis::aio::PubSub,
        shutdown: &CancellationToken,
        ever_up: &mut bool,
        down_since: &mut Option<std::time::Instant>,
    ) -> Result<(), LinkLost> {
        let (mut sink, mut stream) = pubsub.split();
        // A restarted Redis without persistence has lost the library: load it now.
        // A new master has it by replication, unless it was promoted before the library
        // reached it: loading is idempotent, so load it on every (re)connect.
        match tokio::time::timeout(COMMAND_TIMEOUT, node.client.get_multiplexed_async_connection()).await {
            Err(_) => return Err(LinkLost("connect timed out".into())),
            Ok(Ok(mut conn)) => {
                if let Err(e) = script::load_library(&mut conn, &self.library).await {
                    warn!(error = %e, "cannot load the fanout function library (history publishing will retry)");
                }
            }
            Ok(Err(e)) => return Err(LinkLost(e.to_string())),
        }
        self.drain_cmds();
        let all: Vec<Arc<str>> = self.wanted.iter().cloned().collect();
        let mut active: HashSet<Arc<str>> = HashSet::new();
        for chunk in all.chunks(BATCH) {
            command(sink.subscribe(chunk.iter().map(|c| &**c).collect::<Vec<_>>())).await?;
            active.extend(chunk.iter().cloned());
        }
        self.release_waiting(&active);
        self.link.send_replace(LinkState::Up);
        gauge!(m::BROKER_LINK_UP).set(1.0);
        if let Some(since) = down_since.take()
            && *ever_up
        {
            counter!(m::BROKER_OUTAGE_SECONDS).increment(since.elapsed().as_secs_f64().round() as u64);
        }
        if *ever_up {
            counter!(m::BROKER_RECONNECTS_TOTAL).increment(1);
            info!(channels = active.len(), "redis pub/sub link restored, channels resubscribed");
            if let Some(sink) = self.sink.upgrade() {
                sink.link_restored();
            }
        } else {
            info!(channels = active.len(), "redis pub/sub link up");
        }
        *ever_up = true;
        let mut health = tokio::time::interval(HEALTH_EVERY);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The probe runs beside the message loop (awaiting it inline would stall every
        // delivery behind its round trip); the link is wedged when a probe is out and
        // nothing at all has come from Redis for `HEALTH_TIMEOUT`.
        let mut probe: Option<BoxFuture<'static, redis::RedisResult<redis::Value>>> = None;
        let mut last_heard = std::time::Instant::now();
        // Subscription changes run beside the loop too, one batch at a time (commands
        // that arrive meanwhile wait in `cmds` and are coalesced into the next).
        let mut change: Option<BoxFuture<'static, Change>> = None;
        let master = self.master.clone();
        let moved = master.moved(node.generation);
        tokio::pin!(moved);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut moved => {
                    return Err(LinkLost(format!("the redis master moved away from {}", node.addr)));
                }
                _ = health.tick() => {
                    if probe.is_none() {
                        let mut s = sink.clone();
                        probe = Some(Box::pin(async move { s.ping::<redis::Value>().await }));
                    } else if last_heard.elapsed() > HEALTH_TIMEOUT {
                        return Err(LinkLost("health probe timed out: link wedged".into()));
                    }
                }
                r = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                    probe = None;
                    if let Err(e) = r {
                        return Err(LinkLost(format!("health probe failed: {e}")));
                    }
                    last_heard = std::time::Instant::now();
                }
                msg = stream.next() => {
                    last_heard = std::time::Instant::now();
                    let Some(msg) = msg else { return Err(LinkLost("connection closed".into())) };
                    let Some(hub) = self.sink.upgrade() else { return Ok(()) };
                    hub.deliver(msg.get_channel_name(), Bytes::copy_from_slice(msg.get_payload_bytes()));
                }
                done = async { change.as_mut().expect("guarded").await }, if change.is_some() => {
                    change = None;
                    let Change { subs, unsubs, result } = done;
                    result?;
                    for c in &unsubs {
                        active.remove(c);
                    }
                    active.extend(subs.iter().cloned());
                    debug!(subscribed = subs.len(), unsubscribed = unsubs.len(), "redis subscriptions updated");
                    last_heard = std::time::Instant::now();
                    self.release_waiting(&active);
                }
                cmd = self.cmds.recv(), if change.is_none() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.apply(cmd);
                    self.drain_cmds();
                    let subs: Vec<Arc<str>> = self.wanted.iter().filter(|c| !active.contains(*c)).cloned().collect();
                    let unsubs: Vec<Arc<str>> = active.iter().filter(|c| !self.wanted.contains(*c)).cloned().collect();
                    if subs.is_empty() && unsubs.is_empty() {
                        self.release_waiting(&active);
                    } else {
                        change = Some(Box::pin(apply_change(sink.clone(), subs, unsubs)));
                    }
                }
            }
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Sub(ch, ready) => {
                self.wanted.insert(ch.clone());
                self.waiting.push((ch, ready));
            }
            Cmd::Unsub(ch) => {
                self.wanted.remove(&ch);
            }
        }
    }

    fn drain_cmds(&mut self) {
        while let Ok(cmd) = self.cmds.try_recv() {
            self.apply(cmd);
        }
    }

    fn release_waiting(&mut self, active: &HashSet<Arc<str>>) {
        self.waiting.retain(|(ch, ready)| {
            if active.contains(ch) {
                ready.set();
                false
            } else {
                // Unsubscribed again before it went live: nobody waits on it any more.
                self.wanted.contains(ch)
            }
        });
    }
}

/// A batch of subscription changes and how Redis took it.
struct Change {
    subs: Vec<Arc<str>>,
    unsubs: Vec<Arc<str>>,
    result: Result<(), LinkLost>,
}

/// Sends `unsubs`, then `subs`, in batches of [`BATCH`] channels.
async fn apply_change(
    mut sink: redis::aio::PubSubSink,
    subs: Vec<Arc<str>>,
    unsubs: Vec<Arc<str>>,
) -> Change {
    let result = async {
        for chunk in unsubs.chunks(BATCH) {
            command(sink.unsubscribe(chunk.iter().map(|c| &**c).collect::<Vec<_>>())).await?;
        }
        for chunk in subs.chunks(BATCH) {
            command(sink.subscribe(chunk.iter().map(|c| &**c).collect::<Vec<_>>())).await?;
        }
        Ok(())
    }
    .await;
    Change { subs, unsubs, result }
}

async fn command(fut: impl std::future::Future<Output = redis::RedisResult<()>>) -> Result<(), LinkLost> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(LinkLost(e.to_string())),
        Err(_) => Err(LinkLost("subscribe timed out".into())),
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so nodes don't reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}
