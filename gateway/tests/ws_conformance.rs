//! RFC 6455 conformance of `/ws`, as tables in the spirit of the Autobahn test suite's
//! case groups: framing, pings, reserved bits, opcodes, fragmentation, UTF-8, close
//! handling and limits. Each row sends raw (masked) frames over a plain TCP socket to a
//! real gateway and states its outcome: the frames the server answers with, then either
//! the connection still usable (an op sent afterwards is answered) or the close code
//! the server fails it with, followed by the end of the socket.
//!
//! A second table covers the opening handshake (`Sec-WebSocket-Key`, `-Version`,
//! `HEAD`, HTTP/1.0, `Host`, the request-head limit), each row sent both on the lean
//! path (a fresh connection) and on the hyper path (after a publish on the same
//! connection), which must answer alike.
//!
//! Every test ends by checking that a healthy subscriber on the same node still gets a
//! message: bad input harms only the client that sent it.

mod common;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::*;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// `--max-payload-bytes` of the node under test.
const MAX_PAYLOAD: usize = 1024;
/// Largest frame and message the node takes: the payload limit plus 4 KiB of envelope.
const MAX_MESSAGE: usize = MAX_PAYLOAD + 4096;
/// Bound for each frame (or the end of the socket) a case waits for.
const FRAME_WAIT: Duration = Duration::from_secs(3);

// ---- client frames ----

/// A masked client frame: first byte `b0` (FIN, RSV bits, opcode) and `payload`, the
/// length in its shortest form.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut head = vec![b0];
    if len < 126 {
        head.push(0x80 | len as u8);
    } else if len <= 0xffff {
        head.push(0x80 | 126);
        head.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        head.push(0x80 | 127);
        head.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask: [u8; 4] = rand::random();
    head.extend_from_slice(&mask);
    head.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    head
}

/// A frame header claiming a 64-bit payload length `len` (and a mask), nothing after it.
fn header64(b0: u8, len: u64) -> Vec<u8> {
    let mut out = vec![b0, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[1, 2, 3, 4]);
    out
}

/// An unmasked frame (servers send these; clients must not).
fn unmasked(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![b0, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// A final text frame.
fn text(t: &[u8]) -> Vec<u8> {
    frame(0x81, t)
}

/// The `ping` op with a string id (answered by a `pong` op carrying it).
fn ping_op(id: &str) -> Vec<u8> {
    json!({"op": "ping", "id": id}).to_string().into_bytes()
}

/// A close frame with `code` and `reason` bytes.
fn close(code: u16, reason: &[u8]) -> Vec<u8> {
    frame(0x88, &[&code.to_be_bytes()[..], reason].concat())
}

/// The `ping` op split into two fragments (text, then a final continuation), with
/// `between` frames in the middle.
fn fragmented_op(id: &str, between: &[Vec<u8>]) -> Vec<u8> {
    let op = ping_op(id);
    let (a, b) = op.split_at(op.len() / 2);
    [vec![frame(0x01, a)], between.to_vec(), vec![frame(0x80, b)]].concat().concat()
}

/// `ping` op bytes whose id is `raw` (inserted as is: may be invalid UTF-8).
fn op_with_raw_id(raw: &[u8]) -> Vec<u8> {
    [&b"{\"op\":\"ping\",\"id\":\""[..], raw, b"\"}"].concat()
}

// ---- expected outcomes ----

/// A frame the server answers with.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    /// A pong control frame with this payload.
    Pong(Vec<u8>),
    /// A `pong` op answer carrying this id.
    PongOp(String),
    /// An `error` frame with this code.
    Error(&'static str),
}

/// How a case ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    /// The connection stays open: a `ping` op sent now is answered.
    Usable,
    /// The server sends a close frame with this code (`None`: an empty one), then
    /// closes the socket.
    Closed(Option<u16>),
}

struct Case {
    group: &'static str,
    name: String,
    send: Vec<u8>,
    replies: Vec<Reply>,
    then: Then,
}

fn case(
    group: &'static str,
    name: impl Into<String>,
    send: Vec<u8>,
    replies: Vec<Reply>,
    then: Then,
) -> Case {
    Case { group, name: name.into(), send, replies, then }
}

use Reply::{Pong, PongOp};
use Then::{Closed, Usable};

fn op(id: &str) -> Reply {
    PongOp(id.to_owned())
}

/// The table.
fn cases() -> Vec<Case> {
    let mut t = Vec::new();
    let fail = |code| Closed(Some(code));

    // 1. Framing.
    t.push(case("framing", "small text op", text(&ping_op("a")), vec![op("a")], Usable));
    t.push(case("framing", "empty text", text(b""), vec![Reply::Error("bad_request")], Usable));
    let mid = "m".repeat(300);
    t.push(case("framing", "16-bit length text", text(&ping_op(&mid)), vec![op(&mid)], Usable));
    t.push(case(
        "framing",
        "binary message",
        frame(0x82, b"\x00\x01"),
        vec![Reply::Error("bad_request")],
        Usable,
    ));
    t.push(case(
        "framing",
        "empty binary message",
        frame(0x82, b""),
        vec![Reply::Error("bad_request")],
        Usable,
    ));
    t.push(case(
        "framing",
        "two ops in one write",
        [text(&ping_op("1")), text(&ping_op("2"))].concat(),
        vec![op("1"), op("2")],
        Usable,
    ));
    t.push(case("framing", "unmasked client frame", unmasked(0x81, &ping_op("u")), vec![], fail(1002)));

    // 2. Pings and pongs.
    t.push(case("pings", "empty ping", frame(0x89, b""), vec![Pong(vec![])], Usable));
    t.push(case(
        "pings",
        "ping with text payload",
        frame(0x89, b"hello"),
        vec![Pong(b"hello".to_vec())],
        Usable,
    ));
    let binary: Vec<u8> = (0..125u8).map(|i| i.wrapping_mul(37)).collect();
    t.push(case(
        "pings",
        "ping with 125-byte binary payload",
        frame(0x89, &binary),
        vec![Pong(binary)],
        Usable,
    ));
    t.push(case("pings", "ping with 126-byte payload", frame(0x89, &[b'x'; 126]), vec![], fail(1002)));
    t.push(case("pings", "unsolicited empty pong", frame(0x8a, b""), vec![], Usable));
    t.push(case("pings", "unsolicited pong with payload", frame(0x8a, b"unasked"), vec![], Usable));
    let ten: Vec<u8> = (0..10).flat_map(|i| frame(0x89, format!("p{i}").as_bytes())).collect();
    let pongs = (0..10).map(|i| Pong(format!("p{i}").into_bytes())).collect();
    t.push(case("pings", "ten pings in a row", ten, pongs, Usable));
    t.push(case("pings", "fragmented ping", frame(0x09, b"x"), vec![], fail(1002)));
    t.push(case("pings", "pong with 126-byte payload", frame(0x8a, &[b'x'; 126]), vec![], fail(1002)));

    // 3. Reserved bits (no extension is negotiated).
    for (bits, b0) in [("RSV1", 0xc1u8), ("RSV2", 0xa1), ("RSV3", 0x91), ("RSV1-3", 0xf1)] {
        t.push(case(
            "reserved bits",
            format!("{bits} on text"),
            frame(b0, &ping_op("r")),
            vec![],
            fail(1002),
        ));
    }
    t.push(case("reserved bits", "RSV1 on ping", frame(0xc9, b""), vec![], fail(1002)));
    t.push(case("reserved bits", "RSV2 on close", frame(0xa8, &1000u16.to_be_bytes()), vec![], fail(1002)));
    t.push(case(
        "reserved bits",
        "RSV3 on a continuation",
        [frame(0x01, b"{\"op\":"), frame(0x90, b"\"ping\"}")].concat(),
        vec![],
        fail(1002),
    ));
    t.push(case(
        "reserved bits",
        "text op, then RSV2 frame, then ping",
        [text(&ping_op("before")), frame(0xa1, b"x"), frame(0x89, b"late")].concat(),
        vec![op("before")],
        fail(1002),
    ));

    // 4. Opcodes.
    for code in [0x3u8, 0x4, 0x5, 0x6, 0x7] {
        t.push(case(
            "opcodes",
            format!("reserved data opcode {code:#x}"),
            frame(0x80 | code, b""),
            vec![],
            fail(1002),
        ));
    }
    for code in [0xbu8, 0xc, 0xd, 0xe, 0xf] {
        t.push(case(
            "opcodes",
            format!("reserved control opcode {code:#x}"),
            frame(0x80 | code, b""),
            vec![],
            fail(1002),
        ));
    }
    t.push(case(
        "opcodes",
        "text op, then opcode 0x5, then ping",
        [text(&ping_op("ok")), frame(0x85, b"x"), frame(0x89, b"late")].concat(),
        vec![op("ok")],
        fail(1002),
    ));

    // 5. Fragmentation.
    t.push(case("fragmentation", "op in two fragments", fragmented_op("f2", &[]), vec![op("f2")], Usable));
    let one_byte: Vec<u8> = {
        let op = ping_op("f1");
        let last = op.len() - 1;
        op.iter()
            .enumerate()
            .flat_map(|(i, b)| {
                let b0 = match i {
                    0 => 0x01,
                    i if i == last => 0x80,
                    _ => 0x00,
                };
                frame(b0, &[*b])
            })
            .collect()
    };
    t.push(case("fragmentation", "op in one-byte fragments", one_byte, vec![op("f1")], Usable));
    t.push(case(
        "fragmentation",
        "empty first and last fragments",
        [frame(0x01, b""), frame(0x00, &ping_op("fe")), frame(0x80, b"")].concat(),
        vec![op("fe")],
        Usable,
    ));
    t.push(case(
        "fragmentation",
        "ping between fragments",
        fragmented_op("fp", &[frame(0x89, b"mid")]),
        vec![Pong(b"mid".to_vec()), op("fp")],
        Usable,
    ));
    t.push(case(
        "fragmentation",
        "pong between fragments",
        fragmented_op("fq", &[frame(0x8a, b"mid")]),
        vec![op("fq")],
        Usable,
    ));
    t.push(case(
        "fragmentation",
        "close between fragments",
        [frame(0x01, b"{\"op\":"), close(1000, b"")].concat(),
        vec![],
        Closed(Some(1000)),
    ));
    t.push(case(
        "fragmentation",
        "final continuation without a start",
        frame(0x80, &ping_op("c")),
        vec![],
        fail(1002),
    ));
    t.push(case(
        "fragmentation",
        "continuation without a start",
        frame(0x00, &ping_op("c")),
        vec![],
        fail(1002),
    ));
    t.push(case(
        "fragmentation",
        "new text message inside a fragmented one",
        [frame(0x01, b"{\"op\":"), text(&ping_op("n"))].concat(),
        vec![],
        fail(1002),
    ));
    t.push(case(
        "fragmentation",
        "binary fragment inside a fragmented text",
        [frame(0x01, b"{\"op\":"), frame(0x02, b"x")].concat(),
        vec![],
        fail(1002),
    ));
    t.push(case(
        "fragmentation",
        "fragmented binary message",
        [frame(0x02, b"\x01"), frame(0x80, b"\x02")].concat(),
        vec![Reply::Error("bad_request")],
        Usable,
    ));
    t.push(case(
        "fragmentation",
        "fragmented ping continued",
        [frame(0x09, b"a"), frame(0x80, b"b")].concat(),
        vec![],
        fail(1002),
    ));

    // 6. UTF-8.
    for (name, s) in [("Greek", "κόσμε"), ("4-byte code points", "𝄞😀"), ("U+10FFFF", "\u{10ffff}")]
    {
        t.push(case("utf-8", format!("valid text: {name}"), text(&ping_op(s)), vec![op(s)], Usable));
    }
    let invalid: [(&str, &[u8]); 7] = [
        ("byte 0xff", b"\xff"),
        ("lone continuation byte", b"\x80"),
        ("overlong '/'", b"\xc0\xaf"),
        ("UTF-16 surrogate", b"\xed\xa0\x80"),
        ("above U+10FFFF", b"\xf4\x90\x80\x80"),
        ("truncated sequence at the end", b"\xe2\x82"),
        ("truncated sequence in the middle", b"\xe2\x82x"),
    ];
    for (name, raw) in invalid {
        t.push(case(
            "utf-8",
            format!("invalid text: {name}"),
            text(&op_with_raw_id(raw)),
            vec![],
            fail(1007),
        ));
    }
    // "κ" is CE BA: split between two fragments it is still valid.
    let split = op_with_raw_id("κκκ".as_bytes());
    let at = split.iter().position(|b| *b == 0xce).unwrap() + 1;
    t.push(case(
        "utf-8",
        "code point split across fragments",
        [frame(0x01, &split[..at]), frame(0x80, &split[at..])].concat(),
        vec![op("κκκ")],
        Usable,
    ));
    let broken = op_with_raw_id(b"\xcex");
    let at = broken.iter().position(|b| *b == 0xce).unwrap() + 1;
    t.push(case(
        "utf-8",
        "broken sequence across fragments",
        [frame(0x01, &broken[..at]), frame(0x80, &broken[at..])].concat(),
        vec![],
        fail(1007),
    ));
    let euro = op_with_raw_id("€".as_bytes());
    let at = euro.iter().position(|b| *b == 0xe2).unwrap();
    t.push(case(
        "utf-8",
        "code point split over three fragments",
        [frame(0x01, &euro[..at + 1]), frame(0x00, &euro[at + 1..at + 2]), frame(0x80, &euro[at + 2..])]
            .concat(),
        vec![op("€")],
        Usable,
    ));
    t.push(case(
        "utf-8",
        "invalid first fragment fails before the message ends",
        frame(0x01, b"{\"op\":\"ping\",\"id\":\"\xff"),
        vec![],
        fail(1007),
    ));
    t.push(case(
        "utf-8",
        "invalid bytes in a continuation",
        [frame(0x01, b"{\"op\":\"ping\","), frame(0x80, b"\"id\":\"\xff\"}")].concat(),
        vec![],
        fail(1007),
    ));

    // 7. Close handling.
    t.push(case("close", "empty close", frame(0x88, b""), vec![], Closed(None)));
    t.push(case("close", "close 1000", close(1000, b""), vec![], Closed(Some(1000))));
    t.push(case("close", "close 1000 with a reason", close(1000, b"bye"), vec![], Closed(Some(1000))));
    t.push(case(
        "close",
        "close with a 123-byte reason",
        close(1000, &[b'r'; 123]),
        vec![],
        Closed(Some(1000)),
    ));
    t.push(case("close", "close payload of 126 bytes", close(1000, &[b'r'; 124]), vec![], fail(1002)));
    t.push(case("close", "close with a one-byte payload", frame(0x88, b"\x03"), vec![], fail(1002)));
    t.push(case("close", "close reason not UTF-8", close(1000, b"\xff\xfe"), vec![], fail(1007)));
    for code in
        [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
    {
        t.push(case(
            "close",
            format!("valid code {code} is echoed"),
            close(code, b""),
            vec![],
            Closed(Some(code)),
        ));
    }
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        t.push(case("close", format!("invalid code {code}"), close(code, b""), vec![], fail(1002)));
    }
    t.push(case(
        "close",
        "close after close",
        [close(1000, b""), close(1001, b"")].concat(),
        vec![],
        Closed(Some(1000)),
    ));
    t.push(case(
        "close",
        "text after close is not answered",
        [close(1000, b""), text(&ping_op("late"))].concat(),
        vec![],
        Closed(Some(1000)),
    ));
    t.push(case(
        "close",
        "ping after close is not answered",
        [close(1000, b""), frame(0x89, b"late")].concat(),
        vec![],
        Closed(Some(1000)),
    ));

    // 9. Limits (frame and message size).
    let id_at_limit = "l".repeat(MAX_MESSAGE - ping_op("").len());
    t.push(case(
        "limits",
        "text frame at the limit",
        text(&ping_op(&id_at_limit)),
        vec![op(&id_at_limit)],
        Usable,
    ));
    let over = "o".repeat(MAX_MESSAGE + 1 - ping_op("").len());
    t.push(case("limits", "text frame one byte over the limit", text(&ping_op(&over)), vec![], fail(1009)));
    let chunk = vec![b' '; MAX_MESSAGE / 2 + 1];
    t.push(case(
        "limits",
        "fragmented message over the limit",
        [frame(0x01, &chunk), frame(0x00, &chunk), frame(0x80, &ping_op("x"))].concat(),
        vec![],
        fail(1009),
    ));
    t.push(case("limits", "64-bit length with the top bit set", header64(0x81, 1 << 63), vec![], fail(1002)));
    t.push(case("limits", "64-bit length u64::MAX", header64(0x81, u64::MAX), vec![], fail(1002)));
    t.push(case("limits", "64-bit length of 1 TiB", header64(0x81, 1 << 40), vec![], fail(1009)));
    t.push(case(
        "limits",
        "binary frame over the limit",
        frame(0x82, &vec![0; MAX_MESSAGE + 1]),
        vec![],
        fail(1009),
    ));
    t
}

// ---- the raw client ----

/// What came back from the server.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Pong(Vec<u8>),
    PongOp(String),
    Error(String),
    Text(String),
    Close(Option<u16>),
    Other(u8, Vec<u8>),
    /// The socket ended (EOF or reset).
    End,
    /// Nothing within [`FRAME_WAIT`].
    Silence,
}

struct Raw {
    io: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Upgrades a fresh connection to `/ws`.
    async fn open(gw: &Gateway) -> Self {
        let mut io = TcpStream::connect(gw.public).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            gw.public
        );
        io.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Self { io, buf: Vec::new() };
        let end = loop {
            if let Some(end) = find(&raw.buf, b"\r\n\r\n") {
                break end + 4;
            }
            assert!(raw.fill().await, "the upgrade is answered");
        };
        assert!(raw.buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&raw.buf));
        raw.buf.drain(..end);
        raw
    }

    /// Reads more bytes; false at the end of the socket or after [`FRAME_WAIT`].
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(FRAME_WAIT, self.io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next frame from the server (its pings skipped), or how the socket ended.
    async fn next(&mut self) -> Got {
        loop {
            while let Some((b0, payload, used)) = server_frame(&self.buf) {
                self.buf.drain(..used);
                let got = match b0 & 0x0f {
                    0x9 => continue,
                    0xa => Got::Pong(payload),
                    0x8 => {
                        Got::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])))
                    }
                    0x1 => match serde_json::from_slice::<Value>(&payload) {
                        Ok(v) if v["type"] == "pong" => {
                            Got::PongOp(v["id"].as_str().unwrap_or("?").to_owned())
                        }
                        Ok(v) if v["type"] == "error" => {
                            Got::Error(v["code"].as_str().unwrap_or("?").to_owned())
                        }
                        _ => Got::Text(String::from_utf8_lossy(&payload).into_owned()),
                    },
                    _ => Got::Other(b0, payload),
                };
                return got;
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(FRAME_WAIT, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Got::End,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return Got::Silence,
            }
        }
    }
}

/// Splits one server frame off the front of `buf`: `(first byte, payload, used)`.
fn server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, start) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?.to_vec();
    Some((buf[0], payload, start + len))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn expected(r: &Reply) -> Got {
    match r {
        Reply::Pong(p) => Got::Pong(p.clone()),
        Reply::PongOp(id) => Got::PongOp(id.clone()),
        Reply::Error(code) => Got::Error((*code).to_owned()),
    }
}

/// Runs one case on a fresh connection; `Err` says what differed.
async fn run(gw: &Gateway, c: &Case) -> Result<(), String> {
    let mut raw = Raw::open(gw).await;
    // The server may fail the connection before it has read everything: a failed write
    // is fine, the outcome is what it answers.
    let _ = raw.io.write_all(&c.send).await;
    for want in &c.replies {
        let got = raw.next().await;
        if got != expected(want) {
            return Err(format!("expected {want:?}, got {got:?}"));
        }
    }
    match c.then {
        Usable => {
            let _ = raw.io.write_all(&text(&ping_op("after"))).await;
            match raw.next().await {
                Got::PongOp(id) if id == "after" => Ok(()),
                got => Err(format!("expected the connection to stay usable, got {got:?}")),
            }
        }
        Closed(code) => {
            let got = raw.next().await;
            if got != Got::Close(code) {
                return Err(format!("expected close {code:?}, got {got:?}"));
            }
            match raw.next().await {
                Got::End => Ok(()),
                got => Err(format!("expected the socket to end after the close frame, got {got:?}")),
            }
        }
    }
}

/// A node with a small payload limit, and a healthy WebSocket subscriber on it.
async fn node() -> (Gateway, Ws, String) {
    let gw = Gateway::start(None, &["--max-payload-bytes", &MAX_PAYLOAD.to_string()]);
    let healthy = channel("healthy");
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[&healthy]).await;
    (gw, ws, healthy)
}

/// The healthy subscriber still gets a message published now, as its next frame.
async fn assert_unharmed(gw: &Gateway, ws: &mut Ws, healthy: &str) {
    let data = format!("still here {:x}", rand::random::<u32>());
    publish(gw, healthy, &data).await;
    assert_eq!(without_id(ws_next(ws).await), message(healthy, &data), "the healthy subscriber");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_follow_rfc_6455() {
    let (gw, mut ws, healthy) = node().await;
    let table = cases();
    let mut failures = Vec::new();
    for c in &table {
        let result = run(&gw, c).await;
        let mark = if result.is_ok() { "ok  " } else { "FAIL" };
        eprintln!("{mark} {:<14} {:<44} {}", c.group, c.name, result.as_ref().err().map_or("", |e| e));
        if let Err(e) = result {
            failures.push(format!("{} / {}: {e}", c.group, c.name));
        }
    }
    eprintln!("{} cases, {} failed", table.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    assert_unharmed(&gw, &mut ws, &healthy).await;
}

// ---- the opening handshake ----

/// One handshake row: the request (built for a host), and the status it gets.
struct Hs {
    name: &'static str,
    request: Box<dyn Fn(&str) -> String>,
    status: u16,
    /// A header field the answer must carry (lower case name and value).
    header: Option<(&'static str, &'static str)>,
    /// Whether to try it on the hyper path too (after a publish on the connection).
    hyper_too: bool,
}

/// A request with these header lines (`{host}` is replaced by the node's address).
fn request(method: &'static str, version: &'static str, headers: Vec<String>) -> Box<dyn Fn(&str) -> String> {
    Box::new(move |host| {
        let mut r = format!("{method} /ws HTTP/{version}\r\n");
        for h in &headers {
            r.push_str(&h.replace("{host}", host));
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r
    })
}

/// The header lines of a valid upgrade, with `replace` applied: `(name, Some(value))`
/// sets a field (added if missing), `(name, None)` drops it.
fn upgrade_with(replace: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut fields: Vec<(String, String)> = [
        ("Host", "{host}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    for (name, value) in replace {
        let at = fields.iter().position(|(n, _)| n.eq_ignore_ascii_case(name));
        match (at, value) {
            (Some(i), Some(v)) => fields[i].1 = v.to_string(),
            (None, Some(v)) => fields.push((name.to_string(), v.to_string())),
            (Some(i), None) => {
                fields.remove(i);
            }
            (None, None) => {}
        }
    }
    fields.into_iter().map(|(n, v)| format!("{n}: {v}")).collect()
}

fn plus(mut lines: Vec<String>, extra: &str) -> Vec<String> {
    lines.push(extra.to_owned());
    lines
}

fn handshakes() -> Vec<Hs> {
    let get = |headers| request("GET", "1.1", headers);
    let row = |name, request, status, header, hyper_too| Hs { name, request, status, header, hyper_too };
    let key15 = STANDARD.encode([7u8; 15]);
    let key17 = STANDARD.encode([7u8; 17]);
    let big = |n: usize| format!("X-Big: {}", "b".repeat(n));
    vec![
        row(
            "valid upgrade",
            get(upgrade_with(&[])),
            101,
            Some(("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")),
            true,
        ),
        row(
            "tokens in lists, any case",
            get(upgrade_with(&[("Connection", Some("keep-alive, Upgrade")), ("Upgrade", Some("WebSocket"))])),
            101,
            None,
            true,
        ),
        row(
            "key not base64",
            get(upgrade_with(&[("Sec-WebSocket-Key", Some("!!!!not-base64-at-all!!!"))])),
            400,
            None,
            true,
        ),
        row("key of 15 bytes", get(upgrade_with(&[("Sec-WebSocket-Key", Some(&key15))])), 400, None, true),
        row("key of 17 bytes", get(upgrade_with(&[("Sec-WebSocket-Key", Some(&key17))])), 400, None, true),
        row(
            "key without padding",
            get(upgrade_with(&[("Sec-WebSocket-Key", Some("dGhlIHNhbXBsZSBub25jZQ"))])),
            400,
            None,
            true,
        ),
        row("empty key", get(upgrade_with(&[("Sec-WebSocket-Key", Some(""))])), 400, None, true),
        row("no key", get(upgrade_with(&[("Sec-WebSocket-Key", None)])), 400, None, true),
        row(
            "two keys",
            get(plus(upgrade_with(&[]), "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==")),
            400,
            None,
            true,
        ),
        row(
            "version 8",
            get(upgrade_with(&[("Sec-WebSocket-Version", Some("8"))])),
            426,
            Some(("sec-websocket-version", "13")),
            true,
        ),
        row(
            "version 14",
            get(upgrade_with(&[("Sec-WebSocket-Version", Some("14"))])),
            426,
            Some(("sec-websocket-version", "13")),
            true,
        ),
        row(
            "no version",
            get(upgrade_with(&[("Sec-WebSocket-Version", None)])),
            426,
            Some(("sec-websocket-version", "13")),
            true,
        ),
        row("HEAD is not an upgrade", request("HEAD", "1.1", upgrade_with(&[])), 426, None, true),
        row(
            "POST is not an upgrade",
            request("POST", "1.1", plus(upgrade_with(&[]), "Content-Length: 0")),
            405,
            None,
            true,
        ),
        row("HTTP/1.0 cannot upgrade", request("GET", "1.0", upgrade_with(&[])), 400, None, true),
        row("no Host", get(upgrade_with(&[("Host", None)])), 400, None, true),
        row("two Hosts", get(plus(upgrade_with(&[]), "Host: other.example")), 400, None, true),
        row("head just under 16 KiB", get(plus(upgrade_with(&[]), &big(15 * 1024))), 101, None, true),
        row("head just over 16 KiB", get(plus(upgrade_with(&[]), &big(16 * 1024 + 100))), 431, None, true),
        row("head of 20 KiB", get(plus(upgrade_with(&[]), &big(20 * 1024))), 431, None, true),
    ]
}

/// A parsed answer: status, header fields (names lower case), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// Reads one answer off `s` (`buf` keeps what follows); `None` if the socket ends first.
async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Option<Answer> {
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = find(buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let len = if head_request || status == 101 {
                    0
                } else {
                    headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0)
                };
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    buf.drain(..end + 4 + len);
                    return Some(Answer { status, headers, body });
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.ok().flatten()
}

/// Sends a row's request, on a fresh connection or after a publish on it (hyper path).
async fn try_handshake(gw: &Gateway, row: &Hs, via_hyper: bool) -> Result<(), String> {
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    let mut buf = Vec::new();
    let host = gw.public.to_string();
    if via_hyper {
        let publish =
            format!("POST /publish/hs-warmup HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\n\r\nx");
        s.write_all(publish.as_bytes()).await.unwrap();
        let first = read_answer(&mut s, &mut buf, false).await.ok_or("no answer to the publish")?;
        if first.status != 200 {
            return Err(format!("the publish got {}: {}", first.status, first.body));
        }
    }
    let _ = s.write_all((row.request)(&host).as_bytes()).await;
    let head_request = row.name.starts_with("HEAD");
    let Some(answer) = read_answer(&mut s, &mut buf, head_request).await else {
        return Err("no answer (the connection ended or went quiet)".into());
    };
    if answer.status != row.status {
        return Err(format!("expected {}, got {} {}", row.status, answer.status, answer.body));
    }
    if let Some((name, value)) = row.header {
        let got = answer.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        if got != Some(value) {
            return Err(format!("expected `{name}: {value}`, got {got:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_follow_rfc_6455_on_both_paths() {
    let (gw, mut ws, healthy) = node().await;
    let mut failures = Vec::new();
    let rows = handshakes();
    for row in &rows {
        for via_hyper in [false, true] {
            if via_hyper && !row.hyper_too {
                continue;
            }
            let path = if via_hyper { "hyper" } else { "lean" };
            let result = try_handshake(&gw, row, via_hyper).await;
            let mark = if result.is_ok() { "ok  " } else { "FAIL" };
            eprintln!(
                "{mark} {path:<5} {:<28} {}",
                row.name,
                result.as_ref().err().map_or("", |e| e.as_str())
            );
            if let Err(e) = result {
                failures.push(format!("{path} / {}: {e}", row.name));
            }
        }
    }
    assert!(failures.is_empty(), "{} handshake rows failed:\n{}", failures.len(), failures.join("\n"));
    // Host is required of every HTTP/1.1 request, not only upgrades; HTTP/1.0 has none.
    for (req, want) in [
        ("GET /poll?channel=h&timeout=0 HTTP/1.1\r\n\r\n", 400),
        ("GET /poll?channel=h&timeout=0 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET /poll?channel=h&timeout=0 HTTP/1.0\r\n\r\n", 200),
    ] {
        let mut s = TcpStream::connect(gw.public).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let answer = read_answer(&mut s, &mut Vec::new(), false).await.expect("an answer");
        assert_eq!(answer.status, want, "{req:?}: {}", answer.body);
    }
    assert_unharmed(&gw, &mut ws, &healthy).await;
}
