//! The Redis broker: one dedicated pub/sub connection per node, and a connection pool
//! for publishing.
//!
//! A single task owns the pub/sub connection. It applies subscribe/unsubscribe commands
//! from the hub in batches (one `SUBSCRIBE a b c` for many channels), reads messages and
//! hands them to the hub without ever waiting on clients, and when the link drops it
//! reconnects with exponential backoff and jitter and resubscribes every live channel.

use std::{
    collections::HashSet,
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use futures_util::{StreamExt, future::BoxFuture};
use metrics::{counter, gauge};
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use shared::StreamPos;

use super::{
    Broker, BrokerError, HistoryConfig, HistoryEntry, LinkState, Publish, PublishOutcome, Ready, Recovery,
    Sink,
};
use crate::{config::mask_url, metrics as m};

/// Longest a single Redis command may take before the link counts as broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
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

enum Cmd {
    Sub(Arc<str>, Arc<Ready>),
    Unsub(Arc<str>),
}

/// Broker backed by Redis pub/sub.
pub struct RedisBroker {
    cmds: mpsc::UnboundedSender<Cmd>,
    pool: Pool,
    link: watch::Receiver<LinkState>,
    library: Arc<str>,
    history: HistoryConfig,
}

/// The Redis Function library source with this node's history limits filled in.
pub fn library_source(h: &HistoryConfig) -> String {
    include_str!("fanout.lua")
        .replace("__MAXLEN__", &h.max_len.to_string())
        .replace("__MAXAGE_MS__", &h.max_age.as_millis().to_string())
        .replace("__KEY_TTL_MS__", &(h.max_age.as_millis() + 3_600_000).to_string())
        .replace("__IDEM_MS__", &h.idempotency_window.as_millis().max(1).to_string())
}

/// Loads (or replaces) the `fanout` function library.
pub async fn load_library(
    conn: &mut impl redis::aio::ConnectionLike,
    source: &str,
) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(source)
        .query_async::<String>(conn)
        .await
        .map(|_| ())
}

/// Whether Redis answered that the `fanout` library is not loaded.
pub fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

impl RedisBroker {
    /// Starts the pub/sub task (under `tracker`, ending at `shutdown`) and the pool.
    /// Redis need not be up yet: the task keeps reconnecting.
    pub fn start(
        url: &str,
        pool_size: usize,
        history: HistoryConfig,
        sink: Weak<dyn Sink>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, BrokerError> {
        let client = redis::Client::open(url)?;
        let mut cfg = deadpool_redis::Config::from_url(url);
        let mut pool_cfg = PoolConfig::new(pool_size);
        pool_cfg.timeouts = Timeouts {
            wait: Some(COMMAND_TIMEOUT),
            create: Some(COMMAND_TIMEOUT),
            recycle: Some(COMMAND_TIMEOUT),
        };
        cfg.pool = Some(pool_cfg);
        let pool = cfg.create_pool(Some(Runtime::Tokio1)).map_err(|e| BrokerError::Pool(e.to_string()))?;
        let (cmds, rx) = mpsc::unbounded_channel();
        let (link_tx, link) = watch::channel(LinkState::Down);
        gauge!(m::BROKER_LINK_UP).set(0.0);
        let library: Arc<str> = library_source(&history).into();
        let task = PubSubTask {
            client,
            sink,
            cmds: rx,
            link: link_tx,
            wanted: HashSet::new(),
            waiting: Vec::new(),
            library: library.clone(),
        };
        info!(url = %mask_url(url), "redis broker starting");
        tracker.spawn(task.run(shutdown));
        Ok(Self { cmds, pool, link, library, history })
    }

    /// Runs an FCALL, loading the function library first if Redis lost it (restart
    /// without persistence, or a fresh server).
    async fn fcall(&self, cmd: redis::Cmd) -> Result<redis::Value, BrokerError> {
        let fut = async {
            let mut conn = self.pool.get().await.map_err(|e| BrokerError::Pool(e.to_string()))?;
            match cmd.query_async::<redis::Value>(&mut conn).await {
                Err(e) if is_missing_function(&e) => {
                    load_library(&mut conn, &self.library).await?;
                    Ok(cmd.query_async::<redis::Value>(&mut conn).await?)
                }
                r => Ok(r?),
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, fut)
            .await
            .map_err(|_| BrokerError::Pool("redis timed out".into()))?
    }
}

fn bulk(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &redis::Value) -> Option<&str> {
    bulk(v).and_then(|b| std::str::from_utf8(b).ok())
}

/// Parses `fanout_since`'s reply `{status, entries, last}`.
fn parse_since(v: redis::Value) -> Result<Recovery, BrokerError> {
    let bad = |what: &str| BrokerError::Protocol(format!("fanout_since: {what}"));
    let redis::Value::Array(parts) = v else { return Err(bad("not an array")) };
    let [status, entries, _last] = &parts[..] else { return Err(bad("wrong length")) };
    match text(status) {
        Some("reset") => return Ok(Recovery::Gap),
        Some("ok") => {}
        _ => return Err(bad("unknown status")),
    }
    let redis::Value::Array(entries) = entries else { return Err(bad("entries not an array")) };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let redis::Value::Array(pair) = e else { return Err(bad("entry not an array")) };
        let [id, fields] = &pair[..] else { return Err(bad("entry shape")) };
        let pos: StreamPos = text(id).and_then(|s| s.parse().ok()).ok_or_else(|| bad("entry id"))?;
        let redis::Value::Array(fields) = fields else { return Err(bad("entry fields")) };
        let (mut data, mut event) = (Bytes::new(), None);
        for kv in fields.chunks(2) {
            match (kv.first().and_then(text), kv.get(1).and_then(bulk)) {
                (Some("d"), Some(v)) => data = Bytes::copy_from_slice(v),
                (Some("e"), Some(v)) => event = Some(String::from_utf8_lossy(v).into_owned()),
                _ => {}
            }
        }
        out.push(HistoryEntry { pos, event, data });
    }
    Ok(Recovery::Covered(out))
}

impl Broker for RedisBroker {
    fn subscribe(&self, channel: Arc<str>, ready: Arc<Ready>) {
        let _ = self.cmds.send(Cmd::Sub(channel, ready));
    }

    fn unsubscribe(&self, channel: Arc<str>) {
        let _ = self.cmds.send(Cmd::Unsub(channel));
    }

    fn publish(&self, msg: Publish) -> BoxFuture<'_, Result<PublishOutcome, BrokerError>> {
        Box::pin(async move {
            if msg.history {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("fanout_publish").arg(1).arg(&msg.channel).arg(&msg.data[..]);
                cmd.arg(msg.event.as_deref().unwrap_or("")).arg(msg.idempotency_key.as_deref().unwrap_or(""));
                let reply = self.fcall(cmd).await?;
                let redis::Value::Array(parts) = reply else {
                    return Err(BrokerError::Protocol("fanout_publish: not an array".into()));
                };
                let id = parts.first().and_then(text).map(str::to_owned);
                let receivers = match parts.get(1) {
                    Some(redis::Value::Int(n)) => *n,
                    _ => 0,
                };
                return Ok(PublishOutcome { id, subscribed: receivers > 0, duplicate: receivers < 0 });
            }
            let payload = super::frame(&msg);
            let fut = async {
                let mut conn = self.pool.get().await.map_err(|e| BrokerError::Pool(e.to_string()))?;
                let receivers: i64 =
                    redis::cmd("PUBLISH").arg(&msg.channel).arg(&payload[..]).query_async(&mut conn).await?;
                Ok::<_, BrokerError>(receivers)
            };
            let receivers = tokio::time::timeout(COMMAND_TIMEOUT, fut)
                .await
                .map_err(|_| BrokerError::Pool("publish timed out".into()))??;
            Ok(PublishOutcome { id: None, subscribed: receivers > 0, duplicate: false })
        })
    }

    fn since<'a>(
        &'a self,
        channel: &'a str,
        from: StreamPos,
    ) -> BoxFuture<'a, Result<Recovery, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL_RO");
            // Trimming is approximate (`MAXLEN ~`): read a little more than the limit.
            let count = self.history.max_len + self.history.max_len / 2 + 100;
            cmd.arg("fanout_since").arg(1).arg(channel).arg(from.to_string()).arg(count);
            parse_since(self.fcall(cmd).await?)
        })
    }

    fn head<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Option<StreamPos>, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL_RO");
            cmd.arg("fanout_head").arg(1).arg(channel);
            Ok(text(&self.fcall(cmd).await?).and_then(|s| s.parse().ok()))
        })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

struct PubSubTask {
    client: redis::Client,
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
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_up = false;
        let mut down_since = Some(std::time::Instant::now());
        loop {
            let connect = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub());
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = connect => r,
            };
            let err = match result {
                Ok(Ok(pubsub)) => {
                    backoff = BACKOFF_MIN;
                    match self.serve(pubsub, &shutdown, &mut ever_up, &mut down_since).await {
                        Ok(()) => return,
                        Err(LinkLost(why)) => why,
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connect timed out".to_owned(),
            };
            if *self.link.borrow() == LinkState::Up {
                self.link.send_replace(LinkState::Down);
                gauge!(m::BROKER_LINK_UP).set(0.0);
                down_since = Some(std::time::Instant::now());
            }
            let delay = jitter(backoff);
            warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "redis pub/sub link down");
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Serves one connection until shutdown (`Ok`) or link loss (`Err`).
    async fn serve(
        &mut self,
        pubsub: redis::aio::PubSub,
        shutdown: &CancellationToken,
        ever_up: &mut bool,
        down_since: &mut Option<std::time::Instant>,
    ) -> Result<(), LinkLost> {
        let (mut sink, mut stream) = pubsub.split();
        // A restarted Redis without persistence has lost the library: load it now.
        match tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_multiplexed_async_connection()).await {
            Err(_) => return Err(LinkLost("connect timed out".into())),
            Ok(Ok(mut conn)) => {
                if let Err(e) = load_library(&mut conn, &self.library).await {
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
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
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
