//! A client that stops reading is cut off even when its queue never overflows: a write
//! to its socket that makes no progress for one interval (`--ws-ping-secs` for
//! WebSockets, `--sse-heartbeat-secs` for SSE streams and other answers on the lean
//! path, long-poll included) closes the connection, counted as a slow consumer.
//!
//! The nodes here have queues far too large to overflow, so only the stall bound can
//! end the connection. Each never-reading client is a raw socket with a small receive
//! buffer that subscribes, then stops reading while big messages are published until
//! the kernel buffers on both sides are full. A healthy subscriber on the same node
//! keeps receiving throughout.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt;
use shared::protocol::PollResponse;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::mpsc,
};
use tokio_tungstenite::tungstenite::Message;

/// The stall bound of these nodes (both intervals), in seconds.
const INTERVAL: u64 = 1;
/// Queues that never overflow in these tests: only the stall bound can act.
const HUGE_QUEUE: [&str; 4] = ["--queue-size", "1000000", "--queue-bytes", "4294967296"];
/// One big payload (under the default 64 KiB limit).
const BIG: usize = 60 * 1024;
/// Big messages published to fill the never-reading socket (~12 MB, well over the
/// kernel's send and receive buffers on loopback).
const BURST: usize = 200;
/// Receive buffer of the never-reading sockets.
const SMALL_RCVBUF: u32 = 64 * 1024;
/// Longest the test waits for the node to cut a stalled client off.
const CUT_OFF_WITHIN: Duration = Duration::from_secs(10);

fn node(extra: &[&str]) -> Gateway {
    let interval = INTERVAL.to_string();
    let mut args = vec!["--ws-ping-secs", &interval, "--sse-heartbeat-secs", &interval];
    args.extend_from_slice(&HUGE_QUEUE);
    args.extend_from_slice(extra);
    Gateway::start(None, &args)
}

/// A loopback socket with a small, fixed receive buffer (no autotuning).
async fn small_socket(addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(SMALL_RCVBUF).unwrap();
    s.connect(addr).await.unwrap()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until `needle` has arrived (bounded by [`WAIT`]); returns what was read.
async fn read_to(s: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&buf, needle).is_none() {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("read in time").unwrap();
        assert!(
            n > 0,
            "EOF before {:?}: {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

/// Reads `s` to its end (EOF or reset) within [`WAIT`]; returns how many bytes came.
async fn drain(s: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!("the server did not close the socket ({total} bytes drained)"),
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
        }
    }
}

/// Reads `s` for at most `bound`: how many bytes came, and whether the socket ended.
async fn drain_for(s: &mut TcpStream, bound: Duration) -> (usize, bool) {
    let mut total = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return (total, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
        }
    }
}

/// Publishes `n` big messages to `ch` through the HTTP API, as fast as it answers.
async fn publish_big(gw: &Gateway, ch: &str, n: usize) {
    let http = reqwest::Client::new();
    for i in 0..n {
        let body = format!("{i:06}:{}", "z".repeat(BIG - 7));
        let r = http.post(gw.url(&format!("/publish/{ch}"))).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Keeps publishing a small message every 200 ms until `metric` reaches 1 on `gw`;
/// returns how long that took, or panics after [`CUT_OFF_WITHIN`] with the metrics.
async fn publish_until(gw: &Gateway, ch: &str, metric: &str) -> Duration {
    let started = Instant::now();
    let mut i = 0;
    while gw.metric(metric).await < 1.0 {
        if started.elapsed() > CUT_OFF_WITHIN {
            let text = reqwest::get(gw.admin_url("/metrics")).await.unwrap().text().await.unwrap();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("gateway_connections{") || l.starts_with("gateway_disconnects"))
                .filter(|l| !l.ends_with(" 0"))
                .collect();
            panic!(
                "the stalled client was not cut off within {CUT_OFF_WITHIN:?} ({metric} never counted it):\n{}",
                lines.join("\n")
            );
        }
        publish(gw, ch, &format!("tick {i}")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{metric} counted {:?} after the burst", started.elapsed());
    started.elapsed()
}

/// A healthy WebSocket subscriber of `ch` that reads everything, forwarding message
/// payloads that start with `marker`.
async fn healthy_ws(gw: &Gateway, ch: &str) -> mpsc::UnboundedReceiver<String> {
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[ch]).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg
                && t.contains("\"marker ")
            {
                let _ = tx.send(t.to_string());
            }
        }
    });
    rx
}

/// The healthy subscriber gets a message published after the stalled client was cut.
async fn assert_healthy_receives(gw: &Gateway, ch: &str, rx: &mut mpsc::UnboundedReceiver<String>) {
    publish(gw, ch, "marker after").await;
    let got = tokio::time::timeout(WAIT, rx.recv()).await.expect("the healthy subscriber gets it").unwrap();
    assert!(got.contains("marker after"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_stops_reading_is_closed_within_two_ping_intervals() {
    let gw = node(&[]);
    let ch = channel("stall-ws");
    let mut healthy = healthy_ws(&gw, &ch).await;
    let mut s = small_socket(gw.public).await;
    let req = format!(
        "GET /ws?channel={ch} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.public
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_to(&mut s, b"\"subscribed\"").await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&head));
    // From here on the client never reads.
    publish_big(&gw, &ch, BURST).await;
    let took =
        publish_until(&gw, &ch, "gateway_disconnects_total{transport=\"ws\",reason=\"slow_consumer\"}").await;
    assert!(
        took <= Duration::from_secs(2 * INTERVAL + 1),
        "cut off {took:?} after the burst; the bound is two ping intervals ({INTERVAL} s each)"
    );
    assert_eq!(gw.metric("gateway_slow_consumer_disconnects_total{transport=\"ws\"}").await, 1.0);
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"write_stall\"}").await, 1.0);
    assert_eq!(gw.metric("gateway_connections{transport=\"ws\"}").await, 1.0, "the healthy one stays");
    drain(&mut s).await;
    assert_healthy_receives(&gw, &ch, &mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_that_stops_being_read_is_closed_within_two_heartbeats() {
    let gw = node(&[]);
    let ch = channel("stall-sse");
    let mut healthy = healthy_ws(&gw, &ch).await;
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut s = small_socket(gw.public).await;
    let req = format!("GET /sse?channel={ch} HTTP/1.1\r\nHost: {}\r\n\r\n", gw.public);
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_to(&mut s, b": ok\n").await;
    assert!(head.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&head));
    publish_big(&gw, &ch, BURST).await;
    let took =
        publish_until(&gw, &ch, "gateway_disconnects_total{transport=\"sse\",reason=\"slow_consumer\"}")
            .await;
    assert!(
        took <= Duration::from_secs(2 * INTERVAL + 1),
        "cut off {took:?} after the burst; the bound is two heartbeat intervals ({INTERVAL} s each)"
    );
    assert_eq!(gw.metric("gateway_slow_consumer_disconnects_total{transport=\"sse\"}").await, 1.0);
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"write_stall\"}").await, 1.0);
    assert_eq!(gw.metric("gateway_connections{transport=\"sse\"}").await, 1.0, "the healthy one stays");
    drain(&mut s).await;
    assert_healthy_receives(&gw, &ch, &mut healthy).await;
    // The healthy SSE client read the whole burst and more.
    let mut seen = 0;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), sse.events.recv()).await {
        seen += 1;
        if ev.data == "marker after" {
            break;
        }
    }
    assert!(seen > BURST, "the healthy SSE client got {seen} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answer_that_is_not_read_is_given_up_on() {
    let gw = node(&["--poll-buffer", "128", "--header-timeout-secs", "30"]);
    let ch = channel("stall-poll");
    let mut healthy = healthy_ws(&gw, &ch).await;
    // A first poll starts the node's buffer for the channel; 128 big messages fill it.
    let first = poll(&gw, &format!("channel={ch}&timeout=0")).await;
    publish_big(&gw, &ch, 128).await;
    let mut s = small_socket(gw.public).await;
    let req = format!(
        "GET /poll?channel={ch}&cursor={}&timeout=0 HTTP/1.1\r\nHost: {}\r\n\r\n",
        first.cursor, gw.public
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // An ~8 MB answer the client never reads.
    let head = read_to(&mut s, b"\r\n\r\n").await;
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length");
    assert!(length > 100 * BIG, "a big answer: {length} bytes");
    // Not reading for two intervals: the node must give up on the answer by then.
    tokio::time::sleep(Duration::from_secs(2 * INTERVAL + 1)).await;
    let (drained, ended) = drain_for(&mut s, Duration::from_secs(5)).await;
    let body = drained + head.len() - (find(&head, b"\r\n\r\n").unwrap() + 4);
    assert!(
        ended && body < length,
        "the stalled answer was not given up on: {body} of {length} bytes came once the client read \
         again, and the connection {}",
        if ended { "ended" } else { "stayed open" }
    );
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"write_stall\"}").await, 1.0);
    // Long-polls still work for everyone else.
    let again: PollResponse = poll(&gw, &format!("channel={ch}&cursor={}&timeout=0", first.cursor)).await;
    assert_eq!(again.messages.len(), 128);
    assert_healthy_receives(&gw, &ch, &mut healthy).await;
}
