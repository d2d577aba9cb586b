//! What the subscriber does when something it started finishes (a link opened, a
//! batch or probe answered, the slot map read) and on its timer: probes, wedged links,
//! and the periodic or requested reads of the slot map.

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tracing::{debug, warn};

use super::{
    COMMAND_TIMEOUT, Event, HEALTH_EVERY, HEALTH_TIMEOUT, LinkId, REFRESH_EVERY, REFRESH_GAP, RETRY_AFTER,
    State, SubReply, Subscriber, link,
    slots::{self, SlotMap},
};

impl Subscriber {
    pub(super) fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Map(read, Ok((mut map, answered))) => {
                self.refreshing = false;
                // A slot its master dropped stays unplaced until a read begun after the
                // drop places it elsewhere, or the master itself says it has it again.
                self.unsure.retain(|&slot, (from, dropped_by)| {
                    let unsure = read < *from
                        || (map.owner(slot) == Some(dropped_by.as_str()) && !is_node(&answered, dropped_by));
                    if unsure {
                        map.forget(slot);
                    }
                    unsure
                });
                if !self.unsure.is_empty() {
                    self.refresh_asked = true;
                }
                let masters: Vec<String> = map.masters().into_iter().map(str::to_owned).collect();
                let stale: Vec<LinkId> = self
                    .links
                    .iter()
                    .filter(|(_, l)| !masters.contains(&l.addr))
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    self.drop_link(id, "no longer a master");
                }
                if self.map.as_ref() != Some(&map) {
                    debug!(masters = masters.len(), "cluster slot map read");
                }
                self.map = Some(map);
            }
            Event::Map(_, Err(e)) => {
                self.refreshing = false;
                self.refresh_asked = true;
                warn!(error = %e, "cannot read the cluster slot map");
            }
            Event::Connected(id, result) => {
                let Some(link) = self.links.get_mut(&id) else { return };
                link.busy_since = None;
                match result {
                    Ok(conn) => {
                        link.conn = Some(conn);
                        link.last_heard = now;
                        link.last_probe = now;
                        self.backoff.remove(&link.addr);
                        debug!(addr = %link.addr, "cluster master link up");
                    }
                    Err(e) => self.drop_link(id, &e.to_string()),
                }
            }
            Event::Probe(id, result) => {
                let Some(link) = self.links.get_mut(&id) else { return };
                link.busy_since = None;
                match result {
                    Ok(()) => link.last_heard = now,
                    Err(e) => self.drop_link(id, &e),
                }
            }
            Event::Batch(id, batch, result) => {
                let Some(link) = self.links.get_mut(&id) else { return };
                link.busy_since = None;
                let replies = match result {
                    Ok(r) => r,
                    Err(e) => return self.drop_link(id, &e),
                };
                link.last_heard = now;
                for (ch, reply) in batch.subs.iter().zip(replies) {
                    let refused = match reply {
                        SubReply::Ok => continue,
                        SubReply::Moved(slot, addr) => {
                            if let Some(map) = &mut self.map {
                                map.moved(slot, &addr);
                            }
                            None
                        }
                        SubReply::Refused(e) => Some(e),
                    };
                    self.refresh_asked = true;
                    if let Some(want) = self.wants.get_mut(ch)
                        && want.state == State::Pending(id)
                    {
                        want.state = State::Idle;
                        if let Some(e) = refused {
                            debug!(channel = %crate::error::quote(ch), error = %e, "SSUBSCRIBE refused; retrying");
                            want.not_before = Some(now + RETRY_AFTER);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        let mut wedged = Vec::new();
        for (&id, link) in &mut self.links {
            let Some(conn) = &link.conn else { continue };
            match link.busy_since {
                Some(since)
                    if now.duration_since(since) > HEALTH_TIMEOUT
                        && now.duration_since(link.last_heard) > HEALTH_TIMEOUT =>
                {
                    wedged.push(id);
                }
                Some(_) => {}
                None if now.duration_since(link.last_probe) >= HEALTH_EVERY => {
                    link.busy_since = Some(now);
                    link.last_probe = now;
                    let conn = conn.clone();
                    self.ops
                        .push(link::probe(conn, COMMAND_TIMEOUT).map(move |r| Event::Probe(id, r)).boxed());
                }
                None => {}
            }
        }
        for id in wedged {
            self.drop_link(id, "health probe timed out: link wedged");
        }
        let due = match self.last_refresh {
            None => true,
            Some(at) => {
                let since = now.duration_since(at);
                (self.refresh_asked && since >= REFRESH_GAP) || since >= REFRESH_EVERY
            }
        };
        if due && !self.refreshing {
            self.start_refresh();
        }
    }

    /// Reads the slot map from the first node that answers: masters that dropped slots
    /// lately, the other known masters, then the seeds.
    fn start_refresh(&mut self) {
        self.refreshing = true;
        self.refresh_asked = false;
        self.last_refresh = Some(Instant::now());
        self.refreshes += 1;
        let read = self.refreshes;
        let mut addrs: Vec<&String> = Vec::new();
        for a in self.unsure.values().map(|(_, a)| a).chain(self.by_addr.keys()) {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        let mut urls: Vec<String> =
            addrs.iter().map(|a| format!("redis://{}{a}", self.credentials)).collect();
        urls.extend(self.seeds.iter().filter(|s| !urls.contains(s)).cloned().collect::<Vec<_>>());
        self.ops.push(
            async move {
                let mut last = String::from("no seed nodes");
                for url in urls {
                    match read_map(&url).await {
                        Ok(map) => return Event::Map(read, Ok((map, url))),
                        Err(e) => last = format!("{}: {e}", crate::config::mask_url(&url)),
                    }
                }
                Event::Map(read, Err(last))
            }
            .boxed(),
        );
    }
}

/// Whether `url` (`redis://[user:pass@]host:port`) names the node at `addr` (`host:port`).
fn is_node(url: &str, addr: &str) -> bool {
    url.strip_suffix(addr).is_some_and(|head| head.ends_with('/') || head.ends_with('@'))
}

/// Reads the slot map from one node.
async fn read_map(url: &str) -> Result<SlotMap, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let mut conn =
        client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
    let map = slots::fetch(&mut conn).await.map_err(|e| e.to_string())?;
    if map.masters().is_empty() {
        return Err("the node knows no masters yet".into());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::is_node;

    #[test]
    fn a_url_names_its_node_only() {
        assert!(is_node("redis://127.0.0.1:7000", "127.0.0.1:7000"));
        assert!(is_node("redis://user:pw@10.0.0.1:6379", "10.0.0.1:6379"));
        assert!(!is_node("redis://127.0.0.1:17000", "127.0.0.1:7000"));
        assert!(!is_node("redis://xredis:7000", "redis:7000"));
    }
}
