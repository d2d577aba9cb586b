//! Token streams: one streaming `POST /publish/{channel}?stream=lines` (or `=sse`) per
//! channel, open for the whole run, its chunked body written one message (token) at a
//! time as the schedule makes it due — the way an LLM answer is streamed. The gateway
//! publishes each line as it arrives and answers once the body ends:
//! `200 {"channel","published","first_id","last_id"}`, or a 4xx
//! `{"error","message","published",...}` that stops the stream at a bad line.
//!
//! Each stream is a task that owns its socket: it writes whatever tokens are queued as
//! one chunk (the kernel would coalesce them anyway when the server reads slowly),
//! watches for an early answer while it writes, and at the end sends the last chunk and
//! reads the answer. `published` says how many of the tokens it wrote were published:
//! the first `published` of them count as acknowledged, the rest as failed (subscribers
//! do not expect them).

use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpStream, tcp::OwnedReadHalf},
    sync::mpsc,
    task::JoinHandle,
    time::timeout,
};

use crate::{
    cli::{Settings, StreamFormat},
    http::{HttpConn, HttpError, ResponseHead},
    net::{self, io_kind},
};

/// Streams opened at once.
const OPEN_CONCURRENCY: usize = 100;
/// Longest wait for a stream's answer once its body has ended. A server that fell
/// behind answers only when it has published the last line; waiting for that gives the
/// rate it sustained instead of counting published tokens as lost.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most tokens written in one chunk.
const MAX_BATCH: usize = 256;
/// Largest answer body read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One token for a stream: its text (the payload, not yet framed).
struct Token {
    text: String,
}

/// The end of one stream, as reported (one per channel in the JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamAnswer {
    /// The channel.
    pub channel: String,
    /// Tokens written into the body.
    pub sent: u64,
    /// HTTP status of the answer; `None` when none came.
    pub status: Option<u16>,
    /// The answer's `published`: messages the gateway published from this body.
    pub published: Option<u64>,
    /// The answer's `first_id`.
    pub first_id: Option<String>,
    /// The answer's `last_id`.
    pub last_id: Option<String>,
    /// The answer's `error` code, or what went wrong when there was no answer.
    pub error: Option<String>,
    /// The answer's `message` (e.g. `line 7: ...`).
    pub message: Option<String>,
}

impl StreamAnswer {
    /// Tokens the answer acknowledges: the first `published` of those sent.
    pub fn acknowledged(&self) -> u64 {
        self.published.unwrap_or(0).min(self.sent)
    }

    /// Whether the stream ended as it should: 200 and every token sent published.
    pub fn is_ok(&self) -> bool {
        self.status == Some(200) && self.published == Some(self.sent)
    }

    /// Short name of what went wrong (for the error counts), if anything did.
    pub fn error_kind(&self) -> Option<String> {
        match (self.status, &self.error) {
            _ if self.is_ok() => None,
            (Some(200), _) if self.published.is_none() => Some("stream_answer_without_published".into()),
            (Some(200), _) => Some("stream_published_mismatch".into()),
            (Some(status), Some(code)) => Some(format!("stream_http_{status}_{code}")),
            (Some(status), None) => Some(format!("stream_http_{status}")),
            (None, Some(why)) => Some(format!("stream_{why}")),
            (None, None) => Some("stream_no_answer".into()),
        }
    }
}

/// The part of an answer we read (success and error answers alike).
#[derive(Debug, Default, Deserialize)]
struct AnswerBody {
    published: Option<u64>,
    first_id: Option<String>,
    last_id: Option<String>,
    error: Option<String>,
    message: Option<String>,
}

/// One open stream.
struct Open {
    channel: String,
    tx: Option<mpsc::UnboundedSender<Token>>,
    task: Option<JoinHandle<StreamAnswer>>,
    /// Why it could not be opened.
    failed: Option<String>,
    /// Seqs handed to its task, in order: the task writes a prefix of them.
    pushed: Vec<u64>,
}

/// How one stream ended: the seqs handed to it, in order, and its answer. The first
/// [`StreamAnswer::acknowledged`] of the seqs were published; the rest were not.
pub struct Ended {
    /// Seqs handed to the stream, in order.
    pub pushed: Vec<u64>,
    /// The answer (or why there was none).
    pub answer: StreamAnswer,
}

/// The streams of a run, one per channel (index = channel index).
pub struct Streams {
    open: Vec<Open>,
}

fn failed(channel: String, why: String) -> Open {
    Open { channel, tx: None, task: None, failed: Some(why), pushed: Vec::new() }
}

/// The request head of channel `channel`'s stream.
fn request_head(s: &Settings, c: u64, channel: &str) -> String {
    let t = s.target(c);
    let mut head = format!(
        "POST {}/publish/{channel}?stream={} HTTP/1.1\r\nHost: {}\r\nUser-Agent: loadgen\r\n\
         Content-Type: {}\r\nTransfer-Encoding: chunked\r\nAccept: application/json\r\n",
        t.base_path,
        s.args.stream_format.as_str(),
        t.host_header,
        match s.args.stream_format {
            StreamFormat::Lines => "text/plain",
            StreamFormat::Sse => "text/event-stream",
        }
    );
    if let Some(k) = &s.args.api_key {
        head.push_str("X-API-Key: ");
        head.push_str(k);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

impl Streams {
    /// Opens one stream per channel (channel c on node `c % nodes` of `--url`): connects
    /// and sends the request head; the body follows token by token.
    pub async fn open(s: &Settings) -> Result<Self> {
        let channels = s.args.channels as u64;
        let format = s.args.stream_format;
        let mut open: Vec<Open> = stream::iter(0..channels)
            .map(|c| async move {
                let channel = s.channel_name(c);
                let head = request_head(s, c, &channel);
                let connected = async {
                    let mut sock = net::connect(s.target(c).dest, None).await?;
                    sock.write_all(head.as_bytes()).await?;
                    Ok::<_, std::io::Error>(sock)
                };
                match timeout(Duration::from_secs(10), connected).await {
                    Ok(Ok(sock)) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        let task = tokio::spawn(run_stream(sock, rx, format, channel.clone()));
                        Open { channel, tx: Some(tx), task: Some(task), failed: None, pushed: Vec::new() }
                    }
                    Ok(Err(e)) => failed(channel, io_kind(&e)),
                    Err(_) => failed(channel, "timeout".into()),
                }
            })
            .buffered(OPEN_CONCURRENCY)
            .collect()
            .await;
        if let Some(why) = open.first().and_then(|o| o.failed.clone())
            && open.iter().all(|o| o.failed.is_some())
        {
            bail!("could not open any publishing stream at {} ({why})", s.args.url);
        }
        open.shrink_to_fit();
        Ok(Self { open })
    }

    /// Hands token `seq` to channel `c`'s stream; `Err(kind)` when that stream has ended
    /// (the token is not sent).
    pub fn push(&mut self, c: u64, seq: u64, text: &str) -> Result<(), String> {
        let o = &mut self.open[c as usize];
        match &o.tx {
            Some(tx) => {
                tx.send(Token { text: text.to_owned() }).map_err(|_| "stream_closed".to_owned())?;
                o.pushed.push(seq);
                Ok(())
            }
            None => Err(format!("stream_connect_{}", o.failed.as_deref().unwrap_or("failed"))),
        }
    }

    /// Ends every body and collects the answers (waiting at most `wait` in all).
    pub async fn finish(mut self, wait: Duration) -> Vec<Ended> {
        for o in &mut self.open {
            o.tx = None;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut ended = Vec::with_capacity(self.open.len());
        for o in self.open {
            let answer = StreamAnswer { channel: o.channel, ..Default::default() };
            let answer = match o.task {
                None => StreamAnswer { error: o.failed.map(|f| format!("connect_{f}")), ..answer },
                Some(mut task) => match tokio::time::timeout_at(deadline, &mut task).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(_)) => StreamAnswer { error: Some("task_failed".into()), ..answer },
                    Err(_) => {
                        task.abort();
                        StreamAnswer { error: Some("answer_timeout".into()), ..answer }
                    }
                },
            };
            ended.push(Ended { pushed: o.pushed, answer });
        }
        ended
    }
}

/// Frames `tokens` as one chunk of the body into `out`.
fn frame(format: StreamFormat, tokens: &[Token], out: &mut Vec<u8>) {
    out.clear();
    let (before, after): (&[u8], &[u8]) = match format {
        StreamFormat::Lines => (b"", b"\n"),
        StreamFormat::Sse => (b"data: ", b"\n\n"),
    };
    let len: usize = tokens.iter().map(|t| before.len() + t.text.len() + after.len()).sum();
    out.extend_from_slice(format!("{len:x}\r\n").as_bytes());
    for t in tokens {
        out.extend_from_slice(before);
        out.extend_from_slice(t.text.as_bytes());
        out.extend_from_slice(after);
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads an answer (head and body) into `answer`.
async fn read_answer(
    conn: &mut HttpConn<OwnedReadHalf>,
    head: Result<ResponseHead, HttpError>,
    answer: &mut StreamAnswer,
) {
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            answer.error = Some(format!("no_answer_{}", e.kind()));
            return;
        }
    };
    answer.status = Some(head.status);
    match timeout(ANSWER_TIMEOUT, conn.read_body(&head, MAX_ANSWER_BYTES)).await {
        Ok(Ok(body)) => match serde_json::from_slice::<AnswerBody>(&body) {
            Ok(b) => {
                answer.published = b.published;
                answer.first_id = b.first_id;
                answer.last_id = b.last_id;
                answer.error = b.error;
                answer.message = b.message;
            }
            Err(_) => {
                answer.error = Some("answer_not_json".into());
                answer.message = Some(String::from_utf8_lossy(&body).chars().take(200).collect());
            }
        },
        Ok(Err(e)) => answer.error = Some(format!("answer_body_{}", e.kind())),
        Err(_) => answer.error = Some("answer_body_timeout".into()),
    }
}

/// One stream from its first token to its answer.
async fn run_stream(
    sock: TcpStream,
    mut rx: mpsc::UnboundedReceiver<Token>,
    format: StreamFormat,
    channel: String,
) -> StreamAnswer {
    let (rd, mut wr) = sock.into_split();
    let mut conn = HttpConn::new(rd);
    let mut answer = StreamAnswer { channel, ..Default::default() };
    let mut batch: Vec<Token> = Vec::with_capacity(16);
    let mut buf = Vec::new();
    // An answer before the body ended: the server stopped the stream.
    let mut early = None;
    loop {
        let first = tokio::select! {
            biased;
            head = conn.read_head() => {
                early = Some(head);
                break;
            }
            t = rx.recv() => match t {
                Some(t) => t,
                None => break,
            },
        };
        batch.clear();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(t) => batch.push(t),
                Err(_) => break,
            }
        }
        frame(format, &batch, &mut buf);
        tokio::select! {
            biased;
            head = conn.read_head() => {
                early = Some(head);
                break;
            }
            r = wr.write_all(&buf) => match r {
                Ok(()) => answer.sent += batch.len() as u64,
                Err(e) => {
                    // The server may have answered and closed: look for its answer.
                    let head = timeout(ANSWER_TIMEOUT, conn.read_head()).await;
                    early = Some(head.unwrap_or(Err(HttpError::Io(e))));
                    break;
                }
            },
        }
    }
    // Tokens handed over from now on are refused (the publisher counts them failed).
    rx.close();
    let head = match early {
        Some(head) => head,
        None => match wr.write_all(b"0\r\n\r\n").await {
            Ok(()) => timeout(ANSWER_TIMEOUT, conn.read_head())
                .await
                .unwrap_or(Err(HttpError::Malformed("timeout"))),
            Err(e) => timeout(ANSWER_TIMEOUT, conn.read_head()).await.unwrap_or(Err(HttpError::Io(e))),
        },
    };
    read_answer(&mut conn, head, &mut answer).await;
    answer
}

#[cfg(test)]
mod tests;
