//! Subscriber authentication with JWTs: valid, expired (also while connected), wrong
//! signature, `alg: none`, algorithm confusion, wrong audience, channel not allowed;
//! token from header, query parameter or cookie; the WebSocket publish op per token.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use shared::protocol::ServerFrame;

const SECRET: &str = "test-secret-of-enough-length-0123456789";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn claims(channels: &[&str], exp_in: i64) -> serde_json::Value {
    serde_json::json!({"exp": (now() as i64 + exp_in), "channels": channels, "aud": "fanout"})
}

fn gateway(extra: &[&str]) -> Gateway {
    let mut args = vec!["--jwt-hs256-secret", SECRET, "--jwt-audience", "fanout"];
    args.extend_from_slice(extra);
    Gateway::start(None, &args)
}

async fn sse_status(gw: &Gateway, token: Option<&str>, channel: &str) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().get(gw.url(&format!("/sse?channel={channel}")));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let body = if status == 200 { serde_json::Value::Null } else { r.json().await.unwrap() };
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_for_every_failure_mode() {
    let gw = gateway(&[]);
    let ok = hs256(claims(&["news.*"], 60));
    assert_eq!(sse_status(&gw, Some(&ok), "news.sport").await.0, 200);

    let cases: Vec<(&str, String, u16)> = vec![
        ("missing", String::new(), 401),
        ("expired", hs256(claims(&["news.*"], -120)), 401),
        (
            "wrong signature",
            {
                let c = claims(&["news.*"], 60);
                encode(&Header::new(Algorithm::HS256), &c, &EncodingKey::from_secret(b"another-secret"))
                    .unwrap()
            },
            401,
        ),
        (
            "alg none",
            {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let head = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
                let body = b64.encode(claims(&["news.*"], 60).to_string());
                format!("{head}.{body}.")
            },
            401,
        ),
        (
            "wrong audience",
            hs256(serde_json::json!({"exp": now() + 60, "channels": ["news.*"], "aud": "other"})),
            401,
        ),
        ("no exp", hs256(serde_json::json!({"channels": ["news.*"], "aud": "fanout"})), 401),
        ("garbage", "not.a.jwt".to_owned(), 401),
        ("channel not allowed", hs256(claims(&["sport.*"], 60)), 403),
    ];
    for (what, token, expected) in cases {
        let token = (!token.is_empty()).then_some(token.as_str());
        let (status, body) = sse_status(&gw, token, "news.sport").await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_eq!(body["error"], if expected == 401 { "unauthorized" } else { "forbidden" }, "{what}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    assert!(gw.metric("gateway_auth_failures_total{reason=\"expired\"}").await >= 1.0);
    assert!(gw.metric("gateway_auth_failures_total{reason=\"channel_not_allowed\"}").await >= 1.0);

    // Query parameter (EventSource) and cookie work too; long-poll checks the same way.
    let r = reqwest::get(gw.url(&format!("/poll?channel=news.a&timeout=0&token={ok}"))).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::Client::new()
        .get(gw.url("/poll?channel=news.a&timeout=0"))
        .header("cookie", format!("theme=dark; gateway_token={ok}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(reqwest::get(gw.url("/poll?channel=news.a&timeout=0")).await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connections_close_when_the_token_expires() {
    let gw = gateway(&[]);
    let short = hs256(claims(&["live"], 2));
    let req = reqwest::Client::new().get(gw.url("/sse?channel=live")).bearer_auth(&short);
    let mut sse = SseClient::connect_with(req).await;
    let mut ws = ws_connect(&gw.ws_url(&format!("/ws?token={short}"))).await;
    ws_subscribe(&mut ws, &["live"]).await;
    let ev = tokio::time::timeout(Duration::from_secs(15), sse.events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.event.as_deref(), Some("disconnect"));
    assert!(ev.data.contains("token_expired"), "{}", ev.data);
    let (code, reason) = ws_close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ops_obey_the_token() {
    let gw = gateway(&["--ws-publish", "true"]);
    // No token: the upgrade itself is refused.
    let refused = tokio_tungstenite::connect_async(gw.ws_url("/ws")).await;
    assert!(matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 401));

    let reader = hs256(claims(&["room.*"], 60));
    let mut ws = ws_connect(&gw.ws_url(&format!("/ws?token={reader}"))).await;
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": ["secret"]})).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Error { code, .. } if code == "forbidden"));
    ws_subscribe(&mut ws, &["room.1"]).await;
    ws_send(&mut ws, serde_json::json!({"op": "publish", "channel": "room.1", "data": "hi"})).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Error { code, .. } if code == "forbidden"));

    let writer =
        hs256(serde_json::json!({"exp": now() + 60, "channels": ["room.*"], "aud": "fanout", "pub": true}));
    let mut w = ws_connect(&gw.ws_url(&format!("/ws?token={writer}"))).await;
    ws_send(&mut w, serde_json::json!({"op": "publish", "channel": "room.1", "data": "hi"})).await;
    assert!(matches!(ws_next(&mut w).await, ServerFrame::Published { .. }));
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Message { data, .. } if data == "hi"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_with_no_algorithm_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = (dir.path().join("private.pem"), dir.path().join("public.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&private)
        .output()
        .expect("openssl is installed");
    assert!(ok.status.success());
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let gw = Gateway::start(None, &["--jwt-rs256-public-key", public.to_str().unwrap()]);
    let c = serde_json::json!({"exp": now() + 60, "channels": ["*"]});
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    let good = encode(&Header::new(Algorithm::RS256), &c, &key).unwrap();
    assert_eq!(sse_status(&gw, Some(&good), "any").await.0, 200);
    // Algorithm confusion: an HS256 token "signed" with the public key as the secret.
    let public_pem = std::fs::read(&public).unwrap();
    let forged = encode(&Header::new(Algorithm::HS256), &c, &EncodingKey::from_secret(&public_pem)).unwrap();
    let (status, body) = sse_status(&gw, Some(&forged), "any").await;
    assert_eq!(status, 401, "{body}");
    assert!(gw.metric("gateway_auth_failures_total{reason=\"algorithm\"}").await >= 1.0);
}
