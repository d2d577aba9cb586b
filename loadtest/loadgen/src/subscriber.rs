//! Subscribers: one task per connection, speaking SSE, WebSocket or long-poll over a
//! socket opened by [`crate::net::connect`] (so it can have its own source address).
//!
//! Subscriber `g` (global index across workers) subscribes to channel `g % channels`
//! and keeps a bitset of the seqs it has seen on that channel, which is enough to count
//! missing and duplicate deliveries at the end. A subscriber counts as subscribed when
//! the server confirms it: SSE — the first `: ok` comment; WebSocket — the `subscribed`
//! frame; long-poll — the answer to a first `timeout=0` poll (from then on the server
//! buffers the channel for us between polls).
//!
//! Against Nchan (`--server nchan`) every transport uses Nchan's subscriber location and
//! gets the raw payload: SSE `data:` lines (subscribed at Nchan's `: hi` comment),
//! WebSocket text frames (subscribed once the upgrade is answered: Nchan registers the
//! subscriber before it sends the 101), and long-poll bodies whose message id comes back
//! in `Last-Modified` + `Etag` and goes out again as `If-Modified-Since` +
//! `If-None-Match` (subscribed at the answer carrying [`payload::NCHAN_MARKER`]).

use std::{
    collections::BTreeMap,
    ops::{ControlFlow, Range},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;
use shared::{
    protocol::{PollResponse, ServerFrame},
    sse::SseParser,
};
use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout, timeout_at},
};
use tokio_util::sync::CancellationToken;

use crate::{
    cli::{NCHAN_SUB_PATH, ServerKind, Settings, Transport},
    http::{BodyDecoder, HttpConn, ResponseHead},
    net::{self, io_kind},
    payload::{self, Payload},
    report::{ConnectReport, DeliveryReport, MAX_LATENCY_US, Window, encode_histogram, new_histogram},
    ws::{End, Msg, WsConn},
};

/// Latency histograms are sharded to keep lock contention low.
const HIST_SHARDS: usize = 32;
/// Largest long-poll answer accepted.
const MAX_POLL_BODY: usize = 64 << 20;
/// Most reconnects of one long-poll subscriber after the server closed its connection.
const MAX_POLL_RECONNECTS: u32 = 100;

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The channel index it subscribes to.
    pub channel: u64,
    /// Whether it subscribed successfully.
    pub connected: bool,
    /// Seen seqs of its channel: bit `seq / channels`.
    bits: Vec<u64>,
    max_seq: Option<u64>,
    /// First copies received (any window).
    pub unique: u64,
    /// Extra copies.
    pub duplicates: u64,
    /// Arrivals after a higher seq.
    pub reordered: u64,
    /// Messages for another channel or an unplanned seq.
    pub unexpected: u64,
    /// Messages not in the payload format.
    pub bad_payload: u64,
    /// Why and when (µs since the epoch) the connection was lost, if it was.
    pub disconnect: Option<(String, u64)>,
}

/// Whether a delivery was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First copy.
    New,
    /// A copy of a seq already seen.
    Duplicate,
    /// Not a message this subscriber should get.
    Unexpected,
}

impl Tracker {
    /// A tracker for a subscriber of channel `channel`.
    pub fn new(channel: u64) -> Self {
        Self { channel, ..Default::default() }
    }

    /// Records a delivery; seqs at or above `seq_limit` were never planned.
    pub fn record(&mut self, p: Payload, channels: u64, seq_limit: u64) -> Seen {
        if p.ch != self.channel || p.seq % channels != p.ch || p.seq >= seq_limit {
            self.unexpected += 1;
            return Seen::Unexpected;
        }
        let k = p.seq / channels;
        let (word, bit) = ((k / 64) as usize, k % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        self.bits[word] |= 1 << bit;
        self.unique += 1;
        match self.max_seq {
            Some(m) if p.seq < m => self.reordered += 1,
            _ => self.max_seq = Some(p.seq),
        }
        Seen::New
    }

    fn has(&self, k: u64) -> bool {
        self.bits.get((k / 64) as usize).is_some_and(|w| w & (1 << (k % 64)) != 0)
    }

    /// Deliveries expected in `w` and how many of them are missing: the seqs of this
    /// subscriber's channel in the measured window, published while it was connected.
    pub fn tally(&self, w: &Window, channels: u64) -> (u64, u64) {
        if !self.connected {
            return (0, 0);
        }
        let end = match &self.disconnect {
            Some((_, at)) => w.end_seq.min(w.scheduled_by(*at)),
            None => w.end_seq,
        };
        let (mut expected, mut missing) = (0, 0);
        let mut s = first_on_channel(w.measure_from, self.channel, channels);
        while s < end {
            if w.failed.binary_search(&s).is_err() {
                expected += 1;
                if !self.has(s / channels) {
                    missing += 1;
                }
            }
            s += channels;
        }
        (expected, missing)
    }
}

/// The first seq at or after `from` that goes to channel `c` of `m`.
pub fn first_on_channel(from: u64, c: u64, m: u64) -> u64 {
    let r = from % m;
    if r <= c { from - r + c } else { from - r + m + c }
}

/// State shared by one process's subscribers.
struct Shared {
    s: Settings,
    channels: u64,
    sem: Semaphore,
    stop: CancellationToken,
    hists: Vec<Mutex<Histogram<u64>>>,
    in_window: AtomicU64,
    poll_resets: AtomicU64,
    poll_reconnects: AtomicU64,
}

impl Shared {
    fn deliver(&self, g: u64, tr: &Mutex<Tracker>, data: &str, now: u64) {
        let Some(p) = payload::decode(data) else {
            if data != payload::NCHAN_MARKER {
                lock(tr).bad_payload += 1;
            }
            return;
        };
        let seen = lock(tr).record(p, self.channels, self.s.total_messages);
        if seen == Seen::New && p.seq >= self.s.measure_from {
            self.in_window.fetch_add(1, Relaxed);
            let us = now.saturating_sub(p.t_us).clamp(1, MAX_LATENCY_US);
            lock(&self.hists[g as usize % HIST_SHARDS]).saturating_record(us);
        }
    }
}

/// One process's subscribers.
pub struct Pool {
    shared: Arc<Shared>,
    trackers: Vec<Arc<Mutex<Tracker>>>,
    tasks: JoinSet<()>,
    outcomes: mpsc::UnboundedReceiver<Result<Duration, String>>,
    started: Instant,
    phase_deadline: Instant,
    label: String,
}

impl Pool {
    /// Starts subscribers `range` (global indices); at most `concurrency` connect at once,
    /// and none starts connecting after `phase_deadline`.
    pub fn start(
        s: &Settings,
        range: Range<u64>,
        concurrency: usize,
        phase_deadline: Instant,
        label: String,
    ) -> Self {
        let channels = s.args.channels as u64;
        let shared = Arc::new(Shared {
            s: s.clone(),
            channels,
            sem: Semaphore::new(concurrency.max(1)),
            stop: CancellationToken::new(),
            hists: (0..HIST_SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            in_window: AtomicU64::new(0),
            poll_resets: AtomicU64::new(0),
            poll_reconnects: AtomicU64::new(0),
        });
        let (tx, outcomes) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let mut trackers = Vec::with_capacity((range.end - range.start) as usize);
        for g in range {
            let tr = Arc::new(Mutex::new(Tracker::new(g % channels)));
            trackers.push(tr.clone());
            tasks.spawn(subscriber(shared.clone(), g, tr, tx.clone(), phase_deadline));
        }
        Self { shared, trackers, tasks, outcomes, started: Instant::now(), phase_deadline, label }
    }

    /// Waits until every subscriber has subscribed or failed; prints progress to stderr.
    pub async fn wait_connected(&mut self) -> ConnectReport {
        let total = self.trackers.len() as u64;
        let mut report = ConnectReport { attempted: total, ..Default::default() };
        let mut hist = new_histogram();
        let mut last = Instant::now();
        let mut last_outcome = self.started;
        let give_up = self.phase_deadline + Duration::from_secs(15);
        while report.ok + report.failed < total {
            tokio::select! {
                o = self.outcomes.recv() => {
                    last_outcome = Instant::now();
                    match o {
                        Some(Ok(took)) => {
                            report.ok += 1;
                            hist.saturating_record((took.as_micros() as u64).max(1));
                        }
                        Some(Err(kind)) => {
                            report.failed += 1;
                            *report.errors.entry(kind).or_default() += 1;
                        }
                        None => break,
                    }
                }
                _ = sleep(Duration::from_secs(2)) => {}
                _ = sleep_until(give_up) => break,
            }
            if last.elapsed() >= Duration::from_secs(2) {
                last = Instant::now();
                eprintln!("{}connecting: {} ok, {} failed of {total}", self.label, report.ok, report.failed);
            }
        }
        let unaccounted = total - report.ok - report.failed;
        if unaccounted > 0 {
            report.failed += unaccounted;
            *report.errors.entry("no_outcome".into()).or_default() += unaccounted;
        }
        report.duration_secs = last_outcome.duration_since(self.started).as_secs_f64();
        report.connect_time_hist = encode_histogram(&hist);
        report
    }

    /// Waits (at most `drain`) for the deliveries `window` expects, then reports.
    pub async fn finish(&mut self, window: &Window, drain: Duration) -> DeliveryReport {
        let channels = self.shared.channels;
        let expected: u64 = self.trackers.iter().map(|t| lock(t).tally(window, channels).0).sum();
        let deadline = Instant::now() + drain;
        while self.shared.in_window.load(Relaxed) < expected && Instant::now() < deadline {
            sleep(Duration::from_millis(20)).await;
        }
        self.report(window)
    }

    fn report(&self, window: &Window) -> DeliveryReport {
        let channels = self.shared.channels;
        let mut r = DeliveryReport { loadgen_processes: 1, ..Default::default() };
        let mut disconnects: BTreeMap<String, u64> = BTreeMap::new();
        for t in &self.trackers {
            let t = lock(t);
            let (expected, missing) = t.tally(window, channels);
            r.expected += expected;
            r.missing += missing;
            r.duplicates += t.duplicates;
            r.reordered += t.reordered;
            r.unexpected += t.unexpected;
            r.bad_payload += t.bad_payload;
            r.received_total += t.unique;
            match &t.disconnect {
                Some((reason, _)) => *disconnects.entry(reason.clone()).or_default() += 1,
                None if t.connected => r.connected_at_end += 1,
                None => {}
            }
        }
        r.received = r.expected - r.missing;
        r.disconnects = disconnects;
        let mut hist = new_histogram();
        for h in &self.shared.hists {
            hist.add(&*lock(h)).expect("histograms share bounds");
        }
        r.latency_hist = encode_histogram(&hist);
        r.poll_resets = self.shared.poll_resets.load(Relaxed);
        r.poll_reconnects = self.shared.poll_reconnects.load(Relaxed);
        if let Ok(me) = crate::procfs::sample(None) {
            r.loadgen_cpu_secs = me.cpu_secs;
            r.loadgen_rss_kib = me.rss_kib;
        }
        r
    }

    /// Closes every connection and ends the tasks.
    pub async fn shutdown(mut self) {
        self.shared.stop.cancel();
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if timeout(Duration::from_secs(10), all).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

async fn subscriber(
    sh: Arc<Shared>,
    g: u64,
    tr: Arc<Mutex<Tracker>>,
    tx: mpsc::UnboundedSender<Result<Duration, String>>,
    phase_deadline: Instant,
) {
    let attempt = async {
        let _permit = sh.sem.acquire().await.map_err(|_| "closed".to_owned())?;
        let begin = Instant::now();
        let connect_timeout = Duration::from_secs_f64(sh.s.args.connect_timeout);
        match timeout(connect_timeout, connect(&sh, g, &tr)).await {
            Ok(Ok(session)) => Ok((session, begin.elapsed())),
            Ok(Err(kind)) => Err(kind),
            Err(_) => Err("connect_timeout".to_owned()),
        }
    };
    let result = tokio::select! {
        _ = sh.stop.cancelled() => return,
        r = timeout_at(phase_deadline, attempt) => r.unwrap_or_else(|_| Err("connect_phase_deadline".into())),
    };
    let mut session = match result {
        Ok((session, took)) => {
            lock(&tr).connected = true;
            let _ = tx.send(Ok(took));
            session
        }
        Err(kind) => {
            let _ = tx.send(Err(kind));
            return;
        }
    };
    drop(tx);
    let reason = tokio::select! {
        _ = sh.stop.cancelled() => return,
        r = session.run(&sh, g, &tr) => r,
    };
    if !sh.stop.is_cancelled() {
        lock(&tr).disconnect = Some((reason, now_us()));
    }
}

/// A subscribed connection.
enum Session {
    Sse(SseSession),
    Ws(WsConn),
    Poll(PollSession),
}

async fn connect(sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> Result<Session, String> {
    let source = net::source_for(&sh.s.source_ips, g as usize);
    let stream = net::connect(sh.s.target(g).dest, source).await.map_err(|e| io_kind(&e))?;
    let ch = sh.s.channel_name(g % sh.channels);
    match sh.s.args.transport {
        Transport::Sse => SseSession::connect(sh, g, tr, stream, &ch).await.map(Session::Sse),
        Transport::Ws => connect_ws(sh, g, tr, stream, &ch).await.map(Session::Ws),
        Transport::Poll => PollSession::connect(sh, g, tr, stream, ch, source).await.map(Session::Poll),
    }
}

impl Session {
    /// Receives until the connection ends; returns why.
    async fn run(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> String {
        match self {
            Session::Sse(s) => loop {
                match s.step(sh, g, tr).await {
                    Ok(true) => {}
                    Ok(false) => return "eof".into(),
                    Err(kind) => return kind,
                }
            },
            Session::Ws(ws) => run_ws(sh, g, tr, ws).await,
            Session::Poll(p) => p.run(sh, g, tr).await,
        }
    }
}

struct SseSession {
    conn: HttpConn,
    body: BodyDecoder,
    parser: SseParser,
    out: Vec<u8>,
}

impl SseSession {
    async fn connect(
        sh: &Shared,
        g: u64,
        tr: &Mutex<Tracker>,
        stream: TcpStream,
        ch: &str,
    ) -> Result<Self, String> {
        let mut conn = HttpConn::new(stream);
        let path = match sh.s.args.server {
            ServerKind::Gateway => format!("{}/sse?channel={ch}", sh.s.target(g).base_path),
            ServerKind::Nchan => format!("{}{NCHAN_SUB_PATH}?channel={ch}", sh.s.target(g).base_path),
        };
        conn.send_get(&sh.s.target(g).host_header, &path, "text/event-stream")
            .await
            .map_err(|e| io_kind(&e))?;
        let head = conn.read_head().await.map_err(|e| e.kind())?;
        if head.status != 200 {
            return Err(format!("http_{}", head.status));
        }
        let mut s =
            Self { conn, body: BodyDecoder::for_head(&head), parser: SseParser::new(), out: Vec::new() };
        while s.parser.comments() == 0 {
            if !s.step(sh, g, tr).await? {
                return Err("eof_before_subscribed".into());
            }
        }
        Ok(s)
    }

    /// Reads once and handles the events completed; `Ok(false)` at the end of the stream.
    async fn step(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> Result<bool, String> {
        if !self.conn.read_body_some(&mut self.body, &mut self.out).await.map_err(|e| e.kind())? {
            return Ok(false);
        }
        let events = self.parser.feed(&self.out);
        if events.is_empty() {
            return Ok(true);
        }
        let now = now_us();
        for ev in events {
            match ev.event.as_deref() {
                None | Some("message") => sh.deliver(g, tr, &ev.data, now),
                Some("disconnect") => {
                    let reason = serde_json::from_str::<serde_json::Value>(&ev.data)
                        .ok()
                        .and_then(|v| v.get("reason")?.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "unknown".into());
                    return Err(format!("sse_disconnect_{reason}"));
                }
                Some(_) => {}
            }
        }
        Ok(true)
    }
}

/// What a server text frame meant to us.
enum WsEvent {
    Subscribed,
    Error(String),
    Other,
}

/// Handles a gateway text frame; `now` is the receive time of the read it came in,
/// taken at the first delivery.
fn ws_text(sh: &Shared, g: u64, tr: &Mutex<Tracker>, text: &str, now: &mut Option<u64>) -> WsEvent {
    // Message frames, the bulk of the traffic, without a JSON parser.
    if crate::ws::with_message_data(text, |data| sh.deliver(g, tr, data, *now.get_or_insert_with(now_us))) {
        return WsEvent::Other;
    }
    match serde_json::from_str::<ServerFrame>(text) {
        Ok(ServerFrame::Message { data, .. }) => {
            sh.deliver(g, tr, &data, *now.get_or_insert_with(now_us));
            WsEvent::Other
        }
        Ok(ServerFrame::Subscribed { .. }) => WsEvent::Subscribed,
        Ok(ServerFrame::Error { code, .. }) => WsEvent::Error(code),
        Ok(_) => WsEvent::Other,
        Err(_) => {
            lock(tr).bad_payload += 1;
            WsEvent::Other
        }
    }
}

async fn connect_ws(
    sh: &Shared,
    g: u64,
    tr: &Mutex<Tracker>,
    stream: TcpStream,
    ch: &str,
) -> Result<WsConn, String> {
    let nchan = sh.s.args.server == ServerKind::Nchan;
    let target = sh.s.target(g);
    let path = format!("{}{}?channel={ch}", target.base_path, if nchan { NCHAN_SUB_PATH } else { "/ws" });
    let mut ws = WsConn::connect(stream, &target.host_header, &path).await?;
    if nchan {
        // Nchan enqueues the subscriber before it answers the upgrade and sends no frame.
        return Ok(ws);
    }
    loop {
        let mut now = None;
        let read = ws.read(|m| match m {
            Msg::Text(t) => match ws_text(sh, g, tr, t, &mut now) {
                WsEvent::Subscribed => ControlFlow::Break(Ok(())),
                WsEvent::Error(code) => ControlFlow::Break(Err(format!("ws_error_{code}"))),
                WsEvent::Other => ControlFlow::Continue(()),
            },
            Msg::Binary(_) => ControlFlow::Continue(()),
        });
        match read.await {
            Ok(None) => {}
            // Frames after the `subscribed` one stay in the reader for `run_ws`.
            Ok(Some(subscribed)) => return subscribed.map(|()| ws),
            Err(End::Eof) => return Err("eof_before_subscribed".into()),
            Err(e) => return Err(e.kind()),
        }
    }
}

async fn run_ws(sh: &Shared, g: u64, tr: &Mutex<Tracker>, ws: &mut WsConn) -> String {
    let nchan = sh.s.args.server == ServerKind::Nchan;
    let mut error = None;
    loop {
        // One receive time per read, as for SSE.
        let mut now = None;
        let read = ws.read(|m| {
            match m {
                // Nchan sends each message verbatim as one frame.
                Msg::Text(t) if nchan => sh.deliver(g, tr, t, *now.get_or_insert_with(now_us)),
                Msg::Binary(b) if nchan => {
                    sh.deliver(g, tr, &String::from_utf8_lossy(b), *now.get_or_insert_with(now_us))
                }
                Msg::Text(t) => {
                    if let WsEvent::Error(code) = ws_text(sh, g, tr, t, &mut now) {
                        error = Some(format!("ws_error_{code}"));
                    }
                }
                Msg::Binary(_) => {}
            }
            ControlFlow::<()>::Continue(())
        });
        match read.await {
            Ok(_) => {}
            Err(End::Close(code)) => {
                let close = format!("ws_close_{code}");
                return error.map_or(close.clone(), |e| format!("{e}_{close}"));
            }
            Err(e) => return error.unwrap_or_else(|| e.kind()),
        }
    }
}

struct PollSession {
    conn: HttpConn,
    channel: String,
    /// The gateway's cursor.
    cursor: String,
    /// Nchan's message id of the last answer: its `Last-Modified` and `Etag`.
    nchan_id: Option<(Option<String>, Option<String>)>,
    source: Option<std::net::Ipv4Addr>,
    reconnect: bool,
    reconnects: u32,
}

impl PollSession {
    async fn connect(
        sh: &Shared,
        g: u64,
        tr: &Mutex<Tracker>,
        stream: TcpStream,
        channel: String,
        source: Option<std::net::Ipv4Addr>,
    ) -> Result<Self, String> {
        let mut s = Self {
            conn: HttpConn::new(stream),
            channel,
            cursor: String::new(),
            nchan_id: None,
            source,
            reconnect: false,
            reconnects: 0,
        };
        s.poll(sh, g, tr, 0).await?;
        Ok(s)
    }

    /// One poll: asks for messages after the cursor, holding up to `hold` seconds.
    async fn poll(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>, hold: u64) -> Result<(), String> {
        if sh.s.args.server == ServerKind::Nchan {
            return self.poll_nchan(sh, g, tr).await;
        }
        let mut path = format!("{}/poll?channel={}&timeout={hold}", sh.s.target(g).base_path, self.channel);
        if !self.cursor.is_empty() {
            path.push_str("&cursor=");
            percent_encode(&self.cursor, &mut path);
        }
        let (head, body) = Self::exchange(
            &mut self.conn,
            &mut self.reconnect,
            &sh.s.target(g).host_header,
            &path,
            "application/json",
            &[],
        )
        .await?;
        if head.status != 200 {
            return Err(format!("http_{}", head.status));
        }
        let resp: PollResponse = serde_json::from_slice(&body).map_err(|_| "poll_bad_body".to_owned())?;
        if resp.reset && !self.cursor.is_empty() {
            sh.poll_resets.fetch_add(1, Relaxed);
        }
        let now = now_us();
        for m in &resp.messages {
            sh.deliver(g, tr, &m.data, now);
        }
        self.cursor = resp.cursor;
        Ok(())
    }

    /// Sends one poll and reads its whole answer; notes when the server closes after it.
    /// (Fields, not `&mut self`: the Nchan poll's extra headers borrow `self`.)
    async fn exchange(
        conn: &mut HttpConn,
        reconnect: &mut bool,
        host: &str,
        path: &str,
        accept: &str,
        extra: &[(&str, &str)],
    ) -> Result<(ResponseHead, Vec<u8>), String> {
        conn.send_get_with(host, path, accept, extra).await.map_err(|e| io_kind(&e))?;
        let head = conn.read_head().await.map_err(|e| e.kind())?;
        let body = conn.read_body(&head, MAX_POLL_BODY).await.map_err(|e| e.kind())?;
        if head.close {
            *reconnect = true;
        }
        Ok((head, body))
    }

    /// One Nchan long-poll: the next message after the last one's id (Nchan answers one
    /// message per poll and holds the request until there is one).
    async fn poll_nchan(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> Result<(), String> {
        let path = format!("{}{NCHAN_SUB_PATH}?channel={}", sh.s.target(g).base_path, self.channel);
        let mut extra = Vec::with_capacity(2);
        if let Some((last_modified, etag)) = &self.nchan_id {
            if let Some(v) = last_modified {
                extra.push(("If-Modified-Since", v.as_str()));
            }
            if let Some(v) = etag {
                extra.push(("If-None-Match", v.as_str()));
            }
        }
        let (head, body) = Self::exchange(
            &mut self.conn,
            &mut self.reconnect,
            &sh.s.target(g).host_header,
            &path,
            "*/*",
            &extra,
        )
        .await?;
        match head.status {
            200 => {}
            // No message within a subscriber timeout configured on the server: ask again.
            304 | 408 => return Ok(()),
            status => return Err(format!("http_{status}")),
        }
        sh.deliver(g, tr, &String::from_utf8_lossy(&body), now_us());
        self.nchan_id = Some((head.last_modified, head.etag));
        Ok(())
    }

    async fn run(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> String {
        let hold = sh.s.args.poll_timeout;
        let nchan = sh.s.args.server == ServerKind::Nchan;
        // Nchan has no per-request hold: the client gives up after `hold` and polls again.
        let limit = Duration::from_secs(if nchan { hold } else { hold + 15 });
        loop {
            if self.reconnect {
                if self.reconnects >= MAX_POLL_RECONNECTS {
                    return "poll_too_many_reconnects".into();
                }
                self.reconnects += 1;
                sh.poll_reconnects.fetch_add(1, Relaxed);
                match net::connect(sh.s.target(g).dest, self.source).await {
                    Ok(stream) => self.conn = HttpConn::new(stream),
                    Err(e) => return format!("poll_reconnect_{}", io_kind(&e)),
                }
                self.reconnect = false;
            }
            match timeout(limit, self.poll(sh, g, tr, hold)).await {
                Ok(Ok(())) => {}
                // A kept-alive connection the server closed: poll again (same cursor) on a new one.
                Ok(Err(kind)) if kind == "eof" || kind == "reset" || kind == "broken_pipe" => {
                    self.reconnect = true
                }
                Ok(Err(kind)) => return kind,
                Err(_) if nchan => self.reconnect = true,
                Err(_) => return "poll_no_answer".into(),
            }
        }
    }
}

/// Appends `s` percent-encoded for a query value (unreserved characters kept).
fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64, channels: u64) -> Payload {
        Payload { seq, ch: seq % channels, t_us: 0 }
    }

    #[test]
    fn tracker_counts_missing_duplicates_and_order() {
        let m = 4;
        let mut t = Tracker::new(1);
        t.connected = true;
        // Channel 1 of 4 gets seqs 1, 5, 9, 13, 17, ...
        for seq in [1, 5, 13, 9, 13] {
            t.record(p(seq, m), m, 100);
        }
        assert_eq!((t.unique, t.duplicates, t.reordered), (4, 1, 1));
        assert_eq!(t.record(p(2, m), m, 100), Seen::Unexpected);
        assert_eq!(t.record(p(101, m), m, 100), Seen::Unexpected);
        // Window: seqs 4..20 sent → channel 1 expects 5, 9, 13, 17; 17 is missing.
        let w = Window { measure_from: 4, end_seq: 20, t0_us: 0, rate: 1e6, failed: vec![] };
        assert_eq!(t.tally(&w, m), (4, 1));
        // A failed publish is not expected.
        let w2 = Window { failed: vec![17], ..w.clone() };
        assert_eq!(t.tally(&w2, m), (3, 0));
        // Dropped at t=10µs (seqs 0..=10 scheduled at 1 µs each): expects 5, 9 only.
        t.disconnect = Some(("eof".into(), 10));
        assert_eq!(t.tally(&w, m), (2, 0));
        // Never connected: nothing expected.
        assert_eq!(Tracker::new(1).tally(&w, m), (0, 0));
    }

    #[test]
    fn first_seq_of_a_channel() {
        assert_eq!(first_on_channel(0, 3, 10), 3);
        assert_eq!(first_on_channel(13, 3, 10), 13);
        assert_eq!(first_on_channel(14, 3, 10), 23);
        assert_eq!(first_on_channel(7, 0, 1), 7);
    }

    #[test]
    fn cursor_encoding() {
        let mut s = String::new();
        percent_encode("eyJl-_Ij/+=", &mut s);
        assert_eq!(s, "eyJl-_Ij%2F%2B%3D");
    }

    /// An unmasked server frame.
    fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
        if payload.len() < 126 {
            v.push(payload.len() as u8);
        } else {
            v.push(126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    /// Settings for one WebSocket subscriber of `url` (one channel, 10 msg/s for 1 s).
    fn ws_settings(url: &str, server: &str) -> Settings {
        use clap::Parser;

        use crate::cli::{Cli, Command};

        let args = ["loadgen", "run", "--transport", "ws", "--server", server, "--url", url];
        let more =
            ["--subscribers", "1", "--channels", "1", "--rate", "10", "--duration", "1", "--warmup", "0"];
        // Both servers take publishes over HTTP (Nchan only that way); nothing is published.
        let publish = ["--publish", "http"];
        let all = args.iter().chain(&more).chain(&publish);
        let Cli { command: Command::Run(a) } = Cli::try_parse_from(all).unwrap() else {
            unreachable!("a run")
        };
        Settings::from_args(*a).unwrap()
    }

    /// Accepts one connection, reads the upgrade request and answers `101` followed by
    /// `first` in the same write.
    async fn accept_ws(listener: tokio::net::TcpListener, first: &[u8]) -> (String, TcpStream) {
        crate::ws::testing::accept(listener, crate::ws::testing::switching, first.to_vec()).await
    }

    /// Starts one subscriber against a fake server task; returns the pool once it is
    /// connected, with the request the server read and its socket.
    async fn one_subscriber(
        s: &Settings,
        server: tokio::task::JoinHandle<(String, TcpStream)>,
    ) -> (Pool, String, TcpStream) {
        let mut pool = Pool::start(s, 0..1, 1, Instant::now() + Duration::from_secs(10), String::new());
        let connected = pool.wait_connected().await;
        assert_eq!((connected.ok, connected.failed), (1, 0), "{:?}", connected.errors);
        let (req, sock) = timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
        (pool, req, sock)
    }

    /// Asserts that the only subscriber of `pool` got two payloads, nothing else, and
    /// then lost its connection for `why`.
    async fn two_delivered_then(pool: Pool, why: &str) {
        wait_disconnect(&pool).await;
        {
            let t = lock(&pool.trackers[0]);
            assert_eq!((t.unique, t.duplicates, t.bad_payload, t.unexpected), (2, 0, 0, 0));
            assert_eq!(t.disconnect.as_ref().map(|d| d.0.as_str()), Some(why));
        }
        pool.shutdown().await;
    }

    /// Waits until the only subscriber of `pool` has lost its connection.
    async fn wait_disconnect(pool: &Pool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&pool.trackers[0]).disconnect.is_none() && Instant::now() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// A fake gateway WebSocket endpoint: `subscribed` and a message in the same write
    /// as the upgrade answer, a ping (answered), a message split over two writes, then a
    /// close with 1001.
    #[tokio::test]
    async fn ws_subscriber_against_a_fake_gateway() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = ws_settings(&format!("http://{}", listener.local_addr().unwrap()), "gateway");
        let channel = format!("{}-0", s.prefix);
        let message = |seq: u64| {
            let mut data = String::new();
            payload::encode(Payload { seq, ch: 0, t_us: now_us() }, 100, &mut data);
            let frame = ServerFrame::Message { channel: channel.clone(), id: None, event: None, data };
            serde_json::to_vec(&frame).unwrap()
        };
        let subscribed = serde_json::to_vec(&ServerFrame::Subscribed {
            channels: vec![channel.clone()],
            recovered: false,
        })
        .unwrap();
        let mut first = ws_frame(0x1, &subscribed);
        first.extend(ws_frame(0x1, &message(0)));
        first.extend(ws_frame(0x9, b"hb"));
        let second = ws_frame(0x1, &message(1));
        let server = tokio::spawn(async move {
            let (req, mut sock) = accept_ws(listener, &first).await;
            // The pong: masked, same payload.
            let mut pong = [0u8; 8];
            sock.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong[..2], [0x8a, 0x82]);
            assert_eq!([pong[6] ^ pong[2], pong[7] ^ pong[3]], *b"hb");
            sock.write_all(&second[..7]).await.unwrap();
            sleep(Duration::from_millis(50)).await;
            sock.write_all(&second[7..]).await.unwrap();
            sock.write_all(&ws_frame(0x8, &1001u16.to_be_bytes())).await.unwrap();
            (req, sock)
        });
        let (pool, req, _sock) = one_subscriber(&s, server).await;
        assert!(req.starts_with(&format!("GET /ws?channel={channel} HTTP/1.1\r\n")), "{req}");
        two_delivered_then(pool, "ws_close_1001").await;
    }

    /// Against Nchan: subscribed at the upgrade; payloads arrive verbatim as text or
    /// binary frames; a connection dropped without a close frame ends with `eof`.
    #[tokio::test]
    async fn ws_subscriber_against_a_fake_nchan() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = ws_settings(&format!("http://{}", listener.local_addr().unwrap()), "nchan");
        let mut frames = Vec::new();
        for (seq, opcode) in [(0, 0x1), (1, 0x2)] {
            let mut data = String::new();
            payload::encode(Payload { seq, ch: 0, t_us: now_us() }, 100, &mut data);
            frames.extend(ws_frame(opcode, data.as_bytes()));
        }
        let server = tokio::spawn(async move {
            let (req, sock) = accept_ws(listener, &[]).await;
            sleep(Duration::from_millis(50)).await;
            (req, sock)
        });
        let (pool, req, mut sock) = one_subscriber(&s, server).await;
        assert!(req.starts_with(&format!("GET /sub?channel={}-0 HTTP/1.1\r\n", s.prefix)), "{req}");
        tokio::io::AsyncWriteExt::write_all(&mut sock, &frames).await.unwrap();
        sleep(Duration::from_millis(50)).await;
        drop(sock);
        two_delivered_then(pool, "eof").await;
    }

    /// A fake Nchan long-poll endpoint: answers the marker, then one payload, then a
    /// 408, and checks that every poll sends back the last answer's message id.
    #[tokio::test]
    async fn nchan_long_poll_sends_the_message_id_back() {
        use clap::Parser;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use crate::cli::{Cli, Command};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let args = ["loadgen", "run", "--server", "nchan", "--transport", "poll", "--url", &url];
        let more = ["--subscribers", "1", "--channels", "1", "--rate", "1", "--duration", "1"];
        let Cli { command: Command::Run(a) } =
            Cli::try_parse_from(args.iter().chain(&more).chain(&["--warmup", "0", "--publish", "http"]))
                .unwrap()
        else {
            unreachable!("a run")
        };
        let s = Settings::from_args(*a).unwrap();
        let mut text = String::new();
        payload::encode(Payload { seq: 0, ch: 0, t_us: now_us() }, 100, &mut text);
        let answers = [
            ("200 OK", "Sun, 22 Nov 2026 10:00:00 GMT", "0", payload::NCHAN_MARKER.to_owned()),
            ("200 OK", "Sun, 22 Nov 2026 10:00:01 GMT", "0", text),
            ("408 Request Timeout", "", "", String::new()),
        ];
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            let mut buf = Vec::new();
            // Three answered polls, then the fourth request (held: never answered).
            for i in 0..4 {
                let end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    let mut chunk = [0u8; 1024];
                    let n = sock.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed");
                    buf.extend_from_slice(&chunk[..n]);
                };
                heads.push(String::from_utf8(buf.drain(..end).collect()).unwrap());
                if let Some((status, lm, etag, body)) = answers.get(i) {
                    let mut resp = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
                    if !lm.is_empty() {
                        resp.push_str(&format!("Last-Modified: {lm}\r\nEtag: {etag}\r\n"));
                    }
                    resp.push_str("\r\n");
                    resp.push_str(body);
                    sock.write_all(resp.as_bytes()).await.unwrap();
                }
            }
            // Keep the connection open: the held poll stays held.
            (heads, sock)
        });
        let mut pool = Pool::start(&s, 0..1, 1, Instant::now() + Duration::from_secs(10), String::new());
        let connected = pool.wait_connected().await;
        assert_eq!((connected.ok, connected.failed), (1, 0));
        let (heads, _sock) = timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
        assert!(
            heads[0].starts_with(&format!("GET /sub?channel={}-0 HTTP/1.1\r\n", s.prefix)),
            "{}",
            heads[0]
        );
        assert!(!heads[0].contains("If-"), "a first poll has no message id: {}", heads[0]);
        for (i, lm) in [(1, "10:00:00"), (2, "10:00:01"), (3, "10:00:01")] {
            let want = format!("If-Modified-Since: Sun, 22 Nov 2026 {lm} GMT\r\nIf-None-Match: 0\r\n");
            assert!(heads[i].contains(&want), "poll {i}: {}", heads[i]);
        }
        {
            let t = lock(&pool.trackers[0]);
            assert_eq!((t.unique, t.bad_payload, t.unexpected), (1, 0, 0), "the marker is not a delivery");
            assert!(t.disconnect.is_none());
        }
        pool.shutdown().await;
    }
}
