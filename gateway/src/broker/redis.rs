//! The Redis broker: one dedicated pub/sub connection per node ([`pubsub`]), and a
//! connection pool for publishing and reading history through the `fanout` Redis
//! Function library ([`script`]).

mod publisher;
mod pubsub;
pub mod script;

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use futures_util::future::BoxFuture;
use metrics::gauge;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use shared::StreamPos;

pub use self::publisher::PublishQueue;
use self::pubsub::{Cmd, PubSubTask};
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
    pool: Pool,
    publisher: PublishQueue,
    link: watch::Receiver<LinkState>,
    library: Arc<str>,
}

/// The Redis Function library source with this node's history limits filled in.
/// A Redis broker whose URL and pool are set up, not yet started: setting up can fail
/// (a malformed URL), starting cannot.
pub struct Prepared {
    client: redis::Client,
    pool: Pool,
    history: HistoryConfig,
    url: String,
}

impl RedisBroker {
    /// Checks `url` and sets up the publishing pool of `pool_size` connections.
    pub fn prepare(url: &str, pool_size: usize, history: HistoryConfig) -> Result<Prepared, BrokerError> {
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
        Ok(Prepared { client, pool, history, url: mask_url(url) })
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
        let Self { client, pool, history, url } = self;
        let (cmds, rx) = mpsc::unbounded_channel();
        let (link_tx, link) = watch::channel(LinkState::Down);
        gauge!(m::BROKER_LINK_UP).set(0.0);
        let library: Arc<str> = script::library_source(&history).into();
        let publisher = PublishQueue::start(client.clone(), library.clone(), shutdown.clone());
        let task = PubSubTask::new(client, sink, rx, link_tx, library.clone());
        info!(%url, "redis broker starting");
        tracker.spawn(task.run(shutdown));
        RedisBroker { cmds, pool, publisher, link, library }
    }
}

impl RedisBroker {
    /// Runs an FCALL, loading the function library first if Redis lost it (restart
    /// without persistence, or a fresh server).
    async fn fcall(&self, cmd: redis::Cmd) -> Result<redis::Value, BrokerError> {
        let fut = async {
            let mut conn = self.pool.get().await.map_err(|e| BrokerError::Pool(e.to_string()))?;
            match cmd.query_async::<redis::Value>(&mut conn).await {
                Err(e) if script::is_missing_function(&e) => {
                    script::load_library(&mut conn, &self.library).await?;
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
                let mut conn = pool.get().await.map_err(|e| BrokerError::Pool(e.to_string()))?;
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
}
