//! `loadgen`: load generator for the fan-out gateway.
//!
//! Opens N SSE / WebSocket / long-poll subscribers across M channels (bounded connect
//! concurrency, optionally spread over 127.0.0.x source addresses), publishes open-loop
//! at a fixed rate through Redis or the gateway's HTTP API with the scheduled send time
//! in each payload, and reports publish→receive latency (HDR histogram), missing and
//! duplicate deliveries, connect rate and errors, and the server processes' CPU time and
//! memory from /proc. See `loadtest/README.md`.

mod cli;
mod fdlimit;
mod floor;
mod http;
mod loopback;
mod net;
mod payload;
mod procfs;
mod publisher;
mod report;
mod run;
mod subscriber;
mod ws;

use clap::Parser;

use crate::{
    cli::{Cli, Command, Settings},
    fdlimit::{MAX_SUBSCRIBERS_PER_PROCESS, raise_nofile},
};

fn main() {
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Floor(cmd) => match floor::main(cmd) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("loadgen floor: {e:#}");
                std::process::exit(1);
            }
        },
    };
    let settings = match Settings::from_args(*args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = raise_fd_limit(&settings) {
        eprintln!("loadgen: {e:#}");
        std::process::exit(2);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = settings.args.threads {
        rt.worker_threads(t);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run::run(settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            1
        }
    };
    // Don't wait for the blocking stdin reader of a worker.
    rt.shutdown_background();
    std::process::exit(code);
}

/// Raises the soft open-file limit to what this process needs (up to the hard limit).
fn raise_fd_limit(s: &Settings) -> anyhow::Result<()> {
    let per_process = match s.role {
        cli::Role::Parent => 0,
        _ => s.args.subscribers.div_ceil(s.args.workers),
    };
    let publisher = match s.role {
        cli::Role::Worker(_) => 0,
        _ => s.publisher_sockets() as u64,
    };
    let need = per_process as u64
        + publisher
        + 256
        + if s.role == cli::Role::Parent { 3 * s.args.workers as u64 } else { 0 };
    raise_nofile(need).map_err(|e| {
        e.context(format!(
            "use more --workers (at most {MAX_SUBSCRIBERS_PER_PROCESS} subscribers per process, and fewer \
             if the hard limit is lower)"
        ))
    })
}
