//! Results: what each process measures, how worker results merge, and the summary
//! (printed as a table and written as JSON).

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context, Result};
use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer, V2Serializer},
};
use serde::{Deserialize, Serialize};

use crate::{cli::Settings, procfs::ProcSample, publisher::PublishReport};

/// Largest latency recorded, µs (one hour); larger values are clamped.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// An empty latency histogram: 1 µs to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Encodes a histogram for a worker's JSON (HdrHistogram V2 format, base64).
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("serializing to memory");
    STANDARD.encode(buf)
}

/// Decodes [`encode_histogram`]'s output.
pub fn decode_histogram(s: &str) -> Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new_histogram());
    }
    let bytes = STANDARD.decode(s).context("histogram is not base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))?;
    Ok(h)
}

fn merge_histograms(a: &str, b: &str) -> Result<String> {
    let mut h = decode_histogram(a)?;
    let other = decode_histogram(b)?;
    if !other.is_empty() {
        h.add(&other).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
    }
    Ok(encode_histogram(&h))
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Outcome of one process's connect phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections that subscribed.
    pub ok: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Seconds from the first attempt to the last outcome.
    pub duration_secs: f64,
    /// Time to connect and subscribe, µs (encoded histogram).
    pub connect_time_hist: String,
}

impl ConnectReport {
    /// Adds another process's report (processes connect in parallel, so durations take the max).
    pub fn merge(&mut self, o: &ConnectReport) -> Result<()> {
        self.attempted += o.attempted;
        self.ok += o.ok;
        self.failed += o.failed;
        add_counts(&mut self.errors, &o.errors);
        self.duration_secs = self.duration_secs.max(o.duration_secs);
        self.connect_time_hist = merge_histograms(&self.connect_time_hist, &o.connect_time_hist)?;
        Ok(())
    }
}

/// What one process's subscribers received.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    /// Subscribers still connected at the end.
    pub connected_at_end: u64,
    /// Deliveries expected in the measured window (each subscriber × messages published
    /// to its channel while it was connected).
    pub expected: u64,
    /// Expected deliveries that arrived.
    pub received: u64,
    /// Expected deliveries that did not arrive.
    pub missing: u64,
    /// Extra copies of a message a subscriber already had (any window).
    pub duplicates: u64,
    /// Messages that arrived after a higher seq on the same subscriber.
    pub reordered: u64,
    /// Messages of this run's format for another channel or an unplanned seq.
    pub unexpected: u64,
    /// Messages that were not in this run's payload format.
    pub bad_payload: u64,
    /// Deliveries of any window, first copies only.
    pub received_total: u64,
    /// Long-poll answers with `"reset": true`.
    pub poll_resets: u64,
    /// Long-poll reconnects after the server closed a kept-alive connection.
    pub poll_reconnects: u64,
    /// Subscribers that lost their connection during the run, by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// Publish→receive latency, µs (encoded histogram), measured window only.
    pub latency_hist: String,
    /// CPU seconds used by the load generator process(es).
    pub loadgen_cpu_secs: f64,
    /// Resident memory of the load generator process(es), KiB (summed).
    pub loadgen_rss_kib: u64,
    /// Number of load generator processes that reported.
    pub loadgen_processes: u64,
}

impl DeliveryReport {
    /// Adds another process's report.
    pub fn merge(&mut self, o: &DeliveryReport) -> Result<()> {
        self.connected_at_end += o.connected_at_end;
        self.expected += o.expected;
        self.received += o.received;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.unexpected += o.unexpected;
        self.bad_payload += o.bad_payload;
        self.received_total += o.received_total;
        self.poll_resets += o.poll_resets;
        self.poll_reconnects += o.poll_reconnects;
        add_counts(&mut self.disconnects, &o.disconnects);
        self.latency_hist = merge_histograms(&self.latency_hist, &o.latency_hist)?;
        self.loadgen_cpu_secs += o.loadgen_cpu_secs;
        self.loadgen_rss_kib += o.loadgen_rss_kib;
        self.loadgen_processes += o.loadgen_processes;
        Ok(())
    }
}

/// The publish window the subscribers judge their deliveries against.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// First measured seq.
    pub measure_from: u64,
    /// One past the last seq actually sent.
    pub end_seq: u64,
    /// Scheduled time of seq 0, µs since the Unix epoch.
    pub t0_us: u64,
    /// Messages per second.
    pub rate: f64,
    /// Seqs whose publish failed (sorted), not expected anywhere.
    pub failed: Vec<u64>,
}

impl Window {
    /// Number of seqs scheduled at or before `at_us` (a subscriber that dropped at
    /// `at_us` is expected to have seen only those).
    pub fn scheduled_by(&self, at_us: u64) -> u64 {
        if self.rate <= 0.0 || at_us < self.t0_us {
            return 0;
        }
        let n = ((at_us - self.t0_us) as f64 * self.rate / 1e6).floor() as u64 + 1;
        n.min(self.end_seq)
    }
}

/// Latency percentiles, ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of a µs histogram, in ms.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Connect phase, all processes together.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectSummary {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections that subscribed.
    pub ok: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the connect phase.
    pub duration_secs: f64,
    /// Subscribed connections per second.
    pub rate_per_sec: f64,
    /// Time to connect and subscribe, ms.
    pub connect_time_ms: Percentiles,
}

/// Deliveries, all processes together.
#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    /// Subscribers still connected at the end.
    pub connected_at_end: u64,
    /// Deliveries expected in the measured window.
    pub expected: u64,
    /// Expected deliveries that arrived.
    pub received: u64,
    /// Expected deliveries that did not arrive.
    pub missing: u64,
    /// Extra copies.
    pub duplicates: u64,
    /// Out-of-order arrivals.
    pub reordered: u64,
    /// Unplanned messages.
    pub unexpected: u64,
    /// Messages not in this run's format.
    pub bad_payload: u64,
    /// Deliveries including warm-up.
    pub received_total: u64,
    /// Long-poll resets.
    pub poll_resets: u64,
    /// Long-poll reconnects.
    pub poll_reconnects: u64,
    /// Lost connections by reason.
    pub disconnects: BTreeMap<String, u64>,
}

/// One measured server process.
#[derive(Debug, Clone, Serialize)]
pub struct ServerProcess {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub name: Option<String>,
    /// Whether it exited during the run (later readings repeat the last one taken).
    pub exited: bool,
    /// Before any subscriber connected.
    pub before: ProcSample,
    /// After connecting and settling, before publishing.
    pub idle: ProcSample,
    /// At the start of the measured window.
    pub measure_start: ProcSample,
    /// At the end (after the drain, before disconnecting).
    pub end: ProcSample,
    /// CPU seconds used in the measured window.
    pub cpu_secs_measured: f64,
    /// CPU seconds used while connecting.
    pub cpu_secs_connect: f64,
    /// (idle − before) RSS per subscriber connected to it, KiB (with one server pid per
    /// `--url` node, a node holds 1/n of the subscribers).
    pub kib_per_connection: Option<f64>,
}

/// Server cost, all measured processes together.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSummary {
    /// Each process.
    pub processes: Vec<ServerProcess>,
    /// Length of the measured window, seconds.
    pub measured_window_secs: f64,
    /// CPU seconds used in the measured window (all processes).
    pub cpu_secs_measured: f64,
    /// CPU share of one core over the measured window (all processes).
    pub cpu_cores_measured: f64,
    /// CPU µs per received delivery in the measured window.
    pub cpu_us_per_delivery: Option<f64>,
    /// RSS sums, KiB.
    pub rss_before_kib: u64,
    /// RSS after connecting.
    pub rss_idle_kib: u64,
    /// RSS at the end.
    pub rss_after_kib: u64,
    /// (idle − before) / connected subscribers, KiB.
    pub kib_per_connection: Option<f64>,
}

/// Load generator cost.
#[derive(Debug, Clone, Serialize)]
pub struct LoadgenSummary {
    /// Processes (parent + workers).
    pub processes: u64,
    /// CPU seconds, all processes.
    pub cpu_secs: f64,
    /// Resident memory, KiB, all processes at the end.
    pub rss_kib: u64,
}

/// The run's settings as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Gateway URL.
    pub url: String,
    /// Which server was driven (`gateway` or `nchan`).
    pub server: &'static str,
    /// Transport.
    pub transport: &'static str,
    /// Subscribers.
    pub subscribers: usize,
    /// Channels.
    pub channels: usize,
    /// Channel prefix.
    pub channel_prefix: String,
    /// Messages per second.
    pub rate: f64,
    /// Measured seconds.
    pub duration_secs: f64,
    /// Warm-up seconds.
    pub warmup_secs: f64,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Publish path.
    pub publish: &'static str,
    /// Worker processes.
    pub workers: usize,
    /// Source addresses used.
    pub source_ips: usize,
    /// Connect concurrency.
    pub connect_concurrency: usize,
}

/// Everything a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Settings.
    pub config: RunConfig,
    /// Connect phase.
    pub connect: ConnectSummary,
    /// Publisher.
    pub publish: Option<PublishReport>,
    /// Deliveries.
    pub delivery: DeliverySummary,
    /// Publish→receive latency, ms (measured window).
    pub latency_ms: Percentiles,
    /// Server cost.
    pub server: ServerSummary,
    /// Load generator cost.
    pub loadgen: LoadgenSummary,
    /// True when every connection succeeded and nothing was missing or duplicated.
    pub clean: bool,
}

/// Samples of one server process: before, idle, measure start, end.
#[derive(Debug, Clone)]
pub struct ServerRow {
    /// Process id.
    pub pid: u32,
    /// Command name, read at the start.
    pub name: Option<String>,
    /// Before, idle, measure start, end.
    pub samples: [ProcSample; 4],
    /// The process was gone at a later sample (its last reading is repeated).
    pub exited: bool,
}

impl ServerRow {
    /// Stores reading `i` (1..=3); a process that has gone keeps its previous reading.
    pub fn update(&mut self, i: usize, sample: Option<ProcSample>) {
        match sample {
            Some(x) => self.samples[i] = x,
            None => {
                if !self.exited {
                    eprintln!("loadgen: server process {} has exited", self.pid);
                }
                self.exited = true;
                self.samples[i] = self.samples[i - 1];
            }
        }
    }
}

/// Server samples taken during the run, one entry per `--server-pid`.
#[derive(Debug, Clone, Default)]
pub struct ServerSamples {
    /// One row per process.
    pub rows: Vec<ServerRow>,
    /// Measured window length, seconds.
    pub window_secs: f64,
}

impl Summary {
    /// Assembles the summary.
    pub fn build(
        s: &Settings,
        connect: &ConnectReport,
        publish: Option<PublishReport>,
        delivery: &DeliveryReport,
        server: &ServerSamples,
    ) -> Result<Self> {
        let a = &s.args;
        let latency = decode_histogram(&delivery.latency_hist)?;
        let connect_hist = decode_histogram(&connect.connect_time_hist)?;
        let ok = connect.ok.max(1) as f64;
        // With one --server-pid per --url node (a cluster), each node holds an equal
        // share of the connections (subscriber i goes to node i % n).
        let nodes = s.targets.len();
        let per_process = if nodes > 1 && server.rows.len() == nodes { ok / nodes as f64 } else { ok };
        let processes: Vec<ServerProcess> = server
            .rows
            .iter()
            .map(|ServerRow { pid, name, samples: [before, idle, start, end], exited }| ServerProcess {
                pid: *pid,
                name: name.clone(),
                exited: *exited,
                before: *before,
                idle: *idle,
                measure_start: *start,
                end: *end,
                cpu_secs_measured: end.cpu_secs - start.cpu_secs,
                cpu_secs_connect: idle.cpu_secs - before.cpu_secs,
                kib_per_connection: (connect.ok > 0)
                    .then(|| (idle.rss_kib as f64 - before.rss_kib as f64) / per_process),
            })
            .collect();
        let cpu_measured: f64 = processes.iter().map(|p| p.cpu_secs_measured).sum();
        let sum = |f: fn(&ServerProcess) -> u64| processes.iter().map(f).sum::<u64>();
        let rss_before = sum(|p| p.before.rss_kib);
        let rss_idle = sum(|p| p.idle.rss_kib);
        let server_summary = ServerSummary {
            measured_window_secs: server.window_secs,
            cpu_secs_measured: cpu_measured,
            cpu_cores_measured: if server.window_secs > 0.0 {
                cpu_measured / server.window_secs
            } else {
                0.0
            },
            cpu_us_per_delivery: (!processes.is_empty() && delivery.received > 0)
                .then(|| cpu_measured * 1e6 / delivery.received as f64),
            rss_before_kib: rss_before,
            rss_idle_kib: rss_idle,
            rss_after_kib: sum(|p| p.end.rss_kib),
            kib_per_connection: (!processes.is_empty() && connect.ok > 0)
                .then(|| (rss_idle as f64 - rss_before as f64) / ok),
            processes,
        };
        let clean = connect.failed == 0
            && delivery.missing == 0
            && delivery.duplicates == 0
            && delivery.disconnects.is_empty()
            && publish.as_ref().is_none_or(|p| p.failed == 0);
        Ok(Self {
            config: RunConfig {
                url: a.url.clone(),
                server: a.server.as_str(),
                transport: a.transport.as_str(),
                subscribers: a.subscribers,
                channels: a.channels,
                channel_prefix: s.prefix.clone(),
                rate: a.rate,
                duration_secs: a.duration,
                warmup_secs: a.warmup,
                payload_bytes: a.payload_bytes,
                publish: if s.publishing() { a.publish.as_str() } else { "none" },
                workers: a.workers,
                source_ips: s.source_ips.len(),
                connect_concurrency: a.connect_concurrency,
            },
            connect: ConnectSummary {
                attempted: connect.attempted,
                ok: connect.ok,
                failed: connect.failed,
                errors: connect.errors.clone(),
                duration_secs: connect.duration_secs,
                rate_per_sec: if connect.duration_secs > 0.0 {
                    connect.ok as f64 / connect.duration_secs
                } else {
                    0.0
                },
                connect_time_ms: Percentiles::of(&connect_hist),
            },
            publish,
            delivery: DeliverySummary {
                connected_at_end: delivery.connected_at_end,
                expected: delivery.expected,
                received: delivery.received,
                missing: delivery.missing,
                duplicates: delivery.duplicates,
                reordered: delivery.reordered,
                unexpected: delivery.unexpected,
                bad_payload: delivery.bad_payload,
                received_total: delivery.received_total,
                poll_resets: delivery.poll_resets,
                poll_reconnects: delivery.poll_reconnects,
                disconnects: delivery.disconnects.clone(),
            },
            latency_ms: Percentiles::of(&latency),
            server: server_summary,
            loadgen: LoadgenSummary {
                processes: delivery.loadgen_processes,
                cpu_secs: delivery.loadgen_cpu_secs,
                rss_kib: delivery.loadgen_rss_kib,
            },
            clean,
        })
    }

    /// The human-readable table.
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut o = String::new();
        let w = &mut o;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let idle = self.publish.is_none();
        // The gateway's lines stay as they were; other servers are named.
        let who = if c.server == "gateway" { String::new() } else { format!(" ({})", c.server) };
        if idle {
            let _ = writeln!(
                w,
                "loadgen{who}: {} × {} on {} channels, idle for {}s (no publishing), {} worker(s)",
                c.subscribers, c.transport, c.channels, c.duration_secs, c.workers
            );
        } else {
            let _ = writeln!(
                w,
                "loadgen{who}: {} × {} on {} channels, {} msg/s for {}s (+{}s warm-up), {}-byte payloads, publish via {}, {} worker(s)",
                c.subscribers,
                c.transport,
                c.channels,
                c.rate,
                c.duration_secs,
                c.warmup_secs,
                c.payload_bytes,
                c.publish,
                c.workers
            );
        }
        let k = &self.connect;
        let _ = writeln!(
            w,
            "  connections   ok {}  failed {}  in {:.2}s = {:.0}/s   connect p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            k.ok,
            k.failed,
            k.duration_secs,
            k.rate_per_sec,
            k.connect_time_ms.p50,
            k.connect_time_ms.p99,
            k.connect_time_ms.max
        );
        if !k.errors.is_empty() {
            let _ = writeln!(w, "  connect errors {}", fmt_counts(&k.errors));
        }
        if let Some(p) = &self.publish {
            let _ = writeln!(
                w,
                "  published     {} ok / {} scheduled ({} in window), failed {}, no receivers {}; {:.1} msg/s; publisher lag mean {:.3} ms, max {:.2} ms, >10ms {}",
                p.ok,
                p.scheduled,
                p.measured,
                p.failed,
                p.no_receivers,
                p.achieved_rate,
                p.mean_lag_ms,
                p.max_lag_ms,
                p.late_10ms
            );
            if !p.errors.is_empty() {
                let _ = writeln!(w, "  publish errors {}", fmt_counts(&p.errors));
            }
        }
        let d = &self.delivery;
        if !idle || d.received_total + d.unexpected + d.bad_payload > 0 {
            let _ = writeln!(
                w,
                "  deliveries    expected {}  received {}  missing {}  duplicates {}  reordered {}  unexpected {}  bad {}",
                d.expected, d.received, d.missing, d.duplicates, d.reordered, d.unexpected, d.bad_payload
            );
        }
        if d.poll_resets > 0 || d.poll_reconnects > 0 {
            let _ = writeln!(w, "  long-poll     resets {}  reconnects {}", d.poll_resets, d.poll_reconnects);
        }
        let _ = writeln!(
            w,
            "  subscribers   connected at end {}{}",
            d.connected_at_end,
            if d.disconnects.is_empty() {
                String::new()
            } else {
                format!("  disconnects {}", fmt_counts(&d.disconnects))
            }
        );
        let l = &self.latency_ms;
        if !idle {
            let _ = writeln!(
                w,
                "  latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}  (n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
            );
        }
        let s = &self.server;
        for p in &s.processes {
            let _ = writeln!(
                w,
                "  server {:>7}  {}{}: cpu {:.2}s in window ({:.2} cores), {:.2}s while connecting; rss before {:.1} MiB  idle {:.1} MiB  after {:.1} MiB{}",
                p.pid,
                p.name.as_deref().unwrap_or("?"),
                if p.exited { " (EXITED during the run)" } else { "" },
                p.cpu_secs_measured,
                if s.measured_window_secs > 0.0 { p.cpu_secs_measured / s.measured_window_secs } else { 0.0 },
                p.cpu_secs_connect,
                mib(p.before.rss_kib),
                mib(p.idle.rss_kib),
                mib(p.end.rss_kib),
                p.kib_per_connection.map(|k| format!("  ({k:.2} KiB/conn)")).unwrap_or_default()
            );
        }
        if !s.processes.is_empty() {
            let _ = writeln!(
                w,
                "  server total  cpu {:.2}s over {:.1}s{}; rss {:+.1} MiB for {} connections{}",
                s.cpu_secs_measured,
                s.measured_window_secs,
                s.cpu_us_per_delivery.map(|u| format!(" = {u:.2} µs/delivery")).unwrap_or_default(),
                (s.rss_idle_kib as f64 - s.rss_before_kib as f64) / 1024.0,
                self.connect.ok,
                s.kib_per_connection.map(|k| format!(" = {k:.2} KiB/conn")).unwrap_or_default()
            );
        }
        let _ = writeln!(
            w,
            "  loadgen       {} process(es), cpu {:.2}s, rss {:.1} MiB",
            self.loadgen.processes,
            self.loadgen.cpu_secs,
            mib(self.loadgen.rss_kib)
        );
        let _ = writeln!(w, "  result        {}", if self.clean { "CLEAN" } else { "NOT CLEAN (see above)" });
        o
    }
}

fn fmt_counts(m: &BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip_and_merge() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in 1..=1000 {
            a.record(v).unwrap();
        }
        b.record(50_000).unwrap();
        b.saturating_record(u64::MAX);
        let ea = encode_histogram(&a);
        assert_eq!(decode_histogram(&ea).unwrap(), a);
        let merged = decode_histogram(&merge_histograms(&ea, &encode_histogram(&b)).unwrap()).unwrap();
        assert_eq!(merged.len(), 1002);
        assert!(merged.max() >= MAX_LATENCY_US);
        assert_eq!(decode_histogram("").unwrap().len(), 0);
    }

    #[test]
    fn reports_merge() {
        let mut h = new_histogram();
        h.record(1500).unwrap();
        let one = DeliveryReport {
            connected_at_end: 10,
            expected: 100,
            received: 99,
            missing: 1,
            duplicates: 2,
            disconnects: BTreeMap::from([("eof".to_owned(), 1)]),
            latency_hist: encode_histogram(&h),
            loadgen_cpu_secs: 0.5,
            loadgen_processes: 1,
            ..Default::default()
        };
        let mut total = DeliveryReport::default();
        total.merge(&one).unwrap();
        total.merge(&one).unwrap();
        assert_eq!(
            (total.connected_at_end, total.expected, total.received, total.missing),
            (20, 200, 198, 2)
        );
        assert_eq!(total.duplicates, 4);
        assert_eq!(total.disconnects["eof"], 2);
        assert_eq!(total.loadgen_processes, 2);
        assert_eq!(decode_histogram(&total.latency_hist).unwrap().len(), 2);

        let c = ConnectReport {
            attempted: 5,
            ok: 4,
            failed: 1,
            errors: BTreeMap::from([("refused".to_owned(), 1)]),
            duration_secs: 2.0,
            connect_time_hist: encode_histogram(&h),
        };
        let mut ct = ConnectReport { duration_secs: 3.0, ..Default::default() };
        ct.merge(&c).unwrap();
        ct.merge(&c).unwrap();
        assert_eq!((ct.attempted, ct.ok, ct.failed, ct.errors["refused"]), (10, 8, 2, 2));
        assert_eq!(ct.duration_secs, 3.0);
    }

    #[test]
    fn window_schedule() {
        let w = Window { measure_from: 0, end_seq: 100, t0_us: 1_000_000, rate: 10.0, failed: vec![] };
        assert_eq!(w.scheduled_by(999_999), 0);
        assert_eq!(w.scheduled_by(1_000_000), 1);
        assert_eq!(w.scheduled_by(1_250_000), 3);
        assert_eq!(w.scheduled_by(u64::MAX / 2), 100);
    }
}
