//! Each node holds exactly one Redis subscription per channel with local subscribers,
//! whatever their number, and none once they have left (after the linger).

mod common;

use common::*;

/// Pub/sub connections in `CLIENT LIST` and how many channels each has subscribed.
fn pubsub_clients(redis: &Redis) -> Vec<u64> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("sub=")).and_then(|n| n.parse().ok()))
        .filter(|&n| n > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_subscription_per_channel_per_node() {
    let redis = Redis::start();
    let nodes: Vec<Gateway> = (0..3).map(|_| Gateway::start(Some(&redis.url()), &[])).collect();
    let (a, b) = (channel("numsub-a"), channel("numsub-b"));

    let mut sse = Vec::new();
    let mut ws = Vec::new();
    for node in &nodes {
        for _ in 0..4 {
            sse.push(SseClient::connect(&node.url(&format!("/sse?channel={a}&channel={b}"))).await);
            let mut w = ws_connect(&node.ws_url("/ws")).await;
            ws_subscribe(&mut w, &[&a, &b]).await;
            ws.push(w);
        }
    }
    assert_eq!(redis.numsub(&a), 3, "one subscription per node for channel a");
    assert_eq!(redis.numsub(&b), 3, "one subscription per node for channel b");
    assert_eq!(pubsub_clients(&redis), vec![2, 2, 2], "one pub/sub connection per node, both channels on it");
    for node in &nodes {
        assert_eq!(node.metric("gateway_subscriptions").await, 16.0, "8 clients x 2 channels");
        assert_eq!(node.metric("gateway_channels").await, 2.0);
    }

    // A publish reaches each client once.
    assert_eq!(redis.cli(&["PUBLISH", &a, "once"]), "3");
    for s in &mut sse {
        assert_eq!(s.next().await.data, "once");
    }
    for w in &mut ws {
        assert_eq!(ws_next(w).await, message(&a, "once"));
    }

    // Clients leave on every node, some stay: still exactly one subscription per node.
    let mut i = 0;
    sse.retain(|_| {
        i += 1;
        i % 2 == 0
    });
    ws.truncate(ws.len() - 1);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(redis.numsub(&a), 3);

    // Everybody leaves: after the linger, nothing stays subscribed.
    drop(sse);
    drop(ws);
    eventually(WAIT, "channels unsubscribed after the last client left", || async {
        (redis.numsub(&a) == 0 && redis.numsub(&b) == 0).then_some(())
    })
    .await;
    eventually(WAIT, "pub/sub connections hold no channel", || async {
        pubsub_clients(&redis).is_empty().then_some(())
    })
    .await;
    for node in &nodes {
        assert_eq!(node.metric("gateway_channels").await, 0.0);
        assert_eq!(node.metric("gateway_subscriptions").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_resubscribe_within_the_linger_keeps_the_subscription() {
    let redis = Redis::start();
    let node = Gateway::start(Some(&redis.url()), &["--linger-ms", "3000"]);
    let ch = channel("linger");
    let sse = SseClient::connect(&node.url(&format!("/sse?channel={ch}"))).await;
    assert_eq!(redis.numsub(&ch), 1);
    drop(sse);
    // Reconnecting within the linger reuses the live subscription (no UNSUBSCRIBE/SUBSCRIBE churn).
    let mut sse = SseClient::connect(&node.url(&format!("/sse?channel={ch}"))).await;
    assert_eq!(redis.numsub(&ch), 1);
    redis.cli(&["PUBLISH", &ch, "still here"]);
    assert_eq!(sse.next().await.data, "still here");
}
