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
//!
//! [`payload::NCHAN_MARKER`]: crate::payload::NCHAN_MARKER

mod poll;
mod session;
mod sse;
mod state;
mod tracker;
mod ws;

use std::{
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

pub use self::state::now_us;
use self::{
    session::subscriber,
    state::{HIST_SHARDS, Shared, lock},
    tracker::Tracker,
};
use crate::{
    cli::Settings,
    report::{ConnectReport, DeliveryReport, Window, encode_histogram, new_histogram},
};

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
            hists: (0..HIST_SHARDS * s.transports().len()).map(|_| Mutex::new(new_histogram())).collect(),
            transports: s.transports(),
            in_window: AtomicU64::new(0),
            last_rx_us: AtomicU64::new(0),
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
        let c = &mut r.counts;
        for t in &self.trackers {
            let t = lock(t);
            let (expected, missing) = t.tally(window, channels);
            c.expected += expected;
            c.missing += missing;
            c.duplicates += t.duplicates;
            c.reordered += t.reordered;
            c.unexpected += t.unexpected;
            c.bad_payload += t.bad_payload;
            c.received_total += t.unique;
            match &t.disconnect {
                Some((reason, _)) => *c.disconnects.entry(reason.clone()).or_default() += 1,
                None if t.connected => c.connected_at_end += 1,
                None => {}
            }
        }
        c.received = c.expected - c.missing;
        let mut hist = new_histogram();
        for (i, t) in self.shared.transports.iter().enumerate() {
            let mut group = new_histogram();
            for h in self.shared.group_hists(i) {
                group.add(&*lock(h)).expect("histograms share bounds");
            }
            hist.add(&group).expect("histograms share bounds");
            if self.shared.transports.len() > 1 {
                r.latency_hist_by_transport.insert(t.as_str().to_owned(), encode_histogram(&group));
            }
        }
        r.latency_hist = encode_histogram(&hist);
        r.counts.poll_resets = self.shared.poll_resets.load(Relaxed);
        r.counts.poll_reconnects = self.shared.poll_reconnects.load(Relaxed);
        r.last_receive_us = self.shared.last_rx_us.load(Relaxed);
        if let Ok(me) = crate::procfs::sample(None) {
            r.loadgen_cpu_secs = me.cpu_secs;
            r.loadgen_runq_wait_secs = me.runq_wait_secs;
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

#[cfg(test)]
mod tests {
    use shared::protocol::ServerFrame;
    use tokio::net::TcpStream;

    use super::*;
    use crate::{
        cli::tests::settings,
        payload::{self, Payload},
        ws::testing::{accept, frame, switching},
    };

    /// Settings for one WebSocket subscriber of `url` (one channel, 10 msg/s for 1 s).
    fn ws_settings(url: &str, server: &str) -> Settings {
        let args = ["--transport", "ws", "--server", server, "--url", url];
        let more =
            ["--subscribers", "1", "--channels", "1", "--rate", "10", "--duration", "1", "--warmup", "0"];
        // Both servers take publishes over HTTP (Nchan only that way); nothing is published.
        let publish = ["--publish", "http"];
        let all: Vec<&str> = args.iter().chain(&more).chain(&publish).copied().collect();
        settings(&all).unwrap()
    }

    /// Accepts one connection, reads the upgrade request and answers `101` followed by
    /// `first` in the same write.
    async fn accept_ws(listener: tokio::net::TcpListener, first: &[u8]) -> (String, TcpStream) {
        accept(listener, switching, first.to_vec()).await
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
        let mut first = frame(true, 0x1, &subscribed);
        first.extend(frame(true, 0x1, &message(0)));
        first.extend(frame(true, 0x9, b"hb"));
        let second = frame(true, 0x1, &message(1));
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
            sock.write_all(&frame(true, 0x8, &1001u16.to_be_bytes())).await.unwrap();
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
            frames.extend(frame(true, opcode, data.as_bytes()));
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let args = ["--server", "nchan", "--transport", "poll", "--url", &url];
        let more = ["--subscribers", "1", "--channels", "1", "--rate", "1", "--duration", "1"];
        let all: Vec<&str> =
            args.iter().chain(&more).chain(&["--warmup", "0", "--publish", "http"]).copied().collect();
        let s = settings(&all).unwrap();
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
