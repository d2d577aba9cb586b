//! Origin checks: cross-site WebSocket hijacking is refused when an allowlist is set,
//! and CORS answers name only allowed origins (never `*` with credentials).

mod common;

use common::*;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

async fn ws_with_origin(gw: &Gateway, origin: Option<&str>) -> Result<Ws, u16> {
    let mut req = gw.ws_url("/ws").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", HeaderValue::from_str(o).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_origin_allowlist() {
    let gw = Gateway::start(None, &["--allowed-origins", "https://app.example.com,http://localhost:3000"]);
    assert_eq!(
        ws_with_origin(&gw, Some("https://evil.example")).await.err(),
        Some(403),
        "evil origin refused"
    );
    assert_eq!(ws_with_origin(&gw, Some("null")).await.err(), Some(403), "opaque origin refused");
    let mut ok = ws_with_origin(&gw, Some("https://app.example.com")).await.expect("allowed origin");
    ws_subscribe(&mut ok, &["origins-a"]).await;
    assert!(ws_with_origin(&gw, Some("http://localhost:3000")).await.is_ok());
    assert!(ws_with_origin(&gw, None).await.is_ok(), "non-browser clients send no Origin");
    assert_eq!(gw.metric("gateway_rejected_requests_total{reason=\"forbidden\"}").await, 2.0);
    // The refusal is a JSON error a developer can read.
    let resp = reqwest::Client::new()
        .get(gw.url("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert!(body["message"].as_str().unwrap().contains("evil.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_name_allowed_origins_only() {
    let gw = Gateway::start(None, &["--allowed-origins", "https://app.example.com"]);
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, gw.url("/api/publish"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-api-key")
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://app.example.com");
    let methods = ok.headers()["access-control-allow-methods"].to_str().unwrap().to_ascii_uppercase();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = ok.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("x-api-key") && allowed.contains("content-type"), "{allowed}");
    assert!(ok.headers().get("access-control-allow-credentials").is_none());

    let evil = preflight("https://evil.example").await.unwrap();
    assert!(evil.headers().get("access-control-allow-origin").is_none(), "evil origin gets no CORS grant");

    let poll = http
        .get(gw.url("/poll?channel=origins-b&timeout=0"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(poll.headers()["access-control-allow-origin"], "https://app.example.com");

    // Without an allowlist any site may read (no credentials are ever allowed).
    let open = Gateway::start(None, &[]);
    let r = http
        .get(open.url("/poll?channel=origins-c&timeout=0"))
        .header("origin", "https://x.example")
        .send()
        .await;
    let r = r.unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers().get("access-control-allow-credentials").is_none());
}

#[test]
fn malformed_origins_are_a_config_error() {
    let out = std::process::Command::new(gateway_bin())
        .args(["config", "--allowed-origins", "app.example.com"])
        .env_remove("GATEWAY_ALLOWED_ORIGINS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("gateway: invalid configuration: allowed_origins"), "{err}");
}
