//! Command line, and the checks that keep a run on this machine and within its limits.
//!
//! `--server nchan` points the same run at an Nchan server (nginx with the Nchan module,
//! `loadtest/nchan/nginx.conf`) instead of the gateway, for side-by-side comparisons.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{
    fdlimit::MAX_SUBSCRIBERS_PER_PROCESS,
    loopback::{check_redis_url, parse_gateway_url, source_ips},
};

/// Most worker processes.
pub const MAX_WORKERS: usize = 64;
/// Most messages one run may schedule (bounds the publisher loop and the seq bitsets).
pub const MAX_MESSAGES: u64 = 100_000_000;
/// Most bytes all subscribers of one process may spend on their seen-seq bitsets.
const MAX_BITSET_BYTES: u64 = 4 << 30;

/// The load generator's command line.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about = "Load generator for the fan-out gateway")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open subscribers, publish open-loop at a fixed rate, report latency, losses and server cost.
    Run(Box<RunArgs>),
    /// Measure this machine's floor without a server: the kernel's cost of a fan-out
    /// write and of an accepted connection (see `loadtest/RESULTS.md`).
    #[command(subcommand)]
    Floor(crate::floor::FloorCommand),
}

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
    /// `POST /publish/{channel}` on the gateway (`POST /pub?channel=…` on Nchan).
    Http,
    /// Publish nothing (connect and hold only).
    None,
}

impl PublishVia {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishVia::Redis => "redis",
            PublishVia::Http => "http",
            PublishVia::None => "none",
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
    /// Subscriber transport.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
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
    /// Redis to PUBLISH on (with --publish redis; must be a loopback address).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// API key for `POST /publish` (with --publish http), sent as `X-API-Key`.
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

/// What this process is in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One process does everything.
    Single,
    /// Publishes and measures; subscribers live in worker processes.
    Parent,
    /// Holds a share of the subscribers; driven by the parent over stdin/stdout.
    Worker(usize),
}

/// One server node subscribers connect to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its address.
    pub dest: SocketAddr,
    /// `Host` header value.
    pub host_header: String,
    /// Path prefix, without a trailing slash (usually empty).
    pub base_path: String,
}

/// Checked settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The flags as given.
    pub args: RunArgs,
    /// This process's role.
    pub role: Role,
    /// `Host` header value.
    pub host_header: String,
    /// Path prefix of the gateway URL, without a trailing slash (usually empty).
    pub base_path: String,
    /// Every node of `--url` (the first gives `host_header` and `base_path`).
    pub targets: Vec<Target>,
    /// Source addresses to spread connections over (empty: let the kernel choose).
    pub source_ips: Vec<Ipv4Addr>,
    /// Channel name prefix.
    pub prefix: String,
    /// First seq of the measured window.
    pub measure_from: u64,
    /// Number of messages the publisher schedules (seqs `0..total_messages`).
    pub total_messages: u64,
}

impl Settings {
    /// The node subscriber `g` connects to.
    pub fn target(&self, g: u64) -> &Target {
        &self.targets[g as usize % self.targets.len()]
    }

    /// Checks the flags and derives the run's settings.
    pub fn from_args(args: RunArgs) -> Result<Self> {
        let a = &args;
        ensure!(a.subscribers > 0, "--subscribers must be at least 1");
        ensure!(a.channels > 0, "--channels must be at least 1");
        ensure!(a.rate.is_finite() && a.rate >= 0.0 && a.rate <= 1_000_000.0, "--rate must be 0..=1000000");
        ensure!(
            a.duration.is_finite() && a.duration > 0.0 && a.duration <= 86_400.0,
            "--duration must be in (0, 86400]"
        );
        ensure!(
            a.warmup.is_finite() && a.warmup >= 0.0 && a.warmup <= 3600.0,
            "--warmup must be in [0, 3600]"
        );
        for (name, v, max) in [
            ("--settle", a.settle, 600.0),
            ("--drain", a.drain, 600.0),
            ("--connect-timeout", a.connect_timeout, 600.0),
            ("--connect-phase-timeout", a.connect_phase_timeout, 3600.0),
        ] {
            ensure!(v.is_finite() && v >= 0.0 && v <= max, "{name} must be in [0, {max}]");
        }
        ensure!(a.connect_timeout > 0.0, "--connect-timeout must be positive");
        ensure!(a.payload_bytes <= 1 << 20, "--payload-bytes must be at most 1 MiB");
        ensure!(a.connect_concurrency > 0, "--connect-concurrency must be at least 1");
        ensure!(a.max_inflight > 0, "--max-inflight must be at least 1");
        ensure!((1..=600).contains(&a.poll_timeout), "--poll-timeout must be 1..=600");
        ensure!((1..=MAX_WORKERS).contains(&a.workers), "--workers must be 1..={MAX_WORKERS}");
        if let Some(t) = a.threads {
            ensure!((1..=256).contains(&t), "--threads must be 1..=256");
        }
        let per_process = a.subscribers.div_ceil(a.workers);
        if per_process > MAX_SUBSCRIBERS_PER_PROCESS {
            bail!(
                "{} subscribers in {} process(es) is {per_process} sockets per process, over the limit of \
                 {MAX_SUBSCRIBERS_PER_PROCESS} (the hard open-file limit is 20,000 per process): \
                 use --workers {} or more",
                a.subscribers,
                a.workers,
                a.subscribers.div_ceil(MAX_SUBSCRIBERS_PER_PROCESS)
            );
        }
        let role = match a.worker_index {
            Some(i) => {
                ensure!(a.workers > 1 && i < a.workers, "--worker-index must be below --workers");
                Role::Worker(i)
            }
            None if a.workers > 1 => Role::Parent,
            None => Role::Single,
        };

        let targets = a
            .url
            .split(',')
            .map(|u| {
                parse_gateway_url(u.trim()).map(|(dest, host_header, base_path)| Target {
                    dest,
                    host_header,
                    base_path,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let Target { host_header, base_path, .. } = targets[0].clone();
        let source_ips = source_ips(a.source_ips.as_deref())?;
        ensure!(
            source_ips.is_empty() || targets.iter().all(|t| t.dest.is_ipv4()),
            "--source-ips are IPv4 addresses, so --url must be an IPv4 loopback address"
        );
        let publishing = a.rate > 0.0 && a.publish != PublishVia::None;
        if a.server == ServerKind::Nchan && publishing {
            ensure!(
                a.publish == PublishVia::Http,
                "Nchan is published to over HTTP (POST {NCHAN_PUB_PATH}?channel=…): use --publish http"
            );
        }
        if a.publish == PublishVia::Redis && !matches!(role, Role::Worker(_)) {
            check_redis_url(&a.redis_url)?;
        }
        let prefix = match &a.channel_prefix {
            Some(p) => {
                ensure!(
                    !p.is_empty()
                        && p.len() <= 64
                        && !p.starts_with("__")
                        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)),
                    "--channel-prefix must be 1-64 letters, digits, '_', '-' or '.', not starting with '__'"
                );
                p.clone()
            }
            None => format!("lg{}", std::process::id()),
        };
        let (measure_from, total_messages) = if publishing {
            (message_count(a.warmup, a.rate), message_count(a.warmup + a.duration, a.rate))
        } else {
            (0, 0)
        };
        ensure!(
            total_messages <= MAX_MESSAGES,
            "--rate × (--warmup + --duration) schedules {total_messages} messages; the limit is {MAX_MESSAGES}"
        );
        let bitset_bytes = per_process as u64 * (total_messages / a.channels as u64 + 64) / 8;
        ensure!(
            bitset_bytes <= MAX_BITSET_BYTES,
            "tracking {total_messages} messages for {per_process} subscribers needs {} MiB per process; \
             use more --channels, a lower --rate or a shorter --duration",
            bitset_bytes >> 20
        );
        Ok(Self {
            args,
            role,
            host_header,
            base_path,
            targets,
            source_ips,
            prefix,
            measure_from,
            total_messages,
        })
    }

    /// Whether this run publishes.
    pub fn publishing(&self) -> bool {
        self.total_messages > 0
    }

    /// Name of channel `idx`.
    pub fn channel_name(&self, idx: u64) -> String {
        format!("{}-{idx}", self.prefix)
    }

    /// Longest the whole run may take; past it the run stops itself.
    pub fn hard_limit(&self) -> Duration {
        let a = &self.args;
        Duration::from_secs_f64(
            a.connect_phase_timeout + a.connect_timeout + a.settle + a.warmup + a.duration + a.drain + 60.0,
        )
    }
}

/// Number of messages scheduled in the first `secs` seconds at `rate` (seq k is due at k/rate).
pub fn message_count(secs: f64, rate: f64) -> u64 {
    if rate <= 0.0 || secs <= 0.0 {
        return 0;
    }
    // Round away float noise so 1.0 s at 50/s is exactly 50.
    let n = secs * rate;
    let r = n.round();
    if (n - r).abs() < 1e-6 { r as u64 } else { n.ceil() as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_counts() {
        assert_eq!(message_count(1.0, 50.0), 50);
        assert_eq!(message_count(0.1 + 0.2, 10.0), 3);
        assert_eq!(message_count(0.25, 10.0), 3);
        assert_eq!(message_count(5.0, 0.0), 0);
    }

    fn settings(args: &[&str]) -> Result<Settings> {
        let Cli { command: Command::Run(a) } =
            Cli::try_parse_from(["loadgen", "run"].iter().chain(args)).expect("valid flags")
        else {
            unreachable!("a run")
        };
        Settings::from_args(*a)
    }

    #[test]
    fn nchan_is_published_to_over_http() {
        assert_eq!(settings(&[]).unwrap().args.server, ServerKind::Gateway);
        let err = settings(&["--server", "nchan", "--rate", "10"]).unwrap_err().to_string();
        assert!(err.contains("--publish http"), "{err}");
        assert!(settings(&["--server", "nchan", "--rate", "10", "--publish", "http"]).is_ok());
        // Idle runs publish nothing (beyond long-poll's marker, always over HTTP).
        assert!(settings(&["--server", "nchan", "--rate", "0"]).is_ok());
    }
}
