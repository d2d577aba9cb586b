//! The loopback rule: every address the load generator connects to must be a loopback
//! address (127.0.0.0/8 or `::1`): the gateway URL, the Redis URL and the source addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail, ensure};

/// Whether an address is on this machine's loopback interface.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

fn host_ip(host: &str) -> Result<IpAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if bare.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        bare.parse::<IpAddr>().with_context(|| {
            format!("host {host:?} is not an IP address; use a loopback address such as 127.0.0.1")
        })?
    };
    ensure!(is_loopback(ip), "refusing non-loopback address {ip}: load is only sent to 127.0.0.0/8 or ::1");
    Ok(ip)
}

/// Parses the gateway URL: its socket address, `Host` header and path prefix.
pub fn parse_gateway_url(s: &str) -> Result<(SocketAddr, String, String)> {
    let url = reqwest::Url::parse(s).with_context(|| format!("invalid --url {s:?}"))?;
    ensure!(url.scheme() == "http", "--url must be http:// (no TLS), got {s:?}");
    let host = url.host_str().context("--url has no host")?;
    let ip = host_ip(host)?;
    let port = url.port_or_known_default().unwrap_or(80);
    let dest = SocketAddr::new(ip, port);
    let host_header = match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    };
    let base_path = url.path().trim_end_matches('/').to_owned();
    Ok((dest, host_header, base_path))
}

/// Checks that a Redis URL points at this machine.
pub fn check_redis_url(s: &str) -> Result<()> {
    let url = reqwest::Url::parse(s).with_context(|| format!("invalid --redis-url {s:?}"))?;
    match url.scheme() {
        "redis" => {
            let host = url.host_str().context("--redis-url has no host")?;
            host_ip(host)?;
            Ok(())
        }
        "unix" | "redis+unix" => Ok(()),
        other => bail!("--redis-url scheme {other:?} is not supported; use redis://127.0.0.1:PORT"),
    }
}

/// Parses `a-b` (inclusive range), `a,b,c`, or one address; all must be in 127.0.0.0/8.
pub fn parse_source_ips(s: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: Ipv4Addr = lo.parse().with_context(|| format!("bad source address {lo:?}"))?;
        let hi: Ipv4Addr = hi.parse().with_context(|| format!("bad source address {hi:?}"))?;
        for ip in [lo, hi] {
            ensure!(ip.octets()[0] == 127, "refusing source address {ip}: only 127.0.0.0/8 is allowed");
        }
        let (lo, hi) = (u32::from(lo), u32::from(hi));
        ensure!(lo <= hi, "source range {part:?} is backwards");
        ensure!(hi - lo < 65_536 && out.len() < 65_536, "at most 65,536 source addresses");
        out.extend((lo..=hi).map(Ipv4Addr::from));
    }
    ensure!(!out.is_empty(), "--source-ips is empty");
    Ok(out)
}

/// The addresses of an optional `--source-ips` flag (none when it is not given).
pub fn source_ips(flag: Option<&str>) -> Result<Vec<Ipv4Addr>> {
    flag.map(parse_source_ips).transpose().map(Option::unwrap_or_default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_loopback() {
        let (d, h, p) = parse_gateway_url("http://127.0.0.1:8080").unwrap();
        assert_eq!((d.to_string(), h, p), ("127.0.0.1:8080".into(), "127.0.0.1:8080".into(), String::new()));
        assert_eq!(parse_gateway_url("http://localhost:81/gw/").unwrap().2, "/gw");
        assert!(parse_gateway_url("http://[::1]:8080").is_ok());
        assert!(parse_gateway_url("http://10.0.0.1:8080").is_err());
        assert!(parse_gateway_url("http://example.com").is_err());
        assert!(parse_gateway_url("https://127.0.0.1").is_err());
        assert!(check_redis_url("redis://127.0.0.5:6390").is_ok());
        assert!(check_redis_url("redis://192.168.1.1:6379").is_err());
    }

    #[test]
    fn source_ranges() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4,127.1.0.1").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[2], Ipv4Addr::new(127, 0, 0, 4));
        assert!(parse_source_ips("127.0.0.2-10.0.0.1").is_err());
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
    }
}
