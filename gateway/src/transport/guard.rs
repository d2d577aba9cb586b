//! Connection accounting: the node's connection cap, and a guard that counts a client
//! connection in `gateway_connections{transport}` while it lives and in
//! `gateway_disconnects_total{transport,reason}` when it ends.

use metrics::{counter, gauge};

use crate::{error::ApiError, metrics::ConnKind};

/// Counts a client connection while it lives, and why it ended.
#[derive(Debug)]
pub struct ConnGuard {
    kind: ConnKind,
    reason: &'static str,
}

/// Client connections open in this process, for the connection cap.
static OPEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Refuses a new client connection when the node holds `max` already (0: no cap), so
/// an overloaded node sheds load to its peers instead of running out of descriptors.
pub fn admit(max: usize) -> Result<(), ApiError> {
    if max > 0 && OPEN.load(std::sync::atomic::Ordering::Relaxed) >= max {
        counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "max_connections").increment(1);
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            shared::protocol::error_code::OVER_CAPACITY,
            format!("this node holds its maximum of {max} connections; retry or use another node"),
        ));
    }
    Ok(())
}

/// Why connections end: the label values of `gateway_disconnects_total{reason}`.
const REASONS: [&str; 7] = [
    "client_closed",
    "slow_consumer",
    "shutdown",
    "timeout",
    "token_expired",
    "protocol_error",
    "server_closed",
];

/// The connection metrics' handles, looked up once: the `gauge!`/`counter!` macros
/// build a key (allocating its labels) and search the registry on every call, which
/// was 8 of a new connection's ~86 allocations.
struct ConnMetrics {
    open: [metrics::Gauge; ConnKind::ALL.len()],
    opened: [metrics::Counter; ConnKind::ALL.len()],
    closed: [[metrics::Counter; REASONS.len()]; ConnKind::ALL.len()],
}

fn conn_metrics() -> &'static ConnMetrics {
    static M: std::sync::OnceLock<ConnMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let t = |i: usize| ConnKind::ALL[i].as_str();
        ConnMetrics {
            open: std::array::from_fn(|i| gauge!(crate::metrics::CONNECTIONS, "transport" => t(i))),
            opened: std::array::from_fn(|i| counter!(crate::metrics::CONNECTIONS_TOTAL, "transport" => t(i))),
            closed: std::array::from_fn(|i| {
                std::array::from_fn(|r| {
                    counter!(crate::metrics::DISCONNECTS_TOTAL, "transport" => t(i), "reason" => REASONS[r])
                })
            }),
        }
    })
}

impl ConnGuard {
    /// Counts a new connection.
    pub fn new(kind: ConnKind) -> Self {
        OPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let m = conn_metrics();
        m.open[kind as usize].increment(1.0);
        m.opened[kind as usize].increment(1);
        Self { kind, reason: "client_closed" }
    }

    /// Records why the connection ends (one of a small fixed set: `client_closed`,
    /// `slow_consumer`, `shutdown`, `timeout`, `token_expired`, `protocol_error`,
    /// `server_closed`).
    pub fn set_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let m = conn_metrics();
        let t = self.kind as usize;
        m.open[t].decrement(1.0);
        match REASONS.iter().position(|r| *r == self.reason) {
            Some(r) => m.closed[t][r].increment(1),
            None => counter!(crate::metrics::DISCONNECTS_TOTAL, "transport" => self.kind.as_str(), "reason" => self.reason)
                .increment(1),
        }
    }
}
