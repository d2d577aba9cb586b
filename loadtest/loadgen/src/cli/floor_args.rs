//! Flags of `loadgen floor` and its subcommands (the hidden ones are the child
//! processes' own).

use clap::{Args, Subcommand};

/// `loadgen floor …`.
#[derive(Debug, Subcommand)]
pub enum FloorCommand {
    /// One writer, N sockets, a record per socket per message: CPU per delivery and latency.
    Fanout(FanoutArgs),
    /// Minimal accept / request head / response head / hold: connections per second.
    Connect(ConnectArgs),
    /// (child of `floor fanout`) connect and read records.
    #[command(hide = true)]
    Read(ReadArgs),
    /// (child of `floor connect`) dial and read the response head.
    #[command(hide = true)]
    Dial(DialArgs),
}

/// Flags of `loadgen floor fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Channels: connection i is on channel i % channels; message r goes to channel
    /// r % channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Messages per second, in total across the channels.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Writer threads, each with its share of the connections.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Source addresses for the reader's sockets (as `loadgen run --source-ips`).
    #[arg(long)]
    pub source_ips: Option<String>,
}

/// Flags of `loadgen floor connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Connections to open (and hold).
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connection attempts in flight.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Source addresses for the dialer's sockets.
    #[arg(long)]
    pub source_ips: Option<String>,
}

/// Flags of the hidden `floor read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    #[arg(long)]
    pub(crate) port: u16,
    #[arg(long)]
    pub(crate) subscribers: usize,
    /// Records expected in all: "drained" is printed once they are in.
    #[arg(long)]
    pub(crate) expect: u64,
    /// Seconds from "ready" until it stops waiting for them ("not drained").
    #[arg(long)]
    pub(crate) within_secs: f64,
    #[arg(long)]
    pub(crate) source_ips: Option<String>,
}

/// Flags of the hidden `floor dial`.
#[derive(Debug, Args)]
pub struct DialArgs {
    #[arg(long)]
    pub(crate) port: u16,
    #[arg(long)]
    pub(crate) connections: usize,
    #[arg(long)]
    pub(crate) concurrency: usize,
    #[arg(long)]
    pub(crate) source_ips: Option<String>,
}
