//! One Redis master as the node knows it: what the Sentinel watcher
//! ([`super::sentinel`]) adopts and [`super::master::Master`] hands to every user.

use std::sync::Arc;

/// One master the node has adopted.
pub(crate) struct MasterNode {
    /// Increases each time the node adopts a master (a fixed URL's is always 0).
    pub generation: u64,
    /// Connects to it.
    pub client: redis::Client,
    /// Its URL, credentials included (never logged).
    pub url: String,
    /// `host:port`, for logs.
    pub addr: Arc<str>,
}
