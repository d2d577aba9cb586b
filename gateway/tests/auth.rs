//! Subscriber authentication with JWTs: valid, expired (also while connected), wrong
//! signature, `alg: none`, algorithm confusion, wrong audience, channel not allowed;
//! token from header, query parameter or cookie; the WebSocket publish op per token;
//! keys from a JWKS file chosen by `kid` (RSA, EC, Ed25519, oct) and bad JWKS files.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

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

/// With `--jwt-audience` and `--jwt-issuer` set, a token must carry both claims (and
/// the right values): one that leaves either out is refused, not waved through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_audience_and_issuer_are_required() {
    let gw = gateway(&["--jwt-issuer", "https://issuer.example"]);
    let with = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"exp": now() + 60, "channels": ["news.*"]});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        hs256(c)
    };
    let cases = [
        ("aud and iss", with(serde_json::json!({"aud": "fanout", "iss": "https://issuer.example"})), 200),
        ("aud in a list", with(serde_json::json!({"aud": ["fanout"], "iss": "https://issuer.example"})), 200),
        ("no aud", with(serde_json::json!({"iss": "https://issuer.example"})), 401),
        ("no iss", with(serde_json::json!({"aud": "fanout"})), 401),
        ("neither", with(serde_json::json!({})), 401),
        ("wrong iss", with(serde_json::json!({"aud": "fanout", "iss": "https://evil.example"})), 401),
        ("empty aud list", with(serde_json::json!({"aud": [], "iss": "https://issuer.example"})), 401),
    ];
    for (what, token, want) in cases {
        let (status, body) = sse_status(&gw, Some(&token), "news.a").await;
        assert_eq!(status, want, "{what}: {body}");
        if want == 401 {
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains("aud") || message.contains("iss") || message.contains("issuer"),
                "{what}: {message}"
            );
        }
    }
}

/// `nbf` is honoured: a token that is not valid yet is refused (beyond a 5 s leeway for
/// clock skew), one whose `nbf` has passed, or is within the leeway, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_before_is_honoured_with_a_small_leeway() {
    let gw = gateway(&[]);
    let nbf = |offset: i64| {
        hs256(serde_json::json!({
            "exp": now() + 600, "nbf": now() as i64 + offset, "channels": ["news.*"], "aud": "fanout"
        }))
    };
    for (what, token, want) in [
        ("nbf in 2 minutes", nbf(120), 401),
        ("nbf in 30 s", nbf(30), 401),
        ("nbf in 2 s (within the leeway)", nbf(2), 200),
        ("nbf 10 s ago", nbf(-10), 200),
    ] {
        let (status, body) = sse_status(&gw, Some(&token), "news.a").await;
        assert_eq!(status, want, "{what}: {body}");
    }
    let r =
        reqwest::get(gw.url(&format!("/poll?channel=news.a&timeout=0&token={}", nbf(120)))).await.unwrap();
    assert_eq!(r.status(), 401, "long-poll checks nbf too");
    assert!(gw.metric("gateway_auth_failures_total{reason=\"not_yet_valid\"}").await >= 2.0);
}

/// A token that expires in the far future (`u64::MAX`, 10^18 seconds) works on every
/// transport: the expiry timer saturates instead of overflowing and taking the session
/// (or the node) down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_expiry_does_not_break_sessions() {
    let gw = gateway(&[]);
    for exp in [serde_json::json!(u64::MAX), serde_json::json!(1_000_000_000_000_000_000u64)] {
        let token = hs256(serde_json::json!({"exp": exp, "channels": ["far.*"], "aud": "fanout"}));
        let ch = channel("far.x");
        let mut ws = ws_connect(&gw.ws_url(&format!("/ws?token={token}"))).await;
        ws_subscribe(&mut ws, &[&ch]).await;
        let req = reqwest::Client::new().get(gw.url(&format!("/sse?channel={ch}"))).bearer_auth(&token);
        let mut sse = SseClient::connect_with(req).await;
        let url = gw.url(&format!("/poll?channel={ch}&timeout=5&token={token}"));
        let held = tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        publish(&gw, &ch, "far").await;
        assert_eq!(without_id(ws_next(&mut ws).await), message(&ch, "far"), "exp {exp}: WebSocket");
        assert_eq!(sse.next().await.data, "far", "exp {exp}: SSE");
        let polled = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
        assert!(polled.contains("\"far\""), "exp {exp}: long-poll: {polled}");
    }
}

/// The `Bearer` scheme is case-insensitive (RFC 9110 §11.1) for subscriber tokens and
/// publish API keys alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_is_case_insensitive_for_tokens_and_api_keys() {
    let gw = gateway(&["--api-keys", "k1"]);
    let token = hs256(claims(&["news.*"], 60));
    let http = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER", "BeArEr"] {
        let auth = format!("{scheme} {token}");
        let r =
            http.get(gw.url("/poll?channel=news.a&timeout=0")).header("authorization", &auth).send().await;
        assert_eq!(r.unwrap().status(), 200, "subscriber token with scheme {scheme:?}");
        let r =
            http.post(gw.url("/publish/news.a")).header("authorization", format!("{scheme} k1")).body("x");
        assert_eq!(r.send().await.unwrap().status(), 200, "API key with scheme {scheme:?}");
    }
    for refused in ["Basic k1", "Bearerk1", "k1", "Bearer", "Bearer "] {
        let r = http.post(gw.url("/publish/news.a")).header("authorization", refused).body("x");
        assert_eq!(r.send().await.unwrap().status(), 401, "API key as {refused:?}");
    }
}

/// The WebSocket `publish` op is limited to the channels the token's `channels` claim
/// allows, like subscribing: `"pub": true` alone does not open every channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_publish_is_limited_to_the_tokens_channels() {
    let gw = gateway(&["--ws-publish", "true"]);
    let admin_reader = hs256(claims(&["admin"], 60));
    let mut admin = ws_connect(&gw.ws_url(&format!("/ws?token={admin_reader}"))).await;
    ws_subscribe(&mut admin, &["admin"]).await;
    let writer =
        hs256(serde_json::json!({"exp": now() + 60, "channels": ["news.*"], "aud": "fanout", "pub": true}));
    let mut w = ws_connect(&gw.ws_url(&format!("/ws?token={writer}"))).await;
    for channel in ["admin", "news", "newsroom", "other.news.a"] {
        ws_send(&mut w, serde_json::json!({"op": "publish", "channel": channel, "data": "forged"})).await;
        match ws_next(&mut w).await {
            ServerFrame::Error { code, message } => {
                assert_eq!(code, "forbidden", "{channel}: {message}");
                assert!(message.contains(channel), "{channel}: {message}");
            }
            other => panic!("publish to {channel:?} with a news.* token: {other:?}"),
        }
    }
    ws_send(&mut w, serde_json::json!({"op": "publish", "channel": "news.a", "data": "fine"})).await;
    assert!(matches!(ws_next(&mut w).await, ServerFrame::Published { .. }), "news.a is allowed");
    // Nothing forged reached the admin channel: its next message is this one.
    publish_raw(&gw, "admin", "real").await;
    assert_eq!(without_id(ws_next(&mut admin).await), message("admin", "real"));
    assert!(gw.metric("gateway_auth_failures_total{reason=\"channel_not_allowed\"}").await >= 4.0);
}

/// Publishes through the HTTP API (no API keys on these nodes).
async fn publish_raw(gw: &Gateway, channel: &str, data: &str) {
    let r = reqwest::Client::new().post(gw.url(&format!("/publish/{channel}"))).body(data.to_owned());
    assert_eq!(r.send().await.unwrap().status(), 200);
}

/// Runs `openssl args...` and returns its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Generates a key pair with `openssl genpkey <genpkey...>`; returns the private and
/// public PEM files.
fn keypair(dir: &Path, name: &str, genpkey: &[&str]) -> (PathBuf, PathBuf) {
    let (private, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub.pem")));
    let (private_s, public_s) = (private.to_str().unwrap(), public.to_str().unwrap());
    openssl(&[&["genpkey"], genpkey, &["-out", private_s]].concat());
    openssl(&["pkey", "-pubout", "-in", private_s, "-out", public_s]);
    (private, public)
}

fn rsa_keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    keypair(dir, name, &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_with_no_algorithm_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_keypair(dir.path(), "rsa");
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

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and the JWK the gateway verifies it with.
struct TestKey {
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

/// An RSA key; the JWK's `n` comes from `openssl rsa -modulus`, `e` is openssl's
/// default exponent 65537.
fn rsa_jwk(dir: &Path, kid: &str) -> (TestKey, PathBuf) {
    let (private, public) = rsa_keypair(dir, kid);
    let out = openssl(&["rsa", "-pubin", "-in", public.to_str().unwrap(), "-noout", "-modulus"]);
    let hex = String::from_utf8(out).unwrap().trim().strip_prefix("Modulus=").unwrap().to_owned();
    let n: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    assert_eq!(n.len(), 256);
    let jwk = serde_json::json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64url(&n), "e": "AQAB"});
    let encoding = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    (TestKey { encoding, jwk }, public)
}

/// The raw public key: the tail of the DER SubjectPublicKeyInfo.
fn public_key_tail(private: &Path, len: usize) -> Vec<u8> {
    let der = openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-outform", "DER"]);
    der[der.len() - len..].to_vec()
}

fn ec_jwk(dir: &Path, kid: &str) -> TestKey {
    let (private, _) = keypair(dir, kid, &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let point = public_key_tail(&private, 64); // x || y after the 0x04 of an uncompressed point
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "x": b64url(&point[..32]), "y": b64url(&point[32..])
    });
    TestKey { encoding: EncodingKey::from_ec_pem(&std::fs::read(&private).unwrap()).unwrap(), jwk }
}

fn ed_jwk(dir: &Path, kid: &str) -> TestKey {
    let (private, _) = keypair(dir, kid, &["-algorithm", "ed25519"]);
    let x = public_key_tail(&private, 32);
    let jwk =
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "x": b64url(&x)});
    TestKey { encoding: EncodingKey::from_ed_pem(&std::fs::read(&private).unwrap()).unwrap(), jwk }
}

fn oct_jwk(kid: &str, secret: &[u8]) -> TestKey {
    let jwk = serde_json::json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64url(secret)});
    TestKey { encoding: EncodingKey::from_secret(secret), jwk }
}

fn write_jwks(dir: &Path, keys: &[&serde_json::Value]) -> PathBuf {
    let path = dir.join("jwks.json");
    std::fs::write(&path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    path
}

/// A token for `claims(["*"])` with header `alg` and `kid`, signed with `key`.
fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let header = Header { kid: kid.map(str::to_owned), ..Header::new(alg) };
    encode(&header, &claims(&["*"], 60), key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_chosen_by_kid_and_pin_the_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, rsa_public) = rsa_jwk(dir.path(), "rsa-1");
    let (ec, ed, oct) =
        (ec_jwk(dir.path(), "ec-1"), ed_jwk(dir.path(), "ed-1"), oct_jwk("oct-1", b"jwks-oct-secret"));
    let jwks = write_jwks(dir.path(), &[&rsa.jwk, &ec.jwk, &ed.jwk, &oct.jwk]);
    let gw = gateway_jwks(&jwks, &[]);

    // Every supported key type verifies its own tokens.
    let valid = [
        ("RS256", signed(Algorithm::RS256, Some("rsa-1"), &rsa.encoding)),
        ("ES256", signed(Algorithm::ES256, Some("ec-1"), &ec.encoding)),
        ("EdDSA", signed(Algorithm::EdDSA, Some("ed-1"), &ed.encoding)),
        ("HS256 oct", signed(Algorithm::HS256, Some("oct-1"), &oct.encoding)),
    ];
    for (what, token) in &valid {
        let (status, body) = sse_status(&gw, Some(token), "any").await;
        assert_eq!(status, 200, "{what}: {body}");
    }
    // ...and the stream it opens delivers.
    let ch = channel("jwks");
    let req = reqwest::Client::new().get(gw.url(&format!("/sse?channel={ch}"))).bearer_auth(&valid[0].1);
    let mut sse = SseClient::connect_with(req).await;
    publish(&gw, &ch, "hello").await;
    assert_eq!(sse.next().await.data, "hello");

    let (other, _) = rsa_jwk(dir.path(), "other");
    let public_pem = std::fs::read(&rsa_public).unwrap();
    let refused = [
        ("unknown kid", signed(Algorithm::RS256, Some("rsa-9"), &rsa.encoding), "unknown token key id"),
        ("wrong signature", signed(Algorithm::RS256, Some("rsa-1"), &other.encoding), "signature"),
        (
            "HS256 with an RSA kid, signed with the public key",
            signed(Algorithm::HS256, Some("rsa-1"), &EncodingKey::from_secret(&public_pem)),
            "does not match its key",
        ),
        (
            "RS256 with an oct kid",
            signed(Algorithm::RS256, Some("oct-1"), &rsa.encoding),
            "does not match its key",
        ),
        ("no kid", signed(Algorithm::RS256, None, &rsa.encoding), "kid"),
    ];
    for (what, token, message) in refused {
        let (status, body) = sse_status(&gw, Some(&token), "any").await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized", "{what}");
        assert!(body["message"].as_str().unwrap().contains(message), "{what}: {body}");
    }
    assert_eq!(gw.metric("gateway_auth_failures_total{reason=\"unknown_key\"}").await, 2.0);
    assert_eq!(gw.metric("gateway_auth_failures_total{reason=\"algorithm\"}").await, 2.0);
    assert_eq!(gw.metric("gateway_auth_failures_total{reason=\"invalid_signature\"}").await, 1.0);
}

fn gateway_jwks(jwks: &Path, extra: &[&str]) -> Gateway {
    let mut args = vec!["--jwt-jwks-file", jwks.to_str().unwrap(), "--jwt-audience", "fanout"];
    args.extend_from_slice(extra);
    Gateway::start(None, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_combines_with_the_static_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, _) = rsa_jwk(dir.path(), "rsa-1");
    let jwks = write_jwks(dir.path(), &[&rsa.jwk]);
    let gw = gateway_jwks(&jwks, &["--jwt-hs256-secret", SECRET]);
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    // No kid: the HS256 secret, as before.
    assert_eq!(sse_status(&gw, Some(&hs256(claims(&["*"], 60))), "a").await.0, 200);
    // A kid: the JWKS only, even when the token would verify with the secret.
    assert_eq!(
        sse_status(&gw, Some(&signed(Algorithm::RS256, Some("rsa-1"), &rsa.encoding)), "a").await.0,
        200
    );
    let (status, body) = sse_status(&gw, Some(&signed(Algorithm::HS256, Some("nope"), &secret)), "a").await;
    assert_eq!(status, 401, "{body}");
    // No kid and an algorithm only the JWKS has: refused.
    assert_eq!(sse_status(&gw, Some(&signed(Algorithm::RS256, None, &rsa.encoding)), "a").await.0, 401);
}

/// Starts the gateway with `args`, expecting it to exit on its own; returns whether it
/// succeeded and its stderr.
fn run_to_exit(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(gateway_bin())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gateway with {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.success(), stderr)
}

#[test]
fn a_bad_jwks_file_stops_the_gateway_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, _) = rsa_jwk(dir.path(), "rsa-1");
    let mut rs512 = rsa.jwk.clone();
    rs512["alg"] = "RS512".into();
    let mut no_kid = rsa.jwk.clone();
    no_kid.as_object_mut().unwrap().remove("kid");
    let p384 = serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "p", "x": b64url(&[1; 48]), "y": b64url(&[1; 48])});
    let keys = |k: &serde_json::Value| serde_json::json!({ "keys": [k] }).to_string();
    let cases = [
        ("missing.json", None, "cannot read jwt_jwks_file"),
        ("garbage.json", Some("{\"keys\": [".to_owned()), "invalid JSON"),
        ("empty.json", Some(r#"{"keys": []}"#.to_owned()), "no usable signing keys"),
        (
            "rs512.json",
            Some(keys(&rs512)),
            r#"keys[0] (kid "rsa-1"): unsupported key (kty "RSA", alg "RS512")"#,
        ),
        ("p384.json", Some(keys(&p384)), r#"unsupported key (kty "EC", crv "P-384")"#),
        ("nokid.json", Some(keys(&no_kid)), r#"keys[0]: no "kid""#),
    ];
    for (name, content, expected) in cases {
        let path = dir.path().join(name);
        if let Some(c) = content {
            std::fs::write(&path, c).unwrap();
        }
        let (ok, stderr) = run_to_exit(&["--jwt-jwks-file", path.to_str().unwrap()]);
        assert!(!ok, "{name}: the gateway must fail");
        let line = stderr
            .lines()
            .find(|l| l.contains("jwt_jwks_file"))
            .unwrap_or_else(|| panic!("{name}: {stderr}"));
        assert!(line.contains(path.to_str().unwrap()) && line.contains(expected), "{name}: {line}");
    }
}
