//! Positions at the edges of history: position 0 ("from the start of retained
//! history") on every transport and node, what remains after a trimmed start, and a
//! position history never held (forged, or from the future), which must not starve the
//! client of live messages.

mod common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::*;
use shared::protocol::ServerFrame;

fn nums(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// A position far in the future: no stream has reached it.
const FUTURE: &str = "99999999999999-7";

/// The data of WebSocket messages until `n` have arrived (a reset counts as `reset`).
async fn ws_data(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match ws_next(ws).await {
            ServerFrame::Message { data, .. } => got.push(data),
            ServerFrame::Reset { .. } => got.push("reset".into()),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    got
}

/// The data of SSE events until `n` have arrived (a reset counts as `reset`).
async fn sse_data(sse: &mut SseClient, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let ev = sse.next().await;
        got.push(if ev.event.as_deref() == Some("reset") { "reset".into() } else { ev.data });
    }
    got
}

/// Long-polls `query` on `gw` until `n` messages have arrived; returns them and the
/// last answer's cursor, and whether any answer was a reset.
async fn poll_data(gw: &Gateway, query: &str, n: usize) -> (Vec<String>, String, bool) {
    let (mut got, mut reset) = (Vec::new(), false);
    let mut r = poll(gw, &format!("{query}&timeout=5")).await;
    loop {
        reset |= r.reset;
        got.extend(r.messages.iter().map(|m| m.data.clone()));
        if got.len() >= n {
            return (got, r.cursor, reset);
        }
        r = poll(gw, &format!("{}&cursor={}&timeout=5", query.split('&').next().unwrap(), r.cursor)).await;
    }
}

/// The history position a long-poll cursor carries for `ch`.
fn cursor_position(cursor: &str, ch: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(cursor).unwrap()).unwrap();
    json["h"][ch].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_zero_replays_all_history_then_live_on_every_transport_and_node() {
    let redis = Redis::start();
    let a = Gateway::start(Some(&redis.url()), &[]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    let mem = Gateway::start(None, &[]);
    for (publisher, reader) in [(&a, &b), (&mem, &mem)] {
        let ch = channel("zero");
        for i in 1..=30 {
            publish(publisher, &ch, &format!("m{i}")).await;
        }
        let mut want = nums(1..=30);
        want.push("live".into());
        let mut sse = SseClient::connect(&reader.url(&format!("/sse?channel={ch}&last_event_id=0"))).await;
        let header = reqwest::Client::new()
            .get(reader.url(&format!("/sse?channel={ch}")))
            .header("Last-Event-ID", "0");
        let mut sse_header = SseClient::connect_with(header).await;
        let mut ws = ws_connect(&reader.ws_url("/ws")).await;
        ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": "0"})).await;
        assert_eq!(
            ws_next(&mut ws).await,
            ServerFrame::Subscribed { channels: vec![ch.clone()], recovered: true }
        );
        let (polled, cursor, reset) = poll_data(reader, &format!("channel={ch}&since=0"), 30).await;
        assert!(!reset, "history covers position 0");
        assert_eq!(polled, nums(1..=30), "long-poll from position 0");
        publish(publisher, &ch, "live").await;
        assert_eq!(sse_data(&mut sse, 31).await, want, "SSE last_event_id=0");
        assert_eq!(sse_data(&mut sse_header, 31).await, want, "SSE Last-Event-ID: 0");
        assert_eq!(ws_data(&mut ws, 31).await, want, "WebSocket since 0");
        let r = poll(reader, &format!("channel={ch}&cursor={cursor}&timeout=5")).await;
        assert_eq!(
            r.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(),
            ["live"],
            "then live, once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_zero_after_trimming_gets_a_reset_then_what_remains() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--history-size", "5"]);
    let ch = channel("zero-trimmed");
    for i in 1..=300 {
        publish(&gw, &ch, &format!("m{i}")).await;
    }
    // Trimming is approximate (`MAXLEN ~`): what remains is the stream's length.
    let kept: u32 = redis.cli(&["XLEN", &format!("fanout:history:{{{ch}}}")]).parse().unwrap();
    assert!(kept < 300, "history was trimmed: {kept} kept");
    let mut want = vec!["reset".to_owned()];
    want.extend(nums(301 - kept..=300));
    want.push("live".into());
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}&last_event_id=0"))).await;
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": "0"})).await;
    assert_eq!(
        ws_next(&mut ws).await,
        ServerFrame::Subscribed { channels: vec![ch.clone()], recovered: false }
    );
    let r = poll(&gw, &format!("channel={ch}&since=0&timeout=5")).await;
    assert!(r.reset && r.reset_channels == [ch.clone()], "{r:?}");
    assert_eq!(r.messages.iter().map(|m| m.data.clone()).collect::<Vec<_>>(), nums(301 - kept..=300));
    publish(&gw, &ch, "live").await;
    assert_eq!(sse_data(&mut sse, want.len()).await, want, "SSE: reset, what remains, live");
    assert_eq!(ws_data(&mut ws, want.len()).await, want, "WebSocket: reset, what remains, live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_the_future_gets_a_reset_then_live_messages() {
    let redis = Redis::start();
    let a = Gateway::start(Some(&redis.url()), &[]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    let mem = Gateway::start(None, &[]);
    for (gw, other) in [(&a, &b), (&mem, &mem)] {
        let ch = channel("future");
        let head = publish(gw, &ch, "before").await.id.unwrap();
        let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}&last_event_id={FUTURE}"))).await;
        let mut ws = ws_connect(&gw.ws_url("/ws")).await;
        ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": [ch], "since": FUTURE})).await;
        assert_eq!(
            ws_next(&mut ws).await,
            ServerFrame::Subscribed { channels: vec![ch.clone()], recovered: false }
        );
        let r = poll(other, &format!("channel={ch}&since={FUTURE}&timeout=5")).await;
        assert!(r.reset && r.messages.is_empty(), "{r:?}");
        assert_eq!(
            cursor_position(&r.cursor, &ch),
            Some(head.clone()),
            "the cursor moves back to history's head"
        );
        // A cursor from this very node with a forged position is not trusted either.
        let own = poll(gw, &format!("channel={ch}&timeout=0")).await.cursor;
        let mut forged: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&own).unwrap()).unwrap();
        forged["h"][&ch] = FUTURE.into();
        let forged = URL_SAFE_NO_PAD.encode(forged.to_string());
        let r2 = poll(gw, &format!("channel={ch}&cursor={forged}&timeout=5")).await;
        assert!(r2.reset, "{r2:?}");
        publish(gw, &ch, "live").await;
        assert_eq!(sse_data(&mut sse, 2).await, ["reset", "live"], "SSE is not starved");
        assert_eq!(ws_data(&mut ws, 2).await, ["reset", "live"], "WebSocket is not starved");
        for cursor in [r.cursor, r2.cursor] {
            let next = poll(other, &format!("channel={ch}&cursor={cursor}&timeout=5")).await;
            assert_eq!(next.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["live"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_long_poll_cursor_resumes_exactly_on_another_node() {
    let redis = Redis::start();
    let a = Gateway::start(Some(&redis.url()), &[]);
    let b = Gateway::start(Some(&redis.url()), &[]);
    for timeout in ["0", "1"] {
        let ch = channel("first-cursor");
        // History already holds messages; node A has never delivered one of them.
        for i in 1..=5 {
            publish(&b, &ch, &format!("old{i}")).await;
        }
        let first = poll(&a, &format!("channel={ch}&timeout={timeout}")).await;
        assert!(first.messages.is_empty() && !first.reset, "{first:?}");
        assert!(cursor_position(&first.cursor, &ch).is_some(), "the first cursor carries history's position");
        for i in 1..=30 {
            publish(&a, &ch, &format!("m{i}")).await;
        }
        let (got, _, reset) = poll_data(&b, &format!("channel={ch}&cursor={}", first.cursor), 30).await;
        assert!(!reset, "history covers the gap: no reset");
        assert_eq!(got, nums(1..=30), "exactly the 30 published after the first poll (timeout={timeout})");
    }
}
