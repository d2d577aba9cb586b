//! One subscriber link to one Redis Cluster master: a RESP3 `MultiplexedConnection`
//! whose pushes (messages, subscription confirmations, the `sunsubscribe` a master
//! sends when a slot leaves it, disconnections) go, tagged with the link's id, into the
//! subscriber's one queue — redis-rs's `ClusterConnection` would drop which node a push
//! came from and mishandles server-side unsubscribes (see `docs` in the module above).
//!
//! Only control commands travel on a link, one request at a time: a batch of
//! single-channel `SSUBSCRIBE`/`SUNSUBSCRIBE` commands (pipelined) or a `PING` probe.
//! A push that answers no request of ours can still complete the request in flight
//! (redis-rs matches replies to requests in order), so every reply is checked against
//! what was asked; a mismatch poisons the link and it is rebuilt.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, future::BoxFuture};
use redis::{PushKind, Value};
use tokio::sync::mpsc;

use super::COMMAND_TIMEOUT;
use crate::broker::redis::script;

/// Names one link for as long as the process lives (a reconnect gets a new one), so
/// pushes of a replaced connection are told apart from the current one's.
pub(super) type LinkId = u64;

/// A push and the link it came from.
pub(super) type Tagged = (LinkId, redis::PushInfo);

/// Opens a link to the master at `url` (`redis://[user:pass@]host:port`), loads the
/// `fanout` library there (a master that just took over may lack it) and returns the
/// connection. Its pushes go to `pushes` tagged with `id`.
pub(super) fn connect(
    id: LinkId,
    url: String,
    library: Arc<str>,
    pushes: mpsc::UnboundedSender<Tagged>,
) -> BoxFuture<'static, redis::RedisResult<redis::aio::MultiplexedConnection>> {
    async move {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_push_sender(move |p: redis::PushInfo| pushes.send((id, p)));
        // Pushes (and so the push sender) need RESP3.
        let client = redis::Client::open(format!("{url}/?protocol=resp3"))?;
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        if let Err(e) = script::load_library(&mut conn, &library).await {
            tracing::warn!(error = %e, %url, "cannot load the fanout function library on a cluster master");
        }
        Ok(conn)
    }
    .boxed()
}

/// What one batch asked for.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// Channels to unsubscribe, sent first.
    pub unsubs: Vec<Arc<str>>,
    /// Channels to subscribe, sent after.
    pub subs: Vec<Arc<str>>,
}

/// How Redis took one channel of a batch's `SSUBSCRIBE`s.
#[derive(Debug)]
pub(super) enum SubReply {
    /// Confirmed (the confirmation push makes it live).
    Ok,
    /// Refused with `MOVED <slot> <addr>`: the slot lives elsewhere.
    Moved(u16, String),
    /// Refused otherwise (cluster down, a slot in migration...): try again later.
    Refused(String),
}

/// Sends `batch` as one pipeline of single-channel commands and checks every reply.
/// `Err` means the link is broken or poisoned.
pub(super) async fn send_batch(
    mut conn: redis::aio::MultiplexedConnection,
    batch: &Batch,
) -> Result<Vec<SubReply>, String> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for ch in &batch.unsubs {
        pipe.cmd("SUNSUBSCRIBE").arg(&**ch);
    }
    for ch in &batch.subs {
        pipe.cmd("SSUBSCRIBE").arg(&**ch);
    }
    let replies: Vec<Value> = match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut conn)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("subscribe timed out".into()),
    };
    if replies.len() != batch.unsubs.len() + batch.subs.len() {
        return Err(format!(
            "{} replies to {} commands",
            replies.len(),
            batch.unsubs.len() + batch.subs.len()
        ));
    }
    let (unsub_replies, sub_replies) = replies.split_at(batch.unsubs.len());
    for (ch, reply) in batch.unsubs.iter().zip(unsub_replies) {
        if !confirms(reply, PushKind::SUnsubscribe, ch) {
            return Err(format!("unexpected reply to SUNSUBSCRIBE {ch}: {reply:?}"));
        }
    }
    let mut out = Vec::with_capacity(batch.subs.len());
    for (ch, reply) in batch.subs.iter().zip(sub_replies) {
        out.push(match reply {
            r if confirms(r, PushKind::SSubscribe, ch) => SubReply::Ok,
            Value::ServerError(e) => match (e.code(), e.details().and_then(parse_moved)) {
                ("MOVED", Some((slot, addr))) => SubReply::Moved(slot, addr),
                _ => SubReply::Refused(format!("{e:?}")),
            },
            other => return Err(format!("unexpected reply to SSUBSCRIBE {ch}: {other:?}")),
        });
    }
    Ok(out)
}

/// Whether `reply` is the confirmation push of `kind` for `channel`.
fn confirms(reply: &Value, kind: PushKind, channel: &str) -> bool {
    match reply {
        Value::Push { kind: k, data } if *k == kind => {
            matches!(data.first(), Some(Value::BulkString(b)) if b == channel.as_bytes())
        }
        _ => false,
    }
}

/// `<slot> <host:port>` of a `MOVED` error's details.
fn parse_moved(details: &str) -> Option<(u16, String)> {
    let (slot, addr) = details.trim().split_once(' ')?;
    Some((slot.parse().ok()?, addr.trim().to_owned()))
}

/// A `PING` on the link; `Err` when it failed or was answered by anything but `PONG`.
pub(super) async fn probe(
    mut conn: redis::aio::MultiplexedConnection,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, redis::cmd("PING").query_async::<Value>(&mut conn)).await {
        Ok(Ok(Value::SimpleString(s))) if s == "PONG" => Ok(()),
        Ok(Ok(other)) => Err(format!("unexpected reply to PING: {other:?}")),
        Ok(Err(e)) => Err(format!("health probe failed: {e}")),
        Err(_) => Err("health probe timed out: link wedged".into()),
    }
}

/// The channel a push is about, and its payload for messages.
pub(super) fn push_channel(data: &[Value]) -> Option<&[u8]> {
    match data.first() {
        Some(Value::BulkString(b)) => Some(b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_details() {
        assert_eq!(parse_moved("3999 127.0.0.1:6381"), Some((3999, "127.0.0.1:6381".into())));
        assert_eq!(parse_moved("x 127.0.0.1:6381"), None);
    }

    #[test]
    fn confirmations_name_their_channel() {
        let push = Value::Push {
            kind: PushKind::SSubscribe,
            data: vec![Value::BulkString(b"a".to_vec()), Value::Int(1)],
        };
        assert!(confirms(&push, PushKind::SSubscribe, "a"));
        assert!(!confirms(&push, PushKind::SSubscribe, "b"));
        assert!(!confirms(&push, PushKind::SUnsubscribe, "a"));
        assert!(!confirms(&Value::SimpleString("PONG".into()), PushKind::SSubscribe, "a"));
    }
}
