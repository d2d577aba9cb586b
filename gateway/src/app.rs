//! The public HTTP application: routes, shared state, and the answers for unknown
//! routes and methods.

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    response::{Html, IntoResponse},
    routing::{get, post},
};
use shared::protocol::error_code;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    api,
    config::Config,
    error::ApiError,
    hub::Hub,
    server::{ConnCtx, Lean, LeanAnswer, LeanRoute},
    transport,
};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The node's channel registry (and, through it, the broker).
    pub hub: Arc<Hub>,
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Cancelled when the node shuts down; every connection watches it.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks (WebSockets) so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Verifies subscriber tokens; `None` when subscriber auth is off.
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// Publish-rate buckets per API key (or client address when publishing is open).
    pub publish_limit: Arc<crate::ratelimit::SharedBuckets<api::Publisher>>,
}

impl AppState {
    /// Authenticates a subscriber for `channels` when auth is on: `Ok(None)` when off.
    pub fn authorize(
        &self,
        headers: &axum::http::HeaderMap,
        query_token: Option<&str>,
        channels: &[String],
    ) -> Result<Option<crate::auth::Claims>, ApiError> {
        let Some(auth) = &self.auth else { return Ok(None) };
        let claims = auth.authenticate(headers, query_token)?;
        crate::auth::check_channels(Some(&claims), channels)?;
        Ok(Some(claims))
    }
}

const DEMO_PAGE: &str = include_str!("demo.html");

/// The `Vary` value the router's CORS layer adds to every answer.
const CORS_VARY: &str = "origin, access-control-request-method, access-control-request-headers";

/// The CORS headers the router's layer (below) adds to an answer to a simple request
/// (not a preflight), in its order: `Vary`, then `Access-Control-Allow-Origin` — `*`
/// with no allowlist, else the request's `Origin` when it is listed (exact bytes, as
/// the layer compares). For the lean routes, which answer without the router.
fn simple_cors<'a>(allowed: &[String], req: &'a HeaderMap) -> [Option<(HeaderName, &'a [u8])>; 2] {
    let allow = if allowed.is_empty() {
        Some(&b"*"[..])
    } else {
        req.get(header::ORIGIN)
            .map(HeaderValue::as_bytes)
            .filter(|o| allowed.iter().any(|a| a.as_bytes() == *o))
    };
    [Some((header::VARY, CORS_VARY.as_bytes())), allow.map(|o| (header::ACCESS_CONTROL_ALLOW_ORIGIN, o))]
}

/// Appends [`simple_cors`] to a head being written.
fn cors_head(allowed: &[String], req: &HeaderMap, head: &mut Vec<u8>) {
    for (name, value) in simple_cors(allowed, req).into_iter().flatten() {
        crate::server::push_header(head, &name, value);
    }
}

/// An error answered by a lean route, with the headers the router would add.
fn lean_error(err: ApiError, allowed: &[String], req: &HeaderMap) -> LeanAnswer {
    let mut resp = err.into_response();
    for (name, value) in simple_cors(allowed, req).into_iter().flatten() {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            resp.headers_mut().append(name, value);
        }
    }
    LeanAnswer::Answer(resp)
}

/// The subscriber endpoints, answered on the lean path without the router (whose
/// request and response types, boxed services and CORS layer were about half of a new
/// subscriber's allocations): `GET /ws`, `GET /sse` and `GET /poll`. Same checks,
/// sessions and headers as their router handlers.
// A request that is not theirs goes back to the router by value: boxing it would cost
// every other request an allocation.
#[allow(clippy::result_large_err)]
pub fn lean_routes(state: AppState) -> LeanRoute {
    Arc::new(move |req: Request, ctx: &ConnCtx| {
        let allowed = &state.config.allowed_origins;
        match req.uri().path() {
            "/ws" => Ok(Lean::Now(match transport::ws::lean_upgrade(&state, &req, ctx) {
                Ok((run, mut head)) => {
                    cors_head(allowed, req.headers(), &mut head);
                    LeanAnswer::Upgrade(run, head)
                }
                Err(err) => lean_error(err, allowed, req.headers()),
            })),
            "/sse" => {
                let state = state.clone();
                let close = ctx.close.clone();
                // The request's body (none: the lean path reads body-less GETs) is not `Sync`.
                let (req, _) = req.into_parts();
                Ok(Lean::Later(Box::pin(async move {
                    let allowed = &state.config.allowed_origins;
                    match transport::sse::lean_stream(&state, &req, close).await {
                        Ok((mut head, stream)) => {
                            cors_head(allowed, &req.headers, &mut head);
                            LeanAnswer::Stream(head, stream)
                        }
                        Err(err) => lean_error(err, allowed, &req.headers),
                    }
                })))
            }
            "/poll" => Ok(Lean::Now(match transport::poll::lean_poll(&state, &req, ctx.close.clone()) {
                Ok((mut head, answer)) => {
                    cors_head(allowed, req.headers(), &mut head);
                    LeanAnswer::Held(head, answer)
                }
                Err(err) => lean_error(err, allowed, req.headers()),
            })),
            _ => Err(req),
        }
    })
}

/// Builds the public router.
pub fn app(state: AppState) -> Router {
    let max = state.config.limits.max_payload_bytes;
    // JSON escaping can grow a payload up to six times (\uXXXX); the payload itself is
    // checked against the limit after parsing.
    let json_limit = max.saturating_mul(6).saturating_add(64 * 1024);
    let origins = &state.config.allowed_origins;
    let allow_origin = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    // Never credentials: with `Any` that would let every site read responses as the user.
    // The lean routes write what this layer adds by hand (`simple_cors`); a test compares
    // their answers with the router's, so a change here must be made there too.
    let cors = CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    Router::new()
        .route("/", get(|| async { Html(DEMO_PAGE) }))
        .route("/sse", get(transport::sse::handler))
        .route("/ws", get(transport::ws::handler))
        .route("/poll", get(transport::poll::handler))
        .route("/publish/{channel}", post(api::publish_raw).layer(DefaultBodyLimit::max(max)))
        .route("/api/publish", post(api::publish_json).layer(DefaultBodyLimit::max(json_limit)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors)
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        error_code::NOT_FOUND,
        format!("no route for {} {}", req.method(), crate::error::quote(req.uri().path())),
    )
}

async fn method_not_allowed(req: Request) -> impl IntoResponse {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        error_code::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), crate::error::quote(req.uri().path())),
    )
}
