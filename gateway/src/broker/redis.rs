//! The Redis broker: one dedicated pub/sub connection per node ([`pubsub`]), and a
//! connection pool for publishing and reading history through the `fanout` Redis
//! Function library ([`script`]). All of them talk to the current master ([`master`]):
//! the one of the URL, or the one the sentinels name ([`sentinel`]), which can change.

pub mod master;
mod node;
mod publisher;
mod pubsub;
pub mod script;
pub mod sentinel;

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use futures_util::future::BoxFuture;
use metrics::gauge;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use shared::StreamPos;

pub use self::{master::Master, publisher::PublishQueue};
use self::{
    master::Pools,
    pubsub::{Cmd, PubSubTask},
    sentinel::Watcher,
};
use super::{Broker, BrokerError, LinkState, Page, Publish, PublishOutcome, Ready, Recovery, Sink};
use crate::{
    config::{HistoryConfig, mask_url},
    metrics as m,
};

/// Longest a single Redis command may take before the link counts as broken.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Broker backed by Redis pub/sub.
pub struct RedisBroker {
    cmds: mpsc::UnboundedSender<Cmd>,
    pool: Arc<Pools>,
    publisher: PublishQueue,
    link: watch::Receiver<LinkState>,
    library: Arc<str>,
}

/// The Redis Function library source with this node's history limits filled in.
/// A Redis broker whose URL and pool are set up, not yet started: setting up can fail
/// (a malformed URL), starting cannot.
pub struct Prepared {
    master: Master,
    watcher: Option<Watcher>,
    pool: Arc<Pools>,
    history: HistoryConfig,
    replica_acks: usize,
    url: String,
}

impl RedisBroker {
    /// Checks `url` and sets up the publishing pool of `pool_size` connections; history
    /// publishes wait for `replica_acks` replicas.
    pub fn prepare(
        url: &str,
        pool_size: usize,
        replica_acks: usize,
        history: HistoryConfig,
    ) -> Result<Prepared, BrokerError> {
        let (master, watcher) = Master::open(url)?;
        let pool = Arc::new(Pools::new(master.clone(), pool_size));
        Ok(Prepared { master, watcher, pool, history, replica_acks, url: mask_url(url) })
    }
}

impl Prepared {
    /// Starts the pub/sub task (under `tracker`, ending at `shutdown`), delivering to
    /// `sink`. Redis need not be up yet: the task keeps reconnecting.
    pub fn start(
        self,
        sink: Weak<dyn Sink>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> RedisBroker {
        let Self { master, watcher, pool, history, replica_acks, url } = self;
        let (cmds, rx) = mpsc::unbounded_channel();
        let (link_tx, link) = watch::channel(LinkState::Down);
        gauge!(m::BROKER_LINK_UP).set(0.0);
        let library: Arc<str> = script::library_source(&history).into();
        if let Some(watcher) = watcher {
            tracker.spawn(watcher.run(shutdown.clone()));
        }
        let publisher = PublishQueue::start(master.clone(), library.clone(), replica_acks, shutdown.clone());
        let task = PubSubTask::new(master, sink, rx, link_tx, library.clone());
        info!(%url, replica_acks, "redis broker starting");
        tracker.spawn(task.run(shutdown));
        RedisBroker { cmds, pool, publisher, link, library }
    }
}

impl RedisBroker {
    /// Runs an FCALL, loading the function library first if Redis lost it (restart
    /// without persistence, or a fresh server).
    async fn fcall(&self, cmd: redis::Cmd) -> Result<redis::Value, BrokerError> {
        let fut = async {
            let mut conn = self.pool.get().await?;
            let result = match cmd.query_async::<redis::Value>(&mut conn).await {
                Err(e) if script::is_missing_function(&e) => {
                    // A new master (a fresh server, or one promoted before the library
                    // reached it) lacks the library: load it here and go on.
                    script::load_library(&mut conn, &self.library).await?;
                    cmd.query_async::<redis::Value>(&mut conn).await
                }
                r => r,
            };
            result.inspect_err(|e| self.pool.master().check_error(e)).map_err(BrokerError::from)
        };
        tokio::time::timeout(COMMAND_TIMEOUT, fut)
            .await
            .map_err(|_| BrokerError::Pool("redis timed out".into()))?
    }
}

impl Broker for RedisBroker {
    fn subscribe(&self, channel: Arc<str>, ready: Arc<Ready>) {
        let _ = self.cmds.send(Cmd::Sub(channel, ready));
    }

    fn unsubscribe(&self, channel: Arc<str>) {
        let _ = self.cmds.send(Cmd::Unsub(channel));
    }

    fn publish(&self, msg: Publish) -> BoxFuture<'static, Result<PublishOutcome, BrokerError>> {
        if msg.history {
            // Queued now, pipelined with every other history publish, in call order.
            return Box::pin(self.publisher.publish(msg));
        }
        let pool = self.pool.clone();
        Box::pin(async move {
            let payload = super::frame(&msg);
            let fut = async {
                let mut conn = pool.get().await?;
                let receivers: i64 = redis::cmd("PUBLISH")
                    .arg(&msg.channel)
                    .arg(&payload[..])
                    .query_async(&mut conn)
                    .await
                    .inspect_err(|e| pool.master().check_error(e))?;
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
        page: Page,
    ) -> BoxFuture<'a, Result<Recovery, BrokerError>> {
        Box::pin(
            async move { script::parse_since(self.fcall(script::since_cmd(channel, from, page)).await?) },
        )
    }

    fn head<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Option<StreamPos>, BrokerError>> {
        Box::pin(async move { Ok(script::parse_head(&self.fcall(script::head_cmd(channel)).await?)) })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn report_occupancy(
        &self,
        node: u64,
        counts: Vec<(Arc<str>, usize)>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for (channel, count) in &counts {
                pipe.add_command(script::occupancy_report_cmd(channel, node, *count)).ignore();
            }
            // The library may be missing (a restarted Redis): `fcall` loads it.
            let mut conn = self.pool.get().await.map_err(|e| BrokerError::Pool(e.to_string()))?;
            match pipe.query_async::<()>(&mut conn).await {
                Err(e) if script::is_missing_function(&e) => {
                    script::load_library(&mut conn, &self.library).await?;
                    Ok(pipe.query_async::<()>(&mut conn).await?)
                }
                r => Ok(r?),
            }
        })
    }

    fn occupancy<'a>(
        &'a self,
        channel: &'a str,
        node: u64,
    ) -> BoxFuture<'a, Result<Option<super::Occupancy>, BrokerError>> {
        Box::pin(async move {
            script::parse_occupancy(&self.fcall(script::occupancy_cmd(channel, node)).await?).map(Some)
        })
    }
}
