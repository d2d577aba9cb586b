//! The WebSocket subscriber: `GET /ws?channel=…` (Nchan: its subscriber location),
//! subscribed at the gateway's `subscribed` frame (Nchan: at the upgrade), then message
//! frames delivered as they are read.

use std::{ops::ControlFlow, sync::Mutex};

use shared::protocol::ServerFrame;
use tokio::net::TcpStream;

use super::{
    state::{Shared, lock, now_us},
    tracker::Tracker,
};
use crate::{
    cli::{NCHAN_SUB_PATH, ServerKind},
    ws::{End, Msg, WsConn, with_message_data},
};

/// What a server text frame meant to us.
enum WsEvent {
    Subscribed,
    Error(String),
    Other,
}

/// Handles a gateway text frame; `now` is the receive time of the read it came in,
/// taken at the first delivery.
fn ws_text(sh: &Shared, g: u64, tr: &Mutex<Tracker>, text: &str, now: &mut Option<u64>) -> WsEvent {
    // Message frames, the bulk of the traffic, without a JSON parser.
    if with_message_data(text, |data| sh.deliver(g, tr, data, *now.get_or_insert_with(now_us))) {
        return WsEvent::Other;
    }
    match serde_json::from_str::<ServerFrame>(text) {
        Ok(ServerFrame::Message { data, .. }) => {
            sh.deliver(g, tr, &data, *now.get_or_insert_with(now_us));
            WsEvent::Other
        }
        Ok(ServerFrame::Subscribed { .. }) => WsEvent::Subscribed,
        Ok(ServerFrame::Error { code, .. }) => WsEvent::Error(code),
        Ok(_) => WsEvent::Other,
        Err(_) => {
            lock(tr).bad_payload += 1;
            WsEvent::Other
        }
    }
}

pub(super) async fn connect_ws(
    sh: &Shared,
    g: u64,
    tr: &Mutex<Tracker>,
    stream: TcpStream,
    ch: &str,
) -> Result<WsConn, String> {
    let nchan = sh.s.args.server == ServerKind::Nchan;
    let target = sh.s.target(g);
    let path = format!("{}{}?channel={ch}", target.base_path, if nchan { NCHAN_SUB_PATH } else { "/ws" });
    let mut ws = WsConn::connect(stream, &target.host_header, &path).await?;
    if nchan {
        // Nchan enqueues the subscriber before it answers the upgrade and sends no frame.
        return Ok(ws);
    }
    loop {
        let mut now = None;
        let read = ws.read(|m| match m {
            Msg::Text(t) => match ws_text(sh, g, tr, t, &mut now) {
                WsEvent::Subscribed => ControlFlow::Break(Ok(())),
                WsEvent::Error(code) => ControlFlow::Break(Err(format!("ws_error_{code}"))),
                WsEvent::Other => ControlFlow::Continue(()),
            },
            Msg::Binary(_) => ControlFlow::Continue(()),
        });
        match read.await {
            Ok(None) => {}
            // Frames after the `subscribed` one stay in the reader for `run_ws`.
            Ok(Some(subscribed)) => return subscribed.map(|()| ws),
            Err(End::Eof) => return Err("eof_before_subscribed".into()),
            Err(e) => return Err(e.kind()),
        }
    }
}

pub(super) async fn run_ws(sh: &Shared, g: u64, tr: &Mutex<Tracker>, ws: &mut WsConn) -> String {
    let nchan = sh.s.args.server == ServerKind::Nchan;
    let mut error = None;
    loop {
        // One receive time per read, as for SSE.
        let mut now = None;
        let read = ws.read(|m| {
            match m {
                // Nchan sends each message verbatim as one frame.
                Msg::Text(t) if nchan => sh.deliver(g, tr, t, *now.get_or_insert_with(now_us)),
                Msg::Binary(b) if nchan => {
                    sh.deliver(g, tr, &String::from_utf8_lossy(b), *now.get_or_insert_with(now_us))
                }
                Msg::Text(t) => {
                    if let WsEvent::Error(code) = ws_text(sh, g, tr, t, &mut now) {
                        error = Some(format!("ws_error_{code}"));
                    }
                }
                Msg::Binary(_) => {}
            }
            ControlFlow::<()>::Continue(())
        });
        match read.await {
            Ok(_) => {}
            Err(End::Close(code)) => {
                let close = format!("ws_close_{code}");
                return error.map_or(close.clone(), |e| format!("{e}_{close}"));
            }
            Err(e) => return error.unwrap_or_else(|| e.kind()),
        }
    }
}
