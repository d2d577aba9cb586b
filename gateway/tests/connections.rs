//! One TCP connection, several requests: subscribers' `GET`s are served on the lean
//! HTTP/1 path and everything else by hyper, and a connection can move from the first to
//! the second mid-way. Each path must answer correctly either way: keep-alive long-polls,
//! `Connection: close`, HTTP/1.0, and an SSE stream or a WebSocket upgrade on a
//! connection that published first (hyper's path).

mod common;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Reads from `s` into `buf` until `done(buf)` holds (or fails the test after `WAIT`).
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, what: &str, done: impl Fn(&[u8]) -> bool) {
    let read = async {
        let mut chunk = [0u8; 4096];
        while !done(buf) {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before {what}: {:?}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("no {what} in time: {:?}", String::from_utf8_lossy(buf)));
}

fn contains(buf: &[u8], needle: &str) -> bool {
    buf.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// One whole response with a `content-length` body: `(head, body)`; consumes it from `buf`.
async fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    read_until(s, buf, "a response head", |b| contains(b, "\r\n\r\n")).await;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    read_until(s, buf, "the body", |b| b.len() >= end + len).await;
    let body = String::from_utf8(buf[end..end + len].to_vec()).unwrap();
    buf.drain(..end + len);
    (head, body)
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: test\r\n{extra}\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n{body}", body.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_share_a_keep_alive_connection_and_close_when_asked() {
    let gw = Gateway::start(None, &[]);
    let ch = channel("keepalive");
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let mut buf = Vec::new();
    // Two requests in one write: the second waits in the connection's buffer.
    let both = get(&format!("/poll?channel={ch}&timeout=0"), "") + &get("/nope", "");
    s.write_all(both.as_bytes()).await.unwrap();
    let (head, body) = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let first: shared::protocol::PollResponse = serde_json::from_str(&body).unwrap();
    let (head, _) = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 404"), "pipelined request answered: {head}");
    // A held poll on the same connection is answered by a publish.
    s.write_all(get(&format!("/poll?channel={ch}&cursor={}&timeout=30", first.cursor), "").as_bytes())
        .await
        .unwrap();
    let publish = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        publish(&gw, &ch, "held").await;
    };
    let ((head, body), ()) = tokio::join!(response(&mut s, &mut buf), publish);
    assert!(head.contains("content-type: application/json"), "{head}");
    let got: shared::protocol::PollResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(got.messages.iter().map(|m| m.data.as_str()).collect::<Vec<_>>(), ["held"]);
    // `Connection: close` is honoured: answered, then the server closes.
    s.write_all(get(&format!("/poll?channel={ch}&timeout=0"), "connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut buf).await;
    assert!(head.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{head}");
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(WAIT, s.read(&mut rest)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "nothing after the last answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_after_a_publish_on_the_same_connection_streams_through_hyper() {
    let gw = Gateway::start(None, &[]);
    let ch = channel("after-post");
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(post(&format!("/publish/{ch}"), "nobody yet").as_bytes()).await.unwrap();
    let (head, _) = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(get(&format!("/sse?channel={ch}"), "").as_bytes()).await.unwrap();
    read_until(&mut s, &mut buf, "the stream's opening comment", |b| contains(b, ": ok")).await;
    assert!(contains(&buf, "text/event-stream"), "{:?}", String::from_utf8_lossy(&buf));
    publish(&gw, &ch, "streamed").await;
    read_until(&mut s, &mut buf, "the event", |b| contains(b, "data: streamed\n\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_after_a_publish_on_the_same_connection() {
    let gw = Gateway::start(None, &[]);
    let ch = channel("ws-after-post");
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(post(&format!("/publish/{ch}"), "x").as_bytes()).await.unwrap();
    response(&mut s, &mut buf).await;
    let upgrade = get(
        &format!("/ws?channel={ch}"),
        "upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         sec-websocket-version: 13\r\n",
    );
    s.write_all(upgrade.as_bytes()).await.unwrap();
    read_until(&mut s, &mut buf, "the 101 head", |b| contains(b, "\r\n\r\n")).await;
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&buf));
    let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        s,
        buf.split_off(buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    assert!(matches!(ws_next_raw(&mut ws).await, shared::protocol::ServerFrame::Subscribed { .. }));
    publish(&gw, &ch, "upgraded").await;
    assert_eq!(without_id(ws_next_raw(&mut ws).await), message(&ch, "upgraded"));
}

/// A WebSocket upgrade on the lean path (answered without the router): a complete `101`
/// head, then frames; a refused upgrade there is an ordinary JSON error and the
/// connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_websocket_upgrade_head_and_a_refused_upgrade_on_a_keep_alive_connection() {
    let gw = Gateway::start(None, &[]);
    let ch = channel("ws-lean");
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let mut buf = Vec::new();
    // No Sec-WebSocket-Key: 400 with a JSON body, and the connection is kept.
    let bad = get(
        &format!("/ws?channel={ch}"),
        "upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n",
    );
    s.write_all(bad.as_bytes()).await.unwrap();
    let (head, body) = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    s.write_all(ws_upgrade(&format!("/ws?channel={ch}"), "").as_bytes()).await.unwrap();
    read_until(&mut s, &mut buf, "the 101 head", |b| contains(b, "\r\n\r\n")).await;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(buf[..end].to_vec()).unwrap().to_ascii_lowercase();
    let lines: Vec<&str> = head.lines().collect();
    assert_eq!(lines[0], "http/1.1 101 switching protocols", "{head}");
    for line in
        ["connection: upgrade", "upgrade: websocket", "sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="]
    {
        assert!(lines.contains(&line), "{line:?} missing: {head}");
    }
    assert!(lines.iter().any(|l| l.starts_with("date: ")), "{head}");
    assert!(!head.contains("content-length") && !head.contains("transfer-encoding"), "{head}");
    let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        s,
        buf.split_off(end),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    assert!(matches!(ws_next_raw(&mut ws).await, shared::protocol::ServerFrame::Subscribed { .. }));
    publish(&gw, &ch, "lean").await;
    assert_eq!(without_id(ws_next_raw(&mut ws).await), message(&ch, "lean"));
}

fn ws_upgrade(path: &str, extra: &str) -> String {
    get(
        path,
        &format!(
            "upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             sec-websocket-version: 13\r\n{extra}"
        ),
    )
}

/// The head of the answer to `req` (lower case, lines sorted, without `date` and
/// framing: hyper sends a held answer chunked where the lean path gives its length),
/// and the body if it has a length; `via_router` sends a publish first, which moves the
/// connection to hyper and the router.
async fn answer_to(gw: &Gateway, req: &str, via_router: bool) -> (Vec<String>, String) {
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let mut buf = Vec::new();
    if via_router {
        s.write_all(post(&format!("/publish/{}", channel("other")), "x").as_bytes()).await.unwrap();
        response(&mut s, &mut buf).await;
    }
    s.write_all(req.as_bytes()).await.unwrap();
    read_until(&mut s, &mut buf, "a head", |b| contains(b, "\r\n\r\n")).await;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(buf[..end].to_vec()).unwrap().to_ascii_lowercase();
    let length: Option<usize> =
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|n| n.parse().unwrap());
    let framing = ["date: ", "content-length: ", "transfer-encoding: "];
    let mut lines: Vec<String> = head
        .lines()
        .filter(|l| !l.is_empty() && !framing.iter().any(|f| l.starts_with(f)))
        .map(String::from)
        .collect();
    lines.sort();
    let body = match length {
        Some(len) => {
            read_until(&mut s, &mut buf, "the body", |b| b.len() >= end + len).await;
            String::from_utf8(buf[end..end + len].to_vec()).unwrap()
        }
        None => String::new(),
    };
    (lines, body)
}

/// New subscribers' requests are answered without the router; the answers must be the
/// router's, headers (CORS included) and errors alike, with and without an allowlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_subscriber_answers_match_the_routers() {
    let open = Gateway::start(None, &[]);
    let listed = Gateway::start(None, &["--allowed-origins", "https://app.example"]);
    let ch = channel("parity");
    let cases = [
        ("ws", ws_upgrade(&format!("/ws?channel={ch}"), "")),
        ("ws from an origin", ws_upgrade(&format!("/ws?channel={ch}"), "origin: https://app.example\r\n")),
        (
            "ws from another origin",
            ws_upgrade(&format!("/ws?channel={ch}"), "origin: https://evil.example\r\n"),
        ),
        (
            "ws without a key",
            get(&format!("/ws?channel={ch}"), "upgrade: websocket\r\nconnection: upgrade\r\n"),
        ),
        ("sse", get(&format!("/sse?channel={ch}"), "")),
        ("sse from an origin", get(&format!("/sse?channel={ch}"), "origin: https://app.example\r\n")),
        ("sse from another origin", get(&format!("/sse?channel={ch}"), "origin: https://evil.example\r\n")),
        ("sse, bad format", get(&format!("/sse?channel={ch}&format=xml"), "origin: https://app.example\r\n")),
        ("sse, bad channel", get("/sse?channel=%00", "")),
        ("sse, bad resume id", get(&format!("/sse?channel={ch}"), "last-event-id: nope\r\n")),
        ("poll", get(&format!("/poll?channel={ch}&timeout=0"), "")),
        (
            "poll from an origin",
            get(&format!("/poll?channel={ch}&timeout=0"), "origin: https://app.example\r\n"),
        ),
        (
            "poll, bad timeout",
            get(&format!("/poll?channel={ch}&timeout=soon"), "origin: https://app.example\r\n"),
        ),
        ("poll, bad cursor", get(&format!("/poll?channel={ch}&cursor=zz"), "")),
    ];
    for gw in [&open, &listed] {
        for (what, req) in &cases {
            let lean = answer_to(gw, req, false).await;
            let routed = answer_to(gw, req, true).await;
            assert_eq!(lean.0, routed.0, "{what}: lean path vs router");
            if !routed.1.is_empty() {
                assert_eq!(lean.1, routed.1, "{what}: lean path vs router");
            }
            assert!(lean.0.iter().any(|l| l.starts_with("vary: ")), "{what}: {:?}", lean.0);
        }
    }
    // The allowlist shows: an allowed origin is named, another gets no allow-origin.
    let (head, _) = answer_to(&listed, &cases[5].1, false).await;
    assert!(head.contains(&"access-control-allow-origin: https://app.example".to_owned()), "{head:?}");
    let (head, _) = answer_to(&listed, &cases[6].1, false).await;
    assert!(!head.iter().any(|l| l.starts_with("access-control-allow-origin")), "{head:?}");
    let (head, _) = answer_to(&open, &cases[4].1, false).await;
    assert!(head.contains(&"access-control-allow-origin: *".to_owned()), "{head:?}");
    let (_, body) = answer_to(&open, &cases[10].1, false).await;
    assert!(body.starts_with(r#"{"messages":[],"cursor":""#), "{body}");
}

async fn ws_next_raw(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
) -> shared::protocol::ServerFrame {
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time").unwrap().unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_requests_are_answered() {
    let gw = Gateway::start(None, &[]);
    let ch = channel("http10");
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    s.write_all(format!("GET /poll?channel={ch}&timeout=0 HTTP/1.0\r\n\r\n").as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut all)).await.expect("answered and closed").unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.contains("\"cursor\""), "{text}");
}
