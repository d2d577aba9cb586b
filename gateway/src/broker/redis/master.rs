//! Where the Redis master is, as every user of the broker sees it: fixed for a
//! `redis://` or `unix://` URL, and kept current by the Sentinel watcher
//! ([`super::sentinel`]) for `redis+sentinel://`. Each master the node adopts gets a new
//! *generation*; a connection remembers the generation it was made for, and one made for
//! an older generation is dropped instead of used (the pub/sub link reconnects, the
//! publish queue reconnects, the history pool starts over). Whoever sees the master
//! misbehave (a dropped connection, `READONLY`) calls [`Master::suspect`] so the watcher
//! looks again at once instead of at its next periodic check.

use std::sync::{Arc, Mutex};

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use tokio::sync::{Notify, watch};

pub(crate) use super::node::MasterNode;
use super::{COMMAND_TIMEOUT, sentinel::Watcher};
use crate::{
    broker::BrokerError,
    config::sentinel_url::{SCHEME, SentinelUrl},
};

/// The current master, shared by the pub/sub task, the publish queue and the history pool.
#[derive(Clone)]
pub struct Master {
    current: watch::Receiver<Option<Arc<MasterNode>>>,
    /// Wakes the Sentinel watcher (`None` for a fixed URL).
    wake: Option<Arc<Notify>>,
}

impl Master {
    /// Reads `url`: a fixed master, or a Sentinel set plus the watcher to run (under the
    /// node's shutdown token) before the master is known.
    pub fn open(url: &str) -> Result<(Self, Option<Watcher>), BrokerError> {
        if url.starts_with(SCHEME) {
            let parsed = SentinelUrl::parse(url).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad Sentinel URL", e))
            })?;
            let (tx, current) = watch::channel(None);
            let wake = Arc::new(Notify::new());
            let watcher = Watcher::new(parsed, tx, wake.clone())?;
            return Ok((Self { current, wake: Some(wake) }, Some(watcher)));
        }
        let client = redis::Client::open(url)?;
        let addr: Arc<str> = client.get_connection_info().addr().to_string().into();
        let node = MasterNode { generation: 0, client, url: url.to_owned(), addr };
        let (_tx, current) = watch::channel(Some(Arc::new(node)));
        Ok((Self { current, wake: None }, None))
    }

    /// The master, waiting up to [`COMMAND_TIMEOUT`] while none is known (during a
    /// failover, or before the sentinels first answered).
    pub(crate) async fn node(&self) -> Result<Arc<MasterNode>, BrokerError> {
        let mut rx = self.current.clone();
        let known = tokio::time::timeout(COMMAND_TIMEOUT, rx.wait_for(Option::is_some)).await;
        match known {
            Ok(Ok(node)) => Ok(node.clone().expect("waited for it")),
            _ => {
                self.suspect();
                Err(BrokerError::Pool("no Redis master known (the sentinels name none that answers)".into()))
            }
        }
    }

    /// Whether `generation` is still the current master's.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.current.borrow().as_ref().is_some_and(|n| n.generation == generation)
    }

    /// Resolves once the master is no longer the one of `generation` (never, for a
    /// fixed URL).
    pub(crate) async fn moved(&self, generation: u64) {
        let mut rx = self.current.clone();
        if rx.wait_for(|n| n.as_ref().map(|n| n.generation) != Some(generation)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Talking to the master failed in a way that may mean it moved: look again now.
    pub(crate) fn suspect(&self) {
        if let Some(wake) = &self.wake {
            wake.notify_one();
        }
    }

    /// Calls [`Self::suspect`] when `err` says the connection broke or the node no
    /// longer takes writes.
    pub(crate) fn check_error(&self, err: &redis::RedisError) {
        if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() || is_not_master(err) {
            self.suspect();
        }
    }
}

/// Whether Redis refused a write because the node is not (or not a writable) master:
/// the command did not run, so it may be sent to the current master.
pub(crate) fn is_not_master(err: &redis::RedisError) -> bool {
    matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "LOADING" | "NOREPLICAS"))
}

/// The history and raw-publish pool: a deadpool pool per master generation, replaced
/// when the master changes, so no connection to a former master is handed out again
/// (deadpool recycles with a PING, which a demoted master still answers).
pub(crate) struct Pools {
    master: Master,
    size: usize,
    current: Mutex<Option<(u64, Pool)>>,
}

impl Pools {
    /// No connection is made until the first [`Self::get`].
    pub(crate) fn new(master: Master, size: usize) -> Self {
        Self { master, size, current: Mutex::new(None) }
    }

    /// A pooled connection to the current master.
    pub(crate) async fn get(&self) -> Result<deadpool_redis::Connection, BrokerError> {
        let node = self.master.node().await?;
        let pool = {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            match &*current {
                Some((generation, pool)) if *generation == node.generation => pool.clone(),
                _ => {
                    let pool = build_pool(&node.url, self.size)?;
                    *current = Some((node.generation, pool.clone()));
                    pool
                }
            }
        };
        pool.get().await.map_err(|e| {
            if let deadpool_redis::PoolError::Backend(e) = &e {
                self.master.check_error(e);
            }
            BrokerError::Pool(e.to_string())
        })
    }

    /// The master handle the pool follows.
    pub(crate) fn master(&self) -> &Master {
        &self.master
    }
}

fn build_pool(url: &str, size: usize) -> Result<Pool, BrokerError> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    let mut pool_cfg = PoolConfig::new(size);
    pool_cfg.timeouts = Timeouts {
        wait: Some(COMMAND_TIMEOUT),
        create: Some(COMMAND_TIMEOUT),
        recycle: Some(COMMAND_TIMEOUT),
    };
    cfg.pool = Some(pool_cfg);
    cfg.create_pool(Some(Runtime::Tokio1)).map_err(|e| BrokerError::Pool(e.to_string()))
}
