//! The open-loop publisher: seq k is due at `t0 + k / rate` and carries that scheduled
//! time in its payload, whether or not the publisher is running late. Publishes are
//! pipelined (up to `--max-inflight` outstanding) so one slow reply does not hold back
//! the schedule. Seq k goes to channel `k % channels`.
//!
//! Against Nchan (`--server nchan --publish http`) each message is `POST`ed raw to
//! Nchan's publisher location. With `--publish stream` every channel has one streaming
//! request for the whole run instead, and message k is the next line of channel
//! `k % channels`'s body (see [`streams`]).

mod streams;

use std::{collections::BTreeMap, future::Future, pin::Pin, time::Duration};

use anyhow::{Context, Result};
use futures_util::{
    StreamExt,
    stream::{self, FuturesUnordered},
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use self::streams::StreamAnswer;
use crate::{
    cli::{NCHAN_PUB_PATH, PublishVia, ServerKind, Settings},
    payload::{self, NCHAN_MARKER, Payload},
};

/// How long a single publish may take before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a pooled publish connection stays idle. The gateway closes a keep-alive
/// connection that sends no request head within `--header-timeout-secs` (10 s by
/// default); a connection reused just as that close arrives fails the `POST` (a publish
/// is not re-sent), so the pool lets connections go well before.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Marker publishes in flight at once (see [`nchan_mark_channels`]).
const MARKER_CONCURRENCY: usize = 32;

/// What the publisher did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishReport {
    /// `redis` or `http`.
    pub via: String,
    /// Messages planned.
    pub scheduled: u64,
    /// Messages sent (fewer than planned only if the hard deadline hit).
    pub sent: u64,
    /// Publishes acknowledged.
    pub ok: u64,
    /// Publishes that failed.
    pub failed: u64,
    /// Acknowledged publishes that reached no subscriber (Redis: 0 receivers; HTTP:
    /// `"subscribed": false`).
    pub no_receivers: u64,
    /// Acknowledged publishes in the measured window.
    pub measured: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Seconds from the first due time to the last reply.
    pub duration_secs: f64,
    /// Sent messages per second over the schedule.
    pub achieved_rate: f64,
    /// Largest delay between a message's due time and its send, ms.
    pub max_lag_ms: f64,
    /// Mean delay between due time and send, ms (timer granularity and scheduling; it
    /// is part of the measured latency).
    pub mean_lag_ms: f64,
    /// Messages sent more than 10 ms after their due time.
    pub late_10ms: u64,
    /// Scheduled time of the measured window's first message, µs since the Unix epoch.
    #[serde(default)]
    pub measure_start_us: u64,
    /// The streaming requests (`--publish stream`): how each ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<StreamsReport>,
    /// Seqs that failed (not expected by subscribers).
    #[serde(skip)]
    pub failed_seqs: Vec<u64>,
}

/// How the streaming requests of a run ended (`--publish stream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamsReport {
    /// Streaming requests (one per channel).
    pub requests: u64,
    /// Requests answered 200 with `published` equal to the tokens sent.
    pub ok: u64,
    /// Requests that ended any other way (an error answer, a short `published`, no answer).
    pub not_ok: u64,
    /// Tokens written into the bodies.
    pub sent: u64,
    /// Sum of the answers' `published`.
    pub published: u64,
    /// Each request's answer, by channel.
    pub answers: Vec<StreamAnswer>,
}

type PublishFuture = Pin<Box<dyn Future<Output = (u64, Result<bool, String>)> + Send>>;

/// Where messages go.
pub enum Sink {
    /// Redis `PUBLISH` over one multiplexed (pipelined) connection.
    Redis(redis::aio::MultiplexedConnection),
    /// `POST /publish/{channel}` on the gateway.
    Http {
        /// Pooled client.
        client: reqwest::Client,
        /// `http://host:port[/base]`.
        base: String,
        /// `X-API-Key`, if any.
        api_key: Option<String>,
    },
    /// `POST /pub?channel=…` on Nchan.
    Nchan {
        /// Pooled client.
        client: reqwest::Client,
        /// `http://host:port[/base]`.
        base: String,
    },
    /// One streaming `POST /publish/{channel}?stream=…` per channel; `None` until
    /// [`Sink::prepare`] opened them.
    Streams(Option<streams::Streams>),
}

/// The part of Nchan's publish answer (`Accept: application/json`) we read.
#[derive(Debug, Deserialize)]
struct NchanPublished {
    /// Subscribers of the channel when the message was published.
    subscribers: u64,
}

fn http_client(s: &Settings) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PUBLISH_TIMEOUT)
        .pool_max_idle_per_host(s.args.max_inflight.min(256))
        .pool_idle_timeout(POOL_IDLE)
        .tcp_nodelay(true)
        .build()
        .context("building HTTP client")
}

/// Base URL of the server, `http://host:port[/base]`.
fn base_url(s: &Settings) -> String {
    format!("http://{}{}", s.host_header, s.base_path)
}

/// `POST`s `body` to Nchan's publisher location for `channel`; returns whether the
/// channel had subscribers.
async fn nchan_post(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    body: String,
) -> Result<bool, String> {
    let resp = client
        .post(format!("{base}{NCHAN_PUB_PATH}?channel={channel}"))
        .header("accept", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| if e.is_timeout() { "http_timeout".to_owned() } else { "http_send".to_owned() })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("http_{}", status.as_u16()));
    }
    let body: NchanPublished = resp.json().await.map_err(|_| "http_bad_body".to_owned())?;
    Ok(body.subscribers > 0)
}

/// Publishes [`NCHAN_MARKER`] once to every channel of the run, before its long-poll
/// subscribers connect (Nchan keeps it in the channel's buffer; each subscriber's first
/// poll gets it at once, which confirms the subscription).
pub async fn nchan_mark_channels(s: &Settings) -> Result<()> {
    let client = http_client(s)?;
    let base = base_url(s);
    let channels = s.args.channels as u64;
    let mut results = stream::iter(0..channels)
        .map(|c| {
            let (client, base) = (&client, &base);
            async move { (c, nchan_post(client, base, &s.channel_name(c), NCHAN_MARKER.to_owned()).await) }
        })
        .buffer_unordered(MARKER_CONCURRENCY);
    while let Some((c, r)) = results.next().await {
        if let Err(kind) = r {
            anyhow::bail!(
                "publishing the subscribe marker to channel {} at {base}: {kind}",
                s.channel_name(c)
            );
        }
    }
    Ok(())
}

impl Sink {
    /// Connects to the publish target and checks it answers.
    pub async fn connect(s: &Settings) -> Result<Self> {
        match s.args.publish {
            PublishVia::Redis => {
                let client = redis::Client::open(s.args.redis_url.as_str()).context("opening --redis-url")?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(PUBLISH_TIMEOUT));
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .with_context(|| format!("connecting to Redis at {}", s.args.redis_url))?;
                let _: String = redis::cmd("PING").query_async(&mut conn).await.context("Redis PING")?;
                Ok(Sink::Redis(conn))
            }
            PublishVia::Http if s.args.server == ServerKind::Nchan => {
                Ok(Sink::Nchan { client: http_client(s)?, base: base_url(s) })
            }
            PublishVia::Http => {
                Ok(Sink::Http { client: http_client(s)?, base: base_url(s), api_key: s.args.api_key.clone() })
            }
            PublishVia::Stream => {
                // Opened when publishing starts; check now that the nodes answer.
                for t in &s.targets {
                    tokio::time::timeout(Duration::from_secs(5), crate::net::connect(t.dest, None))
                        .await
                        .map_err(|_| anyhow::anyhow!("connect timeout"))
                        .and_then(|r| r.map_err(anyhow::Error::from))
                        .with_context(|| format!("connecting to {} to publish", t.host_header))?;
                }
                Ok(Sink::Streams(None))
            }
            PublishVia::None => anyhow::bail!("--publish none has no sink"),
        }
    }

    /// Opens what must be open before the schedule starts: the streaming requests
    /// (so opening them does not count as publisher lag). Other sinks have nothing to do.
    pub async fn prepare(&mut self, s: &Settings) -> Result<()> {
        if let Sink::Streams(streams @ None) = self {
            let opened = std::time::Instant::now();
            *streams = Some(streams::Streams::open(s).await?);
            eprintln!(
                "loadgen: opened {} streaming requests in {:.2}s",
                s.args.channels,
                opened.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    fn publish(&self, seq: u64, channel: String, payload: String) -> PublishFuture {
        match self {
            Sink::Redis(conn) => {
                let mut conn = conn.clone();
                Box::pin(async move {
                    let r: redis::RedisResult<i64> =
                        redis::cmd("PUBLISH").arg(&channel).arg(payload).query_async(&mut conn).await;
                    let r = r.map(|n| n > 0).map_err(|e| {
                        if e.is_timeout() {
                            "redis_timeout".to_owned()
                        } else {
                            format!("redis_{:?}", e.kind()).to_lowercase()
                        }
                    });
                    (seq, r)
                })
            }
            Sink::Http { client, base, api_key } => {
                let (client, base, api_key) = (client.clone(), base.clone(), api_key.clone());
                Box::pin(async move {
                    let mut req = client.post(format!("{base}/publish/{channel}")).body(payload);
                    if let Some(k) = api_key {
                        req = req.header("x-api-key", k);
                    }
                    let r = async {
                        let resp = req.send().await.map_err(|e| {
                            if e.is_timeout() { "http_timeout".to_owned() } else { "http_send".to_owned() }
                        })?;
                        let status = resp.status();
                        if !status.is_success() {
                            return Err(format!("http_{}", status.as_u16()));
                        }
                        let body: shared::protocol::PublishResult =
                            resp.json().await.map_err(|_| "http_bad_body".to_owned())?;
                        Ok(body.subscribed)
                    }
                    .await;
                    (seq, r)
                })
            }
            Sink::Nchan { client, base } => {
                let (client, base) = (client.clone(), base.clone());
                Box::pin(async move { (seq, nchan_post(&client, &base, &channel, payload).await) })
            }
            Sink::Streams(_) => unreachable!("streams take messages with Streams::push"),
        }
    }
}

/// Publishes seqs `0..settings.total_messages` on schedule from `t0` (wall clock
/// `t0_us`); stops early at `deadline`. Streams end (and answer) before it returns.
pub async fn run(mut sink: Sink, s: &Settings, t0: Instant, t0_us: u64, deadline: Instant) -> PublishReport {
    let rate = s.args.rate;
    let total = s.total_messages;
    let channels = s.args.channels as u64;
    let mut report = PublishReport {
        via: s.args.publish.as_str().to_owned(),
        scheduled: total,
        measure_start_us: t0_us + (s.measure_from as f64 * 1e6 / rate) as u64,
        ..Default::default()
    };
    let mut inflight: FuturesUnordered<PublishFuture> = FuturesUnordered::new();
    let max_inflight = s.args.max_inflight;
    let offset = |k: u64| Duration::from_secs_f64(k as f64 / rate);
    let mut text = String::with_capacity(s.args.payload_bytes + 64);
    let mut next: u64 = 0;
    let mut max_lag = Duration::ZERO;
    let mut sum_lag = Duration::ZERO;
    let mut last_send = t0;

    let settle = |report: &mut PublishReport, (seq, r): (u64, Result<bool, String>)| match r {
        Ok(subscribed) => {
            report.ok += 1;
            if !subscribed {
                report.no_receivers += 1;
            }
            if seq >= s.measure_from {
                report.measured += 1;
            }
        }
        Err(kind) => {
            report.failed += 1;
            report.failed_seqs.push(seq);
            *report.errors.entry(kind).or_default() += 1;
        }
    };

    // A dedicated thread keeps the schedule: tokio's timer rounds every sleep up to the
    // next millisecond, which would add ~1 ms of publisher lag to every measurement;
    // `thread::sleep` wakes within tens of µs. It never waits for publishes (open loop):
    // if this task falls behind, due seqs queue up and their lag is measured.
    let (tick_tx, mut ticks) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (t0_std, deadline_std) = (t0.into_std(), deadline.into_std());
    let ticker = std::thread::Builder::new().name("loadgen-schedule".into()).spawn(move || {
        for k in 0..total {
            let due = t0_std + Duration::from_secs_f64(k as f64 / rate);
            if due > deadline_std {
                break;
            }
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tick_tx.send(k).is_err() {
                break;
            }
        }
    });
    if let Err(e) = ticker {
        report.errors.insert(format!("no_schedule_thread: {e}"), 1);
        return report;
    }

    loop {
        let seq = tokio::select! {
            biased;
            k = ticks.recv() => match k {
                Some(k) => k,
                None => break,
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                settle(&mut report, done);
                continue;
            }
        };
        while inflight.len() >= max_inflight {
            // Back-pressure: late messages keep their scheduled time, so the wait shows
            // up in the measured latency.
            if let Some(done) = inflight.next().await {
                settle(&mut report, done);
            }
        }
        let lag = Instant::now().saturating_duration_since(t0 + offset(seq));
        max_lag = max_lag.max(lag);
        sum_lag += lag;
        if lag > Duration::from_millis(10) {
            report.late_10ms += 1;
        }
        let ch = seq % channels;
        let t_us = t0_us + (seq as f64 * 1e6 / rate) as u64;
        payload::encode(Payload { seq, ch, t_us }, s.args.payload_bytes, &mut text);
        match &mut sink {
            Sink::Streams(Some(streams)) => {
                if let Err(kind) = streams.push(ch, seq, &text) {
                    settle(&mut report, (seq, Err(kind)));
                }
            }
            Sink::Streams(None) => settle(&mut report, (seq, Err("stream_not_open".into()))),
            sink => inflight.push(sink.publish(seq, s.channel_name(ch), text.clone())),
        }
        last_send = Instant::now();
        next = seq + 1;
    }
    report.sent = next;
    // Collect the last replies (each is bounded by the client's own timeout).
    let tail = tokio::time::timeout(PUBLISH_TIMEOUT + Duration::from_secs(1), async {
        while let Some(done) = inflight.next().await {
            settle(&mut report, done);
        }
    })
    .await;
    if tail.is_err() {
        report.errors.insert("no_reply".into(), inflight.len() as u64);
        report.failed += inflight.len() as u64;
        // The seqs still in flight are unknown here; they may or may not arrive.
    }
    if let Sink::Streams(Some(streams)) = sink {
        let mut sr = StreamsReport::default();
        for ended in streams.finish(streams::ANSWER_TIMEOUT + Duration::from_secs(5)).await {
            let a = ended.answer;
            let acked = (a.acknowledged() as usize).min(ended.pushed.len());
            for &seq in &ended.pushed[..acked] {
                settle(&mut report, (seq, Ok(true)));
            }
            let kind = a.error_kind().unwrap_or_else(|| "stream_not_published".into());
            for &seq in &ended.pushed[acked..] {
                settle(&mut report, (seq, Err(kind.clone())));
            }
            sr.requests += 1;
            if a.is_ok() {
                sr.ok += 1;
            } else {
                sr.not_ok += 1;
            }
            sr.sent += a.sent;
            sr.published += a.published.unwrap_or(0);
            sr.answers.push(a);
        }
        report.streams = Some(sr);
    }
    report.failed_seqs.sort_unstable();
    report.duration_secs = t0.elapsed().as_secs_f64();
    report.achieved_rate = if report.sent > 0 {
        report.sent as f64 / (last_send.saturating_duration_since(t0).as_secs_f64() + 1.0 / rate)
    } else {
        0.0
    };
    report.max_lag_ms = max_lag.as_secs_f64() * 1000.0;
    report.mean_lag_ms = if next > 0 { sum_lag.as_secs_f64() * 1000.0 / next as f64 } else { 0.0 };
    report
}
