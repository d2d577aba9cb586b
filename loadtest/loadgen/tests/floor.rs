//! `loadgen floor` end to end: the parent and its child process on loopback, small scale.

use std::process::Command;

fn loadgen(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().expect("running loadgen");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn fanout_floor_delivers_every_record_and_reports_both_sides() {
    let (ok, out) = loadgen(&[
        "floor",
        "fanout",
        "--subscribers",
        "30",
        "--channels",
        "3",
        "--rate",
        "40",
        "--duration",
        "0.5",
        "--source-ips",
        "127.0.0.2-127.0.0.4",
    ]);
    assert!(ok, "{out}");
    // 20 messages round-robin over 3 channels of 10 connections: 7 + 7 + 6 per connection.
    assert!(out.contains("expected 200  received 200  missing 0  reordered 0"), "{out}");
    assert!(out.contains("writer") && out.contains("reader") && out.contains("latency ms  p50"), "{out}");
}

#[test]
fn connect_floor_accepts_and_holds_every_connection() {
    let (ok, out) = loadgen(&["floor", "connect", "--connections", "300", "--concurrency", "50"]);
    assert!(ok, "{out}");
    assert!(out.contains("300 ok, 0 failed"), "{out}");
    assert!(out.contains("server held 300"), "{out}");
}

#[test]
fn floor_rejects_out_of_range_settings() {
    let (ok, out) = loadgen(&["floor", "fanout", "--subscribers", "0"]);
    assert!(!ok);
    assert!(out.contains("--subscribers"), "{out}");
    let (ok, out) = loadgen(&["floor", "fanout", "--subscribers", "10", "--channels", "11"]);
    assert!(!ok);
    assert!(out.contains("--channels"), "{out}");
}
