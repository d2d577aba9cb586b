//! The settings table: every option of a gateway node declared once — its name (the
//! flag `--name-with-dashes` and the TOML key `name_with_underscores`), its
//! environment variable, its default and its help text — and merged with the
//! precedence flags > `GATEWAY_*` environment > TOML file > default.
//!
//! clap reads flags and the environment into [`ServeArgs`]; serde reads the file into
//! [`FileSettings`]; [`Settings::merge`] takes, per option, the first of the two that
//! is set, else the default, and runs the option's check. Nothing here touches the
//! process environment, so precedence is unit-tested with plain values.

use std::{net::SocketAddr, path::PathBuf};

use super::{ConfigError, LogFormat, Secret, SecretUrl, checks};

/// Declares the options. Each row is
/// `/// help` `name: Type = "default" | none, "GATEWAY_NAME" [, check] [; #[arg(...)]]`:
/// a default is written as the flag's own text (parsed with `FromStr`, and shown as
/// `[default: ...]` in `--help`); `none` means unset unless given. A check is a
/// function `fn(name, value) -> Result<value, ConfigError>` that validates (and may
/// normalize) the merged value.
macro_rules! settings {
    (@ty $ty:ty, none) => { Option<$ty> };
    (@ty $ty:ty, $default:literal) => { $ty };
    (@merge $value:expr, $ty:ty, none) => { $value };
    (@merge $value:expr, $ty:ty, $default:literal) => {
        match $value {
            Some(v) => v,
            None => $default.parse::<$ty>().expect("the default of every setting parses"),
        }
    };
    (@shown none) => { None };
    (@shown $default:literal) => { Some($default) };
    ($(
        $(#[doc = $doc:literal])*
        $(#[arg($($arg:tt)*)])?
        $name:ident: $ty:ty = $default:tt, $env:literal $(, $check:path)?;
    )*) => {
        /// Options of a gateway node: each is a flag, a `GATEWAY_*` variable and a key
        /// of the `--config` file.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct ServeArgs {
            /// TOML file with any of the options below (snake_case keys).
            #[arg(long, env = "GATEWAY_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    env = $env,
                    help = help_text(concat!($($doc),*), settings!(@shown $default)),
                    long_help = help_text(concat!($($doc),*), settings!(@shown $default))
                    $(, $($arg)*)?
                )]
                pub $name: Option<$ty>,
            )*
        }

        impl ServeArgs {
            /// These options (a subcommand's, read from `own`) completed with the ones the
            /// command line gave before the subcommand (`earlier`, read from
            /// `earlier_m`): a flag after the subcommand wins, then one before it, then
            /// the environment.
            pub fn with_earlier(
                self,
                own: &clap::ArgMatches,
                earlier: ServeArgs,
                earlier_m: &clap::ArgMatches,
            ) -> Self {
                let keep_own = |id: &str| flag_given(own, id) || !flag_given(earlier_m, id);
                Self {
                    config: if keep_own("config") { self.config } else { earlier.config },
                    $( $name: if keep_own(stringify!($name)) { self.$name } else { earlier.$name }, )*
                }
            }

            /// The options given as flags on the command line (not by the environment).
            pub fn given(m: &clap::ArgMatches) -> Vec<&'static str> {
                ["config", $(stringify!($name)),*].into_iter().filter(|id| flag_given(m, id)).collect()
            }
        }

        /// The `--config` TOML file: the same options as the flags, all optional; an
        /// unknown key is an error (a typo must not be ignored).
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileSettings {
            $( $(#[doc = $doc])* pub $name: Option<$ty>, )*
        }

        /// Every option's effective value, checked.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $name: settings!(@ty $ty, $default), )*
        }

        impl Settings {
            /// Merges flags and environment (`args`) over the file: the first that is set
            /// wins, else the default; then runs each option's check.
            pub fn merge(args: ServeArgs, file: FileSettings) -> Result<Self, ConfigError> {
                Ok(Self {
                    $($name: {
                        let value = settings!(@merge args.$name.or(file.$name), $ty, $default);
                        $( let value = $check(stringify!($name), value)?; )?
                        value
                    },)*
                })
            }

            /// The settings as a TOML file `--config` takes back: one `name = value` line
            /// each; unset options and secrets (masked) as comments.
            pub fn to_toml(&self) -> String {
                let mut out = String::new();
                $( Show::show(&self.$name, stringify!($name), &mut out); )*
                out
            }

            /// Every option as `(name, env, default)`, for docs and consistency tests.
            pub fn table() -> &'static [(&'static str, &'static str, Option<&'static str>)] {
                &[$((stringify!($name), $env, settings!(@shown $default)),)*]
            }
        }
    };
}

/// How an option's value is written in `gateway config`'s TOML.
trait Show {
    /// Appends `name = value` (or a comment) and a newline to `out`.
    fn show(&self, name: &str, out: &mut String);
}

/// Values written as they are.
macro_rules! shown {
    ($($ty:ty),*) => {$(
        impl Show for $ty {
            fn show(&self, name: &str, out: &mut String) {
                let value = toml::Value::try_from(self).expect("settings serialize");
                out.push_str(&format!("{name} = {value}\n"));
            }
        }
    )*};
}
shown!(SocketAddr, usize, u64, u32, bool, String, PathBuf, Vec<String>, LogFormat);

/// Secrets: masked, and commented out (the mask would not work as a value).
macro_rules! masked {
    ($($ty:ty),*) => {$(
        impl Show for $ty {
            fn show(&self, name: &str, out: &mut String) {
                out.push_str(&format!("# {name} = {:?}  (masked)\n", self));
            }
        }
    )*};
}
masked!(Secret, SecretUrl, Vec<Secret>);

impl<T: Show> Show for Option<T> {
    fn show(&self, name: &str, out: &mut String) {
        match self {
            Some(v) => v.show(name, out),
            None => out.push_str(&format!("# {name} (unset)\n")),
        }
    }
}

/// Whether option `id` was given as a flag (not by the environment or a default).
fn flag_given(m: &clap::ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
}

/// A help line, with its default when it has one, as `--help` shows it.
fn help_text(doc: &str, default: Option<&str>) -> String {
    match default {
        Some(d) => format!("{} [default: {d}]", doc.trim()),
        None => doc.trim().to_owned(),
    }
}

settings! {
    /// Public listener address.
    listen: SocketAddr = "0.0.0.0:8080", "GATEWAY_LISTEN";
    /// Admin listener address (metrics, health, readiness).
    admin_listen: SocketAddr = "0.0.0.0:9091", "GATEWAY_ADMIN_LISTEN";
    /// Redis URL, e.g. redis://127.0.0.1:6379; through Sentinel
    /// redis+sentinel://host:26379[,host:port...]/<master-name>; or
    /// redis+cluster://h:p[,h:p...] (the seed nodes of a Redis Cluster). Unset: single
    /// node on an in-process broker.
    #[arg(hide_env_values = true)]
    redis_url: SecretUrl = none, "GATEWAY_REDIS_URL", checks::redis_url;
    /// Redis connection pool size for publishing.
    redis_pool_size: usize = "16", "GATEWAY_REDIS_POOL_SIZE", checks::positive;
    /// Replicas that must hold a history publish before it is acknowledged (`WAIT`
    /// after each pipelined batch, on one Redis, through Sentinel or on each Redis
    /// Cluster master; fewer acknowledgements = not durable = sent again to the current
    /// master when it carries an idempotency key or stream sequence, else failed). 0:
    /// acknowledged once the master has it. Costs a replication round trip per batch.
    redis_replica_acks: usize = "0", "GATEWAY_REDIS_REPLICA_ACKS";
    /// API key(s) required to publish; comma-separated. Unset: publishing is open.
    #[arg(value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<Secret> = none, "GATEWAY_API_KEYS", checks::keys;
    /// Largest payload accepted, in bytes.
    max_payload_bytes: usize = "65536", "GATEWAY_MAX_PAYLOAD_BYTES", checks::positive;
    /// Most channels one connection may subscribe to.
    max_channels_per_connection: usize = "32", "GATEWAY_MAX_CHANNELS_PER_CONNECTION", checks::positive;
    /// Most client connections (SSE, WebSocket, held long-polls) per node; 0 = no cap.
    max_connections: usize = "0", "GATEWAY_MAX_CONNECTIONS";
    /// Longest channel name, in bytes.
    max_channel_len: usize = "128", "GATEWAY_MAX_CHANNEL_LEN", checks::positive;
    /// Messages queued per connection before it counts as a slow consumer and is
    /// disconnected.
    queue_size: usize = "512", "GATEWAY_QUEUE_SIZE", checks::positive;
    /// Payload bytes queued per connection before it counts as a slow consumer and is
    /// disconnected.
    queue_bytes: usize = "1048576", "GATEWAY_QUEUE_BYTES", checks::positive;
    /// New connections per second accepted from one client IP (the TCP peer address; a
    /// bucket of that many refills continuously); over it, 429. 0 = no limit. Leave it off
    /// behind a proxy or load balancer, where every client shares its address.
    connect_rate_per_ip: u32 = "0", "GATEWAY_CONNECT_RATE_PER_IP";
    /// Messages per second one API key may publish (per client IP when no keys are
    /// configured); over it, 429. 0 = no limit.
    publish_rate_per_key: u32 = "0", "GATEWAY_PUBLISH_RATE_PER_KEY";
    /// Seconds between SSE heartbeat comments.
    sse_heartbeat_secs: u64 = "15", "GATEWAY_SSE_HEARTBEAT_SECS", checks::positive;
    /// Seconds between WebSocket pings; a client silent for two intervals is dropped.
    ws_ping_secs: u64 = "25", "GATEWAY_WS_PING_SECS", checks::positive;
    /// Allow the WebSocket `publish` op.
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    ws_publish: bool = "false", "GATEWAY_WS_PUBLISH";
    /// Serve the demo page's answer generator, `POST /demo/answer`: it publishes a
    /// made-up answer token by token into a fresh channel. Off: 404.
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    demo_streams: bool = "false", "GATEWAY_DEMO_STREAMS";
    /// Long-poll hold time when the client asks for none, in seconds.
    poll_timeout_secs: u64 = "25", "GATEWAY_POLL_TIMEOUT_SECS";
    /// Longest long-poll hold time a client may ask for, in seconds.
    poll_max_timeout_secs: u64 = "60", "GATEWAY_POLL_MAX_TIMEOUT_SECS";
    /// Messages kept per channel for long-poll clients between polls.
    poll_buffer: usize = "128", "GATEWAY_POLL_BUFFER", checks::positive;
    /// Seconds a channel stays subscribed after a long-poll answer.
    poll_keepalive_secs: u64 = "30", "GATEWAY_POLL_KEEPALIVE_SECS";
    /// Channels one client address may newly hold for its long-polls per
    /// `--poll-keepalive-secs` (each stays subscribed that long after a poll); beyond
    /// it, polls naming new channels get 429. 0 = no limit.
    poll_channels_per_ip: u32 = "1024", "GATEWAY_POLL_CHANNELS_PER_IP";
    /// Channels a node holds at most before long-polls may not add new ones (503
    /// `over_capacity`); subscriptions of SSE and WebSocket clients are not refused.
    poll_max_channels: usize = "100000", "GATEWAY_POLL_MAX_CHANNELS", checks::positive;
    /// Milliseconds before unsubscribing a channel whose last local subscriber left.
    linger_ms: u64 = "2000", "GATEWAY_LINGER_MS";
    /// Seconds over which SIGTERM spreads telling clients to reconnect (random per
    /// client), so they don't all hit the other nodes at once.
    drain_window_secs: u64 = "5", "GATEWAY_DRAIN_WINDOW_SECS";
    /// Seconds to drain connections on SIGTERM before exiting.
    shutdown_grace_secs: u64 = "30", "GATEWAY_SHUTDOWN_GRACE_SECS";
    /// Origins allowed to open WebSockets and to read responses cross-site (CORS), comma-
    /// separated, e.g. https://app.example.com. Unset: any origin.
    #[arg(value_delimiter = ',')]
    allowed_origins: Vec<String> = none, "GATEWAY_ALLOWED_ORIGINS", checks::origins;
    /// Shared secret for HS256 subscriber tokens; setting it (or an RS256 key, or a JWKS
    /// file) turns subscriber authentication on.
    #[arg(hide_env_values = true)]
    jwt_hs256_secret: Secret = none, "GATEWAY_JWT_HS256_SECRET", checks::not_empty;
    /// PEM file with the RSA public key for RS256 subscriber tokens.
    jwt_rs256_public_key: PathBuf = none, "GATEWAY_JWT_RS256_PUBLIC_KEY";
    /// JSON file with a JWK set (`{"keys": [...]}`); tokens with a `kid` header are
    /// verified by that key, with the algorithm the key pins. Read at startup.
    jwt_jwks_file: PathBuf = none, "GATEWAY_JWT_JWKS_FILE";
    /// Required `aud` claim of subscriber tokens.
    jwt_audience: String = none, "GATEWAY_JWT_AUDIENCE";
    /// Required `iss` claim of subscriber tokens.
    jwt_issuer: String = none, "GATEWAY_JWT_ISSUER";
    /// Seconds a request body may go without a byte (for a streaming publish: between
    /// two chunks) before the request gets 408 and the connection closes.
    body_timeout_secs: u64 = "30", "GATEWAY_BODY_TIMEOUT_SECS", checks::positive;
    /// Bytes of publish request bodies one node holds at once (a body is read only
    /// after its API key passed); over it, new publishes get 503 `over_capacity`.
    max_body_bytes_in_flight: usize = "67108864", "GATEWAY_MAX_BODY_BYTES_IN_FLIGHT", checks::positive;
    /// Longest one streaming publish (`POST /publish/{channel}?stream=...`) may last, in
    /// seconds; then it is answered with what it published.
    stream_max_secs: u64 = "3600", "GATEWAY_STREAM_MAX_SECS", checks::positive;
    /// Largest body one streaming publish may send, in bytes.
    stream_max_bytes: usize = "67108864", "GATEWAY_STREAM_MAX_BYTES", checks::positive;
    /// Seconds a client gets to send a request's headers before it is cut off.
    header_timeout_secs: u64 = "10", "GATEWAY_HEADER_TIMEOUT_SECS", checks::positive;
    /// Most messages kept in each channel's history (for resume).
    history_size: usize = "1000", "GATEWAY_HISTORY_SIZE", checks::positive;
    /// Seconds a message stays in history.
    history_ttl_secs: u64 = "3600", "GATEWAY_HISTORY_TTL_SECS", checks::positive;
    /// Seconds during which a repeated publish `idempotency_key` is suppressed.
    idempotency_window_secs: u64 = "300", "GATEWAY_IDEMPOTENCY_WINDOW_SECS";
    /// Log format: text or json. Levels come from RUST_LOG.
    log_format: LogFormat = "text", "GATEWAY_LOG_FORMAT";
}

impl Default for Settings {
    fn default() -> Self {
        Self::merge(ServeArgs::default(), FileSettings::default()).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_is_the_option_name_in_capitals() {
        for (name, env, _) in Settings::table() {
            assert_eq!(*env, format!("GATEWAY_{}", name.to_ascii_uppercase()), "{name}");
        }
    }

    #[test]
    fn every_default_parses_and_passes_its_check() {
        let s = Settings::default();
        assert_eq!(s.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.max_channel_len, shared::channel::DEFAULT_MAX_CHANNEL_LEN, "one rule for channel names");
        assert!(s.redis_url.is_none() && s.api_keys.is_none());
    }
}
