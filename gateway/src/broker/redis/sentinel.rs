//! Redis Sentinel: one task per node keeps [`super::master::Master`] pointing at the
//! current master. It asks every sentinel `SENTINEL MASTER <name>` and adopts the
//! healthy master named with the highest config epoch (the failover's outcome, even
//! while a lagging sentinel still names the old one), confirmed by `ROLE` on the node
//! itself. It looks again at once when a sentinel announces `+switch-master` (a
//! subscription kept on one sentinel, moved to the next when that one goes away), when a
//! user of the master reports trouble, and every [`CHECK_EVERY`] regardless — which also
//! catches a master that was demoted (`ROLE` says replica) while connections to it stay
//! open: the node then has no master until the sentinels name one.
//!
//! redis-rs's `SentinelClient` is not used: it returns the first sentinel's answer that
//! `ROLE` confirms, without comparing config epochs, so during a manual failover (the
//! old master keeps answering `ROLE master` for seconds) a lagging sentinel can point it
//! back at the old master; and it never watches for `+switch-master`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::node::MasterNode;
use crate::{broker::BrokerError, config::sentinel_url::SentinelUrl};

/// How often the sentinels and the master's `ROLE` are checked without any event.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one sentinel's or one node's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Shortest pause between two checks that reports asked for (reports come in bursts).
const MIN_GAP: Duration = Duration::from_millis(50);
/// Pause before the `+switch-master` subscription moves to the next sentinel; doubled
/// (up to [`RESUBSCRIBE_MAX`]) while none will take it.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(200);
/// Longest pause between two subscription attempts.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
/// How often the `+switch-master` subscription is probed with PING.
const LISTEN_PING_EVERY: Duration = Duration::from_secs(5);

/// The watcher task: built when the broker is set up, run once it starts.
pub struct Watcher {
    url: SentinelUrl,
    sentinels: Vec<Sentinel>,
    tx: watch::Sender<Option<Arc<MasterNode>>>,
    wake: Arc<Notify>,
    generation: u64,
    /// A connection to the node last checked with `ROLE`, kept for the next check.
    probe: Option<(String, redis::aio::MultiplexedConnection)>,
    /// Whether the last check failed (so a failure is logged once, not every second).
    failing: bool,
}

/// One sentinel and the connection commands go over.
struct Sentinel {
    addr: String,
    client: redis::Client,
    conn: Option<redis::aio::MultiplexedConnection>,
}

/// A healthy master as one sentinel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    host: String,
    port: u16,
    epoch: u64,
}

impl Watcher {
    pub(super) fn new(
        url: SentinelUrl,
        tx: watch::Sender<Option<Arc<MasterNode>>>,
        wake: Arc<Notify>,
    ) -> Result<Self, BrokerError> {
        let sentinels = url
            .sentinels
            .iter()
            .zip(url.sentinel_urls())
            .map(|(addr, u)| Ok(Sentinel { addr: addr.clone(), client: redis::Client::open(u)?, conn: None }))
            .collect::<Result<Vec<_>, redis::RedisError>>()?;
        Ok(Self { url, sentinels, tx, wake, generation: 0, probe: None, failing: false })
    }

    /// Keeps the master current until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(sentinels = ?self.url.sentinels, master = %self.url.master, "finding the redis master through Sentinel");
        let (events_tx, mut events) = mpsc::channel(16);
        tokio::spawn(listen(self.url.clone(), events_tx, shutdown.clone()));
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.check().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {
                    tokio::time::sleep(MIN_GAP).await;
                }
                event = events.recv() => match event {
                    Some(why) => debug!(%why, "sentinel event; checking the master"),
                    None => return,
                },
            }
        }
    }

    /// One look: adopts the master the sentinels name if it confirms it is one, or
    /// drops the current one when it says it no longer is.
    async fn check(&mut self) {
        let current = self.tx.borrow().clone();
        let named = self.ask_sentinels().await;
        let fail = |this: &mut Self, why: String| {
            if !this.failing {
                warn!(master = %this.url.master, %why, "cannot confirm the redis master through Sentinel; retrying");
            }
            this.failing = true;
        };
        match named {
            Ok(named) => {
                let addr = crate::config::sentinel_url::host_port(&named.host, named.port);
                if current.as_ref().is_some_and(|c| *c.addr == addr) {
                    match self.role(&addr).await {
                        Some(true) => self.failing = false,
                        Some(false) => self.drop_master(&addr, "it is no longer a master"),
                        None => {} // unreachable: its users see that and the sentinels will act
                    }
                    return;
                }
                match self.role(&addr).await {
                    Some(true) => self.adopt(named, addr, current.as_deref()),
                    other => {
                        fail(self, format!("the sentinels name {addr}, which does not answer as a master"));
                        if other == Some(false) {
                            return;
                        }
                        // The named one is unreachable: keep the current one only while
                        // it still says it is a master.
                        if let Some(c) = current
                            && self.role(&c.addr).await == Some(false)
                        {
                            self.drop_master(&c.addr, "it is no longer a master");
                        }
                    }
                }
            }
            Err(why) => {
                fail(self, why);
                if let Some(c) = current
                    && self.role(&c.addr).await == Some(false)
                {
                    self.drop_master(&c.addr, "it is no longer a master");
                }
            }
        }
    }

    fn adopt(&mut self, named: Named, addr: String, previous: Option<&MasterNode>) {
        let url = self.url.node_url(&named.host, named.port);
        let client = match redis::Client::open(url.as_str()) {
            Ok(c) => c,
            Err(e) => return warn!(error = %e, %addr, "cannot use the master the sentinels name"),
        };
        self.generation += 1;
        self.failing = false;
        info!(
            master = %addr,
            previous = previous.map(|p| &*p.addr).unwrap_or("none"),
            config_epoch = named.epoch,
            generation = self.generation,
            "redis master found through Sentinel"
        );
        let node = MasterNode { generation: self.generation, client, url, addr: addr.into() };
        self.tx.send_replace(Some(Arc::new(node)));
    }

    fn drop_master(&mut self, addr: &str, why: &str) {
        warn!(master = %addr, why, "dropping the redis master; waiting for the sentinels to name one");
        self.generation += 1;
        self.tx.send_replace(None);
    }

    /// Asks every sentinel at once; the healthy master with the highest config epoch.
    async fn ask_sentinels(&mut self) -> Result<Named, String> {
        let name = self.url.master.clone();
        let answers = futures_util::future::join_all(self.sentinels.iter_mut().map(|s| s.ask(&name))).await;
        let mut best: Option<Named> = None;
        let mut errors = Vec::new();
        for answer in answers {
            match answer {
                Ok(Some(n)) if best.as_ref().is_none_or(|b| n.epoch > b.epoch) => best = Some(n),
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        best.ok_or_else(|| {
            if errors.is_empty() {
                format!("no sentinel names a healthy master {:?}", self.url.master)
            } else {
                format!("no sentinel names a healthy master {:?} ({})", self.url.master, errors.join("; "))
            }
        })
    }

    /// Whether the node at `addr` says it is a master (`None`: no answer).
    async fn role(&mut self, addr: &str) -> Option<bool> {
        let url = match addr.rsplit_once(':') {
            Some((host, port)) => {
                self.url.node_url(host.trim_start_matches('[').trim_end_matches(']'), port.parse().ok()?)
            }
            None => return None,
        };
        let probe = &mut self.probe;
        let answer = tokio::time::timeout(ASK_TIMEOUT, async {
            if probe.as_ref().is_none_or(|(a, _)| a != addr) {
                *probe = None;
                let client = redis::Client::open(url.as_str())?;
                *probe = Some((
                    addr.to_owned(),
                    client.get_multiplexed_async_connection_with_config(&config()).await?,
                ));
            }
            let conn = &mut probe.as_mut().expect("just set").1;
            redis::cmd("ROLE").query_async::<redis::Role>(conn).await
        })
        .await;
        match answer {
            Ok(Ok(role)) => Some(matches!(role, redis::Role::Primary { .. })),
            Ok(Err(e)) => {
                debug!(error = %e, %addr, "ROLE failed");
                self.probe = None;
                None
            }
            Err(_) => {
                self.probe = None;
                None
            }
        }
    }
}

impl Sentinel {
    /// `SENTINEL MASTER <name>`: the master if this sentinel sees it healthy.
    async fn ask(&mut self, name: &str) -> Result<Option<Named>, String> {
        let conn = &mut self.conn;
        let client = &self.client;
        let answer = tokio::time::timeout(ASK_TIMEOUT, async {
            if conn.is_none() {
                *conn = Some(client.get_multiplexed_async_connection_with_config(&config()).await?);
            }
            let c = conn.as_mut().expect("just set");
            redis::cmd("SENTINEL").arg("MASTER").arg(name).query_async::<HashMap<String, String>>(c).await
        })
        .await;
        match answer {
            Ok(Ok(info)) => Ok(healthy_master(&info)),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.conn = None;
                }
                Err(format!("sentinel {}: {e}", self.addr))
            }
            Err(_) => {
                self.conn = None;
                Err(format!("sentinel {}: no answer within {ASK_TIMEOUT:?}", self.addr))
            }
        }
    }
}

/// The master of a `SENTINEL MASTER` reply, unless the sentinel sees it down. A
/// `disconnected` flag does not count: right after a switch the sentinel has not yet
/// connected to the master it just promoted, and `ROLE` asks the node itself anyway.
fn healthy_master(info: &HashMap<String, String>) -> Option<Named> {
    let flags = info.get("flags")?;
    let healthy = flags.split(',').any(|f| f == "master")
        && !flags.split(',').any(|f| matches!(f, "s_down" | "o_down"));
    if !healthy {
        return None;
    }
    Some(Named {
        host: info.get("ip")?.clone(),
        port: info.get("port")?.parse().ok()?,
        epoch: info.get("config-epoch").and_then(|e| e.parse().ok()).unwrap_or(0),
    })
}

/// Connection settings for sentinels and probes: short timeouts, so one dead node
/// cannot stall a check.
fn config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(ASK_TIMEOUT))
}

/// Keeps a `+switch-master` subscription on one sentinel at a time (the next one in
/// the list when it goes away) and tells the watcher about each switch of our master —
/// and about every new subscription, since events may have been missed meanwhile.
async fn listen(url: SentinelUrl, events: mpsc::Sender<String>, shutdown: CancellationToken) {
    let urls = url.sentinel_urls();
    let mut pause = RESUBSCRIBE_AFTER;
    for i in (0..urls.len()).cycle() {
        let (lost, subscribed) = tokio::select! {
            _ = shutdown.cancelled() => return,
            lost = listen_once(&urls[i], &url.master, &events) => lost,
        };
        debug!(sentinel = %url.sentinels[i], why = %lost, "+switch-master subscription moves to the next sentinel");
        pause = if subscribed { RESUBSCRIBE_AFTER } else { (pause * 2).min(RESUBSCRIBE_MAX) };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if events.is_closed() {
            return;
        }
    }
}

/// One subscription, until it fails; returns why, and whether it had subscribed.
async fn listen_once(sentinel: &str, master: &str, events: &mpsc::Sender<String>) -> (String, bool) {
    let subscribe = async {
        let mut pubsub = redis::Client::open(sentinel)?.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = match tokio::time::timeout(ASK_TIMEOUT, subscribe).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return (e.to_string(), false),
        Err(_) => return ("no answer".into(), false),
    };
    let _ = events.try_send(format!("subscribed to +switch-master on {sentinel}"));
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(LISTEN_PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return ("connection closed".into(), true) };
                // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                let text = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                if text.split(' ').next() == Some(master) {
                    info!(event = %text, "+switch-master");
                    let _ = events.try_send(text);
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(ASK_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return (e.to_string(), true),
                    Err(_) => return ("PING unanswered".into(), true),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_master_seen_down_is_not_named() {
        let up = info(&[("flags", "master"), ("ip", "10.0.0.2"), ("port", "6380"), ("config-epoch", "7")]);
        assert_eq!(healthy_master(&up), Some(Named { host: "10.0.0.2".into(), port: 6380, epoch: 7 }));
        let fresh =
            info(&[("flags", "master,disconnected"), ("ip", "h"), ("port", "1"), ("config-epoch", "8")]);
        assert_eq!(healthy_master(&fresh).map(|n| n.epoch), Some(8), "just promoted, not yet connected");
        for flags in ["master,s_down", "master,s_down,o_down", "slave"] {
            let down = info(&[("flags", flags), ("ip", "10.0.0.2"), ("port", "6380")]);
            assert_eq!(healthy_master(&down), None, "{flags}");
        }
    }
}
