//! `gateway publish <channel>`: each line of standard input becomes one message,
//! published with history straight to Redis (`--redis-url`, via `FCALL
//! fanout_publish`) or through a gateway's HTTP API (`--gateway-url`). With `--jsonl` each line is `{"channel","data","event"?}`.
//! Prints a summary to stderr; exits 1 if any line could not be published.

use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use shared::protocol::PublishRequest;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{
    broker::{Publish, redis::script},
    config::{Config, Limits, PublishArgs, mask_url},
    publish::check,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    channel: Option<String>,
    data: String,
    event: Option<String>,
}

enum Target {
    Redis(redis::aio::MultiplexedConnection),
    Http { sender: SendRequest<Full<Bytes>>, host: String, key: Option<String> },
}

/// Runs the publisher over stdin.
pub async fn run(args: PublishArgs) -> ExitCode {
    let mut limits = Limits::default();
    if let Some(max) = args.max_payload_bytes {
        limits.max_payload_bytes = max;
    }
    if args.channel.is_none() && !args.jsonl {
        eprintln!("gateway publish: a channel is required (or use --jsonl lines that name one)");
        return ExitCode::from(2);
    }
    // The channel and event given once, checked before anything is read.
    if let Err(e) = check(&limits, args.channel.as_deref().unwrap_or("ok"), args.event.as_deref(), b"", None)
    {
        eprintln!("gateway publish: {}", e.message);
        return ExitCode::from(2);
    }
    let mut target = match connect(&args).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gateway publish: {e}");
            return ExitCode::from(1);
        }
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let (mut sent, mut failed, mut lineno) = (0u64, 0u64, 0u64);
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                eprintln!("gateway publish: reading stdin: {e}");
                failed += 1;
                break;
            }
        };
        lineno += 1;
        let msg = match parse_line(&args, line, &limits) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("gateway publish: line {lineno}: {e}");
                failed += 1;
                continue;
            }
        };
        match publish(&mut target, msg).await {
            Ok(()) => sent += 1,
            Err(e) => {
                eprintln!("gateway publish: line {lineno}: {e}");
                failed += 1;
            }
        }
    }
    eprintln!("gateway publish: {sent} published, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn parse_line(args: &PublishArgs, line: String, limits: &Limits) -> Result<Publish, String> {
    let (channel, data, event) = if args.jsonl {
        let l: Line = serde_json::from_str(&line)
            .map_err(|e| format!("not a JSON line {{\"channel\",\"data\"}}: {e}"))?;
        let channel = l.channel.or_else(|| args.channel.clone()).ok_or("no \"channel\" in the line")?;
        (channel, l.data, l.event.or_else(|| args.event.clone()))
    } else {
        (args.channel.clone().unwrap_or_default(), line, args.event.clone())
    };
    check(limits, &channel, event.as_deref(), data.as_bytes(), None).map_err(|e| e.message)?;
    Ok(Publish { channel, data: Bytes::from(data), event, history: true, idempotency_key: None })
}

async fn connect(args: &PublishArgs) -> Result<Target, String> {
    if let Some(url) = &args.gateway_url {
        let rest = url.strip_prefix("http://").ok_or("--gateway-url must start with http://")?;
        let host = rest.trim_end_matches('/').to_owned();
        let stream = tokio::net::TcpStream::connect(&host)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("cannot talk HTTP to {host}: {e}"))?;
        tokio::spawn(conn);
        return Ok(Target::Http { sender, host, key: args.api_key.clone() });
    }
    let Some(url) = &args.redis_url else {
        return Err("nowhere to publish: give --redis-url (or GATEWAY_REDIS_URL) or --gateway-url".into());
    };
    let client =
        redis::Client::open(url.as_str()).map_err(|e| format!("bad Redis URL {}: {e}", mask_url(url)))?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", mask_url(url)))?;
    Ok(Target::Redis(conn))
}

async fn publish(target: &mut Target, msg: Publish) -> Result<(), String> {
    match target {
        Target::Redis(conn) => {
            // With history, like the HTTP API: `FCALL fanout_publish`. A Redis no gateway
            // has connected to yet lacks the library; load it with the default limits.
            let cmd = script::publish_cmd(&msg);
            match cmd.query_async::<redis::Value>(conn).await {
                Err(e) if script::is_missing_function(&e) => {
                    let source = script::library_source(&Config::default().history);
                    script::load_library(conn, &source)
                        .await
                        .map_err(|e| format!("redis: loading the library: {e}"))?;
                    cmd.query_async::<redis::Value>(conn).await.map(|_| ()).map_err(|e| format!("redis: {e}"))
                }
                r => r.map(|_| ()).map_err(|e| format!("redis: {e}")),
            }
        }
        Target::Http { sender, host, key } => {
            let body = PublishRequest {
                channel: Some(msg.channel),
                data: String::from_utf8_lossy(&msg.data).into_owned(),
                event: msg.event,
                ..Default::default()
            };
            let mut req = Request::post("/api/publish")
                .header("host", host.as_str())
                .header("content-type", "application/json");
            if let Some(key) = key {
                req = req.header("x-api-key", key.as_str());
            }
            let req = req
                .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("serializes"))))
                .map_err(|e| e.to_string())?;
            sender.ready().await.map_err(|e| format!("gateway connection: {e}"))?;
            let resp = sender.send_request(req).await.map_err(|e| format!("gateway: {e}"))?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("gateway answered {status}: {}", String::from_utf8_lossy(&bytes)))
            }
        }
    }
}
