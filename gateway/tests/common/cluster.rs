//! The compose topology for tests: a `redis-server`, three gateway nodes on fixed
//! loopback ports (so a node restarts where the balancer expects it) and nginx running
//! `deploy/nginx/nginx.conf` as rendered by `deploy/local-cluster.sh render-nginx` —
//! the file compose mounts, with loopback addresses. Everything is stopped on drop,
//! also when a test fails.
//!
//! Without nginx the tests are skipped with a message, unless `CI` is set: then they
//! fail, so CI cannot pass by skipping them.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Redis, WAIT, free_port, gateway_bin};

/// Nodes behind the balancer, as in `docker-compose.yml` (checked there).
pub const NODES: usize = 3;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("gateway/ has a parent").to_path_buf()
}

/// The local-cluster script, which also renders the configs.
pub fn script() -> PathBuf {
    repo_root().join("deploy/local-cluster.sh")
}

/// The nginx binary: on the PATH, or where Debian puts it (`/usr/sbin` is not on a
/// non-root user's PATH).
pub fn nginx_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin/nginx".into(), "/usr/local/sbin/nginx".into()])
        .find(|p| p.is_file())
}

/// nginx, or `None` after saying why the test is skipped. Panics when `CI` is set.
pub fn nginx_or_skip(test: &str) -> Option<PathBuf> {
    let bin = nginx_bin();
    if bin.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but nginx is missing: `apt-get install nginx` (.ci/run installs it)"
        );
        eprintln!("SKIPPED {test}: nginx is not installed (apt-get install nginx); CI runs it");
    }
    bin
}

/// Runs `deploy/local-cluster.sh <args>` with `env`; its stdout.
pub fn run_script(args: &[&str], env: &[(&str, String)]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "deploy/local-cluster.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A gateway node on fixed ports, restartable in place.
pub struct Node {
    /// Public listener (behind nginx).
    pub public: SocketAddr,
    /// Admin listener (metrics, readiness): never behind nginx.
    pub admin: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn new(redis_url: &str, extra: &[&str]) -> Self {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> =
            ["--listen", &public.to_string(), "--admin-listen", &admin.to_string(), "--redis-url", redis_url]
                .map(String::from)
                .to_vec();
        if !extra.contains(&"--linger-ms") {
            args.extend(["--linger-ms", "200"].map(String::from));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = Self { public, admin, args, child: None, logs: Arc::default() };
        node.start();
        node
    }

    /// Starts the process (again) and waits until it listens.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.public);
        let mut child = Command::new(gateway_bin())
            .args(&self.args)
            .env("RUST_LOG", "info,gateway=debug")
            .env_remove("GATEWAY_REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway listening") {
                    let _ = tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        if rx.recv_timeout(WAIT).is_err() {
            panic!("node {} did not start; logs:\n{}", self.public, self.logs());
        }
    }

    /// Everything the node logged, over all its runs.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Sends a signal (`TERM`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args(["-s", sig, &pid]).status().unwrap().success());
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("started");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/readyz` status code, 0 when nothing answers.
    pub async fn ready_status(&self) -> u16 {
        let url = format!("http://{}/readyz", self.admin);
        match reqwest::Client::new().get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// One metric's value (exact name with labels), 0 when absent or unreachable.
    pub async fn metric(&self, name_with_labels: &str) -> f64 {
        let url = format!("http://{}/metrics", self.admin);
        let Ok(resp) = reqwest::Client::new().get(url).timeout(Duration::from_secs(2)).send().await else {
            return 0.0;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name_with_labels).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- node {} logs ----\n{}", self.public, self.logs());
        }
    }
}

/// nginx in the foreground, in its own process group, with its own prefix directory.
pub struct Nginx {
    /// The balancer's address.
    pub addr: SocketAddr,
    /// The rendered configuration.
    pub conf: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Renders the compose config for `upstreams` (optionally with another
    /// `proxy_read_timeout`), checks it with `nginx -t` and starts nginx.
    pub fn start(bin: &Path, upstreams: &[SocketAddr], read_timeout: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let ups: Vec<String> = upstreams.iter().map(|a| a.to_string()).collect();
        let mut env = vec![
            ("NGINX_UPSTREAMS", ups.join(" ")),
            ("NGINX_LISTEN", addr.to_string()),
            ("NGINX_DIR", dir.path().display().to_string()),
        ];
        if let Some(t) = read_timeout {
            env.push(("NGINX_READ_TIMEOUT", t.to_string()));
        }
        let conf = run_script(&["render-nginx"], &env);
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, &conf).unwrap();
        let args = |cmd: &mut Command| {
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.path().join("nginx-error.log"));
        };
        let mut test = Command::new(bin);
        args(&mut test);
        let out = test.arg("-t").output().expect("nginx -t runs");
        assert!(out.status.success(), "nginx -t: {}\n{conf}", String::from_utf8_lossy(&out.stderr));

        let mut cmd = Command::new(bin);
        args(&mut cmd);
        // Its own group, so the workers can be killed with the master if it hangs.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Self { addr, conf, child: Some(child), dir };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {addr}:\n{}", nginx.error_log());
            if let Some(status) = nginx.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nginx exited ({status}):\n{}", nginx.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nginx-error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id().to_string();
        // Fast shutdown (closes long-lived connections), then the whole group if stuck.
        let _ = Command::new("kill").args(["-s", "TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{pid}")]).status();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("---- nginx error log ----\n{}", self.error_log());
        }
    }
}

/// Redis, the nodes and nginx in front of them. Dropped balancer first, Redis last.
pub struct Cluster {
    /// The balancer.
    pub nginx: Nginx,
    /// The gateway nodes, in upstream order.
    pub nodes: Vec<Node>,
    /// The shared Redis (append-only file on, as in compose).
    pub redis: Redis,
}

impl Cluster {
    /// Starts the cluster; `node_args` go to every node. `None` when nginx is missing
    /// (the test is skipped; see [`nginx_or_skip`]).
    pub fn start(test: &str, node_args: &[&str], read_timeout: Option<&str>) -> Option<Self> {
        let bin = nginx_or_skip(test)?;
        let redis = Redis::start_persistent();
        let nodes: Vec<Node> = (0..NODES).map(|_| Node::new(&redis.url(), node_args)).collect();
        let upstreams: Vec<SocketAddr> = nodes.iter().map(|n| n.public).collect();
        let nginx = Nginx::start(&bin, &upstreams, read_timeout);
        Some(Self { nginx, nodes, redis })
    }

    /// An HTTP URL through the balancer.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.nginx.addr)
    }

    /// A WebSocket URL through the balancer.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.nginx.addr)
    }

    /// A metric summed over the nodes that answer.
    pub async fn metric_sum(&self, name_with_labels: &str) -> f64 {
        let mut sum = 0.0;
        for n in &self.nodes {
            sum += n.metric(name_with_labels).await;
        }
        sum
    }
}
