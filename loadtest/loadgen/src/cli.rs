//! Command line, and the checks that keep a run on this machine and within its limits.
//!
//! `--server nchan` points the same run at an Nchan server (nginx with the Nchan module,
//! `loadtest/nchan/nginx.conf`) instead of the gateway, for side-by-side comparisons.

mod floor_args;
mod run_args;
mod settings;

use clap::{Parser, Subcommand};

pub use self::{
    floor_args::{ConnectArgs, DialArgs, FanoutArgs, FloorCommand, ReadArgs},
    run_args::{NCHAN_PUB_PATH, NCHAN_SUB_PATH, PublishVia, RunArgs, ServerKind, StreamFormat, Transport},
    settings::{Role, Settings},
};

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
    Floor(FloorCommand),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The settings of `loadgen run <args>`.
    pub(crate) fn settings(args: &[&str]) -> anyhow::Result<Settings> {
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
        let err = settings(&["--server", "nchan", "--publish", "stream"]).unwrap_err().to_string();
        assert!(err.contains("no streaming publish"), "{err}");
    }

    #[test]
    fn transports_mix_over_channels_and_watchers() {
        let s = settings(&["--transport", "ws,sse", "--channels", "3", "--subscribers", "6"]).unwrap();
        assert_eq!(s.transports_label(), "ws,sse");
        // Subscriber i watches channel i % 3; watcher i / 3 of it.
        let got: Vec<_> = (0..6).map(|g| s.transport(g)).collect();
        use Transport::{Sse, Ws};
        assert_eq!(got, [Ws, Sse, Ws, Sse, Ws, Sse]);
        // With 2 channels the two watchers of each channel differ.
        let s = settings(&["--transport", "ws,sse", "--channels", "2", "--subscribers", "4"]).unwrap();
        assert_eq!((0..4).map(|g| s.transport(g)).collect::<Vec<_>>(), [Ws, Sse, Sse, Ws]);
        assert_eq!(settings(&[]).unwrap().transport(7), Ws);
        // Latency is reported per distinct transport.
        assert_eq!(s.transports(), [Ws, Sse]);
        assert_eq!(settings(&["--transport", "ws,ws"]).unwrap().transports(), [Ws]);
    }

    #[test]
    fn streams_need_one_connection_per_channel() {
        let s = settings(&["--publish", "stream", "--channels", "1000", "--subscribers", "1000"]).unwrap();
        assert_eq!(s.publisher_sockets(), 1000);
        let err = settings(&["--publish", "stream", "--channels", "10000", "--subscribers", "10000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--workers"), "{err}");
        assert!(
            settings(&[
                "--publish",
                "stream",
                "--channels",
                "10000",
                "--subscribers",
                "10000",
                "--workers",
                "2"
            ])
            .is_ok()
        );
        assert_eq!(settings(&["--publish", "http"]).unwrap().publisher_sockets(), 0);
    }
}
