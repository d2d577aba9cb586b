//! The Redis Cluster broker (`redis+cluster://h:p[,h:p...]`): sharded pub/sub, where
//! the Redis channel is the gateway channel, so `redis-cli -c SPUBLISH news hi` reaches
//! subscribers of `news`, and history on the slot of the channel
//! (`fanout:history:{news}`), so `FCALL fanout_publish 1 news ...` runs on one master.
//!
//! - [`subscriber`]: one task keeps every wanted channel `SSUBSCRIBE`d on the master of
//!   its slot, over one link per master ([`link`]), with its own slot map ([`slots`]).
//!   redis-rs's `ClusterConnection` is not used for this: it forgets a subscription
//!   when a master unsubscribes it on a slot move, resubscribes across slots in one
//!   command, and can hand a subscription push to an unrelated command's caller.
//! - [`publisher`]: history publishes, pipelined per slot through a
//!   `ClusterConnection` that never retries by itself, with optional replica acks.
//! - Reads of history (`fanout_since`, `fanout_head`) go through a second
//!   `ClusterConnection`, which may retry (they are reads), and whose node connections
//!   never wait behind a `WAIT`.
//!
//! Plain `PUBLISH` is not delivered on a cluster: Redis broadcasts it to every node
//! over the cluster bus, which is what sharded pub/sub avoids; publish with
//! `SPUBLISH` (or `FCALL fanout_publish`) instead.

mod link;
mod publisher;
pub mod slots;
mod subscriber;

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use futures_util::future::BoxFuture;
use metrics::gauge;
use redis::cluster::ClusterClientBuilder;
use shared::StreamPos;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

pub use self::publisher::{ClusterPublisher, ReplicaAcks};
use self::{
    publisher::{ClusterConn, Refusal, load_everywhere, refusal},
    subscriber::{Cmd, Subscriber},
};
use super::{
    Broker, BrokerError, LinkState, Page, Publish, PublishOutcome, Ready, Recovery, Sink, redis::script,
};
use crate::{
    config::{HistoryConfig, cluster_url, mask_url},
    metrics as m,
};

/// Longest a single Redis command may take before its link counts as broken.
pub(crate) const COMMAND_TIMEOUT: Duration = super::redis::COMMAND_TIMEOUT;
/// How long a read of history is tried before it fails (it must outlast a failover:
/// a failed read turns into a `reset` for clients).
const READ_FOR: Duration = Duration::from_secs(15);

/// Broker backed by a Redis Cluster.
pub struct ClusterBroker {
    cmds: mpsc::UnboundedSender<Cmd>,
    link: watch::Receiver<LinkState>,
    publisher: ClusterPublisher,
    /// Raw publishes: the publisher's client, which never retries by itself.
    writes: Arc<ClusterConn>,
    reads: Arc<ClusterConn>,
    library: Arc<str>,
}

/// A cluster broker whose URL is checked and clients built, not yet started.
pub struct Prepared {
    seeds: Vec<String>,
    writes: Arc<ClusterConn>,
    reads: Arc<ClusterConn>,
    history: HistoryConfig,
    acks: ReplicaAcks,
    url: String,
}

/// The clients of a cluster at `url`: one for publishing (never retries by itself) and
/// one for reading history. Shared by the broker and `gateway publish`.
pub fn clients(url: &str, acks: ReplicaAcks) -> Result<(Vec<String>, ClusterPublisherClient), BrokerError> {
    let seeds =
        cluster_url::seeds(url).map_err(|e| BrokerError::Protocol(format!("{}: {e}", mask_url(url))))?;
    let writes = ClusterClientBuilder::new(seeds.clone())
        .retries(0)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(COMMAND_TIMEOUT + acks.timeout)
        .build()?;
    Ok((seeds, ClusterPublisherClient(Arc::new(ClusterConn::new(writes)))))
}

/// The publishing client of [`clients`], ready to start a [`ClusterPublisher`].
pub struct ClusterPublisherClient(Arc<ClusterConn>);

impl ClusterPublisherClient {
    /// Starts the publishing queue; it loads `library` into a master that lacks it.
    pub fn start(
        &self,
        library: Arc<str>,
        acks: ReplicaAcks,
        shutdown: CancellationToken,
    ) -> ClusterPublisher {
        ClusterPublisher::start(self.0.clone(), library, acks, shutdown)
    }

    /// Connects once, to fail early on a cluster that cannot be reached.
    pub async fn check(&self) -> Result<(), BrokerError> {
        self.0.get().await.map(|_| ())
    }
}

impl ClusterBroker {
    /// Checks `url` and builds the clients; history publishes wait for `acks`.
    pub fn prepare(url: &str, history: HistoryConfig, acks: ReplicaAcks) -> Result<Prepared, BrokerError> {
        let (seeds, ClusterPublisherClient(writes)) = clients(url, acks)?;
        let reads = ClusterClientBuilder::new(seeds.clone())
            .retries(5)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(COMMAND_TIMEOUT)
            .build()?;
        Ok(Prepared {
            seeds,
            writes,
            reads: Arc::new(ClusterConn::new(reads)),
            history,
            acks,
            url: mask_url(url),
        })
    }
}

impl Prepared {
    /// Starts the subscriber and the publisher (under `tracker`, ending at `shutdown`),
    /// delivering to `sink`. The cluster need not be up yet.
    pub fn start(
        self,
        sink: Weak<dyn Sink>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> ClusterBroker {
        let Self { seeds, writes, reads, history, acks, url } = self;
        let (cmds, rx) = mpsc::unbounded_channel();
        let (link_tx, link) = watch::channel(LinkState::Down);
        gauge!(m::BROKER_LINK_UP).set(0.0);
        let library: Arc<str> = script::cluster_library_source(&history).into();
        let publisher = ClusterPublisher::start(writes.clone(), library.clone(), acks, shutdown.clone());
        let task = Subscriber::new(seeds, library.clone(), sink, rx, link_tx);
        info!(%url, replica_acks = acks.replicas, "redis cluster broker starting");
        tracker.spawn(task.run(shutdown));
        ClusterBroker { cmds, link, publisher, writes, reads, library }
    }
}

impl ClusterBroker {
    /// Runs a read of history, through failovers and slot moves, loading the function
    /// library where a master lacks it.
    async fn read(&self, cmd: redis::Cmd) -> Result<redis::Value, BrokerError> {
        let deadline = tokio::time::Instant::now() + READ_FOR;
        loop {
            let err = match self.reads.get().await {
                Err(e) => e,
                Ok(mut conn) => match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut conn)).await
                {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) => {
                        if script::is_missing_function(&e) {
                            let _ = load_everywhere(&mut conn, &self.library).await;
                        } else {
                            self.reads.reset().await;
                        }
                        BrokerError::Redis(e)
                    }
                    Err(_) => {
                        self.reads.reset().await;
                        BrokerError::Pool("redis cluster read timed out".into())
                    }
                },
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `SPUBLISH` through `writes`, tried again only when Redis said it did not run it.
    async fn publish_raw(writes: Arc<ClusterConn>, msg: Publish) -> Result<PublishOutcome, BrokerError> {
        let payload = super::frame(&msg);
        let deadline = tokio::time::Instant::now() + READ_FOR;
        loop {
            let mut conn = writes.get().await?;
            let mut cmd = redis::cmd("SPUBLISH");
            cmd.arg(&msg.channel).arg(&payload[..]);
            let err = match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await {
                Ok(Ok(n)) => return Ok(PublishOutcome { id: None, subscribed: n > 0, duplicate: false }),
                Ok(Err(e)) => e,
                Err(_) => return Err(BrokerError::Pool("publish timed out".into())),
            };
            let refused = err.code().and_then(|code| refusal(code, &err.to_string()));
            match refused {
                Some(Refusal::Redirected(_)) => writes.reset().await,
                Some(_) => {}
                None => return Err(err.into()),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(err.into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Broker for ClusterBroker {
    fn subscribe(&self, channel: Arc<str>, ready: Arc<Ready>) {
        let _ = self.cmds.send(Cmd::Sub(channel, ready));
    }

    fn unsubscribe(&self, channel: Arc<str>) {
        let _ = self.cmds.send(Cmd::Unsub(channel));
    }

    fn publish(&self, msg: Publish) -> BoxFuture<'static, Result<PublishOutcome, BrokerError>> {
        if msg.history {
            return Box::pin(self.publisher.publish(msg));
        }
        Box::pin(Self::publish_raw(self.writes.clone(), msg))
    }

    fn since<'a>(
        &'a self,
        channel: &'a str,
        from: StreamPos,
        page: Page,
    ) -> BoxFuture<'a, Result<Recovery, BrokerError>> {
        Box::pin(async move { script::parse_since(self.read(script::since_cmd(channel, from, page)).await?) })
    }

    fn head<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Option<StreamPos>, BrokerError>> {
        Box::pin(async move { Ok(script::parse_head(&self.read(script::head_cmd(channel)).await?)) })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn report_occupancy(
        &self,
        node: u64,
        counts: Vec<(Arc<str>, usize)>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            // One pipeline per slot (a cluster pipeline must stay in one slot); the
            // writes repeat harmlessly, so the reading client's retries are fine.
            let mut by_slot: std::collections::HashMap<u16, redis::Pipeline> = Default::default();
            for (channel, count) in &counts {
                let pipe = by_slot.entry(slots::slot(channel.as_bytes())).or_insert_with(redis::pipe);
                pipe.add_command(script::occupancy_report_cmd(channel, node, *count)).ignore();
            }
            let conn = self.reads.get().await?;
            let sent = by_slot.into_values().map(|pipe| {
                let mut conn = conn.clone();
                async move { pipe.query_async::<()>(&mut conn).await }
            });
            let results = futures_util::future::join_all(sent).await;
            match results.into_iter().find_map(Result::err) {
                Some(e) if script::is_missing_function(&e) => {
                    let _ = load_everywhere(&mut conn.clone(), &self.library).await;
                    Err(e.into())
                }
                Some(e) => {
                    self.reads.reset().await;
                    Err(e.into())
                }
                None => Ok(()),
            }
        })
    }

    fn occupancy<'a>(
        &'a self,
        channel: &'a str,
        node: u64,
    ) -> BoxFuture<'a, Result<Option<super::Occupancy>, BrokerError>> {
        Box::pin(async move {
            script::parse_occupancy(&self.read(script::occupancy_cmd(channel, node)).await?).map(Some)
        })
    }
}
