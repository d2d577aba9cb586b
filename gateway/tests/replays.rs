//! Resumes are read from history a page at a time (a page is what a connection's queue
//! holds): a long gap arrives whole and in order on every transport, a client that
//! does not read its resume holds no more than a page or two, and a connection that
//! resumes again and again is bounded.

mod common;

use common::*;
use futures_util::SinkExt;
use shared::protocol::ServerFrame;
use tokio_tungstenite::tungstenite::Message;

fn nums(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_longer_than_a_queue_arrives_whole_and_in_order() {
    let redis = Redis::start();
    let small_queue = ["--queue-size", "16", "--queue-bytes", "4096"];
    let a = Gateway::start(Some(&redis.url()), &small_queue);
    let b = Gateway::start(Some(&redis.url()), &small_queue);
    let ch = channel("paged");
    let first = publish(&a, &ch, "m1").await.id.unwrap();
    for i in 2..=300 {
        publish(&a, &ch, &format!("m{i}")).await;
    }
    let mut want = nums(2..=300);
    want.push("live".into());
    let mut sse = SseClient::connect(&b.url(&format!("/sse?channel={ch}&last_event_id={first}"))).await;
    let mut ws = ws_connect(&b.ws_url("/ws")).await;
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": first})).await;
    assert_eq!(
        ws_next(&mut ws).await,
        ServerFrame::Subscribed { channels: vec![ch.clone()], recovered: true }
    );
    // Long-poll: an answer holds at most a page; the cursor goes on from its last message.
    let (mut polled, mut answers) = (Vec::new(), 0);
    let mut r = poll(&b, &format!("channel={ch}&since={first}&timeout=5")).await;
    loop {
        answers += 1;
        assert!(r.messages.len() <= 16 && !r.reset, "an answer holds at most a page: {}", r.messages.len());
        polled.extend(r.messages.iter().map(|m| m.data.clone()));
        if polled.len() >= 299 {
            break;
        }
        // The next poll may go to either node.
        let node = if answers % 2 == 0 { &a } else { &b };
        r = poll(node, &format!("channel={ch}&cursor={}&timeout=5", r.cursor)).await;
    }
    assert_eq!(polled, nums(2..=300), "long-poll: every message once, in order");
    assert!(answers >= 299 / 16, "{answers} answers");
    publish(&a, &ch, "live").await;
    let mut got = Vec::new();
    while got.len() < want.len() {
        got.push(sse.next().await.data);
    }
    assert_eq!(got, want, "SSE");
    let mut got = Vec::new();
    while got.len() < want.len() {
        match ws_next(&mut ws).await {
            ServerFrame::Message { data, .. } => got.push(data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, want, "WebSocket");
    let r = poll(&b, &format!("channel={ch}&cursor={}&timeout=5", r.cursor)).await;
    assert_eq!(r.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["live"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_resume_is_not_sent_all_of_it() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--queue-size", "16", "--ws-ping-secs", "1"]);
    let ch = channel("unread");
    let big = "x".repeat(60_000);
    for _ in 0..300 {
        publish(&gw, &ch, &big).await;
    }
    // 18 MB of history: far more than the socket buffers between the two sides take.
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    let sub = serde_json::json!({"op": "subscribe", "channels": [ch], "since": "0"});
    ws.send(Message::Text(sub.to_string().into())).await.unwrap();
    // ... and never read: the node reads history a page at a time, as it is written.
    let replayed = "gateway_history_replayed_messages_total";
    let read = eventually(WAIT, "the resume under way", || async {
        let n = gw.metric(replayed).await;
        (n > 0.0).then_some(n)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let later = gw.metric(replayed).await;
    assert!(
        later < 300.0,
        "history read page by page as written, not all 300 at once ({read}, then {later})"
    );
    // The stalled writer is cut off, counted as a slow consumer.
    eventually(WAIT, "the stalled client cut off", || async {
        (gw.metric("gateway_connections{transport=\"ws\"}").await == 0.0).then_some(())
    })
    .await;
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_again_and_again_on_one_connection_is_bounded() {
    let gw = Gateway::start(None, &["--max-channels-per-connection", "2"]);
    let ch = channel("again");
    let first = publish(&gw, &ch, "m1").await.id.unwrap();
    publish(&gw, &ch, "m2").await;
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    // Four resumes a minute for a connection of two channels.
    for round in 0..4 {
        ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": first})).await;
        assert!(matches!(ws_next(&mut ws).await, ServerFrame::Subscribed { .. }), "round {round}");
        assert!(
            matches!(ws_next(&mut ws).await, ServerFrame::Message { data, .. } if data == "m2"),
            "round {round}"
        );
        ws_send(&mut ws, serde_json::json!({"op": "unsubscribe", "channels": [ch]})).await;
        assert!(matches!(ws_next(&mut ws).await, ServerFrame::Unsubscribed { .. }));
    }
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": first})).await;
    match ws_next(&mut ws).await {
        ServerFrame::Error { code, message } => {
            assert_eq!(code, "rate_limited", "{message}");
            assert!(message.contains("resumes"), "{message}");
        }
        other => panic!("expected the fifth resume refused, got {other:?}"),
    }
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"resumes\"}").await, 1.0);
    // The connection stays usable, and a plain subscribe is not a resume.
    ws_subscribe(&mut ws, &[&ch]).await;
    publish(&gw, &ch, "m3").await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Message { data, .. } if data == "m3"));
}
