//! `loadgen floor`: what this machine's kernel charges for the work a fan-out server
//! cannot avoid, measured without any server.
//!
//! - `floor fanout`: N loopback TCP connections, a writer that sends one 100-byte record
//!   per connection per message at a fixed rate (several records in one write only when
//!   it has fallen behind, as a batching server would), and a reader process that reads
//!   them like a lean client. Reports the writer's and the reader's CPU per delivery and
//!   the send→receive latency. No HTTP, no framing, no queues: a server that writes each
//!   message to each socket cannot do better on the same machine.
//! - `floor connect`: a minimal accept loop (read a request head, write a fixed
//!   `101 Switching Protocols` head, hold the socket) against a minimal dialer; reports
//!   connections per second and the CPU per connection of each side.
//!
//! Both run the client side in a child process (`loadgen floor read` / `floor dial`,
//! not for direct use) so the CPU of each side is read from `/proc` separately, as a
//! `loadgen run` reads a server's.

mod connect;
mod fanout;
mod process;
mod read;
mod record;

use anyhow::Result;

use self::{
    connect::{connect, dial},
    fanout::fanout,
    process::runtime,
    read::read,
};
use crate::cli::FloorCommand;

/// Runs a `floor` subcommand; the process exit code.
pub fn main(cmd: FloorCommand) -> Result<i32> {
    match cmd {
        FloorCommand::Fanout(a) => fanout(a),
        FloorCommand::Connect(a) => connect(a),
        FloorCommand::Read(a) => runtime()?.block_on(read(a)),
        FloorCommand::Dial(a) => runtime()?.block_on(dial(a)),
    }
}
