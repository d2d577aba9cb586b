//! Configuration: command-line flags, `GATEWAY_*` environment variables and an optional
//! TOML file, merged with the precedence flags > env > file > built-in defaults.
//!
//! - [`settings`]: the table that declares every option once (flag, variable, file key,
//!   default, help) and merges them.
//! - [`cli`]: the subcommands and the options of `gateway publish`.
//! - [`secret`]: values that are never printed; `checks`: per-option validation.
//!
//! [`Config::resolve`] is pure (clap has already read flags and env), so precedence is
//! unit-tested without touching the process environment. Key files named here (JWT
//! keys) are paths: `auth` reads them.

mod checks;
pub mod cli;
pub mod cluster_url;
pub mod secret;
pub mod sentinel_url;
pub mod settings;

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

pub use self::{
    cli::{Cli, Command, InputFormat, LogFormat, PublishArgs},
    secret::{Secret, SecretUrl, mask_url},
    settings::{FileSettings, ServeArgs, Settings},
};

/// `retry:` hint sent to SSE clients when the server goes away, in ms.
pub const SSE_RETRY_MS: u64 = 2000;

/// A configuration problem, printed as one line before exiting non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The effective configuration of a node: the checked settings, and the groups the
/// layers below take.
#[derive(Clone)]
pub struct Config {
    /// Every option's effective value, as `gateway config` prints it.
    pub settings: Settings,
    /// Public listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Redis URL; `None` runs the in-process broker.
    pub redis_url: Option<SecretUrl>,
    /// Redis pool size for publishing.
    pub redis_pool_size: usize,
    /// Replicas that must hold a history publish before it is acknowledged (0: the
    /// master alone).
    pub redis_replica_acks: usize,
    /// Keys that may publish; empty means publishing is open.
    pub api_keys: Vec<Secret>,
    /// Limits applied to clients.
    pub limits: Limits,
    /// Timers of the transports.
    pub timers: Timers,
    /// Per-channel history limits.
    pub history: HistoryConfig,
    /// Subscriber authentication (off when no key is set).
    pub auth: AuthSettings,
    /// Origins allowed for WebSocket upgrades and CORS; empty means any.
    pub allowed_origins: Vec<String>,
    /// Whether WebSocket clients may publish.
    pub ws_publish: bool,
    /// Whether `POST /demo/answer` streams demo answers (the demo page's answer panel).
    pub demo_streams: bool,
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
    /// Bytes of publish request bodies held at once per node.
    pub max_body_bytes_in_flight: usize,
    /// Largest body of one streaming publish.
    pub stream_max_bytes: usize,
    /// New channels one client address may hold for long-polls per keep-alive period.
    pub poll_channels_per_ip: u32,
    /// Channels a node may hold before long-polls add no more.
    pub poll_max_channels: usize,
}

/// Timers of the transports and of shutdown.
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
    /// Longest a request body may go without a byte.
    pub body_idle: Duration,
    /// Longest one streaming publish may last.
    pub stream_max: Duration,
}

/// Limits of per-channel history.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Most messages kept per channel.
    pub max_len: usize,
    /// Oldest message kept.
    pub max_age: Duration,
    /// How long an idempotency key suppresses repeats.
    pub idempotency_window: Duration,
}

/// Subscriber authentication settings: where the keys are. `auth` reads the key files.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<Secret>,
    /// PEM file of the RSA public key for RS256 tokens.
    pub rs256_public_key: Option<PathBuf>,
    /// JWK set file, for tokens that name their key in a `kid` header.
    pub jwks_file: Option<PathBuf>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The settings, under the name people know from `gateway config`.
        let text = format!("{:#?}", self.settings);
        let body = text.strip_prefix("Settings").unwrap_or(&text);
        if f.alternate() { write!(f, "Config{body}") } else { write!(f, "Config {:?}", self.settings) }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::from_settings(Settings::default()).expect("defaults are valid")
    }
}

impl Default for Limits {
    fn default() -> Self {
        Config::default().limits
    }
}

impl Config {
    /// Loads the file named by `--config` (if any) and merges it under the flags and env.
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileSettings::default(),
        };
        Self::resolve(args, file)
    }

    /// Merges flags/env (`args`) over `file` over defaults, and validates the result.
    pub fn resolve(args: ServeArgs, file: FileSettings) -> Result<Self, ConfigError> {
        Self::from_settings(Settings::merge(args, file)?)
    }

    /// Checks what no single option can (how options relate) and groups the settings.
    fn from_settings(s: Settings) -> Result<Self, ConfigError> {
        let secs = Duration::from_secs;
        let timers = Timers {
            sse_heartbeat: secs(s.sse_heartbeat_secs),
            ws_ping: secs(s.ws_ping_secs),
            poll_timeout: secs(s.poll_timeout_secs),
            poll_max_timeout: secs(s.poll_max_timeout_secs),
            poll_keepalive: secs(s.poll_keepalive_secs),
            linger: Duration::from_millis(s.linger_ms),
            shutdown_grace: secs(s.shutdown_grace_secs),
            drain_window: secs(s.drain_window_secs),
            sse_retry: Duration::from_millis(SSE_RETRY_MS),
            header_read: secs(s.header_timeout_secs),
            body_idle: secs(s.body_timeout_secs),
            stream_max: secs(s.stream_max_secs),
        };
        if timers.drain_window >= timers.shutdown_grace {
            return Err(ConfigError(format!(
                "drain_window_secs ({}) must be shorter than shutdown_grace_secs ({})",
                s.drain_window_secs, s.shutdown_grace_secs
            )));
        }
        if timers.poll_timeout > timers.poll_max_timeout {
            return Err(ConfigError(format!(
                "poll_timeout_secs ({}) must not exceed poll_max_timeout_secs ({})",
                s.poll_timeout_secs, s.poll_max_timeout_secs
            )));
        }
        if s.redis_replica_acks > 0 && s.redis_url.is_none() {
            return Err(ConfigError(format!(
                "redis_replica_acks ({}) needs a redis_url: the in-process broker has no replicas",
                s.redis_replica_acks
            )));
        }
        Ok(Self {
            listen: s.listen,
            admin_listen: s.admin_listen,
            redis_url: s.redis_url.clone(),
            redis_pool_size: s.redis_pool_size,
            redis_replica_acks: s.redis_replica_acks,
            api_keys: s.api_keys.clone().unwrap_or_default(),
            limits: Limits {
                max_payload_bytes: s.max_payload_bytes,
                max_channels_per_connection: s.max_channels_per_connection,
                max_connections: s.max_connections,
                max_channel_len: s.max_channel_len,
                queue_size: s.queue_size,
                queue_bytes: s.queue_bytes,
                connect_rate_per_ip: s.connect_rate_per_ip,
                publish_rate_per_key: s.publish_rate_per_key,
                poll_buffer: s.poll_buffer,
                max_body_bytes_in_flight: s.max_body_bytes_in_flight,
                stream_max_bytes: s.stream_max_bytes,
                poll_channels_per_ip: s.poll_channels_per_ip,
                poll_max_channels: s.poll_max_channels,
            },
            timers,
            history: HistoryConfig {
                max_len: s.history_size,
                max_age: secs(s.history_ttl_secs),
                idempotency_window: secs(s.idempotency_window_secs),
            },
            auth: AuthSettings {
                hs256_secret: s.jwt_hs256_secret.clone(),
                rs256_public_key: s.jwt_rs256_public_key.clone(),
                jwks_file: s.jwt_jwks_file.clone(),
                audience: s.jwt_audience.clone(),
                issuer: s.jwt_issuer.clone(),
            },
            allowed_origins: s.allowed_origins.clone().unwrap_or_default(),
            ws_publish: s.ws_publish,
            demo_streams: s.demo_streams,
            log_format: s.log_format,
            settings: s,
        })
    }
}

/// Checks a Redis URL as `--redis-url` is checked (for `gateway publish`).
pub fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    let Ok(url) = url.parse::<SecretUrl>();
    checks::redis_url("redis_url", Some(url)).map(|_| ())
}

/// Reads and parses the `--config` TOML file.
fn load_file(path: &std::path::Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn file(toml_text: &str) -> FileSettings {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.admin_listen, "0.0.0.0:9091".parse().unwrap());
        assert!(c.redis_url.is_none());
        assert_eq!(c.limits.max_payload_bytes, 64 * 1024);
        assert_eq!(c.limits.queue_size, 512);
        assert_eq!(c.timers.linger, Duration::from_millis(2000));
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
        assert_eq!(
            c.limits.max_channel_len,
            shared::channel::DEFAULT_MAX_CHANNEL_LEN,
            "default when neither"
        );
    }

    #[test]
    fn subcommand_and_bare_flags_parse_the_same() {
        let bare = Cli::try_parse_from(["gateway", "--redis-url", "redis://h:1"]).unwrap();
        let sub = Cli::try_parse_from(["gateway", "serve", "--redis-url", "redis://h:1"]).unwrap();
        assert_eq!(bare.serve.redis_url.as_ref().map(SecretUrl::expose), Some("redis://h:1"));
        assert!(
            matches!(sub.command, Some(Command::Serve(ref a)) if a.redis_url.as_ref().map(SecretUrl::expose) == Some("redis://h:1"))
        );
    }

    #[test]
    fn invalid_values_give_one_clear_error() {
        let err =
            Config::resolve(ServeArgs { queue_size: Some(0), ..Default::default() }, FileSettings::default())
                .unwrap_err();
        assert_eq!(err.to_string(), "invalid configuration: queue_size must be greater than 0, got 0");
        let err = Config::resolve(
            ServeArgs { redis_url: Some("http://x".parse().unwrap()), ..Default::default() },
            FileSettings::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("redis_url must start with redis://"), "{err}");
        assert!(
            toml::from_str::<FileSettings>("no_such_option = 1").is_err(),
            "typos in the file are errors"
        );
    }

    #[test]
    fn help_text_states_the_real_defaults() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for (name, _, default) in Settings::table() {
            let Some(default) = default else { continue };
            let flag = format!("--{}", name.replace('_', "-"));
            let start =
                help.find(&format!("\n      {flag} ")).unwrap_or_else(|| panic!("{flag} in help")) + 7;
            let rest = &help[start + flag.len()..];
            let section = &rest[..rest.find("\n      --").unwrap_or(rest.len())];
            assert!(
                section.contains(&format!("[default: {default}]")),
                "{flag} help must say [default: {default}]"
            );
        }
    }

    #[test]
    fn key_file_paths_come_from_flag_over_file() {
        let toml_naming = file("jwt_jwks_file = \"/from/file.json\"\n");
        let from_file = Config::resolve(ServeArgs::default(), toml_naming).unwrap();
        assert_eq!(from_file.auth.jwks_file, Some(PathBuf::from("/from/file.json")), "TOML jwt_jwks_file");
        let args = Cli::try_parse_from(["gateway", "--jwt-jwks-file", "/from/flag.json"]).unwrap().serve;
        let c = Config::resolve(args, file("jwt_jwks_file = \"/from/file.json\"\n")).unwrap();
        assert_eq!(c.auth.jwks_file, Some(PathBuf::from("/from/flag.json")), "flag wins");
    }

    #[test]
    fn secrets_are_masked() {
        let c = Config::resolve(
            ServeArgs {
                redis_url: Some("redis://user:hunter2@db:6379".parse().unwrap()),
                api_keys: Some(vec![Secret::new("topsecret")]),
                ..Default::default()
            },
            FileSettings::default(),
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("topsecret"), "{dbg}");
        assert!(dbg.contains("redis://user:***@db:6379"), "{dbg}");
        assert_eq!(mask_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(mask_url("redis://h:1"), "redis://h:1");
    }
}
