//! History publishes on a Redis Cluster, pipelined: one task takes every `FCALL
//! fanout_publish` queued meanwhile, groups them by slot (in queue order, so each
//! channel's messages stay in order inside one pipeline), sends the groups at once
//! through a `ClusterConnection`, and starts the next batch only when this one is
//! answered, so order holds across batches and retries too.
//!
//! The connection is built with `retries(0)`: redis-rs re-sends a command on its own
//! after a timeout or a dropped connection, which would publish a message twice (the
//! notes reproduced a command run 17 times). Retrying is ours instead:
//! - a refusal that says the command did not run (`MOVED`, `ASK`, `TRYAGAIN`,
//!   `CLUSTERDOWN`, a slot in migration...) is retried for every message, after a
//!   fresh connection (and so a fresh slot map) for a redirect;
//! - an unknown outcome (timeout, connection lost) is retried only for messages that
//!   may repeat: those with an idempotency key or a stream sequence, which the
//!   function de-duplicates; the others fail, as a publish whose reply was lost must;
//! - with replica acks on, each pipeline ends with `WAIT <n> <ms>` on the same node
//!   connection, and a message counts as published only once `n` replicas hold it;
//!   one that is not is sent again (a repeat: the function answers the first id).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::future::join_all;
use redis::{
    Value,
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo},
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{COMMAND_TIMEOUT, slots};
use crate::broker::{BrokerError, Publish, PublishOutcome, redis::script};

/// How long a batch is retried before its messages fail: longer than a failover.
const RETRY_FOR: Duration = Duration::from_secs(15);
/// First pause between two attempts; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(250);

/// How many replicas must hold a history publish before it is acknowledged.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaAcks {
    /// Replicas (0: acknowledge once the master has it).
    pub replicas: usize,
    /// Longest `WAIT` for them.
    pub timeout: Duration,
}

/// A `ClusterConnection` made on first use and made again after a redirect or a
/// broken link, so its slot map is read afresh.
pub(super) struct ClusterConn {
    client: ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl ClusterConn {
    pub(super) fn new(client: ClusterClient) -> Self {
        Self { client, conn: tokio::sync::Mutex::new(None) }
    }

    /// The current connection, connecting when there is none.
    pub(super) async fn get(&self) -> Result<ClusterConnection, BrokerError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_connection())
            .await
            .map_err(|_| BrokerError::Pool("redis cluster: connect timed out".into()))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops the current connection: the next use connects again.
    pub(super) async fn reset(&self) {
        *self.conn.lock().await = None;
    }
}

/// Loads the function library into every master.
pub(super) async fn load_everywhere(conn: &mut ClusterConnection, library: &str) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(library);
    let route =
        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
    conn.route_command(cmd, route).await.map(|_| ())
}

/// How Redis took one command, for the retry rules above.
#[derive(Debug)]
pub(super) enum Refusal {
    /// It did not run; the slot map may be stale (redirect, failover).
    Redirected(String),
    /// It did not run; try again shortly (cluster down, slot importing, loading).
    Busy(String),
    /// The function library is missing on that master.
    MissingFunction,
}

/// Whether a server error says the command did not run, and why.
pub(super) fn refusal(code: &str, details: &str) -> Option<Refusal> {
    let what = || format!("{code} {details}");
    match code {
        "MOVED" | "ASK" | "READONLY" => Some(Refusal::Redirected(what())),
        "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "LOADING" => Some(Refusal::Busy(what())),
        _ if details.contains("Function not found") => Some(Refusal::MissingFunction),
        // Raised before the script's first write: its keys are on their way to another
        // master (a slot migration), or the cluster is down.
        _ if details.starts_with("Script attempted to access a non local key")
            || details.starts_with("Script attempted to execute a") =>
        {
            Some(Refusal::Redirected(what()))
        }
        _ => None,
    }
}

struct Job {
    msg: Publish,
    done: oneshot::Sender<Result<PublishOutcome, BrokerError>>,
    /// What the first attempt that ran answered, when replicas had not acknowledged
    /// it: the retry is a repeat and answers with the same id.
    first: Option<PublishOutcome>,
}

impl Job {
    fn repeatable(&self) -> bool {
        self.msg.idempotency_key.is_some() || self.msg.sequence.is_some()
    }

    fn finish(self, outcome: Result<PublishOutcome, BrokerError>) {
        let outcome = match (self.first, outcome) {
            (Some(first), Ok(o)) if o.duplicate && o.id == first.id => Ok(first),
            (_, o) => o,
        };
        let _ = self.done.send(outcome);
    }
}

/// The queue in front of the pipelining task.
#[derive(Clone)]
pub struct ClusterPublisher {
    jobs: mpsc::UnboundedSender<Job>,
}

impl ClusterPublisher {
    /// Starts the task (it ends at `shutdown`, or when every handle is dropped).
    pub(super) fn start(
        conn: Arc<ClusterConn>,
        library: Arc<str>,
        acks: ReplicaAcks,
        shutdown: CancellationToken,
    ) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(Pipeliner { conn, library, acks, rx }.run(shutdown));
        Self { jobs }
    }

    /// Queues `msg` now and returns its outcome once Redis (and the replicas) answered.
    pub fn publish(
        &self,
        msg: Publish,
    ) -> impl std::future::Future<Output = Result<PublishOutcome, BrokerError>> + Send + 'static {
        let (done, outcome) = oneshot::channel();
        let queued = self.jobs.send(Job { msg, done, first: None }).is_ok();
        async move {
            let stopped = || BrokerError::Pool("the publisher has stopped".into());
            if !queued {
                return Err(stopped());
            }
            outcome.await.unwrap_or_else(|_| Err(stopped()))
        }
    }
}

struct Pipeliner {
    conn: Arc<ClusterConn>,
    library: Arc<str>,
    acks: ReplicaAcks,
    rx: mpsc::UnboundedReceiver<Job>,
}

impl Pipeliner {
    async fn run(mut self, shutdown: CancellationToken) {
        while let Some(batch) = crate::broker::next_batch(&mut self.rx, &shutdown).await {
            self.send(batch).await;
        }
    }

    /// Sends `batch` (again, by the rules above, until [`RETRY_FOR`]) and answers every
    /// job.
    async fn send(&mut self, mut batch: Vec<Job>) {
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut pause = RETRY_MIN;
        let mut sent_before = false;
        loop {
            let (again, why) = self.attempt(batch, sent_before).await;
            sent_before = true;
            if again.is_empty() {
                return;
            }
            if tokio::time::Instant::now() + pause >= deadline {
                warn!(error = %why, messages = again.len(), "redis cluster publishes failed");
                for job in again {
                    job.finish(Err(BrokerError::Pool(format!("redis cluster: {why}"))));
                }
                return;
            }
            debug!(error = %why, messages = again.len(), "publishing again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
            batch = again;
        }
    }

    /// One attempt at `batch` (`sent_before`: an earlier attempt may have run some of
    /// it): answers the jobs that are done and returns those to try again, in order,
    /// with the last reason.
    async fn attempt(&mut self, batch: Vec<Job>, sent_before: bool) -> (Vec<Job>, String) {
        let mut conn = match self.conn.get().await {
            Ok(c) => c,
            // Nothing was sent: every message may be tried again.
            Err(e) => return (batch, e.to_string()),
        };
        let mut groups: Vec<Vec<Job>> = Vec::new();
        let mut by_slot: HashMap<u16, usize> = HashMap::new();
        for job in batch {
            let i = *by_slot.entry(slots::slot(job.msg.channel.as_bytes())).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[i].push(job);
        }
        let acks = self.acks;
        let replies =
            join_all(groups.iter().map(|jobs| send_group(conn.clone(), jobs, acks, sent_before))).await;
        let (mut again, mut why) = (Vec::new(), String::new());
        let (mut stale, mut missing) = (false, false);
        for (jobs, replies) in groups.into_iter().zip(replies) {
            let mut replies = match replies {
                Ok(r) => r.into_iter(),
                Err(e) => {
                    // Whether Redis ran them is unknown.
                    stale = true;
                    why = e.to_string();
                    for job in jobs {
                        if job.repeatable() {
                            again.push(job);
                        } else {
                            job.finish(Err(BrokerError::Pool(format!("publish outcome unknown: {e}"))));
                        }
                    }
                    continue;
                }
            };
            let acked = acks.replicas == 0
                || matches!(replies.as_slice().last(), Some(Value::Int(n)) if *n >= acks.replicas as i64);
            for mut job in jobs {
                let reply = replies.next().unwrap_or(Value::Nil);
                let refused = match &reply {
                    Value::ServerError(e) => refusal(e.code(), e.details().unwrap_or("")),
                    _ => None,
                };
                match refused {
                    Some(r) => {
                        match &r {
                            Refusal::Redirected(w) => (stale, why) = (true, w.clone()),
                            Refusal::Busy(w) => why = w.clone(),
                            Refusal::MissingFunction => missing = true,
                        }
                        again.push(job);
                    }
                    None => match script::parse_publish_reply(reply) {
                        Ok(outcome) if !acked => {
                            why = format!("fewer than {} replicas acknowledged in time", acks.replicas);
                            if job.repeatable() {
                                job.first.get_or_insert(outcome);
                                again.push(job);
                            } else {
                                job.finish(Err(BrokerError::Pool(why.clone())));
                            }
                        }
                        outcome => job.finish(outcome),
                    },
                }
            }
        }
        if missing && let Err(e) = load_everywhere(&mut conn, &self.library).await {
            warn!(error = %e, "cannot load the fanout function library");
        }
        if stale {
            self.conn.reset().await;
        }
        (again, why)
    }
}

/// One slot's messages as one pipeline (each reply kept apart), followed by `WAIT`
/// when replica acks are on; all of it goes to that slot's master, back to back.
async fn send_group(
    mut conn: ClusterConnection,
    jobs: &[Job],
    acks: ReplicaAcks,
    sent_before: bool,
) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for job in jobs {
        pipe.add_command(script::publish_cmd(&job.msg, sent_before));
    }
    if acks.replicas > 0 {
        pipe.cmd("WAIT").arg(acks.replicas).arg(acks.timeout.as_millis() as u64);
    }
    let limit = COMMAND_TIMEOUT + acks.timeout;
    match tokio::time::timeout(limit, pipe.query_async::<Vec<Value>>(&mut conn)).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "publish timed out"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_failures() {
        assert!(matches!(refusal("MOVED", "3999 127.0.0.1:7001"), Some(Refusal::Redirected(_))));
        assert!(matches!(refusal("ASK", "3999 127.0.0.1:7001"), Some(Refusal::Redirected(_))));
        assert!(matches!(refusal("CLUSTERDOWN", "The cluster is down"), Some(Refusal::Busy(_))));
        assert!(matches!(refusal("ERR", "Function not found"), Some(Refusal::MissingFunction)));
        assert!(matches!(
            refusal("ERR", "Script attempted to access a non local key in a cluster node script: x"),
            Some(Refusal::Redirected(_))
        ));
        assert!(refusal("ERR", "stream out of order: expected seq 2, got 3").is_none());
    }
}
