//! Checked settings of a run: the flags validated against this machine's limits, and
//! what follows from them (role, targets, source addresses, the message schedule).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail, ensure};

use super::run_args::{NCHAN_PUB_PATH, PublishVia, RunArgs, ServerKind, Transport};
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
        ensure!(!a.transport.is_empty(), "--transport needs at least one transport");
        if a.publish == PublishVia::Stream {
            ensure!(
                a.server == ServerKind::Gateway,
                "Nchan has no streaming publish: publish to it with --publish http (one POST per message)"
            );
            // The parent (or single process) holds one request per channel.
            let own = a.channels + if a.workers == 1 { a.subscribers } else { 0 };
            ensure!(
                own <= MAX_SUBSCRIBERS_PER_PROCESS,
                "--publish stream holds one request per channel: {} channels{} is {own} sockets in one \
                 process, over the limit of {MAX_SUBSCRIBERS_PER_PROCESS}{}",
                a.channels,
                if a.workers == 1 { format!(" + {} subscribers", a.subscribers) } else { String::new() },
                if a.workers == 1 {
                    ": use --workers 2 or more (subscribers then live in workers)"
                } else {
                    ""
                }
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

    /// The transport of subscriber `g` (watcher `g / channels` of channel `g % channels`):
    /// the `--transport` list round-robin over channel + watcher.
    pub fn transport(&self, g: u64) -> Transport {
        let t = &self.args.transport;
        let channels = self.args.channels as u64;
        t[((g % channels + g / channels) % t.len() as u64) as usize]
    }

    /// The distinct transports in use, in first-use order.
    pub fn transports(&self) -> Vec<Transport> {
        let mut out: Vec<Transport> = Vec::new();
        for t in &self.args.transport {
            if !out.contains(t) {
                out.push(*t);
            }
        }
        out
    }

    /// The transports, as given (`ws`, or e.g. `ws,sse`).
    pub fn transports_label(&self) -> String {
        self.args.transport.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(",")
    }

    /// Sockets the publisher holds for the whole run: one streaming request per channel
    /// with `--publish stream` (none otherwise; pooled HTTP clients stay small).
    pub fn publisher_sockets(&self) -> usize {
        if self.publishing() && self.args.publish == PublishVia::Stream { self.args.channels } else { 0 }
    }

    /// Whether this run publishes.
    pub fn publishing(&self) -> bool {
        self.total_messages > 0
    }

    /// Name of channel `idx`.
    pub fn channel_name(&self, idx: u64) -> String {
        format!("{}-{idx}", self.prefix)
    }

    /// Longest the whole run may take; past it the run stops itself (streams get the
    /// time to answer late, see `publisher::streams::ANSWER_TIMEOUT`).
    pub fn hard_limit(&self) -> Duration {
        let a = &self.args;
        let answers = if self.publisher_sockets() > 0 { 40.0 } else { 0.0 };
        Duration::from_secs_f64(
            a.connect_phase_timeout
                + a.connect_timeout
                + a.settle
                + a.warmup
                + a.duration
                + a.drain
                + answers
                + 60.0,
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
}
