//! What one process measures (its connect phase, its subscribers' deliveries, judged
//! against the publish window the parent sends it), and how the reports of several
//! processes add up.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::histogram::merge_histograms;

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

/// The delivery counters: what the subscribers received, missed, or got twice or out of
/// order, and how their connections ended. One process's share in a [`DeliveryReport`],
/// all processes together in the summary; the same fields, so the JSON of both names
/// them alike.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryCounts {
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
    /// Deliveries of any window (warm-up included), first copies only.
    pub received_total: u64,
    /// Long-poll answers with `"reset": true`.
    pub poll_resets: u64,
    /// Long-poll reconnects after the server closed a kept-alive connection.
    pub poll_reconnects: u64,
    /// Subscribers that lost their connection during the run, by reason.
    pub disconnects: BTreeMap<String, u64>,
}

impl DeliveryCounts {
    /// Adds another process's counters.
    pub fn merge(&mut self, o: &DeliveryCounts) {
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
    }
}

/// What one process's subscribers received: the counters, the latency histogram and
/// the process's own cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    /// The counters (flattened: a worker's JSON line names them at the top level).
    #[serde(flatten)]
    pub counts: DeliveryCounts,
    /// Publish→receive latency, µs (encoded histogram), measured window only.
    pub latency_hist: String,
    /// The same by transport, when subscribers mix transports (empty otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_hist_by_transport: BTreeMap<String, String>,
    /// When the latest delivery of the measured window arrived, µs since the Unix
    /// epoch (0: none did); gives the delivered rate.
    #[serde(default)]
    pub last_receive_us: u64,
    /// CPU seconds used by the load generator process(es).
    pub loadgen_cpu_secs: f64,
    /// Resident memory of the load generator process(es), KiB (summed).
    pub loadgen_rss_kib: u64,
    /// Seconds the load generator's threads waited for a CPU (summed).
    #[serde(default)]
    pub loadgen_runq_wait_secs: f64,
    /// Number of load generator processes that reported.
    pub loadgen_processes: u64,
}

impl DeliveryReport {
    /// Adds another process's report.
    pub fn merge(&mut self, o: &DeliveryReport) -> Result<()> {
        self.counts.merge(&o.counts);
        self.latency_hist = merge_histograms(&self.latency_hist, &o.latency_hist)?;
        for (t, h) in &o.latency_hist_by_transport {
            let mine = self.latency_hist_by_transport.entry(t.clone()).or_default();
            *mine = merge_histograms(mine, h)?;
        }
        self.last_receive_us = self.last_receive_us.max(o.last_receive_us);
        self.loadgen_cpu_secs += o.loadgen_cpu_secs;
        self.loadgen_rss_kib += o.loadgen_rss_kib;
        self.loadgen_runq_wait_secs += o.loadgen_runq_wait_secs;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::histogram::{decode_histogram, encode_histogram, new_histogram};

    #[test]
    fn reports_merge() {
        let mut h = new_histogram();
        h.record(1500).unwrap();
        let one = DeliveryReport {
            counts: DeliveryCounts {
                connected_at_end: 10,
                expected: 100,
                received: 99,
                missing: 1,
                duplicates: 2,
                disconnects: BTreeMap::from([("eof".to_owned(), 1)]),
                ..Default::default()
            },
            latency_hist: encode_histogram(&h),
            loadgen_cpu_secs: 0.5,
            loadgen_processes: 1,
            ..Default::default()
        };
        let one = DeliveryReport {
            latency_hist_by_transport: BTreeMap::from([("ws".to_owned(), encode_histogram(&h))]),
            ..one
        };
        let mut total = DeliveryReport::default();
        total.merge(&one).unwrap();
        total.merge(&one).unwrap();
        assert_eq!(decode_histogram(&total.latency_hist_by_transport["ws"]).unwrap().len(), 2);
        let counts = &total.counts;
        assert_eq!(
            (counts.connected_at_end, counts.expected, counts.received, counts.missing),
            (20, 200, 198, 2)
        );
        assert_eq!(counts.duplicates, 4);
        assert_eq!(counts.disconnects["eof"], 2);
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

    /// The summary's `delivery` object and a worker's result line name the counters as
    /// they did when each struct had its own copy of them, in the same order.
    #[test]
    fn counters_keep_their_json_names() {
        let counters = [
            "connected_at_end",
            "expected",
            "received",
            "missing",
            "duplicates",
            "reordered",
            "unexpected",
            "bad_payload",
            "received_total",
            "poll_resets",
            "poll_reconnects",
            "disconnects",
        ];
        let keys = |json: &str| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let mut keys: Vec<(usize, String)> = v
                .as_object()
                .unwrap()
                .keys()
                .map(|k| (json.find(&format!("\"{k}\":")).unwrap(), k.clone()))
                .collect();
            keys.sort();
            keys.into_iter().map(|(_, k)| k).collect()
        };
        let summary = serde_json::to_string(&DeliveryCounts::default()).unwrap();
        assert_eq!(keys(&summary), counters);
        let report = DeliveryReport { loadgen_processes: 1, ..Default::default() };
        let line = serde_json::to_string(&report).unwrap();
        let mut want: Vec<&str> = counters.to_vec();
        want.extend([
            "latency_hist",
            "last_receive_us",
            "loadgen_cpu_secs",
            "loadgen_rss_kib",
            "loadgen_runq_wait_secs",
            "loadgen_processes",
        ]);
        assert_eq!(keys(&line), want);
        let back: DeliveryReport = serde_json::from_str(&line).unwrap();
        assert_eq!(back, report);
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
