//! The `gateway` binary: parse configuration, set up logging and metrics, bind, run.

use std::{io::IsTerminal, process::ExitCode};

use gateway::{
    Node,
    config::{Cli, Command, Config, LogFormat, ServeArgs},
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let command = match Cli::command_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match command {
        Command::Serve(args) => serve(args),
        Command::Config(args) => match Config::from_args(args).and_then(Node::new) {
            Ok(node) => {
                println!("# gateway config: the effective settings (flags > GATEWAY_* > file > defaults).");
                println!("# Feed them back with --config; secrets are masked and left as comments.");
                print!("{}", node.config().settings.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string(), 2),
        },
        Command::Publish(args) => {
            init_tracing(LogFormat::Text);
            runtime().block_on(gateway::publish_cli::run(args))
        }
    }
}

fn fail(msg: &str, code: u8) -> ExitCode {
    eprintln!("gateway: {msg}");
    ExitCode::from(code)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts")
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let node = match Config::from_args(args).and_then(Node::new) {
        Ok(n) => n,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let config = node.config();
    init_tracing(config.log_format);
    let metrics = gateway::metrics::install();
    let (listen, admin_listen) = (config.listen, config.admin_listen);
    runtime().block_on(async move {
        let public = match gateway::server::bind(listen) {
            Ok(l) => l,
            Err(e) => return fail(&format!("cannot listen on {listen}: {e}"), 1),
        };
        let admin = match gateway::server::bind(admin_listen) {
            Ok(l) => l,
            Err(e) => return fail(&format!("cannot listen on {admin_listen} (admin): {e}"), 1),
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        match gateway::run(node, gateway::Listeners { public, admin }, shutdown, metrics).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string(), 1),
        }
    })
}

/// First SIGTERM or SIGINT: graceful shutdown. A second one: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
