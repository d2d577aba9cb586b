//! The public routes: the router (publishing, the demo page, errors for unknown routes
//! and methods) and the lean subscriber routes, both built from one CORS policy
//! ([`cors`]) and one adapter per answer kind over the transports' single entries.
//!
//! Subscribers' requests (`GET /ws`, `/sse`, `/poll`) are answered on the lean path,
//! without the router, whose request and response types, boxed services and middleware
//! were about half of a new subscriber's allocations; the router answers the same
//! routes (same checks, sessions and headers) for requests that reach it, e.g. after a
//! publish on the same connection.

pub mod assets;
pub mod cors;
pub mod demo;

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use shared::protocol::error_code;

use self::cors::Cors;
use crate::{
    api,
    error::ApiError,
    server::{ConnCtx, LeanAnswer, LeanRoute, Opened, Routes},
    state::AppState,
    transport,
};

/// The subscriber endpoints.
#[derive(Debug, Clone, Copy)]
enum Subscriber {
    Ws,
    Sse,
    Poll,
}

impl Subscriber {
    fn for_path(path: &str) -> Option<Self> {
        match path {
            "/ws" => Some(Self::Ws),
            "/sse" => Some(Self::Sse),
            "/poll" => Some(Self::Poll),
            _ => None,
        }
    }

    /// Opens the session through the transport's one entry.
    async fn open(self, state: &AppState, req: &Parts, ctx: &ConnCtx) -> Result<Opened, ApiError> {
        match self {
            Self::Ws => transport::ws::open(state, req, ctx).await,
            Self::Sse => transport::sse::open(state, req, ctx).await,
            Self::Poll => transport::poll::open(state, req, ctx).await,
        }
    }
}

/// The public listener's routes: the router and the lean subscriber routes.
pub fn routes(state: AppState) -> Routes {
    let cors = Cors::new(&state.config.allowed_origins);
    Routes { router: router(state.clone(), cors.clone()), lean: Some(lean_routes(state, cors)) }
}

/// The lean path's answer: `open`'s session with its head written directly (CORS
/// fields included), or its error as the router would answer it.
// A request that is not theirs goes back to the router by value: boxing it would cost
// every other request an allocation.
#[allow(clippy::result_large_err)]
fn lean_routes(state: AppState, cors: Cors) -> LeanRoute {
    std::sync::Arc::new(move |req: Request, ctx: &ConnCtx| {
        let Some(kind) = Subscriber::for_path(req.uri().path()) else { return Err(req) };
        let (state, cors, ctx) = (state.clone(), cors.clone(), ctx.clone());
        // The request's body (none: the lean path reads body-less GETs) is not `Sync`.
        let (parts, _) = req.into_parts();
        Ok(Box::pin(async move {
            let origin = parts.headers.get(axum::http::header::ORIGIN);
            match kind.open(&state, &parts, &ctx).await {
                Ok(opened) => {
                    let fields = opened.fields().map(|(n, v)| (n, v.as_bytes()));
                    let mut head = crate::server::lean_head(opened.status, fields);
                    for (name, value) in cors.fields(origin) {
                        crate::server::push_header(&mut head, &name, value);
                    }
                    LeanAnswer::Open(head, opened.body)
                }
                Err(err) => {
                    let mut resp = err.into_response();
                    cors.add_to(origin, &mut resp);
                    LeanAnswer::Answer(resp)
                }
            }
        }))
    })
}

/// The router's answer to a subscriber request: the same session as a response with
/// the takeover attached (the CORS middleware adds its fields).
async fn routed(kind: Subscriber, state: AppState, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let ctx = parts
        .extensions
        .get::<ConnCtx>()
        .cloned()
        .unwrap_or_else(|| ConnCtx { peer: ([0, 0, 0, 0], 0).into(), close: Default::default() });
    match kind.open(&state, &parts, &ctx).await {
        Ok(opened) => opened.into_response(),
        Err(err) => err.into_response(),
    }
}

/// Builds the public router.
fn router(state: AppState, cors: Cors) -> Router {
    let mut router = Router::new();
    if state.config.demo_streams {
        router = router.route("/demo/answer", post(demo::answer));
    }
    router
        .route("/", get(assets::demo_page))
        .route("/client.js", get(assets::client_js))
        .route("/client.mjs", get(assets::client_mjs))
        .route("/favicon.ico", get(assets::favicon))
        .route("/api/info", get(assets::info))
        .route("/sse", get(|State(s): State<AppState>, req| routed(Subscriber::Sse, s, req)))
        .route("/ws", get(|State(s): State<AppState>, req| routed(Subscriber::Ws, s, req)))
        .route("/poll", get(|State(s): State<AppState>, req| routed(Subscriber::Poll, s, req)))
        .route("/publish/{channel}", post(api::publish_raw))
        .route("/api/publish", post(api::publish_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(cors, cors::middleware))
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
