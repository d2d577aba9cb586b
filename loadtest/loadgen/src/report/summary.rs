//! The summary of a run, as written to JSON: assembled from the merged reports, the
//! publisher's report and the server samples.

use std::collections::BTreeMap;

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{
    histogram::decode_histogram,
    per_process::{ConnectReport, DeliveryCounts, DeliveryReport},
};
use crate::{cli::Settings, procfs::ProcSample, publisher::PublishReport};

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
    /// Seconds its threads waited for a CPU in the measured window (run-queue delay,
    /// threads alive at both samples): what the machine's other work took from it.
    pub runq_wait_secs_measured: f64,
    /// CPU µs per message published in the measured window (per token, for token
    /// streams): what one published message costs this process, whatever the fan-out.
    pub cpu_us_per_message: Option<f64>,
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
    /// CPU µs per message published in the measured window.
    pub cpu_us_per_message: Option<f64>,
    /// RSS sums, KiB.
    pub rss_before_kib: u64,
    /// RSS after connecting.
    pub rss_idle_kib: u64,
    /// RSS at the end.
    pub rss_after_kib: u64,
    /// (idle − before) / connected subscribers, KiB.
    pub kib_per_connection: Option<f64>,
}

/// Rates over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Messages (tokens) acknowledged by the server per second, from the first due
    /// time to the last acknowledgment (warm-up included): the schedule's rate when the
    /// server keeps up, its sustained publish rate when it does not.
    pub published_per_sec: f64,
    /// Deliveries of the measured window (first copies, whether or not their publish
    /// was acknowledged in time: the latency count) per second from the window's start
    /// to the last of them (lower than published × subscribers per channel when the
    /// deliveries trail behind).
    pub delivered_per_sec: f64,
    /// From the window's first scheduled message to its last delivery, seconds.
    pub delivery_span_secs: f64,
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
    /// Seconds its threads waited for a CPU, all processes, whole run.
    pub runq_wait_secs: f64,
}

/// The run's settings as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Gateway URL.
    pub url: String,
    /// Which server was driven (`gateway` or `nchan`).
    pub server: &'static str,
    /// Transport(s), comma-separated when subscribers mix several.
    pub transport: String,
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
    /// Deliveries, all processes together.
    pub delivery: DeliveryCounts,
    /// Publish→receive latency, ms (measured window).
    pub latency_ms: Percentiles,
    /// The same by transport, when subscribers mixed transports.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_ms_by_transport: BTreeMap<String, Percentiles>,
    /// Published and delivered rates (runs that publish).
    pub throughput: Option<Throughput>,
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
        let measured_msgs = publish.as_ref().map_or(0, |p| p.measured);
        let per_message = |cpu: f64| (measured_msgs > 0).then(|| cpu * 1e6 / measured_msgs as f64);
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
                runq_wait_secs_measured: (end.runq_wait_secs - start.runq_wait_secs).max(0.0),
                cpu_us_per_message: per_message(end.cpu_secs - start.cpu_secs),
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
            cpu_us_per_delivery: (!processes.is_empty() && delivery.counts.received > 0)
                .then(|| cpu_measured * 1e6 / delivery.counts.received as f64),
            cpu_us_per_message: if processes.is_empty() { None } else { per_message(cpu_measured) },
            rss_before_kib: rss_before,
            rss_idle_kib: rss_idle,
            rss_after_kib: sum(|p| p.end.rss_kib),
            kib_per_connection: (!processes.is_empty() && connect.ok > 0)
                .then(|| (rss_idle as f64 - rss_before as f64) / ok),
            processes,
        };
        let clean = connect.failed == 0
            && delivery.counts.missing == 0
            && delivery.counts.duplicates == 0
            && delivery.counts.disconnects.is_empty()
            && publish.as_ref().is_none_or(|p| p.failed == 0);
        let throughput = publish.as_ref().map(|p| {
            let span = if delivery.last_receive_us > p.measure_start_us {
                (delivery.last_receive_us - p.measure_start_us) as f64 / 1e6
            } else {
                a.duration
            };
            Throughput {
                published_per_sec: if p.duration_secs > 0.0 { p.ok as f64 / p.duration_secs } else { 0.0 },
                delivered_per_sec: latency.len() as f64 / span,
                delivery_span_secs: span,
            }
        });
        Ok(Self {
            config: RunConfig {
                url: a.url.clone(),
                server: a.server.as_str(),
                transport: s.transports_label(),
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
            delivery: delivery.counts.clone(),
            latency_ms: Percentiles::of(&latency),
            latency_ms_by_transport: delivery
                .latency_hist_by_transport
                .iter()
                .map(|(t, h)| Ok((t.clone(), Percentiles::of(&decode_histogram(h)?))))
                .collect::<Result<_>>()?,
            throughput,
            server: server_summary,
            loadgen: LoadgenSummary {
                processes: delivery.loadgen_processes,
                cpu_secs: delivery.loadgen_cpu_secs,
                rss_kib: delivery.loadgen_rss_kib,
                runq_wait_secs: delivery.loadgen_runq_wait_secs,
            },
            clean,
        })
    }
}
