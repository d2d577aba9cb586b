//! Three gateway nodes on one Redis: SSE on node 1, WebSocket on node 2, long-poll on
//! node 3 all receive what is published anywhere — `redis-cli PUBLISH`, the HTTP API,
//! and `gateway publish` on stdin — verbatim.

mod common;

use common::*;
use shared::protocol::{PublishResponse, PublishResult, ServerFrame};

struct Cluster {
    redis: Redis,
    nodes: Vec<Gateway>,
}

fn cluster() -> Cluster {
    let redis = Redis::start();
    let nodes = (0..3).map(|_| Gateway::start(Some(&redis.url()), &[])).collect();
    Cluster { redis, nodes }
}

/// Subscribes one client of each transport (SSE node 0, WS node 1, poll node 2), runs
/// `publish` for each payload, and checks all three got every payload verbatim.
async fn check_all_transports(c: &Cluster, ch: &str, payloads: &[&str], publish: impl AsyncFn(&str)) {
    let mut sse = SseClient::connect(&c.nodes[0].url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&c.nodes[1].ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[ch]).await;
    // A first poll gives the cursor; its keep-alive buffers everything after it.
    let first = poll(&c.nodes[2], &format!("channel={ch}&timeout=0")).await;
    assert!(first.messages.is_empty());
    let mut cursor = first.cursor;

    for p in payloads {
        publish(p).await;
    }
    for p in payloads {
        let expected_sse = p.replace("\r\n", "\n");
        assert_eq!(sse.next().await.data, expected_sse, "SSE payload");
        assert_eq!(without_id(ws_next(&mut ws).await), message(ch, p), "WebSocket payload");
    }
    let mut got = Vec::new();
    while got.len() < payloads.len() {
        let r = poll(&c.nodes[2], &format!("channel={ch}&cursor={cursor}&timeout=5")).await;
        assert!(!r.reset, "no gap expected");
        got.extend(r.messages.into_iter().map(|m| m.data));
        cursor = r.cursor;
    }
    assert_eq!(got, payloads, "long-poll payloads, in order");
}

const PAYLOADS: &[&str] = &[
    "hello",
    "line one\nline two\nline three",
    "ünïcødé ✓ — 日本語 🚀",
    "  spaces kept  ",
    "{\"json\": [1, 2, 3]}",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_publish_reaches_every_transport_on_every_node() {
    let c = cluster();
    let ch = channel("cli");
    check_all_transports(&c, &ch, PAYLOADS, async |p| {
        assert_eq!(c.redis.cli(&["PUBLISH", &ch, p]), "3", "one subscriber per node");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_reaches_every_transport_on_every_node() {
    let c = cluster();
    let ch = channel("http");
    let http = reqwest::Client::new();
    check_all_transports(&c, &ch, &PAYLOADS[..3], async |p| {
        let r: PublishResult = http
            .post(c.nodes[0].url(&format!("/publish/{ch}")))
            .body(p.to_owned())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            r,
            PublishResult { channel: ch.clone(), id: r.id.clone(), subscribed: true, duplicate: false }
        );
    })
    .await;
    // The JSON API, to several channels at once, from another node.
    let other = channel("http-other");
    let mut ws = ws_connect(&c.nodes[1].ws_url(&format!("/ws?channel={other}"))).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Subscribed { .. }));
    let r: PublishResponse = http
        .post(c.nodes[2].url("/api/publish"))
        .json(&serde_json::json!({"channels": [ch, other], "data": "multi\nline", "event": "note"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r.results.len(), 2);
    assert!(r.results.iter().all(|r| r.subscribed));
    assert_eq!(
        without_id(ws_next(&mut ws).await),
        ServerFrame::Message {
            channel: other,
            id: None,
            event: Some("note".into()),
            data: "multi\nline".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_publish_reaches_every_transport_on_every_node() {
    let c = cluster();
    let ch = channel("stdin");
    let lines = ["first line", "ünïcødé ✓", "", "last"];
    let mut sse = SseClient::connect(&c.nodes[0].url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&c.nodes[1].ws_url(&format!("/ws?channel={ch}"))).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Subscribed { .. }));
    let first = poll(&c.nodes[2], &format!("channel={ch}&timeout=0")).await;

    let (status, stderr) = publish_cli(&[&ch, "--redis-url", &c.redis.url()], lines.join("\n").as_bytes());
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("4 published, 0 failed"), "{stderr}");

    for l in lines {
        let ev = sse.next().await;
        assert_eq!(ev.data, l);
        assert!(ev.id.is_some(), "stdin publishes go through history and carry an id");
        assert_eq!(without_id(ws_next(&mut ws).await), message(&ch, l));
    }
    let r = poll(&c.nodes[2], &format!("channel={ch}&cursor={}&timeout=5", first.cursor)).await;
    assert_eq!(r.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), lines);

    // --jsonl: each line names its channel; a bad line is reported and the rest still go.
    let input = format!(
        "{{\"channel\":\"{ch}\",\"data\":\"from jsonl\",\"event\":\"e1\"}}\nnot json\n{{\"channel\":\"bad channel\",\"data\":\"x\"}}\n{{\"channel\":\"{ch}\",\"data\":\"two\\nlines\"}}\n"
    );
    let (status, stderr) = publish_cli(&["--jsonl", "--redis-url", &c.redis.url()], input.as_bytes());
    assert_eq!(status.code(), Some(1), "bad lines make the exit code 1: {stderr}");
    assert!(stderr.contains("line 2:") && stderr.contains("line 3:"), "{stderr}");
    assert!(stderr.contains("2 published, 2 failed"), "{stderr}");
    let ev = sse.next().await;
    assert_eq!((ev.event.as_deref(), ev.data.as_str()), (Some("e1"), "from jsonl"));
    assert_eq!(sse.next().await.data, "two\nlines");
    assert_eq!(
        without_id(ws_next(&mut ws).await),
        ServerFrame::Message {
            channel: ch.clone(),
            id: None,
            event: Some("e1".into()),
            data: "from jsonl".into()
        }
    );
    assert_eq!(without_id(ws_next(&mut ws).await), message(&ch, "two\nlines"));
}
