//! Replaying history: the one path by which missed messages come back, whether a client
//! resumes from its last id ([`Hub::replay`]) or this node's broker link was down
//! (`begin_recovery` / `finish_recovery`). Both read the channel's history after a
//! position, count the outcome in `gateway_history_recoveries_total{result}`, and turn
//! a gap history cannot cover into a `reset` notice followed by what history still
//! holds. It also keeps where each channel's history stood when this node subscribed
//! it: where an outage replay starts, and where a first long-poll cursor points.

use std::sync::Arc;

use metrics::counter;
use shared::StreamPos;

use super::{Channel, Delivery, Hub};
use crate::{
    broker::{HistoryEntry, Page, Recovery},
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
    /// More history may follow these messages: ask [`Hub::replay_more`] from the last
    /// one's position (a replay is read a page at a time, so what it holds is bounded).
    pub more: bool,
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
    /// Keeps what history's newest position was when this node subscribed `channel`.
    fn record_head(&self, channel: &str, head: Option<StreamPos>) {
        if let Some(ch) = self.shard(channel).channels.get_mut(channel) {
            ch.head = ch.head.or(head);
            ch.head_read = true;
        }
    }

    /// Where `channel`'s history stands as this node has delivered it: the newest
    /// history position dispatched here, else history's newest when this node
    /// subscribed (read now if it has not been yet); `None` for a channel without
    /// history (or when history cannot be read).
    pub async fn history_position(&self, channel: &str) -> Option<StreamPos> {
        if let Some(ch) = self.shard(channel).channels.get(channel)
            && (ch.last_pos.is_some() || ch.head_read)
        {
            return ch.last_pos.or(ch.head);
        }
        let head = self.broker.head(channel).await.ok()?;
        self.record_head(channel, head);
        let shard = self.shard(channel);
        shard.channels.get(channel).map_or(head, |ch| ch.last_pos.or(ch.head))
    }

    /// What `channel` published after `from` ([`StreamPos::ZERO`]: from the start of
    /// retained history): the first page of the missed messages, after a reset notice
    /// when history cannot cover them. `shares` replays read at once share one page (a
    /// client resuming several channels holds no more than one). Call it once the live
    /// subscription is ready, so nothing falls between history and live delivery.
    pub async fn replay(&self, channel: &Arc<str>, from: StreamPos, shares: usize) -> Replay {
        let page = self.config.replay_page;
        let shares = shares.max(1);
        let page =
            Page { max_count: (page.max_count / shares).max(1), max_bytes: (page.max_bytes / shares).max(1) };
        self.replay_page(channel, from, page, true).await
    }

    /// The next page of a replay, after `from` (the last message replayed). History
    /// trimmed meanwhile is a gap like any other: a reset notice.
    pub async fn replay_more(&self, channel: &Arc<str>, from: StreamPos) -> Replay {
        self.replay_page(channel, from, self.config.replay_page, false).await
    }

    async fn replay_page(&self, channel: &Arc<str>, from: StreamPos, page: Page, first: bool) -> Replay {
        let read = self.history_after(channel, from, page, first).await;
        Replay {
            reset: (!read.covered).then(|| Arc::new(Delivery::reset(channel.clone(), 0))),
            messages: read
                .entries
                .into_iter()
                .map(|e| Arc::new(from_history(channel.clone(), e, 0)))
                .collect(),
            position: read.position,
            more: read.more,
        }
    }

    /// A page of `channel`'s history after `from`; a first page counts the recovery by
    /// result (history that cannot be read counts as not covering).
    async fn history_after(&self, channel: &str, from: StreamPos, page: Page, first: bool) -> HistoryRead {
        let (result, entries, covered, position) = match self.broker.since(channel, from, page).await {
            Ok(Recovery::Covered(entries)) => ("replayed", entries, true, Some(from)),
            Ok(Recovery::Gap { entries, head }) => ("reset", entries, false, head.map(|h| h.min(from))),
            Err(err) => {
                tracing::warn!(%err, channel = %crate::error::quote(channel), "history unavailable; sending reset");
                ("error", Vec::new(), false, Some(from))
            }
        };
        if first || !covered {
            counter!(m::RECOVERIES_TOTAL, "result" => result).increment(1);
        }
        counter!(m::REPLAYED_TOTAL).increment(entries.len() as u64);
        let more = covered && page.is_full(&entries);
        HistoryRead { entries, covered, position, more }
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
                    shard.channels.values_mut().for_each(|ch| begin(ch));
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
            let (mut from, mut first) = (from, true);
            loop {
                let read = self.history_after(&name, from, self.config.replay_page, first).await;
                // History ends before what this node delivered: it lost its newest
                // messages (a Redis Cluster master failed before its replica had them,
                // or Redis restarted from an older snapshot), which were delivered live
                // here, so nothing was missed. Go on from history's newest, so the
                // messages published after it are not taken for repeats.
                let forked = first
                    && !read.covered
                    && read.entries.is_empty()
                    && read.position.is_some_and(|head| head < from);
                first = false;
                let mut shard = self.shard(&name);
                let Some(ch) = shard.channels.get_mut(&*name) else { break };
                if forked {
                    ch.last_pos = read.position;
                } else if !read.covered {
                    tracing::warn!(
                        channel = %crate::error::quote(&name),
                        %from,
                        "history cannot cover the outage; clients get a reset"
                    );
                    let mut reset = Delivery::reset(ch.name.clone(), self.next_seq());
                    reset.catch_up = true;
                    self.fan_out(ch, &Arc::new(reset));
                    // Positions ahead of what history holds would hide every new message.
                    ch.last_pos = read.position;
                    // History began again: keys from before it no longer mark repeats (the
                    // idempotency keys went with it, so a publisher may reuse one).
                    ch.repeats = Default::default();
                }
                for mut e in read.entries {
                    from = e.pos;
                    let key = e.key.take();
                    let mut d = from_history(ch.name.clone(), e, self.next_seq());
                    d.catch_up = true;
                    self.deliver_locked(ch, d, key.as_deref());
                }
                if !read.more {
                    self.release_held(ch);
                    break;
                }
            }
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

/// One page read from history.
struct HistoryRead {
    entries: Vec<HistoryEntry>,
    /// Whether history covers everything after the position read from.
    covered: bool,
    /// Where a client at that position stands afterwards.
    position: Option<StreamPos>,
    /// Whether more may follow the entries.
    more: bool,
}
