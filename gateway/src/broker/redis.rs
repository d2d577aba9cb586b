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

use super::{Broker, BrokerError, LinkState, Publish, PublishOutcome, Ready, Sink};
use crate::{config::mask_url, metrics as m};

/// Longest a single Redis command may take before the link counts as broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles up to [`BACKOFF_MAX`], each with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
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
}

impl RedisBroker {
    /// Starts the pub/sub task (under `tracker`, ending at `shutdown`) and the pool.
    /// Redis need not be up yet: the task keeps reconnecting.
    pub fn start(
        url: &str,
        pool_size: usize,
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
        let task =
            PubSubTask { client, sink, cmds: rx, link: link_tx, wanted: HashSet::new(), waiting: Vec::new() };
        info!(url = %mask_url(url), "redis broker starting");
        tracker.spawn(task.run(shutdown));
        Ok(Self { cmds, pool, link })
    }
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
            Ok(PublishOutcome { id: None, subscribed: receivers > 0 })
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
}

/// The link failed; reconnect.
struct LinkLost(String);

impl PubSubTask {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_up = false;
        loop {
            let connect = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub());
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = connect => r,
            };
            let err = match result {
                Ok(Ok(pubsub)) => {
                    backoff = BACKOFF_MIN;
                    match self.serve(pubsub, &shutdown, &mut ever_up).await {
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
    ) -> Result<(), LinkLost> {
        let (mut sink, mut stream) = pubsub.split();
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
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                msg = stream.next() => {
                    let Some(msg) = msg else { return Err(LinkLost("connection closed".into())) };
                    let Some(hub) = self.sink.upgrade() else { return Ok(()) };
                    hub.deliver(msg.get_channel_name(), Bytes::copy_from_slice(msg.get_payload_bytes()));
                }
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.apply(cmd);
                    self.drain_cmds();
                    let subs: Vec<Arc<str>> = self.wanted.iter().filter(|c| !active.contains(*c)).cloned().collect();
                    let unsubs: Vec<Arc<str>> = active.iter().filter(|c| !self.wanted.contains(*c)).cloned().collect();
                    for chunk in unsubs.chunks(BATCH) {
                        command(sink.unsubscribe(chunk.iter().map(|c| &**c).collect::<Vec<_>>())).await?;
                        for c in chunk {
                            active.remove(c);
                        }
                    }
                    for chunk in subs.chunks(BATCH) {
                        command(sink.subscribe(chunk.iter().map(|c| &**c).collect::<Vec<_>>())).await?;
                        active.extend(chunk.iter().cloned());
                    }
                    if !subs.is_empty() || !unsubs.is_empty() {
                        debug!(subscribed = subs.len(), unsubscribed = unsubs.len(), "redis subscriptions updated");
                    }
                    self.release_waiting(&active);
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
