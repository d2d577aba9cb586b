//! `redis+cluster://[user:pass@]host:port[,host:port...]`: the seed nodes of a Redis
//! Cluster, checked once here for the settings table, `gateway publish` and the broker.

/// The URL scheme that selects the Redis Cluster broker.
pub const SCHEME: &str = "redis+cluster://";

/// Whether `url` names a Redis Cluster.
pub fn is_cluster(url: &str) -> bool {
    url.starts_with(SCHEME)
}

/// The seed nodes of a `redis+cluster://` URL as plain `redis://[user:pass@]host:port`
/// URLs, one per node (the credentials apply to every node), or why the URL is wrong.
pub fn seeds(url: &str) -> Result<Vec<String>, String> {
    let rest = url.strip_prefix(SCHEME).ok_or_else(|| format!("must start with {SCHEME}"))?;
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '?', '#']) {
        return Err(
            "takes no database, path or options: redis+cluster://[user:pass@]host:port[,host:port...]".into(),
        );
    }
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, rest),
    };
    let mut out = Vec::new();
    for node in hosts.split(',') {
        let node = node.trim();
        let Some((host, port)) = node.rsplit_once(':') else {
            return Err(format!("each seed node is host:port, got {node:?}"));
        };
        if host.is_empty() || host.contains(['@', ' ']) || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("each seed node is host:port, got {node:?}"));
        }
        out.push(match auth {
            Some(auth) => format!("redis://{auth}@{host}:{port}"),
            None => format!("redis://{host}:{port}"),
        });
    }
    Ok(out)
}

/// The credentials part (`user:pass@`, or empty) of a seed URL from [`seeds`], to reach
/// the other nodes of the cluster the same way.
pub fn credentials(seed: &str) -> &str {
    let rest = seed.strip_prefix("redis://").unwrap_or(seed);
    match rest.rfind('@') {
        Some(at) => &rest[..=at],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_keep_credentials_for_every_node() {
        assert_eq!(seeds("redis+cluster://127.0.0.1:7000").unwrap(), ["redis://127.0.0.1:7000"]);
        assert_eq!(seeds("redis+cluster://u:p@a:1,b:2/").unwrap(), ["redis://u:p@a:1", "redis://u:p@b:2"]);
        assert_eq!(credentials("redis://u:p@a:1"), "u:p@");
        assert_eq!(credentials("redis://a:1"), "");
    }

    #[test]
    fn bad_urls_say_why() {
        for bad in [
            "redis://a:1",
            "redis+cluster://",
            "redis+cluster://a",
            "redis+cluster://a:x",
            "redis+cluster://a:0",
            "redis+cluster://a:1,,b:2",
            "redis+cluster://a:1/0",
            "redis+cluster://a:1?protocol=3",
        ] {
            assert!(seeds(bad).is_err(), "{bad}");
        }
    }
}
