//! Redis Sentinel URLs: `redis+sentinel://[user:pass@]host[:port][,host[:port]...]/<master>[?db=N]`.
//! Parsed once here (pure, no I/O): the settings check rejects a bad one at startup, and
//! the broker takes the sentinels' addresses and the master's name from it. The
//! credentials and `db` are for the data nodes (master and replicas); the sentinels are
//! asked without them.

use std::fmt;

use super::mask_url;

/// The scheme that selects Sentinel.
pub const SCHEME: &str = "redis+sentinel://";

/// Port of a sentinel written without one (Sentinel's own default).
pub const DEFAULT_PORT: u16 = 26379;

/// A parsed Sentinel URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, as `host:port` (IPv6 hosts in brackets), in the order given.
    pub sentinels: Vec<String>,
    /// The monitored master's name, as in `sentinel monitor <name> ...`.
    pub master: String,
    /// `user:pass` as written (still percent-encoded), for the data nodes.
    userinfo: Option<String>,
    /// Database number on the data nodes.
    pub db: u32,
}

impl SentinelUrl {
    /// Parses `url`; the error says what is wrong in a few words, without secrets.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |what: &str| format!("{what} in {:?}", mask_url(url));
        let rest = url.strip_prefix(SCHEME).ok_or_else(|| bad("not a redis+sentinel:// URL"))?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no master name (redis+sentinel://host:port[,host:port...]/<master-name>)"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()).filter(|u| !u.is_empty()), h),
            None => (None, authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            sentinels.push(sentinel_addr(host).map_err(|e| bad(&e))?);
        }
        let (master, query) = path.split_once('?').unwrap_or((path, ""));
        if master.is_empty() {
            return Err(bad("no master name after the '/'"));
        }
        if master.contains(['/', ' ', '\t', '%', '#']) {
            return Err(bad(&format!("master name {master:?} has a character Sentinel names do not")));
        }
        let mut db = 0;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("db", n)) => {
                    db = n.parse().map_err(|_| bad(&format!("db must be a number, got {n:?}")))?;
                }
                _ => return Err(bad(&format!("unknown parameter {pair:?} (only db=N is known)"))),
            }
        }
        Ok(Self { sentinels, master: master.to_owned(), userinfo, db })
    }

    /// A `redis://` URL for the data node at `host:port`, with this URL's credentials
    /// and database.
    pub fn node_url(&self, host: &str, port: u16) -> String {
        let auth = self.userinfo.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("redis://{auth}{}/{}", host_port(host, port), self.db)
    }

    /// `redis://host:port` for each sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| format!("redis://{s}")).collect()
    }
}

impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("credentials", &self.userinfo.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// One `host[:port]` of the sentinel list, checked, with the port filled in.
fn sentinel_addr(text: &str) -> Result<String, String> {
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 address without its ']'")?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "/@?#[]".contains(c)) {
        return Err(format!("bad sentinel host {text:?}"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("bad sentinel port {p:?}")),
        },
    };
    Ok(host_port(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinels_master_credentials_and_db() {
        let u =
            SentinelUrl::parse("redis+sentinel://app:s%40cret@10.0.0.1:26380,[::1]:1,sent-3/mymaster?db=2")
                .unwrap();
        assert_eq!(u.sentinels, ["10.0.0.1:26380", "[::1]:1", "sent-3:26379"]);
        assert_eq!(u.master, "mymaster");
        assert_eq!(u.db, 2);
        assert_eq!(u.node_url("10.0.0.9", 6379), "redis://app:s%40cret@10.0.0.9:6379/2");
        assert_eq!(u.node_url("::1", 6379), "redis://app:s%40cret@[::1]:6379/2");
        assert_eq!(u.sentinel_urls()[1], "redis://[::1]:1");
        assert!(!format!("{u:?}").contains("cret"), "{u:?}");
        let plain = SentinelUrl::parse("redis+sentinel://127.0.0.1:26379/m").unwrap();
        assert_eq!(plain.node_url("127.0.0.1", 7000), "redis://127.0.0.1:7000/0");
    }

    #[test]
    fn rejects_what_cannot_work_and_never_shows_the_password() {
        for (url, says) in [
            ("redis+sentinel://h:1", "no master name"),
            ("redis+sentinel://h:1/", "no master name"),
            ("redis+sentinel:///m", "bad sentinel host"),
            ("redis+sentinel://h:1,/m", "bad sentinel host"),
            ("redis+sentinel://h:0/m", "bad sentinel port"),
            ("redis+sentinel://h:x/m", "bad sentinel port"),
            ("redis+sentinel://h:70000/m", "bad sentinel port"),
            ("redis+sentinel://[::1/m", "IPv6"),
            ("redis+sentinel://h:1/a/b", "master name"),
            ("redis+sentinel://h:1/m?db=x", "db must be a number"),
            ("redis+sentinel://h:1/m?protocol=3", "unknown parameter"),
            ("redis+sentinel://u:hunter2@h:x/m", "bad sentinel port"),
        ] {
            let err = SentinelUrl::parse(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }
}
