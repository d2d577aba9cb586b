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
    run_args::{NCHAN_PUB_PATH, NCHAN_SUB_PATH, PublishVia, RunArgs, ServerKind, Transport},
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
    }
}
