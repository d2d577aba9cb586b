use tokio::{io::AsyncReadExt, net::TcpListener, time::Instant};

use super::*;
use crate::{
    cli::tests::settings,
    http::{BodyDecoder, find_head_end, parse_head},
    payload,
    publisher::{Sink, run},
    subscriber::now_us,
};

/// What the stand-in server does with a stream.
#[derive(Clone, Copy)]
enum Plays {
    /// Reads the whole body, answers 200 with `published` = the lines read.
    Accepts,
    /// Answers 413 at line 3 (2 published) and closes.
    RefusesLine3,
    /// Closes after the first line without answering.
    Vanishes,
}

/// A stand-in for the gateway's streaming publish endpoint: one task per
/// connection; checks the request head, decodes the chunked body line by line and
/// plays its part. Returns each connection's head and lines.
async fn stand_in(listener: TcpListener, parts: Vec<Plays>) -> Vec<(String, Vec<String>)> {
    let mut tasks = Vec::new();
    while tasks.len() < parts.len() {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut rbuf = [0u8; 4096];
        // Connections that send no head (loadgen's reachability check) are skipped.
        let end = loop {
            if let Some(end) = find_head_end(&buf, 0) {
                break Some(end);
            }
            match sock.read(&mut rbuf).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&rbuf[..n]),
                _ => break None,
            }
        };
        let Some(end) = end else { continue };
        let parts = parts.clone();
        tasks.push(tokio::spawn(async move {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let channel: u64 = head.split(['-', '?']).nth(1).unwrap().parse().unwrap();
            let plays = parts[channel as usize];
            let chunked = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
            let mut body = BodyDecoder::for_head(&chunked);
            let (mut text, mut lines) = (Vec::new(), Vec::new());
            let mut input = buf[end..].to_vec();
            let answer = loop {
                let used = body.decode(&input, &mut text).unwrap();
                input.drain(..used);
                while let Some(nl) = text.iter().position(|&b| b == b'\n') {
                    lines.push(String::from_utf8(text.drain(..=nl).collect()).unwrap().trim_end().to_owned());
                    match plays {
                        Plays::RefusesLine3 if lines.len() == 3 => break,
                        Plays::Vanishes => return (head, lines),
                        _ => {}
                    }
                }
                if matches!(plays, Plays::RefusesLine3) && lines.len() >= 3 {
                    break (
                        413,
                        r#"{"error":"payload_too_large","message":"line 3: too large","published":2}"#
                            .to_owned(),
                    );
                }
                if body.is_done() {
                    let n = lines.len();
                    break (
                        200,
                        format!(r#"{{"channel":"c","published":{n},"first_id":"1-0","last_id":"{n}-0"}}"#),
                    );
                }
                let n = sock.read(&mut rbuf).await.unwrap();
                assert!(n > 0, "eof in the body");
                input.extend_from_slice(&rbuf[..n]);
            };
            let (status, json) = answer;
            let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{json}", json.len());
            tokio::io::AsyncWriteExt::write_all(&mut sock, resp.as_bytes()).await.unwrap();
            (head, lines)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out.sort_by_key(|(head, _)| head.clone());
    out
}

/// Three streams of five tokens against the stand-in: one accepted, one refused at
/// its third line, one dropped without an answer. Only what an answer acknowledged
/// counts as published; the rest fails, and subscribers will not expect it.
#[tokio::test]
async fn streams_write_tokens_as_lines_and_count_what_was_published() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let s = settings(&[
        "--publish",
        "stream",
        "--url",
        &url,
        "--channels",
        "3",
        "--subscribers",
        "3",
        "--rate",
        "60",
        "--duration",
        "0.25",
        "--warmup",
        "0",
        "--api-key",
        "k1",
    ])
    .unwrap();
    let server = tokio::spawn(stand_in(listener, vec![Plays::Accepts, Plays::RefusesLine3, Plays::Vanishes]));
    let mut sink = Sink::connect(&s).await.unwrap();
    sink.prepare(&s).await.unwrap();
    let t0 = Instant::now() + Duration::from_millis(50);
    let report = run(sink, &s, t0, now_us() + 50_000, t0 + Duration::from_secs(20)).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();

    assert_eq!((report.scheduled, report.sent), (15, 15));
    // Channel 0: all 5; channel 1: its first 2 (seqs 1, 4); channel 2: none.
    assert_eq!((report.ok, report.failed), (7, 8), "{:?}", report.errors);
    assert_eq!(report.failed_seqs, [2, 5, 7, 8, 10, 11, 13, 14]);
    // Tokens due after a stream ended are refused at once (`stream_closed`); the
    // others are named after how their stream ended.
    assert_eq!(report.errors.values().sum::<u64>(), 8);
    for kind in report.errors.keys() {
        let known = ["stream_closed", "stream_http_413_payload_too_large", "stream_no_answer_eof"];
        assert!(known.contains(&kind.as_str()), "{:?}", report.errors);
    }
    let st = report.streams.as_ref().unwrap();
    assert_eq!((st.requests, st.ok, st.not_ok), (3, 1, 2));
    let a = &st.answers;
    assert_eq!((a[0].status, a[0].published, a[0].sent), (Some(200), Some(5), 5));
    assert_eq!(a[0].last_id.as_deref(), Some("5-0"));
    assert_eq!(
        (a[1].status, a[1].published, a[1].error.as_deref()),
        (Some(413), Some(2), Some("payload_too_large"))
    );
    assert_eq!(a[1].message.as_deref(), Some("line 3: too large"));
    assert_eq!((a[2].status, a[2].error.as_deref()), (None, Some("no_answer_eof")));

    for (c, (head, lines)) in seen.iter().enumerate() {
        let want = format!("POST /publish/{}-{c}?stream=lines HTTP/1.1\r\n", s.prefix);
        assert!(head.starts_with(&want), "{head}");
        assert!(
            head.contains("Transfer-Encoding: chunked\r\n") && head.contains("X-API-Key: k1\r\n"),
            "{head}"
        );
        // Each line is one payload of this channel, in order, 100 bytes.
        for (i, line) in lines.iter().enumerate() {
            let p = payload::decode(line).unwrap();
            assert_eq!((p.seq, p.ch, line.len()), (c as u64 + 3 * i as u64, c as u64, 100), "{line}");
        }
    }
    assert_eq!(seen[0].1.len(), 5);
    assert_eq!(seen[2].1.len(), 1);
}

#[test]
fn tokens_are_framed_as_one_chunk() {
    let tokens = [Token { text: "a".into() }, Token { text: "bc".into() }];
    let mut out = Vec::new();
    frame(StreamFormat::Lines, &tokens, &mut out);
    assert_eq!(out, b"5\r\na\nbc\n\r\n");
    frame(StreamFormat::Sse, &tokens[1..], &mut out);
    assert_eq!(out, b"a\r\ndata: bc\n\n\r\n");
}

#[test]
fn answers_say_what_was_acknowledged() {
    let ok = StreamAnswer { sent: 5, status: Some(200), published: Some(5), ..Default::default() };
    assert!(ok.is_ok());
    assert_eq!((ok.acknowledged(), ok.error_kind()), (5, None));
    let bad_line = StreamAnswer {
        sent: 9,
        status: Some(413),
        published: Some(6),
        error: Some("payload_too_large".into()),
        ..Default::default()
    };
    assert_eq!(bad_line.acknowledged(), 6);
    assert_eq!(bad_line.error_kind().as_deref(), Some("stream_http_413_payload_too_large"));
    let short = StreamAnswer { sent: 5, status: Some(200), published: Some(4), ..Default::default() };
    assert_eq!(short.error_kind().as_deref(), Some("stream_published_mismatch"));
    let none = StreamAnswer { sent: 5, error: Some("answer_timeout".into()), ..Default::default() };
    assert_eq!((none.acknowledged(), none.error_kind().as_deref()), (0, Some("stream_answer_timeout")));
    // More published than sent cannot acknowledge more than was sent.
    let more = StreamAnswer { sent: 2, status: Some(200), published: Some(3), ..Default::default() };
    assert_eq!((more.acknowledged(), more.is_ok()), (2, false));
}
