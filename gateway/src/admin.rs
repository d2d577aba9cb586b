//! The admin listener: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (503 while shutting down or while the broker link is down).

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::{app::AppState, broker::LinkState};

#[derive(Clone)]
struct Admin {
    app: AppState,
    metrics: PrometheusHandle,
    process: std::sync::Arc<metrics_process::Collector>,
}

/// Builds the admin router.
pub fn router(app: AppState, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(ready))
        .with_state(Admin { app, metrics, process: std::sync::Arc::new(process_collector()) })
}

/// Serves `router` on `listener` from a thread of its own (with a single-threaded
/// runtime) until `stop`.
pub fn spawn(
    listener: std::net::TcpListener,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("gateway-admin".into()).spawn(move || {
        rt.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    let _ = axum::serve(l, router).with_graceful_shutdown(stop.cancelled_owned()).await;
                }
                Err(e) => tracing::error!(error = %e, "admin listener failed"),
            }
        });
    })
}

/// Process CPU, memory, open file descriptors and threads, as `gateway_process_*`.
fn process_collector() -> metrics_process::Collector {
    let c = metrics_process::Collector::new("gateway_");
    c.describe();
    c
}

async fn render_metrics(State(a): State<Admin>) -> impl IntoResponse {
    a.process.collect();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], a.metrics.render())
}

async fn ready(State(a): State<Admin>) -> impl IntoResponse {
    let broker = a.app.hub.broker();
    let link_up = *broker.link().borrow() == LinkState::Up;
    let draining = a.app.shutdown.is_cancelled();
    let status = if draining {
        "draining"
    } else if !link_up {
        "broker_down"
    } else {
        "ready"
    };
    let code = if status == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(
            json!({ "status": status, "broker": broker.kind(), "link": if link_up { "up" } else { "down" } }),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// The admin listener needs no worker of the main runtime: here there is none at all
    /// (a plain test thread), and it still answers.
    #[test]
    fn the_admin_listener_answers_without_the_main_runtime() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/healthz", get(|| async { "alive" }));
        let stop = tokio_util::sync::CancellationToken::new();
        let thread = spawn(listener, router, stop.clone()).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("alive"), "{answer}");
        stop.cancel();
        thread.join().unwrap();
    }
}
