//! `floor read`, the reader side of `floor fanout` (a child process): connects, reads
//! records like a lean client, and reports what it saw to the parent.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{
    process::raise_fd_limit,
    record::{RECORD, decode, now_ns},
};
use crate::{cli::ReadArgs, loopback::source_ips, net};

/// What the reader saw.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ReadReport {
    pub(super) received: u64,
    pub(super) reordered: u64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
}

pub(super) async fn read(a: ReadArgs) -> Result<i32> {
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
