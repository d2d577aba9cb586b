//! Graceful shutdown. On SIGTERM (or SIGINT) a node stops accepting, fails readiness,
//! tells its clients to reconnect elsewhere — WebSocket close 1012, an SSE stream that
//! ends with `retry:` and `event: disconnect` (`shutting_down`), an in-flight long-poll
//! answered at once — lets in-flight requests finish, and exits 0 well within the grace
//! period. Also: the in-process broker serves every transport when no Redis is set.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use shared::protocol::{PollResponse, PublishResponse, PublishResult, ServerFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

/// Bound for a signalled node to exit: well under the default 30 s grace period, so a
/// node that waits out the grace instead of closing its clients fails.
const EXIT_BOUND: Duration = Duration::from_secs(15);
/// A long-poll hold time far beyond every bound used here.
const LONG_POLL_SECS: u32 = 60;

const OPEN_POLLS: &str = "gateway_connections{transport=\"poll\"}";

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An SSE stream read as raw bytes in the background. The task returns every byte of
/// the body and, if the stream did not end cleanly, the error.
async fn raw_sse(url: &str) -> JoinHandle<(Vec<u8>, Option<String>)> {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut all = Vec::new();
    while find(&all, b": ok\n").is_none() {
        let chunk = tokio::time::timeout(WAIT, stream.next()).await.expect("SSE opens in time");
        all.extend_from_slice(&chunk.expect("SSE stream open").unwrap());
    }
    tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => all.extend_from_slice(&c),
                Err(e) => return (all, Some(e.to_string())),
            }
        }
        (all, None)
    })
}

/// A `POST /publish/{ch}` whose handler is running and reading the body (the server
/// asked for it with `100 Continue`) while the client holds back the last bytes.
struct HeldPublish {
    stream: TcpStream,
    rest: &'static [u8],
}

impl HeldPublish {
    async fn start(gw: &Gateway, ch: &str) -> Self {
        let (first, rest): (&[u8], &'static [u8]) = (b"held-", b"back!");
        let mut stream = TcpStream::connect(gw.public).await.unwrap();
        let head = format!(
            "POST /publish/{ch} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            gw.public,
            first.len() + rest.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while find(&buf, b"\r\n\r\n").is_none() {
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("100 Continue").unwrap();
            assert!(n > 0, "EOF before 100 Continue");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert!(buf.starts_with(b"HTTP/1.1 100"), "{:?}", String::from_utf8_lossy(&buf));
        stream.write_all(first).await.unwrap();
        Self { stream, rest }
    }

    /// Sends the rest of the body; returns the whole response once the server closes
    /// the connection.
    async fn finish(mut self) -> String {
        self.stream.write_all(self.rest).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, self.stream.read_to_end(&mut out))
            .await
            .expect("response and close in time")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The payload of a WebSocket `message` frame.
fn ws_data(frame: ServerFrame) -> String {
    match frame {
        ServerFrame::Message { data, .. } => data,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A node with an SSE client (parsed), an SSE client (raw bytes), a WebSocket client, a
/// long-poll in flight and a publish in flight gets `sig`; checks every promise of the
/// drain and a clean exit.
async fn loaded_node_drains_and_exits_0(redis: Option<&Redis>, sig: &str) {
    let url = redis.map(Redis::url);
    let mut gw = Gateway::start(url.as_deref(), &[]);
    let ch = channel("drain");
    let sse_url = gw.url(&format!("/sse?channel={ch}"));
    let mut sse = SseClient::connect(&sse_url).await;
    let raw = raw_sse(&sse_url).await;
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&ch]).await;
    let first = poll(&gw, &format!("channel={ch}&timeout=0")).await;

    // Everything is live.
    let r: PublishResult = reqwest::Client::new()
        .post(gw.url(&format!("/publish/{ch}")))
        .body("before")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r.subscribed);
    assert_eq!(sse.next().await.data, "before");
    assert_eq!(ws_data(ws_next(&mut ws).await), "before");
    let r = poll(&gw, &format!("channel={ch}&cursor={}&timeout=5", first.cursor)).await;
    assert_eq!(r.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["before"]);
    eventually(WAIT, "the node to be ready", async || (gw.ready_status().await == 200).then_some(())).await;

    // A long-poll held open, waiting for the next message.
    let held_poll = tokio::spawn(reqwest::get(
        gw.url(&format!("/poll?channel={ch}&cursor={}&timeout={LONG_POLL_SECS}", r.cursor)),
    ));
    eventually(WAIT, "the long-poll to be held", async || (gw.metric(OPEN_POLLS).await == 1.0).then_some(()))
        .await;
    // A publish whose handler is reading its body.
    let held_publish = HeldPublish::start(&gw, &ch).await;

    gw.signal(sig);

    // While the publish is still in flight the node drains: not ready (admin still up),
    // and the public listener no longer accepts.
    eventually(WAIT, "/readyz to fail while draining", async || {
        let status = gw.ready_status().await;
        assert_ne!(status, 0, "the admin listener must stay up while requests are in flight");
        (status == 503).then_some(())
    })
    .await;
    eventually(WAIT, "the public listener to stop accepting", async || {
        TcpStream::connect(gw.public).await.is_err().then_some(())
    })
    .await;
    // The in-flight publish is allowed to finish, then its connection is closed.
    let resp = held_publish.finish().await;
    assert!(resp.starts_with("HTTP/1.1 200"), "in-flight publish completes during the drain: {resp}");

    // WebSocket: close 1012, "service restart", reconnect elsewhere.
    let (code, reason) = ws_close_frame(&mut ws).await;
    assert_eq!(code, 1012, "close reason: {reason}");

    // SSE: `event: disconnect` with reason shutting_down, then the stream ends. Until
    // its turn in the drain window the stream still delivers (here: the in-flight publish).
    let mut ev = sse.next().await;
    while ev.event.is_none() {
        assert_eq!(ev.data, "held-back!", "only the in-flight publish may arrive during the drain");
        ev = sse.next().await;
    }
    assert_eq!(ev.event.as_deref(), Some("disconnect"), "{ev:?}");
    let body: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(body["reason"], "shutting_down", "{body}");
    let end = tokio::time::timeout(WAIT, sse.events.recv()).await.expect("the SSE stream ends in time");
    assert!(end.is_none(), "nothing after the disconnect event: {end:?}");
    let retry = eventually(WAIT, "the SSE reader to see the end", async || *sse.ended.lock().unwrap()).await;
    assert!(retry.is_some_and(|ms| ms > 0), "a retry: hint, got {retry:?}");
    // On the wire: after the last message come a `retry:` field and the disconnect
    // event, and the response ends cleanly.
    let (bytes, err) = tokio::time::timeout(WAIT, raw).await.expect("raw SSE stream ends in time").unwrap();
    assert_eq!(err, None, "the SSE response ends cleanly");
    let text = String::from_utf8(bytes).unwrap();
    let tail = &text[text.rfind("data: before\n\n").expect("the message") + 14..];
    let tail_lines: Vec<&str> = tail.lines().collect();
    let retry_at = tail_lines
        .iter()
        .position(|l| {
            l.strip_prefix("retry:").is_some_and(|v| v.trim().parse::<u64>().is_ok_and(|ms| ms > 0))
        })
        .unwrap_or_else(|| panic!("a retry: field after the last message: {tail:?}"));
    let disconnect_at = tail_lines
        .iter()
        .position(|l| *l == "event: disconnect")
        .unwrap_or_else(|| panic!("event: disconnect after the last message: {tail:?}"));
    assert!(retry_at < disconnect_at, "retry: comes with the final disconnect: {tail:?}");
    assert!(tail.contains("shutting_down") && tail.ends_with("\n\n"), "{tail:?}");

    // The held long-poll is answered now, not after its 60 s.
    let resp =
        tokio::time::timeout(WAIT, held_poll).await.expect("long-poll answered promptly").unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body: PollResponse = resp.json().await.unwrap();
    assert!(body.messages.is_empty(), "{body:?}");
    assert!(!body.cursor.is_empty());

    // Exit 0 without waiting out the grace period.
    let status =
        gw.wait_exit(EXIT_BOUND).unwrap_or_else(|| panic!("no exit within {EXIT_BOUND:?} of SIG{sig}"));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let logs = gw.logs();
    assert!(logs.contains(&format!("SIG{sig} received")), "{logs}");
    assert!(logs.contains("shutdown complete"), "{logs}");
    assert!(!logs.contains("did not close within the grace period"), "every client closed in time:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_on_redis_and_exits_0() {
    let redis = Redis::start();
    loaded_node_drains_and_exits_0(Some(&redis), "TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_on_the_memory_broker_and_exits_0() {
    loaded_node_drains_and_exits_0(None, "TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_a_node_like_sigterm() {
    let redis = Redis::start();
    loaded_node_drains_and_exits_0(Some(&redis), "INT").await;
}

/// With no clients there is nothing to drain: SIGINT ends the node at once (far sooner
/// than the grace period), exit code 0, admin listener gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_node_exits_0_quickly_on_sigint() {
    let redis = Redis::start();
    for url in [None, Some(redis.url())] {
        let mut gw = Gateway::start(url.as_deref(), &["--shutdown-grace-secs", "60"]);
        eventually(WAIT, "the node to be ready", async || (gw.ready_status().await == 200).then_some(()))
            .await;
        gw.signal("INT");
        let status = gw.wait_exit(WAIT).expect("an idle node exits at once");
        assert_eq!(status.code(), Some(0), "{status:?}");
        assert_eq!(gw.ready_status().await, 0, "admin listener closed");
        assert!(TcpStream::connect(gw.public).await.is_err(), "public listener closed");
        assert!(!gw.logs().contains("did not close within the grace period"), "{}", gw.logs());
    }
}

/// No Redis configured: one node on the in-process broker, said so at start, serves SSE,
/// WebSocket and long-poll from its own HTTP publish API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_serves_every_transport_without_redis() {
    let gw = Gateway::start(None, &[]);
    // (The harness may return just before it stored the "listening" line.)
    eventually(WAIT, "the startup log to name the in-process broker", async || {
        let logs = gw.logs();
        (logs.contains("in-process broker") && logs.contains("broker=\"memory\"")).then_some(())
    })
    .await;
    let ready: serde_json::Value = reqwest::get(gw.admin_url("/readyz")).await.unwrap().json().await.unwrap();
    assert_eq!(ready["broker"], "memory", "{ready}");
    assert_eq!(ready["status"], "ready", "{ready}");

    let ch = channel("memory");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&gw.ws_url(&format!("/ws?channel={ch}"))).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Subscribed { .. }));
    let first = poll(&gw, &format!("channel={ch}&timeout=0")).await;
    let http = reqwest::Client::new();

    // Raw body publish.
    let r: PublishResult = http
        .post(gw.url(&format!("/publish/{ch}")))
        .body("raw body")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((r.channel.as_str(), r.subscribed), (ch.as_str(), true));
    // JSON publish with an event, to this channel and one nobody listens to.
    let nobody = channel("memory-nobody");
    let r: PublishResponse = http
        .post(gw.url("/api/publish"))
        .json(&serde_json::json!({"channels": [ch, nobody], "data": "two\nlines", "event": "note"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subscribed: Vec<_> = r.results.iter().map(|r| (r.channel.as_str(), r.subscribed)).collect();
    assert_eq!(subscribed, [(ch.as_str(), true), (nobody.as_str(), false)]);

    let ev = sse.next().await;
    assert_eq!((ev.event.as_deref(), ev.data.as_str()), (None, "raw body"));
    let ev = sse.next().await;
    assert_eq!((ev.event.as_deref(), ev.data.as_str()), (Some("note"), "two\nlines"));

    let (a, b) = (ws_next(&mut ws).await, ws_next(&mut ws).await);
    assert!(
        matches!(&a, ServerFrame::Message { channel, event: None, data, .. } if *channel == ch && data == "raw body"),
        "{a:?}"
    );
    assert!(
        matches!(&b, ServerFrame::Message { channel, event: Some(e), data, .. }
            if *channel == ch && e == "note" && data == "two\nlines"),
        "{b:?}"
    );

    let r = poll(&gw, &format!("channel={ch}&cursor={}&timeout=5", first.cursor)).await;
    let got: Vec<_> =
        r.messages.iter().map(|m| (m.channel.as_str(), m.event.as_deref(), m.data.as_str())).collect();
    assert_eq!(got, [(ch.as_str(), None, "raw body"), (ch.as_str(), Some("note"), "two\nlines")]);
    assert!(!r.reset);

    // Nothing else arrives, in particular nothing of the other channel.
    sse.assert_quiet(Duration::from_millis(300)).await;
}

/// SIGTERM spreads the reconnect instructions over the drain window instead of closing
/// every client at once, and messages keep flowing to clients waiting for their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_spreads_reconnects_over_the_drain_window() {
    let mut gw = Gateway::start(None, &["--drain-window-secs", "2"]);
    let ch = channel("paced");
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = ws_connect(&gw.ws_url("/ws")).await;
        ws_subscribe(&mut ws, &[&ch]).await;
        clients.push(ws);
    }
    let start = std::time::Instant::now();
    gw.signal("TERM");
    let closes = futures_util::future::join_all(clients.into_iter().map(|mut ws| async move {
        let (code, _) = ws_close_frame(&mut ws).await;
        (code, start.elapsed())
    }))
    .await;
    assert!(closes.iter().all(|(code, _)| *code == 1012), "{closes:?}");
    let first = closes.iter().map(|(_, t)| *t).min().unwrap();
    let last = closes.iter().map(|(_, t)| *t).max().unwrap();
    assert!(last - first >= Duration::from_millis(300), "closes spread over the window: {first:?}..{last:?}");
    assert!(last < Duration::from_secs(4), "all within the 2 s window (+ slack): {last:?}");
    let status = gw.wait_exit(EXIT_BOUND).expect("exits after the drain");
    assert_eq!(status.code(), Some(0));
}

/// Messages published during the rolling-restart test, and the gap between them.
const ROLLING_MESSAGES: usize = 150;
const ROLLING_GAP: Duration = Duration::from_millis(20);
/// Bound for a client of the rolling-restart test to have every message.
const ROLLING_BOUND: Duration = Duration::from_secs(40);

fn rolling_nums() -> Vec<String> {
    (0..ROLLING_MESSAGES).map(|i| format!("m{i}")).collect()
}

/// An SSE client that follows reconnect instructions: when its stream on `urls[0]`
/// ends it resumes on `urls[1]` with `Last-Event-ID`. Returns the data received.
async fn following_sse(urls: [String; 2]) -> Vec<String> {
    let mut got = Vec::new();
    let mut last_id: Option<String> = None;
    let deadline = tokio::time::Instant::now() + ROLLING_BOUND;
    for url in urls.iter().chain(std::iter::repeat(&urls[1])) {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = &last_id {
            req = req.header("Last-Event-ID", id);
        }
        if let Ok(resp) = req.send().await
            && resp.status() == 200
        {
            let mut parser = shared::sse::SseParser::new();
            let mut body = resp.bytes_stream();
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
                for ev in parser.feed(&chunk) {
                    if ev.event.is_none() {
                        got.push(ev.data);
                        last_id = ev.id;
                    }
                }
                if got.len() >= ROLLING_MESSAGES {
                    return got;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "SSE: only {} messages in time", got.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// A WebSocket client that follows reconnect instructions: when `urls[0]` closes it
/// (1012) it resubscribes on `urls[1]` with `since`. Returns the data received.
async fn following_ws(urls: [String; 2], ch: String) -> Vec<String> {
    let mut got = Vec::new();
    let mut last_id: Option<String> = None;
    let mut codes = Vec::new();
    let deadline = tokio::time::Instant::now() + ROLLING_BOUND;
    for url in urls.iter().chain(std::iter::repeat(&urls[1])) {
        let mut ws = ws_connect(url).await;
        let op = match &last_id {
            Some(id) => serde_json::json!({"op": "subscribe", "channels": [ch], "since": {ch.clone(): id}}),
            None => serde_json::json!({"op": "subscribe", "channels": [ch]}),
        };
        ws_send(&mut ws, op).await;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
            match msg {
                tokio_tungstenite::tungstenite::Message::Text(t) => {
                    if let ServerFrame::Message { data, id, .. } = serde_json::from_str(&t).unwrap() {
                        got.push(data);
                        last_id = id;
                    }
                }
                tokio_tungstenite::tungstenite::Message::Close(f) => codes.push(f.map(|f| u16::from(f.code))),
                _ => {}
            }
            if got.len() >= ROLLING_MESSAGES {
                assert_eq!(codes, [Some(1012)], "told to reconnect once, with 1012");
                return got;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "WebSocket: only {} messages in time", got.len());
    }
    unreachable!()
}

/// A long-poll client that moves to `nodes[1]` once `nodes[0]` stops answering,
/// keeping its cursor. Returns the data received.
async fn following_poll(nodes: [String; 2], ch: String) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    let mut node = 0;
    let deadline = tokio::time::Instant::now() + ROLLING_BOUND;
    while got.len() < ROLLING_MESSAGES {
        assert!(tokio::time::Instant::now() < deadline, "long-poll: only {} messages in time", got.len());
        let mut url = format!("{}/poll?channel={ch}&timeout=5", nodes[node]);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        match client.get(&url).send().await {
            Ok(r) if r.status() == 200 => {
                let r: PollResponse = r.json().await.unwrap();
                assert!(!r.reset, "history covers the move");
                got.extend(r.messages.into_iter().map(|m| m.data));
                cursor = Some(r.cursor);
            }
            // Refused or closed: the node is draining; go to the other one.
            _ => node = 1,
        }
    }
    got
}

/// A rolling restart: SIGTERM a node holding SSE, WebSocket and long-poll clients while
/// messages flow; readiness fails at once, each client is told to reconnect, moves to
/// the second node with its last id and ends up with every message exactly once, in
/// order; the drained node exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_moves_clients_to_another_node_without_losing_messages() {
    let redis = Redis::start();
    let mut a = Gateway::start(Some(&redis.url()), &["--drain-window-secs", "2"]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("rolling");
    let sse = tokio::spawn(following_sse([
        a.url(&format!("/sse?channel={ch}")),
        b.url(&format!("/sse?channel={ch}")),
    ]));
    let ws = tokio::spawn(following_ws([a.ws_url("/ws"), b.ws_url("/ws")], ch.clone()));
    let poll = tokio::spawn(following_poll([a.url(""), b.url("")], ch.clone()));
    eventually(WAIT, "three subscribers on node A", || async {
        let open = a.metric("gateway_connections{transport=\"sse\"}").await
            + a.metric("gateway_connections{transport=\"ws\"}").await
            + a.metric(OPEN_POLLS).await;
        (open == 3.0 && a.metric("gateway_subscriptions").await == 3.0).then_some(())
    })
    .await;

    let publisher = reqwest::Client::new();
    for i in 0..ROLLING_MESSAGES {
        if i == 20 {
            a.signal("TERM");
            // Signal delivery is asynchronous; readiness fails as soon as it is handled,
            // while the node still drains (after it exits, nothing answers at all).
            eventually(WAIT, "readiness to fail while draining", || async {
                (a.ready_status().await == 503).then_some(())
            })
            .await;
        }
        let r = publisher.post(b.url(&format!("/publish/{ch}"))).body(format!("m{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(ROLLING_GAP).await;
    }
    assert_eq!(sse.await.unwrap(), rolling_nums(), "SSE");
    assert_eq!(ws.await.unwrap(), rolling_nums(), "WebSocket");
    assert_eq!(poll.await.unwrap(), rolling_nums(), "long-poll");
    let status = a.wait_exit(EXIT_BOUND).expect("the drained node exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        b.metric("gateway_history_recoveries_total{result=\"replayed\"}").await,
        3.0,
        "each client resumed from history on node B (its cursor or last id came from node A)"
    );
}
