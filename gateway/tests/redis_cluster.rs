//! Gateways on a real Redis Cluster (3 masters, 3 replicas, real `redis-server`
//! processes): sharded pub/sub across every master on every transport, history and
//! resume on any node, and faults under a steady, numbered stream of history messages
//! — a master killed, a manual failover, a slot moved — after which every subscriber
//! must hold every message exactly once, in order, and history every message once.
//!
//! The tests share the machine's two cores with six Redis servers and two gateways
//! each, so they run one at a time (`SERIAL`). About 20-30 s each.

mod common;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt;
use redis_cluster::RedisCluster;
use shared::{
    protocol::{PublishResult, ServerFrame},
    sse::SseParser,
};

/// One cluster test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Redis Cluster's slot of `key` (CRC16/XMODEM of the hash tag or key, mod 16384),
/// computed here so choosing 200 channels needs no 200 round trips.
fn slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let k = match k.iter().position(|&b| b == b'{') {
        Some(o) => match k[o + 1..].iter().position(|&b| b == b'}') {
            Some(c) if c > 0 => &k[o + 1..o + 1 + c],
            _ => k,
        },
        None => k,
    };
    let mut crc = 0u16;
    for &b in k {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// What one subscriber saw, per channel: `(id, data)` in arrival order; and resets.
#[derive(Default, Debug)]
struct Seen {
    by_channel: HashMap<String, Vec<(Option<String>, String)>>,
    resets: usize,
    errors: Vec<String>,
}

impl Seen {
    fn push(&mut self, channel: String, id: Option<String>, data: String) {
        self.by_channel.entry(channel).or_default().push((id, data));
    }

    fn count(&self) -> usize {
        self.by_channel.values().map(Vec::len).sum()
    }

    fn data(&self, channel: &str) -> Vec<String> {
        self.by_channel.get(channel).map(|v| v.iter().map(|(_, d)| d.clone()).collect()).unwrap_or_default()
    }
}

type Shared = Arc<Mutex<Seen>>;

/// Reads an SSE stream with `format=json` envelopes into `seen` until it ends.
async fn read_sse(url: String, seen: Shared, opened: tokio::sync::oneshot::Sender<()>) {
    let resp = reqwest::Client::new().get(url).send().await.expect("SSE connects");
    assert_eq!(resp.status(), 200);
    let mut opened = Some(opened);
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::new();
    while let Some(Ok(chunk)) = stream.next().await {
        for ev in parser.feed(&chunk) {
            let mut s = seen.lock().unwrap();
            match ev.event.as_deref() {
                Some("reset") => s.resets += 1,
                Some(other) => s.errors.push(format!("{other}: {}", ev.data)),
                None => {
                    let env: shared::Envelope = serde_json::from_str(&ev.data).unwrap();
                    s.push(env.channel, env.id, env.data);
                }
            }
        }
        if parser.comments() > 0
            && let Some(tx) = opened.take()
        {
            let _ = tx.send(());
        }
    }
}

/// Opens an SSE reader and waits for the stream to open.
async fn sse(url: String) -> (Shared, tokio::task::JoinHandle<()>) {
    let seen = Shared::default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(read_sse(url, seen.clone(), tx));
    tokio::time::timeout(WAIT, rx).await.expect("SSE opens").unwrap();
    (seen, task)
}

/// Subscribes a WebSocket to `channels` (from `since`, if given), waits for the
/// `subscribed` answer, then reads it into `seen` in the background.
async fn ws(
    url: String,
    channels: &[String],
    since: Option<serde_json::Value>,
) -> (Shared, tokio::task::JoinHandle<()>) {
    let mut ws = ws_connect(&url).await;
    let mut op = serde_json::json!({"op": "subscribe", "channels": channels});
    if let Some(s) = since {
        op["since"] = s;
    }
    ws_send(&mut ws, op).await;
    match ws_next(&mut ws).await {
        ServerFrame::Subscribed { .. } => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    let seen = Shared::default();
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let tokio_tungstenite::tungstenite::Message::Text(t) = msg else { continue };
            let mut s = s2.lock().unwrap();
            match serde_json::from_str::<ServerFrame>(&t).unwrap() {
                ServerFrame::Message { channel, id, data, .. } => s.push(channel, id, data),
                ServerFrame::Reset { .. } => s.resets += 1,
                ServerFrame::Error { code, .. } => s.errors.push(code),
                _ => {}
            }
        }
    });
    (seen, task)
}

/// Long-polls `base` for `query` (channels and a start) in a loop into `seen`.
async fn long_poll(base: String, query: String, seen: Shared) {
    let http = reqwest::Client::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let url = match &cursor {
            Some(c) => format!("{base}/poll?{query}&cursor={c}&timeout=5"),
            None => format!("{base}/poll?{query}&timeout=5"),
        };
        let Ok(resp) = http.get(url).send().await else { return };
        assert_eq!(resp.status(), 200, "long-poll answered");
        let r: shared::protocol::PollResponse = resp.json().await.unwrap();
        let mut s = seen.lock().unwrap();
        if r.reset {
            s.resets += 1;
        }
        for m in r.messages {
            s.push(m.channel, m.id, m.data);
        }
        cursor = Some(r.cursor);
    }
}

/// Waits until `seen` holds `n` messages in all (or `deadline` passes).
async fn wait_count(seen: &Shared, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while seen.lock().unwrap().count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` channel names whose slots spread over every master, at least `per_master` on
/// each.
fn spread_channels(cluster: &RedisCluster, prefix: &str, n: usize, per_master: usize) -> Vec<String> {
    let view = cluster.view();
    let owner = |s: u16| {
        view.iter()
            .find(|m| m.master && m.slots.iter().any(|&(a, b)| a <= s && s <= b))
            .map(|m| m.port)
            .unwrap()
    };
    let base = channel(prefix);
    let mut out: Vec<String> = (0..n).map(|i| format!("{base}-{i}")).collect();
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for c in &out {
        *counts.entry(owner(slot(c))).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{n} channels land on all three masters: {counts:?}");
    assert!(counts.values().all(|&c| c >= per_master), "at least {per_master} per master: {counts:?}");
    out.sort();
    out
}

async fn wait_ready(gw: &Gateway) {
    eventually(Duration::from_secs(30), "gateway ready on the cluster", || async {
        (gw.ready_status().await == 200).then_some(())
    })
    .await;
}

/// `PUBSUB SHARDNUMSUB` of `channel` on the master of its slot.
fn shard_subscribers(cluster: &RedisCluster, channel: &str) -> u64 {
    let m = cluster.master_of(slot(channel));
    let out = cluster.cli(m, &["PUBSUB", "SHARDNUMSUB", channel]);
    out.lines().nth(1).unwrap().trim().parse().unwrap()
}

async fn publish_http(gw: &Gateway, channel: &str, data: &str) -> PublishResult {
    let resp = reqwest::Client::new()
        .post(gw.url(&format!("/publish/{channel}")))
        .body(data.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "publish to {channel}");
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_on_every_master_and_resume_on_the_other_node() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let many = ["--max-channels-per-connection", "200"];
    let a = Gateway::start(Some(&url), &many);
    let b = Gateway::start(Some(&url), &[&many[..], &["--redis-replica-acks", "1"]].concat());
    wait_ready(&a).await;
    wait_ready(&b).await;
    let channels = spread_channels(&cluster, "rc", 200, 20);
    let query: String = channels.iter().map(|c| format!("channel={c}")).collect::<Vec<_>>().join("&");

    let mut subscribers = Vec::new();
    for gw in [&a, &b] {
        subscribers.push(("SSE", sse(gw.url(&format!("/sse?{query}&format=json"))).await));
        subscribers.push(("WebSocket", ws(gw.ws_url("/ws"), &channels, None).await));
        // Long-poll cursors carry a position per channel: 25 channels per client keep
        // the request head well under its 16 KiB limit.
        let polled = Shared::default();
        for group in channels.chunks(25) {
            let q: String = group.iter().map(|c| format!("channel={c}")).collect::<Vec<_>>().join("&");
            let task = tokio::spawn(long_poll(gw.url(""), q, polled.clone()));
            subscribers.push(("long-poll", (polled.clone(), task)));
        }
    }
    for c in &channels {
        eventually(WAIT, "each channel subscribed by both nodes on its master", || async {
            (shard_subscribers(&cluster, c) == 2).then_some(())
        })
        .await;
    }

    // Raw SPUBLISH with redis-cli -c (it follows MOVED to the slot's master), then a
    // history publish over HTTP, then one with FCALL.
    let raw = |i: usize| format!("raw {i}: \"quoted\" {{braces}} \\ ünïcødé");
    for (i, c) in channels.iter().enumerate() {
        let receivers = cluster.cli_c(&["SPUBLISH", c, &raw(i)]);
        assert_eq!(receivers, "2", "SPUBLISH {c} reaches both nodes");
    }
    let mut ids = HashMap::new();
    for (i, c) in channels.iter().enumerate() {
        let r = publish_http(if i % 2 == 0 { &a } else { &b }, c, &format!("http {i}")).await;
        assert!(r.subscribed, "the publish answer counts the SPUBLISH receivers");
        ids.insert(c.clone(), r.id.expect("a history id"));
    }
    for (i, c) in channels.iter().enumerate() {
        let out = cluster.cli_c(&["FCALL", "fanout_publish", "1", c, &format!("fcall {i}")]);
        assert!(out.ends_with('2'), "FCALL publishes to both nodes: {out}");
    }
    for (what, (seen, _)) in &subscribers {
        wait_count(seen, 600, Duration::from_secs(30)).await;
        let s = seen.lock().unwrap();
        assert_eq!(s.resets, 0, "{what}");
        for (i, c) in channels.iter().enumerate() {
            let got = s.by_channel.get(c).cloned().unwrap_or_default();
            let data: Vec<&str> = got.iter().map(|(_, d)| d.as_str()).collect();
            assert_eq!(data, [raw(i), format!("http {i}"), format!("fcall {i}")], "{what} on {c}");
            assert_eq!(got[0].0, None, "{what}: a raw message has no id");
            assert_eq!(got[1].0.as_ref(), Some(&ids[c]), "{what}: the HTTP publish's id");
            assert!(got[2].0.is_some(), "{what}: an FCALL publish has an id");
        }
    }

    // Resume on the other node from the HTTP publish's id, on every transport: exactly
    // what came after it.
    let sample: Vec<&String> = channels.iter().step_by(20).collect();
    for c in &sample {
        for j in 0..3 {
            publish_http(&a, c, &format!("more {j}")).await;
        }
    }
    let after = |c: &str| {
        let i = channels.iter().position(|x| x == c).unwrap();
        vec![format!("fcall {i}"), "more 0".into(), "more 1".into(), "more 2".into()]
    };
    for c in &sample {
        let from = &ids[*c];
        let (seen, task) = sse(b.url(&format!("/sse?channel={c}&format=json&last_event_id={from}"))).await;
        wait_count(&seen, 4, WAIT).await;
        let (wseen, wtask) = ws(b.ws_url("/ws"), &[(*c).clone()], Some(from.clone().into())).await;
        wait_count(&wseen, 4, WAIT).await;
        let polled: shared::protocol::PollResponse =
            reqwest::get(b.url(&format!("/poll?channel={c}&since={from}&timeout=0")))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(seen.lock().unwrap().data(c), after(c), "SSE resume on the other node");
        assert_eq!(wseen.lock().unwrap().data(c), after(c), "WebSocket resume on the other node");
        let pdata: Vec<String> = polled.messages.into_iter().map(|m| m.data).collect();
        assert_eq!(pdata, after(c), "long-poll resume on the other node");
        assert!(!polled.reset);
        task.abort();
        wtask.abort();
    }

    // `subscribed` is exact: SPUBLISH's receiver count.
    assert!(!publish_http(&a, &channel("nobody"), "x").await.subscribed, "nobody subscribes this one");

    // `gateway publish` straight to the cluster: each stdin line one history message.
    let cli_ch = &channels[1];
    let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    let (status, stderr) =
        publish_cli(&[cli_ch, "--redis-url", &url], format!("{}\n", lines.join("\n")).as_bytes());
    assert!(status.success() && stderr.contains("50 published, 0 failed"), "{stderr}");
    for (what, (seen, _)) in &subscribers[..2] {
        let seen = seen.clone();
        eventually(WAIT, "the CLI's lines arrive", || async {
            let got = seen.lock().unwrap().data(cli_ch);
            (got.len() >= 3 + lines.len()).then_some(())
        })
        .await;
        assert_eq!(seen.lock().unwrap().data(cli_ch)[3..], lines[..], "{what}: the CLI's lines, in order");
    }

    // The cost of a replica ack: sequential publishes through each node, interleaved
    // so both see the same machine load.
    let probe = &channels[0];
    let http = reqwest::Client::new();
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..400 {
        for (k, gw) in [&a, &b].into_iter().enumerate() {
            let t = Instant::now();
            let r =
                http.post(gw.url(&format!("/publish/{probe}"))).body(format!("t{i}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            lat[k].push(t.elapsed());
        }
    }
    for l in &mut lat {
        l.sort();
    }
    let pct = |l: &Vec<Duration>, p: usize| l[l.len() * p / 100];
    for (k, l) in lat.iter().enumerate() {
        eprintln!(
            "publish over HTTP, --redis-replica-acks {k}: p50 {:?}, p90 {:?}, p99 {:?}",
            pct(l, 50),
            pct(l, 90),
            pct(l, 99)
        );
    }
    eprintln!("replica ack cost per publish: p50 {:?}", pct(&lat[1], 50).saturating_sub(pct(&lat[0], 50)));
    // The same cost without HTTP and gateway in the way: one history publish as the
    // gateway pipelines it, alone and followed by `WAIT 1`, interleaved.
    let client = redis::cluster::ClusterClientBuilder::new(vec![format!(
        "redis://127.0.0.1:{}",
        cluster.nodes[0].port
    )])
    .retries(0)
    .build()
    .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let mut raw: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..2000 {
        for (k, l) in raw.iter_mut().enumerate() {
            let mut pipe = redis::pipe();
            pipe.cmd("FCALL")
                .arg("fanout_publish")
                .arg(1)
                .arg(format!("fanout:history:{{{probe}}}"))
                .arg(format!("w{i}"));
            if k == 1 {
                pipe.cmd("WAIT").arg(1).arg(2000);
            }
            let t = Instant::now();
            let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.unwrap();
            l.push(t.elapsed());
            if k == 1 {
                assert_eq!(replies.last(), Some(&redis::Value::Int(1)), "one replica acknowledged");
            }
        }
    }
    for l in &mut raw {
        l.sort();
    }
    for (k, l) in raw.iter().enumerate() {
        eprintln!(
            "FCALL pipeline{}: p50 {:?}, p99 {:?}",
            if k == 1 { " + WAIT 1" } else { "" },
            pct(l, 50),
            pct(l, 99)
        );
    }
    for (_, (_, task)) in subscribers {
        task.abort();
    }
}

const MESSAGES: usize = 1000;

/// What happens to the cluster while the stream is published.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL the master of a channel's slot; its replica takes over; the killed node
    /// comes back as a replica.
    KillMaster,
    /// `CLUSTER FAILOVER` on a replica.
    ManualFailover,
    /// Move a channel's slot (with its keys) to another master.
    MoveSlot,
}

/// Publishes `m0..m{n-1}` to `channel` at a steady pace through `gateways` in turn,
/// each with its idempotency key, retried until accepted. Returns how many answers
/// said `duplicate` (a retry whose first attempt had gone through).
async fn publish_numbered(gateways: Vec<String>, channel: String, n: usize) -> usize {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut duplicates = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(8));
    for i in 0..n {
        tick.tick().await;
        let body = serde_json::json!({"channel": channel, "data": format!("m{i}"), "idempotency_key": format!("k{i}")});
        for attempt in 0.. {
            assert!(Instant::now() < deadline, "publisher gave up at m{i} of {channel}");
            let url = &gateways[(i + attempt) % gateways.len()];
            if let Ok(r) = http.post(format!("{url}/api/publish")).json(&body).send().await
                && r.status().is_success()
                && let Ok(mut r) = r.json::<shared::protocol::PublishResponse>().await
            {
                duplicates += usize::from(r.results.remove(0).duplicate);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    duplicates
}

async fn stream_through(fault: Fault) {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let opts = ["--redis-replica-acks", "1", "--history-size", "5000"];
    let a = Gateway::start(Some(&url), &opts);
    let b = Gateway::start(Some(&url), &opts);
    wait_ready(&a).await;
    wait_ready(&b).await;
    let channels = spread_channels(&cluster, "fault", 20, 4);
    let query: String = channels.iter().map(|c| format!("channel={c}")).collect::<Vec<_>>().join("&");
    let mut subscribers = Vec::new();
    for gw in [&a, &b] {
        subscribers
            .push((format!("SSE on {}", gw.public), sse(gw.url(&format!("/sse?{query}&format=json"))).await));
        subscribers
            .push((format!("WebSocket on {}", gw.public), ws(gw.ws_url("/ws"), &channels, None).await));
    }
    let gateways = vec![a.url(""), b.url("")];
    let publishers: Vec<_> = channels
        .iter()
        .map(|c| tokio::spawn(publish_numbered(gateways.clone(), c.clone(), MESSAGES)))
        .collect();
    let watched = subscribers[0].1.0.clone();
    eventually(Duration::from_secs(30), "stream under way", || async {
        (watched.lock().unwrap().count() > channels.len() * 250).then_some(())
    })
    .await;

    // The victim: the master (or slot) of the first channel.
    let target = &channels[0];
    let s = slot(target);
    let master = cluster.master_of(s);
    eprintln!("{fault:?}: channel {target} (slot {s}) on node {master}");
    match fault {
        Fault::KillMaster => {
            let replica = cluster.replica_of(master);
            cluster.kill(master);
            cluster.wait_master(replica);
            cluster.restart(master);
        }
        Fault::ManualFailover => {
            let replica = cluster.replica_of(master);
            cluster.cli(replica, &["CLUSTER", "FAILOVER"]);
            cluster.wait_master(replica);
        }
        Fault::MoveSlot => {
            let to = cluster.masters().into_iter().find(|&m| m != master).unwrap();
            cluster.move_slot(s, master, to);
            assert_eq!(cluster.master_of(s), to);
        }
    }
    let mut duplicates = 0;
    for p in publishers {
        duplicates += p.await.unwrap();
    }
    cluster.wait_healthy();
    eprintln!("{fault:?}: publishers done ({duplicates} retried publishes answered duplicate)");

    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    for (what, (seen, _)) in &subscribers {
        wait_count(seen, MESSAGES * channels.len(), Duration::from_secs(60)).await;
        let s = seen.lock().unwrap();
        assert_eq!(s.resets, 0, "{what}: no reset");
        assert!(s.errors.is_empty(), "{what}: {:?}", s.errors);
        for c in &channels {
            let data = s.data(c);
            if data != expected {
                let bad = data.iter().zip(&expected).position(|(x, y)| x != y);
                let around = bad.map(|i| data[i.saturating_sub(2)..(i + 3).min(data.len())].to_vec());
                panic!(
                    "{fault:?}: {what} on {c}: {} messages, first difference at {bad:?}: {around:?}",
                    data.len()
                );
            }
        }
    }
    // History holds each message exactly once, in order: no retry doubled one.
    for c in &channels {
        let out = cluster.cli_c(&["XRANGE", &format!("fanout:history:{{{c}}}"), "-", "+"]);
        let data: Vec<&str> =
            out.lines().filter(|l| l.starts_with('m') && l[1..].parse::<u32>().is_ok()).collect();
        assert_eq!(data, expected, "{fault:?}: history of {c}");
    }
    for gw in [&a, &b] {
        assert_eq!(gw.ready_status().await, 200);
        // The channels of the moved slot were subscribed again where it lives now and
        // their gap replayed from history (the path under test, not luck).
        let replayed = gw.metric("gateway_history_recoveries_total{result=\"replayed\"}").await;
        assert!(replayed >= 1.0, "{fault:?}: {} replayed the resubscribed channels' gap", gw.public);
        assert!(gw.logs().contains("sharded subscriptions restored"), "{fault:?}: resubscribed");
    }
    for (_, (_, task)) in subscribers {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_loses_and_doubles_nothing() {
    stream_through(Fault::KillMaster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_loses_and_doubles_nothing() {
    stream_through(Fault::ManualFailover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_while_publishing_loses_and_doubles_nothing() {
    stream_through(Fault::MoveSlot).await;
}

/// `GET /api/channels/{channel}` on `url`, with `key` as the API key if given.
async fn occupancy(url: String, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or_default())
}

/// Subscribers summed over live nodes, on one Redis and on a cluster: three SSE
/// clients on one node and two WebSockets on another count as five on two nodes,
/// whichever node is asked, on the admin listener or (with the API key) the public
/// one; clients that leave stop counting, and a killed node drops out by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupancy_sums_the_live_nodes() {
    let _serial = SERIAL.lock().await;
    let single = Redis::start();
    let cluster = RedisCluster::start();
    for url in [single.url(), cluster.url()] {
        let keys = ["--api-keys", "k1"];
        let a = Gateway::start(Some(&url), &keys);
        let mut b = Gateway::start(Some(&url), &keys);
        wait_ready(&a).await;
        wait_ready(&b).await;
        let ch = channel("occ");
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(sse(a.url(&format!("/sse?channel={ch}&format=json"))).await);
        }
        let mut sockets = Vec::new();
        for _ in 0..2 {
            sockets.push(ws(b.ws_url("/ws"), std::slice::from_ref(&ch), None).await);
        }
        let want = |subscribers: u64, nodes: u64| serde_json::json!({"channel": ch, "subscribers": subscribers, "nodes": nodes});
        for gw in [&a, &b] {
            let target = want(5, 2);
            eventually(WAIT, "both nodes' counts summed", || async {
                (occupancy(gw.admin_url(&format!("/api/channels/{ch}")), None).await == (200, target.clone()))
                    .then_some(())
            })
            .await;
        }
        assert_eq!(
            occupancy(a.url(&format!("/api/channels/{ch}")), None).await.0,
            401,
            "the public listener needs the key"
        );
        assert_eq!(occupancy(a.url(&format!("/api/channels/{ch}")), Some("k1")).await, (200, want(5, 2)));
        assert_eq!(occupancy(a.admin_url("/api/channels/__bad"), None).await.0, 400);
        // Clients that leave stop counting at once on their node, soon everywhere.
        for (_, task) in clients.drain(..2) {
            task.abort();
        }
        let target = want(3, 2);
        eventually(WAIT, "two SSE clients left", || async {
            (occupancy(b.admin_url(&format!("/api/channels/{ch}")), None).await == (200, target.clone()))
                .then_some(())
        })
        .await;
        // A killed node reports nothing more: its entry expires.
        b.signal("KILL");
        b.wait_exit(WAIT).expect("node b died");
        let target = want(1, 1);
        eventually(Duration::from_secs(25), "the killed node dropped out", || async {
            (occupancy(a.admin_url(&format!("/api/channels/{ch}")), None).await == (200, target.clone()))
                .then_some(())
        })
        .await;
        drop((clients, sockets));
    }
}

/// A malformed `redis+cluster://` URL stops the node and `gateway publish` with exit
/// status 2 and one line saying what is wrong.
#[test]
fn bad_cluster_urls_exit_2_with_one_line() {
    for bad in ["redis+cluster://", "redis+cluster://a:1,b", "redis+cluster://a:1/0", "redis+cluster://a:x"] {
        for args in [vec!["--redis-url", bad], vec!["publish", "news", "--redis-url", bad]] {
            let out = std::process::Command::new(gateway_bin())
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one line: {stderr}");
            assert!(stderr.contains("redis_url"), "{args:?}: {stderr}");
        }
    }
}

/// A failover that loses the newest messages of a master (delivered live, never
/// replicated) and a publisher that retries one with its idempotency key: the new
/// master holds the retry under a new id. Simulated on one master: the node's link is
/// cut and kept out (a password set meanwhile) while the history loses the entry and
/// its idempotency key and the retry is published. On the way back the node replays
/// from the id the master no longer has (history forked: the function answers what
/// came after it) and must drop the retry by its key: the client gets each message
/// once, and no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_republished_under_a_new_id_reaches_clients_once() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let a = Gateway::start(Some(&cluster.url()), &[]);
    wait_ready(&a).await;
    let ch = channel("fork");
    let (seen, task) = sse(a.url(&format!("/sse?channel={ch}&format=json"))).await;
    eventually(WAIT, "subscribed", || async { (shard_subscribers(&cluster, &ch) == 1).then_some(()) }).await;
    let m = cluster.master_of(slot(&ch));
    let fcall = |auth: &[&str], data: &str, key: &str| {
        let mut args = auth.to_vec();
        args.extend(["FCALL", "fanout_publish", "1", &ch, data, "", key]);
        cluster.cli(m, &args)
    };
    fcall(&[], "m0", "k0");
    let first = fcall(&[], "m1", "k1");
    let lost_id = first.lines().next().unwrap().to_owned();
    wait_count(&seen, 2, WAIT).await;

    // Cut the node off the master and keep it out while the "failover" happens.
    cluster.cli(m, &["CONFIG", "SET", "requirepass", "fork-pw"]);
    let pw = ["-a", "fork-pw", "--no-auth-warning"];
    let killed = cluster.cli(m, &[&pw[..], &["CLIENT", "KILL", "TYPE", "pubsub"]].concat());
    assert_ne!(killed, "0", "the node's link was cut");
    eventually(WAIT, "the node noticed", || async { (a.ready_status().await == 503).then_some(()) }).await;
    let key = format!("fanout:history:{{{ch}}}");
    cluster.cli(m, &[&pw[..], &["XDEL", &key, &lost_id]].concat());
    cluster.cli(m, &[&pw[..], &["DEL", &format!("fanout:idem:{{{ch}}}:k1")]].concat());
    let retry = fcall(&pw, "m1", "k1");
    assert_ne!(retry.lines().next().unwrap(), lost_id, "the retry got a new id: {retry}");
    fcall(&pw, "m2", "k2");
    // What the node will ask on its way back: what came after the lost id.
    let since = cluster.cli(m, &[&pw[..], &["FCALL_RO", "fanout_since", "1", &ch, &lost_id, "10"]].concat());
    assert!(since.starts_with("ok") && since.contains("ik1") && since.contains("m2"), "{since}");

    cluster.cli(m, &[&pw[..], &["CONFIG", "SET", "requirepass", ""]].concat());
    wait_ready(&a).await;
    wait_count(&seen, 3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = seen.lock().unwrap();
    assert_eq!(s.data(&ch), ["m0", "m1", "m2"], "each message once, in order");
    assert_eq!(s.resets, 0, "history covered the gap");
    drop(s);
    assert!(a.logs().contains("dropped a republished repeat"), "dropped by its key");
    task.abort();
}
