//! One WebSocket connection's session: a single task that waits for the client's
//! frames, its inbox, pings, the token's expiry and the drain, writes each delivery's
//! shared frame as is, and says goodbye with the right close code. It holds no read or
//! write buffer while idle. The client's ops are handled in [`super::ops`].

use std::{future::Future, sync::Arc, task::Poll, time::Duration};

use shared::protocol::{ServerFrame, error_code as code};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    publishes::Publishes,
    read::poll_client,
    reply::{End, TOKEN_EXPIRED, error},
};
use crate::{
    auth::Claims,
    hub::{Delivery, Inbox, InboxRx, Subscription},
    metrics::ConnKind,
    server::{
        io::{is_stall, write_all_bufs_within, write_now},
        signal::Quiet,
    },
    state::AppState,
    transport::{ConnGuard, DrainTurn, Positions, drain_turn},
    wire::ws_frame::{self, Decoder, Incoming, opcode},
};

/// Most frames written in one batch (one `writev`).
const MAX_BATCH: usize = 64;
/// How long a closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Deliveries are checked for before the other signals; every this many turns the
/// signals come first, so a flood of messages cannot hide a drain.
const SIGNALS_EVERY: u32 = 16;

/// What woke the session.
enum Event {
    Delivery(Option<Arc<Delivery>>),
    /// Publish ops answered by the broker, in order.
    Published(Vec<ServerFrame>),
    Client(Result<Incoming, End>),
    Timer,
    Shutdown,
}

/// One WebSocket connection: its socket, subscriptions and timers.
pub struct Session<S> {
    pub(super) io: S,
    pub(super) decoder: Decoder,
    pub(super) state: AppState,
    pub(super) inbox: Arc<Inbox>,
    pub(super) rx: InboxRx,
    pub(super) subs: Vec<Subscription>,
    pub(super) positions: Positions,
    pub(super) guard: ConnGuard,
    /// The subscriber's token claims when auth is on.
    pub(super) claims: Option<Box<Claims>>,
    /// This connection's turn to be told to reconnect when the node drains (polled
    /// only after it fired: it is checked on every wake-up).
    pub(super) shutdown: Quiet<DrainTurn>,
    /// Bytes that go out before anything else: the `101` head until the first frame
    /// (one write for both), or the rest of frames whose write was cut short (kick or
    /// drain), so the client still sees whole frames before the closing ones.
    pub(super) unsent: Vec<u8>,
    /// Channel resumes (`since`) this connection made in the current minute.
    pub(super) resumes: crate::transport::ResumeBudget,
    /// Publish ops waiting for the broker (boxed: most connections never publish).
    pub(super) publishes: Option<Box<Publishes>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A session on `io` with an empty subscription set; `leftover` is what the client
    /// sent after its upgrade request, `head` the `101` response head still to write
    /// (empty if it is out). `close` is cancelled when the hub closes the connection.
    pub fn new(
        state: AppState,
        claims: Option<Claims>,
        close: CancellationToken,
        io: S,
        leftover: &[u8],
        head: Vec<u8>,
    ) -> Self {
        let limits = &state.config.limits;
        let (inbox, rx) = Inbox::new(ConnKind::Ws, limits, close);
        let mut decoder = Decoder::new(limits.max_payload_bytes + 4096);
        decoder.feed(leftover);
        let shutdown = Quiet::new(drain_turn(state.shutdown.clone(), state.config.timers.drain_window));
        Self {
            io,
            decoder,
            inbox,
            rx,
            subs: Vec::new(),
            positions: Positions::default(),
            guard: ConnGuard::new(ConnKind::Ws),
            claims: claims.map(Box::new),
            shutdown,
            unsent: head,
            resumes: crate::transport::ResumeBudget::new(),
            publishes: None,
            state,
        }
    }

    /// Subscribes `initial`, then runs the session until it ends.
    // Not an `async fn`: that would store the session twice in its future (once as the
    // argument, once as the local), and this future lives as long as the connection.
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self, initial: Vec<String>) -> impl Future<Output = ()> + Send {
        async move {
            let first = if initial.is_empty() {
                self.write(&mut []).await // just the head
            } else {
                Box::pin(self.subscribe(initial, None)).await
            };
            if let Err(end) = first {
                return Box::pin(self.finish(end)).await;
            }
            let ping_every = self.state.config.timers.ws_ping;
            let expires = self.claims.as_ref().map(|c| c.expires_at(Instant::now()));
            let mut next_ping = Instant::now() + ping_every;
            let mut last_seen = Instant::now();
            // One timer for pings and the token's expiry.
            let timer = tokio::time::sleep_until(expires.map_or(next_ping, |e| e.min(next_ping)));
            tokio::pin!(timer);
            let mut turns = 0u32;
            let end = loop {
                // An atomic load: a kicked session stops without touching its token.
                if self.inbox.kicked().is_some() {
                    break End::Slow;
                }
                turns = turns.wrapping_add(1);
                let signals_first = turns.is_multiple_of(SIGNALS_EVERY);
                let (rx, io, decoder, shutdown, publishes) =
                    (&mut self.rx, &mut self.io, &mut self.decoder, &mut self.shutdown, &mut self.publishes);
                let event = std::future::poll_fn(|cx| {
                    if signals_first && shutdown.poll(cx).is_ready() {
                        return Poll::Ready(Event::Shutdown);
                    }
                    if let Poll::Ready(d) = rx.poll_recv(cx) {
                        return Poll::Ready(Event::Delivery(d));
                    }
                    if !signals_first && shutdown.poll(cx).is_ready() {
                        return Poll::Ready(Event::Shutdown);
                    }
                    if let Some(p) = publishes.as_deref_mut()
                        && let Poll::Ready(frames) = p.poll_answered(cx)
                    {
                        return Poll::Ready(Event::Published(frames));
                    }
                    // With too many publishes in flight the client waits: its socket
                    // is not read until answers go out.
                    if publishes.as_deref().is_none_or(Publishes::has_room)
                        && let Poll::Ready(r) = poll_client(io, decoder, cx)
                    {
                        return Poll::Ready(Event::Client(r));
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Timer);
                    }
                    Poll::Pending
                })
                .await;
                let result = match event {
                    Event::Shutdown => Err(End::Shutdown),
                    Event::Delivery(None) => Err(End::Internal),
                    Event::Delivery(Some(d)) => self.write_batch(d).await,
                    Event::Published(frames) => Box::pin(self.send_all(&frames)).await,
                    Event::Client(Err(end)) => Err(end),
                    Event::Client(Ok(msg)) => {
                        last_seen = Instant::now();
                        match msg {
                            Incoming::Text(text) => Box::pin(self.handle_op(&text)).await,
                            Incoming::Binary(_) => {
                                let f = error(
                                    code::BAD_REQUEST,
                                    "binary frames are not supported; send JSON text frames",
                                );
                                Box::pin(async {
                                    self.answer_publishes().await?;
                                    self.send(&f).await
                                })
                                .await
                            }
                            Incoming::Ping(payload) => {
                                Box::pin(self.write_frame(opcode::PONG, &payload)).await
                            }
                            Incoming::Pong => Ok(()),
                            Incoming::Close(code) => Err(End::ClientClosed(code)),
                        }
                    }
                    Event::Timer => {
                        let now = Instant::now();
                        if expires.is_some_and(|e| now >= e) {
                            Err(End::Expired)
                        } else if now >= next_ping && last_seen.elapsed() > ping_every * 2 {
                            Err(End::Timeout)
                        } else {
                            let result = if now >= next_ping {
                                Box::pin(self.write_frame(opcode::PING, &[])).await
                            } else {
                                Ok(())
                            };
                            if now >= next_ping {
                                next_ping = now + ping_every;
                            }
                            timer.as_mut().reset(expires.map_or(next_ping, |e| e.min(next_ping)));
                            result
                        }
                    }
                };
                if let Err(end) = result {
                    break end;
                }
            };
            Box::pin(self.finish(end)).await;
        }
    }

    /// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]) in one go; each
    /// message's frame is the shared encoding, written without a copy.
    async fn write_batch(&mut self, first: Arc<Delivery>) -> Result<(), End> {
        let Some(second) = self.rx.try_recv() else {
            if !self.positions.accept(&first) {
                return Ok(());
            }
            return self.write(&mut [first.ws_frame()]).await;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH.min(16));
        batch.push(first);
        batch.push(second);
        while batch.len() < MAX_BATCH {
            let Some(d) = self.rx.try_recv() else { break };
            batch.push(d);
        }
        batch.retain(|d| self.positions.accept(d));
        let mut bufs: Vec<&[u8]> = batch.iter().map(|d| &d.ws_frame()[..]).collect();
        self.write(&mut bufs).await
    }

    /// Writes `bufs`. A client that stops reading blocks the write; its inbox then
    /// overflows and the hub closes it, or the write stalls for a ping interval, either
    /// of which ends the wait (as does the drain).
    pub(super) async fn write(&mut self, bufs: &mut [&[u8]]) -> Result<(), End> {
        if !self.unsent.is_empty() {
            let first = std::mem::take(&mut self.unsent);
            let mut all: Vec<&[u8]> = std::iter::once(&first[..]).chain(bufs.iter().copied()).collect();
            return Box::pin(self.write_out(&mut all)).await;
        }
        self.write_out(bufs).await
    }

    async fn write_out(&mut self, bufs: &mut [&[u8]]) -> Result<(), End> {
        // Most writes finish at once; only one that has to wait watches the signals, in
        // a boxed future, so the session's state stays small.
        match write_now(&mut self.io, bufs).await {
            Poll::Ready(r) => r.map_err(|_| End::ClientGone),
            Poll::Pending => Box::pin(self.write_slow(bufs)).await,
        }
    }

    /// The rest of a write that has to wait: until done, a kick, the drain, or a stall
    /// (no byte taken for a ping interval: the client stopped reading, and while this
    /// waits no ping timeout is checked).
    async fn write_slow(&mut self, bufs: &mut [&[u8]]) -> Result<(), End> {
        let stall = self.state.config.timers.ws_ping;
        let Self { io, inbox, shutdown, unsent, .. } = self;
        let end = tokio::select! {
            biased;
            r = write_all_bufs_within(io, bufs, stall) => match r {
                Ok(()) => return Ok(()),
                Err(e) if is_stall(&e) => End::Stalled,
                Err(_) => return Err(End::ClientGone),
            },
            _ = inbox.closed().cancelled() => End::Slow,
            _ = std::future::poll_fn(|cx| shutdown.poll(cx)) => End::Shutdown,
        };
        // `bufs` was advanced past what went out.
        for b in bufs.iter() {
            unsent.extend_from_slice(b);
        }
        Err(end)
    }

    /// Writes one frame.
    async fn write_frame(&mut self, op: u8, payload: &[u8]) -> Result<(), End> {
        let mut header = [0u8; ws_frame::MAX_HEADER];
        let n = ws_frame::encode_header(op, payload.len(), &mut header);
        self.write(&mut [&header[..n], payload]).await
    }

    /// Sends a JSON frame.
    pub(super) async fn send(&mut self, frame: &ServerFrame) -> Result<(), End> {
        let text = serde_json::to_vec(frame).expect("frames serialize");
        self.write_frame(opcode::TEXT, &text).await
    }

    /// Sends JSON frames in one write.
    pub(super) async fn send_all(&mut self, frames: &[ServerFrame]) -> Result<(), End> {
        let mut out = Vec::new();
        for frame in frames {
            out.extend(ws_frame::encode(opcode::TEXT, &serde_json::to_vec(frame).expect("frames serialize")));
        }
        self.write(&mut [&out]).await
    }

    async fn finish(mut self, end: End) {
        let (reason, close): (&'static str, Option<(u16, &'static str)>) = match end {
            // The decoder passes only codes a client may send (never 1005, 1006 or
            // 1015), so echoing one is valid on the wire.
            End::ClientClosed(code) => ("client_closed", code.map(|c| (c, ""))),
            End::ClientGone => ("client_closed", None),
            End::Slow | End::Stalled => ("slow_consumer", Some((1008, "slow consumer"))),
            End::Shutdown => ("shutdown", Some((1012, "server restarting, reconnect"))),
            End::Timeout => ("timeout", Some((1001, "ping timeout"))),
            End::Expired => ("token_expired", Some((TOKEN_EXPIRED, "token expired"))),
            End::TooBig => ("protocol_error", Some((1009, "message too big"))),
            End::Protocol => ("protocol_error", Some((1002, "protocol error"))),
            End::InvalidData => ("protocol_error", Some((1007, "invalid UTF-8"))),
            End::Internal => ("server_closed", Some((1011, "internal error"))),
        };
        self.guard.set_reason(reason);
        self.subs.clear();
        if end == End::ClientGone {
            return;
        }
        let mut out = std::mem::take(&mut self.unsent);
        if end == End::Stalled {
            // Counted here: the hub counts the slow consumers it closes itself.
            metrics::counter!(crate::metrics::SLOW_CONSUMER_TOTAL, "transport" => "ws").increment(1);
            metrics::counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "write_stall").increment(1);
        }
        if matches!(end, End::Slow | End::Stalled) {
            let f = error(code::SLOW_CONSUMER, "the connection fell too far behind and is closed; reconnect");
            out.extend(ws_frame::encode(opcode::TEXT, &serde_json::to_vec(&f).expect("frames serialize")));
        }
        match (end, close) {
            // A close frame without a code is answered the same way.
            (End::ClientClosed(None), _) => out.extend(ws_frame::encode(opcode::CLOSE, &[])),
            (_, Some((code, why))) => out.extend(ws_frame::close(code, why)),
            _ => {}
        }
        let io = &mut self.io;
        if end == End::Stalled {
            // The client reads nothing: the goodbye goes out only if the socket takes it
            // now, and the connection is dropped without waiting for a handshake.
            let _ = write_now(io, &mut [&out]).await;
            return;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            io.write_all(&out).await?;
            io.shutdown().await?;
            // Read until the client closes too (its close frame, then EOF), so the
            // socket is not reset with our frames still unread.
            let mut sink = [0u8; 512];
            while io.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn state() -> AppState {
        let config = crate::config::Config::default();
        let hub = crate::hub::Hub::in_memory(
            crate::hub::HubConfig { linger: Duration::ZERO, ..crate::hub::HubConfig::new(&config) },
            config.history.clone(),
        );
        AppState::new(config, hub, None, CancellationToken::new())
    }

    /// A masked client frame.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        assert!(payload.len() < 126);
        let mut out = vec![b0, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Reads one short server frame: `(opcode, payload)`.
    async fn server_frame(io: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.unwrap();
        let len = match head[1] {
            126 => {
                let mut l = [0u8; 2];
                io.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    }

    #[tokio::test]
    async fn a_session_speaks_the_protocol_over_any_stream() {
        let state = state();
        let hub = state.hub.clone();
        let (server, mut client) = tokio::io::duplex(4096);
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let session = Session::new(state, None, CancellationToken::new(), server, &[], head.to_vec());
        let run = session.run(vec!["news".into()]);
        // The session lives as long as its connection: its future is idle memory.
        assert!(std::mem::size_of_val(&run) <= 1280, "session future: {}", std::mem::size_of_val(&run));
        let task = tokio::spawn(run);
        let mut got = [0u8; 36];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, head, "the 101 head comes first, then the frames");
        let (op, payload) = server_frame(&mut client).await;
        assert_eq!(op, opcode::TEXT);
        assert!(matches!(serde_json::from_slice(&payload).unwrap(), ServerFrame::Subscribed { .. }));
        // A delivery goes out as the shared frame.
        hub.dispatch("news", Bytes::from_static(b"hello"));
        let (_, payload) = server_frame(&mut client).await;
        let frame: ServerFrame = serde_json::from_slice(&payload).unwrap();
        assert!(matches!(frame, ServerFrame::Message { ref data, .. } if data == "hello"), "{frame:?}");
        // Ops, and pings of the protocol itself.
        client.write_all(&client_frame(0x81, br#"{"op":"ping","id":7}"#)).await.unwrap();
        let (_, payload) = server_frame(&mut client).await;
        assert_eq!(
            serde_json::from_slice::<ServerFrame>(&payload).unwrap(),
            ServerFrame::Pong { id: Some(serde_json::json!(7)) }
        );
        client.write_all(&client_frame(0x89, b"hb")).await.unwrap();
        assert_eq!(server_frame(&mut client).await, (opcode::PONG, b"hb".to_vec()));
        // A close is answered with the same code, then the session ends.
        client.write_all(&client_frame(0x88, &1000u16.to_be_bytes())).await.unwrap();
        assert_eq!(server_frame(&mut client).await, (opcode::CLOSE, 1000u16.to_be_bytes().to_vec()));
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("session ended").unwrap();
        assert_eq!(hub.subscriber_count("news"), 0, "unsubscribed when it ended");
    }
}
