//! The browser client (`clients/js`) in real Chromium against real gateway processes
//! and a real `redis-server`: every transport, fallback when WebSockets are refused,
//! failover when the page's node is killed or drained mid-stream, token refresh, and
//! the demo page. Chromium is driven by `clients/js/e2e/drive.mjs` (Playwright for
//! Node with Debian's `/usr/bin/chromium`); it reports what the pages see as JSON lines.
//!
//! Needs `node`, `chromium` and `npm ci` in `clients/js`. Without them these tests are
//! skipped with a message, or fail when `CI` is set. `js_unit_tests` also runs the
//! client's unit tests (`node --test clients/js/test/`), so `cargo test --workspace`
//! covers them.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::*;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
};

/// The channels per page transport test: one subscription per transport.
const TRANSPORTS: [&str; 3] = ["ws", "sse", "poll"];

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// `None` (and a printed reason) when a prerequisite is missing; a panic instead on CI.
fn prerequisite(ok: bool, what: &str) -> Option<()> {
    if ok {
        return Some(());
    }
    assert!(std::env::var_os("CI").is_none(), "browser tests need {what}");
    eprintln!("SKIPPED: browser tests need {what}");
    None
}

fn have_node() -> bool {
    std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Chromium driven over the JSON-lines protocol of `clients/js/e2e/drive.mjs`.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Everything the pages reported (not the command answers), in order.
    events: Vec<Value>,
    seq: u64,
    started: Instant,
}

impl Browser {
    /// Starts Chromium, or `None` when it cannot run here (see [`prerequisite`]).
    async fn start() -> Option<Self> {
        prerequisite(have_node(), "node (apt-get install nodejs)")?;
        prerequisite(chromium().exists(), "Debian's chromium (apt-get install chromium)")?;
        prerequisite(
            js_dir().join("node_modules/playwright-core/package.json").exists(),
            "the client's dev dependencies (cd clients/js && npm ci)",
        )?;
        let mut child = Command::new("node")
            .arg("e2e/drive.mjs")
            .current_dir(js_dir())
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("driver: {line}"),
                }
            }
        });
        Some(Self { child, stdin, lines, events: Vec::new(), seq: 0, started: Instant::now() })
    }

    /// Takes one line from the driver, keeping page reports; `None` on timeout.
    async fn next(&mut self, until: Instant) -> Option<Value> {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.lines.recv()).await {
            Ok(Some(v)) => {
                if !matches!(v["kind"].as_str(), Some("ok" | "fail")) {
                    if matches!(v["kind"].as_str(), Some("pageerror" | "console")) {
                        eprintln!("page: {v}");
                    }
                    self.events.push(v.clone());
                }
                Some(v)
            }
            Ok(None) => panic!("the browser driver exited; events so far: {:#?}", self.events),
            Err(_) => None,
        }
    }

    /// Runs one command and returns its value; panics when it fails.
    async fn cmd(&mut self, mut c: Value) -> Value {
        self.seq += 1;
        c["seq"] = json!(self.seq);
        let line = format!("{c}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.next(until).await.unwrap_or_else(|| panic!("no answer to {c}"));
            if v["seq"] == json!(self.seq) && v["kind"] == "ok" {
                return v["value"].clone();
            }
            if v["seq"] == json!(self.seq) && v["kind"] == "fail" {
                panic!("{} failed: {}", c["op"], v["error"].as_str().unwrap_or_default());
            }
        }
    }

    /// Waits until `done` holds for the page reports, or panics after `timeout`.
    async fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) {
        let until = Instant::now() + timeout;
        while !done(&self.events) {
            if self.next(until).await.is_none() {
                panic!("timed out waiting for {what}; page reports:\n{}", self.dump());
            }
        }
    }

    fn dump(&self) -> String {
        self.events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
    }

    /// The `data` of every message subscription `sub` delivered.
    fn data(&self, sub: &str) -> Vec<String> {
        messages(&self.events, sub).iter().map(|m| m["data"].as_str().unwrap().to_owned()).collect()
    }

    /// The states subscription `sub` went through, with their info.
    fn states(&self, sub: &str) -> Vec<(String, Value)> {
        of(&self.events, sub, "state")
            .into_iter()
            .map(|e| (e["state"].as_str().unwrap().to_owned(), e["info"].clone()))
            .collect()
    }

    /// Subscribes `sub` in `page` (see `drive.mjs`).
    async fn subscribe(&mut self, page: &str, sub: &str, urls: &[String], channels: &[&str], opts: Value) {
        self.cmd(json!({"op": "subscribe", "page": page, "sub": sub, "urls": urls, "channels": channels, "opts": opts}))
            .await;
    }

    /// Quits Chromium and prints how long this browser test took.
    async fn quit(mut self, test: &str) {
        self.cmd(json!({"op": "quit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        eprintln!("{test}: {:.1} s in the browser", self.started.elapsed().as_secs_f64());
    }
}

fn of<'a>(events: &'a [Value], sub: &str, kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["sub"] == sub && e["kind"] == kind).collect()
}

fn messages<'a>(events: &'a [Value], sub: &str) -> Vec<&'a Value> {
    of(events, sub, "message")
}

fn is_open(events: &[Value], sub: &str) -> bool {
    of(events, sub, "state").last().is_some_and(|s| s["state"] == "open")
}

/// Publishes `data` to `channel` with history through the HTTP API; returns its id.
async fn publish(gw: &Gateway, channel: &str, data: &str) -> String {
    let r = reqwest::Client::new()
        .post(gw.url(&format!("/publish/{channel}")))
        .body(data.to_owned())
        .send()
        .await;
    let body: Value = r.unwrap().json().await.unwrap();
    body["id"].as_str().unwrap_or_else(|| panic!("publish answered {body}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_unit_tests() {
    if prerequisite(have_node(), "node (apt-get install nodejs)").is_none() {
        return;
    }
    let started = Instant::now();
    let out = std::process::Command::new("node")
        .args(["--test", "clients/js/test/"])
        .current_dir(js_dir().join("../.."))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test clients/js/test/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("# pass") || l.starts_with("# fail")).collect();
    assert!(summary.first().is_some_and(|l| l != &"# pass 0"), "no unit test ran:\n{stdout}");
    eprintln!("js unit tests: {} in {:.1} s", summary.join(", "), started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_script_delivers_on_every_transport() {
    let Some(mut b) = Browser::start().await else { return };
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &[]);

    // The node serves both builds, as they are in clients/js/dist.
    for (path, file) in [("/client.js", "fanout.js"), ("/client.mjs", "fanout.mjs")] {
        let r = reqwest::get(gw.url(path)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/javascript; charset=utf-8");
        assert!(r.headers()["cache-control"].to_str().unwrap().contains("max-age"), "{path} is cacheable");
        let dist = std::fs::read_to_string(js_dir().join("dist").join(file)).unwrap();
        assert!(r.text().await.unwrap() == dist, "{path} is dist/{file}");
    }
    assert_eq!(reqwest::get(gw.url("/favicon.ico")).await.unwrap().status(), 204);

    let hist = channel("hist");
    let live = channel("live");
    let mut expected: Vec<Value> = Vec::new();
    for i in 1..=3 {
        let id = publish(&gw, &hist, &format!("h{i}")).await;
        expected.push(json!({"channel": hist, "id": id, "event": null, "data": format!("h{i}")}));
    }

    let origin = gw.url("");
    let names = b.cmd(json!({"op": "page", "name": "p", "origin": origin})).await;
    assert_eq!(names["global"], names["module"], "the plain script and the module define the same names");
    for name in ["subscribe", "publish"] {
        assert!(names["global"].as_array().unwrap().contains(&json!(name)), "fanout.{name}");
    }
    for t in TRANSPORTS {
        // From position 0: the three history messages first, on every transport.
        b.subscribe(
            "p",
            t,
            std::slice::from_ref(&origin),
            &[&hist, &live],
            json!({"transport": t, "since": "0"}),
        )
        .await;
    }
    b.wait_for("every transport open", WAIT, |e| TRANSPORTS.iter().all(|t| is_open(e, t))).await;
    for t in TRANSPORTS {
        assert_eq!(b.states(t)[0].1["transport"], t, "{t}: no other transport tried");
    }

    // A named event, a raw message (no id) and a payload with line breaks.
    let r: Value = reqwest::Client::new()
        .post(gw.url(&format!("/publish/{live}?event=note")))
        .body("named")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    expected.push(json!({"channel": live, "id": r["id"], "event": "note", "data": "named"}));
    redis.cli(&["PUBLISH", &live, "raw, no id"]);
    expected.push(json!({"channel": live, "id": null, "event": null, "data": "raw, no id"}));
    // From the page itself, with fanout.publish.
    let page_id = b
        .cmd(json!({"op": "eval", "page": "p",
            "expr": format!("fanout.publish(location.origin, {live:?}, 'line 1\\nline 2\\r\\nline 3').then(r => r.id)")}))
        .await;
    expected.push(json!({"channel": live, "id": page_id, "event": null, "data": "line 1\nline 2\r\nline 3"}));

    let n = expected.len();
    b.wait_for("every message on every transport", WAIT, |e| {
        TRANSPORTS.iter().all(|t| messages(e, t).len() >= n)
    })
    .await;
    for t in TRANSPORTS {
        let got: Vec<Value> = messages(&b.events, t)
            .into_iter()
            .map(|m| json!({"channel": m["channel"], "id": m["id"], "event": m["event"], "data": m["data"]}))
            .collect();
        assert_eq!(got, expected, "{t}");
    }

    // Errors carry the server's code.
    let code = b
        .cmd(json!({"op": "eval", "page": "p", "expr": "fanout.publish(location.origin, 'bad channel', 'x').catch(e => e.code + ' ' + e.status)"}))
        .await;
    assert_eq!(code, "invalid_channel 400");
    b.quit("every transport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_sse_when_websockets_are_refused() {
    let Some(mut b) = Browser::start().await else { return };
    // This node refuses WebSocket upgrades from the page's origin (403), as a proxy
    // that does not pass WebSockets would fail them; plain HTTP still works.
    let gw = Gateway::start(None, &["--allowed-origins", "https://elsewhere.invalid"]);
    let ch = channel("fallback");
    let origin = gw.url("");
    b.cmd(json!({"op": "page", "name": "p", "origin": origin})).await;
    b.subscribe("p", "s1", std::slice::from_ref(&origin), &[&ch], json!({})).await;
    b.wait_for("open", WAIT, |e| is_open(e, "s1")).await;
    let states = b.states("s1");
    let tried: Vec<&Value> =
        states.iter().filter(|(s, _)| s == "connecting").map(|(_, i)| &i["transport"]).collect();
    assert_eq!(tried, ["ws", "sse"], "WebSocket first, then SSE at once");
    assert_eq!(states.last().unwrap().1["transport"], "sse");
    let id = publish(&gw, &ch, "over sse").await;
    b.wait_for("the message", WAIT, |e| !messages(e, "s1").is_empty()).await;
    assert_eq!(messages(&b.events, "s1")[0]["id"], id.as_str());

    // Remembered for the session: the next subscription goes straight to SSE.
    let remembered =
        b.cmd(json!({"op": "eval", "page": "p", "expr": "sessionStorage.getItem('fanout.transport')"})).await;
    assert_eq!(remembered, "sse");
    b.subscribe("p", "s2", std::slice::from_ref(&origin), &[&ch], json!({})).await;
    b.wait_for("open", WAIT, |e| is_open(e, "s2")).await;
    let tried: Vec<Value> = b
        .states("s2")
        .into_iter()
        .filter(|(s, _)| s == "connecting")
        .map(|(_, i)| i["transport"].clone())
        .collect();
    assert_eq!(tried, ["sse"]);
    b.quit("fallback").await;
}

/// A page on node A with one subscription per transport, given both nodes; a numbered
/// stream 1..N published through node B; `signal` sent to A mid-stream. Every
/// subscription must end with 1..N, each once, in order, resumed on B.
async fn failover(signal: &str) {
    let Some(mut b) = Browser::start().await else { return };
    let redis = Redis::start();
    let args = ["--drain-window-secs", "1"];
    let mut a = Gateway::start(Some(&redis.url()), &args);
    let node_b = Gateway::start(Some(&redis.url()), &args);
    let ch = channel("failover");
    let urls = [a.url(""), node_b.url("")];
    b.cmd(json!({"op": "page", "name": "p", "origin": urls[0]})).await;
    for t in TRANSPORTS {
        let opts = json!({"transport": t, "minDelay": 200, "maxDelay": 2000, "pollTimeout": 5});
        b.subscribe("p", t, &urls, &[&ch], opts).await;
    }
    b.wait_for("every transport open on A", WAIT, |e| TRANSPORTS.iter().all(|t| is_open(e, t))).await;

    const N: usize = 120;
    let url = node_b.url(&format!("/publish/{ch}"));
    let publisher = tokio::spawn(async move {
        let client = reqwest::Client::new();
        for i in 1..=N {
            let r = client.post(&url).body(i.to_string()).send().await.unwrap();
            assert_eq!(r.status(), 200);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    b.wait_for("a third of the stream on every transport", WAIT, |e| {
        TRANSPORTS.iter().all(|t| messages(e, t).len() >= N / 3)
    })
    .await;
    let at_signal = b.events.len();
    a.signal(signal);
    b.wait_for("the whole stream on every transport", Duration::from_secs(40), |e| {
        TRANSPORTS.iter().all(|t| messages(e, t).len() >= N)
    })
    .await;
    publisher.await.unwrap();
    // Nothing more comes (no late duplicates).
    tokio::time::sleep(Duration::from_millis(500)).await;
    while b.next(Instant::now() + Duration::from_millis(100)).await.is_some() {}

    let want: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    for t in TRANSPORTS {
        assert_eq!(b.data(t), want, "{t}: every message exactly once, in order");
        let after: Vec<&Value> = of(&b.events[at_signal..], t, "state");
        assert!(
            after.iter().any(|s| s["state"] == "open" && s["info"]["url"] == urls[1].trim_end_matches('/')),
            "{t} resumed on node B: {after:?}"
        );
    }
    if signal == "TERM" {
        // Told to go elsewhere: WebSocket close 1012, SSE `shutting_down`; no backoff.
        for t in ["ws", "sse"] {
            let moved = of(&b.events[at_signal..], t, "state")
                .into_iter()
                .find(|s| s["state"] == "reconnecting")
                .unwrap_or_else(|| panic!("{t} reconnected"));
            assert!(moved["info"]["delay"].as_u64().unwrap() < 250, "{t}: {moved}");
            let code = moved["info"]["error"]["code"].as_str().unwrap();
            assert!(code == "closed_1012" || code == "shutting_down", "{t}: {moved}");
        }
        let status = a.wait_exit(Duration::from_secs(15)).expect("the drained node exits");
        assert!(status.success(), "{status:?}");
    }
    b.quit(&format!("failover ({signal})")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_survives_its_node_being_killed_mid_stream() {
    failover("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_survives_its_node_draining_mid_stream() {
    failover("TERM").await;
}

const SECRET: &str = "browser-test-secret-of-enough-length-0123";

fn token(channel: &str, valid_secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"exp": now + valid_secs, "channels": [channel]});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refreshed_and_the_stream_goes_on() {
    let Some(mut b) = Browser::start().await else { return };
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--jwt-hs256-secret", SECRET]);
    let ch = channel("token");
    let fresh = token(&ch, 600);
    let origin = gw.url("");
    b.cmd(json!({"op": "page", "name": "p", "origin": origin})).await;
    // Valid for 8 to 9 s: longer than the client's 5 s refresh margin, so WebSocket and
    // SSE connect with it and the server ends them when it expires.
    let short = token(&ch, 9);
    for t in TRANSPORTS {
        let opts = json!({"transport": t, "token": short});
        b.cmd(json!({"op": "subscribe", "page": "p", "sub": t, "urls": [origin], "channels": [ch],
            "opts": opts, "tokens": [fresh]}))
            .await;
    }
    b.wait_for("every transport open", WAIT, |e| TRANSPORTS.iter().all(|t| is_open(e, t))).await;
    const N: usize = 48; // 12 s
    for i in 1..=N {
        publish(&gw, &ch, &i.to_string()).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    b.wait_for("the whole stream", WAIT, |e| TRANSPORTS.iter().all(|t| messages(e, t).len() >= N)).await;
    let want: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    for t in TRANSPORTS {
        assert_eq!(b.data(t), want, "{t}");
        assert!(!of(&b.events, t, "token").is_empty(), "{t}: getToken was called");
        assert!(of(&b.events, t, "error").is_empty(), "{t}: no permanent error");
    }
    // The server ended the WebSocket (4001) and the SSE stream (token_expired) itself.
    for t in ["ws", "sse"] {
        let ended = gw
            .metric(&format!("gateway_disconnects_total{{transport=\"{t}\",reason=\"token_expired\"}}"))
            .await;
        assert!(ended >= 1.0, "{t}: {ended}; page reports:\n{}", b.dump());
    }
    b.quit("token refresh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_streams_an_answer_and_the_late_view_matches() {
    let Some(mut b) = Browser::start().await else { return };
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--demo-streams"]);
    let url = gw.url("/");
    assert_eq!(
        b.cmd(json!({"op": "goto", "name": "d", "url": url, "width": 1100, "height": 900})).await,
        200
    );
    let wait = |expr: &str| json!({"op": "wait", "page": "d", "expr": expr, "timeout": 15000});
    let eval = |expr: &str| json!({"op": "eval", "page": "d", "expr": expr});
    b.cmd(wait("document.body.dataset.broker === 'redis'")).await;

    // A bad channel: the badge says why, and it is not retried.
    b.cmd(json!({"op": "fill", "page": "d", "selector": "#channels", "value": "bad channel!"})).await;
    b.cmd(json!({"op": "click", "page": "d", "selector": "#connBtn"})).await;
    b.cmd(wait("document.querySelector('#badge.error')")).await;
    let badge = b.cmd(eval("document.getElementById('badge').textContent")).await;
    assert!(badge.as_str().unwrap().contains("invalid_channel"), "{badge}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let refused = gw.metric("gateway_rejected_requests_total{reason=\"invalid_channel\"}").await;
    assert_eq!(refused, 1.0, "a permanent error is not retried");

    // A good one: messages with their ids; a raw message shows none.
    let ch = channel("demo");
    b.cmd(json!({"op": "fill", "page": "d", "selector": "#channels", "value": ch})).await;
    b.cmd(json!({"op": "click", "page": "d", "selector": "#connBtn"})).await;
    b.cmd(wait("document.getElementById('badge').textContent.startsWith('open')")).await;
    b.cmd(json!({"op": "fill", "page": "d", "selector": "#payload", "value": "it's here"})).await;
    b.cmd(json!({"op": "click", "page": "d", "selector": "#pubBtn"})).await;
    b.cmd(wait("[...document.querySelectorAll('#log li.msg')].some(li => li.dataset.id && li.textContent.includes(\"it's here\"))"))
        .await;
    redis.cli(&["PUBLISH", &ch, "raw hello"]);
    b.cmd(wait("[...document.querySelectorAll('#log li.msg')].some(li => li.dataset.id === '' && li.textContent.includes('none (live only)'))"))
        .await;
    // Commands are shell-quoted, with curl and (on Redis) redis-cli.
    let cmds = b.cmd(eval("document.getElementById('cmds').textContent")).await;
    let cmds = cmds.as_str().unwrap();
    assert!(
        cmds.contains(&format!("curl -X POST --data-binary 'it'\\''s here' {}publish/{ch}", url)),
        "{cmds}"
    );
    assert!(cmds.contains(&format!("redis-cli FCALL fanout_publish 1 {ch} 'it'\\''s here'")), "{cmds}");
    let pongs = b.cmd(eval("document.getElementById('log').textContent.includes('pong')")).await;
    assert_eq!(pongs, false);

    // The answer stream, and a second view that joins late from position 0.
    b.cmd(json!({"op": "fill", "page": "d", "selector": "#prompt", "value": "What is fan-out?"})).await;
    b.cmd(json!({"op": "click", "page": "d", "selector": "#askBtn"})).await;
    b.cmd(wait("document.querySelector('#ansMain p').textContent.split(' ').length > 15")).await;
    b.cmd(json!({"op": "click", "page": "d", "selector": "#lateBtn"})).await;
    b.cmd(wait("document.querySelector('#ansMain.done') && document.querySelector('#ansLate.done')")).await;
    let texts = b.cmd(eval("[...document.querySelectorAll('.answer p')].map(p => p.textContent)")).await;
    let texts: Vec<&str> = texts.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(texts.len(), 2);
    assert!(texts[0].starts_with("You asked: \u{201c}What is fan-out?\u{201d}"), "{texts:?}");
    assert_eq!(texts[0], texts[1], "the late view ends identical");

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    let path = shots.join("demo.png");
    b.cmd(json!({"op": "screenshot", "page": "d", "path": path, "fullPage": true})).await;
    assert!(std::fs::metadata(&path).unwrap().len() > 10_000, "a real screenshot");
    // Readable at phone width: nothing wider than the screen.
    b.cmd(json!({"op": "viewport", "page": "d", "width": 390, "height": 844})).await;
    let overflow = b.cmd(eval("document.documentElement.scrollWidth - window.innerWidth")).await;
    assert_eq!(overflow, 0, "no horizontal scrolling at 390 px");
    b.cmd(json!({"op": "screenshot", "page": "d", "path": shots.join("demo-phone.png"), "fullPage": true}))
        .await;
    b.quit("demo page").await;
}
