//! The long-poll subscriber: one poll after another on a kept-alive connection, the
//! gateway's cursor (Nchan: the last answer's message id) carried from each answer to
//! the next poll, and a new connection when the server closes one.

use std::{
    net::Ipv4Addr,
    sync::{Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use shared::protocol::PollResponse;
use tokio::{net::TcpStream, time::timeout};

use super::{
    state::{Shared, now_us},
    tracker::Tracker,
};
use crate::{
    cli::{NCHAN_SUB_PATH, ServerKind},
    http::{HttpConn, ResponseHead},
    net::{self, io_kind},
};

/// Largest long-poll answer accepted.
const MAX_POLL_BODY: usize = 64 << 20;
/// Most reconnects of one long-poll subscriber after the server closed its connection.
const MAX_POLL_RECONNECTS: u32 = 100;

pub(super) struct PollSession {
    conn: HttpConn,
    channel: String,
    /// The gateway's cursor.
    cursor: String,
    /// Nchan's message id of the last answer: its `Last-Modified` and `Etag`.
    nchan_id: Option<(Option<String>, Option<String>)>,
    source: Option<Ipv4Addr>,
    reconnect: bool,
    reconnects: u32,
}

impl PollSession {
    pub(super) async fn connect(
        sh: &Shared,
        g: u64,
        tr: &Mutex<Tracker>,
        stream: TcpStream,
        channel: String,
        source: Option<Ipv4Addr>,
    ) -> Result<Self, String> {
        let mut s = Self {
            conn: HttpConn::new(stream),
            channel,
            cursor: String::new(),
            nchan_id: None,
            source,
            reconnect: false,
            reconnects: 0,
        };
        s.poll(sh, g, tr, 0).await?;
        Ok(s)
    }

    /// One poll: asks for messages after the cursor, holding up to `hold` seconds.
    async fn poll(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>, hold: u64) -> Result<(), String> {
        if sh.s.args.server == ServerKind::Nchan {
            return self.poll_nchan(sh, g, tr).await;
        }
        let mut path = format!("{}/poll?channel={}&timeout={hold}", sh.s.target(g).base_path, self.channel);
        if !self.cursor.is_empty() {
            path.push_str("&cursor=");
            percent_encode(&self.cursor, &mut path);
        }
        let (head, body) = Self::exchange(
            &mut self.conn,
            &mut self.reconnect,
            &sh.s.target(g).host_header,
            &path,
            "application/json",
            &[],
        )
        .await?;
        if head.status != 200 {
            return Err(format!("http_{}", head.status));
        }
        let resp: PollResponse = serde_json::from_slice(&body).map_err(|_| "poll_bad_body".to_owned())?;
        if resp.reset && !self.cursor.is_empty() {
            sh.poll_resets.fetch_add(1, Relaxed);
        }
        let now = now_us();
        for m in &resp.messages {
            sh.deliver(g, tr, &m.data, now);
        }
        self.cursor = resp.cursor;
        Ok(())
    }

    /// Sends one poll and reads its whole answer; notes when the server closes after it.
    /// (Fields, not `&mut self`: the Nchan poll's extra headers borrow `self`.)
    async fn exchange(
        conn: &mut HttpConn,
        reconnect: &mut bool,
        host: &str,
        path: &str,
        accept: &str,
        extra: &[(&str, &str)],
    ) -> Result<(ResponseHead, Vec<u8>), String> {
        conn.send_get_with(host, path, accept, extra).await.map_err(|e| io_kind(&e))?;
        let head = conn.read_head().await.map_err(|e| e.kind())?;
        let body = conn.read_body(&head, MAX_POLL_BODY).await.map_err(|e| e.kind())?;
        if head.close {
            *reconnect = true;
        }
        Ok((head, body))
    }

    /// One Nchan long-poll: the next message after the last one's id (Nchan answers one
    /// message per poll and holds the request until there is one).
    async fn poll_nchan(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> Result<(), String> {
        let path = format!("{}{NCHAN_SUB_PATH}?channel={}", sh.s.target(g).base_path, self.channel);
        let mut extra = Vec::with_capacity(2);
        if let Some((last_modified, etag)) = &self.nchan_id {
            if let Some(v) = last_modified {
                extra.push(("If-Modified-Since", v.as_str()));
            }
            if let Some(v) = etag {
                extra.push(("If-None-Match", v.as_str()));
            }
        }
        let (head, body) = Self::exchange(
            &mut self.conn,
            &mut self.reconnect,
            &sh.s.target(g).host_header,
            &path,
            "*/*",
            &extra,
        )
        .await?;
        match head.status {
            200 => {}
            // No message within a subscriber timeout configured on the server: ask again.
            304 | 408 => return Ok(()),
            status => return Err(format!("http_{status}")),
        }
        sh.deliver(g, tr, &String::from_utf8_lossy(&body), now_us());
        self.nchan_id = Some((head.last_modified, head.etag));
        Ok(())
    }

    pub(super) async fn run(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> String {
        let hold = sh.s.args.poll_timeout;
        let nchan = sh.s.args.server == ServerKind::Nchan;
        // Nchan has no per-request hold: the client gives up after `hold` and polls again.
        let limit = Duration::from_secs(if nchan { hold } else { hold + 15 });
        loop {
            if self.reconnect {
                if self.reconnects >= MAX_POLL_RECONNECTS {
                    return "poll_too_many_reconnects".into();
                }
                self.reconnects += 1;
                sh.poll_reconnects.fetch_add(1, Relaxed);
                match net::connect(sh.s.target(g).dest, self.source).await {
                    Ok(stream) => self.conn = HttpConn::new(stream),
                    Err(e) => return format!("poll_reconnect_{}", io_kind(&e)),
                }
                self.reconnect = false;
            }
            match timeout(limit, self.poll(sh, g, tr, hold)).await {
                Ok(Ok(())) => {}
                // A kept-alive connection the server closed: poll again (same cursor) on a new one.
                Ok(Err(kind)) if kind == "eof" || kind == "reset" || kind == "broken_pipe" => {
                    self.reconnect = true
                }
                Ok(Err(kind)) => return kind,
                Err(_) if nchan => self.reconnect = true,
                Err(_) => return "poll_no_answer".into(),
            }
        }
    }
}

/// Appends `s` percent-encoded for a query value (unreserved characters kept).
fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_encoding() {
        let mut s = String::new();
        percent_encode("eyJl-_Ij/+=", &mut s);
        assert_eq!(s, "eyJl-_Ij%2F%2B%3D");
    }
}
