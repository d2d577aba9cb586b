//! The SSE subscriber: `GET /sse?channel=…` (Nchan: its subscriber location), subscribed
//! at the first comment, then events parsed out of the body as it arrives.

use std::sync::Mutex;

use shared::sse::SseParser;
use tokio::net::TcpStream;

use super::{
    state::{Shared, now_us},
    tracker::Tracker,
};
use crate::{
    cli::{NCHAN_SUB_PATH, ServerKind},
    http::{BodyDecoder, HttpConn},
    net::io_kind,
};

pub(super) struct SseSession {
    conn: HttpConn,
    body: BodyDecoder,
    parser: SseParser,
    out: Vec<u8>,
}

impl SseSession {
    pub(super) async fn connect(
        sh: &Shared,
        g: u64,
        tr: &Mutex<Tracker>,
        stream: TcpStream,
        ch: &str,
    ) -> Result<Self, String> {
        let mut conn = HttpConn::new(stream);
        let path = match sh.s.args.server {
            ServerKind::Gateway => format!("{}/sse?channel={ch}", sh.s.target(g).base_path),
            ServerKind::Nchan => format!("{}{NCHAN_SUB_PATH}?channel={ch}", sh.s.target(g).base_path),
        };
        conn.send_get(&sh.s.target(g).host_header, &path, "text/event-stream")
            .await
            .map_err(|e| io_kind(&e))?;
        let head = conn.read_head().await.map_err(|e| e.kind())?;
        if head.status != 200 {
            return Err(format!("http_{}", head.status));
        }
        let mut s =
            Self { conn, body: BodyDecoder::for_head(&head), parser: SseParser::new(), out: Vec::new() };
        while s.parser.comments() == 0 {
            if !s.step(sh, g, tr).await? {
                return Err("eof_before_subscribed".into());
            }
        }
        Ok(s)
    }

    /// Reads once and handles the events completed; `Ok(false)` at the end of the stream.
    pub(super) async fn step(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> Result<bool, String> {
        if !self.conn.read_body_some(&mut self.body, &mut self.out).await.map_err(|e| e.kind())? {
            return Ok(false);
        }
        let events = self.parser.feed(&self.out);
        if events.is_empty() {
            return Ok(true);
        }
        let now = now_us();
        for ev in events {
            match ev.event.as_deref() {
                None | Some("message") => sh.deliver(g, tr, &ev.data, now),
                Some("disconnect") => {
                    let reason = serde_json::from_str::<serde_json::Value>(&ev.data)
                        .ok()
                        .and_then(|v| v.get("reason")?.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "unknown".into());
                    return Err(format!("sse_disconnect_{reason}"));
                }
                Some(_) => {}
            }
        }
        Ok(true)
    }

    /// Receives until the stream ends; returns why.
    pub(super) async fn run(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> String {
        loop {
            match self.step(sh, g, tr).await {
                Ok(true) => {}
                Ok(false) => return "eof".into(),
                Err(kind) => return kind,
            }
        }
    }
}
