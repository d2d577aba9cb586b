//! Redis killed and restarted on the same port while clients stay connected: nodes
//! notice, fail readiness, reconnect with backoff, resubscribe, and messages published
//! after the restart reach the clients that never disconnected.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_resubscribe_after_redis_restarts() {
    let mut redis = Redis::start();
    let n1 = Gateway::start(Some(&redis.url()), &[]);
    let n2 = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("restart");

    let mut sse = SseClient::connect(&n1.url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&n2.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&ch]).await;
    let cursor = poll(&n2, &format!("channel={ch}&timeout=0")).await.cursor;
    assert_eq!(n1.ready_status().await, 200);
    redis.cli(&["PUBLISH", &ch, "before"]);
    assert_eq!(sse.next().await.data, "before");
    assert_eq!(ws_next(&mut ws).await, message(&ch, "before"));

    redis.kill();
    for n in [&n1, &n2] {
        eventually(WAIT, "readyz fails while Redis is down", || async {
            (n.ready_status().await == 503).then_some(())
        })
        .await;
        assert_eq!(n.metric("gateway_broker_link_up").await, 0.0);
        // The node itself stays alive.
        assert_eq!(reqwest::get(n.admin_url("/healthz")).await.unwrap().status(), 200);
    }
    // Publishing while Redis is down is refused clearly, not lost silently.
    let r =
        reqwest::Client::new().post(n1.url(&format!("/publish/{ch}"))).body("lost?").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "broker_unavailable");

    redis.restart();
    for n in [&n1, &n2] {
        eventually(WAIT, "readyz recovers after Redis is back", || async {
            (n.ready_status().await == 200).then_some(())
        })
        .await;
    }
    eventually(WAIT, "both nodes resubscribed", || async { (redis.numsub(&ch) == 2).then_some(()) }).await;
    assert!(n1.metric("gateway_broker_reconnects_total").await >= 1.0);

    redis.cli(&["PUBLISH", &ch, "after restart"]);
    assert_eq!(sse.next().await.data, "after restart", "same SSE connection");
    assert_eq!(ws_next(&mut ws).await, message(&ch, "after restart"), "same WebSocket");
    // The long-poll buffer kept the channel: the old cursor gets the message, and the
    // outage gap is reported as a reset (raw PUBLISH keeps no history).
    let r = poll(&n2, &format!("channel={ch}&cursor={cursor}&timeout=5")).await;
    assert_eq!(r.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["before", "after restart"]);
}
