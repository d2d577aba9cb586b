//! Test harness: real `redis-server` processes and real gateway processes on free
//! loopback ports, real HTTP/SSE/WebSocket clients. Everything is killed on drop, so a
//! failing test cleans up too.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use shared::{
    protocol::{PollResponse, ServerFrame},
    sse::{SseEvent, SseParser},
};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

/// A generous bound for things that should happen "at once" on a loaded machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// A unique channel name for this test run.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}-{}-{:x}", std::process::id(), rand::random::<u32>())
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `redis-server` on a free port, without persistence.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    persistent: bool,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Self { port, child: None, dir, persistent: false };
        r.restart();
        r
    }

    /// A server that writes every command to an append-only file before answering,
    /// so a restart (even after SIGKILL) keeps the data.
    pub fn start_persistent() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Self { port: free_port(), child: None, dir, persistent: true };
        r.restart();
        r
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args(["-s", sig, &pid]).status().unwrap().success());
    }

    /// (Re)starts the server on the same port.
    pub fn restart(&mut self) {
        let persistence: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned())
    }

    /// Runs `redis-cli -p PORT args...` and returns its stdout without the final newline.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// `PUBSUB NUMSUB channel`.
    pub fn numsub(&self, channel: &str) -> u64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn gateway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gateway"))
}

/// A gateway process.
pub struct Gateway {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts a node on free ports; `redis` is a URL or `None` for the memory broker.
    pub fn start(redis: Option<&str>, extra: &[&str]) -> Self {
        Self::start_cmd(Command::new(gateway_bin()), redis, extra)
    }

    /// Starts a node as [`Gateway::start`] does, from a shell that first runs `setup`
    /// (e.g. `ulimit -Sn 256`) and then execs the gateway (same pid).
    pub fn start_after(setup: &str, redis: Option<&str>, extra: &[&str]) -> Self {
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!("{setup} && exec \"$0\" \"$@\"")).arg(gateway_bin());
        Self::start_cmd(cmd, redis, extra)
    }

    fn start_cmd(mut cmd: Command, redis: Option<&str>, extra: &[&str]) -> Self {
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
        if !extra.contains(&"--linger-ms") {
            cmd.args(["--linger-ms", "200"]);
        }
        if let Some(url) = redis {
            cmd.args(["--redis-url", url]);
        }
        cmd.args(extra);
        cmd.env("RUST_LOG", "info,gateway=debug").env_remove("GATEWAY_REDIS_URL");
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("gateway starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway listening") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("gateway did not start; logs:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..].split_whitespace().next().unwrap().parse().unwrap()
        };
        Self { public: field("public"), admin: field("admin"), child, logs }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.public, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/readyz` status code.
    pub async fn ready_status(&self) -> u16 {
        match reqwest::get(self.admin_url("/readyz")).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// The value of one metric line (exact name with labels) from `/metrics`.
    pub async fn metric(&self, name_with_labels: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name_with_labels).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- gateway {} logs ----\n{}", self.public, self.logs());
        }
    }
}

/// An SSE client reading events in the background.
pub struct SseClient {
    pub events: mpsc::UnboundedReceiver<SseEvent>,
    pub headers: reqwest::header::HeaderMap,
    /// Set once the stream has ended; holds the parser's last `retry:` value.
    pub ended: Arc<Mutex<Option<Option<u64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SseClient {
    /// Connects and waits for the stream to open (the `: ok` comment).
    pub async fn connect(url: &str) -> Self {
        Self::connect_with(reqwest::Client::new().get(url)).await
    }

    pub async fn connect_with(req: reqwest::RequestBuilder) -> Self {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "SSE connect failed: {:?}", resp.text().await);
        let headers = resp.headers().clone();
        let (tx, events) = mpsc::unbounded_channel();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let ended = Arc::new(Mutex::new(None));
        let ended2 = ended.clone();
        let task = tokio::spawn(async move {
            let mut parser = SseParser::new();
            let mut stream = resp.bytes_stream();
            let mut opened_tx = Some(opened_tx);
            while let Some(Ok(chunk)) = stream.next().await {
                for ev in parser.feed(&chunk) {
                    let _ = tx.send(ev);
                }
                if parser.comments() > 0
                    && let Some(t) = opened_tx.take()
                {
                    let _ = t.send(());
                }
            }
            *ended2.lock().unwrap() = Some(parser.retry());
        });
        tokio::time::timeout(WAIT, opened).await.expect("SSE stream opened").unwrap();
        Self { events, headers, ended, task }
    }

    pub async fn next(&mut self) -> SseEvent {
        tokio::time::timeout(WAIT, self.events.recv()).await.expect("SSE event in time").expect("stream open")
    }

    /// Asserts that nothing arrives for `d`.
    pub async fn assert_quiet(&mut self, d: Duration) {
        if let Ok(Some(ev)) = tokio::time::timeout(d, self.events.recv()).await {
            panic!("unexpected SSE event {ev:?}");
        }
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket.
pub async fn ws_connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.expect("websocket connects").0
}

/// Sends a JSON text frame.
pub async fn ws_send(ws: &mut Ws, json: serde_json::Value) {
    ws.send(Message::Text(json.to_string().into())).await.unwrap();
}

/// The next server frame (text frames parsed; pings skipped). Panics on close.
pub async fn ws_next(ws: &mut Ws) -> ServerFrame {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("ws frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).expect("server frames are valid JSON");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Subscribes and waits for the `subscribed` answer.
pub async fn ws_subscribe(ws: &mut Ws, channels: &[&str]) {
    ws_send(ws, serde_json::json!({"op": "subscribe", "channels": channels})).await;
    match ws_next(ws).await {
        ServerFrame::Subscribed { channels: got, .. } => assert_eq!(got, channels),
        other => panic!("expected subscribed, got {other:?}"),
    }
}

/// Reads until the close frame; returns its code and reason.
pub async fn ws_close_frame(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("close in time") {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// One long-poll request.
pub async fn poll(gw: &Gateway, query: &str) -> PollResponse {
    let resp = reqwest::get(gw.url(&format!("/poll?{query}"))).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Publishes `data` to `channel` with history through `gw`'s HTTP API (`POST
/// /api/publish`); asserts it is accepted and returns the result (its `id`).
pub async fn publish(gw: &Gateway, channel: &str, data: &str) -> shared::protocol::PublishResult {
    let resp = reqwest::Client::new()
        .post(gw.url("/api/publish"))
        .json(&serde_json::json!({"channel": channel, "data": data}))
        .send()
        .await
        .expect("publish request");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "publish to {channel} refused: {text}");
    let mut r: shared::protocol::PublishResponse = serde_json::from_str(&text).expect("publish answer");
    r.results.remove(0)
}

/// Runs `gateway publish <args>` with `input` on its stdin (the environment's
/// `GATEWAY_REDIS_URL` removed: the args name the target); returns its exit status and
/// what it printed on stderr.
pub fn publish_cli(args: &[&str], input: &[u8]) -> (std::process::ExitStatus, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(gateway_bin())
        .arg("publish")
        .args(args)
        .env_remove("GATEWAY_REDIS_URL")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gateway publish starts");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `message` frame helper.
pub fn message(channel: &str, data: &str) -> ServerFrame {
    ServerFrame::Message { channel: channel.into(), id: None, event: None, data: data.into() }
}

/// The frame with its history id removed, for comparing payloads.
pub fn without_id(frame: ServerFrame) -> ServerFrame {
    match frame {
        ServerFrame::Message { channel, event, data, .. } => {
            ServerFrame::Message { channel, id: None, event, data }
        }
        other => other,
    }
}
