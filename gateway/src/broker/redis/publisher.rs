//! History publishes, pipelined: one task owns a connection and sends every `FCALL
//! fanout_publish` queued meanwhile as one pipeline, in the order they were queued, one
//! pipeline at a time, and hands each reply back to its caller. Many concurrent
//! publishes (and a stream's tokens) then cost Redis one round trip per batch instead of
//! one each, and messages keep the order they were queued in.
//!
//! When the connection fails under a batch, the batch is sent again on a new one —
//! only if each of its messages is safe to repeat (it carries an idempotency key or a
//! stream sequence, which `fanout_publish` de-duplicates); the others fail, as a
//! publish whose reply was lost must. Later batches wait, so order holds across a
//! reconnect. The connection goes to the current master ([`Master`]): after a failover
//! the next attempt goes to the new one, and a call the old one refused as a replica
//! (`READONLY`: it did not run) is sent again whatever it carries.
//!
//! With `replica_acks` = N > 0 each pipeline ends with `WAIT N`: its publishes are
//! acknowledged only once N replicas hold them. Fewer = not durable (the master may be
//! cut off from its replicas, or about to be replaced): handled like a lost reply, sent
//! again to the current master when it is safe to repeat, else failed.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    COMMAND_TIMEOUT,
    master::{Master, is_not_master},
    script,
};
use crate::broker::{BrokerError, Publish, PublishOutcome};

/// How long a batch is retried over reconnects before its messages fail.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How long `WAIT` waits for the replicas (below [`COMMAND_TIMEOUT`], the connection's
/// response timeout).
pub const WAIT_TIMEOUT: Duration = Duration::from_millis(1000);

/// One queued publish and where its outcome goes.
struct Job {
    msg: Publish,
    done: oneshot::Sender<Result<PublishOutcome, BrokerError>>,
}

impl Job {
    /// Whether sending it twice publishes it once.
    fn repeatable(&self) -> bool {
        self.msg.idempotency_key.is_some() || self.msg.sequence.is_some()
    }

    fn finish(self, outcome: Result<PublishOutcome, BrokerError>) {
        let _ = self.done.send(outcome);
    }
}

/// What one attempt made of a job.
enum Fate {
    /// Answered for good.
    Done(Result<PublishOutcome, BrokerError>),
    /// Surely not run (refused by a node that is not the master): send it again.
    Again(String),
    /// Maybe run, or run but not durable: send again only if that is safe.
    Unknown(String),
}

/// The queue in front of the pipelining task.
#[derive(Debug, Clone)]
pub struct PublishQueue {
    jobs: mpsc::UnboundedSender<Job>,
}

impl PublishQueue {
    /// Starts the task (it ends at `shutdown`, or when every `PublishQueue` is dropped),
    /// publishing on `master`, loading `library` when Redis lacks it, and waiting for
    /// `replica_acks` replicas after each pipeline.
    pub fn start(
        master: Master,
        library: Arc<str>,
        replica_acks: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(Pipeliner { master, library, replica_acks, conn: None, rx }.run(shutdown));
        Self { jobs }
    }

    /// Queues `msg` now (calls made one after another publish in that order) and
    /// returns its outcome once Redis has answered.
    pub fn publish(
        &self,
        msg: Publish,
    ) -> impl std::future::Future<Output = Result<PublishOutcome, BrokerError>> + Send + 'static {
        let (done, outcome) = oneshot::channel();
        let queued = self.jobs.send(Job { msg, done }).is_ok();
        async move {
            if !queued {
                return Err(BrokerError::Pool("the publisher has stopped".into()));
            }
            outcome.await.unwrap_or_else(|_| Err(BrokerError::Pool("the publisher has stopped".into())))
        }
    }
}

struct Pipeliner {
    master: Master,
    library: Arc<str>,
    replica_acks: usize,
    /// The connection and the master generation it was made for.
    conn: Option<(u64, redis::aio::MultiplexedConnection)>,
    rx: mpsc::UnboundedReceiver<Job>,
}

impl Pipeliner {
    async fn run(mut self, shutdown: CancellationToken) {
        while let Some(batch) = crate::broker::next_batch(&mut self.rx, &shutdown).await {
            self.send(batch).await;
        }
    }

    /// Sends `batch` as one pipeline (again over reconnects, for what may repeat),
    /// and answers every job.
    async fn send(&mut self, mut batch: Vec<Job>) {
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut sent_before = false;
        loop {
            let attempt = self.try_send(&batch, sent_before).await;
            sent_before = true;
            let fates = match attempt {
                Ok(fates) => fates,
                Err(err) => {
                    // The connection failed: whether Redis ran the batch is unknown.
                    self.conn = None;
                    match &err {
                        BrokerError::Redis(e) => self.master.check_error(e),
                        _ => self.master.suspect(),
                    }
                    let why = format!("publish outcome unknown: {err}");
                    batch.iter().map(|_| Fate::Unknown(why.clone())).collect()
                }
            };
            let mut again = Vec::new();
            let mut why = String::new();
            for (job, fate) in batch.into_iter().zip(fates) {
                match fate {
                    Fate::Done(outcome) => job.finish(outcome),
                    Fate::Unknown(w) if !job.repeatable() => job.finish(Err(BrokerError::Pool(w))),
                    Fate::Again(w) | Fate::Unknown(w) => {
                        why = w;
                        again.push(job);
                    }
                }
            }
            if again.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(error = %why, messages = again.len(), "redis unreachable; publishes failed");
                for job in again {
                    job.finish(Err(BrokerError::Pool(format!("redis unreachable: {why}"))));
                }
                return;
            }
            debug!(error = %why, messages = again.len(), "publish pipeline failed; sending it again");
            tokio::time::sleep(RETRY_EVERY).await;
            batch = again;
        }
    }

    /// One attempt: connects to the current master when needed, loads the library when
    /// Redis lacks it, and says what became of each job. `sent_before`: an earlier
    /// attempt may have run some of the batch, so stream messages are checked.
    async fn try_send(&mut self, batch: &[Job], sent_before: bool) -> Result<Vec<Fate>, BrokerError> {
        if let Some((generation, _)) = &self.conn
            && !self.master.is_current(*generation)
        {
            self.conn = None; // made for a former master
        }
        let conn = match &mut self.conn {
            Some((_, c)) => c,
            None => {
                let node = self.master.node().await?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT));
                let c = node.client.get_multiplexed_async_connection_with_config(&config).await?;
                &mut self.conn.insert((node.generation, c)).1
            }
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in batch {
            pipe.add_command(script::publish_cmd(&job.msg, sent_before));
        }
        if self.replica_acks > 0 {
            pipe.cmd("WAIT").arg(self.replica_acks).arg(WAIT_TIMEOUT.as_millis() as u64);
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
        if replies.iter().any(script::is_missing_function_reply) {
            // Redis lost the library (a restart without persistence, a fresh master):
            // every call of the batch failed alike; load it and send the batch once more.
            script::load_library(conn, &self.library).await?;
            replies = pipe.query_async(conn).await?;
        }
        let durable = match self.replica_acks {
            0 => Ok(()),
            want => match replies.pop() {
                Some(redis::Value::Int(n)) if n >= want as i64 => Ok(()),
                Some(redis::Value::Int(n)) => Err(format!(
                    "not durable: {n} of {want} replicas acknowledged within {} ms",
                    WAIT_TIMEOUT.as_millis()
                )),
                other => return Err(BrokerError::Protocol(format!("WAIT answered {other:?}"))),
            },
        };
        if durable.is_err() {
            self.master.suspect();
        }
        Ok(replies.into_iter().map(|reply| fate(reply, &durable)).collect())
    }
}

/// What one `fanout_publish` reply means, given whether the batch is durable.
fn fate(reply: redis::Value, durable: &Result<(), String>) -> Fate {
    match reply {
        redis::Value::ServerError(e) => {
            let err: redis::RedisError = e.into();
            if is_not_master(&err) { Fate::Again(err.to_string()) } else { Fate::Done(Err(err.into())) }
        }
        reply => match durable {
            Ok(()) => Fate::Done(script::parse_publish(reply)),
            Err(why) => Fate::Unknown(why.clone()),
        },
    }
}
