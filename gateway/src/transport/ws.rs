//! WebSocket: `GET /ws[?channel=a]`, JSON text frames.
//!
//! [`open`] checks the upgrade request and answers `101`; the bare connection then
//! belongs to a [`Session`] (see `server::Takeover`), which speaks the protocol itself
//! (`wire::ws_frame`): a message's frame is encoded once per delivery and written as is
//! to every subscriber's socket. Client ops: `subscribe`, `unsubscribe`, `publish`
//! (when enabled), `ping`. Close codes: 1000 normal, 1001 ping timeout, 1002 protocol
//! error, 1007 invalid UTF-8, 1008 slow consumer / policy, 1009 message too big, 1011
//! server error, 1012 server restarting (reconnect elsewhere), 4001 token expired; a
//! client's own valid close code is echoed.
//!
//! - [`session`]: the connection's task, its writes and its goodbye.
//! - [`ops`]: what the client may ask for; [`reply`]: error frames and close codes.

mod ops;
mod publishes;
mod read;
mod reply;
mod session;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header, request::Parts};
use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use shared::protocol::error_code as code;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

pub use self::{reply::TOKEN_EXPIRED, session::Session};
use super::check_channels;
use crate::{
    error::ApiError,
    server::{ConnCtx, Opened, Query, Takeover, io::Io},
    state::AppState,
};

/// The fixed header fields of the `101` answer.
static UPGRADE_HEADERS: [(HeaderName, HeaderValue); 2] = [
    (header::CONNECTION, HeaderValue::from_static("upgrade")),
    (header::UPGRADE, HeaderValue::from_static("websocket")),
];

/// `GET /ws`: checks an upgrade request (headers, origin, channels, token, capacity)
/// and opens the session that runs on the upgraded connection. The connection's own
/// close token is the session's: nothing else watches it once upgraded.
pub async fn open(state: &AppState, req: &Parts, ctx: &ConnCtx) -> Result<Opened, ApiError> {
    let headers = &req.headers;
    let key = check_upgrade(req)?;
    check_origin(headers, &state.config.allowed_origins)?;
    let mut query = Query::parse(req.uri.query());
    let channels = check_channels(std::mem::take(&mut query.channels), &state.config.limits, false)?;
    let claims = state.authorize(headers, query.get("token"), &channels)?;
    super::admit(state.config.limits.max_connections)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a valid header");
    let (state, close) = (state.clone(), ctx.close.clone());
    let run = move |io: Io, leftover: Bytes, head: Vec<u8>| -> crate::server::UpgradedSession {
        Box::pin(Session::new(state, claims, close, io, &leftover, head).run(channels))
    };
    Ok(Opened {
        status: StatusCode::SWITCHING_PROTOCOLS,
        headers: &UPGRADE_HEADERS,
        extra: Some((header::SEC_WEBSOCKET_ACCEPT, accept)),
        body: Takeover::Upgrade(Box::new(run)),
    })
}

/// Cross-site WebSocket hijacking guard: a browser always sends `Origin`; when an
/// allowlist is configured, upgrades from other origins are refused. Clients that send
/// no `Origin` (servers, CLIs) are not browsers acting for a user and pass.
fn check_origin(h: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = h.get(header::ORIGIN) else { return Ok(()) };
    if allowed.is_empty() || allowed.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(origin.as_bytes())) {
        return Ok(());
    }
    let shown = crate::error::quote(&String::from_utf8_lossy(origin.as_bytes()));
    Err(ApiError::new(StatusCode::FORBIDDEN, code::FORBIDDEN, format!("origin {shown} is not allowed")))
}

/// Checks the opening handshake (RFC 6455 §4.2.1) and returns the client's key: a
/// `GET` over HTTP/1.1 with `Upgrade: websocket`, `Connection: upgrade`, version 13, and
/// one `Sec-WebSocket-Key` that is base64 of 16 bytes. Anything else that is not an
/// upgrade request (a plain `GET`, or a `HEAD`, which never switches protocols) gets 426;
/// another version gets 426 naming version 13 (§4.4); a malformed request, 400.
fn check_upgrade(req: &Parts) -> Result<&str, ApiError> {
    let h = &req.headers;
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if req.method != Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            code::BAD_REQUEST,
            "this endpoint speaks WebSocket: send a GET with Upgrade: websocket",
        ));
    }
    if req.version != Version::HTTP_11 {
        return Err(ApiError::bad_request("a WebSocket upgrade needs HTTP/1.1"));
    }
    let version: Vec<_> = h.get_all(header::SEC_WEBSOCKET_VERSION).iter().collect();
    if version.len() != 1 || version[0] != "13" {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            code::BAD_REQUEST,
            "unsupported Sec-WebSocket-Version; only 13 is supported",
        ));
    }
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err(ApiError::bad_request("exactly one Sec-WebSocket-Key header is required"));
    };
    let key = key.to_str().unwrap_or_default();
    match STANDARD.decode(key) {
        Ok(nonce) if nonce.len() == 16 => Ok(key),
        _ => Err(ApiError::bad_request("Sec-WebSocket-Key must be 16 random bytes in base64")),
    }
}
