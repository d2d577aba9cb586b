//! Redis Sentinel with real processes: a master, a replica and three sentinels
//! (`common/sentinel.rs`), two gateway nodes on `redis+sentinel://`, and SSE, WebSocket
//! and long-poll subscribers that stay connected while the master fails over — killed
//! (SIGKILL) or handed over (`SENTINEL FAILOVER`) in the middle of a 1,000-message
//! numbered stream published through a node with idempotency keys and retries. Every
//! subscriber ends with every message exactly once, in order; readiness fails and
//! recovers; raw `PUBLISH` on the new master reaches them. And `--redis-replica-acks`:
//! a publish no replica acknowledges is not reported as done.
//!
//! A publish the old master ran and fanned out but had not yet handed to the replica
//! when that replica was promoted is lost from history; the gateway publishes it again
//! on the new master, under a new id but with the same key in its frame, and the nodes
//! drop the repeat of a key they delivered: subscribers still see it once. (During a
//! handover that window is the replication delay, a sub-millisecond on loopback, yet
//! often hit by a publisher sending back to back.)

mod common;
#[path = "common/sentinel.rs"]
mod sentinel;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt;
use sentinel::SentinelSet;
use shared::protocol::ServerFrame;
use tokio_tungstenite::tungstenite::Message;

/// Messages in the numbered stream.
const MESSAGES: usize = 1000;
/// The failover starts after this many were published.
const FAIL_AFTER: usize = 300;
/// Bound on the whole stream, failover included.
const STREAM_DEADLINE: Duration = Duration::from_secs(90);

/// What one subscriber received: `(id, data)` of each message, and reset notices.
#[derive(Default)]
struct Received {
    messages: Vec<(Option<String>, String)>,
    resets: usize,
}

type Shared = Arc<Mutex<Received>>;

/// Reads an SSE stream into `out` in the background.
async fn sse_collector(gw: &Gateway, ch: &str) -> (Shared, SseClient) {
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let out = Shared::default();
    let sink = out.clone();
    let mut events = std::mem::replace(&mut sse.events, tokio::sync::mpsc::unbounded_channel().1);
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let mut r = sink.lock().unwrap();
            match ev.event.as_deref() {
                Some("reset") => r.resets += 1,
                _ => r.messages.push((ev.id, ev.data)),
            }
        }
    });
    (out, sse)
}

/// Subscribes a WebSocket and reads it into `out` in the background.
async fn ws_collector(gw: &Gateway, ch: &str) -> Shared {
    let mut ws = ws_connect(&gw.ws_url("/ws")).await;
    ws_subscribe(&mut ws, &[ch]).await;
    let out = Shared::default();
    let sink = out.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let mut r = sink.lock().unwrap();
            match serde_json::from_str(&text) {
                Ok(ServerFrame::Message { id, data, .. }) => r.messages.push((id, data)),
                Ok(ServerFrame::Reset { .. }) => r.resets += 1,
                _ => {}
            }
        }
    });
    out
}

/// Long-polls `ch` on `gw` from where it stands now, into `out`, until the message
/// `last` came or `deadline` passed.
async fn poll_collector(gw: &Gateway, ch: &str, last: String, deadline: Instant) -> Shared {
    let mut cursor = poll(gw, &format!("channel={ch}&timeout=0")).await.cursor;
    let out = Shared::default();
    let sink = out.clone();
    let url = gw.url("/poll");
    let ch = ch.to_owned();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        while Instant::now() < deadline && !sink.lock().unwrap().messages.iter().any(|(_, d)| *d == last) {
            let req =
                client.get(&url).query(&[("channel", ch.as_str()), ("cursor", &cursor), ("timeout", "5")]);
            let Ok(resp) = req.send().await else { continue };
            let Ok(body) = resp.json::<shared::protocol::PollResponse>().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut r = sink.lock().unwrap();
            r.resets += usize::from(body.reset);
            r.messages.extend(body.messages.into_iter().map(|m| (m.id, m.data)));
            cursor = body.cursor;
        }
    });
    out
}

/// Publishes `data` with history and idempotency key `key` through `gw`, again and again
/// until it is accepted (or `deadline`); returns the attempts it took.
async fn publish_until_accepted(gw: &Gateway, ch: &str, data: &str, key: &str, deadline: Instant) -> usize {
    let client = reqwest::Client::new();
    for attempt in 1.. {
        let resp = client
            .post(gw.url("/api/publish"))
            .timeout(Duration::from_secs(15))
            .json(&serde_json::json!({"channel": ch, "data": data, "idempotency_key": key}))
            .send()
            .await;
        if resp.is_ok_and(|r| r.status() == 200) {
            return attempt;
        }
        assert!(Instant::now() < deadline, "message {data} not accepted before the deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Records every `/readyz` status change of `gw` until `stop` is set.
fn watch_readiness(gw: &Gateway, stop: Arc<std::sync::atomic::AtomicBool>) -> Arc<Mutex<Vec<u16>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let url = gw.admin_url("/readyz");
    tokio::spawn(async move {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let status = client.get(&url).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            {
                let mut s = out.lock().unwrap();
                if s.last() != Some(&status) {
                    s.push(status);
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    seen
}

/// Asserts `got` is exactly `0..MESSAGES`, in order, each with a history id, ids
/// increasing, and no reset notice.
fn assert_exactly_once(what: &str, got: &Received) {
    let datas: Vec<&str> = got.messages.iter().map(|(_, d)| d.as_str()).collect();
    let want: Vec<String> = (0..MESSAGES).map(|i| i.to_string()).collect();
    if datas != want {
        let dups = datas.len() - datas.iter().collect::<std::collections::HashSet<_>>().len();
        let missing: Vec<&String> = want.iter().filter(|w| !datas.contains(&w.as_str())).take(10).collect();
        panic!(
            "{what}: {} messages, {dups} duplicated, missing (first 10) {missing:?}, resets {}",
            datas.len(),
            got.resets
        );
    }
    assert_eq!(got.resets, 0, "{what}: no reset notice");
    let ids: Vec<shared::StreamPos> = got
        .messages
        .iter()
        .map(|(id, _)| id.as_deref().expect("history id").rsplit('~').next().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{what}: ids increase");
}

/// How the master leaves in [`stream_through_failover`].
#[derive(Clone, Copy, Debug)]
enum Failover {
    /// SIGKILL, then the old master is restarted as a replica of the new one.
    Kill,
    /// `SENTINEL FAILOVER`: the old master stays up until the sentinels demote it; the
    /// data nodes run `min-replicas-to-write 1`, so it refuses writes once its replica
    /// left.
    Graceful,
}

/// The whole scenario: two nodes, five subscribers, a numbered stream, a failover in
/// the middle of it.
async fn stream_through_failover(how: Failover) {
    let started = Instant::now();
    let node_args: &[&str] = match how {
        Failover::Graceful => &["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"],
        Failover::Kill => &[],
    };
    let set = Arc::new(Mutex::new(SentinelSet::start_with(1, node_args)));
    let url = set.lock().unwrap().url();
    let acks = ["--redis-replica-acks", "1"];
    let n1 = Gateway::start(Some(&url), &acks);
    let n2 = Gateway::start(Some(&url), &acks);
    for n in [&n1, &n2] {
        eventually(WAIT, "node ready through Sentinel", || async {
            (n.ready_status().await == 200).then_some(())
        })
        .await;
    }
    let ch = channel("sentinel");
    let deadline = Instant::now() + STREAM_DEADLINE;
    let (sse1, _sse1) = sse_collector(&n1, &ch).await;
    let (sse2, _sse2) = sse_collector(&n2, &ch).await;
    let ws1 = ws_collector(&n1, &ch).await;
    let ws2 = ws_collector(&n2, &ch).await;
    let lp2 = poll_collector(&n2, &ch, (MESSAGES - 1).to_string(), deadline).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready1 = watch_readiness(&n1, stop.clone());
    let ready2 = watch_readiness(&n2, stop.clone());

    let old_master = set.lock().unwrap().master_port();
    eprintln!("{how:?}: set up in {:?}", started.elapsed());
    let mut failover: Option<tokio::task::JoinHandle<u16>> = None;
    let mut retried = 0;
    for i in 0..MESSAGES {
        if i == FAIL_AFTER {
            let set = set.clone();
            failover = Some(tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                match how {
                    Failover::Kill => set.lock().unwrap().kill_node(old_master),
                    Failover::Graceful => {
                        let ok = set.lock().unwrap().sentinel_cli(&[
                            "SENTINEL",
                            "FAILOVER",
                            sentinel::MASTER_NAME,
                        ]);
                        assert_eq!(ok, "OK");
                    }
                }
                let new = set.lock().unwrap().wait_for_new_master(old_master, Duration::from_secs(30));
                eprintln!("{how:?}: sentinels named {new} after {:?}", t.elapsed());
                if let Failover::Kill = how {
                    // Back as a replica, as an operator (or the sentinels) would bring it:
                    // the new master has a replica to acknowledge publishes again.
                    set.lock().unwrap().restart_as_replica(old_master, new);
                    eprintln!("{how:?}: old master back as a replica after {:?}", t.elapsed());
                }
                new
            }));
        }
        retried += publish_until_accepted(&n1, &ch, &i.to_string(), &format!("m-{i}"), deadline).await - 1;
    }
    let new_master = failover.expect("started").await.unwrap();
    eprintln!("{how:?}: published {MESSAGES} in {:?}, {retried} retries", started.elapsed());

    let subscribers =
        [("SSE n1", &sse1), ("SSE n2", &sse2), ("WS n1", &ws1), ("WS n2", &ws2), ("long-poll n2", &lp2)];
    for (what, got) in &subscribers {
        let last = (MESSAGES - 1).to_string();
        eventually(Duration::from_secs(30), &format!("{what} received the stream"), || async {
            got.lock().unwrap().messages.iter().any(|(_, d)| *d == last).then_some(())
        })
        .await;
    }
    // Late duplicates would arrive right after: give them the chance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (what, got) in &subscribers {
        assert_exactly_once(what, &got.lock().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (what, n, seen) in [("n1", &n1, &ready1), ("n2", &n2, &ready2)] {
        let seen = seen.lock().unwrap().clone();
        eprintln!("{how:?}: {what} /readyz went {seen:?}");
        assert_eq!(seen.last(), Some(&200), "{what}: ready again");
        assert_eq!(n.metric("gateway_broker_reconnects_total").await, 1.0, "{what}: the link moved once");
        if let Failover::Kill = how {
            // A handover moves the link in milliseconds (too fast to poll); a dead master
            // leaves the node without a link for seconds.
            let down = seen.iter().position(|s| *s == 503);
            assert!(
                down.is_some_and(|d| seen[d..].contains(&200)),
                "{what}: /readyz went 503 during the failover and back to 200: {seen:?}"
            );
        }
    }

    // The fanout library is on the new master, and raw PUBLISH there reaches everyone.
    let functions = set.lock().unwrap().node_cli(new_master, &["FUNCTION", "LIST", "LIBRARYNAME", "fanout"]);
    assert!(functions.contains("fanout_publish"), "{functions}");
    let before: Vec<usize> = subscribers.iter().map(|(_, got)| got.lock().unwrap().messages.len()).collect();
    set.lock().unwrap().node_cli(new_master, &["PUBLISH", &ch, "after failover"]);
    for ((what, got), before) in subscribers[..4].iter().zip(before) {
        eventually(WAIT, &format!("{what} got the raw PUBLISH"), || async {
            let r = got.lock().unwrap();
            (r.messages.len() == before + 1 && r.messages[before].1 == "after failover").then_some(())
        })
        .await;
    }
    eprintln!("{how:?}: whole test {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_mid_stream_every_subscriber_gets_every_message_once() {
    stream_through_failover(Failover::Kill).await;
}

/// A handover with `min-replicas-to-write 1` on the data nodes: the old master refuses
/// writes (NOREPLICAS) from the moment its replica is promoted, the gateway sends them
/// to the new master once it has a replica again (the old master, demoted by the
/// sentinels ~10 s later), and nothing is lost; the publish in flight at the promotion,
/// sent again to the new master, reaches subscribers once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_failover_mid_stream_loses_nothing_and_doubles_nothing() {
    stream_through_failover(Failover::Graceful).await;
}

/// Publishes through each of `nodes` in turn, `rounds` times, one at a time; each
/// node's per-publish latencies, sorted.
async fn publish_latencies(nodes: &[&Gateway], ch: &str, rounds: usize) -> Vec<Vec<Duration>> {
    let mut lat = vec![Vec::with_capacity(rounds); nodes.len()];
    for i in 0..rounds {
        for (k, gw) in nodes.iter().enumerate() {
            let t = Instant::now();
            publish(gw, ch, &format!("{k}-{i}")).await;
            lat[k].push(t.elapsed());
        }
    }
    for l in &mut lat {
        l.sort();
    }
    lat
}

/// `--redis-replica-acks 1`: a history publish is answered only once the replica holds
/// it. Measures what that costs per publish against a node without it (same Sentinel
/// set, same run, publishes alternating), then stops the replica: the node without
/// acks still answers at once, the one with them refuses a publish it cannot repeat
/// (not durable) and holds one with an idempotency key until the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_acks_hold_the_answer_until_a_replica_has_the_message() {
    let set = SentinelSet::start(1);
    let url = set.url();
    let plain = Gateway::start(Some(&url), &[]);
    let durable = Gateway::start(Some(&url), &["--redis-replica-acks", "1"]);
    for n in [&plain, &durable] {
        eventually(WAIT, "node ready through Sentinel", || async {
            (n.ready_status().await == 200).then_some(())
        })
        .await;
    }
    let ch = channel("acks");
    let lat = publish_latencies(&[&plain, &durable], &ch, 300).await;
    let q = |l: &[Duration], p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    for (name, l) in [("replica-acks 0", &lat[0]), ("replica-acks 1", &lat[1])] {
        eprintln!("{name}: publish p50 {:?}, p99 {:?} ({} publishes)", q(l, 0.5), q(l, 0.99), l.len());
    }

    let master = set.master_port();
    let replica = set.node_ports().into_iter().find(|p| *p != master).unwrap();
    set.signal_node(replica, "STOP");
    let post = |gw: &Gateway, body: serde_json::Value| {
        reqwest::Client::new()
            .post(gw.url("/api/publish"))
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
    };
    let r = post(&plain, serde_json::json!({"channel": ch, "data": "no acks needed"})).await.unwrap();
    assert_eq!(r.status(), 200, "without acks the master's word is enough");
    let t = Instant::now();
    let r = post(&durable, serde_json::json!({"channel": ch, "data": "unrepeatable"})).await.unwrap();
    assert_eq!(r.status(), 503, "no replica holds it and it cannot be sent again");
    assert!(t.elapsed() >= Duration::from_millis(900), "WAIT gave the replica its time: {:?}", t.elapsed());
    let body = serde_json::json!({"channel": ch, "data": "held", "idempotency_key": "held-1"});
    let held = tokio::spawn(post(&durable, body.clone()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!held.is_finished(), "a repeatable publish waits for the replica");
    set.signal_node(replica, "CONT");
    let r = held.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let first: serde_json::Value = r.json().await.unwrap();
    // Sent more than once while the replica was away, published once.
    let again: serde_json::Value = post(&durable, body).await.unwrap().json().await.unwrap();
    assert_eq!(again["results"][0]["duplicate"], true);
    assert_eq!(again["results"][0]["id"], first["results"][0]["id"]);
    let held_copies = set.node_cli(master, &["XRANGE", &format!("fanout:history:{{{ch}}}"), "-", "+"]);
    assert_eq!(held_copies.lines().filter(|l| *l == "held").count(), 1, "{held_copies}");
}

/// `gateway publish --redis-url redis+sentinel://...` finds the master through the
/// sentinels — after a failover, where the URL's first data node is a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_publisher_finds_the_master_through_sentinel() {
    let set = SentinelSet::start(1);
    let first = set.master_port();
    assert_eq!(set.sentinel_cli(&["SENTINEL", "FAILOVER", sentinel::MASTER_NAME]), "OK");
    let master = set.wait_for_new_master(first, Duration::from_secs(30));
    let ch = channel("stdin");
    let (status, stderr) = publish_cli(&[&ch, "--redis-url", &set.url()], b"one\ntwo\nthree\n");
    assert!(status.success(), "{stderr}");
    assert_eq!(set.node_cli(master, &["XLEN", &format!("fanout:history:{{{ch}}}")]), "3");
}

/// The `+switch-master` subscription lives on one sentinel (the URL's first); when that
/// sentinel dies it moves to the next, and a handover announced there moves the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_master_subscription_moves_to_another_sentinel() {
    let mut set = SentinelSet::start(1);
    let gw = Gateway::start(Some(&set.url()), &[]);
    let on = |i: usize| format!("subscribed to +switch-master on redis://127.0.0.1:{}", set.sentinel_port(i));
    let (first, second) = (on(0), on(1));
    eventually(WAIT, "subscribed on the first sentinel", || async {
        gw.logs().contains(&first).then_some(())
    })
    .await;
    set.kill_sentinel(0);
    eventually(WAIT, "subscription moved to the second sentinel", || async {
        gw.logs().contains(&second).then_some(())
    })
    .await;
    let old = set.master_port();
    let ch = channel("moved");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    assert_eq!(set.sentinel_cli(&["SENTINEL", "FAILOVER", sentinel::MASTER_NAME]), "OK");
    let new = set.wait_for_new_master(old, Duration::from_secs(30));
    let event = format!("+switch-master event={} 127.0.0.1 {old} 127.0.0.1 {new}", sentinel::MASTER_NAME);
    eventually(WAIT, "the node heard the switch", || async { gw.logs().contains(&event).then_some(()) })
        .await;
    eventually(WAIT, "the node follows the new master", || async {
        (set.node_cli(new, &["PUBSUB", "NUMSUB", &ch]).lines().nth(1) == Some("1")).then_some(())
    })
    .await;
    set.node_cli(new, &["PUBLISH", &ch, "from the new master"]);
    assert_eq!(sse.next().await.data, "from the new master");
}

/// A master turned into a replica behind the sentinels' back keeps the node's
/// connections open (Redis does not drop normal or pub/sub clients on `REPLICAOF`):
/// the periodic `ROLE` check notices, the node drops it and fails readiness rather than
/// keep reading from and writing to a replica, and takes it back once it is a master
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_behind_the_sentinels_back_is_dropped_until_it_is_one_again() {
    let set = SentinelSet::start(1);
    let gw = Gateway::start(Some(&set.url()), &[]);
    eventually(WAIT, "ready", || async { (gw.ready_status().await == 200).then_some(()) }).await;
    let master = set.master_port();
    let ch = channel("demoted");
    let mut sse = SseClient::connect(&gw.url(&format!("/sse?channel={ch}"))).await;
    let t = Instant::now();
    // A replica of nothing: `ROLE` says slave, the data and the connections stay.
    set.node_cli(master, &["REPLICAOF", "127.0.0.1", &free_port().to_string()]);
    eventually(WAIT, "readiness fails", || async { (gw.ready_status().await == 503).then_some(()) }).await;
    eprintln!("demoted master dropped after {:?}", t.elapsed());
    assert!(gw.logs().contains("it is no longer a master"), "{}", gw.logs());
    assert!(set.master_port() == master, "the sentinels still name it: only ROLE could tell");
    set.node_cli(master, &["REPLICAOF", "NO", "ONE"]);
    eventually(WAIT, "ready again", || async { (gw.ready_status().await == 200).then_some(()) }).await;
    set.node_cli(master, &["PUBLISH", &ch, "master again"]);
    assert_eq!(sse.next().await.data, "master again", "the same SSE stream");
}
