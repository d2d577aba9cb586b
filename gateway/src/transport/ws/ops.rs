//! The client's ops on a WebSocket session: `subscribe` (with `since` to resume),
//! `unsubscribe`, `publish` (where allowed, through the one publish path) and `ping`,
//! each answered with a frame, in the order the ops came; a refused op gets an `error`
//! frame and never closes the connection.
//!
//! Publishes are pipelined: the session reads on while up to
//! [`super::publishes::MAX_PUBLISHES_IN_FLIGHT`]
//! wait for the broker (queued in op order, so they are published in that order), and
//! their answers go out as they complete, in order. Any other op waits for the
//! publishes before it to be answered first.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use shared::{
    Resume, StreamPos,
    protocol::{CLIENT_OPS, ClientOp, ServerFrame, Since, error_code as code},
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    reply::{End, error},
    session::Session,
};
use crate::{
    error::{ApiError, quote},
    publish::message,
    transport::{check_channels, parse_resume},
};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn handle_op(&mut self, text: &str) -> Result<(), End> {
        let op = match serde_json::from_str::<ClientOp>(text) {
            Ok(op) => op,
            Err(err) => {
                self.answer_publishes().await?;
                return self.send(&op_error(text, &err)).await;
            }
        };
        if let ClientOp::Publish { channel, data, event } = op {
            let answer = self.publish(channel, data, event);
            self.publishes.get_or_insert_default().push(answer);
            return Ok(());
        }
        self.answer_publishes().await?;
        match op {
            ClientOp::Subscribe { channels, since } => self.subscribe(channels, since).await,
            ClientOp::Unsubscribe { channels } => {
                self.subs.retain(|s| !channels.iter().any(|c| **c == **s.channel()));
                self.send(&ServerFrame::Unsubscribed { channels }).await
            }
            ClientOp::Publish { .. } => unreachable!("queued above"),
            ClientOp::Ping { id } => self.send(&ServerFrame::Pong { id }).await,
        }
    }

    pub(super) async fn subscribe(&mut self, channels: Vec<String>, since: Option<Since>) -> Result<(), End> {
        let limits = &self.state.config.limits;
        let channels = match check_channels(channels, limits, true) {
            Ok(c) => c,
            Err(e) => return self.send(&error(e.code, &e.message)).await,
        };
        if let Err(e) = crate::auth::check_channels(self.claims.as_deref(), &channels) {
            return self.send(&error(e.code, &e.message)).await;
        }
        let resume: Vec<(String, StreamPos)> = match since_positions(&channels, since) {
            Ok(r) => r,
            Err(e) => return self.send(&error(e.code, &e.message)).await,
        };
        // Twice a connection's channels a minute: enough to resume after any hiccup.
        let max_resumes = limits.max_channels_per_connection * 2;
        if !resume.is_empty() && !self.resumes.take(resume.len(), max_resumes) {
            metrics::counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "resumes").increment(1);
            let message = format!(
                "more than {max_resumes} resumes (\"since\") on this connection within {} s; reconnect to resume",
                crate::transport::ResumeBudget::WINDOW.as_secs()
            );
            return self.send(&error(code::RATE_LIMITED, &message)).await;
        }
        let new: Vec<&String> =
            channels.iter().filter(|c| !self.subs.iter().any(|s| **s.channel() == ***c)).collect();
        let total = self.subs.len() + new.len();
        if total > limits.max_channels_per_connection {
            let e = ApiError::too_many_channels(total, limits.max_channels_per_connection);
            return self.send(&error(e.code, &e.message)).await;
        }
        let hub = self.state.hub.clone();
        let first_new = self.subs.len();
        self.subs.reserve_exact(new.len());
        for ch in new {
            self.subs.push(hub.subscribe(ch, &self.inbox));
        }
        let added = &self.subs[first_new..];
        if !self.unsent.is_empty() && (!resume.is_empty() || !hub.is_ready(added)) {
            self.write(&mut []).await?; // the head need not wait for the broker
        }
        hub.wait_ready(&self.subs[first_new..]).await;
        // Replay after the live subscription is ready, so nothing falls in between;
        // live messages that overlap the replay are dropped by `positions`.
        // The first pages share one page's budget; the rest follow a page at a time, so
        // a replay holds no more than a queue's worth whatever the gap.
        let mut replays = Vec::with_capacity(resume.len());
        let shares = resume.len();
        for (ch, from) in resume {
            let Some(name) = self.subs.iter().find(|s| **s.channel() == *ch).map(|s| s.channel().clone())
            else {
                continue;
            };
            let replay = hub.replay(&name, from, shares).await;
            self.positions.place(&name, replay.position);
            replays.push((name, replay));
        }
        let recovered = !replays.is_empty() && replays.iter().all(|(_, r)| r.recovered());
        self.send(&ServerFrame::Subscribed { channels, recovered }).await?;
        for (name, mut replay) in replays {
            loop {
                if !replay.recovered() {
                    metrics::counter!(crate::metrics::RESETS_TOTAL, "transport" => "ws").increment(1);
                }
                let next = replay.more.then(|| replay.messages.last().and_then(|d| d.pos)).flatten();
                let page: Vec<_> = replay.into_deliveries().filter(|d| self.positions.accept(d)).collect();
                let mut bufs: Vec<&[u8]> = page.iter().map(|d| &d.ws_frame()[..]).collect();
                self.write(&mut bufs).await?;
                let Some(from) = next else { break };
                replay = hub.replay_more(&name, from).await;
                self.positions.place(&name, replay.position);
            }
        }
        Ok(())
    }

    /// Publishes for the client through the one publish path: the `published` frame
    /// with the id, or the error frame refusing it. With auth on, the token must allow
    /// publishing (`"pub": true`) and the channel (its `channels` claim, as for reading).
    /// The message is queued now; the answer comes when the broker has taken it.
    fn publish(
        &mut self,
        channel: String,
        data: String,
        event: Option<String>,
    ) -> BoxFuture<'static, ServerFrame> {
        let refused =
            |frame: ServerFrame| -> BoxFuture<'static, ServerFrame> { Box::pin(std::future::ready(frame)) };
        if !self.state.config.ws_publish {
            return refused(error(code::FORBIDDEN, "publishing over WebSocket is disabled on this server"));
        }
        if self.claims.as_ref().is_some_and(|c| !c.publish) {
            return refused(error(
                code::FORBIDDEN,
                "the token does not allow publishing (claim \"pub\": true)",
            ));
        }
        if let Err(e) = crate::auth::check_channels(self.claims.as_deref(), std::slice::from_ref(&channel)) {
            return refused(error(e.code, &e.message));
        }
        let publishing = &self.state.publishing;
        if let Err(e) = publishing.check(&channel, event.as_deref(), data.as_bytes(), None) {
            return refused(error(e.code, &e.message));
        }
        let outcome = publishing.publish(&self.state.hub, message(channel, Bytes::from(data), event, None));
        Box::pin(async move {
            match outcome.await {
                Ok(r) => ServerFrame::Published { channel: r.channel, id: r.id },
                Err(e) => error(e.code, &e.message),
            }
        })
    }

    /// Waits for every publish in flight and writes its answer.
    pub(super) async fn answer_publishes(&mut self) -> Result<(), End> {
        while let Some(p) = self.publishes.as_deref_mut()
            && !p.is_empty()
        {
            let frames = std::future::poll_fn(|cx| p.poll_answered(cx)).await;
            self.send_all(&frames).await?;
        }
        Ok(())
    }
}

/// The resume position per channel from a `subscribe` op's `since`.
fn since_positions(channels: &[String], since: Option<Since>) -> Result<Vec<(String, StreamPos)>, ApiError> {
    match since {
        None => Ok(Vec::new()),
        Some(Since::One(s)) => {
            let resume = parse_resume(&s)?;
            Ok(channels.iter().filter_map(|c| resume.for_channel(c).map(|p| (c.clone(), p))).collect())
        }
        Some(Since::PerChannel(map)) => map
            .into_iter()
            .filter(|(c, _)| channels.contains(c))
            .map(|(c, s)| match parse_resume(&s)? {
                Resume::One(p) => Ok((c, p)),
                Resume::PerChannel(_) => {
                    Err(ApiError::bad_request("a per-channel \"since\" value must be one id"))
                }
            })
            .collect(),
    }
}

/// Explains why a text frame is not a valid op.
fn op_error(text: &str, err: &serde_json::Error) -> ServerFrame {
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    match value.as_ref().and_then(|v| v.get("op")).map(|op| op.as_str()) {
        None => error(code::BAD_REQUEST, "expected a JSON object with an \"op\" field"),
        Some(Some(op)) if !CLIENT_OPS.contains(&op) => error(
            code::UNKNOWN_OP,
            &format!("unknown op {}; expected one of {}", quote(op), CLIENT_OPS.join(", ")),
        ),
        Some(None) => error(code::BAD_REQUEST, "\"op\" must be a string"),
        Some(Some(_)) => error(code::BAD_REQUEST, &format!("malformed op: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_errors_tell_unknown_from_malformed() {
        let e = |t: &str| match op_error(t, &serde_json::from_str::<ClientOp>(t).unwrap_err()) {
            ServerFrame::Error { code, .. } => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(e("not json"), code::BAD_REQUEST);
        assert_eq!(e(r#"{"op":"dance"}"#), code::UNKNOWN_OP);
        assert_eq!(e(r#"{"op":"subscribe"}"#), code::BAD_REQUEST);
        assert_eq!(e(r#"{"op":5}"#), code::BAD_REQUEST);
        assert_eq!(e("[]"), code::BAD_REQUEST);
    }
}
