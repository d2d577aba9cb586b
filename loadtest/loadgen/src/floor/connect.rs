//! `floor connect` and its dialer (`floor dial`, a child process): a minimal accept loop
//! against a minimal dialer, and the cost of each accepted connection.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::{raise_fd_limit, read_line, runtime, source_arg, spawn_child};
use crate::{
    cli::{ConnectArgs, DialArgs},
    fdlimit,
    loopback::source_ips,
    net, procfs,
};

/// What the dialer did.
#[derive(Debug, Serialize, Deserialize)]
struct DialReport {
    ok: u64,
    failed: u64,
    secs: f64,
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

pub(super) fn connect(a: ConnectArgs) -> Result<i32> {
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

pub(super) async fn dial(a: DialArgs) -> Result<i32> {
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
