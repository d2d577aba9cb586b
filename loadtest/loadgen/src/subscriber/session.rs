//! One subscriber from start to end: connect (within the connect limiter and the
//! deadlines), report the outcome, then receive over its transport until the connection
//! ends or the pool stops.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::mpsc,
    time::{Instant, timeout, timeout_at},
};

use super::{
    poll::PollSession,
    sse::SseSession,
    state::{Shared, lock, now_us},
    tracker::Tracker,
    ws::{connect_ws, run_ws},
};
use crate::{
    cli::Transport,
    net::{self, io_kind},
    ws::WsConn,
};

pub(super) async fn subscriber(
    sh: Arc<Shared>,
    g: u64,
    tr: Arc<Mutex<Tracker>>,
    tx: mpsc::UnboundedSender<Result<Duration, String>>,
    phase_deadline: Instant,
) {
    let attempt = async {
        let _permit = sh.sem.acquire().await.map_err(|_| "closed".to_owned())?;
        let begin = Instant::now();
        let connect_timeout = Duration::from_secs_f64(sh.s.args.connect_timeout);
        match timeout(connect_timeout, connect(&sh, g, &tr)).await {
            Ok(Ok(session)) => Ok((session, begin.elapsed())),
            Ok(Err(kind)) => Err(kind),
            Err(_) => Err("connect_timeout".to_owned()),
        }
    };
    let result = tokio::select! {
        _ = sh.stop.cancelled() => return,
        r = timeout_at(phase_deadline, attempt) => r.unwrap_or_else(|_| Err("connect_phase_deadline".into())),
    };
    let mut session = match result {
        Ok((session, took)) => {
            lock(&tr).connected = true;
            let _ = tx.send(Ok(took));
            session
        }
        Err(kind) => {
            let _ = tx.send(Err(kind));
            return;
        }
    };
    drop(tx);
    let reason = tokio::select! {
        _ = sh.stop.cancelled() => return,
        r = session.run(&sh, g, &tr) => r,
    };
    if !sh.stop.is_cancelled() {
        lock(&tr).disconnect = Some((reason, now_us()));
    }
}

/// A subscribed connection.
enum Session {
    Sse(SseSession),
    Ws(WsConn),
    Poll(PollSession),
}

async fn connect(sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> Result<Session, String> {
    let source = net::source_for(&sh.s.source_ips, g as usize);
    let stream = net::connect(sh.s.target(g).dest, source).await.map_err(|e| io_kind(&e))?;
    let ch = sh.s.channel_name(g % sh.channels);
    match sh.s.transport(g) {
        Transport::Sse => SseSession::connect(sh, g, tr, stream, &ch).await.map(Session::Sse),
        Transport::Ws => connect_ws(sh, g, tr, stream, &ch).await.map(Session::Ws),
        Transport::Poll => PollSession::connect(sh, g, tr, stream, ch, source).await.map(Session::Poll),
    }
}

impl Session {
    /// Receives until the connection ends; returns why.
    async fn run(&mut self, sh: &Shared, g: u64, tr: &Mutex<Tracker>) -> String {
        match self {
            Session::Sse(s) => s.run(sh, g, tr).await,
            Session::Ws(ws) => run_ws(sh, g, tr, ws).await,
            Session::Poll(p) => p.run(sh, g, tr).await,
        }
    }
}
