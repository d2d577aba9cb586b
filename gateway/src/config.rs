//! Configuration: command-line flags, `GATEWAY_*` environment variables and an optional
//! TOML file, merged with the precedence flags > env > file > built-in defaults.
//!
//! Every default is a named constant below. [`Config::resolve`] is pure (clap has
//! already read flags and env), so precedence is unit-tested without touching the
//! process environment.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::{auth::AuthConfig, broker::HistoryConfig};

/// Default public listener (SSE, WebSocket, long-poll, publish API, demo page).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default admin listener (metrics, health, readiness).
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9091";
/// Default largest accepted payload, in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Default most channels one connection may subscribe to.
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 32;
/// Default longest channel name.
pub const DEFAULT_MAX_CHANNEL_LEN: usize = shared::channel::DEFAULT_MAX_CHANNEL_LEN;
/// Default per-connection queue length, in messages, before the slow-consumer policy applies.
pub const DEFAULT_QUEUE_SIZE: usize = 512;
/// Default per-connection queue size, in payload bytes, before the slow-consumer policy applies.
pub const DEFAULT_QUEUE_BYTES: usize = 1024 * 1024;
/// Default interval between SSE heartbeat comments, in seconds.
pub const DEFAULT_SSE_HEARTBEAT_SECS: u64 = 15;
/// Default interval between server WebSocket pings, in seconds.
pub const DEFAULT_WS_PING_SECS: u64 = 25;
/// Default long-poll hold time when the client gives none, in seconds.
pub const DEFAULT_POLL_TIMEOUT_SECS: u64 = 25;
/// Default longest long-poll hold time a client may ask for, in seconds.
pub const DEFAULT_POLL_MAX_TIMEOUT_SECS: u64 = 60;
/// Default messages kept per channel for long-poll clients between polls.
pub const DEFAULT_POLL_BUFFER: usize = 128;
/// Default time a channel stays subscribed after a long-poll answer, in seconds, so
/// the client's next poll misses nothing.
pub const DEFAULT_POLL_KEEPALIVE_SECS: u64 = 30;
/// Default delay before unsubscribing a channel whose last local subscriber left, in ms.
pub const DEFAULT_LINGER_MS: u64 = 2000;
/// Default grace period for draining connections on SIGTERM, in seconds.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// Default window over which a draining node spreads its clients' reconnects, in seconds.
pub const DEFAULT_DRAIN_WINDOW_SECS: u64 = 5;
/// Default `retry:` hint sent to SSE clients when the server goes away, in ms.
pub const DEFAULT_SSE_RETRY_MS: u64 = 2000;
/// Default time a client gets to send a request head, in seconds (slow-loris guard).
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Default most messages kept in each channel's history.
pub const DEFAULT_HISTORY_SIZE: usize = 1000;
/// Default age after which history messages are dropped, in seconds.
pub const DEFAULT_HISTORY_TTL_SECS: u64 = 3600;
/// Default window in which a repeated `idempotency_key` is suppressed, in seconds.
pub const DEFAULT_IDEMPOTENCY_WINDOW_SECS: u64 = 300;
/// Default Redis connection pool size (publishing).
pub const DEFAULT_REDIS_POOL_SIZE: usize = 16;

/// `gateway` — pub/sub fan-out over SSE, WebSocket and long-poll, scaled out through Redis.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway node (the default).
    Serve(ServeArgs),
    /// Publish each line of standard input as one message.
    Publish(PublishArgs),
    /// Print the effective configuration (secrets masked) and exit.
    Config(ServeArgs),
}

/// Options of a gateway node. Each also reads `GATEWAY_<NAME>` and the `--config` file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the options below (snake_case keys).
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public listener address [default: 0.0.0.0:8080].
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listener address for /metrics, /healthz, /readyz [default: 0.0.0.0:9091].
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Redis URL, e.g. redis://127.0.0.1:6379. Unset: single node on an in-process broker.
    #[arg(long, env = "GATEWAY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Redis connection pool size for publishing [default: 16].
    #[arg(long, env = "GATEWAY_REDIS_POOL_SIZE")]
    pub redis_pool_size: Option<usize>,
    /// API key(s) required to publish; comma-separated. Unset: publishing is open.
    #[arg(long, env = "GATEWAY_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Largest payload accepted, in bytes [default: 65536].
    #[arg(long, env = "GATEWAY_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most channels one connection may subscribe to [default: 32].
    #[arg(long, env = "GATEWAY_MAX_CHANNELS_PER_CONNECTION")]
    pub max_channels_per_connection: Option<usize>,
    /// Most client connections (SSE, WebSocket, held long-polls) per node; 0 = no cap
    /// [default: 0].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Longest channel name, in bytes [default: 128].
    #[arg(long, env = "GATEWAY_MAX_CHANNEL_LEN")]
    pub max_channel_len: Option<usize>,
    /// Messages queued per connection before it counts as a slow consumer and is
    /// disconnected [default: 512].
    #[arg(long, env = "GATEWAY_QUEUE_SIZE")]
    pub queue_size: Option<usize>,
    /// Payload bytes queued per connection before it counts as a slow consumer and is
    /// disconnected [default: 1048576].
    #[arg(long, env = "GATEWAY_QUEUE_BYTES")]
    pub queue_bytes: Option<usize>,
    /// New connections per second accepted from one client IP (the TCP peer address; a
    /// bucket of that many refills continuously); over it, 429. 0 = no limit. Leave it off
    /// behind a proxy or load balancer, where every client shares its address [default: 0].
    #[arg(long, env = "GATEWAY_CONNECT_RATE_PER_IP")]
    pub connect_rate_per_ip: Option<u32>,
    /// Messages per second one API key may publish (per client IP when no keys are
    /// configured); over it, 429. 0 = no limit [default: 0].
    #[arg(long, env = "GATEWAY_PUBLISH_RATE_PER_KEY")]
    pub publish_rate_per_key: Option<u32>,
    /// Seconds between SSE heartbeat comments [default: 15].
    #[arg(long, env = "GATEWAY_SSE_HEARTBEAT_SECS")]
    pub sse_heartbeat_secs: Option<u64>,
    /// Seconds between WebSocket pings; a client silent for two intervals is dropped [default: 25].
    #[arg(long, env = "GATEWAY_WS_PING_SECS")]
    pub ws_ping_secs: Option<u64>,
    /// Allow the WebSocket `publish` op [default: false].
    #[arg(long, env = "GATEWAY_WS_PUBLISH")]
    pub ws_publish: Option<bool>,
    /// Long-poll hold time when the client asks for none, in seconds [default: 25].
    #[arg(long, env = "GATEWAY_POLL_TIMEOUT_SECS")]
    pub poll_timeout_secs: Option<u64>,
    /// Longest long-poll hold time a client may ask for, in seconds [default: 60].
    #[arg(long, env = "GATEWAY_POLL_MAX_TIMEOUT_SECS")]
    pub poll_max_timeout_secs: Option<u64>,
    /// Messages kept per channel for long-poll clients between polls [default: 128].
    #[arg(long, env = "GATEWAY_POLL_BUFFER")]
    pub poll_buffer: Option<usize>,
    /// Seconds a channel stays subscribed after a long-poll answer [default: 30].
    #[arg(long, env = "GATEWAY_POLL_KEEPALIVE_SECS")]
    pub poll_keepalive_secs: Option<u64>,
    /// Milliseconds before unsubscribing a channel whose last local subscriber left [default: 2000].
    #[arg(long, env = "GATEWAY_LINGER_MS")]
    pub linger_ms: Option<u64>,
    /// Seconds over which SIGTERM spreads telling clients to reconnect (random per
    /// client), so they don't all hit the other nodes at once [default: 5].
    #[arg(long, env = "GATEWAY_DRAIN_WINDOW_SECS")]
    pub drain_window_secs: Option<u64>,
    /// Seconds to drain connections on SIGTERM before exiting [default: 30].
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Origins allowed to open WebSockets and to read responses cross-site (CORS), comma-
    /// separated, e.g. https://app.example.com. Unset: any origin.
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Shared secret for HS256 subscriber tokens; setting it (or an RS256 key, or a JWKS
    /// file) turns subscriber authentication on.
    #[arg(long, env = "GATEWAY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// PEM file with the RSA public key for RS256 subscriber tokens.
    #[arg(long, env = "GATEWAY_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,
    /// JSON file with a JWK set (`{"keys": [...]}`); tokens with a `kid` header are
    /// verified by that key, with the algorithm the key pins. Read at startup.
    #[arg(long, env = "GATEWAY_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// Required `aud` claim of subscriber tokens.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim of subscriber tokens.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Seconds a client gets to send a request's headers before it is cut off [default: 10].
    #[arg(long, env = "GATEWAY_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// Most messages kept in each channel's history (for resume) [default: 1000].
    #[arg(long, env = "GATEWAY_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// Seconds a message stays in history [default: 3600].
    #[arg(long, env = "GATEWAY_HISTORY_TTL_SECS")]
    pub history_ttl_secs: Option<u64>,
    /// Seconds during which a repeated publish `idempotency_key` is suppressed [default: 300].
    #[arg(long, env = "GATEWAY_IDEMPOTENCY_WINDOW_SECS")]
    pub idempotency_window_secs: Option<u64>,
    /// Log format: text or json [default: text]. Levels come from RUST_LOG.
    #[arg(long, env = "GATEWAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Options of `gateway publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Channel to publish to (optional with --jsonl, where each line names its channel).
    pub channel: Option<String>,
    /// Each line is JSON `{"channel","data","event"?}` instead of a raw payload.
    #[arg(long)]
    pub jsonl: bool,
    /// Event name for every message.
    #[arg(long)]
    pub event: Option<String>,
    /// Publish straight to this Redis.
    #[arg(long, env = "GATEWAY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Publish through a gateway's HTTP API instead, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// API key for --gateway-url.
    #[arg(long, env = "GATEWAY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest payload accepted, in bytes [default: 65536].
    #[arg(long, env = "GATEWAY_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The TOML file: the same options as the flags, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    redis_url: Option<String>,
    redis_pool_size: Option<usize>,
    api_keys: Option<Vec<String>>,
    max_payload_bytes: Option<usize>,
    max_channels_per_connection: Option<usize>,
    max_connections: Option<usize>,
    max_channel_len: Option<usize>,
    queue_size: Option<usize>,
    queue_bytes: Option<usize>,
    connect_rate_per_ip: Option<u32>,
    publish_rate_per_key: Option<u32>,
    sse_heartbeat_secs: Option<u64>,
    ws_ping_secs: Option<u64>,
    ws_publish: Option<bool>,
    poll_timeout_secs: Option<u64>,
    poll_max_timeout_secs: Option<u64>,
    poll_buffer: Option<usize>,
    poll_keepalive_secs: Option<u64>,
    linger_ms: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    drain_window_secs: Option<u64>,
    allowed_origins: Option<Vec<String>>,
    jwt_hs256_secret: Option<String>,
    jwt_rs256_public_key: Option<PathBuf>,
    jwt_jwks_file: Option<PathBuf>,
    jwt_audience: Option<String>,
    jwt_issuer: Option<String>,
    header_timeout_secs: Option<u64>,
    history_size: Option<usize>,
    history_ttl_secs: Option<u64>,
    idempotency_window_secs: Option<u64>,
    log_format: Option<LogFormat>,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))
    }
}

/// A configuration problem, printed as one line before exiting non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// A secret string: usable, but never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for comparing or connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Masks the password of a URL like `redis://user:pass@host`, for logs.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else { return url.to_owned() };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_owned(),
    };
    format!("{}{}{}", &url[..scheme_end], masked, &rest[at..])
}

/// The effective configuration of a node.
#[derive(Clone)]
pub struct Config {
    /// Public listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Redis URL; `None` runs the in-process broker.
    pub redis_url: Option<Secret>,
    /// Redis pool size for publishing.
    pub redis_pool_size: usize,
    /// Keys that may publish; empty means publishing is open.
    pub api_keys: Vec<Secret>,
    /// Limits applied to clients.
    pub limits: Limits,
    /// Timers of the transports.
    pub timers: Timers,
    /// Per-channel history limits.
    pub history: HistoryConfig,
    /// Subscriber authentication (off when no key is set).
    pub auth: AuthConfig,
    /// Origins allowed for WebSocket upgrades and CORS; empty means any.
    pub allowed_origins: Vec<String>,
    /// Whether WebSocket clients may publish.
    pub ws_publish: bool,
    /// Log format.
    pub log_format: LogFormat,
}

/// Limits on what one client may do; each is enforced with a clear error.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload, in bytes.
    pub max_payload_bytes: usize,
    /// Most channels per connection.
    pub max_channels_per_connection: usize,
    /// Most client connections per node (0: no cap).
    pub max_connections: usize,
    /// Longest channel name.
    pub max_channel_len: usize,
    /// Per-connection queue length in messages.
    pub queue_size: usize,
    /// Per-connection queue size in payload bytes.
    pub queue_bytes: usize,
    /// New connections per second per client IP (0: no limit).
    pub connect_rate_per_ip: u32,
    /// Published messages per second per API key, or per client IP without keys (0: no limit).
    pub publish_rate_per_key: u32,
    /// Messages kept per channel for long-poll.
    pub poll_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_channels_per_connection: DEFAULT_MAX_CHANNELS_PER_CONNECTION,
            max_connections: 0,
            max_channel_len: DEFAULT_MAX_CHANNEL_LEN,
            queue_size: DEFAULT_QUEUE_SIZE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            connect_rate_per_ip: 0,
            publish_rate_per_key: 0,
            poll_buffer: DEFAULT_POLL_BUFFER,
        }
    }
}

/// Intervals and timeouts.
#[derive(Debug, Clone)]
pub struct Timers {
    /// SSE heartbeat interval.
    pub sse_heartbeat: Duration,
    /// WebSocket ping interval.
    pub ws_ping: Duration,
    /// Default long-poll hold.
    pub poll_timeout: Duration,
    /// Longest long-poll hold.
    pub poll_max_timeout: Duration,
    /// How long a channel stays subscribed after a long-poll answer.
    pub poll_keepalive: Duration,
    /// Delay before unsubscribing an empty channel.
    pub linger: Duration,
    /// Drain grace period on SIGTERM.
    pub shutdown_grace: Duration,
    /// Window over which clients are told to reconnect on SIGTERM.
    pub drain_window: Duration,
    /// SSE `retry:` hint on shutdown.
    pub sse_retry: Duration,
    /// Time to send a request head.
    pub header_read: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("redis_url", &self.redis_url.as_ref().map(|u| mask_url(u.expose())))
            .field("redis_pool_size", &self.redis_pool_size)
            .field("api_keys", &self.api_keys)
            .field("limits", &self.limits)
            .field("timers", &self.timers)
            .field("history", &self.history)
            .field("allowed_origins", &self.allowed_origins)
            .field("auth", &self.auth)
            .field("ws_publish", &self.ws_publish)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::resolve(ServeArgs::default(), FileConfig::default()).expect("defaults are valid")
    }
}

/// Reads and checks the `jwt_jwks_file`; the error names the file and the problem.
fn load_jwks(path: &std::path::Path) -> Result<crate::auth::Jwks, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read jwt_jwks_file {}: {e}", path.display())))?;
    crate::auth::Jwks::parse(&text).map_err(|e| ConfigError(format!("jwt_jwks_file {}: {e}", path.display())))
}

fn positive<T: PartialOrd + Default + fmt::Display>(name: &str, v: T) -> Result<T, ConfigError> {
    if v > T::default() { Ok(v) } else { Err(ConfigError(format!("{name} must be greater than 0, got {v}"))) }
}

impl Config {
    /// Loads the file named by `--config` (if any) and merges it under the flags and env.
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }

    /// Merges flags/env (`args`) over `file` over defaults, and validates the result.
    pub fn resolve(args: ServeArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let parse_addr = |s: &str| s.parse::<SocketAddr>().expect("default address parses");
        let api_keys =
            if args.api_keys.is_empty() { file.api_keys.unwrap_or_default() } else { args.api_keys };
        let api_keys: Vec<Secret> =
            api_keys.into_iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).map(Secret).collect();
        let redis_url = args.redis_url.or(file.redis_url).filter(|u| !u.trim().is_empty());
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("unix://"))
        {
            let hint = if url.starts_with("rediss://") { " (TLS to Redis is not built in yet)" } else { "" };
            return Err(ConfigError(format!(
                "redis_url must start with redis:// or unix://, got {:?}{hint}",
                mask_url(url)
            )));
        }
        let origins = if args.allowed_origins.is_empty() {
            file.allowed_origins.unwrap_or_default()
        } else {
            args.allowed_origins
        };
        let mut allowed_origins = Vec::with_capacity(origins.len());
        for o in origins {
            let o = o.trim().trim_end_matches('/').to_owned();
            if o.is_empty() {
                continue;
            }
            let valid = (o.starts_with("http://") || o.starts_with("https://"))
                && !o["https://".len().min(o.len())..].contains('/')
                && axum::http::HeaderValue::from_str(&o).is_ok();
            if !valid {
                return Err(ConfigError(format!(
                    "allowed_origins entries look like https://app.example.com (scheme, host, optional port), got {o:?}"
                )));
            }
            allowed_origins.push(o);
        }
        let secs = |v: Option<u64>, f: Option<u64>, d: u64| Duration::from_secs(v.or(f).unwrap_or(d));
        let limits = Limits {
            max_payload_bytes: positive(
                "max_payload_bytes",
                args.max_payload_bytes.or(file.max_payload_bytes).unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES),
            )?,
            max_channels_per_connection: positive(
                "max_channels_per_connection",
                args.max_channels_per_connection
                    .or(file.max_channels_per_connection)
                    .unwrap_or(DEFAULT_MAX_CHANNELS_PER_CONNECTION),
            )?,
            max_connections: args.max_connections.or(file.max_connections).unwrap_or(0),
            max_channel_len: positive(
                "max_channel_len",
                args.max_channel_len.or(file.max_channel_len).unwrap_or(DEFAULT_MAX_CHANNEL_LEN),
            )?,
            queue_size: positive(
                "queue_size",
                args.queue_size.or(file.queue_size).unwrap_or(DEFAULT_QUEUE_SIZE),
            )?,
            queue_bytes: positive(
                "queue_bytes",
                args.queue_bytes.or(file.queue_bytes).unwrap_or(DEFAULT_QUEUE_BYTES),
            )?,
            connect_rate_per_ip: args.connect_rate_per_ip.or(file.connect_rate_per_ip).unwrap_or(0),
            publish_rate_per_key: args.publish_rate_per_key.or(file.publish_rate_per_key).unwrap_or(0),
            poll_buffer: positive(
                "poll_buffer",
                args.poll_buffer.or(file.poll_buffer).unwrap_or(DEFAULT_POLL_BUFFER),
            )?,
        };
        let timers = Timers {
            sse_heartbeat: Duration::from_secs(positive(
                "sse_heartbeat_secs",
                args.sse_heartbeat_secs.or(file.sse_heartbeat_secs).unwrap_or(DEFAULT_SSE_HEARTBEAT_SECS),
            )?),
            ws_ping: Duration::from_secs(positive(
                "ws_ping_secs",
                args.ws_ping_secs.or(file.ws_ping_secs).unwrap_or(DEFAULT_WS_PING_SECS),
            )?),
            poll_timeout: secs(args.poll_timeout_secs, file.poll_timeout_secs, DEFAULT_POLL_TIMEOUT_SECS),
            poll_max_timeout: secs(
                args.poll_max_timeout_secs,
                file.poll_max_timeout_secs,
                DEFAULT_POLL_MAX_TIMEOUT_SECS,
            ),
            poll_keepalive: secs(
                args.poll_keepalive_secs,
                file.poll_keepalive_secs,
                DEFAULT_POLL_KEEPALIVE_SECS,
            ),
            linger: Duration::from_millis(args.linger_ms.or(file.linger_ms).unwrap_or(DEFAULT_LINGER_MS)),
            shutdown_grace: secs(
                args.shutdown_grace_secs,
                file.shutdown_grace_secs,
                DEFAULT_SHUTDOWN_GRACE_SECS,
            ),
            drain_window: secs(args.drain_window_secs, file.drain_window_secs, DEFAULT_DRAIN_WINDOW_SECS),
            sse_retry: Duration::from_millis(DEFAULT_SSE_RETRY_MS),
            header_read: Duration::from_secs(positive(
                "header_timeout_secs",
                args.header_timeout_secs.or(file.header_timeout_secs).unwrap_or(DEFAULT_HEADER_TIMEOUT_SECS),
            )?),
        };
        if timers.drain_window >= timers.shutdown_grace {
            return Err(ConfigError(format!(
                "drain_window_secs ({}) must be shorter than shutdown_grace_secs ({})",
                timers.drain_window.as_secs(),
                timers.shutdown_grace.as_secs()
            )));
        }
        if timers.poll_timeout > timers.poll_max_timeout {
            return Err(ConfigError(format!(
                "poll_timeout_secs ({}) must not exceed poll_max_timeout_secs ({})",
                timers.poll_timeout.as_secs(),
                timers.poll_max_timeout.as_secs()
            )));
        }
        Ok(Self {
            listen: args.listen.or(file.listen).unwrap_or_else(|| parse_addr(DEFAULT_LISTEN)),
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or_else(|| parse_addr(DEFAULT_ADMIN_LISTEN)),
            redis_url: redis_url.map(Secret),
            redis_pool_size: positive(
                "redis_pool_size",
                args.redis_pool_size.or(file.redis_pool_size).unwrap_or(DEFAULT_REDIS_POOL_SIZE),
            )?,
            api_keys,
            limits,
            timers,
            history: HistoryConfig {
                max_len: positive(
                    "history_size",
                    args.history_size.or(file.history_size).unwrap_or(DEFAULT_HISTORY_SIZE),
                )?,
                max_age: Duration::from_secs(positive(
                    "history_ttl_secs",
                    args.history_ttl_secs.or(file.history_ttl_secs).unwrap_or(DEFAULT_HISTORY_TTL_SECS),
                )?),
                idempotency_window: Duration::from_secs(
                    args.idempotency_window_secs
                        .or(file.idempotency_window_secs)
                        .unwrap_or(DEFAULT_IDEMPOTENCY_WINDOW_SECS),
                ),
            },
            allowed_origins,
            auth: AuthConfig {
                hs256_secret: args
                    .jwt_hs256_secret
                    .or(file.jwt_hs256_secret)
                    .filter(|s| !s.is_empty())
                    .map(Secret),
                rs256_public_key_pem: match args.jwt_rs256_public_key.or(file.jwt_rs256_public_key) {
                    Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
                        ConfigError(format!("cannot read jwt_rs256_public_key {}: {e}", path.display()))
                    })?),
                    None => None,
                },
                jwks: match args.jwt_jwks_file.or(file.jwt_jwks_file) {
                    Some(path) => Some(load_jwks(&path)?),
                    None => None,
                },
                audience: args.jwt_audience.or(file.jwt_audience),
                issuer: args.jwt_issuer.or(file.jwt_issuer),
            },
            ws_publish: args.ws_publish.or(file.ws_publish).unwrap_or(false),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml_text: &str) -> FileConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_are_the_named_constants() {
        let c = Config::default();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.admin_listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert!(c.redis_url.is_none());
        assert_eq!(c.limits.max_payload_bytes, DEFAULT_MAX_PAYLOAD_BYTES);
        assert_eq!(c.limits.queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(c.timers.linger, Duration::from_millis(DEFAULT_LINGER_MS));
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let args =
            Cli::try_parse_from(["gateway", "--listen", "127.0.0.1:1", "--queue-size", "7"]).unwrap().serve;
        let f = file(
            "listen = \"127.0.0.1:2\"\nadmin_listen = \"127.0.0.1:3\"\nqueue_size = 9\nmax_payload_bytes = 100\n",
        );
        let c = Config::resolve(args, f).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap(), "flag wins over file");
        assert_eq!(c.limits.queue_size, 7, "flag wins over file");
        assert_eq!(c.admin_listen, "127.0.0.1:3".parse().unwrap(), "file wins over default");
        assert_eq!(c.limits.max_payload_bytes, 100, "file wins over default");
        assert_eq!(c.limits.max_channel_len, DEFAULT_MAX_CHANNEL_LEN, "default when neither");
    }

    #[test]
    fn subcommand_and_bare_flags_parse_the_same() {
        let bare = Cli::try_parse_from(["gateway", "--redis-url", "redis://h:1"]).unwrap();
        let sub = Cli::try_parse_from(["gateway", "serve", "--redis-url", "redis://h:1"]).unwrap();
        assert_eq!(bare.serve.redis_url.as_deref(), Some("redis://h:1"));
        assert!(
            matches!(sub.command, Some(Command::Serve(ref a)) if a.redis_url.as_deref() == Some("redis://h:1"))
        );
    }

    #[test]
    fn invalid_values_give_one_clear_error() {
        let err =
            Config::resolve(ServeArgs { queue_size: Some(0), ..Default::default() }, FileConfig::default())
                .unwrap_err();
        assert_eq!(err.to_string(), "invalid configuration: queue_size must be greater than 0, got 0");
        let err = Config::resolve(
            ServeArgs { redis_url: Some("http://x".into()), ..Default::default() },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("redis_url must start with redis://"), "{err}");
        assert!(toml::from_str::<FileConfig>("no_such_option = 1").is_err(), "typos in the file are errors");
    }

    #[test]
    fn help_text_states_the_real_defaults() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        let cases = [
            ("--listen", DEFAULT_LISTEN.to_string()),
            ("--admin-listen", DEFAULT_ADMIN_LISTEN.to_string()),
            ("--redis-pool-size", DEFAULT_REDIS_POOL_SIZE.to_string()),
            ("--max-payload-bytes", DEFAULT_MAX_PAYLOAD_BYTES.to_string()),
            ("--max-channels-per-connection", DEFAULT_MAX_CHANNELS_PER_CONNECTION.to_string()),
            ("--max-channel-len", DEFAULT_MAX_CHANNEL_LEN.to_string()),
            ("--queue-size", DEFAULT_QUEUE_SIZE.to_string()),
            ("--queue-bytes", DEFAULT_QUEUE_BYTES.to_string()),
            ("--connect-rate-per-ip", "0".to_string()),
            ("--publish-rate-per-key", "0".to_string()),
            ("--sse-heartbeat-secs", DEFAULT_SSE_HEARTBEAT_SECS.to_string()),
            ("--ws-ping-secs", DEFAULT_WS_PING_SECS.to_string()),
            ("--poll-timeout-secs", DEFAULT_POLL_TIMEOUT_SECS.to_string()),
            ("--poll-max-timeout-secs", DEFAULT_POLL_MAX_TIMEOUT_SECS.to_string()),
            ("--poll-buffer", DEFAULT_POLL_BUFFER.to_string()),
            ("--poll-keepalive-secs", DEFAULT_POLL_KEEPALIVE_SECS.to_string()),
            ("--linger-ms", DEFAULT_LINGER_MS.to_string()),
            ("--shutdown-grace-secs", DEFAULT_SHUTDOWN_GRACE_SECS.to_string()),
            ("--drain-window-secs", DEFAULT_DRAIN_WINDOW_SECS.to_string()),
            ("--header-timeout-secs", DEFAULT_HEADER_TIMEOUT_SECS.to_string()),
            ("--history-size", DEFAULT_HISTORY_SIZE.to_string()),
            ("--history-ttl-secs", DEFAULT_HISTORY_TTL_SECS.to_string()),
            ("--idempotency-window-secs", DEFAULT_IDEMPOTENCY_WINDOW_SECS.to_string()),
        ];
        for (flag, default) in cases {
            let start = help.find(&format!("{flag} <")).unwrap_or_else(|| panic!("{flag} in help"));
            let rest = &help[start + flag.len()..];
            let section = &rest[..rest.find("\n      --").unwrap_or(rest.len())];
            assert!(
                section.contains(&format!("[default: {default}]")),
                "{flag} help must say [default: {default}]"
            );
        }
    }

    #[test]
    fn jwks_file_is_loaded_with_flag_over_file_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad) = (dir.path().join("good.json"), dir.path().join("bad.json"));
        std::fs::write(&good, r#"{"keys":[{"kty":"oct","kid":"k1","k":"c2VjcmV0"}]}"#).unwrap();
        std::fs::write(&bad, "{\"keys\": [").unwrap();
        let toml_naming = |p: &std::path::Path| file(&format!("jwt_jwks_file = {:?}\n", p.to_str().unwrap()));
        let from_file = Config::resolve(ServeArgs::default(), toml_naming(&good)).unwrap();
        assert!(from_file.auth.jwks.is_some_and(|j| j.get("k1").is_some()), "TOML jwt_jwks_file is read");
        let args = Cli::try_parse_from(["gateway", "--jwt-jwks-file", bad.to_str().unwrap()]).unwrap().serve;
        let err = Config::resolve(args, toml_naming(&good)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid configuration: jwt_jwks_file {}: invalid JSON", bad.display())),
            "flag wins: {err}"
        );
        let missing = dir.path().join("missing.json");
        let err = Config::resolve(ServeArgs::default(), toml_naming(&missing)).unwrap_err().to_string();
        assert!(err.contains(&format!("cannot read jwt_jwks_file {}", missing.display())), "{err}");
    }

    #[test]
    fn secrets_are_masked() {
        let c = Config::resolve(
            ServeArgs {
                redis_url: Some("redis://user:hunter2@db:6379".into()),
                api_keys: vec!["topsecret".into()],
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("topsecret"), "{dbg}");
        assert!(dbg.contains("redis://user:***@db:6379"), "{dbg}");
        assert_eq!(mask_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(mask_url("redis://h:1"), "redis://h:1");
    }
}
