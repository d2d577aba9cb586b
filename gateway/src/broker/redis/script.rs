//! The Redis side of history publishing: the `fanout` Redis Function library
//! (`fanout.lua`), the one place that builds its calls' argument lists, and the parsers
//! of its replies. The gateway's broker and `gateway publish` both call through here.

use bytes::Bytes;
use shared::StreamPos;

use crate::{
    broker::{BrokerError, HistoryEntry, Page, Publish, PublishOutcome, Recovery},
    config::HistoryConfig,
};

/// The Redis Function library source with this node's history limits filled in, for
/// one Redis (messages go out with `PUBLISH`).
pub fn library_source(h: &HistoryConfig) -> String {
    source_with(h, "PUBLISH")
}

/// The same library for a Redis Cluster: messages go out with `SPUBLISH` on the
/// channel, which lives in the same slot as its history, so they reach only the
/// subscribers of that slot's master instead of being broadcast to every node. Filled
/// in at load time: a function cannot tell cheaply whether it runs in a cluster.
pub fn cluster_library_source(h: &HistoryConfig) -> String {
    source_with(h, "SPUBLISH")
}

/// The history key of `channel` (channel names never hold braces, so the hash tag is
/// the channel itself and the key shares its slot).
pub fn history_key(channel: &str) -> String {
    format!("fanout:history:{{{channel}}}")
}

fn source_with(h: &HistoryConfig, publish: &str) -> String {
    include_str!("fanout.lua")
        .replace("__PUBLISH__", publish)
        .replace("__MAXLEN__", &h.max_len.to_string())
        .replace("__MAXAGE_MS__", &h.max_age.as_millis().to_string())
        .replace("__KEY_TTL_MS__", &(h.max_age.as_millis() + 3_600_000).to_string())
        .replace("__IDEM_MS__", &h.idempotency_window.as_millis().max(1).to_string())
}

/// Loads (or replaces) the `fanout` function library.
pub async fn load_library(
    conn: &mut impl redis::aio::ConnectionLike,
    source: &str,
) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(source)
        .query_async::<String>(conn)
        .await
        .map(|_| ())
}

/// Whether Redis answered that the `fanout` library is not loaded.
pub fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// `FCALL fanout_publish 1 fanout:history:{<channel>} <data> <event> <idempotency-key>
/// [<stream> <seq> <again>]` for `msg` (empty strings for an absent event or key, as the
/// function expects); `again` when an earlier attempt may have run (the function then
/// checks a stream message against history instead of just appending it). The gateway names the history key rather than the channel (the
/// function takes either): a key that exists is what keeps a Redis Cluster running the
/// call on the node that holds the history while its slot migrates, instead of
/// redirecting it to a node that has none yet.
pub fn publish_cmd(msg: &Publish, again: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("fanout_publish").arg(1).arg(history_key(&msg.channel)).arg(&msg.data[..]);
    cmd.arg(msg.event.as_deref().unwrap_or("")).arg(msg.idempotency_key.as_deref().unwrap_or(""));
    if let Some(seq) = msg.sequence {
        cmd.arg(format!("{:016x}", seq.stream)).arg(seq.n).arg(if again { "1" } else { "" });
    }
    cmd
}

/// Parses `fanout_publish`'s reply `{id, receivers}`; receivers is -1 for a repeat
/// (nothing published again; `id` is the first publish's, when known).
pub fn parse_publish(reply: redis::Value) -> Result<PublishOutcome, BrokerError> {
    let redis::Value::Array(parts) = reply else {
        return Err(BrokerError::Protocol("fanout_publish: not an array".into()));
    };
    let id = parts.first().and_then(text).filter(|id| !id.is_empty()).map(str::to_owned);
    let receivers = match parts.get(1) {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    };
    Ok(PublishOutcome { id, subscribed: receivers > 0, duplicate: receivers < 0 })
}

/// One reply of a pipeline sent with `ignore_errors` to `fanout_publish`: its outcome,
/// or the error Redis answered for that call alone.
pub fn parse_publish_reply(reply: redis::Value) -> Result<PublishOutcome, BrokerError> {
    match reply {
        redis::Value::ServerError(e) => Err(BrokerError::Redis(e.into())),
        reply => parse_publish(reply),
    }
}

/// Whether a pipeline reply says the `fanout` library is not loaded.
pub fn is_missing_function_reply(reply: &redis::Value) -> bool {
    matches!(reply, redis::Value::ServerError(e) if e.details().is_some_and(|d| d.contains("Function not found")))
}

/// `FCALL_RO fanout_since 1 fanout:history:{<channel>} <from> <count> <max-bytes>`: one
/// page.
pub fn since_cmd(channel: &str, from: StreamPos, page: Page) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL_RO");
    cmd.arg("fanout_since").arg(1).arg(history_key(channel)).arg(from.to_string());
    cmd.arg(page.max_count).arg(page.max_bytes);
    cmd
}

/// `FCALL_RO fanout_head 1 fanout:history:{<channel>}`.
pub fn head_cmd(channel: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL_RO");
    cmd.arg("fanout_head").arg(1).arg(history_key(channel));
    cmd
}

/// `FCALL fanout_occupancy_report 1 fanout:occupancy:{<channel>} <node> <count> <ttl-ms>`.
pub fn occupancy_report_cmd(channel: &str, node: u64, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("fanout_occupancy_report").arg(1).arg(format!("fanout:occupancy:{{{channel}}}"));
    cmd.arg(format!("{node:x}")).arg(count).arg(crate::broker::OCCUPANCY_TTL.as_millis() as u64);
    cmd
}

/// `FCALL_RO fanout_occupancy 1 fanout:occupancy:{<channel>} <node-to-skip>`.
pub fn occupancy_cmd(channel: &str, skip_node: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL_RO");
    cmd.arg("fanout_occupancy")
        .arg(1)
        .arg(format!("fanout:occupancy:{{{channel}}}"))
        .arg(format!("{skip_node:x}"));
    cmd
}

/// Parses `fanout_occupancy`'s reply `{subscribers, nodes}`.
pub fn parse_occupancy(reply: &redis::Value) -> Result<crate::broker::Occupancy, BrokerError> {
    match reply {
        redis::Value::Array(v) => match &v[..] {
            [redis::Value::Int(s), redis::Value::Int(n)] => {
                Ok(crate::broker::Occupancy { subscribers: (*s).max(0) as u64, nodes: (*n).max(0) as u64 })
            }
            _ => Err(BrokerError::Protocol("fanout_occupancy: wrong shape".into())),
        },
        _ => Err(BrokerError::Protocol("fanout_occupancy: not an array".into())),
    }
}

/// Parses `fanout_head`'s reply: the newest position, if any.
pub fn parse_head(reply: &redis::Value) -> Option<StreamPos> {
    text(reply).and_then(|s| s.parse().ok())
}

fn bulk(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &redis::Value) -> Option<&str> {
    bulk(v).and_then(|b| std::str::from_utf8(b).ok())
}

/// Parses `fanout_since`'s reply `{status, entries, last}`.
pub fn parse_since(v: redis::Value) -> Result<Recovery, BrokerError> {
    let bad = |what: &str| BrokerError::Protocol(format!("fanout_since: {what}"));
    let redis::Value::Array(parts) = v else { return Err(bad("not an array")) };
    let [status, entries, last] = &parts[..] else { return Err(bad("wrong length")) };
    let redis::Value::Array(entries) = entries else { return Err(bad("entries not an array")) };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let redis::Value::Array(pair) = e else { return Err(bad("entry not an array")) };
        let [id, fields] = &pair[..] else { return Err(bad("entry shape")) };
        let pos: StreamPos = text(id).and_then(|s| s.parse().ok()).ok_or_else(|| bad("entry id"))?;
        let redis::Value::Array(fields) = fields else { return Err(bad("entry fields")) };
        let (mut data, mut event, mut key) = (Bytes::new(), None, None);
        for kv in fields.chunks(2) {
            match (kv.first().and_then(text), kv.get(1).and_then(bulk)) {
                (Some("d"), Some(v)) => data = Bytes::copy_from_slice(v),
                (Some("e"), Some(v)) => event = Some(String::from_utf8_lossy(v).into_owned()),
                (Some("k"), Some(v)) => key = Some(String::from_utf8_lossy(v).into_owned()),
                _ => {}
            }
        }
        out.push(HistoryEntry { pos, event, data, key });
    }
    let last: StreamPos = text(last).and_then(|s| s.parse().ok()).ok_or_else(|| bad("last id"))?;
    let head = (last != StreamPos::ZERO).then_some(last);
    match text(status) {
        Some("ok") => Ok(Recovery::Covered(out)),
        Some("trimmed" | "reset") => Ok(Recovery::Gap { entries: out, head }),
        _ => Err(bad("unknown status")),
    }
}
