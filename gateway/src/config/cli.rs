//! The command line: `gateway [serve]`, `gateway publish`, `gateway config`, and the
//! options of `gateway publish` (a node's options are the settings table).

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use super::ServeArgs;

/// `gateway` — pub/sub fan-out over SSE, WebSocket and long-poll, scaled out through Redis.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// What the command line asks for. A node's options may stand before the
    /// subcommand too (`gateway --config f.toml config`); a flag after it wins.
    /// Before `publish`, only `--redis-url` means something (the Redis to publish to).
    pub fn command_from<I, T>(args: I) -> Result<Command, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().try_get_matches_from(args)?;
        let cli = Self::from_arg_matches(&matches)?;
        let sub = matches.subcommand().map(|(_, m)| m);
        Ok(match (cli.command, sub) {
            (None, _) | (Some(_), None) => Command::Serve(cli.serve),
            (Some(Command::Serve(own)), Some(m)) => Command::Serve(own.with_earlier(m, cli.serve, &matches)),
            (Some(Command::Config(own)), Some(m)) => {
                Command::Config(own.with_earlier(m, cli.serve, &matches))
            }
            (Some(Command::Publish(mut publish)), Some(_)) => {
                let early: Vec<_> =
                    ServeArgs::given(&matches).into_iter().filter(|o| *o != "redis_url").collect();
                if let Some(first) = early.first() {
                    return Err(Self::command().error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!(
                            "--{} is an option of a node, not of `publish`; give publish's own options after `publish`",
                            first.replace('_', "-")
                        ),
                    ));
                }
                if publish.redis_url.is_none() {
                    publish.redis_url = cli.serve.redis_url.map(|u| u.expose().to_owned());
                }
                Command::Publish(publish)
            }
        })
    }
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

/// Options of `gateway publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Channel to publish to (optional with `--format jsonl`, where each line names its
    /// channel).
    pub channel: Option<String>,
    /// How stdin is cut into messages: `lines` (each line is one), `sse` (each
    /// Server-Sent Event is one: data lines joined, event kept, an `id:` is the
    /// idempotency key), `jsonl` (each line is `{"channel","data","event"?}`)
    /// [default: lines].
    #[arg(long, value_enum, conflicts_with = "jsonl")]
    pub format: Option<InputFormat>,
    /// The same as `--format jsonl`.
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

/// How `gateway publish` reads stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Each line is one message.
    Lines,
    /// Each Server-Sent Event is one message.
    Sse,
    /// Each line is a JSON object naming its channel.
    Jsonl,
}

impl PublishArgs {
    /// The input format, `--jsonl` included.
    pub fn input_format(&self) -> InputFormat {
        if self.jsonl { InputFormat::Jsonl } else { self.format.unwrap_or(InputFormat::Lines) }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, false)
    }
}
