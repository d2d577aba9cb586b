//! The per-node connection cap, and the operational metrics (dispatch latency
//! histogram, process figures).

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_sheds_load_with_a_clear_error() {
    let gw = Gateway::start(None, &["--max-connections", "2"]);
    let a = SseClient::connect(&gw.url("/sse?channel=cap-a")).await;
    let mut b = SseClient::connect(&gw.url("/sse?channel=cap-a")).await;
    for path in ["/sse?channel=cap-a", "/poll?channel=cap-a&timeout=0"] {
        let r = reqwest::get(gw.url(path)).await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "over_capacity");
    }
    let ws = tokio_tungstenite::connect_async(gw.ws_url("/ws")).await;
    assert!(
        matches!(ws, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 503),
        "WebSocket upgrades are refused too"
    );
    assert_eq!(gw.metric("gateway_rejected_requests_total{reason=\"over_capacity\"}").await, 3.0);
    // Existing clients are unaffected, and a freed slot is usable again.
    reqwest::Client::new().post(gw.url("/publish/cap-a")).body("still here").send().await.unwrap();
    assert_eq!(b.next().await.data, "still here");
    drop(a);
    eventually(WAIT, "a freed slot is usable", || async {
        (reqwest::get(gw.url("/poll?channel=cap-a&timeout=0")).await.unwrap().status() == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_latency_and_process_metrics_are_exported() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &[]);
    let ch = channel("latency");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    for i in 0..3 {
        reqwest::Client::new()
            .post(gw.url(&format!("/publish/{ch}")))
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(sse.next().await.data, format!("m{i}"));
    }
    assert_eq!(gw.metric("gateway_publish_to_dispatch_seconds_count").await, 3.0);
    assert_eq!(gw.metric("gateway_publish_to_dispatch_seconds_bucket{le=\"+Inf\"}").await, 3.0);
    assert!(gw.metric("gateway_process_resident_memory_bytes").await > 1_000_000.0);
    assert!(gw.metric("gateway_process_open_fds").await > 5.0);
}
