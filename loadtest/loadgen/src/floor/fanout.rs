//! `floor fanout`, the writer side: accepts the reader's connections, writes every
//! message to the sockets of its channel on schedule, and reports both sides' cost.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    process::{ChildGuard, raise_fd_limit, read_line, source_arg, spawn_child},
    read::ReadReport,
    record::{encode, now_ns},
};
use crate::{cli::FanoutArgs, fdlimit, loopback::source_ips, procfs};

pub(super) fn fanout(a: FanoutArgs) -> Result<i32> {
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

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
