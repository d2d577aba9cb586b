//! `loadgen floor`: what this machine's kernel charges for the work a fan-out server
//! cannot avoid, measured without any server.
//!
//! - `floor fanout`: N loopback TCP connections, a writer that sends one 100-byte record
//!   per connection per message at a fixed rate (several records in one write only when
//!   it has fallen behind, as a batching server would), and a reader process that reads
//!   them like a lean client. Reports the writer's and the reader's CPU per delivery and
//!   the send→receive latency. No HTTP, no framing, no queues: a server that writes each
//!   message to each socket cannot do better on the same machine.
//! - `floor connect`: a minimal accept loop (read a request head, write a fixed
//!   `101 Switching Protocols` head, hold the socket) against a minimal dialer; reports
//!   connections per second and the CPU per connection of each side.
//!
//! Both run the client side in a child process (`loadgen floor read` / `floor dial`,
//! not for direct use) so the CPU of each side is read from `/proc` separately, as a
//! `loadgen run` reads a server's.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    cli::{ConnectArgs, DialArgs, FanoutArgs, FloorCommand, ReadArgs},
    fdlimit,
    loopback::source_ips,
    net, procfs,
};

/// Bytes per record: the size of the payloads in `bench.sh`.
pub const RECORD: usize = 100;

/// What the reader saw.
#[derive(Debug, Serialize, Deserialize)]
struct ReadReport {
    received: u64,
    reordered: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// What the dialer did.
#[derive(Debug, Serialize, Deserialize)]
struct DialReport {
    ok: u64,
    failed: u64,
    secs: f64,
}

/// Runs a `floor` subcommand; the process exit code.
pub fn main(cmd: FloorCommand) -> Result<i32> {
    match cmd {
        FloorCommand::Fanout(a) => fanout(a),
        FloorCommand::Connect(a) => connect(a),
        FloorCommand::Read(a) => runtime()?.block_on(read(a)),
        FloorCommand::Dial(a) => runtime()?.block_on(dial(a)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Room for `sockets` and this process's own descriptors.
fn raise_fd_limit(sockets: usize) -> Result<()> {
    fdlimit::raise_nofile(sockets as u64 + 256)
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// Record `seq` sent as scheduled at `sched_ns` (nanoseconds since the epoch).
fn encode(seq: u64, sched_ns: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&sched_ns.to_le_bytes());
    out.resize(start + RECORD, b'x');
}

fn decode(rec: &[u8]) -> (u64, u64) {
    let seq = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
    let sched = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
    (seq, sched)
}

/// A child process that is killed and reaped however its parent's run ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // After a normal exit both are no-ops (the status is already collected).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `loadgen floor <role> <args>` with piped stdin/stdout.
fn spawn_child(role: &str, args: &[String]) -> Result<(ChildGuard, BufReader<ChildStdout>)> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .arg("floor")
        .arg(role)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `loadgen floor {role}`"))?;
    let out = child.stdout.take().map(BufReader::new);
    let child = ChildGuard(child);
    Ok((child, out.context("child stdout")?))
}

fn read_line(out: &mut BufReader<ChildStdout>, what: &str) -> Result<String> {
    let mut line = String::new();
    out.read_line(&mut line).with_context(|| format!("reading the {what}"))?;
    ensure!(!line.is_empty(), "the {what} exited early");
    Ok(line)
}

fn source_arg(s: &Option<String>) -> Vec<String> {
    s.iter().flat_map(|s| ["--source-ips".to_owned(), s.clone()]).collect()
}

fn fanout(a: FanoutArgs) -> Result<i32> {
    ensure!(
        a.subscribers > 0 && a.subscribers <= fdlimit::MAX_SUBSCRIBERS_PER_PROCESS,
        "--subscribers 1..=19000"
    );
    ensure!(a.rate > 0.0 && a.rate <= 10_000.0, "--rate must be in (0, 10000]");
    ensure!(a.duration > 0.0 && a.duration <= 600.0, "--duration must be in (0, 600]");
    ensure!(a.writers > 0 && a.writers <= 64, "--writers 1..=64");
    ensure!(a.channels > 0 && a.channels <= a.subscribers, "--channels 1..=subscribers");
    source_ips(a.source_ips.as_deref())?;
    raise_fd_limit(a.subscribers)?;
    let messages = (a.rate * a.duration).ceil() as u64;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let plan = Plan { rate: a.rate, messages, channels: a.channels, start: Instant::now(), start_ns: 0 };
    let deliveries = (0..a.subscribers).map(|i| plan.messages_for(i % a.channels)).sum::<u64>();
    let mut args = vec![
        "--port".into(),
        port.to_string(),
        "--subscribers".into(),
        a.subscribers.to_string(),
        "--expect".into(),
        deliveries.to_string(),
        "--within-secs".into(),
        (a.duration + DRAIN_SECS).to_string(),
    ];
    args.extend(source_arg(&a.source_ips));
    let (mut child, mut out) = spawn_child("read", &args)?;
    let socks = accept_all(&listener, a.subscribers, &mut child)?;
    let ready = read_line(&mut out, "reader")?;
    ensure!(ready.trim() == "ready", "reader: {}", ready.trim());
    std::thread::sleep(Duration::from_millis(300)); // the reader's connect work settles

    let me0 = procfs::sample(None)?.cpu_secs;
    let rd0 = procfs::sample(Some(child.0.id()))?.cpu_secs;
    let start = Instant::now();
    let start_ns = now_ns();
    let per = a.subscribers.div_ceil(a.writers);
    let mut writes = 0u64;
    let plan = Plan { start, start_ns, ..plan };
    let mut socks = socks;
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = socks
            .chunks_mut(per)
            .enumerate()
            .map(|(k, part)| scope.spawn(move || plan.write(part, k * per)))
            .collect();
        for h in handles {
            writes += h.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        Ok(())
    })?;
    let sending = start.elapsed().as_secs_f64();
    // Both sides' CPU once the reader has everything (or has given up waiting), before
    // anything is closed.
    let drained = read_line(&mut out, "reader")?;
    let me1 = procfs::sample(None)?.cpu_secs;
    let rd1 = procfs::sample(Some(child.0.id()))?.cpu_secs;
    drop(socks);
    let report: ReadReport = serde_json::from_str(&read_line(&mut out, "reader")?)?;
    child.0.wait()?;
    if drained.trim() != "drained" {
        eprintln!("loadgen floor: the reader did not get every record within {DRAIN_SECS}s of the end");
    }
    let missing = deliveries.saturating_sub(report.received);
    let us = |cpu: f64| cpu / deliveries as f64 * 1e6;
    println!(
        "floor fanout: {} connections on {} channel(s), {} messages ({} msg/s) in {sending:.2}s, {} writer thread(s)",
        a.subscribers, a.channels, messages, a.rate, a.writers
    );
    println!(
        "  deliveries  expected {deliveries}  received {}  missing {missing}  reordered {}",
        report.received, report.reordered
    );
    println!("  writes      {writes} ({:.2} records per write)", deliveries as f64 / writes.max(1) as f64);
    println!(
        "  cpu         writer {:.2}s = {:.2} µs/delivery   reader {:.2}s = {:.2} µs/delivery",
        me1 - me0,
        us(me1 - me0),
        rd1 - rd0,
        us(rd1 - rd0)
    );
    println!("  latency ms  p50 {:.3}  p99 {:.3}  max {:.3}", report.p50_ms, report.p99_ms, report.max_ms);
    Ok(if report.received == deliveries && missing == 0 && report.reordered == 0 { 0 } else { 1 })
}

/// Seconds the reader may take after the last message before it stops waiting.
const DRAIN_SECS: f64 = 30.0;
/// Seconds the reader's connections may take to arrive.
const CONNECT_SECS: u64 = 60;

/// Accepts `n` connections, or fails when the reader exits or takes over
/// [`CONNECT_SECS`].
fn accept_all(listener: &TcpListener, n: usize, child: &mut ChildGuard) -> Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(CONNECT_SECS);
    let mut socks = Vec::with_capacity(n);
    while socks.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                socks.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.0.try_wait()? {
                    bail!("the reader exited ({status}) after {} of {n} connections", socks.len());
                }
                ensure!(
                    Instant::now() < deadline,
                    "only {} of {n} connections in {CONNECT_SECS}s",
                    socks.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting the reader's connections"),
        }
    }
    Ok(socks)
}

/// When each message is due and where it goes.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rate: f64,
    messages: u64,
    channels: usize,
    start: Instant,
    start_ns: u64,
}

impl Plan {
    /// Messages that go to channel `ch`.
    fn messages_for(&self, ch: usize) -> u64 {
        let ch = ch as u64;
        let n = self.channels as u64;
        if ch >= self.messages { 0 } else { (self.messages - ch).div_ceil(n) }
    }

    /// Sends every message to the sockets of its channel (`socks[j]` is connection
    /// `first + j`), message r due at `start + r / rate`. Every message already due goes
    /// out in one write per socket: one record per write while the writer keeps up,
    /// several once it is behind. A record's seq counts the messages of its channel.
    /// Returns the number of writes.
    fn write(&self, socks: &mut [TcpStream], first: usize) -> Result<u64> {
        let mut next = 0u64;
        let mut writes = 0u64;
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); self.channels];
        while next < self.messages {
            let due =
                ((self.start.elapsed().as_secs_f64() * self.rate).floor() as u64).min(self.messages - 1);
            if due < next {
                let at = self.start + Duration::from_secs_f64(next as f64 / self.rate);
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                continue;
            }
            bufs.iter_mut().for_each(Vec::clear);
            for r in next..=due {
                let ch = (r % self.channels as u64) as usize;
                let seq = r / self.channels as u64;
                encode(seq, self.start_ns + (r as f64 * 1e9 / self.rate) as u64, &mut bufs[ch]);
            }
            for (j, s) in socks.iter_mut().enumerate() {
                let buf = &bufs[(first + j) % self.channels];
                if !buf.is_empty() {
                    s.write_all(buf)?;
                    writes += 1;
                }
            }
            next = due + 1;
        }
        Ok(writes)
    }
}

async fn read(a: ReadArgs) -> Result<i32> {
    raise_fd_limit(a.subscribers)?;
    let ips = source_ips(a.source_ips.as_deref())?;
    let dest = SocketAddr::from(([127, 0, 0, 1], a.port));
    let mut streams = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let src = net::source_for(&ips, i);
        streams.push(net::connect(dest, src).await.with_context(|| format!("connection {i}"))?);
    }
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> =
        streams.into_iter().map(|s| tokio::spawn(read_records(s, hist.clone(), count.clone()))).collect();
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs_f64(a.within_secs.clamp(0.0, 3600.0));
    loop {
        if count.load(Ordering::Relaxed) >= a.expect {
            println!("drained");
            break;
        }
        if Instant::now() >= deadline {
            println!("not drained");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut report = ReadReport { received: 0, reordered: 0, p50_ms: 0.0, p99_ms: 0.0, max_ms: 0.0 };
    for t in tasks {
        let (got, reordered) = t.await??;
        report.received += got;
        report.reordered += reordered;
    }
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |us: u64| us as f64 / 1000.0;
    report.p50_ms = ms(h.value_at_quantile(0.5));
    report.p99_ms = ms(h.value_at_quantile(0.99));
    report.max_ms = ms(h.max());
    println!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

/// Reads records until EOF: (records received, records out of order).
async fn read_records(
    mut s: tokio::net::TcpStream,
    hist: Arc<Mutex<Histogram<u64>>>,
    count: Arc<AtomicU64>,
) -> Result<(u64, u64)> {
    let mut buf = vec![0u8; RECORD * 64];
    let mut have = 0usize;
    let (mut got, mut next, mut reordered) = (0u64, 0u64, 0u64);
    loop {
        let n = match s.read(&mut buf[have..]).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e.into()),
        };
        have += n;
        let whole = have / RECORD * RECORD;
        let now = now_ns();
        {
            let mut h = hist.lock().unwrap_or_else(|e| e.into_inner());
            for rec in buf[..whole].chunks_exact(RECORD) {
                let (seq, sched) = decode(rec);
                if seq != next {
                    reordered += 1;
                }
                next = seq + 1;
                got += 1;
                h.saturating_record(now.saturating_sub(sched) / 1000);
            }
        }
        count.fetch_add((whole / RECORD) as u64, Ordering::Relaxed);
        buf.copy_within(whole..have, 0);
        have -= whole;
    }
    Ok((got, reordered))
}

const REQUEST_HEAD: &[u8] = b"GET /ws?channel=floor HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const RESPONSE_HEAD: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// Reads from `s` until a blank line ends a head (at most 4 KiB).
async fn read_head(s: &mut tokio::net::TcpStream) -> Result<()> {
    let mut buf = [0u8; 4096];
    let mut have = 0;
    while !buf[..have].ends_with(b"\r\n\r\n") {
        ensure!(have < buf.len(), "head over 4 KiB");
        let n = s.read(&mut buf[have..]).await?;
        ensure!(n > 0, "closed before the end of the head");
        have += n;
    }
    Ok(())
}

fn connect(a: ConnectArgs) -> Result<i32> {
    ensure!(
        a.connections > 0 && a.connections <= fdlimit::MAX_SUBSCRIBERS_PER_PROCESS,
        "--connections 1..=19000"
    );
    ensure!(a.concurrency > 0 && a.concurrency <= 10_000, "--concurrency 1..=10000");
    source_ips(a.source_ips.as_deref())?;
    raise_fd_limit(a.connections)?;
    let rt = runtime()?;
    let held = Arc::new(Mutex::new(Vec::with_capacity(a.connections)));
    let listener = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        sock.listen(4096)
    })?;
    let port = listener.local_addr()?.port();
    let accept_held = held.clone();
    rt.spawn(async move {
        loop {
            let mut s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Aborted handshakes, or out of descriptors: keep accepting.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let held = accept_held.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                if read_head(&mut s).await.is_ok() && s.write_all(RESPONSE_HEAD).await.is_ok() {
                    held.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
            });
        }
    });
    let mut args = vec![
        "--port".into(),
        port.to_string(),
        "--connections".into(),
        a.connections.to_string(),
        "--concurrency".into(),
        a.concurrency.to_string(),
    ];
    args.extend(source_arg(&a.source_ips));
    let me0 = procfs::sample(None)?.cpu_secs;
    let (mut child, mut out) = spawn_child("dial", &args)?;
    let line = read_line(&mut out, "dialer")?;
    let me1 = procfs::sample(None)?.cpu_secs;
    let dialer_cpu = procfs::sample(Some(child.0.id()))?.cpu_secs;
    let report: DialReport = serde_json::from_str(&line).with_context(|| format!("dialer said: {line}"))?;
    // A server task files its socket just after writing the head the dialer has read.
    let held_now = || held.lock().unwrap_or_else(|e| e.into_inner()).len();
    let deadline = Instant::now() + Duration::from_secs(2);
    while (held_now() as u64) < report.ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = held_now();
    drop(child.0.stdin.take()); // the dialer exits, closing its sockets
    child.0.wait()?;
    rt.shutdown_background();
    let n = report.ok.max(1) as f64;
    println!(
        "floor connect: {} connections, {} in flight: {} ok, {} failed in {:.2}s = {:.0}/s (server held {held})",
        a.connections,
        a.concurrency,
        report.ok,
        report.failed,
        report.secs,
        report.ok as f64 / report.secs
    );
    println!(
        "  cpu  server {:.2}s = {:.1} µs/connection   dialer {:.2}s = {:.1} µs/connection",
        me1 - me0,
        (me1 - me0) / n * 1e6,
        dialer_cpu,
        dialer_cpu / n * 1e6
    );
    Ok(if report.failed == 0 { 0 } else { 1 })
}

async fn dial(a: DialArgs) -> Result<i32> {
    raise_fd_limit(a.connections)?;
    let ips = source_ips(a.source_ips.as_deref())?;
    let dest = SocketAddr::from(([127, 0, 0, 1], a.port));
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let permit = sem.clone().acquire_owned().await?;
        let src = net::source_for(&ips, i);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let dial = async {
                let mut s = net::connect(dest, src).await?;
                s.write_all(REQUEST_HEAD).await?;
                read_head(&mut s).await?;
                anyhow::Ok(s)
            };
            tokio::time::timeout(Duration::from_secs(30), dial).await.context("no answer in 30 s")?
        }));
    }
    let (mut held, mut failed) = (Vec::with_capacity(a.connections), 0u64);
    for t in tasks {
        match t.await? {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&DialReport { ok: held.len() as u64, failed, secs })?);
    // Hold the connections until the parent has read both sides' CPU and closes stdin.
    let mut sink = String::new();
    let _ =
        tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(tokio::io::stdin()), &mut sink)
            .await;
    if held.is_empty() {
        bail!("no connection was made");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_at_the_fixed_size() {
        let mut buf = Vec::new();
        encode(7, 1_700_000_000_123_456_789, &mut buf);
        encode(8, 42, &mut buf);
        assert_eq!(buf.len(), 2 * RECORD);
        assert_eq!(decode(&buf[..RECORD]), (7, 1_700_000_000_123_456_789));
        assert_eq!(decode(&buf[RECORD..]), (8, 42));
    }

    #[test]
    fn accepting_stops_when_the_reader_is_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _one = TcpStream::connect(addr).unwrap();
        let mut child = ChildGuard(Command::new("true").spawn().unwrap());
        let started = Instant::now();
        let err = accept_all(&listener, 5, &mut child).unwrap_err().to_string();
        assert!(err.contains("the reader exited") && err.contains("after 1 of 5"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(CONNECT_SECS),
            "gave up on the exit, not the deadline"
        );
    }

    #[test]
    fn messages_are_spread_round_robin_over_channels() {
        let plan =
            |messages, channels| Plan { rate: 1.0, messages, channels, start: Instant::now(), start_ns: 0 };
        let p = plan(10, 3); // channel 0: 0 3 6 9, 1: 1 4 7, 2: 2 5 8
        assert_eq!([p.messages_for(0), p.messages_for(1), p.messages_for(2)], [4, 3, 3]);
        let p = plan(2, 3);
        assert_eq!([p.messages_for(0), p.messages_for(1), p.messages_for(2)], [1, 1, 0]);
        assert_eq!(plan(200, 1).messages_for(0), 200);
    }
}
