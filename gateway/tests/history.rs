//! Delivery guarantees with history: a client that disconnects and resumes with its
//! last id — on another node — gets exactly what it missed, in order, once; a gap that
//! history cannot cover is announced with `reset`; `FCALL fanout_publish` publishes with
//! history from any Redis client; idempotency keys suppress repeats.

mod common;

use common::*;
use shared::protocol::{PublishResponse, PublishResult, ServerFrame};

/// Publishes with history and returns the message's id.
async fn publish_id(gw: &Gateway, ch: &str, data: &str) -> String {
    publish(gw, ch, data).await.id.expect("history publishes get an id")
}

fn nums(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

struct Pair {
    _redis: Redis,
    a: Gateway,
    b: Gateway,
}

fn pair(extra: &[&str]) -> Pair {
    let redis = Redis::start();
    let a = Gateway::start(Some(&redis.url()), extra);
    let b = Gateway::start(Some(&redis.url()), extra);
    Pair { _redis: redis, a, b }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_on_another_node_with_last_event_id() {
    let p = pair(&[]);
    let ch = channel("resume-sse");
    let mut sse = SseClient::connect(&p.a.url(&format!("/sse?channel={ch}"))).await;
    let mut last = String::new();
    for i in 1..=20 {
        let id = publish_id(&p.b, &ch, &format!("m{i}")).await;
        let ev = sse.next().await;
        assert_eq!((ev.data.as_str(), ev.id.as_deref()), (format!("m{i}").as_str(), Some(id.as_str())));
        last = id;
    }
    drop(sse);
    for i in 21..=50 {
        publish_id(&p.a, &ch, &format!("m{i}")).await;
    }
    let req =
        reqwest::Client::new().get(p.b.url(&format!("/sse?channel={ch}"))).header("Last-Event-ID", &last);
    let mut sse = SseClient::connect_with(req).await;
    let mut got = Vec::new();
    for _ in 21..=50 {
        got.push(sse.next().await.data);
    }
    assert_eq!(got, nums(21..=50));
    publish_id(&p.a, &ch, "live").await;
    assert_eq!(sse.next().await.data, "live", "live delivery continues, nothing repeated before it");

    // The query parameter works too (EventSource polyfills, curl).
    let url = p.a.url(&format!("/sse?channel={ch}&last_event_id={last}"));
    let mut sse = SseClient::connect(&url).await;
    assert_eq!(sse.next().await.data, "m21");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_resumes_on_another_node_with_since() {
    let p = pair(&[]);
    let ch = channel("resume-ws");
    let mut ws = ws_connect(&p.a.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&ch]).await;
    let mut last = None;
    for i in 1..=20 {
        publish_id(&p.b, &ch, &format!("m{i}")).await;
        match ws_next(&mut ws).await {
            ServerFrame::Message { data, id, .. } => {
                assert_eq!(data, format!("m{i}"));
                last = id;
            }
            other => panic!("{other:?}"),
        }
    }
    drop(ws);
    for i in 21..=50 {
        publish_id(&p.a, &ch, &format!("m{i}")).await;
    }
    let mut ws = ws_connect(&p.b.ws_url("/ws")).await;
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": {ch.clone(): last}}))
        .await;
    assert_eq!(
        ws_next(&mut ws).await,
        ServerFrame::Subscribed { channels: vec![ch.clone()], recovered: true }
    );
    let mut got = Vec::new();
    for _ in 21..=50 {
        match ws_next(&mut ws).await {
            ServerFrame::Message { data, .. } => got.push(data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, nums(21..=50));
    publish_id(&p.a, &ch, "live").await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Message { data, .. } if data == "live"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_cursor_works_on_any_node() {
    let p = pair(&[]);
    let ch = channel("resume-poll");
    let first = poll(&p.a, &format!("channel={ch}&timeout=0")).await;
    let mut cursor = first.cursor;
    let mut got = Vec::new();
    for i in 1..=20 {
        publish_id(&p.b, &ch, &format!("m{i}")).await;
    }
    while got.len() < 20 {
        let r = poll(&p.a, &format!("channel={ch}&cursor={cursor}&timeout=5")).await;
        assert!(!r.reset);
        got.extend(r.messages.into_iter().map(|m| m.data));
        cursor = r.cursor;
    }
    assert_eq!(got, nums(1..=20));
    for i in 21..=50 {
        publish_id(&p.a, &ch, &format!("m{i}")).await;
    }
    // Next poll goes to the other node: no sticky sessions needed.
    let mut got = Vec::new();
    while got.len() < 30 {
        let r = poll(&p.b, &format!("channel={ch}&cursor={cursor}&timeout=5")).await;
        assert!(!r.reset, "history covers the gap");
        got.extend(r.messages.into_iter().map(|m| m.data));
        cursor = r.cursor;
    }
    assert_eq!(got, nums(21..=50));
    // And back again, live.
    let waiting = tokio::spawn({
        let url = p.a.url(&format!("/poll?channel={ch}&cursor={cursor}&timeout=10"));
        async move { reqwest::get(url).await.unwrap().json::<shared::protocol::PollResponse>().await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    publish_id(&p.b, &ch, "live").await;
    let r = waiting.await.unwrap();
    assert_eq!(r.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["live"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_older_than_history_get_a_reset_then_live_messages() {
    let p = pair(&["--history-size", "5"]);
    let ch = channel("trimmed");
    let first = publish_id(&p.a, &ch, "m1").await;
    // Long-poll: a cursor from the other node, then more than history holds.
    let c = poll(&p.a, &format!("channel={ch}&timeout=0")).await.cursor;
    for i in 2..=300 {
        publish_id(&p.a, &ch, &format!("m{i}")).await;
    }
    let r = poll(&p.b, &format!("channel={ch}&cursor={c}&timeout=5")).await;
    assert!(r.reset && r.reset_channels == [ch.clone()], "{r:?}");
    assert!(r.messages.is_empty(), "no flood of old messages");
    // SSE
    let req =
        reqwest::Client::new().get(p.b.url(&format!("/sse?channel={ch}"))).header("Last-Event-ID", &first);
    let mut sse = SseClient::connect_with(req).await;
    let ev = sse.next().await;
    assert_eq!(ev.event.as_deref(), Some("reset"));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&ev.data).unwrap()["channel"], ch.as_str());
    // WebSocket
    let mut ws = ws_connect(&p.b.ws_url("/ws")).await;
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": first})).await;
    assert_eq!(
        ws_next(&mut ws).await,
        ServerFrame::Subscribed { channels: vec![ch.clone()], recovered: false }
    );
    assert_eq!(ws_next(&mut ws).await, ServerFrame::Reset { channel: ch.clone() });
    // Then live messages, no flood of old ones.
    publish_id(&p.a, &ch, "after").await;
    assert_eq!(sse.next().await.data, "after");
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Message { data, .. } if data == "after"));
    let r = poll(&p.b, &format!("channel={ch}&cursor={}&timeout=5", r.cursor)).await;
    assert_eq!(r.messages.last().map(|m| m.data.as_str()), Some("after"));
    assert!(p.b.metric("gateway_history_recoveries_total{result=\"reset\"}").await >= 2.0);
}

/// A publishing stream's messages (`<stream> <seq>`): a first attempt is appended; one
/// sent again (`<again>` = 1, after a lost reply) is checked against the stream's newest
/// message in history — a repeat answers -1 with the first id, a gap is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_sent_again_is_published_once() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("fcall-seq");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let fcall = |data: &str, sid: &str, seq: &str, again: &str| {
        let out = redis.cli(&["FCALL", "fanout_publish", "1", &ch, data, "", "", sid, seq, again]);
        let mut lines = out.lines().map(str::to_owned);
        (lines.next().unwrap_or_default(), lines.next().unwrap_or_default())
    };
    let (id1, n) = fcall("one", "aa", "1", "");
    assert_eq!(n, "1", "published to the node");
    // Another stream's message in between must not hide this stream's newest.
    fcall("other", "bb", "1", "");
    assert_eq!(fcall("one again", "aa", "1", "1"), (id1.clone(), "-1".into()), "a repeat of the newest");
    let (id2, n) = fcall("two", "aa", "2", "1");
    assert_eq!(n, "1", "the next seq, sent again, is published: {id2}");
    assert_eq!(fcall("one late", "aa", "1", "1"), (String::new(), "-1".into()), "an earlier seq");
    let gap = redis.cli(&["FCALL", "fanout_publish", "1", &ch, "four", "", "", "aa", "4", "1"]);
    assert!(gap.contains("out of order: expected seq 3, got 4"), "{gap}");
    for want in ["one", "other", "two"] {
        assert_eq!(sse.next().await.data, want);
    }
    sse.assert_quiet(std::time::Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_fcall_publishes_with_history() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("fcall");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let out = redis.cli(&["FCALL", "fanout_publish", "1", &ch, "hello\nworld", "greeting"]);
    let id = out.lines().next().unwrap().to_owned();
    assert!(id.parse::<shared::StreamPos>().is_ok(), "first reply line is the id: {out}");
    let ev = sse.next().await;
    assert_eq!(
        (ev.id.as_deref(), ev.event.as_deref(), ev.data.as_str()),
        (Some(id.as_str()), Some("greeting"), "hello\nworld")
    );
    let second = redis.cli(&["FCALL", "fanout_publish", "1", &ch, "second"]);
    let second = second.lines().next().unwrap().to_owned();
    assert_eq!(sse.next().await.data, "second");
    drop(sse);
    // Resumable from the FCALL id.
    let req = reqwest::Client::new().get(gw.url(&format!("/sse?channel={ch}"))).header("Last-Event-ID", &id);
    let mut sse = SseClient::connect_with(req).await;
    assert_eq!(sse.next().await.data, "second");
    // Raw PUBLISH keeps working: live, no id.
    redis.cli(&["PUBLISH", &ch, "raw"]);
    let ev = sse.next().await;
    assert_eq!(
        (ev.data.as_str(), ev.id.as_deref()),
        ("raw", Some(second.as_str())),
        "raw messages carry no id: the last id stays that of the last history message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_suppresses_repeats() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &[]);
    let mem = Gateway::start(None, &[]);
    for gw in [&gw, &mem] {
        let ch = channel("idem");
        let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
        let body = serde_json::json!({"channel": ch, "data": "once", "idempotency_key": "order-42"});
        let http = reqwest::Client::new();
        let post = async || -> PublishResult {
            let r: PublishResponse =
                http.post(gw.url("/api/publish")).json(&body).send().await.unwrap().json().await.unwrap();
            r.results[0].clone()
        };
        let first = post().await;
        let again = post().await;
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(first.id, again.id);
        let raw = http
            .post(gw.url(&format!("/publish/{ch}")))
            .header("Idempotency-Key", "order-42")
            .body("once")
            .send()
            .await
            .unwrap()
            .json::<PublishResult>()
            .await
            .unwrap();
        assert!(raw.duplicate, "the raw endpoint shares the key space via the Idempotency-Key header");
        publish_id(gw, &ch, "next").await;
        assert_eq!(sse.next().await.data, "once");
        assert_eq!(sse.next().await.data, "next", "the repeat was not delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_publisher_loads_the_library_into_a_fresh_redis() {
    use std::io::Write;
    let redis = Redis::start();
    let ch = channel("fresh");
    let mut child = std::process::Command::new(gateway_bin())
        .args(["publish", &ch, "--redis-url", &redis.url()])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"one\ntwo\nthree\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(redis.cli(&["XLEN", &format!("fanout:history:{{{ch}}}")]), "3");
    // A gateway started later serves that history.
    let gw = Gateway::start(Some(&redis.url()), &[]);
    let url = gw.url(&format!("/sse?channel={ch}&last_event_id=0-0"));
    let mut sse = SseClient::connect(&url).await;
    for expected in ["one", "two", "three"] {
        assert_eq!(sse.next().await.data, expected);
    }
}
