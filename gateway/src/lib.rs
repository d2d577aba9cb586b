//! A horizontally scaled pub/sub fan-out gateway: SSE, WebSocket and long-poll clients
//! on stateless nodes, joined through Redis.
//!
//! # Layout (top to bottom; an import only points down — `ARCHITECTURE.md` is the map)
//! - [`run`] (here) and [`publish_cli`]: what the binary runs.
//! - [`app`]: the public routes (router, lean subscriber routes, CORS); [`admin`]:
//!   metrics, health, readiness.
//! - [`transport`] ([`transport::sse`], [`transport::ws`], [`transport::poll`]) and
//!   [`api`] over [`publish`], the one publish path; both take [`state::AppState`].
//! - [`hub`]: the node-local, sharded channel registry, fan-out, inboxes, deliveries and
//!   history replay; the only way up here reaches the broker.
//! - [`broker`]: the broker trait, [`broker::memory`], [`broker::redis`] and
//!   [`broker::cluster`].
//! - Below everything: [`server`] (the listener and HTTP/1 plumbing), [`auth`],
//!   [`config`], [`wire`] (pure encoders), [`error`], [`metrics`], [`ratelimit`].
//!
//! `main.rs` only parses config, sets up logging and metrics, binds and calls [`run`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod config;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod publish;
pub mod publish_cli;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod transport;
pub mod wire;

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    auth::Authenticator,
    broker::{
        Broker,
        cluster::{ClusterBroker, ReplicaAcks},
        redis::RedisBroker,
    },
    config::{Config, ConfigError},
    hub::{Hub, HubConfig},
    state::AppState,
};

/// Longest a history publish waits for its replica acks (`--redis-replica-acks`).
const REPLICA_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The two bound listeners of a node.
#[derive(Debug)]
pub struct Listeners {
    /// Public: clients and publishers.
    pub public: TcpListener,
    /// Admin: metrics and health.
    pub admin: TcpListener,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker could not be set up (e.g. a malformed Redis URL).
    #[error("broker: {0}")]
    Broker(#[from] broker::BrokerError),
    /// A listener's address could not be read.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// A node's configuration checked all the way, key files read: what `gateway config`
/// prints and what [`run`] runs.
pub struct Node {
    config: Config,
    auth: Option<Authenticator>,
}

impl Node {
    /// Checks `config` and reads the key files it names.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let auth = Authenticator::new(&config.auth)?;
        Ok(Self { config, auth })
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// Runs a node until `shutdown` is cancelled, then closes every client cleanly (WS
/// close 1012, SSE `retry:` and end, long-polls answered) and waits for them within
/// the configured grace period.
pub async fn run(
    node: Node,
    listeners: Listeners,
    shutdown: CancellationToken,
    metrics: PrometheusHandle,
) -> Result<(), StartError> {
    let Node { config, auth } = node;
    // Connections join `tracker`; the broker, reaper and metrics upkeep join
    // `background` and keep running until every connection has drained, so clients
    // waiting for their turn to reconnect still receive messages.
    let tracker = TaskTracker::new();
    let background = TaskTracker::new();
    let background_stop = CancellationToken::new();
    let hub_config = HubConfig::new(&config);
    let hub = match &config.redis_url {
        None => Hub::in_memory(hub_config, config.history.clone()),
        Some(url) if config::cluster_url::is_cluster(url.expose()) => {
            let acks = ReplicaAcks { replicas: config.redis_replica_acks, timeout: REPLICA_ACK_TIMEOUT };
            let cluster = ClusterBroker::prepare(url.expose(), config.history.clone(), acks)?;
            Hub::new(hub_config, |sink| -> Arc<dyn Broker> {
                Arc::new(cluster.start(sink, background_stop.clone(), &background))
            })
        }
        Some(url) => {
            let redis = RedisBroker::prepare(
                url.expose(),
                config.redis_pool_size,
                config.redis_replica_acks,
                config.history.clone(),
            )?;
            Hub::new(hub_config, |sink| -> Arc<dyn Broker> {
                Arc::new(redis.start(sink, background_stop.clone(), &background))
            })
        }
    };
    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    if hub.broker_kind() == "memory" {
        warn!(
            "no Redis configured (--redis-url / GATEWAY_REDIS_URL): running a single node on the in-process broker"
        );
    }
    let max_connections = config.limits.max_connections as u64;
    match server::fdlimit::raise_nofile() {
        Ok(limit) if max_connections > 0 && max_connections + 64 > limit => warn!(
            open_files = limit,
            max_connections,
            "--max-connections is above the open-file limit: raise the hard limit (ulimit -Hn)"
        ),
        Ok(limit) => info!(open_files = limit, "open-file limit"),
        Err(err) => warn!(%err, "cannot read the open-file limit"),
    }
    info!(public = %public_addr, admin = %admin_addr, broker = hub.broker_kind(), "gateway listening");

    if let Some(a) = &auth {
        info!(?a, "subscriber authentication on");
    }
    let state = AppState::new(config, hub.clone(), auth, shutdown.clone());
    background.spawn(hub.clone().run_reaper(background_stop.clone()));
    if hub.broker_kind() != "memory" {
        background.spawn(hub.clone().run_occupancy_reports(background_stop.clone()));
    }
    let upkeep = metrics.clone();
    let upkeep_stop = background_stop.clone();
    let heartbeat = admin::Heartbeat::new();
    let beat = heartbeat.clone();
    background.spawn(async move {
        let mut tick = tokio::time::interval(admin::BEAT_EVERY);
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tick.tick() => {
                    upkeep.run_upkeep();
                    beat.beat();
                }
            }
        }
    });

    // The admin listener outlives the drain, so /readyz reports it. It runs on a thread
    // of its own: when every worker is busy fanning out (or closing thousands of slow
    // consumers), probes and scrapes still answer at once.
    let admin_stop = CancellationToken::new();
    let admin_router = admin::router(state.clone(), metrics, heartbeat);
    let admin = admin::spawn(listeners.admin.into_std()?, admin_router, admin_stop.clone())?;
    // Stops the admin thread however `run` ends (also when its future is dropped).
    let admin_guard = admin_stop.clone().drop_guard();

    let header_timeout = state.config.timers.header_read;
    server::serve(
        listeners.public,
        app::routes(state.clone()),
        shutdown.clone(),
        tracker.clone(),
        header_timeout,
        state.config.timers.drain_window,
        // A stream's writes are at most a heartbeat apart: one that takes nothing for a
        // heartbeat interval has a client that stopped reading.
        state.config.timers.sse_heartbeat,
        state.config.limits.connect_rate_per_ip,
    )
    .await;
    let drain = state.config.timers.drain_window;
    info!(
        drain_window_ms = drain.as_millis() as u64,
        "shutting down: telling clients to reconnect, spread over the drain window"
    );
    tracker.close();
    let grace = state.config.timers.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(grace_secs = grace.as_secs(), "some connections did not close within the grace period");
    }
    background_stop.cancel();
    background.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), background.wait()).await;
    drop(admin_guard); // cancels `admin_stop`
    // A scraper that keeps its connection open cannot hold the exit for long.
    let joined = tokio::task::spawn_blocking(move || admin.join());
    if tokio::time::timeout(std::time::Duration::from_secs(2), joined).await.is_err() {
        warn!("the admin listener did not stop within 2 s; exiting anyway");
    }
    info!("shutdown complete");
    Ok(())
}
