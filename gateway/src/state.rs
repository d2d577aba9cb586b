//! What every route handler and client session can reach: the node's shared state.
//! It sits below the transports and the publish API, which all take it, and above the
//! hub, auth and config it bundles.

use std::{net::IpAddr, sync::Arc};

use axum::http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Authenticator, Claims},
    config::Config,
    error::ApiError,
    hub::Hub,
    publish::Publishing,
    ratelimit::SharedBuckets,
};

/// The node's shared state, cloned into every handler.
#[derive(Clone)]
pub struct AppState {
    /// The node's channel registry, and through it the broker.
    pub hub: Arc<Hub>,
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Cancelled when the node shuts down; every connection watches it.
    pub shutdown: CancellationToken,
    /// Verifies subscriber tokens; `None` when subscriber auth is off.
    pub auth: Option<Arc<Authenticator>>,
    /// API keys, the publish rate limit and the one publish path.
    pub publishing: Arc<Publishing>,
    /// New channels each client address may hold for its long-polls.
    pub poll_holds: Arc<SharedBuckets<IpAddr>>,
}

impl AppState {
    /// The state of a node with `config`, around `hub`.
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        auth: Option<Authenticator>,
        shutdown: CancellationToken,
    ) -> Self {
        let limits = &config.limits;
        let poll_holds = SharedBuckets::per(limits.poll_channels_per_ip, config.timers.poll_keepalive);
        Self {
            hub,
            auth: auth.map(Arc::new),
            publishing: Arc::new(Publishing::new(&config)),
            poll_holds: Arc::new(poll_holds),
            config: Arc::new(config),
            shutdown,
        }
    }

    /// Authenticates a subscriber for `channels` when auth is on: `Ok(None)` when off.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        channels: &[String],
    ) -> Result<Option<Claims>, ApiError> {
        let Some(auth) = &self.auth else { return Ok(None) };
        let claims = auth.authenticate(headers, query_token)?;
        crate::auth::check_channels(Some(&claims), channels)?;
        Ok(Some(claims))
    }
}
