//! A real local Redis Cluster for tests: six `redis-server --cluster-enabled yes`
//! processes on free loopback ports (3 masters, 3 replicas, made by `redis-cli --cluster
//! create`), a short `cluster-node-timeout` so failovers take about a second, and an
//! append-only file so a killed node comes back with its data. Every process is killed
//! and every file removed on drop, also when a test fails. Included with `#[path]` by
//! the tests that need it, so other test binaries are untouched.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::common::free_port;

/// How long the cluster may take to form or to settle after a fault.
const SETTLE: Duration = Duration::from_secs(30);

/// One node of the cluster.
pub struct Node {
    pub port: u16,
    bus: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-port", &self.bus.to_string()])
            .args(["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            // Replicas sync at once, not 5 s after they asked (Redis's default).
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + SETTLE;
        while cli_at(self.port, &["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process runs.
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }
}

/// `redis-cli -p port args...`: its output without the final newline, if it ran.
fn cli_at(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned())
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    pub slots: Vec<(u16, u16)>,
}

/// Three masters with one replica each.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts six nodes and joins them into a cluster; returns once every node sees
    /// the cluster healthy.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut node = Node { port: free_port(), bus: free_port(), dir: node_dir, child: None };
            node.start();
            nodes.push(node);
        }
        let cluster = Self { nodes, _dir: dir };
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        cluster.wait_healthy();
        cluster
    }

    /// The gateway URL naming three of the nodes as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().take(3).map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// `redis-cli -p <node i's port> args...`.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        cli_at(self.nodes[i].port, args).unwrap_or_else(|| panic!("redis-cli {args:?} on node {i} failed"))
    }

    /// `redis-cli -c` (follows redirects) on a live node.
    pub fn cli_c(&self, args: &[&str]) -> String {
        let node = self.nodes.iter().find(|n| n.alive()).expect("a live node");
        let out =
            Command::new("redis-cli").args(["-c", "-p", &node.port.to_string()]).args(args).output().unwrap();
        assert!(out.status.success(), "redis-cli -c {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned()
    }

    /// The slot of `key`, as Redis computes it.
    pub fn keyslot(&self, key: &str) -> u16 {
        self.cli_c(&["CLUSTER", "KEYSLOT", key]).trim().parse().unwrap()
    }

    /// `CLUSTER NODES` as seen by a live node.
    pub fn view(&self) -> Vec<NodeInfo> {
        let node = self.nodes.iter().find(|n| n.alive()).expect("a live node");
        let text = cli_at(node.port, &["CLUSTER", "NODES"]).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let flags = f.get(2)?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|x| (x, x)),
                    })
                    .collect();
                Some(NodeInfo {
                    id: f[0].to_owned(),
                    port,
                    master: flags.contains("master"),
                    failed: flags.contains("fail"),
                    master_id: (f[3] != "-").then(|| f[3].to_owned()),
                    slots,
                })
            })
            .collect()
    }

    /// The index (into `nodes`) of the node with `port`.
    pub fn index_of(&self, port: u16) -> usize {
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }

    /// The index of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> usize {
        let view = self.view();
        let m = view
            .iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {view:?}"));
        self.index_of(m.port)
    }

    /// The indexes of the masters that serve slots.
    pub fn masters(&self) -> Vec<usize> {
        self.view()
            .iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .map(|n| self.index_of(n.port))
            .collect()
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        self.cli(i, &["CLUSTER", "MYID"])
    }

    /// The index of a replica of master `i`.
    pub fn replica_of(&self, i: usize) -> usize {
        let id = self.id(i);
        let view = self.view();
        let r = view.iter().find(|n| n.master_id.as_deref() == Some(&id)).expect("a replica");
        self.index_of(r.port)
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (it keeps its cluster config and data).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].start();
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees on three
    /// masters covering all slots with no node marked failed, and every live replica's
    /// link to its master is up (so `WAIT` can be answered).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let ok = self.nodes.iter().filter(|n| n.alive()).all(|n| {
                cli_at(n.port, &["CLUSTER", "INFO"]).is_some_and(|info| info.contains("cluster_state:ok"))
                    && cli_at(n.port, &["CLUSTER", "NODES"]).is_some_and(|nodes| {
                        !nodes.contains("fail") && nodes.lines().filter(|l| l.contains("master")).count() == 3
                    })
                    && cli_at(n.port, &["INFO", "replication"]).is_some_and(|info| {
                        info.contains("role:master") || info.contains("master_link_status:up")
                    })
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle: {:?}", self.view());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until node `i` is a master serving slots.
    pub fn wait_master(&self, i: usize) {
        let deadline = Instant::now() + SETTLE;
        while !cli_at(self.nodes[i].port, &["ROLE"]).is_some_and(|r| r.starts_with("master")) {
            assert!(Instant::now() < deadline, "node {i} did not become master: {:?}", self.view());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Moves `slot` from master `from` to master `to` the way `redis-cli --cluster
    /// reshard` does: importing/migrating, every key migrated, then the new owner set
    /// on every master.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let (from_id, to_id) = (self.id(from), self.id(to));
        let s = slot.to_string();
        self.cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        self.cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        let to_port = self.nodes[to].port.to_string();
        for _ in 0..10_000 {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let out = self.cli(from, &args);
            assert!(out == "OK" || out == "NOKEY", "MIGRATE: {out}");
        }
        self.cli(to, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        self.cli(from, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        for m in self.masters() {
            if m != from && m != to {
                self.cli(m, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}
