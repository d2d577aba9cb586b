//! The processes of a floor measurement: what each one sets up first (a runtime, room
//! for its sockets), and the child that runs the client side (started, read line by
//! line, killed and reaped however the run ends).

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdout, Command, Stdio},
};

use anyhow::{Context, Result, ensure};

use crate::fdlimit;

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Room for `sockets` and this process's own descriptors.
pub(super) fn raise_fd_limit(sockets: usize) -> Result<()> {
    fdlimit::raise_nofile(sockets as u64 + 256)
}

/// A child process that is killed and reaped however its parent's run ends.
pub(super) struct ChildGuard(pub(super) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // After a normal exit both are no-ops (the status is already collected).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `loadgen floor <role> <args>` with piped stdin/stdout.
pub(super) fn spawn_child(role: &str, args: &[String]) -> Result<(ChildGuard, BufReader<ChildStdout>)> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .arg("floor")
        .arg(role)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `loadgen floor {role}`"))?;
    let out = child.stdout.take().map(BufReader::new);
    let child = ChildGuard(child);
    Ok((child, out.context("child stdout")?))
}

pub(super) fn read_line(out: &mut BufReader<ChildStdout>, what: &str) -> Result<String> {
    let mut line = String::new();
    out.read_line(&mut line).with_context(|| format!("reading the {what}"))?;
    ensure!(!line.is_empty(), "the {what} exited early");
    Ok(line)
}

pub(super) fn source_arg(s: &Option<String>) -> Vec<String> {
    s.iter().flat_map(|s| ["--source-ips".to_owned(), s.clone()]).collect()
}
