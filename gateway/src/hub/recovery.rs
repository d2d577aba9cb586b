//! Replaying history: the one path by which missed messages come back, whether a client
//! resumes from its last id ([`Hub::replay`]) or this node's broker link was down
//! (`begin_recovery` / `finish_recovery`). Both read the channel's history after a
//! position, count the outcome in `gateway_history_recoveries_total{result}`, and turn
//! a gap history cannot cover into a `reset` notice.

use std::sync::Arc;

use metrics::counter;
use shared::StreamPos;

use super::{Channel, Delivery, Hub};
use crate::{
    broker::{HistoryEntry, Recovery},
    metrics as m,
};

/// What a resuming subscriber gets before live messages.
#[derive(Debug)]
pub enum Replay {
    /// The missed messages, oldest first (maybe none).
    Messages(Vec<Arc<Delivery>>),
    /// History cannot cover the gap: send this reset notice, then go live.
    Reset(Arc<Delivery>),
}

impl Hub {
    /// What `channel` published after `from`, from history: the missed messages, or a
    /// reset when history cannot cover them. Call it once the live subscription is
    /// ready, so nothing falls between history and live delivery.
    pub async fn replay(&self, channel: &Arc<str>, from: StreamPos) -> Replay {
        match self.history_after(channel, from).await {
            Some(entries) => Replay::Messages(
                entries.into_iter().map(|e| Arc::new(from_history(channel.clone(), e, 0))).collect(),
            ),
            None => Replay::Reset(Arc::new(Delivery::reset(channel.clone(), 0))),
        }
    }

    /// The entries of `channel`'s history after `from`, or `None` when history cannot
    /// cover the gap (or cannot be read); counted by result either way.
    async fn history_after(&self, channel: &str, from: StreamPos) -> Option<Vec<HistoryEntry>> {
        let (result, entries) = match self.broker.since(channel, from).await {
            Ok(Recovery::Covered(entries)) => ("replayed", Some(entries)),
            Ok(Recovery::Gap) => ("reset", None),
            Err(err) => {
                tracing::warn!(%err, channel = %crate::error::quote(channel), "history unavailable; sending reset");
                ("error", None)
            }
        };
        counter!(m::RECOVERIES_TOTAL, "result" => result).increment(1);
        if let Some(entries) = &entries {
            counter!(m::REPLAYED_TOTAL).increment(entries.len() as u64);
        }
        entries
    }

    /// Starts recovery after a broker outage: every channel that has seen history
    /// messages holds its live messages from now on (this runs before the broker reads
    /// anything from the new link, so no live message can overtake the replay). Returns
    /// the channels and the positions to replay from.
    pub(super) fn begin_recovery(&self) -> Vec<(Arc<str>, StreamPos)> {
        let mut todo = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for ch in shard.channels.values_mut() {
                if let Some(pos) = ch.last_pos.or(ch.head) {
                    ch.recovering.get_or_insert_with(Vec::new);
                    todo.push((ch.name.clone(), pos));
                }
            }
        }
        todo
    }

    /// Replays, per channel, what was published during the outage (then the live
    /// messages that waited), or tells subscribers about the gap when history cannot
    /// cover it.
    pub(super) async fn finish_recovery(self: Arc<Self>, todo: Vec<(Arc<str>, StreamPos)>) {
        for (name, from) in todo {
            let entries = self.history_after(&name, from).await;
            let mut shard = self.shard(&name);
            let Some(ch) = shard.channels.get_mut(&*name) else { continue };
            match entries {
                Some(entries) => {
                    for e in entries {
                        let d = from_history(ch.name.clone(), e, self.next_seq());
                        self.deliver_locked(ch, d);
                    }
                }
                None => {
                    tracing::warn!(
                        channel = %crate::error::quote(&name),
                        %from,
                        "history cannot cover the outage; clients get a reset"
                    );
                    self.fan_out(ch, &Arc::new(Delivery::reset(ch.name.clone(), self.next_seq())));
                }
            }
            self.release_held(ch);
        }
    }

    /// Dispatches the live messages that waited for a channel's replay.
    fn release_held(&self, ch: &mut Channel) {
        for payload in ch.recovering.take().unwrap_or_default() {
            self.dispatch_locked(ch, &payload);
        }
    }
}

/// A history entry as a delivery on `channel` with the node sequence number `seq`.
fn from_history(channel: Arc<str>, e: HistoryEntry, seq: u64) -> Delivery {
    Delivery::new(channel, Some(e.pos.to_string().into()), e.event.map(Into::into), e.data, seq, None)
}
