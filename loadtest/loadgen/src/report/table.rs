//! The summary printed as a table.

use std::{collections::BTreeMap, fmt::Write as _};

use super::summary::Summary;

impl Summary {
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
            let streams = if c.publish == "stream" {
                format!(" ({} streaming requests of {} msg/s)", c.channels, c.rate / c.channels as f64)
            } else {
                String::new()
            };
            let _ = writeln!(
                w,
                "loadgen{who}: {} × {} on {} channels, {} msg/s for {}s (+{}s warm-up), {}-byte payloads, publish via {}{streams}, {} worker(s)",
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
            if let Some(st) = &p.streams {
                let _ = writeln!(
                    w,
                    "  streams       {} requests: {} answered 200 with published = sent, {} not; tokens sent {}, published {}",
                    st.requests, st.ok, st.not_ok, st.sent, st.published
                );
                for a in st.answers.iter().filter(|a| !a.is_ok()).take(3) {
                    let _ = writeln!(
                        w,
                        "  stream {}  status {}  error {}  message {:?}  published {} of {} sent",
                        a.channel,
                        a.status.map_or("none".into(), |s| s.to_string()),
                        a.error.as_deref().unwrap_or("-"),
                        a.message.as_deref().unwrap_or(""),
                        a.published.map_or("-".into(), |n| n.to_string()),
                        a.sent
                    );
                }
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
            for (t, l) in &self.latency_ms_by_transport {
                let _ = writeln!(
                    w,
                    "  latency {t:<5} p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}  (n={})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
                );
            }
        }
        if let Some(t) = &self.throughput {
            let _ = writeln!(
                w,
                "  throughput    published {:.1} msg/s (acknowledged); delivered {:.1}/s in the window (last delivery {:.2}s after it began)",
                t.published_per_sec, t.delivered_per_sec, t.delivery_span_secs
            );
        }
        let s = &self.server;
        for p in &s.processes {
            let _ = writeln!(
                w,
                "  server {:>7}  {}{}: cpu {:.2}s in window ({:.2} cores{}, waited {:.2}s for a cpu), {:.2}s while connecting; rss before {:.1} MiB  idle {:.1} MiB  after {:.1} MiB{}",
                p.pid,
                p.name.as_deref().unwrap_or("?"),
                if p.exited { " (EXITED during the run)" } else { "" },
                p.cpu_secs_measured,
                if s.measured_window_secs > 0.0 { p.cpu_secs_measured / s.measured_window_secs } else { 0.0 },
                p.cpu_us_per_message.map(|u| format!(", {u:.2} µs/msg")).unwrap_or_default(),
                p.runq_wait_secs_measured,
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
                "  server total  cpu {:.2}s over {:.1}s{}{}; rss {:+.1} MiB for {} connections{}",
                s.cpu_secs_measured,
                s.measured_window_secs,
                s.cpu_us_per_delivery.map(|u| format!(" = {u:.2} µs/delivery")).unwrap_or_default(),
                s.cpu_us_per_message.map(|u| format!(", {u:.2} µs/msg")).unwrap_or_default(),
                (s.rss_idle_kib as f64 - s.rss_before_kib as f64) / 1024.0,
                self.connect.ok,
                s.kib_per_connection.map(|k| format!(" = {k:.2} KiB/conn")).unwrap_or_default()
            );
        }
        let _ = writeln!(
            w,
            "  loadgen       {} process(es), cpu {:.2}s (waited {:.2}s for a cpu), rss {:.1} MiB",
            self.loadgen.processes,
            self.loadgen.cpu_secs,
            self.loadgen.runq_wait_secs,
            mib(self.loadgen.rss_kib)
        );
        let _ = writeln!(w, "  result        {}", if self.clean { "CLEAN" } else { "NOT CLEAN (see above)" });
        o
    }
}

fn fmt_counts(m: &BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}
