//! Slow consumers: a subscriber that never reads its socket does not delay anyone
//! else's deliveries; once its small queue (`--queue-size 8`) overflows it is dropped
//! by policy, counted in `/metrics`, and its socket is closed by the server. A
//! WebSocket client that reads late is told why (`error` frame `slow_consumer`, close
//! code 1008).
//!
//! The never-reading clients are raw TCP sockets with a small receive buffer (so the
//! kernel absorbs little), doing the SSE request / WebSocket upgrade by hand and then
//! never reading again. Healthy clients are paced by the publisher: it never runs more
//! than [`WINDOW`] messages ahead of the slowest healthy client, so a healthy client
//! can never overflow its queue of 8 — yet a stuck client would stall them all and
//! fail the test, because every wait is bounded.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use futures_util::StreamExt;
use shared::{protocol::ServerFrame, sse::SseParser};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_tungstenite::{MaybeTlsStream, tungstenite::Message};

/// Queue length of every connection in these tests.
const QUEUE: &str = "8";
/// Size of one published payload.
const PAYLOAD_BYTES: usize = 32 * 1024;
/// Most messages the publisher runs ahead of the slowest healthy client (< queue size).
const WINDOW: usize = 4;
/// Upper bound on messages published while waiting for the policy to kick in (~64 MB).
const MAX_MESSAGES: usize = 2000;
/// Messages published after the slow consumers were dropped.
const AFTER_KICK: usize = 16;
/// Receive buffer of the never-reading sockets.
const SMALL_RCVBUF: u32 = 64 * 1024;
/// Bound for a drained socket to reach its end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Payload number `i`: its number, then filler, `PAYLOAD_BYTES` in all.
fn payload(i: usize) -> String {
    let mut s = format!("{i:06}:");
    let fill = (b'a' + (i % 26) as u8) as char;
    s.extend(std::iter::repeat_n(fill, PAYLOAD_BYTES - s.len()));
    s
}

fn start_gateway(redis: &Redis) -> Gateway {
    Gateway::start(Some(&redis.url()), &["--queue-size", QUEUE])
}

async fn redis_conn(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Publishes `payload(n)` for each `n` in `range` to `ch`, in one Redis pipeline.
async fn publish(con: &mut redis::aio::MultiplexedConnection, ch: &str, range: std::ops::Range<usize>) {
    let mut pipe = redis::pipe();
    for n in range {
        pipe.cmd("PUBLISH").arg(ch).arg(payload(n)).ignore();
    }
    let () = pipe.query_async(con).await.unwrap();
}

/// A loopback socket with a small, fixed receive buffer (no autotuning).
async fn small_socket(addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(SMALL_RCVBUF).unwrap();
    s.connect(addr).await.unwrap()
}

/// Reads into `buf` until `done(buf)` holds (bounded by [`WAIT`]).
async fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, what: &str, done: impl Fn(&[u8]) -> bool) {
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(buf) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("timed out reading {what}; got {:?}", String::from_utf8_lossy(buf)))
            .unwrap();
        assert!(n > 0, "EOF while reading {what}; got {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An SSE client that sends its request, waits for the stream to open, then never reads.
/// Returns the socket and the bytes read so far.
async fn never_reading_sse(gw: &Gateway, ch: &str) -> (TcpStream, Vec<u8>) {
    let mut s = small_socket(gw.public).await;
    let req =
        format!("GET /sse?channel={ch} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n", gw.public);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, "the SSE stream opening", |b| find(b, b": ok\n").is_some()).await;
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf));
    (s, buf)
}

/// A masked (client-to-server) WebSocket text frame.
fn masked_text_frame(text: &str) -> Vec<u8> {
    let p = text.as_bytes();
    let mask: [u8; 4] = rand::random();
    let mut f = vec![0x81];
    if p.len() < 126 {
        f.push(0x80 | p.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(p.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Splits one unmasked server frame off the front of `buf`: `(opcode, payload, used)`,
/// or `None` when `buf` holds no whole frame.
fn parse_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
    let (len, start) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    let body = buf.get(start..start + len)?;
    Some((buf[0] & 0x0f, body, start + len))
}

/// A WebSocket client that upgrades by hand, sends a masked `subscribe` frame, waits for
/// `subscribed`, then never reads again. Returns the socket and the frame bytes read so
/// far.
async fn never_reading_ws(gw: &Gateway, ch: &str) -> (TcpStream, Vec<u8>) {
    let mut s = small_socket(gw.public).await;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.public
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, "the upgrade response", |b| find(b, b"\r\n\r\n").is_some()).await;
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&buf));
    let head_end = find(&buf, b"\r\n\r\n").unwrap() + 4;
    buf.drain(..head_end);
    let op = serde_json::json!({"op": "subscribe", "channels": [ch]}).to_string();
    s.write_all(&masked_text_frame(&op)).await.unwrap();
    read_until(&mut s, &mut buf, "the subscribed frame", |b| parse_frame(b).is_some()).await;
    let (opcode, body, _) = parse_frame(&buf).unwrap();
    assert_eq!(opcode, 1, "a text frame");
    let frame: ServerFrame = serde_json::from_slice(body).unwrap();
    assert!(matches!(frame, ServerFrame::Subscribed { .. }), "{frame:?}");
    (s, buf)
}

/// Reads `s` to its end (EOF or reset), bounded by [`DRAIN_TIMEOUT`]; returns the bytes.
async fn drain(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!("{what}: the server did not close the socket ({} bytes drained)", all.len()),
            Ok(Ok(0)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Ok(Err(e)) => panic!("{what}: read failed: {e}"),
        }
    }
}

/// Decodes as much of a chunked HTTP body as is complete.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(body, b"\r\n") {
        let Ok(size) = usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap_or("x").trim(), 16)
        else {
            break;
        };
        let data = &body[eol + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        body = data.get(size + 2..).unwrap_or_default();
    }
    out
}

/// Checks that the drained SSE response holds a correct, in-order prefix of the
/// published messages; returns how many.
fn check_sse_prefix(raw: &[u8]) -> usize {
    let head_end = find(raw, b"\r\n\r\n").expect("response head") + 4;
    let mut parser = SseParser::new();
    let events = parser.feed(&dechunk(&raw[head_end..]));
    let mut n = 0;
    for ev in events {
        if ev.event.as_deref() == Some("disconnect") {
            assert!(ev.data.contains("slow_consumer"), "{ev:?}");
            continue;
        }
        assert!(ev.data == payload(n), "SSE message {n} of the slow client is wrong or out of order");
        n += 1;
    }
    n
}

/// Checks that the drained WebSocket bytes hold a correct, in-order prefix of the
/// published messages (a cut-off last frame is fine); returns how many.
fn check_ws_prefix(mut raw: &[u8]) -> usize {
    let mut n = 0;
    while let Some((opcode, body, used)) = parse_frame(raw) {
        raw = &raw[used..];
        if opcode != 1 {
            continue; // ping, close
        }
        match serde_json::from_slice::<ServerFrame>(body).unwrap() {
            ServerFrame::Message { data, .. } => {
                assert!(
                    data == payload(n),
                    "WebSocket message {n} of the slow client is wrong or out of order"
                );
                n += 1;
            }
            ServerFrame::Error { code, .. } => assert_eq!(code, "slow_consumer"),
            ServerFrame::Subscribed { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    n
}

/// A healthy client reading in the background: how many messages it got (all checked
/// to be exactly `payload(0..n)` in order), and its task.
struct Healthy {
    name: &'static str,
    count: watch::Receiver<usize>,
    task: JoinHandle<String>,
}

impl Healthy {
    /// Reads SSE events; the task ends (with why) only on a wrong message or stream end.
    fn sse(mut sse: SseClient) -> Self {
        let (tx, count) = watch::channel(0);
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Some(ev) = sse.events.recv().await {
                if ev.data != payload(n) {
                    return format!("message {n} wrong or out of order: {:.12}...", ev.data);
                }
                n += 1;
                tx.send_replace(n);
            }
            format!("stream ended after {n} messages")
        });
        Self { name: "healthy SSE client", count, task }
    }

    /// Reads WebSocket frames likewise.
    fn ws(mut ws: Ws, ch: String) -> Self {
        let (tx, count) = watch::channel(0);
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Text(t)) => {
                        let frame: ServerFrame = serde_json::from_str(&t).unwrap();
                        if frame != message(&ch, &payload(n)) {
                            return format!("frame {n} wrong or out of order: {:.80}...", t.as_str());
                        }
                        n += 1;
                        tx.send_replace(n);
                    }
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    other => return format!("after {n} messages: {other:?}"),
                }
            }
            format!("stream ended after {n} messages")
        });
        Self { name: "healthy WebSocket client", count, task }
    }

    /// Waits until this client has at least `n` messages.
    async fn wait_for(&mut self, n: usize) {
        let r = tokio::time::timeout(WAIT, self.count.wait_for(|c| *c >= n)).await.map(|r| r.is_ok());
        match r {
            Ok(true) => {}
            Ok(false) => {
                let why = (&mut self.task).await.unwrap();
                panic!("{}: {why}", self.name)
            }
            Err(_) => panic!("{} stalled at {} of {n} messages", self.name, *self.count.borrow()),
        }
    }
}

impl Drop for Healthy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How the publisher paces itself.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Messages per Redis pipeline.
    burst: usize,
    /// Pause after each burst.
    pause: Duration,
    /// Messages still published once the slow clients were dropped.
    after: usize,
}

/// One message at a time, as fast as the healthy clients take them.
const PACED: Pace = Pace { burst: 1, pause: Duration::ZERO, after: AFTER_KICK };
/// Bursts of 7 (under the queue size of 8) with pauses, so a reading client always
/// catches up and only one whose socket is full falls 8 behind; the server's writer
/// then usually has several messages in hand when the socket fills.
const BURSTS: Pace = Pace { burst: 7, pause: Duration::from_millis(20), after: 0 };

/// Publishes `payload(0..)` to `ch` through Redis as `pace` says, never more than
/// [`WINDOW`] ahead of any healthy client, until `kicked` reports (checked after each
/// burst) that the policy has dropped the slow clients; then `pace.after` more.
/// Returns how many were published.
async fn publish_until_kicked(
    redis: &Redis,
    gw: &Gateway,
    ch: &str,
    healthy: &mut [Healthy],
    pace: Pace,
    kicked: impl AsyncFn(&Gateway) -> bool,
) -> usize {
    let Pace { burst, pause, after } = pace;
    assert!(healthy.is_empty() || burst <= WINDOW);
    let mut con = redis_conn(redis).await;
    let mut i = 0;
    let mut stop_at = None;
    while stop_at.is_none_or(|s| i < s) {
        assert!(
            i < MAX_MESSAGES,
            "no slow-consumer disconnect after {i} messages of {PAYLOAD_BYTES} bytes; metrics:\n{}",
            metrics_text(gw).await
        );
        for h in healthy.iter_mut() {
            h.wait_for((i + burst).saturating_sub(WINDOW)).await;
        }
        publish(&mut con, ch, i..i + burst).await;
        i += burst;
        tokio::time::sleep(pause).await;
        if stop_at.is_none() && kicked(gw).await {
            stop_at = Some(i + after);
        }
    }
    i
}

async fn metrics_text(gw: &Gateway) -> String {
    let text = reqwest::get(gw.admin_url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with("gateway_")).collect::<Vec<_>>().join("\n")
}

const SLOW_WS: &str = "gateway_slow_consumer_disconnects_total{transport=\"ws\"}";
const SLOW_SSE: &str = "gateway_slow_consumer_disconnects_total{transport=\"sse\"}";
const DROPPED_SLOW: &str = "gateway_dropped_messages_total{reason=\"slow_consumer\"}";
const OPEN_WS: &str = "gateway_connections{transport=\"ws\"}";
const OPEN_SSE: &str = "gateway_connections{transport=\"sse\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_clients_do_not_delay_others_and_are_dropped_and_counted() {
    let redis = Redis::start();
    let gw = start_gateway(&redis);
    let ch = channel("slow");

    let sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&ch]).await;
    let mut healthy = vec![Healthy::sse(sse), Healthy::ws(ws, ch.clone())];
    let (mut slow_sse, sse_head) = never_reading_sse(&gw, &ch).await;
    let (mut slow_ws, ws_head) = never_reading_ws(&gw, &ch).await;
    assert_eq!(redis.numsub(&ch), 1, "one Redis subscription for the node");

    let total = publish_until_kicked(&redis, &gw, &ch, &mut healthy, PACED, async |gw| {
        gw.metric(SLOW_WS).await >= 1.0 && gw.metric(SLOW_SSE).await >= 1.0
    })
    .await;

    // Every healthy client got every message, in order, verbatim.
    for h in &mut healthy {
        h.wait_for(total).await;
        assert_eq!(*h.count.borrow(), total, "{}: no extra messages", h.name);
    }
    // Exactly the two never-reading clients were dropped by policy, and counted.
    assert_eq!(gw.metric(SLOW_WS).await, 1.0, "{}", metrics_text(&gw).await);
    assert_eq!(gw.metric(SLOW_SSE).await, 1.0, "{}", metrics_text(&gw).await);
    assert!(gw.metric(DROPPED_SLOW).await >= 1.0, "{}", metrics_text(&gw).await);

    // The server closes the never-reading SSE connection on its own (only the healthy
    // one stays open), while the client still reads nothing.
    eventually(Duration::from_secs(15), "the never-reading SSE connection to be closed", async || {
        (gw.metric(OPEN_SSE).await == 1.0).then_some(())
    })
    .await;

    // Draining the slow sockets reaches their end: closed by the server. What they got
    // before being cut off is a correct prefix of the stream, in order.
    let got = check_sse_prefix(&[sse_head, drain(&mut slow_sse, "never-reading SSE").await].concat());
    assert!(got < total, "the slow SSE client missed messages ({got} of {total})");
    let got = check_ws_prefix(&[ws_head, drain(&mut slow_ws, "never-reading WebSocket").await].concat());
    assert!(got < total, "the slow WebSocket client missed messages ({got} of {total})");

    // The healthy clients are still subscribed and still served.
    assert_eq!(gw.metric(OPEN_SSE).await, 1.0);
    eventually(WAIT, "only the healthy WebSocket to stay open", async || {
        (gw.metric(OPEN_WS).await == 1.0).then_some(())
    })
    .await;
    let mut con = redis_conn(&redis).await;
    publish(&mut con, &ch, total..total + 1).await;
    for h in &mut healthy {
        h.wait_for(total + 1).await;
    }
}

/// Never-reading clients per test below: each is one more chance to hit a race.
const CLIENTS: usize = 4;
const WS_SLOW_REASON: &str = "gateway_disconnects_total{transport=\"ws\",reason=\"slow_consumer\"}";
const SSE_SLOW_REASON: &str = "gateway_disconnects_total{transport=\"sse\",reason=\"slow_consumer\"}";

/// The server closes never-reading WebSockets by itself once they are dropped by
/// policy: each session ends (counted with reason `slow_consumer`) while its client
/// still reads nothing — it must not hold a socket, a task and its buffers forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_websockets_are_closed_without_the_clients_reading() {
    let redis = Redis::start();
    let gw = start_gateway(&redis);
    let ch = channel("slow-ws-close");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(never_reading_ws(&gw, &ch).await);
    }

    publish_until_kicked(&redis, &gw, &ch, &mut [], BURSTS, async |gw| {
        gw.metric(SLOW_WS).await >= CLIENTS as f64
    })
    .await;
    eventually(Duration::from_secs(15), "the never-reading WebSocket sessions to end", async || {
        (gw.metric(OPEN_WS).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(gw.metric(WS_SLOW_REASON).await, CLIENTS as f64, "{}", metrics_text(&gw).await);
    for (mut s, head) in clients {
        check_ws_prefix(&[head, drain(&mut s, "never-reading WebSocket").await].concat());
    }
}

/// The same for SSE: the server closes never-reading streams by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_sse_streams_are_closed_without_the_clients_reading() {
    let redis = Redis::start();
    let gw = start_gateway(&redis);
    let ch = channel("slow-sse-close");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(never_reading_sse(&gw, &ch).await);
    }

    publish_until_kicked(&redis, &gw, &ch, &mut [], BURSTS, async |gw| {
        gw.metric(SLOW_SSE).await >= CLIENTS as f64
    })
    .await;
    eventually(Duration::from_secs(15), "the never-reading SSE connections to end", async || {
        (gw.metric(OPEN_SSE).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(gw.metric(SLOW_SSE).await, CLIENTS as f64, "{}", metrics_text(&gw).await);
    for (mut s, head) in clients {
        check_sse_prefix(&[head, drain(&mut s, "never-reading SSE").await].concat());
    }
}

/// A slow SSE consumer's disconnect is counted as such (`gateway_disconnects_total`
/// reason `slow_consumer`), like the WebSocket's, also when its socket is so full that
/// the stream cannot write its `event: disconnect` any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sse_disconnects_are_counted_with_reason_slow_consumer() {
    let redis = Redis::start();
    let gw = start_gateway(&redis);
    let ch = channel("slow-sse-reason");
    let clients = 2 * CLIENTS;
    let mut held = Vec::new();
    for _ in 0..clients {
        held.push(never_reading_sse(&gw, &ch).await);
    }

    publish_until_kicked(&redis, &gw, &ch, &mut [], BURSTS, async |gw| {
        gw.metric(SLOW_SSE).await >= clients as f64
    })
    .await;
    eventually(Duration::from_secs(15), "the never-reading SSE connections to end", async || {
        (gw.metric(OPEN_SSE).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(gw.metric(SSE_SLOW_REASON).await, clients as f64, "{}", metrics_text(&gw).await);
}

/// A WebSocket client that stops reading, and resumes once it has been dropped, reads
/// the messages it was sent in order, then an `error` frame `slow_consumer`, then close
/// code 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_websocket_reader_is_told_slow_consumer_and_closed_with_1008() {
    let redis = Redis::start();
    let gw = start_gateway(&redis);
    let ch = channel("slow-ws-told");
    let stream = small_socket(gw.public).await;
    let (mut ws, _) =
        tokio_tungstenite::client_async(gw.ws_url("/ws"), MaybeTlsStream::Plain(stream)).await.unwrap();
    ws_subscribe(&mut ws, &[&ch]).await;

    // Not reading while this runs; resume as soon as the policy has kicked in.
    publish_until_kicked(&redis, &gw, &ch, &mut [], BURSTS, async |gw| gw.metric(SLOW_WS).await >= 1.0).await;

    let mut n = 0;
    let mut told = None;
    let close = loop {
        let msg = tokio::time::timeout(DRAIN_TIMEOUT, ws.next()).await.expect("frames in time");
        match msg {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerFrame>(&t).unwrap() {
                ServerFrame::Message { data, .. } => {
                    assert!(told.is_none(), "no message after the error frame");
                    assert!(data == payload(n), "message {n} wrong or out of order");
                    n += 1;
                }
                ServerFrame::Error { code, message } => told = Some((code, message)),
                other => panic!("unexpected frame {other:?}"),
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(f))) => break f,
            other => panic!("expected frames then a close frame, got {other:?} after {n} messages"),
        }
    };
    let (code, message) = told.expect("an error frame before the close");
    assert_eq!(code, "slow_consumer", "{message}");
    assert!(!message.is_empty());
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1008, "policy violation: {}", close.reason);
    // Then the connection ends.
    let end = tokio::time::timeout(WAIT, ws.next()).await.expect("the connection ends");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "nothing after the close: {end:?}");
    eventually(WAIT, "the session to end", async || (gw.metric(OPEN_WS).await == 0.0).then_some(())).await;
}

/// The byte budget (`--queue-bytes`) applies on its own: with room for 1000 messages
/// but only about five payloads' worth of bytes, never-reading clients are dropped by
/// the byte limit (counted as `limit="queue_bytes"`), healthy ones keep everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_byte_budget_drops_never_reading_clients_and_spares_healthy_ones() {
    const QUEUE_BYTES: usize = 5 * PAYLOAD_BYTES + 100;
    let redis = Redis::start();
    let gw = Gateway::start(
        Some(&redis.url()),
        &["--queue-size", "1000", "--queue-bytes", &QUEUE_BYTES.to_string()],
    );
    let ch = channel("slow-bytes");
    let sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut healthy = vec![Healthy::sse(sse)];
    let (_slow_sse, _) = never_reading_sse(&gw, &ch).await;
    let (_slow_ws, _) = never_reading_ws(&gw, &ch).await;

    let total = publish_until_kicked(&redis, &gw, &ch, &mut healthy, PACED, async |gw| {
        gw.metric(SLOW_WS).await >= 1.0 && gw.metric(SLOW_SSE).await >= 1.0
    })
    .await;
    healthy[0].wait_for(total).await;
    assert_eq!(*healthy[0].count.borrow(), total, "the healthy client got everything once");
    let m = metrics_text(&gw).await;
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"queue_bytes\"}").await, 2.0, "{m}");
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"queue_messages\"}").await, 0.0, "{m}");
}
