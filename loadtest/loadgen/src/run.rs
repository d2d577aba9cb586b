//! A run from start to end: connect, settle, publish, drain, measure, report.
//!
//! With `--workers K` the parent re-executes itself K times (`--worker-index i`); each
//! worker holds its share of the subscribers and talks to the parent in JSON lines:
//! it prints `connected` when its connect phase is over and `result` after the parent's
//! `finish` command (sent once publishing has ended), then closes its connections on
//! `exit` (or when its stdin closes). The publisher and the /proc sampling run only in
//! the parent, so server samples bracket exactly the work of all workers.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
    time::{Instant, sleep, sleep_until, timeout_at},
};

use crate::{
    cli::{Role, ServerKind, Settings, Transport},
    procfs::{self, ProcSample},
    publisher::{self, PublishReport, Sink},
    report::{ConnectReport, DeliveryReport, ServerRow, ServerSamples, Summary, Window},
    subscriber::{Pool, now_us},
};

/// A worker's message to the parent (one JSON line on stdout).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WorkerMsg {
    /// The worker's connect phase is over.
    Connected {
        /// Its connect results.
        report: ConnectReport,
    },
    /// The worker's deliveries.
    Result {
        /// Its delivery results.
        report: DeliveryReport,
    },
}

/// The parent's command to a worker (one JSON line on stdin).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum ParentCmd {
    /// Publishing is over: drain, judge deliveries against this window, report.
    Finish {
        /// The publish window.
        window: Window,
    },
    /// Close connections and exit.
    Exit,
}

/// Subscriber index range of worker `i` of `k` for `n` subscribers.
pub fn share(n: u64, k: u64, i: u64) -> std::ops::Range<u64> {
    (n * i / k)..(n * (i + 1) / k)
}

/// Runs this process's role; returns the exit code.
pub async fn run(s: Settings) -> Result<i32> {
    let hard = Instant::now() + s.hard_limit();
    match s.role {
        Role::Worker(i) => {
            // Outlive the parent's own limit a little, so the parent decides first.
            let hard = hard + Duration::from_secs(30);
            match timeout_at(hard, worker(&s, i)).await {
                Ok(r) => r.map(|()| 0),
                Err(_) => bail!("worker {i}: hard time limit reached"),
            }
        }
        Role::Single | Role::Parent => match timeout_at(hard, coordinate(&s, hard)).await {
            Ok(r) => r.map(|_clean| 0),
            Err(_) => bail!("hard time limit of {:.0}s reached; run aborted", s.hard_limit().as_secs_f64()),
        },
    }
}

fn sample_servers(s: &Settings) -> Result<Vec<ProcSample>> {
    s.args
        .server_pids
        .iter()
        .map(|&pid| procfs::sample(Some(pid)).with_context(|| format!("--server-pid {pid}")))
        .collect()
}

/// The subscribers of a run, in this process or in workers.
enum Fleet {
    Local(Box<Pool>),
    Workers(Vec<WorkerProc>),
}

struct WorkerProc {
    index: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    async fn recv(&mut self, deadline: Instant) -> Result<WorkerMsg> {
        let line = timeout_at(deadline, self.lines.next_line())
            .await
            .with_context(|| format!("worker {} did not answer in time", self.index))?
            .with_context(|| format!("reading worker {}", self.index))?
            .with_context(|| format!("worker {} exited early (see its messages above)", self.index))?;
        serde_json::from_str(&line).with_context(|| format!("worker {} sent {line:?}", self.index))
    }

    async fn send(&mut self, cmd: &ParentCmd) -> Result<()> {
        let stdin = self.stdin.as_mut().context("worker stdin closed")?;
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }
}

impl Fleet {
    fn start(s: &Settings, phase_deadline: Instant) -> Result<Self> {
        let a = &s.args;
        if s.role == Role::Single {
            let pool =
                Pool::start(s, 0..a.subscribers as u64, a.connect_concurrency, phase_deadline, String::new());
            return Ok(Fleet::Local(Box::new(pool)));
        }
        let exe = std::env::current_exe().context("finding my own executable")?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let mut workers = Vec::with_capacity(a.workers);
        for i in 0..a.workers {
            let mut child = tokio::process::Command::new(&exe)
                .args(&args)
                .arg("--worker-index")
                .arg(i.to_string())
                .arg("--channel-prefix")
                .arg(&s.prefix)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {i}"))?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().context("worker stdout")?;
            workers.push(WorkerProc { index: i, child, stdin, lines: BufReader::new(stdout).lines() });
        }
        Ok(Fleet::Workers(workers))
    }

    async fn wait_connected(&mut self, deadline: Instant) -> Result<ConnectReport> {
        match self {
            Fleet::Local(pool) => Ok(pool.wait_connected().await),
            Fleet::Workers(ws) => {
                let mut total = ConnectReport::default();
                for w in ws.iter_mut() {
                    match w.recv(deadline).await? {
                        WorkerMsg::Connected { report } => total.merge(&report)?,
                        other => bail!("worker {} sent {other:?} before connecting", w.index),
                    }
                }
                Ok(total)
            }
        }
    }

    async fn finish(
        &mut self,
        window: &Window,
        drain: Duration,
        deadline: Instant,
    ) -> Result<DeliveryReport> {
        match self {
            Fleet::Local(pool) => Ok(pool.finish(window, drain).await),
            Fleet::Workers(ws) => {
                for w in ws.iter_mut() {
                    w.send(&ParentCmd::Finish { window: window.clone() }).await?;
                }
                let mut total = DeliveryReport::default();
                for w in ws.iter_mut() {
                    match w.recv(deadline).await? {
                        WorkerMsg::Result { report } => total.merge(&report)?,
                        other => bail!("worker {} sent {other:?} instead of its result", w.index),
                    }
                }
                Ok(total)
            }
        }
    }

    async fn shutdown(self) {
        match self {
            Fleet::Local(pool) => pool.shutdown().await,
            Fleet::Workers(ws) => {
                for mut w in ws {
                    let _ = w.send(&ParentCmd::Exit).await;
                    drop(w.stdin.take());
                    let waited = tokio::time::timeout(Duration::from_secs(15), w.child.wait()).await;
                    if !matches!(waited, Ok(Ok(status)) if status.success()) {
                        eprintln!("worker {} did not exit cleanly ({waited:?}); killing it", w.index);
                        let _ = w.child.kill().await;
                    }
                }
            }
        }
    }
}

/// The parent (or single process): returns whether the run was clean.
async fn coordinate(s: &Settings, hard: Instant) -> Result<bool> {
    let a = &s.args;
    let sink = if s.publishing() { Some(Sink::connect(s).await?) } else { None };
    let mut rows: Vec<ServerRow> = Vec::new();
    for (pid, before) in a.server_pids.iter().zip(sample_servers(s)?) {
        rows.push(ServerRow { pid: *pid, name: procfs::comm(*pid), samples: [before; 4], exited: false });
    }
    eprintln!(
        "loadgen: {} {} subscribers on {} channels at {}{}{}",
        a.subscribers,
        s.transports_label(),
        a.channels,
        a.url,
        if a.server == ServerKind::Nchan { " (nchan)" } else { "" },
        if a.workers > 1 { format!(" in {} workers", a.workers) } else { String::new() }
    );
    if a.server == ServerKind::Nchan && a.transport.contains(&Transport::Poll) {
        publisher::nchan_mark_channels(s).await?;
    }
    let phase_deadline = Instant::now() + Duration::from_secs_f64(a.connect_phase_timeout);
    let mut fleet = Fleet::start(s, phase_deadline)?;
    let result = drive(s, sink, &mut fleet, &mut rows, phase_deadline, hard).await;
    let mut me = DeliveryReport::default();
    if let Ok(sample) = procfs::sample(None) {
        me.loadgen_cpu_secs = sample.cpu_secs;
        me.loadgen_runq_wait_secs = sample.runq_wait_secs;
        me.loadgen_rss_kib = sample.rss_kib;
    }
    fleet.shutdown().await;
    let (connect, publish, mut delivery, window_secs) = result?;
    if s.role == Role::Parent {
        me.loadgen_processes = 1;
        delivery.merge(&me)?;
    }
    let samples = ServerSamples { rows, window_secs };
    let summary = Summary::build(s, &connect, publish, &delivery, &samples)?;
    print!("{}", summary.render());
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: wrote {}", path.display());
    }
    Ok(summary.clean)
}

type Outcome = (ConnectReport, Option<PublishReport>, DeliveryReport, f64);

async fn drive(
    s: &Settings,
    sink: Option<Sink>,
    fleet: &mut Fleet,
    rows: &mut [ServerRow],
    phase_deadline: Instant,
    hard: Instant,
) -> Result<Outcome> {
    let a = &s.args;
    let connect = fleet.wait_connected(phase_deadline + Duration::from_secs(30)).await?;
    eprintln!(
        "loadgen: {} subscribed, {} failed in {:.2}s",
        connect.ok, connect.failed, connect.duration_secs
    );
    sleep(Duration::from_secs_f64(a.settle)).await;
    for row in rows.iter_mut() {
        let sample = procfs::sample(Some(row.pid)).ok();
        row.update(1, sample);
        row.update(2, sample);
    }
    let drain = Duration::from_secs_f64(a.drain);
    let (window, publish, window_start) = match sink {
        Some(mut sink) => {
            sink.prepare(s).await?;
            // Start on a whole tick a little ahead, so the schedule begins on time.
            let lead = Duration::from_millis(200);
            let t0 = Instant::now() + lead;
            let t0_us = now_us() + lead.as_micros() as u64;
            eprintln!(
                "loadgen: publishing {} messages at {}/s via {} ({} warm-up)",
                s.total_messages,
                a.rate,
                a.publish.as_str(),
                s.measure_from
            );
            let measure_at = t0 + Duration::from_secs_f64(a.warmup);
            let pids = a.server_pids.clone();
            let sampler = tokio::spawn(async move {
                sleep_until(measure_at).await;
                (Instant::now(), pids.iter().map(|&p| procfs::sample(Some(p)).ok()).collect::<Vec<_>>())
            });
            // Leave time after the schedule for the last replies (streams: their answers).
            let reserve = Duration::from_secs(if s.publisher_sockets() > 0 { 60 } else { 20 });
            let report = publisher::run(sink, s, t0, t0_us, hard - drain - reserve).await;
            let (start, samples) = sampler.await.context("sampler task")?;
            for (row, sample) in rows.iter_mut().zip(samples) {
                row.update(2, sample);
            }
            let window = Window {
                measure_from: s.measure_from,
                end_seq: report.sent,
                t0_us,
                rate: a.rate,
                failed: report.failed_seqs.clone(),
            };
            (window, Some(report), start)
        }
        None => {
            let start = Instant::now();
            eprintln!("loadgen: holding connections for {}s", a.duration);
            sleep(Duration::from_secs_f64(a.duration)).await;
            (Window::default(), None, start)
        }
    };
    let delivery = fleet.finish(&window, drain, hard).await?;
    let window_secs = window_start.elapsed().as_secs_f64();
    for row in rows.iter_mut() {
        row.update(3, procfs::sample(Some(row.pid)).ok());
    }
    Ok((connect, publish, delivery, window_secs))
}

fn emit(msg: &WorkerMsg) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, msg)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// A worker process: subscribers only, driven by the parent.
async fn worker(s: &Settings, i: usize) -> Result<()> {
    let a = &s.args;
    let range = share(a.subscribers as u64, a.workers as u64, i as u64);
    let concurrency = a.connect_concurrency.div_ceil(a.workers);
    let phase_deadline = Instant::now() + Duration::from_secs_f64(a.connect_phase_timeout);
    let label = format!("[worker {i}] ");
    let mut pool = Pool::start(s, range, concurrency, phase_deadline, label.clone());
    let report = pool.wait_connected().await;
    emit(&WorkerMsg::Connected { report })?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let result = loop {
        match stdin.next_line().await {
            Ok(Some(line)) => match serde_json::from_str::<ParentCmd>(&line) {
                Ok(ParentCmd::Finish { window }) => {
                    let report = pool.finish(&window, Duration::from_secs_f64(a.drain)).await;
                    emit(&WorkerMsg::Result { report })?;
                }
                Ok(ParentCmd::Exit) => break Ok(()),
                Err(e) => break Err(anyhow::anyhow!("{label}bad command {line:?}: {e}")),
            },
            Ok(None) => break Ok(()),
            Err(e) => break Err(anyhow::anyhow!("{label}reading stdin: {e}")),
        }
    };
    pool.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (n, k) in [(10, 3), (200, 2), (1, 1), (19_001, 2)] {
            let ranges: Vec<_> = (0..k).map(|i| share(n, k, i)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[k as usize - 1].end, n);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
        }
    }

    #[test]
    fn protocol_lines() {
        let cmd = serde_json::to_string(&ParentCmd::Exit).unwrap();
        assert_eq!(cmd, r#"{"cmd":"exit"}"#);
        let msg = WorkerMsg::Connected { report: ConnectReport::default() };
        let back: WorkerMsg = serde_json::from_str(&serde_json::to_string(&msg).unwrap()).unwrap();
        assert!(matches!(back, WorkerMsg::Connected { .. }));
    }
}
