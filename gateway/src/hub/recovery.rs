//! Replaying history: the one path by which missed messages come back, whether a client
//! resumes from its last id ([`Hub::replay`]) or this node's broker link was down
//! (`begin_recovery` / `finish_recovery`). Both read the channel's history after a
//! position, count the outcome in `gateway_history_recoveries_total{result}`, and turn
//! a gap history cannot cover into a `reset` notice followed by what history still
//! holds.

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
pub struct Replay {
    /// Sent first when history cannot cover the gap: a `reset` notice for the channel.
    pub reset: Option<Arc<Delivery>>,
    /// The messages history holds after the position, oldest first (maybe none).
    pub messages: Vec<Arc<Delivery>>,
    /// Where the client stands after the replay, for de-duplication: its own position,
    /// or history's newest when it was ahead of it (`None`: history holds nothing).
    pub position: Option<StreamPos>,
}

impl Replay {
    /// Whether history covered the whole gap.
    pub fn recovered(&self) -> bool {
        self.reset.is_none()
    }

    /// The notice (if any), then the messages.
    pub fn into_deliveries(self) -> impl Iterator<Item = Arc<Delivery>> {
        self.reset.into_iter().chain(self.messages)
    }
}

impl Hub {
    /// What `channel` published after `from` ([`StreamPos::ZERO`]: from the start of
    /// retained history): the missed messages, after a reset notice when history cannot
    /// cover them. Call it once the live subscription is ready, so nothing falls
    /// between history and live delivery.
    pub async fn replay(&self, channel: &Arc<str>, from: StreamPos) -> Replay {
        let (entries, covered, position) = self.history_after(channel, from).await;
        Replay {
            reset: (!covered).then(|| Arc::new(Delivery::reset(channel.clone(), 0))),
            messages: entries.into_iter().map(|e| Arc::new(from_history(channel.clone(), e, 0))).collect(),
            position,
        }
    }

    /// The entries of `channel`'s history after `from`, whether they cover everything
    /// after it, and where a client at `from` stands afterwards; counted by result
    /// (history that cannot be read counts as not covering).
    async fn history_after(
        &self,
        channel: &str,
        from: StreamPos,
    ) -> (Vec<HistoryEntry>, bool, Option<StreamPos>) {
        let (result, entries, covered, position) = match self.broker.since(channel, from).await {
            Ok(Recovery::Covered(entries)) => ("replayed", entries, true, Some(from)),
            Ok(Recovery::Gap { entries, head }) => ("reset", entries, false, head.map(|h| h.min(from))),
            Err(err) => {
                tracing::warn!(%err, channel = %crate::error::quote(channel), "history unavailable; sending reset");
                ("error", Vec::new(), false, Some(from))
            }
        };
        counter!(m::RECOVERIES_TOTAL, "result" => result).increment(1);
        counter!(m::REPLAYED_TOTAL).increment(entries.len() as u64);
        (entries, covered, position)
    }

    /// Starts recovery after a broker outage (of every channel, or of `only` these):
    /// each channel that has seen history messages holds its live messages from now on
    /// (this runs before the broker reads anything from the new link, so no live
    /// message can overtake the replay). Returns the channels and the positions to
    /// replay from.
    pub(super) fn begin_recovery(&self, only: Option<&[Arc<str>]>) -> Vec<(Arc<str>, StreamPos)> {
        let mut todo = Vec::new();
        let mut begin = |ch: &mut Channel| {
            if let Some(pos) = ch.last_pos.or(ch.head) {
                ch.recovering.get_or_insert_with(Vec::new);
                todo.push((ch.name.clone(), pos));
            }
        };
        match only {
            Some(names) => {
                for name in names {
                    if let Some(ch) = self.shard(name).channels.get_mut(&**name) {
                        begin(ch);
                    }
                }
            }
            None => {
                for shard in self.shards.iter() {
                    let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                    shard.channels.values_mut().for_each(&mut begin);
                }
            }
        }
        todo
    }

    /// Replays, per channel, what was published during the outage (then the live
    /// messages that waited), after telling subscribers about the gap when history
    /// cannot cover it. The replay and the waiting messages go to every subscriber at
    /// once, as catch-up deliveries outside the queue limits: a long outage on a busy
    /// channel replays more than a queue holds, and that must not count as a slow
    /// consumer.
    pub(super) async fn finish_recovery(self: Arc<Self>, todo: Vec<(Arc<str>, StreamPos)>) {
        for (name, from) in todo {
            let (entries, mut covered, mut position) = self.history_after(&name, from).await;
            if !covered && entries.is_empty() && position.is_some_and(|head| head < from) {
                // History ends before what this node delivered: it lost its newest
                // messages (a Redis Cluster master failed before its replica had them,
                // or Redis restarted from an older snapshot), which were delivered live
                // here, so nothing was missed. Go on from history's newest, so the
                // messages published after it are not taken for repeats.
                covered = true;
                position = position.map(|head| head.min(from));
                if let Some(ch) = self.shard(&name).channels.get_mut(&*name) {
                    ch.last_pos = position;
                }
            }
            let mut shard = self.shard(&name);
            let Some(ch) = shard.channels.get_mut(&*name) else { continue };
            if !covered {
                tracing::warn!(
                    channel = %crate::error::quote(&name),
                    %from,
                    "history cannot cover the outage; clients get a reset"
                );
                let mut reset = Delivery::reset(ch.name.clone(), self.next_seq());
                reset.catch_up = true;
                self.fan_out(ch, &Arc::new(reset));
                // Positions ahead of what history holds would hide every new message.
                ch.last_pos = position;
                // History began again: keys from before it no longer mark repeats (the
                // idempotency keys went with it, so a publisher may reuse one).
                ch.repeats = Default::default();
            }
            for mut e in entries {
                let key = e.key.take();
                let mut d = from_history(ch.name.clone(), e, self.next_seq());
                d.catch_up = true;
                self.deliver_locked(ch, d, key.as_deref());
            }
            self.release_held(ch);
        }
    }

    /// Dispatches the live messages that waited for a channel's replay.
    fn release_held(&self, ch: &mut Channel) {
        for payload in ch.recovering.take().unwrap_or_default() {
            self.dispatch_locked(ch, &payload, true);
        }
    }
}

/// A history entry as a delivery on `channel` with the node sequence number `seq`.
fn from_history(channel: Arc<str>, e: HistoryEntry, seq: u64) -> Delivery {
    Delivery::new(channel, Some(e.pos.to_string().into()), e.event.map(Into::into), e.data, seq, None)
}
