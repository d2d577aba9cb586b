//! `gateway publish <channel>`: standard input becomes messages, published with history
//! straight to Redis (`--redis-url`: pipelined `FCALL fanout_publish`, in order) or
//! through a gateway (`--gateway-url`: one streaming request, split by the gateway).
//! `--format lines` (the default) makes each line a message; `--format sse` each
//! Server-Sent Event, so `curl -N <upstream SSE> | gateway publish chat-42 --format sse`
//! relays a model's answer; `--format jsonl` (or `--jsonl`) reads
//! `{"channel","data","event"?}` lines. Prints a summary to stderr; exits 1 if anything
//! could not be published.

use std::{collections::HashMap, process::ExitCode};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, body::Frame, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use shared::protocol::PublishRequest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::{
    broker::{
        BrokerError, Publish, PublishOutcome, Sequence, cluster,
        redis::{Master, PublishQueue, script},
    },
    config::{Config, InputFormat, Limits, PublishArgs, cluster_url, mask_url},
    publish::{
        check, message,
        stream::{Format, InFlight, Pending, Splitter},
    },
};

/// Publishes awaiting Redis at once.
const MAX_IN_FLIGHT: usize = 1024;

/// A request body: stdin streamed, or one JSON document.
type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    channel: Option<String>,
    data: String,
    event: Option<String>,
}

/// What a run achieved: messages published, and lines or events that failed.
type Tally = (u64, u64);

/// Runs the publisher over stdin.
pub async fn run(args: PublishArgs) -> ExitCode {
    let mut limits = Limits::default();
    if let Some(max) = args.max_payload_bytes {
        limits.max_payload_bytes = max;
    }
    let format = match args.input_format() {
        InputFormat::Lines => Some(Format::Lines),
        InputFormat::Sse => Some(Format::Sse),
        InputFormat::Jsonl => None,
    };
    if args.channel.is_none() && format.is_some() {
        eprintln!("gateway publish: a channel is required (or use --format jsonl lines that name one)");
        return ExitCode::from(2);
    }
    if let Some(url) = &args.redis_url
        && let Err(e) = crate::config::check_redis_url(url)
    {
        eprintln!("gateway publish: {e}");
        return ExitCode::from(2);
    }
    // The channel and event given once, checked before anything is read.
    if let Err(e) = check(&limits, args.channel.as_deref().unwrap_or("ok"), args.event.as_deref(), b"", None)
    {
        eprintln!("gateway publish: {}", e.message);
        return ExitCode::from(2);
    }
    let result = match (&args.gateway_url, format) {
        (Some(url), Some(format)) => stream_through_gateway(&args, url, format).await,
        (Some(url), None) => jsonl_through_gateway(&args, url, &limits).await,
        (None, format) => to_redis(&args, format, &limits).await,
    };
    match result {
        Ok((sent, failed)) => {
            eprintln!("gateway publish: {sent} published, {failed} failed");
            if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("gateway publish: {e}");
            ExitCode::from(1)
        }
    }
}

/// Publishes straight to Redis through a pipelining queue: each channel's messages
/// form one publishing stream, so they are published in order and exactly once even
/// when a reconnect makes the queue send some again.
struct ToRedis {
    queue: Queue,
    stream: u64,
    seqs: HashMap<String, u64>,
}

/// One Redis's pipelining queue, or a Redis Cluster's.
enum Queue {
    One(PublishQueue),
    Cluster(cluster::ClusterPublisher),
}

impl ToRedis {
    fn publish(&mut self, msg: Publish) -> Pending<'static, String> {
        let n = self.seqs.entry(msg.channel.clone()).or_default();
        *n += 1;
        let msg = Publish { sequence: Some(Sequence { stream: self.stream, n: *n }), ..msg };
        let outcome: futures_util::future::BoxFuture<'static, Result<PublishOutcome, BrokerError>> =
            match &self.queue {
                Queue::One(q) => Box::pin(q.publish(msg)),
                Queue::Cluster(q) => Box::pin(q.publish(msg)),
            };
        Box::pin(async move { outcome.await.map(|o| o.id).map_err(|e| format!("redis: {e}")) })
    }
}

/// Connects to the Redis (through Sentinel, or a Redis Cluster) at `url`, failing at
/// once when it cannot be reached, and starts a publishing queue there that stops with
/// `stop`. A Redis no gateway has connected to yet lacks the library: the queue loads it
/// with the default limits.
async fn queue_for(url: &str, stop: &tokio_util::sync::CancellationToken) -> Result<Queue, String> {
    let history = Config::default().history;
    let unreachable =
        |e: &dyn std::fmt::Display| format!("cannot connect to Redis at {}: {e}", mask_url(url));
    let bad = |e: &dyn std::fmt::Display| format!("bad Redis URL {}: {e}", mask_url(url));
    if cluster_url::is_cluster(url) {
        let acks = cluster::ReplicaAcks::default();
        let (_, client) = cluster::clients(url, acks).map_err(|e| bad(&e))?;
        client.check().await.map_err(|e| unreachable(&e))?;
        let library = script::cluster_library_source(&history).into();
        return Ok(Queue::Cluster(client.start(library, acks, stop.clone())));
    }
    let (master, watcher) = Master::open(url).map_err(|e| bad(&e))?;
    if let Some(watcher) = watcher {
        tokio::spawn(watcher.run(stop.clone()));
    }
    let node = master.node().await.map_err(|e| unreachable(&e))?;
    node.client.get_multiplexed_async_connection().await.map_err(|e| unreachable(&e))?;
    let library = script::library_source(&history).into();
    Ok(Queue::One(PublishQueue::start(master, library, 0, stop.clone())))
}

async fn to_redis(args: &PublishArgs, format: Option<Format>, limits: &Limits) -> Result<Tally, String> {
    let Some(url) = &args.redis_url else {
        return Err("nowhere to publish: give --redis-url (or GATEWAY_REDIS_URL) or --gateway-url".into());
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let queue = queue_for(url, &stop).await?;
    let mut redis = ToRedis { queue, stream: rand::random(), seqs: HashMap::new() };
    let mut inflight: InFlight<'static, String> = InFlight::new(MAX_IN_FLIGHT);
    let mut failed = 0u64;
    let mut refuse = |unit: &str, number: u64, e: &str| {
        eprintln!("gateway publish: {unit} {number}: {e}");
        failed += 1;
    };
    match format {
        None => {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            let mut number = 0;
            while let Some(line) = lines.next_line().await.map_err(|e| format!("reading stdin: {e}"))? {
                number += 1;
                match parse_jsonl(args, &line, limits) {
                    Ok(msg) => in_order(&mut inflight, number, redis.publish(msg)).await?,
                    Err(e) => refuse("line", number, &e),
                }
            }
        }
        Some(format) => {
            let mut splitter = Splitter::new(format, limits.max_payload_bytes);
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            let mut items = Vec::new();
            loop {
                let n = stdin.read(&mut buf).await.map_err(|e| format!("reading stdin: {e}"))?;
                let split =
                    if n == 0 { splitter.finish(&mut items) } else { splitter.feed(&buf[..n], &mut items) };
                for item in items.drain(..) {
                    let event = item.event.or_else(|| args.event.clone());
                    let channel = args.channel.clone().unwrap_or_default();
                    match check(limits, &channel, event.as_deref(), item.data.as_bytes(), item.id.as_deref())
                    {
                        Ok(()) => {
                            let msg = message(channel, item.data.into(), event, item.id);
                            in_order(&mut inflight, item.number, redis.publish(msg)).await?;
                        }
                        Err(e) => refuse(format.unit(), item.number, &e.message),
                    }
                }
                // A line too large to hold ends the input: what follows cannot be cut.
                split.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
            }
        }
    }
    if let Err((number, e)) = inflight.finish().await {
        return Err(format!("message {number}: {e}; {} published before it", inflight.published));
    }
    Ok((inflight.published, failed))
}

/// Adds a publish; a failed one ends the run, since the messages after it would be
/// out of order.
async fn in_order(
    inflight: &mut InFlight<'static, String>,
    number: u64,
    pending: Pending<'static, String>,
) -> Result<(), String> {
    inflight.push(number, pending).await.map_err(|(n, e)| format!("message {n}: {e}"))
}

/// One `--format jsonl` line as a message.
fn parse_jsonl(args: &PublishArgs, line: &str, limits: &Limits) -> Result<Publish, String> {
    let l: Line =
        serde_json::from_str(line).map_err(|e| format!("not a JSON line {{\"channel\",\"data\"}}: {e}"))?;
    let channel = l.channel.or_else(|| args.channel.clone()).ok_or("no \"channel\" in the line")?;
    let event = l.event.or_else(|| args.event.clone());
    check(limits, &channel, event.as_deref(), l.data.as_bytes(), None).map_err(|e| e.message)?;
    Ok(message(channel, Bytes::from(l.data), event, None))
}

/// Connects to a gateway's public listener (`http://host:port`).
async fn connect(url: &str) -> Result<(SendRequest<Body>, String), String> {
    let rest = url.strip_prefix("http://").ok_or("--gateway-url must start with http://")?;
    let host = rest.trim_end_matches('/').to_owned();
    let stream =
        tokio::net::TcpStream::connect(&host).await.map_err(|e| format!("cannot connect to {host}: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("cannot talk HTTP to {host}: {e}"))?;
    tokio::spawn(conn);
    Ok((sender, host))
}

/// Sends `req` and reads the whole answer: (status, body).
async fn send(
    sender: &mut SendRequest<Body>,
    req: Request<Body>,
) -> Result<(hyper::StatusCode, Bytes), String> {
    sender.ready().await.map_err(|e| format!("gateway connection: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("gateway: {e}"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, bytes))
}

/// Streams stdin into one streaming publish (`?stream=lines|sse`); the gateway splits
/// it into messages and answers how many it published.
async fn stream_through_gateway(args: &PublishArgs, url: &str, format: Format) -> Result<Tally, String> {
    let (mut sender, host) = connect(url).await?;
    let channel = args.channel.as_deref().unwrap_or_default();
    let mut path = format!("/publish/{channel}?stream={}", format.name());
    if let Some(event) = &args.event {
        path.push_str("&event=");
        path.extend(form_urlencoded::byte_serialize(event.as_bytes()));
    }
    let mut req = Request::post(path).header("host", host.as_str());
    if let Some(key) = &args.api_key {
        req = req.header("x-api-key", key.as_str());
    }
    let stdin = tokio_util::io::ReaderStream::new(tokio::io::stdin()).map_ok(Frame::data);
    let req = req.body(BodyExt::boxed(StreamBody::new(stdin))).map_err(|e| e.to_string())?;
    let (status, bytes) = send(&mut sender, req).await?;
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let published = answer["published"].as_u64().unwrap_or(0);
    if status.is_success() {
        return Ok((published, 0));
    }
    eprintln!("gateway publish: gateway answered {status}: {}", String::from_utf8_lossy(&bytes));
    Ok((published, 1))
}

/// `--format jsonl` through a gateway: one `POST /api/publish` per line.
async fn jsonl_through_gateway(args: &PublishArgs, url: &str, limits: &Limits) -> Result<Tally, String> {
    let (mut sender, host) = connect(url).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let (mut sent, mut failed, mut number) = (0u64, 0u64, 0u64);
    while let Some(line) = lines.next_line().await.map_err(|e| format!("reading stdin: {e}"))? {
        number += 1;
        let result = match parse_jsonl(args, &line, limits) {
            Ok(msg) => {
                let body = PublishRequest {
                    channel: Some(msg.channel),
                    data: String::from_utf8_lossy(&msg.data).into_owned(),
                    event: msg.event,
                    ..Default::default()
                };
                let json = Bytes::from(serde_json::to_vec(&body).expect("serializes"));
                let mut req = Request::post("/api/publish")
                    .header("host", host.as_str())
                    .header("content-type", "application/json");
                if let Some(key) = &args.api_key {
                    req = req.header("x-api-key", key.as_str());
                }
                let full = Full::new(json).map_err(|never| match never {});
                let req = req.body(BodyExt::boxed(full)).map_err(|e| e.to_string())?;
                match send(&mut sender, req).await? {
                    (status, _) if status.is_success() => Ok(()),
                    (status, bytes) => {
                        Err(format!("gateway answered {status}: {}", String::from_utf8_lossy(&bytes)))
                    }
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => sent += 1,
            Err(e) => {
                eprintln!("gateway publish: line {number}: {e}");
                failed += 1;
            }
        }
    }
    Ok((sent, failed))
}
