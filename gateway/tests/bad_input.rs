//! Bad input gets a clear error — the right status and a JSON body
//! `{"error":"code","message":"..."}`, or a WebSocket `error` frame or close code — and
//! harms nobody else: every test keeps a healthy SSE and a healthy WebSocket client
//! subscribed on the same node and checks at the end that both still receive a
//! `redis-cli PUBLISH` (and nothing that was refused on the way).

mod common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use reqwest::{
    Method, Response,
    header::{CONTENT_TYPE, HeaderMap, HeaderValue},
};
use serde_json::{Value, json};
use shared::protocol::{ErrorBody, PollResponse, PublishResponse, PublishResult, ServerFrame, error_code};
use tokio_tungstenite::tungstenite::{
    self, Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

/// Payload limit of the node under test (`--max-payload-bytes`).
const MAX_PAYLOAD: usize = 1024;
/// Channel limit of the node under test (`--max-channels-per-connection`).
const MAX_CHANNELS: usize = 3;

/// One node on a real Redis with small limits, plus a healthy SSE and WebSocket
/// subscriber of `healthy` that must stay unharmed by everything a test does.
struct Fixture {
    redis: Redis,
    gw: Gateway,
    http: reqwest::Client,
    healthy: String,
    sse: SseClient,
    ws: Ws,
}

impl Fixture {
    async fn start(extra: &[&str]) -> Self {
        let redis = Redis::start();
        let (channels, payload) = (MAX_CHANNELS.to_string(), MAX_PAYLOAD.to_string());
        let mut args = vec!["--max-channels-per-connection", &channels, "--max-payload-bytes", &payload];
        args.extend_from_slice(extra);
        let gw = Gateway::start(Some(&redis.url()), &args);
        let healthy = channel("healthy");
        let sse = SseClient::connect(&gw.url(&format!("/sse?channel={healthy}"))).await;
        let mut ws = ws_connect(&gw.ws_url("/ws")).await;
        ws_subscribe(&mut ws, &[&healthy]).await;
        Self { redis, gw, http: reqwest::Client::new(), healthy, sse, ws }
    }

    fn url(&self, path: &str) -> String {
        self.gw.url(path)
    }

    /// The healthy clients still get the next `redis-cli PUBLISH` — as their very next
    /// message, so nothing refused earlier leaked through to them either.
    async fn assert_unharmed(&mut self) {
        let payload = format!("still here {:x}", rand::random::<u32>());
        assert_eq!(
            self.redis.cli(&["PUBLISH", &self.healthy, &payload]),
            "1",
            "the node is still subscribed"
        );
        assert_eq!(self.sse.next().await.data, payload, "healthy SSE client");
        assert_eq!(ws_next(&mut self.ws).await, message(&self.healthy, &payload), "healthy WebSocket client");
    }

    async fn get(&self, path: &str) -> Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Response {
        self.http.post(self.url(path)).body(body).send().await.unwrap()
    }

    /// A POST whose body the node refuses unread, on a connection of its own: the node
    /// then closes that connection without saying so (see
    /// `refused_oversized_body_does_not_break_keep_alive`), which would fail whatever
    /// request a pooled client sent next on it.
    async fn post_oversized(&self, path: &str, body: impl Into<reqwest::Body>, json: bool) -> Response {
        let req = unpooled().post(self.url(path)).body(body);
        let req = if json { req.header(CONTENT_TYPE, "application/json") } else { req };
        req.send().await.unwrap()
    }

    async fn post_json(&self, body: &Value) -> Response {
        self.http.post(self.url("/api/publish")).json(body).send().await.unwrap()
    }

    /// A WebSocket upgrade request sent with a plain HTTP client, so a refusal's status
    /// and JSON body can be read in full.
    async fn ws_upgrade(&self, path: &str, version: &str, key: Option<&str>) -> Response {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("sec-websocket-version", HeaderValue::from_str(version).unwrap());
        if let Some(key) = key {
            h.insert("sec-websocket-key", HeaderValue::from_str(key).unwrap());
        }
        self.http.get(self.url(path)).headers(h).send().await.unwrap()
    }
}

/// An HTTP client that opens a new connection for every request.
fn unpooled() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// Asserts an HTTP error answer: `status`, a JSON content type and `{"error": code,
/// "message": non-empty}`. Returns the message.
async fn expect_error(resp: Response, status: u16, code: &str, what: &str) -> String {
    let got = resp.status().as_u16();
    let ctype = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{what}: status; body {text}");
    assert!(ctype.starts_with("application/json"), "{what}: JSON error body, got {ctype:?}: {text}");
    let body: ErrorBody = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
    assert_eq!(body.error, code, "{what}: error code; body {text}");
    assert!(!body.message.trim().is_empty(), "{what}: a human message; body {text}");
    body.message
}

/// Asserts the next WebSocket frame is an `error` frame with `code`; returns its message.
async fn expect_ws_error(ws: &mut Ws, code: &str, what: &str) -> String {
    match ws_next(ws).await {
        ServerFrame::Error { code: got, message } => {
            assert_eq!(got, code, "{what}: error code ({message})");
            assert!(!message.trim().is_empty(), "{what}: a human message");
            message
        }
        other => panic!("{what}: expected an error frame, got {other:?}"),
    }
}

async fn ws_send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned().into())).await.unwrap();
}

/// The WebSocket still works: a ping is answered, a subscribe is confirmed and a
/// message published to it arrives.
async fn assert_ws_usable(f: &Fixture, ws: &mut Ws, prefix: &str) {
    ws_send(ws, json!({"op": "ping", "id": 42})).await;
    assert_eq!(ws_next(ws).await, ServerFrame::Pong { id: Some(json!(42)) }, "ping answered");
    let ch = channel(prefix);
    ws_subscribe(ws, &[&ch]).await;
    f.redis.cli(&["PUBLISH", &ch, "usable"]);
    assert_eq!(ws_next(ws).await, message(&ch, "usable"), "messages flow after the error");
}

/// Names that break the channel rules, raw and URL-encoded.
fn invalid_names() -> Vec<(String, String)> {
    let long = "a".repeat(129);
    vec![
        ("has space".into(), "has%20space".into()),
        (long.clone(), long),
        ("line\nfeed".into(), "line%0Afeed".into()),
        ("carriage\rreturn".into(), "carriage%0Dreturn".into()),
        ("nul\0byte".into(), "nul%00byte".into()),
        ("__reserved".into(), "__reserved".into()),
        ("caf\u{e9}".into(), "caf%C3%A9".into()),
        ("star*".into(), "star*".into()),
        (String::new(), String::new()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_channel_names_are_refused_on_every_endpoint() {
    let mut f = Fixture::start(&[]).await;
    let mut probe = ws_connect(&f.gw.ws_url("/ws")).await;
    for (raw, enc) in invalid_names() {
        let what = |ep: &str| format!("{ep} with channel {raw:?}");
        let c = error_code::INVALID_CHANNEL;
        expect_error(f.get(&format!("/sse?channel={enc}")).await, 400, c, &what("GET /sse")).await;
        expect_error(f.get(&format!("/poll?channel={enc}&timeout=0")).await, 400, c, &what("GET /poll"))
            .await;
        let resp = f.ws_upgrade(&format!("/ws?channel={enc}"), "13", Some("dGhlIHNhbXBsZSBub25jZQ==")).await;
        expect_error(resp, 400, c, &what("WebSocket upgrade")).await;
        if !raw.is_empty() {
            let resp = f.post_raw(&format!("/publish/{enc}"), "x").await;
            let msg = expect_error(resp, 400, c, &what("POST /publish")).await;
            assert!(msg.contains("invalid channel"), "{msg}");
        }
        let resp = f.post_json(&json!({"channel": raw, "data": "x"})).await;
        expect_error(resp, 400, c, &what("POST /api/publish")).await;
        // One bad name among good ones refuses the whole request: nothing reaches the
        // healthy channel (checked by `assert_unharmed`).
        let resp = f.post_json(&json!({"channels": [f.healthy, raw], "data": "must not arrive"})).await;
        expect_error(resp, 400, c, &what("POST /api/publish channels")).await;
        ws_send(&mut probe, json!({"op": "subscribe", "channels": [raw]})).await;
        expect_ws_error(&mut probe, c, &what("WebSocket subscribe op")).await;
    }
    // A real WebSocket client sees the refusal as a failed handshake.
    match tokio_tungstenite::connect_async(f.gw.ws_url("/ws?channel=has%20space")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected the handshake to be refused with 400, got {:?}", other.map(|(_, r)| r)),
    }

    // No channel at all: bad_request, saying one is needed.
    let c = error_code::BAD_REQUEST;
    let msg = expect_error(f.get("/sse").await, 400, c, "GET /sse without channel").await;
    assert!(msg.contains("channel"), "{msg}");
    expect_error(f.get("/poll?timeout=0").await, 400, c, "GET /poll without channel").await;
    expect_error(f.post_json(&json!({"data": "x"})).await, 400, c, "/api/publish without channel").await;
    let resp = f.post_json(&json!({"channels": [], "data": "x"})).await;
    expect_error(resp, 400, c, "/api/publish with no channels").await;
    ws_send(&mut probe, json!({"op": "subscribe", "channels": []})).await;
    expect_ws_error(&mut probe, c, "WebSocket subscribe op without channels").await;
    // An empty path segment is no route at all.
    let resp = f.post_raw("/publish/", "x").await;
    expect_error(resp, 404, error_code::NOT_FOUND, "POST /publish/ (empty channel)").await;

    assert_ws_usable(&f, &mut probe, "after-bad-names").await;
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_channels_are_refused() {
    let mut f = Fixture::start(&[]).await;
    let chans: Vec<String> = (0..=MAX_CHANNELS).map(|i| channel(&format!("many{i}"))).collect();
    let query = chans.iter().map(|c| format!("channel={c}")).collect::<Vec<_>>().join("&");
    let c = error_code::TOO_MANY_CHANNELS;
    let msg = expect_error(f.get(&format!("/sse?{query}")).await, 400, c, "SSE with 4 channels").await;
    assert!(msg.contains('4') && msg.contains('3'), "says how many were asked and allowed: {msg}");
    expect_error(f.get(&format!("/poll?{query}&timeout=0")).await, 400, c, "poll with 4 channels").await;
    let resp = f.ws_upgrade(&format!("/ws?{query}"), "13", Some("dGhlIHNhbXBsZSBub25jZQ==")).await;
    expect_error(resp, 400, c, "WebSocket upgrade with 4 channels").await;
    let resp =
        f.post_json(&json!({"channels": [f.healthy, chans[0], chans[1], chans[2]], "data": "no"})).await;
    expect_error(resp, 400, c, "/api/publish to 4 channels").await;

    // Duplicates count once: the same channel five times is one channel.
    let dup = channel("dup");
    let mut sse = SseClient::connect(&f.url(&format!("/sse?{}", format!("channel={dup}&").repeat(5)))).await;
    f.redis.cli(&["PUBLISH", &dup, "once"]);
    assert_eq!(sse.next().await.data, "once");

    // Over WebSocket the limit is per connection, across subscribe ops.
    let mut ws = ws_connect(&f.gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&chans[0], &chans[1]]).await;
    ws_send(&mut ws, json!({"op": "subscribe", "channels": [chans[2], chans[3]]})).await;
    expect_ws_error(&mut ws, c, "WebSocket subscribe op past the limit").await;
    // Re-subscribing a held channel is not a new one; up to the limit is fine.
    ws_subscribe(&mut ws, &[&chans[0]]).await;
    ws_subscribe(&mut ws, &[&chans[2]]).await;
    ws_send(&mut ws, json!({"op": "subscribe", "channels": [chans[3]]})).await;
    expect_ws_error(&mut ws, c, "a fourth channel").await;
    // The refused op changed nothing: the held channels still deliver, the refused one does not.
    assert_eq!(f.redis.cli(&["PUBLISH", &chans[3], "refused"]), "0", "nobody subscribed the refused channel");
    f.redis.cli(&["PUBLISH", &chans[1], "held"]);
    assert_eq!(ws_next(&mut ws).await, message(&chans[1], "held"));

    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_refused_and_the_limit_itself_is_fine() {
    let mut f = Fixture::start(&[]).await;
    let over = "x".repeat(MAX_PAYLOAD + 1);
    let c = error_code::PAYLOAD_TOO_LARGE;
    let path = format!("/publish/{}", f.healthy);
    let resp = f.post_oversized(&path, over.clone(), false).await;
    let msg = expect_error(resp, 413, c, "raw publish over the limit").await;
    assert!(msg.contains(&MAX_PAYLOAD.to_string()), "names the limit: {msg}");
    let resp = f.post_json(&json!({"channel": f.healthy, "data": over})).await;
    expect_error(resp, 413, c, "JSON publish over the limit").await;
    // A body far beyond what any valid JSON request could be is cut off unread.
    let huge = json!({"channel": f.healthy, "data": "y".repeat(100 * 1024)}).to_string();
    expect_error(f.post_oversized("/api/publish", huge, true).await, 413, c, "JSON publish of 100 KiB").await;
    // Publishing over WebSocket is disabled by default.
    ws_send(&mut f.ws, json!({"op": "publish", "channel": f.healthy, "data": "via ws"})).await;
    expect_ws_error(&mut f.ws, error_code::FORBIDDEN, "WebSocket publish op").await;

    // Exactly at the limit is accepted, and it is the first thing the clients see.
    let at_limit = "z".repeat(MAX_PAYLOAD);
    let resp = f.post_raw(&path, at_limit.clone()).await;
    assert_eq!(resp.status(), 200);
    let r: PublishResult = resp.json().await.unwrap();
    assert!(r.subscribed && !r.duplicate, "{r:?}");
    assert!(r.id.is_some(), "an HTTP publish gets a history id: {r:?}");
    let ev = f.sse.next().await;
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (r.id.as_deref(), at_limit.as_str()));
    let expected = ServerFrame::Message { channel: f.healthy.clone(), id: r.id, event: None, data: at_limit };
    assert_eq!(ws_next(&mut f.ws).await, expected);

    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_publish_op_is_checked_when_enabled() {
    let mut f = Fixture::start(&["--ws-publish", "true"]).await;
    let mut ws = ws_connect(&f.gw.ws_url("/ws")).await;
    let cases = [
        (
            json!({"op": "publish", "channel": f.healthy, "data": "x".repeat(MAX_PAYLOAD + 1)}),
            "payload_too_large",
        ),
        (json!({"op": "publish", "channel": "bad channel", "data": "x"}), "invalid_channel"),
        (json!({"op": "publish", "channel": f.healthy, "data": "x", "event": "a\nb"}), "invalid_event"),
        (json!({"op": "publish", "channel": f.healthy}), "bad_request"),
    ];
    for (op, code) in cases {
        ws_send(&mut ws, op.clone()).await;
        expect_ws_error(&mut ws, code, &op.to_string()).await;
    }
    ws_send(&mut ws, json!({"op": "publish", "channel": f.healthy, "data": "allowed"})).await;
    match ws_next(&mut ws).await {
        ServerFrame::Published { channel, .. } => assert_eq!(channel, f.healthy),
        other => panic!("expected published, got {other:?}"),
    }
    assert_eq!(f.sse.next().await.data, "allowed", "refused publishes never arrived, the valid one did");
    assert_eq!(without_id(ws_next(&mut f.ws).await), message(&f.healthy, "allowed"));
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_garbage_gets_error_frames_and_the_connection_stays_usable() {
    let mut f = Fixture::start(&[]).await;
    let mut ws = ws_connect(&f.gw.ws_url("/ws")).await;
    let bad = error_code::BAD_REQUEST;
    let cases = [
        ("not json", bad),
        (r#"{"op":"subscribe","channels":["#, bad),
        ("[1,2,3]", bad),
        (r#"{"channels":["a"]}"#, bad),
        (r#"{"op":5}"#, bad),
        (r#"{"op":"subscribe"}"#, bad),
        (r#"{"op":"subscribe","channels":"not-a-list"}"#, bad),
        (r#"{"op":"subscribe","channels":["a"],"since":"yesterday"}"#, bad),
        (r#"{"op":"subscribe","channels":["a"],"since":{"a":"b~1-0"}}"#, bad),
        (r#"{"op":"subscribe","channels":["a"],"since":{"a":"x"}}"#, bad),
        (r#"{"op":"subscribe","channels":["a"],"since":5}"#, bad),
        (r#"{"op":"dance"}"#, error_code::UNKNOWN_OP),
        (r#"{"op":"SUBSCRIBE","channels":["a"]}"#, error_code::UNKNOWN_OP),
    ];
    for (text, code) in cases {
        ws_send_text(&mut ws, text).await;
        let msg = expect_ws_error(&mut ws, code, text).await;
        if code == error_code::UNKNOWN_OP {
            assert!(msg.contains("subscribe"), "lists the known ops: {msg}");
        }
    }
    ws.send(Message::Binary(Bytes::from_static(b"\x00\x01binary"))).await.unwrap();
    let msg = expect_ws_error(&mut ws, bad, "binary frame").await;
    assert!(msg.contains("text"), "tells the client to send text frames: {msg}");
    // After all that, the same connection still works.
    assert_ws_usable(&f, &mut ws, "ws-after-garbage").await;
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frame_too_big_closes_with_1009() {
    let mut f = Fixture::start(&[]).await;
    let mut ws = ws_connect(&f.gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&channel("big")]).await;
    // Far above the payload limit plus the JSON envelope allowance.
    let text = format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(16 * 1024));
    ws_send_text(&mut ws, &text).await;
    let (code, reason) = ws_close_frame(&mut ws).await;
    assert_eq!(code, 1009, "message too big: {reason}");
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_invalid_utf8_text_frame_closes_with_1007() {
    let mut f = Fixture::start(&[]).await;
    let mut ws = ws_connect(&f.gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&channel("utf8")]).await;
    // A text frame whose payload is not UTF-8, sent as a raw (masked) frame.
    let frame = Frame::message(
        Bytes::from_static(b"{\"op\":\"ping\",\"id\":\"\xff\xfe\"}"),
        OpCode::Data(Data::Text),
        true,
    );
    ws.send(Message::Frame(frame)).await.unwrap();
    let (code, reason) = ws_close_frame(&mut ws).await;
    // RFC 6455 §8.1 / §7.4.1: data inconsistent with the message type is 1007.
    assert_eq!(code, 1007, "invalid frame payload data: {reason}");
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_and_upgrades_are_refused() {
    let mut f = Fixture::start(&[]).await;
    let ch = f.healthy.clone();
    let bad = error_code::BAD_REQUEST;
    for format in ["xml", "JSON", "json%0A"] {
        let msg =
            expect_error(f.get(&format!("/sse?channel={ch}&format={format}")).await, 400, bad, format).await;
        assert!(msg.contains("format"), "{msg}");
    }
    for timeout in ["abc", "-1", "NaN", "inf", "1s", "%20"] {
        let resp = f.get(&format!("/poll?channel={ch}&timeout={timeout}")).await;
        let msg = expect_error(resp, 400, bad, &format!("timeout={timeout}")).await;
        assert!(msg.contains("timeout"), "{msg}");
    }
    // Not base64; base64 of something that is not a cursor; a cursor cut short.
    let good =
        f.get(&format!("/poll?channel={ch}&timeout=0")).await.json::<PollResponse>().await.unwrap().cursor;
    for cursor in ["not-a-cursor!", "W10", "e30", &good[..good.len() / 2]] {
        let resp = f.get(&format!("/poll?channel={ch}&cursor={cursor}&timeout=0")).await;
        let msg = expect_error(resp, 400, bad, &format!("cursor={cursor}")).await;
        assert!(msg.contains("cursor"), "{msg}");
    }
    // The good cursor is still accepted.
    assert_eq!(f.get(&format!("/poll?channel={ch}&cursor={good}&timeout=0")).await.status(), 200);

    // A cursor whose history position is not one.
    let cursor = URL_SAFE_NO_PAD.encode(json!({"e": 1, "p": {}, "h": {&ch: "not-a-position"}}).to_string());
    let resp = f.get(&format!("/poll?channel={ch}&cursor={cursor}&timeout=0")).await;
    expect_error(resp, 400, bad, "cursor with a bad history position").await;

    // Resume ids that are not message ids, as header and as query parameter.
    for id in ["abc", "1-", "-1", "1-x", "1.5-0", "99999999999999999999-0", "a~", "a~1-0,b", "a~x"] {
        let req = f.http.get(f.url(&format!("/sse?channel={ch}"))).header("last-event-id", id);
        let msg = expect_error(req.send().await.unwrap(), 400, bad, &format!("Last-Event-ID {id:?}")).await;
        assert!(msg.contains("last event id"), "{msg}");
        let q: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
        let resp = f.get(&format!("/sse?channel={ch}&last_event_id={q}")).await;
        expect_error(resp, 400, bad, &format!("last_event_id={id:?}")).await;
    }

    // GET /ws without an upgrade: 426 Upgrade Required with a JSON explanation.
    let msg = expect_error(f.get(&format!("/ws?channel={ch}")).await, 426, bad, "plain GET /ws").await;
    assert!(msg.contains("WebSocket"), "{msg}");
    let key = Some("dGhlIHNhbXBsZSBub25jZQ==");
    // Another version: 426 naming the one spoken (RFC 6455 §4.4).
    let resp = f.ws_upgrade("/ws", "8", key).await;
    assert_eq!(resp.headers().get("sec-websocket-version").map(|v| v.as_bytes()), Some(&b"13"[..]));
    let msg = expect_error(resp, 426, bad, "WebSocket version 8").await;
    assert!(msg.contains("Version"), "{msg}");
    expect_error(f.ws_upgrade("/ws", "13", None).await, 400, bad, "upgrade without a key").await;

    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_json_errors() {
    let mut f = Fixture::start(&[]).await;
    for (method, path) in
        [("GET", "/nope"), ("POST", "/nope"), ("GET", "/sse/extra"), ("GET", "/publish/a/b")]
    {
        let resp =
            f.http.request(Method::from_bytes(method.as_bytes()).unwrap(), f.url(path)).send().await.unwrap();
        let msg = expect_error(resp, 404, error_code::NOT_FOUND, &format!("{method} {path}")).await;
        assert!(msg.contains(path), "names the path: {msg}");
    }
    let ch = f.healthy.clone();
    for (method, path) in [
        ("DELETE", "/sse".to_owned()),
        ("POST", "/sse".to_owned()),
        ("PUT", "/poll".to_owned()),
        ("POST", "/ws".to_owned()),
        ("GET", format!("/publish/{ch}")),
        ("DELETE", format!("/publish/{ch}")),
        ("GET", "/api/publish".to_owned()),
    ] {
        let resp = f
            .http
            .request(Method::from_bytes(method.as_bytes()).unwrap(), f.url(&path))
            .send()
            .await
            .unwrap();
        let msg = expect_error(resp, 405, error_code::METHOD_NOT_ALLOWED, &format!("{method} {path}")).await;
        assert!(msg.contains(method), "names the method: {msg}");
    }
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publish_bodies_and_event_names_are_refused() {
    let mut f = Fixture::start(&[]).await;
    let ch = f.healthy.clone();
    let bad = error_code::BAD_REQUEST;
    let resp = f.post_raw(&format!("/publish/{ch}"), Bytes::from_static(b"caf\xe9 \xff\xfe")).await;
    let msg = expect_error(resp, 400, bad, "non-UTF-8 raw body").await;
    assert!(msg.contains("UTF-8"), "{msg}");

    let long_event = "e".repeat(65);
    for event in ["a%0Ab", "a%0D%0Aid:%205", "two%20words", "tab%09", "nul%00", "", long_event.as_str()] {
        let resp = f.post_raw(&format!("/publish/{ch}?event={event}"), "x").await;
        let msg = expect_error(resp, 400, error_code::INVALID_EVENT, &format!("?event={event}")).await;
        assert!(msg.contains("invalid event"), "{msg}");
    }
    for event in ["a\nb", "a\r\nid: 5", "two words", "", long_event.as_str()] {
        let resp = f.post_json(&json!({"channel": ch, "data": "x", "event": event})).await;
        expect_error(resp, 400, error_code::INVALID_EVENT, &format!("JSON event {event:?}")).await;
    }

    let json_cases: [(&str, &str); 7] = [
        ("not json", "not JSON"),
        (r#"{"channel":"c","data":"#, "truncated JSON"),
        (r#"{"channel":"c"}"#, "no data"),
        (r#"{"channel":"c","data":5}"#, "data not a string"),
        (r#"{"channel":"c","channels":["d"],"data":"x"}"#, "both channel and channels"),
        (r#"{"channel":"c","data":"x","surprise":1}"#, "unknown field"),
        (r#"["c","x"]"#, "an array"),
    ];
    for (body, what) in json_cases {
        let body = body.replace("\"c\"", &format!("\"{ch}\""));
        let resp = f
            .http
            .post(f.url("/api/publish"))
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        expect_error(resp, 400, bad, what).await;
    }
    let non_utf8 = [br#"{"channel":""#.as_slice(), ch.as_bytes(), b"\",\"data\":\"\xff\"}"].concat();
    let resp = f
        .http
        .post(f.url("/api/publish"))
        .header(CONTENT_TYPE, "application/json")
        .body(non_utf8)
        .send()
        .await;
    expect_error(resp.unwrap(), 400, bad, "non-UTF-8 JSON body").await;
    let resp =
        f.http.post(f.url("/api/publish")).body(json!({"channel": ch, "data": "x"}).to_string()).send();
    let msg = expect_error(resp.await.unwrap(), 400, bad, "JSON body without a content type").await;
    assert!(msg.contains("Content-Type"), "{msg}");

    // Idempotency keys: 1 to 128 characters, no control characters.
    let long_key = "k".repeat(129);
    for key in ["", "tab\tinside", long_key.as_str()] {
        let resp = f.post_json(&json!({"channel": ch, "data": "x", "idempotency_key": key})).await;
        expect_error(resp, 400, bad, &format!("JSON idempotency_key {key:?}")).await;
        let req = f.http.post(f.url(&format!("/publish/{ch}"))).header("idempotency-key", key).body("x");
        expect_error(req.send().await.unwrap(), 400, bad, &format!("Idempotency-Key {key:?}")).await;
    }
    let not_utf8 = HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let req = f.http.post(f.url(&format!("/publish/{ch}"))).header("idempotency-key", not_utf8).body("x");
    expect_error(req.send().await.unwrap(), 400, bad, "non-UTF-8 Idempotency-Key").await;

    // After every refusal, a valid JSON publish goes through (and is the first arrival).
    let resp = f.post_json(&json!({"channel": ch, "data": "valid", "event": "ok-event"})).await;
    assert_eq!(resp.status(), 200);
    let r: PublishResponse = resp.json().await.unwrap();
    let id = r.results.first().and_then(|r| r.id.clone());
    assert!(id.is_some(), "{r:?}");
    let result = PublishResult { channel: ch.clone(), id: id.clone(), subscribed: true, duplicate: false };
    assert_eq!(r.results, vec![result]);
    let ev = f.sse.next().await;
    assert_eq!((ev.event.as_deref(), ev.data.as_str()), (Some("ok-event"), "valid"));
    assert_eq!(
        ws_next(&mut f.ws).await,
        ServerFrame::Message {
            channel: ch.clone(),
            id,
            event: Some("ok-event".into()),
            data: "valid".into()
        }
    );
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_publishing_only() {
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--api-keys", "k1,k2"]);
    let http = reqwest::Client::new();
    let ch = channel("keyed");
    // Subscribing needs no key.
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&ch]).await;

    let raw = gw.url(&format!("/publish/{ch}"));
    let api = gw.url("/api/publish");
    let body = json!({"channel": ch, "data": "refused"});
    let unauthorized = error_code::UNAUTHORIZED;
    let refused = [
        ("no key", http.post(&raw).body("refused")),
        ("wrong X-API-Key", http.post(&raw).header("x-api-key", "k3").body("refused")),
        ("empty X-API-Key", http.post(&raw).header("x-api-key", "").body("refused")),
        ("key prefix", http.post(&raw).header("x-api-key", "k").body("refused")),
        ("wrong bearer", http.post(&raw).bearer_auth("k3").body("refused")),
        ("basic auth", http.post(&raw).basic_auth("k1", None::<&str>).body("refused")),
        ("bare key in Authorization", http.post(&raw).header("authorization", "k1").body("refused")),
        ("JSON, no key", http.post(&api).json(&body)),
        ("JSON, wrong key", http.post(&api).header("x-api-key", "nope").json(&body)),
        ("JSON, wrong bearer", http.post(&api).bearer_auth("k1k2").json(&body)),
        // Unauthenticated callers learn nothing else about their request.
        ("no key, bad channel", http.post(gw.url("/publish/bad%20channel")).body("x")),
        ("no key, oversized", unpooled().post(&raw).body("x".repeat(128 * 1024))),
    ];
    let n_refused = refused.len();
    for (what, req) in refused {
        let msg = expect_error(req.send().await.unwrap(), 401, unauthorized, what).await;
        assert!(msg.contains("API key"), "{what}: {msg}");
    }

    let accepted = [
        ("X-API-Key k1", http.post(&raw).header("x-api-key", "k1").body("one")),
        ("X-API-Key k2", http.post(&raw).header("x-api-key", "k2").body("two")),
        ("Bearer k1", http.post(&raw).bearer_auth("k1").body("three")),
        (
            "JSON with Bearer k2",
            http.post(&api).bearer_auth("k2").json(&json!({"channel": ch, "data": "four"})),
        ),
    ];
    for (what, req) in accepted {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{what}: {:?}", resp.text().await);
    }
    for data in ["one", "two", "three", "four"] {
        assert_eq!(sse.next().await.data, data, "only authorized publishes arrive, in order");
        assert_eq!(without_id(ws_next(&mut ws).await), message(&ch, data));
    }
    let rejected = gw.metric("gateway_rejected_requests_total{reason=\"unauthorized\"}").await;
    assert_eq!(rejected, n_refused as f64, "every refusal is counted");
    redis.cli(&["PUBLISH", &ch, "still here"]);
    assert_eq!(sse.next().await.data, "still here");
    assert_eq!(ws_next(&mut ws).await, message(&ch, "still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_counted_in_metrics_by_reason() {
    let mut f = Fixture::start(&[]).await;
    let ch = f.healthy.clone();
    expect_error(f.get("/sse?channel=a%20b").await, 400, "invalid_channel", "sse").await;
    expect_error(f.post_raw("/publish/__x", "x").await, 400, "invalid_channel", "publish").await;
    expect_error(
        f.get("/sse?channel=a&channel=b&channel=c&channel=d").await,
        400,
        "too_many_channels",
        "sse",
    )
    .await;
    let resp = f.post_oversized(&format!("/publish/{ch}"), "x".repeat(MAX_PAYLOAD + 1), false).await;
    expect_error(resp, 413, "payload_too_large", "publish").await;
    expect_error(f.get("/sse").await, 400, "bad_request", "sse").await;
    expect_error(f.get("/ws").await, 426, "bad_request", "ws").await;
    expect_error(f.get(&format!("/poll?channel={ch}&timeout=x")).await, 400, "bad_request", "poll").await;
    expect_error(f.get("/nope").await, 404, "not_found", "404").await;
    expect_error(f.http.delete(f.url("/sse")).send().await.unwrap(), 405, "method_not_allowed", "405").await;
    let resp = f.post_raw(&format!("/publish/{ch}?event=a%0Ab"), "x").await;
    expect_error(resp, 400, "invalid_event", "event").await;

    let metrics = reqwest::get(f.gw.admin_url("/metrics")).await.unwrap().text().await.unwrap();
    let expected = [
        ("invalid_channel", 2.0),
        ("too_many_channels", 1.0),
        ("payload_too_large", 1.0),
        ("bad_request", 3.0),
        ("not_found", 1.0),
        ("method_not_allowed", 1.0),
        ("invalid_event", 1.0),
    ];
    for (reason, n) in expected {
        let name = format!("gateway_rejected_requests_total{{reason=\"{reason}\"}}");
        assert_eq!(f.gw.metric(&name).await, n, "{name} in:\n{metrics}");
    }
    // The publish endpoints count their refusals as publish results too.
    let refused_publishes = f.gw.metric("gateway_publish_requests_total{result=\"rejected\"}").await;
    assert_eq!(refused_publishes, 3.0, "{metrics}");
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_poll_timeout_is_clamped_or_refused_not_a_crash() {
    let mut f = Fixture::start(&["--poll-timeout-secs", "1", "--poll-max-timeout-secs", "1"]).await;
    let ch = f.healthy.clone();
    for timeout in ["1e300", "1e20", "18446744073709551616"] {
        let resp = f.http.get(f.url(&format!("/poll?channel={ch}&timeout={timeout}"))).send().await;
        let resp = resp.unwrap_or_else(|e| panic!("timeout={timeout}: no answer at all: {e}"));
        match resp.status().as_u16() {
            // Clamped to --poll-max-timeout-secs: an empty answer after at most a second.
            200 => assert!(resp.json::<PollResponse>().await.unwrap().messages.is_empty()),
            _ => {
                expect_error(resp, 400, error_code::BAD_REQUEST, &format!("timeout={timeout}")).await;
            }
        }
    }
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_channel_in_publish_path_gets_a_json_error() {
    let mut f = Fixture::start(&[]).await;
    let resp = f.post_raw("/publish/%FF%FE", "x").await;
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(got, 400, "{text}");
    let body: ErrorBody =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON error body: {e}: {text}"));
    assert!(["invalid_channel", "bad_request"].contains(&body.error.as_str()), "{text}");
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_op_rejections_are_counted_in_metrics() {
    let mut f = Fixture::start(&[]).await;
    let mut ws = ws_connect(&f.gw.ws_url("/ws")).await;
    let chans: Vec<String> = (0..=MAX_CHANNELS).map(|i| channel(&format!("wsm{i}"))).collect();
    ws_send(&mut ws, json!({"op": "subscribe", "channels": chans})).await;
    expect_ws_error(&mut ws, error_code::TOO_MANY_CHANNELS, "subscribe 4").await;
    ws_send(&mut ws, json!({"op": "subscribe", "channels": ["bad channel"]})).await;
    expect_ws_error(&mut ws, error_code::INVALID_CHANNEL, "bad name").await;
    for reason in ["too_many_channels", "invalid_channel"] {
        let name = format!("gateway_rejected_requests_total{{reason=\"{reason}\"}}");
        assert_eq!(f.gw.metric(&name).await, 1.0, "{name}");
    }
    f.assert_unharmed().await;
}

/// Reads one HTTP/1.1 response (head and `content-length` body); `None` if the
/// connection ends or fails first.
async fn read_response(rd: &mut tokio::net::tcp::OwnedReadHalf) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return Some(String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned());
                }
            }
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_oversized_body_does_not_break_keep_alive() {
    use tokio::io::AsyncWriteExt;
    let mut f = Fixture::start(&[]).await;
    let body = vec![b'x'; 512 * 1024];
    let head = format!(
        "POST /publish/{} HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n",
        f.healthy,
        body.len()
    );
    let (mut rd, mut wr) = tokio::net::TcpStream::connect(f.gw.public).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        wr
    });
    let first = read_response(&mut rd).await.expect("the client gets its 413 answer");
    assert!(first.starts_with("HTTP/1.1 413"), "{first}");
    if !first.to_ascii_lowercase().contains("\r\nconnection: close\r\n") {
        // The answer left the connection open for another request, so one must be served.
        let mut wr = tokio::time::timeout(WAIT, writer).await.expect("body written").unwrap();
        let sent = wr.write_all(b"GET /nope HTTP/1.1\r\nhost: test\r\n\r\n").await;
        let second = read_response(&mut rd).await;
        assert!(
            sent.is_ok() && second.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 404")),
            "413 without `Connection: close`, then the connection died: {first}\nnext answer: {second:?}"
        );
    }
    f.assert_unharmed().await;
}

/// A slow-loris client dripping its request headers is cut off by the header timeout,
/// and a normal client on the same node is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(None, &["--header-timeout-secs", "1"]);
    let mut slow = tokio::net::TcpStream::connect(gw.public).await.unwrap();
    slow.write_all(b"GET /sse?channel=x HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    // Drip one header line every 300 ms; the server must close the socket.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                r = slow.read(&mut buf) => break r,
                _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => {
                    if slow.write_all(b"X-Drip: 1\r\n").await.is_err() {
                        break Ok(0);
                    }
                }
            }
        }
    })
    .await
    .expect("the dripping client is cut off");
    match closed {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            let answer = String::from_utf8_lossy(&buf[..n]);
            assert!(answer.starts_with("HTTP/1.1 408"), "only a timeout answer may come back: {answer}");
        }
    }
    assert!(started.elapsed() < WAIT, "cut off by the header timeout, not by the test bound");
    // Others are unaffected.
    let ok = reqwest::get(gw.url("/poll?channel=slowloris-ok&timeout=0")).await.unwrap();
    assert_eq!(ok.status(), 200);
}

/// A request head over 16 KiB (one huge header, or very many) gets 431 and the
/// connection closed; a head just under the limit is served; nobody else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    use tokio::io::AsyncWriteExt;
    let mut f = Fixture::start(&[]).await;
    let huge_value = format!("x-big: {}\r\n", "a".repeat(20 * 1024));
    let many = (0..2000).map(|i| format!("x-h{i}: v\r\n")).collect::<String>();
    let fine = format!("x-ok: {}\r\n", "a".repeat(8 * 1024));
    for (headers, want) in [(huge_value, "HTTP/1.1 431"), (many, "HTTP/1.1 431"), (fine, "HTTP/1.1 200")] {
        let (mut rd, mut wr) = tokio::net::TcpStream::connect(f.gw.public).await.unwrap().into_split();
        let req =
            format!("GET /poll?channel={}&timeout=0 HTTP/1.1\r\nhost: test\r\n{headers}\r\n", f.healthy);
        let _ = wr.write_all(req.as_bytes()).await;
        let resp = read_response(&mut rd).await.expect("an answer");
        assert!(resp.starts_with(want), "{want}: {}", &resp[..resp.len().min(200)]);
    }
    f.assert_unharmed().await;
}
