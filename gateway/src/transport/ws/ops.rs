//! The client's ops on a WebSocket session: `subscribe` (with `since` to resume),
//! `unsubscribe`, `publish` (where allowed, through the one publish path) and `ping`,
//! each answered with a frame; a refused op gets an `error` frame and never closes the
//! connection.

use bytes::Bytes;
use shared::{
    Resume, StreamPos,
    protocol::{CLIENT_OPS, ClientOp, ServerFrame, Since, error_code as code},
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    reply::error,
    session::{End, Session},
};
use crate::{
    error::{ApiError, quote},
    hub::Replay,
    publish::message,
    transport::{check_channels, parse_resume},
};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn handle_op(&mut self, text: &str) -> Result<(), End> {
        let op = match serde_json::from_str::<ClientOp>(text) {
            Ok(op) => op,
            Err(err) => return self.send(&op_error(text, &err)).await,
        };
        match op {
            ClientOp::Subscribe { channels, since } => self.subscribe(channels, since).await,
            ClientOp::Unsubscribe { channels } => {
                self.subs.retain(|s| !channels.iter().any(|c| **c == **s.channel()));
                self.send(&ServerFrame::Unsubscribed { channels }).await
            }
            ClientOp::Publish { channel, data, event } => {
                let frame = self.publish(channel, data, event).await;
                self.send(&frame).await
            }
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
        let mut replays = Vec::with_capacity(resume.len());
        for (ch, from) in resume {
            let Some(name) = self.subs.iter().find(|s| **s.channel() == *ch).map(|s| s.channel().clone())
            else {
                continue;
            };
            let replay = hub.replay(&name, from).await;
            self.positions.place(&name, replay.position);
            replays.push(replay);
        }
        let recovered = !replays.is_empty() && replays.iter().all(Replay::recovered);
        self.send(&ServerFrame::Subscribed { channels, recovered }).await?;
        let mut out = Vec::new();
        for r in replays {
            if !r.recovered() {
                metrics::counter!(crate::metrics::RESETS_TOTAL, "transport" => "ws").increment(1);
            }
            out.extend(r.into_deliveries().filter(|d| self.positions.accept(d)));
        }
        let mut bufs: Vec<&[u8]> = out.iter().map(|d| &d.ws_frame()[..]).collect();
        self.write(&mut bufs).await
    }

    /// Publishes for the client through the one publish path: the `published` frame
    /// with the id, or the error frame refusing it.
    async fn publish(&mut self, channel: String, data: String, event: Option<String>) -> ServerFrame {
        if !self.state.config.ws_publish {
            return error(code::FORBIDDEN, "publishing over WebSocket is disabled on this server");
        }
        if self.claims.as_ref().is_some_and(|c| !c.publish) {
            return error(code::FORBIDDEN, "the token does not allow publishing (claim \"pub\": true)");
        }
        let publishing = &self.state.publishing;
        if let Err(e) = publishing.check(&channel, event.as_deref(), data.as_bytes(), None) {
            return error(e.code, &e.message);
        }
        match publishing.publish(&self.state.hub, message(channel, Bytes::from(data), event, None)).await {
            Ok(r) => ServerFrame::Published { channel: r.channel, id: r.id },
            Err(e) => error(e.code, &e.message),
        }
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
