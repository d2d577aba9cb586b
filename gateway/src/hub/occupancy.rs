//! Cluster-wide occupancy: how many subscribers a channel has over every live node.
//! Each node reports its local counts to the broker every [`REPORT_EVERY`], only for
//! channels whose count changed or whose entry is due for a refresh, so the cost
//! follows subscriber churn rather than the number of channels; an entry lives for
//! [`OCCUPANCY_TTL`], so a node that died drops out of the sums by itself. A node
//! answers with its own count live and the others' as last reported.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::broker::{BrokerError, OCCUPANCY_TTL, Occupancy};

/// How often this node's changed counts are reported.
const REPORT_EVERY: Duration = Duration::from_secs(2);
/// An unchanged count is reported again after this, well before its entry expires.
const REFRESH_AFTER: Duration = Duration::from_secs(OCCUPANCY_TTL.as_secs() / 3);

impl Hub {
    /// The subscribers of `channel` over every live node, and how many nodes have any.
    pub async fn occupancy(&self, channel: &str) -> Result<Occupancy, BrokerError> {
        let local = self.subscriber_count(channel) as u64;
        let others = self.broker.occupancy(channel, self.epoch).await?.unwrap_or_default();
        Ok(Occupancy { subscribers: others.subscribers + local, nodes: others.nodes + u64::from(local > 0) })
    }

    /// Reports this node's counts until `shutdown`, then withdraws them.
    pub async fn run_occupancy_reports(self: Arc<Self>, shutdown: CancellationToken) {
        let mut reported: HashMap<Arc<str>, (usize, Instant)> = HashMap::new();
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            let now = Instant::now();
            let current = if stopping { Vec::new() } else { self.local_counts() };
            let live: HashSet<&Arc<str>> = current.iter().map(|(c, _)| c).collect();
            let mut changes: Vec<(Arc<str>, usize)> = current
                .iter()
                .filter(|(c, n)| {
                    reported.get(c).is_none_or(|(m, at)| m != n || now.duration_since(*at) >= REFRESH_AFTER)
                })
                .cloned()
                .collect();
            changes.extend(reported.keys().filter(|c| !live.contains(c)).map(|c| (c.clone(), 0)));
            if !changes.is_empty() {
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.broker.report_occupancy(self.epoch, changes.clone()),
                );
                match sent.await {
                    Ok(Ok(())) => {
                        for (c, n) in changes {
                            if n == 0 {
                                reported.remove(&c);
                            } else {
                                reported.insert(c, (n, now));
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "occupancy not reported; next time"),
                    Err(_) => tracing::debug!("occupancy report timed out; next time"),
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Channels with local subscribers, and how many.
    fn local_counts(&self) -> Vec<(Arc<str>, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                shard
                    .channels
                    .values()
                    .filter(|c| !c.subs.is_empty())
                    .map(|c| (c.name.clone(), c.subs.len())),
            );
        }
        out
    }
}
