//! The admin listener: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (503 while shutting down or while the broker link is down).
//!
//! It runs on a thread of its own, so it answers while the main runtime's workers are
//! saturated; a [`Heartbeat`] from the main runtime still lets `/healthz` see a wedged
//! one.

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{hub::LinkState, state::AppState};

#[derive(Clone)]
struct Admin {
    app: AppState,
    metrics: PrometheusHandle,
    process: Arc<metrics_process::Collector>,
    heartbeat: Arc<Heartbeat>,
}

/// How often the main runtime beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(5);
/// `/healthz` fails when the main runtime has not beaten for this long: its workers are
/// wedged (a deadlock, a blocking call), not just busy.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);

/// When the main runtime last ran a timer task: proof of life for `/healthz`, which is
/// served from another thread.
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds after `start` of the last beat.
    last_ms: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), last_ms: AtomicU64::new(0) })
    }

    /// Records a beat now.
    pub fn beat(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long ago the last beat was, at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }
}

/// Builds the admin router; `heartbeat` is beaten by the main runtime every
/// [`BEAT_EVERY`].
pub fn router(app: AppState, metrics: PrometheusHandle, heartbeat: Arc<Heartbeat>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route(
            "/api/channels/{channel}",
            get(|State(a): State<Admin>, channel| async move {
                crate::api::channels::answer(&a.app, channel).await
            }),
        )
        .with_state(Admin { app, metrics, process: Arc::new(process_collector()), heartbeat })
}

async fn health(State(a): State<Admin>) -> impl IntoResponse {
    liveness(&a.heartbeat, Instant::now())
}

fn liveness(heartbeat: &Heartbeat, now: Instant) -> (StatusCode, Json<serde_json::Value>) {
    let silent = heartbeat.silent_for(now);
    if silent > STALLED_AFTER {
        let body = json!({ "status": "stalled", "runtime_silent_secs": silent.as_secs() });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    (StatusCode::OK, Json(json!({ "status": "ok" })))
}

/// Serves `router` on `listener` from a thread of its own (with a single-threaded
/// runtime, built there) until `stop`.
pub fn spawn(
    listener: std::net::TcpListener,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let (started, result) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
    let thread = std::thread::Builder::new().name("gateway-admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            let _ = started.send(Ok(()));
            let _ = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
    })?;
    // Waits only for the runtime and the listener's registration: microseconds.
    match result.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("the admin thread ended before it started")),
    }
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
    let hub = &a.app.hub;
    let link_up = *hub.link().borrow() == LinkState::Up;
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
            json!({ "status": status, "broker": hub.broker_kind(), "link": if link_up { "up" } else { "down" } }),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn liveness_fails_only_when_the_main_runtime_stops_beating() {
        let hb = Heartbeat::new();
        let now = Instant::now();
        assert_eq!(liveness(&hb, now).0, StatusCode::OK);
        assert_eq!(liveness(&hb, now + STALLED_AFTER - Duration::from_secs(1)).0, StatusCode::OK);
        let (code, body) = liveness(&hb, now + STALLED_AFTER + Duration::from_secs(2));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.0["status"], "stalled");
        // A beat later on makes it healthy again.
        std::thread::sleep(Duration::from_millis(5));
        hb.beat();
        assert!(hb.silent_for(Instant::now()) < Duration::from_secs(1));
    }

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
