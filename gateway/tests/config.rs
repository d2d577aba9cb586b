//! Configuration through the real binary: flags beat `GATEWAY_*` env beats the TOML
//! file beats defaults; secrets are never printed; invalid configuration exits
//! non-zero with one clear line. Every child gets an empty environment plus exactly
//! the variables a case sets, so the test process environment is neither read nor
//! changed.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// What a finished `gateway` run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the gateway binary with `args` and only the `env` given; kills it and panics
/// if it has not exited within [`WAIT`].
fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(gateway_bin());
    cmd.args(args).env_clear().envs(env.iter().copied());
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gateway {args:?} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Run { code: status.code(), stdout, stderr }
}

/// `gateway config ...`: asserts success and returns the printed configuration (TOML
/// that `--config` takes back).
fn effective(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    let r = run(&all, env);
    assert_eq!(r.code, Some(0), "gateway {all:?} failed: {}", r.stderr);
    assert!(toml::from_str::<toml::Table>(&r.stdout).is_ok(), "valid TOML:\n{}", r.stdout);
    r.stdout
}

/// The value of `name = value` in the printed TOML (strings without their quotes), or
/// `None` for an unset option (printed as `# name (unset)`).
fn field(out: &str, name: &str) -> String {
    if out.lines().any(|l| l == format!("# {name} (unset)")) {
        return "None".to_owned();
    }
    let table: toml::Table = toml::from_str(out).unwrap();
    match table.get(name).unwrap_or_else(|| panic!("no field {name} in:\n{out}")) {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A TOML file in a fresh temporary directory.
struct TomlFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TomlFile {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Self { _dir: dir, path }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn help_documents_the_environment_variables() {
    let r = run(&["--help"], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for var in ["GATEWAY_REDIS_URL", "GATEWAY_LISTEN", "GATEWAY_API_KEYS", "GATEWAY_CONFIG"] {
        assert!(r.stdout.contains(var), "--help mentions {var}:\n{}", r.stdout);
    }
    let r = run(&["serve", "--help"], &[]);
    assert!(r.stdout.contains("GATEWAY_REDIS_URL"), "serve --help mentions GATEWAY_REDIS_URL:\n{}", r.stdout);
}

#[test]
fn flags_beat_env_beat_file_beat_defaults() {
    let file = TomlFile::new("listen = \"127.0.0.1:1001\"\nqueue_size = 11\nmax_payload_bytes = 2001\n");
    let env = [("GATEWAY_LISTEN", "127.0.0.1:1002"), ("GATEWAY_QUEUE_SIZE", "12")];
    let flags = ["--listen", "127.0.0.1:1003", "--queue-size", "13"];

    // Defaults.
    let out = effective(&[], &[]);
    assert_eq!(field(&out, "listen"), "0.0.0.0:8080");
    assert_eq!(field(&out, "admin_listen"), "0.0.0.0:9091");
    assert_eq!(field(&out, "queue_size"), "512");
    assert_eq!(field(&out, "max_payload_bytes"), "65536");
    assert_eq!(field(&out, "redis_url"), "None", "no Redis unless configured");

    // File over defaults.
    let out = effective(&["--config", file.path()], &[]);
    assert_eq!(field(&out, "listen"), "127.0.0.1:1001");
    assert_eq!(field(&out, "queue_size"), "11");
    assert_eq!(field(&out, "max_payload_bytes"), "2001");
    assert_eq!(field(&out, "admin_listen"), "0.0.0.0:9091", "what the file leaves out stays default");

    // Env over file.
    let out = effective(&["--config", file.path()], &env);
    assert_eq!(field(&out, "listen"), "127.0.0.1:1002");
    assert_eq!(field(&out, "queue_size"), "12");
    assert_eq!(field(&out, "max_payload_bytes"), "2001", "the file still supplies what env does not");

    // Flags over env over file.
    let mut args = vec!["--config", file.path()];
    args.extend_from_slice(&flags);
    let out = effective(&args, &env);
    assert_eq!(field(&out, "listen"), "127.0.0.1:1003");
    assert_eq!(field(&out, "queue_size"), "13");
    assert_eq!(field(&out, "max_payload_bytes"), "2001");

    // Each key is merged on its own: a flag for one, env for another, file for a third.
    let out = effective(
        &["--config", file.path(), "--listen", "127.0.0.1:1003"],
        &[("GATEWAY_QUEUE_SIZE", "12"), ("GATEWAY_MAX_CHANNELS_PER_CONNECTION", "7")],
    );
    assert_eq!(field(&out, "listen"), "127.0.0.1:1003");
    assert_eq!(field(&out, "queue_size"), "12");
    assert_eq!(field(&out, "max_payload_bytes"), "2001");
    assert_eq!(field(&out, "max_channels_per_connection"), "7");

    // `GATEWAY_CONFIG` names the file too; `--config` beats it.
    let other = TomlFile::new("listen = \"127.0.0.1:1004\"\n");
    let out = effective(&[], &[("GATEWAY_CONFIG", file.path())]);
    assert_eq!(field(&out, "listen"), "127.0.0.1:1001");
    let out = effective(&["--config", other.path()], &[("GATEWAY_CONFIG", file.path())]);
    assert_eq!(field(&out, "listen"), "127.0.0.1:1004");
    assert_eq!(field(&out, "queue_size"), "512", "only the file named by the flag is read");
}

#[test]
fn secrets_are_never_printed() {
    const PASSWORD: &str = "hunter2-pw";
    let url = format!("redis://user:{PASSWORD}@127.0.0.1:6390/0");
    let env_keys = [("GATEWAY_API_KEYS", "env-secret-1,env-secret-2,env-secret-3")];
    let secrets = [PASSWORD, "env-secret", "flag-secret", "file-secret"];
    let check = |r: &Run, what: &str| {
        for s in secrets {
            assert!(
                !r.stdout.contains(s) && !r.stderr.contains(s),
                "{what} printed {s:?}:\n{}{}",
                r.stdout,
                r.stderr
            );
        }
    };

    // From flag and env.
    let r = run(&["config", "--redis-url", &url], &env_keys);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check(&r, "config (flag URL, env keys)");
    assert!(r.stdout.contains("\"redis://user:***@127.0.0.1:6390/0\""), "URL shown masked:\n{}", r.stdout);
    assert_eq!(r.stdout.matches("\"***\"").count(), 3, "three keys from env, each masked:\n{}", r.stdout);

    // Flag keys beat env keys (one key, not three), still masked.
    let r = run(&["config", "--api-keys", "flag-secret"], &env_keys);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check(&r, "config (flag keys)");
    assert_eq!(r.stdout.matches("\"***\"").count(), 1, "the flag's one key:\n{}", r.stdout);

    // From env URL and from the file.
    let r = run(&["config"], &[("GATEWAY_REDIS_URL", url.as_str())]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check(&r, "config (env URL)");
    assert!(r.stdout.contains("redis://user:***@"), "{}", r.stdout);
    let file = TomlFile::new(&format!(
        "redis_url = \"redis://:{PASSWORD}@127.0.0.1:6390\"\napi_keys = [\"file-secret-a\", \"file-secret-b\"]\n"
    ));
    let r = run(&["config", "--config", file.path()], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    check(&r, "config (file)");
    assert!(r.stdout.contains("\"redis://:***@127.0.0.1:6390\""), "{}", r.stdout);
    assert_eq!(r.stdout.matches("\"***\"").count(), 2, "{}", r.stdout);

    // An invalid URL is quoted in the error, masked too.
    let r = run(&["config", "--redis-url", &format!("http://user:{PASSWORD}@db:6379")], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    check(&r, "invalid URL error");
    assert!(r.stderr.contains("http://user:***@db:6379"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_never_print_the_redis_password() {
    // Nothing listens on this port: the node starts, logs its broker and the link
    // failures, and none of those lines may show the password.
    let url = format!("redis://user:hunter2-pw@127.0.0.1:{}", free_port());
    let gw = Gateway::start(Some(&url), &["--api-keys", "serve-secret-key"]);
    eventually(WAIT, "the node logs that the Redis link is down", || async {
        gw.logs().contains("link down").then_some(())
    })
    .await;
    assert_eq!(gw.ready_status().await, 503, "not ready without Redis");
    let logs = gw.logs();
    assert!(logs.contains("redis://user:***@127.0.0.1:"), "the URL is logged, masked:\n{logs}");
    assert!(!logs.contains("hunter2-pw") && !logs.contains("serve-secret-key"), "{logs}");
}

/// One invalid configuration: how it is given, and a word its error line must contain.
struct Invalid {
    what: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    says: &'static str,
}

#[test]
fn invalid_configuration_exits_non_zero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        p(&path).to_owned()
    };
    let typo = write("typo.toml", "listen = \"127.0.0.1:1\"\nqueue_sise = 5\n");
    let broken = write("broken.toml", "listen = \"127.0.0.1:1\nqueue_size = \n");
    let bad_type = write("type.toml", "queue_size = \"many\"\n");
    let bad_addr = write("addr.toml", "listen = \"not an address\"\n");
    let zero = write("zero.toml", "max_payload_bytes = 0\n");
    let missing = p(&dir.path().join("no-such-file.toml")).to_owned();
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = vec![
        Invalid { what: "--queue-size 0", args: a(&["--queue-size", "0"]), env: vec![], says: "queue_size" },
        Invalid {
            what: "GATEWAY_QUEUE_SIZE=0",
            args: vec![],
            env: vec![("GATEWAY_QUEUE_SIZE", "0".into())],
            says: "queue_size",
        },
        Invalid {
            what: "file max_payload_bytes = 0",
            args: a(&["--config", &zero]),
            env: vec![],
            says: "max_payload_bytes",
        },
        Invalid {
            what: "unknown key in file",
            args: a(&["--config", &typo]),
            env: vec![],
            says: "queue_sise",
        },
        Invalid {
            what: "TOML syntax error",
            args: a(&["--config", &broken]),
            env: vec![],
            says: "broken.toml",
        },
        Invalid {
            what: "wrong type in file",
            args: a(&["--config", &bad_type]),
            env: vec![],
            says: "type.toml",
        },
        Invalid {
            what: "bad address in file",
            args: a(&["--config", &bad_addr]),
            env: vec![],
            says: "addr.toml",
        },
        Invalid {
            what: "missing file",
            args: a(&["--config", &missing]),
            env: vec![],
            says: "no-such-file.toml",
        },
        Invalid {
            what: "file is a directory",
            args: a(&["--config", p(dir.path())]),
            env: vec![],
            says: "cannot read",
        },
        Invalid {
            what: "missing file via GATEWAY_CONFIG",
            args: vec![],
            env: vec![("GATEWAY_CONFIG", missing.clone())],
            says: "no-such-file.toml",
        },
        Invalid {
            what: "--redis-url http://x",
            args: a(&["--redis-url", "http://x"]),
            env: vec![],
            says: "redis_url",
        },
        Invalid {
            what: "GATEWAY_REDIS_URL=localhost:6379",
            args: vec![],
            env: vec![("GATEWAY_REDIS_URL", "localhost:6379".into())],
            says: "redis_url",
        },
        Invalid {
            what: "GATEWAY_HISTORY_SIZE=0",
            args: vec![],
            env: vec![("GATEWAY_HISTORY_SIZE", "0".into())],
            says: "history_size",
        },
        Invalid {
            what: "poll timeout above the maximum",
            args: a(&["--poll-timeout-secs", "90", "--poll-max-timeout-secs", "60"]),
            env: vec![],
            says: "poll_timeout_secs",
        },
    ];
    for case in &cases {
        // `config` and `serve` validate the same way; serve gets free ports in case
        // validation wrongly passes (then `run` panics on the still-running node).
        for sub in [&["config"][..], &["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]] {
            let mut args: Vec<&str> = sub.to_vec();
            args.extend(case.args.iter().map(String::as_str));
            let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = run(&args, &env);
            let what = format!("{} ({})", case.what, sub[0]);
            assert_eq!(r.code, Some(2), "{what}: exit code; stderr {}", r.stderr);
            assert!(r.stdout.is_empty(), "{what}: nothing on stdout: {}", r.stdout);
            let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{what}: exactly one stderr line:\n{}", r.stderr);
            assert!(
                lines[0].starts_with("gateway: invalid configuration: "),
                "{what}: the line says what is wrong: {}",
                lines[0]
            );
            assert!(lines[0].contains(case.says), "{what}: the line names {:?}: {}", case.says, lines[0]);
        }
    }
}

#[test]
fn serve_exits_with_a_clear_line_when_an_address_is_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (args, says) in [
        (["--listen", addr.as_str(), "--admin-listen", "127.0.0.1:0"], format!("cannot listen on {addr}")),
        (
            ["--listen", "127.0.0.1:0", "--admin-listen", addr.as_str()],
            format!("cannot listen on {addr} (admin)"),
        ),
    ] {
        let mut all = vec!["serve"];
        all.extend_from_slice(&args);
        let r = run(&all, &[]);
        assert!(
            matches!(r.code, Some(c) if c != 0),
            "{args:?}: non-zero exit, got {:?}: {}",
            r.code,
            r.stderr
        );
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("gateway: "))
            .unwrap_or_else(|| panic!("{args:?}: a `gateway: ...` line in:\n{}", r.stderr));
        assert!(line.starts_with(&format!("gateway: {says}")), "{args:?}: {line}");
        assert!(line.to_lowercase().contains("in use"), "{args:?}: says why: {line}");
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

#[test]
fn help_never_prints_secret_env_values() {
    let env = [
        ("GATEWAY_API_KEYS", "help-secret-key"),
        ("GATEWAY_REDIS_URL", "redis://user:help-secret-pw@db:6379"),
        ("GATEWAY_API_KEY", "help-secret-publisher"),
    ];
    for args in [&["--help"][..], &["serve", "--help"], &["config", "--help"], &["publish", "--help"]] {
        let r = run(args, &env);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        for (var, _) in env {
            if r.stdout.contains(var) {
                assert!(
                    !r.stdout.contains("help-secret"),
                    "{args:?} shows the value of {var}:\n{}",
                    r.stdout
                );
            }
        }
    }
}

/// `--log-format json` writes one JSON object per line, with structured fields.
#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .env_clear()
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = None;
    for line in BufReader::new(stderr).lines().take(20) {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "gateway listening" {
            seen = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let v = seen.expect("the listening line");
    assert_eq!(v["level"], "INFO");
    assert!(v["fields"]["public"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
    assert_eq!(v["fields"]["broker"], "memory");
}

#[test]
fn sentinel_urls_are_checked_at_startup() {
    // A good one passes (`gateway config` contacts nothing) and is shown masked.
    let url = "redis+sentinel://app:pw-s3cret@127.0.0.1:26379,[::1]:26380/mymaster?db=1";
    let out = effective(&["--redis-url", url], &[("GATEWAY_REDIS_REPLICA_ACKS", "2")]);
    assert!(out.contains("redis+sentinel://app:***@127.0.0.1:26379,[::1]:26380/mymaster?db=1"), "{out}");
    assert!(!out.contains("pw-s3cret"), "{out}");
    assert_eq!(field(&out, "redis_replica_acks"), "2");
    let serve = ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--redis-url"];
    for (url, says) in [
        ("redis+sentinel://127.0.0.1:26379", "no master name"),
        ("redis+sentinel://127.0.0.1:26379,/m", "bad sentinel host"),
        ("redis+sentinel://u:pw-s3cret@127.0.0.1:sixty/m", "bad sentinel port"),
        ("redis+sentinel://127.0.0.1:26379/m?db=one", "db must be a number"),
        ("redis+sentinel://127.0.0.1:26379/m?password=x", "unknown parameter"),
    ] {
        let runs = [
            (["config", "--redis-url", url].map(str::to_owned).to_vec(), "gateway: invalid configuration: "),
            (
                serve.iter().map(|s| s.to_string()).chain([url.to_owned()]).collect(),
                "gateway: invalid configuration: ",
            ),
            (
                ["publish", "ch", "--redis-url", url].map(str::to_owned).to_vec(),
                "gateway publish: invalid configuration: ",
            ),
        ];
        for (args, prefix) in runs {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = run(&args, &[]);
            let what = format!("{url} ({})", args[0]);
            assert_eq!(r.code, Some(2), "{what}: exit code; stderr {}", r.stderr);
            let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{what}: exactly one stderr line:\n{}", r.stderr);
            assert!(lines[0].starts_with(prefix) && lines[0].contains(says), "{what}: {}", lines[0]);
            assert!(!r.stderr.contains("pw-s3cret"), "{what}: no password: {}", r.stderr);
        }
    }
}

/// The README's configuration table is the user's reference: every option the node
/// takes is there, with its flag, variable and default.
#[test]
fn the_readme_documents_every_option() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let table = &readme[readme.find("## Configuration").expect("a configuration section")..];
    for (name, env, default) in gateway::config::Settings::table() {
        let flag = format!("`--{}`", name.replace('_', "-"));
        let row = table
            .lines()
            .find(|l| l.starts_with("| ") && l.contains(&flag))
            .unwrap_or_else(|| panic!("README configuration table lacks {flag}"));
        assert!(row.contains(env), "{flag}: the row names {env}: {row}");
        if let Some(default) = default {
            assert!(row.contains(default), "{flag}: the row states the default {default}: {row}");
        }
    }
}

#[test]
fn node_options_may_come_before_the_subcommand() {
    let file = TomlFile::new("queue_size = 11\n");
    let before = effective(&[], &[]);
    // `gateway --config f.toml config` is `gateway config --config f.toml`.
    let r = run(&["--config", file.path(), "config"], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(field(&r.stdout, "queue_size"), "11");
    assert_eq!(r.stdout, effective(&["--config", file.path()], &[]));
    // A flag after the subcommand wins over one before it; one before it beats the env.
    let r = run(&["--queue-size", "5", "config", "--queue-size", "6"], &[]);
    assert_eq!(field(&r.stdout, "queue_size"), "6");
    let r = run(&["--queue-size", "5", "config"], &[("GATEWAY_QUEUE_SIZE", "7")]);
    assert_eq!(field(&r.stdout, "queue_size"), "5", "flags beat the environment wherever they stand");
    // Before `publish`, a node's options mean nothing: said clearly.
    let r = run(&["--listen", "127.0.0.1:1", "publish", "news"], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--listen is an option of a node"), "{}", r.stderr);
    assert_ne!(before, "", "defaults printed");
}

#[test]
fn the_printed_configuration_feeds_back_unchanged() {
    let out = effective(&["--queue-size", "77", "--allowed-origins", "https://a.example"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("effective.toml");
    std::fs::write(&path, &out).unwrap();
    assert_eq!(effective(&["--config", path.to_str().unwrap()], &[]), out);
}
