//! The demo page at `/`: served as HTML by every node, with a script that parses and
//! uses the browser client; the small endpoints it relies on; the answer generator.
//! (`browser.rs` runs the page in Chromium.)

mod common;

use common::*;
use shared::sse::SseEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_is_served_and_its_script_parses() {
    let gw = Gateway::start(None, &[]);
    let resp = reqwest::get(gw.url("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = resp.text().await.unwrap();
    // The page is built on the client the node serves, and on the endpoints below.
    for needle in [
        r#"<script src="/client.js"></script>"#,
        "fanout.subscribe(",
        "fanout.publish(",
        "'/demo/answer'",
        "'/api/info'",
        "since: '0'",
        "textContent",
    ] {
        assert!(html.contains(needle), "demo page uses {needle}");
    }
    for gone in ["new EventSource", "new WebSocket", "redis-cli PUBLISH ' +"] {
        assert!(!html.contains(gone), "the page no longer does {gone} itself");
    }
    let start = html.find("<script>").expect("inline script") + "<script>".len();
    let end = html[start..].find("</script>").unwrap() + start;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.js");
    std::fs::write(&path, &html[start..end]).unwrap();
    // Node ships with the development machines and CI; its syntax check is the strictest
    // test of the page's script short of a browser (browser.rs runs it in one).
    match std::process::Command::new("node").arg("--check").arg(&path).output() {
        Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "node is needed on CI: {e}");
            eprintln!("node not found ({e}); skipped the script syntax check");
        }
    }

    // What the page loads besides itself.
    let js = reqwest::get(gw.url("/client.js")).await.unwrap();
    assert_eq!(js.headers()["content-type"], "application/javascript; charset=utf-8");
    assert!(js.text().await.unwrap().contains("global.fanout = {"));
    assert_eq!(reqwest::get(gw.url("/favicon.ico")).await.unwrap().status(), 204);
    let info: serde_json::Value = reqwest::get(gw.url("/api/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info, serde_json::json!({"broker": "memory", "demo_streams": false}));
    // Without --demo-streams there is no answer generator.
    let r =
        reqwest::Client::new().post(gw.url("/demo/answer")).json(&serde_json::json!({"prompt": "hi"})).send();
    assert_eq!(r.await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_stream_token_by_token_with_history() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--demo-streams"]);
    let info: serde_json::Value = reqwest::get(gw.url("/api/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info, serde_json::json!({"broker": "redis", "demo_streams": true}));
    let client = reqwest::Client::new();
    let bad =
        client.post(gw.url("/demo/answer")).json(&serde_json::json!({"prompt": "  "})).send().await.unwrap();
    assert_eq!(bad.status(), 400);

    let started = std::time::Instant::now();
    let r = client
        .post(gw.url("/demo/answer"))
        .json(&serde_json::json!({"prompt": "why?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ch = r.json::<serde_json::Value>().await.unwrap()["channel"].as_str().unwrap().to_owned();
    assert!(ch.starts_with("demo-"), "{ch}");
    // Join a little late, from position 0: the whole answer, in order, then `done`.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}&last_event_id=0"))).await;
    let mut text = String::new();
    let mut tokens = 0;
    loop {
        let SseEvent { event, data, id } = sse.next().await;
        assert!(id.is_some(), "published with history");
        match event.as_deref() {
            Some("token") => {
                text.push_str(&data);
                tokens += 1;
            }
            Some("done") => {
                assert_eq!(data, "[DONE]");
                break;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(text.starts_with("You asked: \u{201c}why?\u{201d}."), "{text}");
    // About 30 tokens a second: within 20 to 40.
    let rate = f64::from(tokens) / started.elapsed().as_secs_f64();
    assert!((15.0..=40.0).contains(&rate), "{tokens} tokens at {rate:.1}/s");
}
