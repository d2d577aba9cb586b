//! Metric names and the Prometheus recorder. Names follow
//! `gateway_<name>_<unit>[_total]`; label values come from small fixed sets (transport,
//! reason, result) and never from channel names or users.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open client connections (gauge), by `transport`.
pub const CONNECTIONS: &str = "gateway_connections";
/// Client connections accepted (counter), by `transport`.
pub const CONNECTIONS_TOTAL: &str = "gateway_connections_total";
/// Client disconnects (counter), by `transport` and `reason`.
pub const DISCONNECTS_TOTAL: &str = "gateway_disconnects_total";
/// Messages received from the broker (counter).
pub const BROKER_MESSAGES_TOTAL: &str = "gateway_broker_messages_received_total";
/// Messages handed to client queues (counter), by `transport`.
pub const DELIVERIES_TOTAL: &str = "gateway_deliveries_total";
/// Messages not delivered (counter), by `reason`.
pub const DROPPED_TOTAL: &str = "gateway_dropped_messages_total";
/// Clients disconnected because they fell behind (counter), by `transport`: their queue
/// overflowed, or a write to them made no progress for an interval (`write_stall`).
pub const SLOW_CONSUMER_TOTAL: &str = "gateway_slow_consumer_disconnects_total";
/// Channels with local interest (gauge).
pub const CHANNELS: &str = "gateway_channels";
/// Channel subscriptions of local clients (gauge).
pub const SUBSCRIPTIONS: &str = "gateway_subscriptions";
/// Broker link state, 1 up / 0 down (gauge).
pub const BROKER_LINK_UP: &str = "gateway_broker_link_up";
/// Broker reconnects after a lost link (counter).
pub const BROKER_RECONNECTS_TOTAL: &str = "gateway_broker_reconnects_total";
/// Whole seconds the broker link was down (counter).
pub const BROKER_OUTAGE_SECONDS: &str = "gateway_broker_outage_seconds_total";
/// Publish requests (counter), by `result`.
pub const PUBLISH_TOTAL: &str = "gateway_publish_requests_total";
/// History recoveries (client resumes and link restores) (counter), by `result`
/// (`replayed`, `reset`, `error`).
pub const RECOVERIES_TOTAL: &str = "gateway_history_recoveries_total";
/// Messages replayed from history (counter).
pub const REPLAYED_TOTAL: &str = "gateway_history_replayed_messages_total";
/// Gap notices (`reset`) sent to clients (counter), by `transport`.
pub const RESETS_TOTAL: &str = "gateway_resets_total";
/// Time from publish (Redis clock, history messages) to this node handing the message
/// to its subscribers' queues (histogram, explicit buckets).
pub const DISPATCH_LATENCY: &str = "gateway_publish_to_dispatch_seconds";
/// Buckets of [`DISPATCH_LATENCY`], in seconds.
pub const DISPATCH_LATENCY_BUCKETS: [f64; 13] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// History publishes taken from the publish queue at once (histogram, explicit
/// buckets): how much the queue batches under load. One pipeline on one Redis; on a
/// cluster the batch is split into one pipeline per slot.
pub const PUBLISH_BATCH: &str = "gateway_publish_batch_messages";
/// Buckets of [`PUBLISH_BATCH`], in messages.
pub const PUBLISH_BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Subscriber authentication failures (counter), by `reason`.
pub const AUTH_FAILURES_TOTAL: &str = "gateway_auth_failures_total";
/// Requests refused for bad input (counter), by `reason`.
pub const REJECTED_TOTAL: &str = "gateway_rejected_requests_total";
/// Connections or requests refused, or clients cut off, by a configured limit (counter),
/// by `limit`: `max_connections`, `connect_rate`, `publish_rate`, `queue_messages`,
/// `queue_bytes`, `demo_streams`, `body_bytes`, `poll_channels`, `write_stall` (a write
/// that took no byte for an interval: the client stopped reading), `resumes`.
pub const LIMIT_REJECTIONS_TOTAL: &str = "gateway_limit_rejections_total";
/// The values of `limit` on [`LIMIT_REJECTIONS_TOTAL`].
pub const LIMITS: [&str; 10] = [
    "max_connections",
    "connect_rate",
    "publish_rate",
    "queue_messages",
    "queue_bytes",
    "demo_streams",
    "body_bytes",
    "poll_channels",
    "write_stall",
    "resumes",
];

/// The kind of a client connection: the value of the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// Server-Sent Events.
    Sse = 0,
    /// WebSocket.
    Ws = 1,
    /// HTTP long-poll.
    Poll = 2,
}

impl ConnKind {
    /// Every kind, in label order (index = the discriminant).
    pub const ALL: [ConnKind; 3] = [Self::Sse, Self::Ws, Self::Poll];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Ws => "ws",
            Self::Poll => "poll",
        }
    }
}

/// Installs the global Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(DISPATCH_LATENCY.to_owned()), &DISPATCH_LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .set_buckets_for_metric(Matcher::Full(PUBLISH_BATCH.to_owned()), &PUBLISH_BATCH_BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours just stays empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            register_known_series();
            handle
        })
        .clone()
}

/// Registers every series with a known, fixed label set at zero, so `rate()` and
/// `increase()` see their first increment and dashboards show 0 instead of no data.
fn register_known_series() {
    use metrics::{counter, gauge};
    const DISCONNECT_REASONS: [&str; 6] =
        ["client_closed", "slow_consumer", "shutdown", "timeout", "protocol_error", "server_closed"];
    const REJECT_REASONS: [&str; 14] = [
        "bad_request",
        "invalid_channel",
        "invalid_event",
        "too_many_channels",
        "payload_too_large",
        "unknown_op",
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "broker_unavailable",
        "over_capacity",
        "rate_limited",
        "request_timeout",
    ];
    for t in ConnKind::ALL.map(ConnKind::as_str) {
        gauge!(CONNECTIONS, "transport" => t).increment(0.0);
        counter!(CONNECTIONS_TOTAL, "transport" => t).increment(0);
        counter!(RESETS_TOTAL, "transport" => t).increment(0);
        for r in DISCONNECT_REASONS {
            counter!(DISCONNECTS_TOTAL, "transport" => t, "reason" => r).increment(0);
        }
    }
    for r in REJECT_REASONS {
        counter!(REJECTED_TOTAL, "reason" => r).increment(0);
    }
    for r in ["ok", "duplicate", "rejected", "broker_error"] {
        counter!(PUBLISH_TOTAL, "result" => r).increment(0);
    }
    for r in ["replayed", "reset", "error"] {
        counter!(RECOVERIES_TOTAL, "result" => r).increment(0);
    }
    for r in [
        "missing",
        "malformed",
        "algorithm",
        "expired",
        "not_yet_valid",
        "invalid_signature",
        "wrong_audience",
        "wrong_issuer",
        "channel_not_allowed",
    ] {
        counter!(AUTH_FAILURES_TOTAL, "reason" => r).increment(0);
    }
    for l in LIMITS {
        counter!(LIMIT_REJECTIONS_TOTAL, "limit" => l).increment(0);
    }
    counter!(REPLAYED_TOTAL).increment(0);
    counter!(BROKER_RECONNECTS_TOTAL).increment(0);
    counter!(BROKER_OUTAGE_SECONDS).increment(0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(CONNECTIONS, "Open client connections by transport.");
    describe_counter!(CONNECTIONS_TOTAL, "Client connections accepted by transport.");
    describe_counter!(DISCONNECTS_TOTAL, "Client disconnects by transport and reason.");
    describe_counter!(BROKER_MESSAGES_TOTAL, "Messages received from the broker.");
    describe_counter!(DELIVERIES_TOTAL, "Messages handed to client queues by transport.");
    describe_counter!(DROPPED_TOTAL, "Messages not delivered, by reason.");
    describe_counter!(
        SLOW_CONSUMER_TOTAL,
        "Clients disconnected because they fell behind: queue overflow or a stalled write."
    );
    describe_gauge!(CHANNELS, "Channels with local subscribers (or lingering).");
    describe_gauge!(SUBSCRIPTIONS, "Channel subscriptions held by local clients.");
    describe_gauge!(BROKER_LINK_UP, "1 while the broker link is up, 0 while down.");
    describe_counter!(BROKER_RECONNECTS_TOTAL, "Broker reconnects after a lost link.");
    describe_counter!(BROKER_OUTAGE_SECONDS, "Seconds the broker link was down.");
    describe_counter!(PUBLISH_TOTAL, "Publish requests by result.");
    describe_counter!(RECOVERIES_TOTAL, "History recoveries by result.");
    describe_counter!(REPLAYED_TOTAL, "Messages replayed from history.");
    describe_counter!(RESETS_TOTAL, "Gap notices sent to clients.");
    metrics::describe_histogram!(
        DISPATCH_LATENCY,
        metrics::Unit::Seconds,
        "Publish (Redis clock) to dispatch on this node, history messages."
    );
    metrics::describe_histogram!(
        PUBLISH_BATCH,
        metrics::Unit::Count,
        "History publishes taken from the publish queue at once (one pipeline on one Redis, one per slot on a cluster)."
    );
    describe_counter!(AUTH_FAILURES_TOTAL, "Subscriber authentication failures by reason.");
    describe_counter!(REJECTED_TOTAL, "Requests refused for bad input, by reason.");
    describe_counter!(
        LIMIT_REJECTIONS_TOTAL,
        "Connections, requests or clients refused or cut off by a limit."
    );
}
