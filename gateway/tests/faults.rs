//! Faults under a steady stream of history messages: Redis paused (SIGSTOP) and
//! resumed, a node killed (SIGKILL) while its clients move to another node, Redis
//! restarted with and without persistence, a node's link cut for longer than its
//! clients' queues. Clients must end with every message, in
//! order, exactly once — or, when history is gone, be told with `reset`.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures_util::StreamExt;
use shared::{
    protocol::{PublishResponse, ServerFrame},
    sse::SseParser,
};

const MESSAGES: usize = 1000;

/// Publishes `m0..m{n-1}` through the HTTP API, spread over `urls`, each with an
/// idempotency key and retried (on any node) until accepted, so a fault never loses or
/// doubles a message.
async fn publish_stream(urls: Arc<Mutex<Vec<String>>>, ch: String, n: usize) {
    publish_range(urls, ch, 0..n).await;
}

/// [`publish_stream`] for `m{start}..m{end-1}`.
async fn publish_range(urls: Arc<Mutex<Vec<String>>>, ch: String, range: std::ops::Range<usize>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(8)).build().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for i in range {
        let body =
            serde_json::json!({"channel": ch, "data": format!("m{i}"), "idempotency_key": format!("k{i}")});
        let mut attempt = 0usize;
        loop {
            assert!(tokio::time::Instant::now() < deadline, "publisher gave up at m{i}");
            let url = {
                let urls = urls.lock().unwrap();
                urls[(i + attempt) % urls.len()].clone()
            };
            let ok = match http.post(format!("{url}/api/publish")).json(&body).send().await {
                Ok(r) if r.status().is_success() => r.json::<PublishResponse>().await.is_ok(),
                _ => false,
            };
            if ok {
                break;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn expected() -> Vec<String> {
    (0..MESSAGES).map(|i| format!("m{i}")).collect()
}

/// What a client saw: payloads in order, the last id, resets, and why the server
/// disconnected it (SSE `disconnect` event, WebSocket `error` frame), if it did.
#[derive(Default, Debug)]
struct Seen {
    data: Vec<String>,
    last_id: Option<String>,
    resets: usize,
    disconnected: Option<String>,
}

/// Reads an SSE stream into `seen` until it ends.
async fn read_sse(url: String, last_id: Option<String>, seen: Arc<Mutex<Seen>>) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    let Ok(resp) = req.send().await else { return };
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::new();
    while let Some(Ok(chunk)) = stream.next().await {
        for ev in parser.feed(&chunk) {
            let mut s = seen.lock().unwrap();
            match ev.event.as_deref() {
                Some("reset") => s.resets += 1,
                Some("disconnect") => s.disconnected = Some(ev.data),
                Some(_) => {}
                None => {
                    s.data.push(ev.data);
                    s.last_id = ev.id;
                }
            }
        }
    }
}

/// Reads a WebSocket into `seen` until it closes.
async fn read_ws(url: String, ch: String, since: Option<String>, seen: Arc<Mutex<Seen>>) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else { return };
    let mut op = serde_json::json!({"op": "subscribe", "channels": [ch]});
    if let Some(s) = since {
        op["since"] = s.into();
    }
    ws_send(&mut ws, op).await;
    while let Some(Ok(msg)) = ws.next().await {
        let tokio_tungstenite::tungstenite::Message::Text(t) = msg else { continue };
        let mut s = seen.lock().unwrap();
        match serde_json::from_str::<ServerFrame>(&t).unwrap() {
            ServerFrame::Message { data, id, .. } => {
                s.data.push(data);
                s.last_id = id;
            }
            ServerFrame::Reset { .. } => s.resets += 1,
            ServerFrame::Error { code, .. } => s.disconnected = Some(code),
            _ => {}
        }
    }
}

/// Long-polls `urls[0]` from `cursor` until it fails, then the next node, with the same cursor, until
/// every message has arrived. Returns the payloads in arrival order.
async fn poll_loop(urls: Vec<String>, ch: String, mut cursor: String) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut node = 0;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while got.len() < MESSAGES {
        assert!(tokio::time::Instant::now() < deadline, "long-poll stalled at {} messages", got.len());
        let url = format!("{}/poll?channel={ch}&cursor={cursor}&timeout=5", urls[node]);
        let r = match http.get(url).send().await {
            Ok(r) if r.status().is_success() => r.json::<shared::protocol::PollResponse>().await.unwrap(),
            _ => {
                node = (node + 1).min(urls.len() - 1);
                continue;
            }
        };
        assert!(!r.reset, "history covers every long-poll gap (after {} messages)", got.len());
        got.extend(r.messages.into_iter().map(|m| m.data));
        cursor = r.cursor;
    }
    got
}

async fn wait_for_all(seen: &Arc<Mutex<Seen>>, what: &str) {
    wait_for(seen, MESSAGES, what).await;
}

/// Waits until `seen` holds `n` messages (or the server disconnected it), then checks
/// that they are exactly `m0..m{n-1}`.
async fn wait_for(seen: &Arc<Mutex<Seen>>, n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        {
            let s = seen.lock().unwrap();
            if s.data.len() >= n || s.disconnected.is_some() || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_exactly(seen, n, what);
}

fn assert_exactly_all(seen: &Arc<Mutex<Seen>>, what: &str) {
    assert_exactly(seen, MESSAGES, what);
}

fn assert_exactly(seen: &Arc<Mutex<Seen>>, n: usize, what: &str) {
    let s = seen.lock().unwrap();
    assert_eq!(
        s.disconnected,
        None,
        "{what}: the server disconnected the client after {} messages",
        s.data.len()
    );
    assert_eq!(s.resets, 0, "{what}: no reset expected");
    let expected: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    if s.data != expected {
        let first_bad = s.data.iter().zip(&expected).position(|(a, b)| a != b);
        let around = first_bad.map(|i| &s.data[i.saturating_sub(2)..(i + 3).min(s.data.len())]);
        panic!("{what}: {} messages, first difference at {first_bad:?}: {around:?}", s.data.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_with_sigstop_loses_nothing() {
    let redis = Redis::start();
    let n1 = Gateway::start(Some(&redis.url()), &[]);
    let n2 = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("sigstop");
    let sse = Arc::new(Mutex::new(Seen::default()));
    let ws = Arc::new(Mutex::new(Seen::default()));
    let sse_task = tokio::spawn(read_sse(n1.url(&format!("/sse?channel={ch}")), None, sse.clone()));
    let ws_task = tokio::spawn(read_ws(n2.ws_url("/ws"), ch.clone(), None, ws.clone()));
    eventually(WAIT, "subscribed on both nodes", || async { (redis.numsub(&ch) == 2).then_some(()) }).await;

    let urls = Arc::new(Mutex::new(vec![n1.url(""), n2.url("")]));
    let publisher = tokio::spawn(publish_stream(urls, ch.clone(), MESSAGES));
    eventually(WAIT, "stream under way", || async { (sse.lock().unwrap().data.len() > 200).then_some(()) })
        .await;
    redis.signal("STOP");
    eventually(WAIT, "the wedged link is noticed", || async {
        (n1.ready_status().await == 503 && n2.ready_status().await == 503).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.signal("CONT");
    publisher.await.unwrap();
    wait_for_all(&sse, "SSE client got everything").await;
    wait_for_all(&ws, "WebSocket client got everything").await;
    assert_exactly_all(&sse, "SSE");
    assert_exactly_all(&ws, "WebSocket");
    assert_eq!(n1.ready_status().await, 200);
    assert!(n1.metric("gateway_history_recoveries_total{result=\"replayed\"}").await >= 1.0);
    sse_task.abort();
    ws_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_on_another() {
    let redis = Redis::start();
    let mut n1 = Gateway::start(Some(&redis.url()), &[]);
    let n2 = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("sigkill");
    let sse = Arc::new(Mutex::new(Seen::default()));
    let ws = Arc::new(Mutex::new(Seen::default()));
    let sse_task = tokio::spawn(read_sse(n1.url(&format!("/sse?channel={ch}")), None, sse.clone()));
    let ws_task = tokio::spawn(read_ws(n1.ws_url("/ws"), ch.clone(), None, ws.clone()));
    eventually(WAIT, "subscribed", || async { (redis.numsub(&ch) == 1).then_some(()) }).await;
    // A long-poll client polling node 1 in a loop, moving to node 2 when node 1 fails.
    let start = poll(&n1, &format!("channel={ch}&timeout=0")).await.cursor;
    let poller = tokio::spawn(poll_loop(vec![n1.url(""), n2.url("")], ch.clone(), start));

    let urls = Arc::new(Mutex::new(vec![n2.url("")]));
    let publisher = tokio::spawn(publish_stream(urls, ch.clone(), MESSAGES));
    eventually(WAIT, "stream under way", || async { (sse.lock().unwrap().data.len() > 300).then_some(()) })
        .await;

    n1.signal("KILL");
    n1.wait_exit(WAIT).expect("node 1 died");
    tokio::time::timeout(WAIT, sse_task).await.expect("SSE stream ends with the node").unwrap();
    tokio::time::timeout(WAIT, ws_task).await.expect("WebSocket ends with the node").unwrap();
    // Reconnect to node 2 with the last ids seen.
    let (sse_last, ws_last) = (sse.lock().unwrap().last_id.clone(), ws.lock().unwrap().last_id.clone());
    assert!(sse_last.is_some() && ws_last.is_some());
    let sse_task = tokio::spawn(read_sse(n2.url(&format!("/sse?channel={ch}")), sse_last, sse.clone()));
    let ws_task = tokio::spawn(read_ws(n2.ws_url("/ws"), ch.clone(), ws_last, ws.clone()));
    publisher.await.unwrap();
    let polled =
        tokio::time::timeout(Duration::from_secs(60), poller).await.expect("long-poll finished").unwrap();
    assert_eq!(polled, expected(), "long-poll: every message, in order, once");
    wait_for_all(&sse, "SSE client got everything").await;
    wait_for_all(&ws, "WebSocket client got everything").await;
    assert_exactly_all(&sse, "SSE");
    assert_exactly_all(&ws, "WebSocket");
    sse_task.abort();
    ws_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_persistence_loses_nothing() {
    let mut redis = Redis::start_persistent();
    let n1 = Gateway::start(Some(&redis.url()), &[]);
    let n2 = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("persist");
    let sse = Arc::new(Mutex::new(Seen::default()));
    let ws = Arc::new(Mutex::new(Seen::default()));
    let sse_task = tokio::spawn(read_sse(n1.url(&format!("/sse?channel={ch}")), None, sse.clone()));
    let ws_task = tokio::spawn(read_ws(n2.ws_url("/ws"), ch.clone(), None, ws.clone()));
    eventually(WAIT, "subscribed", || async { (redis.numsub(&ch) == 2).then_some(()) }).await;

    let urls = Arc::new(Mutex::new(vec![n1.url(""), n2.url("")]));
    let publisher = tokio::spawn(publish_stream(urls, ch.clone(), MESSAGES));
    eventually(WAIT, "stream under way", || async { (ws.lock().unwrap().data.len() > 300).then_some(()) })
        .await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    publisher.await.unwrap();
    wait_for_all(&sse, "SSE client got everything").await;
    wait_for_all(&ws, "WebSocket client got everything").await;
    assert_exactly_all(&sse, "SSE");
    assert_exactly_all(&ws, "WebSocket");
    sse_task.abort();
    ws_task.abort();
}

/// A node whose pub/sub link comes back after more messages than a client's queue holds
/// replays them all to its clients at once: that burst is the node catching up, not a
/// slow consumer, and must not get the clients disconnected. (Under load, a node that
/// reconnects a few seconds after a restarted Redis is back replays more than the
/// default queue of 512: `redis_restart_with_persistence_loses_nothing` failed so. Here
/// node 1 is frozen while its link is cut and node 2 publishes, so the replay is ten
/// queues long whatever the machine's speed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_longer_than_the_queue_is_not_a_slow_consumer() {
    const QUEUE: usize = 16;
    const BEFORE: usize = 5;
    const TOTAL: usize = BEFORE + 10 * QUEUE;
    let redis = Redis::start();
    let n1 = Gateway::start(Some(&redis.url()), &["--queue-size", &QUEUE.to_string()]);
    let n2 = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("burst");
    let sse = Arc::new(Mutex::new(Seen::default()));
    let ws = Arc::new(Mutex::new(Seen::default()));
    let sse_task = tokio::spawn(read_sse(n1.url(&format!("/sse?channel={ch}")), None, sse.clone()));
    let ws_task = tokio::spawn(read_ws(n1.ws_url("/ws"), ch.clone(), None, ws.clone()));
    eventually(WAIT, "both clients subscribed", || async {
        (n1.metric("gateway_subscriptions").await == 2.0 && redis.numsub(&ch) == 1).then_some(())
    })
    .await;
    let urls = Arc::new(Mutex::new(vec![n2.url("")]));
    publish_stream(urls.clone(), ch.clone(), BEFORE).await;
    wait_for(&sse, BEFORE, "SSE before the outage").await;
    wait_for(&ws, BEFORE, "WebSocket before the outage").await;

    n1.signal("STOP");
    assert_eq!(redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]), "1", "node 1's link is cut");
    publish_range(urls, ch.clone(), BEFORE..TOTAL).await;
    n1.signal("CONT");

    wait_for(&sse, TOTAL, "SSE client got the replay").await;
    wait_for(&ws, TOTAL, "WebSocket client got the replay").await;
    assert!(n1.metric("gateway_history_recoveries_total{result=\"replayed\"}").await >= 1.0);
    assert_eq!(n1.metric("gateway_slow_consumer_disconnects_total{transport=\"sse\"}").await, 0.0);
    assert_eq!(n1.metric("gateway_slow_consumer_disconnects_total{transport=\"ws\"}").await, 0.0);
    sse_task.abort();
    ws_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_sends_reset_then_live() {
    let mut redis = Redis::start();
    let n1 = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("wiped");
    let sse = Arc::new(Mutex::new(Seen::default()));
    let ws = Arc::new(Mutex::new(Seen::default()));
    let sse_task = tokio::spawn(read_sse(n1.url(&format!("/sse?channel={ch}")), None, sse.clone()));
    let ws_task = tokio::spawn(read_ws(n1.ws_url("/ws"), ch.clone(), None, ws.clone()));
    eventually(WAIT, "subscribed", || async { (redis.numsub(&ch) == 1).then_some(()) }).await;
    let urls = Arc::new(Mutex::new(vec![n1.url("")]));
    publish_stream(urls.clone(), ch.clone(), 50).await;
    eventually(WAIT, "first messages", || async { (ws.lock().unwrap().data.len() == 50).then_some(()) })
        .await;
    // A long-poll waiting on the node when history is lost is answered with a reset.
    let cursor = poll(&n1, &format!("channel={ch}&timeout=0")).await.cursor;
    let waiting = tokio::spawn({
        let url = n1.url(&format!("/poll?channel={ch}&cursor={cursor}&timeout=20"));
        async move { reqwest::get(url).await.unwrap().json::<shared::protocol::PollResponse>().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    redis.kill();
    redis.restart(); // empty: history is gone
    eventually(WAIT, "node ready again", || async { (n1.ready_status().await == 200).then_some(()) }).await;
    eventually(WAIT, "clients told about the gap", || async {
        (sse.lock().unwrap().resets == 1 && ws.lock().unwrap().resets == 1).then_some(())
    })
    .await;
    let answer = tokio::time::timeout(WAIT, waiting).await.expect("the held poll is answered").unwrap();
    assert!(answer.reset && answer.reset_channels == [ch.clone()], "{answer:?}");
    assert!(answer.messages.is_empty(), "a reset is not a message: {answer:?}");
    publish_stream(urls, ch.clone(), 1).await;
    eventually(WAIT, "live delivery continues", || async {
        let (s, w) = (sse.lock().unwrap(), ws.lock().unwrap());
        (s.data.len() == 51 && w.data.len() == 51).then_some(())
    })
    .await;
    assert_eq!(sse.lock().unwrap().data.last().map(String::as_str), Some("m0"));
    sse_task.abort();
    ws_task.abort();
}
