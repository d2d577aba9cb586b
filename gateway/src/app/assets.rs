//! What the public listener serves besides the API: the demo page at `/`, the browser
//! client (`clients/js`, built into its committed `dist/`) at `/client.js` (a plain
//! script defining the global `fanout`) and `/client.mjs` (the same as an ES module),
//! `/favicon.ico`, and `/api/info` for pages that adapt to the node.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse},
};

use crate::state::AppState;

const DEMO_PAGE: &str = include_str!("../demo.html");
const CLIENT_JS: &str = include_str!("../../../clients/js/dist/fanout.js");
const CLIENT_MJS: &str = include_str!("../../../clients/js/dist/fanout.mjs");

/// `GET /`: the demo page.
pub async fn demo_page() -> Html<&'static str> {
    Html(DEMO_PAGE)
}

/// `GET /client.js`: the plain-script build of the browser client.
pub async fn client_js() -> impl IntoResponse {
    client_script(CLIENT_JS)
}

/// `GET /client.mjs`: the ES module build of the browser client.
pub async fn client_mjs() -> impl IntoResponse {
    client_script(CLIENT_MJS)
}

/// A client script: cacheable for an hour (a node upgrade may change it).
fn client_script(body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
}

/// `GET /favicon.ico`: browsers ask for it on every page; an empty answer instead of a
/// logged 404.
pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET /api/info`: what a page needs to know about this node to show the right
/// examples — the broker kind (`redis` or `memory`) and whether demo answers stream.
pub async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "broker": state.hub.broker_kind(),
        "demo_streams": state.config.demo_streams,
    }))
}
