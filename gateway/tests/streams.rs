//! Streaming publish (`POST /publish/{channel}?stream=lines|sse`, `gateway publish
//! --format sse`) and the safety of request bodies: each line or event is published as
//! it arrives, in order across a Redis restart; a bad one stops the stream with its
//! number and keeps what came before; keys are checked on the head, stalled bodies get
//! 408, and the bytes of bodies a node holds are bounded.

mod common;

use std::time::Duration;

use common::*;
use shared::protocol::ServerFrame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A request written by hand on a raw socket, so the test decides when each byte goes.
struct RawPost {
    s: TcpStream,
}

impl RawPost {
    /// Sends the head of `POST path` with `headers` (each ending in `\r\n`).
    async fn start(gw: &Gateway, path: &str, headers: &str) -> Self {
        let mut s = TcpStream::connect(gw.public).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nhost: test\r\n{headers}\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        Self { s }
    }

    /// A chunked streaming publish to `channel` in `format`.
    async fn stream(gw: &Gateway, channel: &str, format: &str) -> Self {
        Self::start(gw, &format!("/publish/{channel}?stream={format}"), "transfer-encoding: chunked\r\n")
            .await
    }

    /// Sends one chunk.
    async fn chunk(&mut self, data: &str) {
        let framed = format!("{:x}\r\n{data}\r\n", data.len());
        self.s.write_all(framed.as_bytes()).await.unwrap();
    }

    /// Sends raw bytes.
    async fn raw(&mut self, data: &[u8]) {
        self.s.write_all(data).await.unwrap();
    }

    /// Ends a chunked body and reads the answer.
    async fn finish(mut self) -> (u16, serde_json::Value, String) {
        self.s.write_all(b"0\r\n\r\n").await.unwrap();
        self.answer().await
    }

    /// Reads one answer: status, JSON body, and the head (lowercase).
    async fn answer(&mut self) -> (u16, serde_json::Value, String) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    if buf.len() >= end + 4 + len {
                        let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
                        let status = head[9..12].parse().unwrap();
                        return (status, body, head);
                    }
                }
                let n = self.s.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "the connection closed before the answer: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("an answer in time")
    }

    /// Whether the server closed the connection (EOF) within `d`.
    async fn closed_within(&mut self, d: Duration) -> bool {
        let mut b = [0u8; 1024];
        let until = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(until, self.s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn toks(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("tok{i}")).collect()
}

/// The next WebSocket message's data.
async fn ws_data(ws: &mut Ws) -> String {
    match ws_next(ws).await {
        ServerFrame::Message { data, .. } => data,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_line_reaches_subscribers_on_another_node_while_the_request_is_open() {
    let redis = Redis::start();
    let a = Gateway::start(Some(&redis.url()), &[]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("stream-lines");
    let mut sse = SseClient::connect(&b.url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&b.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&ch]).await;
    let mut post = RawPost::stream(&a, &ch, "lines").await;
    let mut first_id = None;
    for (i, tok) in toks(10).iter().enumerate() {
        // A line split over two chunks arrives once it is whole.
        let (head, tail) = tok.split_at(2);
        post.chunk(head).await;
        post.chunk(&format!("{tail}\n")).await;
        let ev = sse.next().await;
        assert_eq!(ev.data, *tok, "SSE gets line {} while the request is open", i + 1);
        first_id.get_or_insert(ev.id);
        assert_eq!(ws_data(&mut ws).await, *tok, "WebSocket too");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer, _) = post.finish().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["channel"], ch.as_str());
    assert_eq!(answer["published"], 10);
    assert_eq!(answer["first_id"].as_str(), first_id.flatten().as_deref(), "{answer}");
    assert!(answer["last_id"].as_str().is_some_and(|id| id.parse::<shared::StreamPos>().is_ok()), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_body_becomes_the_same_events() {
    let gw = Gateway::start(None, &[]);
    let ch = channel("stream-sse");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut post = RawPost::stream(&gw, &ch, "sse").await;
    let body = ": keep-alive\nretry: 3000\nevent: token\ndata: Hello\ndata: world\n\ndata: {\"x\":1}\n\nevent: done\ndata: [DONE]\n\n";
    post.chunk(&body[..20]).await;
    post.chunk(&body[20..]).await;
    for (event, data) in [(Some("token"), "Hello\nworld"), (None, "{\"x\":1}"), (Some("done"), "[DONE]")] {
        let ev = sse.next().await;
        assert_eq!((ev.event.as_deref(), ev.data.as_str()), (event, data));
    }
    let (status, answer, _) = post.finish().await;
    assert_eq!((status, answer["published"].as_u64()), (200, Some(3)), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_or_event_stops_the_stream_and_what_came_before_stays() {
    let gw = Gateway::start(None, &["--max-payload-bytes", "32"]);
    let ch = channel("stream-bad");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut post = RawPost::stream(&gw, &ch, "lines").await;
    post.chunk(&format!("one\ntwo\n{}\nfour\n", "x".repeat(33))).await;
    let (status, answer, head) = post.finish().await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"], "payload_too_large");
    assert!(answer["message"].as_str().unwrap().starts_with("line 3: "), "{answer}");
    assert_eq!(answer["published"], 2, "what came before stays published: {answer}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(sse.next().await.data, "one");
    assert_eq!(sse.next().await.data, "two");

    let mut post = RawPost::stream(&gw, &ch, "sse").await;
    post.chunk("data: fine\n\nevent: not allowed\ndata: x\n\ndata: never\n\n").await;
    let (status, answer, _) = post.finish().await;
    assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_event")), "{answer}");
    assert!(answer["message"].as_str().unwrap().starts_with("event 2: "), "{answer}");
    assert_eq!(answer["published"], 1);
    assert_eq!(sse.next().await.data, "fine");
    sse.assert_quiet(Duration::from_millis(300)).await;

    let resp =
        reqwest::Client::new().post(gw.url(&format!("/publish/{ch}?stream=xml"))).body("x").send().await;
    assert_eq!(resp.unwrap().status(), 400, "an unknown stream format is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_kept_across_a_redis_restart_during_a_stream() {
    let mut redis = Redis::start_persistent();
    let a = Gateway::start(Some(&redis.url()), &[]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("stream-restart");
    let mut sse = SseClient::connect(&b.url(&format!("/sse?channel={ch}"))).await;
    let mut post = RawPost::stream(&a, &ch, "lines").await;
    let n = 300;
    for (i, tok) in toks(n).iter().enumerate() {
        post.chunk(&format!("{tok}\n")).await;
        if i == 100 {
            redis.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            redis.restart();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (status, answer, _) = post.finish().await;
    assert_eq!((status, answer["published"].as_u64()), (200, Some(n as u64)), "{answer}");
    let mut got = Vec::new();
    while got.len() < n as usize {
        let ev = sse.next().await;
        assert_ne!(ev.event.as_deref(), Some("reset"), "history covers the restart (AOF on)");
        got.push(ev.data);
    }
    assert_eq!(got, toks(n), "every token once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_end_a_stream_with_what_it_published() {
    let gw = Gateway::start(None, &["--stream-max-bytes", "64", "--stream-max-secs", "1"]);
    let ch = channel("stream-limits");
    let mut post = RawPost::stream(&gw, &ch, "lines").await;
    post.chunk("short\n").await;
    post.chunk(&format!("{}\n", "y".repeat(70))).await;
    let (status, answer, _) = post.finish().await;
    assert_eq!((status, answer["published"].as_u64()), (413, Some(1)), "{answer}");
    let mut post = RawPost::stream(&gw, &ch, "lines").await;
    post.chunk("a\n").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, answer, _) = post.answer().await;
    assert_eq!((status, answer["error"].as_str()), (408, Some("request_timeout")), "{answer}");
    assert_eq!(answer["published"], 1, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_publish_reads_sse_from_stdin() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &[]);
    let input =
        "event: token\ndata: Hi\n\n: comment\ndata: two\ndata: lines\n\nevent: done\ndata: [DONE]\n\n";
    for target in [["--redis-url", &redis.url()], ["--gateway-url", &gw.url("")]] {
        let ch = channel("stdin-sse");
        let mut ws = ws_connect(&gw.ws_url("/ws")).await;
        ws_subscribe(&mut ws, &[&ch]).await;
        let (status, stderr) = publish_cli(&[&ch, "--format", "sse", target[0], target[1]], input.as_bytes());
        assert!(status.success() && stderr.contains("3 published, 0 failed"), "{target:?}: {stderr}");
        for (event, data) in [(Some("token"), "Hi"), (None, "two\nlines"), (Some("done"), "[DONE]")] {
            match ws_next(&mut ws).await {
                ServerFrame::Message { event: e, data: d, .. } => {
                    assert_eq!((e.as_deref(), d.as_str()), (event, data), "{target:?}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_checked_on_the_head_before_the_body() {
    let gw = Gateway::start(None, &["--api-keys", "k1"]);
    let ch = channel("head-key");
    let mut post = RawPost::start(&gw, &format!("/publish/{ch}"), "content-length: 100000\r\n").await;
    post.raw(b"only a little of the body").await;
    let (status, answer, head) = post.answer().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthorized")),
        "answered before the body ends"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(post.closed_within(Duration::from_secs(3)).await, "the connection closes");
    let mut post =
        RawPost::start(&gw, "/api/publish", "content-length: 100000\r\ncontent-type: application/json\r\n")
            .await;
    post.raw(b"{\"channel\":").await;
    assert_eq!(post.answer().await.0, 401, "the JSON endpoint too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_the_connection_closes() {
    let gw = Gateway::start(None, &["--body-timeout-secs", "1"]);
    let ch = channel("stall");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    for path in [format!("/publish/{ch}"), "/api/publish".to_owned()] {
        let mut post =
            RawPost::start(&gw, &path, "content-length: 1000\r\ncontent-type: application/json\r\n").await;
        post.raw(b"{\"channel\"").await;
        let started = std::time::Instant::now();
        let (status, answer, _) = post.answer().await;
        assert_eq!((status, answer["error"].as_str()), (408, Some("request_timeout")), "{path}: {answer}");
        assert!(started.elapsed() < Duration::from_secs(5), "{path}: answered after the idle timeout");
        assert!(post.closed_within(Duration::from_secs(3)).await, "{path}: the connection closes");
    }
    publish(&gw, &ch, "others unharmed").await;
    assert_eq!(sse.next().await.data, "others unharmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_of_bodies_a_node_holds_are_bounded() {
    let gw = Gateway::start(None, &["--max-body-bytes-in-flight", "100000", "--max-payload-bytes", "65536"]);
    let ch = channel("budget");
    let head = "content-length: 65000\r\n";
    let mut first = RawPost::start(&gw, &format!("/publish/{ch}"), head).await;
    first.raw(&vec![b'a'; 60000]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = RawPost::start(&gw, &format!("/publish/{ch}"), head).await;
    second.raw(&vec![b'b'; 60000]).await;
    let (status, answer, _) = second.answer().await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("over_capacity")), "{answer}");
    first.raw(&vec![b'a'; 5000]).await;
    let (status, answer, _) = first.answer().await;
    assert_eq!(status, 200, "the body within the budget is published: {answer}");
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"body_bytes\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_publish_ops_are_pipelined_and_answered_in_op_order() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let redis = Redis::start();
    let a = Gateway::start(Some(&redis.url()), &["--ws-publish"]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("ws-pipeline");
    let mut sub = ws_connect(&b.ws_url("/ws")).await;
    ws_subscribe(&mut sub, &[&ch]).await;
    let mut publisher = ws_connect(&a.ws_url("/ws")).await;
    // 300 ops written at once, none waiting for an answer: a bad one in the middle,
    // a ping at the end.
    const N: usize = 300;
    const BAD: usize = 150;
    for i in 0..N {
        let op = if i == BAD {
            serde_json::json!({"op": "publish", "channel": "bad channel", "data": "x"})
        } else {
            serde_json::json!({"op": "publish", "channel": ch, "data": format!("t{i}")})
        };
        publisher.feed(Message::Text(op.to_string().into())).await.unwrap();
    }
    publisher.feed(Message::Text(r#"{"op":"ping","id":"end"}"#.into())).await.unwrap();
    publisher.flush().await.unwrap();
    // One answer per op, in op order; ids rise with the ops.
    let mut last: Option<shared::StreamPos> = None;
    for i in 0..N {
        match ws_next(&mut publisher).await {
            ServerFrame::Published { channel, id } if i != BAD => {
                assert_eq!(channel, ch);
                let id: shared::StreamPos = id.expect("history id").parse().unwrap();
                assert!(last.is_none_or(|l| l < id), "op {i}: id {id} after {last:?}");
                last = Some(id);
            }
            ServerFrame::Error { code, .. } if i == BAD => assert_eq!(code, "invalid_channel"),
            other => panic!("op {i}: {other:?}"),
        }
    }
    assert_eq!(ws_next(&mut publisher).await, ServerFrame::Pong { id: Some(serde_json::json!("end")) });
    // The subscriber on the other node gets every good one, in order.
    for i in (0..N).filter(|&i| i != BAD) {
        assert_eq!(ws_data(&mut sub).await, format!("t{i}"));
    }
    // They went to Redis several to a pipeline, not one round trip each.
    let sum = a.metric("gateway_publish_batch_messages_sum").await;
    let count = a.metric("gateway_publish_batch_messages_count").await;
    assert_eq!(sum, (N - 1) as f64, "every good op published once");
    assert!(count < sum, "{sum} publishes in {count} pipelines");
}
