//! What one process's subscribers share: the run's settings, the connect limiter, the
//! stop signal and the latency histograms, and the path every delivery takes into them.

use std::{
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::tracker::{Seen, Tracker};
use crate::{
    cli::{Settings, Transport},
    payload,
    report::MAX_LATENCY_US,
};

/// Latency histograms are sharded to keep lock contention low.
pub(super) const HIST_SHARDS: usize = 32;

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by one process's subscribers.
pub(super) struct Shared {
    pub(super) s: Settings,
    pub(super) channels: u64,
    pub(super) sem: Semaphore,
    pub(super) stop: CancellationToken,
    /// `HIST_SHARDS` histograms per transport in use (in [`Shared::transports`] order).
    pub(super) hists: Vec<Mutex<Histogram<u64>>>,
    /// The distinct transports in use (one when subscribers do not mix them).
    pub(super) transports: Vec<Transport>,
    pub(super) in_window: AtomicU64,
    /// Receive time (µs since the epoch) of the latest measured first copy.
    pub(super) last_rx_us: AtomicU64,
    pub(super) poll_resets: AtomicU64,
    pub(super) poll_reconnects: AtomicU64,
}

impl Shared {
    /// Which transport's histograms subscriber `g`'s deliveries go to.
    fn hist_group(&self, g: u64) -> usize {
        if self.transports.len() == 1 {
            return 0;
        }
        let t = self.s.transport(g);
        self.transports.iter().position(|&x| x == t).unwrap_or(0)
    }

    /// The latency histograms of transport group `i`.
    pub(super) fn group_hists(&self, i: usize) -> &[Mutex<Histogram<u64>>] {
        &self.hists[i * HIST_SHARDS..(i + 1) * HIST_SHARDS]
    }

    pub(super) fn deliver(&self, g: u64, tr: &Mutex<Tracker>, data: &str, now: u64) {
        let Some(p) = payload::decode(data) else {
            if data != payload::NCHAN_MARKER {
                lock(tr).bad_payload += 1;
            }
            return;
        };
        let seen = lock(tr).record(p, self.channels, self.s.total_messages);
        if seen == Seen::New && p.seq >= self.s.measure_from {
            self.in_window.fetch_add(1, Relaxed);
            self.last_rx_us.fetch_max(now, Relaxed);
            let us = now.saturating_sub(p.t_us).clamp(1, MAX_LATENCY_US);
            lock(&self.hists[self.hist_group(g) * HIST_SHARDS + g as usize % HIST_SHARDS])
                .saturating_record(us);
        }
    }
}
