//! Flags of `loadgen run`, and the choices they take (transport, server, publish path).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Which wire protocol the subscribers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Server-Sent Events: `GET /sse?channel=…`.
    Sse,
    /// WebSocket: `GET /ws?channel=…`, JSON frames.
    Ws,
    /// Long-poll: `GET /poll?channel=…&cursor=…`.
    Poll,
}

impl Transport {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::Poll => "poll",
        }
    }
}

/// Which server the run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    /// This project's gateway: `/sse`, `/ws`, `/poll`, JSON frames, `POST /publish/{channel}`.
    Gateway,
    /// Nchan: every transport on [`NCHAN_SUB_PATH`]`?channel=…` with the raw message as
    /// the SSE `data:`, the WebSocket text frame or the long-poll body; publishing is
    /// `POST` [`NCHAN_PUB_PATH`]`?channel=…` with the raw payload.
    Nchan,
}

impl ServerKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Gateway => "gateway",
            ServerKind::Nchan => "nchan",
        }
    }
}

/// Nchan's subscriber location (after the `--url` path), as in `loadtest/nchan/nginx.conf`.
pub const NCHAN_SUB_PATH: &str = "/sub";
/// Nchan's publisher location (after the `--url` path).
pub const NCHAN_PUB_PATH: &str = "/pub";

/// How messages are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    /// `PUBLISH <channel> <payload>` on Redis.
    Redis,
    /// `POST /publish/{channel}` on the gateway (`POST /pub?channel=…` on Nchan): one
    /// request per message.
    Http,
    /// One streaming request per channel for the whole run (token streams): a chunked
    /// `POST /publish/{channel}?stream=lines` (or `=sse`) whose body gets each message as
    /// it is due; the gateway publishes every line as it arrives and answers
    /// `{"published":N,...}` when the body ends.
    Stream,
    /// Publish nothing (connect and hold only).
    None,
}

impl PublishVia {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishVia::Redis => "redis",
            PublishVia::Http => "http",
            PublishVia::Stream => "stream",
            PublishVia::None => "none",
        }
    }
}

/// How a streaming publish request's body carries messages (`--publish stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    /// `?stream=lines`: one message per `\n`-terminated line.
    Lines,
    /// `?stream=sse`: one message per SSE event (`data: …` and a blank line).
    Sse,
}

impl StreamFormat {
    /// Lower-case name, as in the `stream=` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamFormat::Lines => "lines",
            StreamFormat::Sse => "sse",
        }
    }
}

/// Flags of `loadgen run`.
#[derive(Debug, Clone, Args, Serialize)]
#[command(args_override_self = true)]
pub struct RunArgs {
    /// Gateway base URL (must be a loopback address), or several separated by commas
    /// (a cluster): subscriber i connects to URL i % n; HTTP publishing uses the first.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Which server is at --url: the gateway, or Nchan for comparisons (then publish with
    /// --publish http).
    #[arg(long, value_enum, default_value_t = ServerKind::Gateway)]
    pub server: ServerKind,
    /// Subscriber transport, or several separated by commas (e.g. `ws,sse`): subscriber
    /// i, watcher w = i / channels of channel c = i % channels, uses the (c + w)-th of
    /// them (round-robin), so channels and the watchers of each channel are mixed.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ws")]
    pub transport: Vec<Transport>,
    /// Number of subscribers (connections), in total across workers.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Number of channels; subscriber i subscribes to channel i % channels.
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Messages per second, in total across all channels (round-robin). 0 = idle run.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Measured window in seconds (after --warmup).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of publishing before the measured window (not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Size of each published payload in bytes (padded JSON-ish text).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// How to publish.
    #[arg(long, value_enum, default_value_t = PublishVia::Redis)]
    pub publish: PublishVia,
    /// Body format of the streaming requests (with --publish stream).
    #[arg(long, value_enum, default_value_t = StreamFormat::Lines)]
    pub stream_format: StreamFormat,
    /// Redis to PUBLISH on (with --publish redis; must be a loopback address).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// API key for `POST /publish` (with --publish http or stream), sent as `X-API-Key`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most connection attempts in flight at once (in total across workers).
    #[arg(long, default_value_t = 500)]
    pub connect_concurrency: usize,
    /// Seconds one connection may take to connect and confirm its subscription.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds the whole connect phase may take; attempts still waiting then fail.
    #[arg(long, default_value_t = 180.0)]
    pub connect_phase_timeout: f64,
    /// Local addresses to connect from, e.g. `127.0.0.2-127.0.0.20` or `127.0.0.2,127.0.0.3`
    /// (bound with IP_BIND_ADDRESS_NO_PORT; each gives its own ~28k ephemeral ports).
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Server process to measure (CPU time and RSS from /proc); repeatable.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Seconds to wait after connecting before the idle RSS sample and publishing.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Seconds to wait after publishing for the last deliveries to arrive.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Long-poll hold time asked of the server, in seconds.
    #[arg(long, default_value_t = 25)]
    pub poll_timeout: u64,
    /// Most publishes in flight at once.
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: usize,
    /// Channel name prefix (channels are `<prefix>-<index>`); default `lg<pid>`.
    #[arg(long)]
    pub channel_prefix: Option<String>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Worker processes to spread subscribers over (each holds at most 19,000 sockets).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Runtime threads per process (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Internal: this process is worker number N of --workers (set by the parent).
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
}
