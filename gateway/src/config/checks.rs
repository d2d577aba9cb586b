//! The checks the settings table runs on merged values: each validates one option and
//! may normalize it (trim, drop empty entries), and says what is wrong in one line.

use std::fmt;

use super::{ConfigError, Secret, SecretUrl, mask_url, sentinel_url};

/// A number that must be greater than zero.
pub fn positive<T: PartialOrd + Default + fmt::Display>(name: &str, v: T) -> Result<T, ConfigError> {
    if v > T::default() { Ok(v) } else { Err(ConfigError(format!("{name} must be greater than 0, got {v}"))) }
}

/// A Redis URL: `redis://`, `unix://`, `redis+sentinel://` or `redis+cluster://`; an
/// empty one means none.
pub fn redis_url(name: &str, url: Option<SecretUrl>) -> Result<Option<SecretUrl>, ConfigError> {
    let Some(url) = url.filter(|u| !u.expose().trim().is_empty()) else { return Ok(None) };
    let text = url.expose();
    if text.starts_with(sentinel_url::SCHEME) {
        sentinel_url::SentinelUrl::parse(text).map_err(|e| ConfigError(format!("{name}: {e}")))?;
        return Ok(Some(url));
    }
    if super::cluster_url::is_cluster(text) {
        super::cluster_url::seeds(text)
            .map_err(|e| ConfigError(format!("{name} {:?}: {e}", mask_url(text))))?;
        return Ok(Some(url));
    }
    if !(text.starts_with("redis://") || text.starts_with("unix://")) {
        let hint = if text.starts_with("rediss://") { " (TLS to Redis is not built in yet)" } else { "" };
        return Err(ConfigError(format!(
            "{name} must start with redis://, unix://, redis+sentinel:// or redis+cluster://, got {:?}{hint}",
            mask_url(text)
        )));
    }
    Ok(Some(url))
}

/// API keys: trimmed, empty ones dropped; none left means publishing is open.
pub fn keys(_name: &str, keys: Option<Vec<Secret>>) -> Result<Option<Vec<Secret>>, ConfigError> {
    let keys: Vec<Secret> = keys
        .unwrap_or_default()
        .into_iter()
        .map(|k| k.expose().trim().to_owned())
        .filter(|k| !k.is_empty())
        .map(Secret::new)
        .collect();
    Ok((!keys.is_empty()).then_some(keys))
}

/// A secret that counts as unset when empty.
pub fn not_empty(_name: &str, s: Option<Secret>) -> Result<Option<Secret>, ConfigError> {
    Ok(s.filter(|s| !s.expose().is_empty()))
}

/// Browser origins: `scheme://host[:port]`, trailing slashes dropped; none means any.
pub fn origins(name: &str, origins: Option<Vec<String>>) -> Result<Option<Vec<String>>, ConfigError> {
    let mut out = Vec::new();
    for o in origins.unwrap_or_default() {
        let o = o.trim().trim_end_matches('/').to_owned();
        if o.is_empty() {
            continue;
        }
        let valid = (o.starts_with("http://") || o.starts_with("https://"))
            && !o["https://".len().min(o.len())..].contains('/')
            && axum::http::HeaderValue::from_str(&o).is_ok();
        if !valid {
            return Err(ConfigError(format!(
                "{name} entries look like https://app.example.com (scheme, host, optional port), got {o:?}"
            )));
        }
        out.push(o);
    }
    Ok((!out.is_empty()).then_some(out))
}
