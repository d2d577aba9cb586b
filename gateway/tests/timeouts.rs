//! Liveness timers, each configurable: a WebSocket client that stops answering pings is
//! closed (1001) after two ping intervals while a live one stays; SSE heartbeats come at
//! the configured interval; an idle long-poll is answered empty at the configured hold
//! time with a cursor that still works. And client input with control characters never
//! reaches the log raw.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use shared::protocol::{PollResponse, ServerFrame};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Splits one unmasked server frame off the front of `buf`: `(opcode, payload, used)`.
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, start) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    let body = buf.get(start..start + len)?.to_vec();
    Some((buf[0] & 0x0f, body, start + len))
}

/// A WebSocket upgraded by hand that never sends anything after the handshake (so never
/// a pong). Reads and returns the opcodes (and close code) the server sends until it
/// closes the connection.
async fn mute_websocket(gw: &Gateway) -> (Vec<u8>, Option<u16>) {
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let req = format!(
        "GET /ws?channel=mute HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.public
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut opcodes = Vec::new();
    let mut close = None;
    let read_all = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
                && buf.starts_with(b"HTTP/1.1 101")
            {
                buf.drain(..end + 4);
            }
            while let Some((op, body, used)) = parse_frame(&buf) {
                opcodes.push(op);
                if op == 8 && body.len() >= 2 {
                    close = Some(u16::from_be_bytes([body[0], body[1]]));
                }
                buf.drain(..used);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all).await.expect("the server closes a mute client");
    (opcodes, close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_without_pongs_is_closed_and_a_live_one_stays() {
    let gw = Gateway::start(None, &["--ws-ping-secs", "1"]);
    // A live client: tungstenite answers pings while it reads.
    let mut live = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut live, &["alive"]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = live.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                let _ = tx.send(serde_json::from_str::<ServerFrame>(&t).unwrap());
            }
        }
    });

    let (opcodes, close) = mute_websocket(&gw).await;
    assert!(opcodes.contains(&9), "the server pinged: {opcodes:?}");
    assert_eq!(close, Some(1001), "closed with 1001 (going away: ping timeout); frames {opcodes:?}");
    assert_eq!(gw.metric("gateway_disconnects_total{transport=\"ws\",reason=\"timeout\"}").await, 1.0);

    // The live client outlived several ping intervals and still gets messages.
    assert_eq!(gw.metric("gateway_connections{transport=\"ws\"}").await, 1.0);
    reqwest::Client::new().post(gw.url("/publish/alive")).body("still here").send().await.unwrap();
    let frame = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(without_id(frame), message("alive", "still here"));
    reader.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_heartbeats_follow_the_configured_interval() {
    let gw = Gateway::start(None, &["--sse-heartbeat-secs", "1"]);
    let resp = reqwest::get(gw.url("/sse?channel=beat")).await.unwrap();
    let mut body = resp.bytes_stream();
    let mut parser = shared::sse::SseParser::new();
    // `: ok` when the stream opens, then heartbeat comments; with the default (15 s)
    // none would come within the bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while parser.comments() < 4 {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("only {} comments in time", parser.comments()))
            .expect("stream open")
            .unwrap();
        assert!(parser.feed(&chunk).is_empty(), "no events on a quiet channel");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_long_poll_is_answered_at_the_configured_hold_and_its_cursor_works() {
    let gw = Gateway::start(None, &["--poll-timeout-secs", "1", "--poll-max-timeout-secs", "2"]);
    // With the default hold (25 s) this client's 8 s timeout would fire instead.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(8)).build().unwrap();
    let empty: PollResponse =
        client.get(gw.url("/poll?channel=idle")).send().await.unwrap().json().await.unwrap();
    assert!(empty.messages.is_empty() && !empty.reset);
    // A client asking for longer than the maximum is held for the maximum only.
    let empty: PollResponse = client
        .get(gw.url(&format!("/poll?channel=idle&cursor={}&timeout=3600", empty.cursor)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(empty.messages.is_empty() && !empty.reset);
    reqwest::Client::new().post(gw.url("/publish/idle")).body("after the wait").send().await.unwrap();
    let got: PollResponse = client
        .get(gw.url(&format!("/poll?channel=idle&cursor={}", empty.cursor)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["after the wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_client_input_never_reach_the_log_raw() {
    let gw = Gateway::start(None, &["--allowed-origins", "https://app.example.com"]);
    let evil = "x%1b%5b31mRED%0d%0aFAKE-LOG-LINE%07";
    let http = reqwest::Client::new();
    for path in [
        format!("/sse?channel={evil}"),
        format!("/poll?channel={evil}"),
        format!("/sse?channel=ok&last_event_id={evil}"),
        format!("/nope/{evil}"),
        format!("/publish/{evil}"),
    ] {
        let r = http.get(gw.url(&path)).send().await.unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
        let body = r.text().await.unwrap();
        assert!(!body.contains('\u{1b}') && !body.contains('\r'), "{path}: echoed raw: {body:?}");
    }
    let r = http.post(gw.url("/publish/ok?event=a%0d%0adata:%20injected")).body("x").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_send(&mut ws, serde_json::json!({"op": "sub\u{1b}[31m\r\nFAKE-LOG-LINE", "channels": ["a"]})).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Error { .. }));
    ws_send(&mut ws, serde_json::json!({"op": "subscribe", "channels": ["a\u{1b}\r\nFAKE-LOG-LINE"]})).await;
    assert!(matches!(ws_next(&mut ws).await, ServerFrame::Error { .. }));
    // A browser origin that is not allowed (obs-text bytes are legal in a header value).
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(gw.ws_url("/ws"))
            .unwrap();
    req.headers_mut().insert(
        "origin",
        axum::http::HeaderValue::from_bytes(b"https://evil.example\xff\x80FAKE-LOG-LINE").unwrap(),
    );
    assert!(tokio_tungstenite::connect_async(req).await.is_err());

    let logs = gw.logs();
    assert!(logs.contains("gateway listening"), "logs are captured");
    for line in logs.lines() {
        assert!(!line.contains('\u{1b}') && !line.contains('\u{7}'), "raw control characters: {line:?}");
        assert!(!line.trim_start().starts_with("FAKE-LOG-LINE"), "a forged log line: {line:?}");
    }
}
