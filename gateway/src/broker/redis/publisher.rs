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
//! reconnect.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{COMMAND_TIMEOUT, script};
use crate::broker::{BrokerError, Publish, PublishOutcome};

/// Most messages in one pipeline.
const MAX_BATCH: usize = 512;
/// How long a batch is retried over reconnects before its messages fail.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts.
const RETRY_EVERY: Duration = Duration::from_millis(100);

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

/// The queue in front of the pipelining task.
#[derive(Debug, Clone)]
pub struct PublishQueue {
    jobs: mpsc::UnboundedSender<Job>,
}

impl PublishQueue {
    /// Starts the task (it ends at `shutdown`, or when every `PublishQueue` is dropped),
    /// connecting with `client` and loading `library` when Redis lacks it.
    pub fn start(client: redis::Client, library: Arc<str>, shutdown: CancellationToken) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(Pipeliner { client, library, conn: None, rx }.run(shutdown));
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
    client: redis::Client,
    library: Arc<str>,
    conn: Option<redis::aio::MultiplexedConnection>,
    rx: mpsc::UnboundedReceiver<Job>,
}

impl Pipeliner {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = self.rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.send(batch).await;
        }
    }

    /// Sends `batch` as one pipeline (again over reconnects, for what may repeat),
    /// and answers every job.
    async fn send(&mut self, mut batch: Vec<Job>) {
        metrics::histogram!(crate::metrics::PUBLISH_BATCH).record(batch.len() as f64);
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        loop {
            let err = match self.try_send(&batch).await {
                Ok(replies) => {
                    for (job, reply) in batch.into_iter().zip(replies) {
                        job.finish(script::parse_publish_reply(reply));
                    }
                    return;
                }
                Err(e) => e,
            };
            // The connection failed: whether Redis ran the batch is unknown.
            self.conn = None;
            let (again, fail): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(Job::repeatable);
            for job in fail {
                job.finish(Err(BrokerError::Pool(format!("publish outcome unknown: {err}"))));
            }
            if again.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(error = %err, messages = again.len(), "redis unreachable; publishes failed");
                for job in again {
                    job.finish(Err(BrokerError::Pool(format!("redis unreachable: {err}"))));
                }
                return;
            }
            debug!(error = %err, messages = again.len(), "publish pipeline failed; sending it again");
            tokio::time::sleep(RETRY_EVERY).await;
            batch = again;
        }
    }

    /// One attempt: connects when needed, loads the library when Redis lacks it.
    async fn try_send(&mut self, batch: &[Job]) -> Result<Vec<redis::Value>, BrokerError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT));
                let c = self.client.get_multiplexed_async_connection_with_config(&config).await?;
                self.conn.insert(c)
            }
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in batch {
            pipe.add_command(script::publish_cmd(&job.msg));
        }
        let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
        if replies.iter().any(script::is_missing_function_reply) {
            // Redis lost the library (a restart without persistence): every call of the
            // batch failed alike; load it and send the batch once more.
            script::load_library(conn, &self.library).await?;
            return Ok(pipe.query_async(conn).await?);
        }
        Ok(replies)
    }
}
