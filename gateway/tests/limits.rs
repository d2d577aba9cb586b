//! The per-node connection cap, the open-file limit, and the operational metrics
//! (dispatch latency histogram, process figures).

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

/// A node started with the common default soft limit of open files raises it to the
/// hard limit, so it serves more clients than the soft limit would allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_raises_its_soft_open_file_limit_and_serves_past_it() {
    const SOFT: usize = 256;
    let gw = Gateway::start_after(&format!("ulimit -Sn {SOFT}"), None, &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit raised to the hard one: {line}");
    assert!(nums[0].parse::<usize>().unwrap() > SOFT, "{line}");
    assert!(gw.logs().contains("open-file limit"), "the limit is logged:\n{}", gw.logs());

    // More subscribers than the soft limit had descriptors, every one served.
    let mut clients = Vec::new();
    for _ in 0..SOFT + 64 {
        clients.push(SseClient::connect(&gw.url("/sse?channel=fds")).await);
    }
    publish(&gw, "fds", "to all").await;
    for c in &mut clients {
        assert_eq!(c.next().await.data, "to all");
    }
    assert!(!gw.logs().contains("accept failed"), "{}", gw.logs());
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

/// A client that opens a new connection for every request.
fn fresh_connections(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_per_ip_answers_429_and_spares_other_addresses_and_open_streams() {
    let gw = Gateway::start(None, &["--connect-rate-per-ip", "3"]);
    let mut sse = SseClient::connect(&gw.url("/sse?channel=rate-c")).await;
    let client = fresh_connections("127.0.0.1");
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = client.get(gw.url("/poll?channel=rate-c&timeout=0")).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "rate_limited", "{body}");
            assert!(body["message"].as_str().unwrap().contains("3 new connections a second"), "{body}");
        }
    }
    // The stream took one of the three; the burst allows two more, then 429.
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused >= 1 && statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    let ws = tokio_tungstenite::connect_async(gw.ws_url("/ws")).await;
    assert!(
        matches!(ws, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 429),
        "a WebSocket upgrade from the same address is refused too"
    );
    assert_eq!(
        gw.metric("gateway_limit_rejections_total{limit=\"connect_rate\"}").await,
        (refused + 1) as f64
    );
    // Another address is not limited, and the open stream still gets messages.
    let other = fresh_connections("127.0.0.2");
    let r = other.get(gw.url("/poll?channel=rate-c&timeout=0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = fresh_connections("127.0.0.3").post(gw.url("/publish/rate-c")).body("still here").send().await;
    assert_eq!(r.unwrap().status(), 200);
    assert_eq!(sse.next().await.data, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_per_key_answers_429_per_key() {
    let gw = Gateway::start(None, &["--api-keys", "k1,k2", "--publish-rate-per-key", "2"]);
    let mut sse = SseClient::connect(&gw.url("/sse?channel=rate-p")).await;
    let client = reqwest::Client::new();
    let publish = |key: &'static str, body: String| {
        client.post(gw.url("/publish/rate-p")).header("x-api-key", key).body(body).send()
    };
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = publish("k1", format!("m{i}")).await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "rate_limited", "{body}");
            assert!(body["message"].as_str().unwrap().contains("from this API key"), "{body}");
        }
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused >= 1 && statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    // Subscribers got exactly the accepted messages.
    for (i, _) in statuses.iter().enumerate().filter(|(_, s)| **s == 200) {
        assert_eq!(sse.next().await.data, format!("m{i}"));
    }
    // The other key has its own bucket.
    assert_eq!(publish("k2", "from k2".into()).await.unwrap().status(), 200);
    assert_eq!(sse.next().await.data, "from k2");
    // A JSON publish costs one per channel: three channels never fit a bucket of two.
    let r = client
        .post(gw.url("/api/publish"))
        .header("x-api-key", "k2")
        .json(&serde_json::json!({"channels": ["a", "b", "c"], "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        gw.metric("gateway_limit_rejections_total{limit=\"publish_rate\"}").await,
        (refused + 1) as f64
    );
    assert_eq!(gw.metric("gateway_publish_requests_total{result=\"rejected\"}").await, (refused + 1) as f64);
}

/// Each channel a long-poll joins stays subscribed for a while after the poll, with or
/// without a client: a client naming ever new channels is bounded per address (429)
/// and the node as a whole (503), and other clients are unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_cannot_pile_up_channels() {
    let gw = Gateway::start(None, &["--poll-channels-per-ip", "10", "--poll-max-channels", "25"]);
    let from =
        |ip: [u8; 4]| reqwest::Client::builder().local_address(std::net::IpAddr::from(ip)).build().unwrap();
    let (greedy, other, third) = (from([127, 0, 0, 2]), from([127, 0, 0, 3]), from([127, 0, 0, 4]));
    let poll = |client: &reqwest::Client, chans: Vec<String>| {
        let q: String = chans.iter().map(|c| format!("channel={c}&")).collect();
        let url = gw.url(&format!("/poll?{q}timeout=0"));
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    let fresh = |n: usize| (0..n).map(|_| channel("held")).collect::<Vec<_>>();
    assert_eq!(poll(&greedy, fresh(10)).await, 200, "ten new channels from one address");
    assert_eq!(poll(&greedy, fresh(1)).await, 429, "the eleventh within the keep-alive period");
    let known = fresh(1);
    assert_eq!(poll(&other, known.clone()).await, 200, "another address has its own allowance");
    assert_eq!(poll(&greedy, known).await, 200, "channels the node holds already cost nothing");
    assert_eq!(poll(&other, fresh(9)).await, 200);
    assert_eq!(poll(&third, fresh(6)).await, 503, "the node holds 20 + 6 > 25 channels");
    assert_eq!(gw.metric("gateway_limit_rejections_total{limit=\"poll_channels\"}").await, 2.0);
    // A subscriber is never refused for it.
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={}", channel("sub")))).await;
    sse.assert_quiet(std::time::Duration::from_millis(100)).await;
}
