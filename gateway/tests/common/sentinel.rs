//! A real Redis Sentinel set for tests: data nodes (`redis-server`, append-only file
//! on; the first starts as master, the others with `--replicaof`) and three sentinels
//! (`redis-sentinel`, or `redis-server --sentinel`), each in its own temporary directory
//! (Sentinel rewrites its config file), on free loopback ports, with a 1 s
//! `down-after-milliseconds`. Everything is killed on drop, also when a test fails.
//! Include it with `#[path = "common/sentinel.rs"] mod sentinel;` next to `mod common;`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{WAIT, free_port};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "fanout-test";
/// `down-after-milliseconds`: how long a master may be silent before it counts as down.
pub const DOWN_AFTER_MS: u64 = 1000;
/// Sentinels in the set (a majority of 2 elects the failover leader).
pub const SENTINELS: usize = 3;

/// One process with its own directory.
struct Proc {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A master, its replicas and three sentinels.
pub struct SentinelSet {
    nodes: Vec<Proc>,
    sentinels: Vec<Proc>,
    /// Extra `redis-server` arguments of every data node.
    node_args: Vec<String>,
}

impl SentinelSet {
    /// Starts 1 master + `replicas` replicas + 3 sentinels and waits until every
    /// sentinel sees the replicas and the other sentinels (before that a failover
    /// cannot be elected).
    pub fn start(replicas: usize) -> Self {
        Self::start_with(replicas, &[])
    }

    /// [`Self::start`], with extra `redis-server` arguments for the data nodes (e.g.
    /// `--min-replicas-to-write 1`).
    pub fn start_with(replicas: usize, node_args: &[&str]) -> Self {
        let node_args: Vec<String> = node_args.iter().map(|a| a.to_string()).collect();
        let mut set = Self { nodes: Vec::new(), sentinels: Vec::new(), node_args };
        for i in 0..=replicas {
            let mut node = Proc { port: free_port(), child: None, dir: tempfile::tempdir().unwrap() };
            let master = (i > 0).then(|| set.nodes[0].port);
            spawn_node(&mut node, master, &set.node_args);
            set.nodes.push(node);
        }
        let master = set.nodes[0].port;
        eventually_sync(&format!("{replicas} replicas in sync"), || {
            let info = cli(master, &["INFO", "replication"])?;
            (info.matches("state=online").count() == replicas).then_some(())
        });
        for _ in 0..SENTINELS {
            let mut s = Proc { port: free_port(), child: None, dir: tempfile::tempdir().unwrap() };
            let conf = s.dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    port = s.port,
                    dir = s.dir.path().display(),
                ),
            )
            .unwrap();
            s.child = Some(spawn_sentinel(&conf));
            set.sentinels.push(s);
        }
        for s in &set.sentinels {
            let port = s.port;
            eventually_sync("sentinels see each other and the replicas", || {
                let info = cli(port, &["SENTINEL", "MASTER", MASTER_NAME])?;
                let field = |name: &str| -> Option<String> {
                    let lines: Vec<&str> = info.lines().collect();
                    let i = lines.iter().position(|l| *l == name)?;
                    lines.get(i + 1).map(|v| v.to_string())
                };
                let others = field("num-other-sentinels")?.parse::<usize>().ok()?;
                let slaves = field("num-slaves")?.parse::<usize>().ok()?;
                (others == SENTINELS - 1 && slaves == replicas).then_some(())
            });
        }
        set
    }

    /// `redis+sentinel://` URL naming every sentinel.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The master's port, as the first sentinel that answers names it.
    pub fn master_port(&self) -> u16 {
        for s in &self.sentinels {
            if let Some(out) = cli(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
                && let Some(port) = out.lines().nth(1).and_then(|p| p.trim().parse().ok())
            {
                return port;
            }
        }
        panic!("no sentinel names the master");
    }

    /// Waits until every running sentinel names the same master other than `old`, and it says
    /// it is one (bringing `old` back before all of them agree can start another
    /// failover).
    pub fn wait_for_new_master(&self, old: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .filter(|s| s.child.is_some())
                .map(|s| {
                    cli(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
                        .and_then(|out| out.lines().nth(1).and_then(|p| p.trim().parse().ok()))
                })
                .collect();
            if let Some(Some(port)) = named.first().copied()
                && port != old
                && named.iter().all(|n| *n == Some(port))
                && cli(port, &["ROLE"]).is_some_and(|r| r.starts_with("master"))
            {
                return port;
            }
            assert!(Instant::now() < deadline, "no failover away from {old} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ports of the data nodes (the first started as master).
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis-cli -p <port> args...` on a data node; panics when it fails.
    pub fn node_cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args).unwrap_or_else(|| panic!("redis-cli -p {port} {args:?} failed"))
    }

    /// `redis-cli` on the first sentinel that answers.
    pub fn sentinel_cli(&self, args: &[&str]) -> String {
        self.sentinels
            .iter()
            .find_map(|s| cli(s.port, args))
            .unwrap_or_else(|| panic!("no sentinel answered {args:?}"))
    }

    /// Port of sentinel `i` (in the URL's order).
    pub fn sentinel_port(&self, i: usize) -> u16 {
        self.sentinels[i].port
    }

    /// SIGKILLs sentinel `i`.
    pub fn kill_sentinel(&mut self, i: usize) {
        self.sentinels[i].kill();
    }

    /// SIGKILLs the data node on `port`.
    pub fn kill_node(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// Sends a signal (`STOP`, `CONT`) to the data node on `port`.
    pub fn signal_node(&self, port: u16, sig: &str) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("a data node");
        let pid = node.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args(["-s", sig, &pid]).status().unwrap().success());
    }

    /// Restarts the (killed) data node on `port` from its append-only file, as a
    /// replica of `master`, and waits until it is in sync.
    pub fn restart_as_replica(&mut self, port: u16, master: u16) {
        let args = self.node_args.clone();
        let node = self.node_mut(port);
        node.kill();
        spawn_node(node, Some(master), &args);
        eventually_sync("restarted node in sync", || {
            let info = cli(port, &["INFO", "replication"])?;
            info.contains("master_link_status:up").then_some(())
        });
    }

    fn node_mut(&mut self, port: u16) -> &mut Proc {
        self.nodes.iter_mut().find(|n| n.port == port).expect("a data node")
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for p in self.sentinels.iter_mut().chain(self.nodes.iter_mut()) {
            p.kill();
        }
    }
}

/// Starts `redis-server` for `node` (a replica of `master` when given) and waits for PONG.
fn spawn_node(node: &mut Proc, master: Option<u16>, extra: &[String]) {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &node.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "everysec"])
        // A replica syncs at once instead of after the default 5 s wait for others.
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(node.dir.path())
        .args(extra);
    if let Some(m) = master {
        cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server)");
    node.child = Some(child);
    let port = node.port;
    eventually_sync(&format!("redis-server on {port}"), || (cli(port, &["PING"])? == "PONG").then_some(()));
}

/// `redis-sentinel <conf>`, or `redis-server <conf> --sentinel` where the former is missing.
fn spawn_sentinel(conf: &std::path::Path) -> Child {
    let sentinel = ["/usr/bin/redis-sentinel", "/usr/local/bin/redis-sentinel"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let mut cmd = match sentinel {
        Some(bin) => {
            let mut c = Command::new(bin);
            c.arg(conf);
            c
        }
        None => {
            let mut c = Command::new("redis-server");
            c.arg(conf).arg("--sentinel");
            c
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("redis-sentinel starts")
}

/// `redis-cli -p <port> args...`: stdout without the final newline, if it succeeded.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned();
    (out.status.success() && !text.starts_with("ERR") && !text.starts_with("Could not connect"))
        .then_some(text)
}

/// Polls `f` every 50 ms until it answers, or panics after [`WAIT`].
fn eventually_sync<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
