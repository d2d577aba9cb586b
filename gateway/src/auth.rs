//! Subscriber authentication: JWTs (HS256 with a shared secret, RS256 with a public
//! key, and keys from a JWK set chosen by `kid`) with a pinned algorithm per key, `exp`
//! always required, `aud` and `iss` required when configured, `nbf` honoured (all with
//! [`LEEWAY_SECS`] for clock skew), and a `channels` claim listing the channels (or
//! `prefix.*` patterns) the holder may read — and, with `"pub": true`, publish to over
//! WebSocket. Off unless a key is configured.
//!
//! The token comes from `Authorization: Bearer` (the scheme in any case), a `token`
//! query parameter (`EventSource` cannot set headers) or the `gateway_token` cookie.

pub mod jwks;

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::http::{HeaderMap, StatusCode, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use metrics::counter;
use serde::Deserialize;
use shared::protocol::error_code;

pub use self::jwks::Jwks;
use crate::{
    config::{AuthSettings, ConfigError},
    error::ApiError,
    metrics as m,
};

/// Name of the cookie a token may come in.
pub const TOKEN_COOKIE: &str = "gateway_token";

/// Clock skew allowed between the token issuer and this node, for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// Farthest ahead an expiry is scheduled: a later one (a token valid for centuries, or
/// `exp: u64::MAX`) is treated as this far away instead of overflowing a clock.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What a valid token grants.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch; the connection is closed then.
    pub exp: u64,
    /// Channels or `prefix.*` / `*` patterns the holder may subscribe to, and publish to
    /// over WebSocket when `pub` is true.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Whether the holder may use the WebSocket `publish` op (on its `channels`).
    #[serde(default, rename = "pub")]
    pub publish: bool,
}

impl Claims {
    /// Whether these claims allow reading `channel`.
    pub fn allows(&self, channel: &str) -> bool {
        self.channels.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => p == channel,
        })
    }

    /// Time left until the token expires (zero if it already has), at most a century,
    /// so adding it to an `Instant` never overflows.
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Duration::from_secs(self.exp.saturating_sub(now)).min(FAR_FUTURE)
    }

    /// When the token expires, on the monotonic clock from `now`.
    pub fn expires_at(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        now.checked_add(self.remaining()).unwrap_or(now + Duration::from_secs(24 * 3600))
    }
}

/// Verifies tokens; `None` in the app state when auth is off.
pub struct Authenticator {
    /// The secret / PEM keys, chosen by the token's `alg`, for tokens without `kid`.
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
    /// The JWKS keys, chosen by the token's `kid`; empty without a JWKS.
    by_kid: HashMap<String, (Algorithm, DecodingKey, Validation)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _, _)| a).collect();
        let mut kids: Vec<_> = self.by_kid.iter().map(|(kid, (a, _, _))| format!("{kid}: {a:?}")).collect();
        kids.sort();
        f.debug_struct("Authenticator").field("algorithms", &algs).field("key_ids", &kids).finish()
    }
}

impl Authenticator {
    /// Builds a verifier from the settings, reading the key files they name; `None`
    /// when no key is configured (auth off). A bad file is an error naming the file and
    /// the problem.
    pub fn new(cfg: &AuthSettings) -> Result<Option<Self>, ConfigError> {
        let pem = match &cfg.rs256_public_key {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read jwt_rs256_public_key {}: {e}", path.display()))
            })?),
            None => None,
        };
        let jwks = match &cfg.jwks_file {
            Some(path) => Some(load_jwks(path)?),
            None => None,
        };
        // A configured audience or issuer is required, not only checked when present:
        // a token minted for another service without an `aud` must not pass here.
        let mut required = vec!["exp"];
        required.extend(cfg.audience.as_ref().map(|_| "aud"));
        required.extend(cfg.issuer.as_ref().map(|_| "iss"));
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = LEEWAY_SECS;
            v.validate_nbf = true;
            v.set_required_spec_claims(&required);
            match &cfg.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            if let Some(iss) = &cfg.issuer {
                v.set_issuer(&[iss]);
            }
            v
        };
        let mut keys = Vec::new();
        if let Some(secret) = &cfg.hs256_secret {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose().as_bytes()),
                validation(Algorithm::HS256),
            ));
        }
        if let (Some(pem), Some(path)) = (&pem, &cfg.rs256_public_key) {
            let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                ConfigError(format!(
                    "jwt_rs256_public_key {}: not an RSA public key in PEM: {e}",
                    path.display()
                ))
            })?;
            keys.push((Algorithm::RS256, key, validation(Algorithm::RS256)));
        }
        let by_kid: HashMap<_, _> = jwks
            .iter()
            .flat_map(Jwks::iter)
            .map(|(kid, k)| (kid.to_owned(), (k.alg, k.key.clone(), validation(k.alg))))
            .collect();
        Ok((!keys.is_empty() || !by_kid.is_empty()).then_some(Self { keys, by_kid }))
    }

    /// Verifies `token`. With a JWKS, a token carrying `kid` is checked against that key
    /// only, and its `alg` must be the key's; other tokens get the secret / PEM key
    /// matching their `alg`. Either way only configured algorithms are used, so `none`
    /// and algorithm confusion (an HS256 token "signed" with an RSA public key) are refused.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| fail("malformed", "malformed token"))?;
        let (key, validation) = match header.kid.as_deref() {
            Some(kid) if !self.by_kid.is_empty() => {
                let Some((alg, key, validation)) = self.by_kid.get(kid) else {
                    let msg = format!("unknown token key id (kid) {}", crate::error::quote(kid));
                    return Err(fail("unknown_key", &msg));
                };
                if *alg != header.alg {
                    return Err(fail("algorithm", "token algorithm does not match its key"));
                }
                (key, validation)
            }
            _ => match self.keys.iter().find(|(alg, _, _)| *alg == header.alg) {
                Some((_, key, validation)) => (key, validation),
                None if self.keys.is_empty() => {
                    return Err(fail("unknown_key", "the token must name its key in a kid header"));
                }
                None => return Err(fail("algorithm", "token algorithm not accepted")),
            },
        };
        jsonwebtoken::decode::<Claims>(token, key, validation).map(|d| d.claims).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => fail("expired", "token expired"),
            ErrorKind::InvalidSignature => fail("invalid_signature", "invalid token signature"),
            ErrorKind::InvalidAudience => fail("wrong_audience", "token audience not accepted"),
            ErrorKind::InvalidIssuer => fail("wrong_issuer", "token issuer not accepted"),
            ErrorKind::ImmatureSignature => fail("not_yet_valid", "token not valid yet (nbf)"),
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "aud" => fail("wrong_audience", "token lacks the required audience claim (aud)"),
                "iss" => fail("wrong_issuer", "token lacks the required issuer claim (iss)"),
                _ => fail("malformed", "token lacks a required claim (exp)"),
            },
            _ => fail("malformed", "malformed token"),
        })
    }

    /// Finds and verifies the request's token.
    pub fn authenticate(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Claims, ApiError> {
        let token = bearer(headers).or(query_token).or_else(|| cookie(headers, TOKEN_COOKIE));
        match token {
            Some(t) => self.verify(t.trim()),
            None => Err(fail(
                "missing",
                "a token is required: Authorization: Bearer <jwt>, ?token=<jwt> or the gateway_token cookie",
            )),
        }
    }
}

/// Reads and checks the `jwt_jwks_file`; the error names the file and the problem.
fn load_jwks(path: &std::path::Path) -> Result<Jwks, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read jwt_jwks_file {}: {e}", path.display())))?;
    Jwks::parse(&text).map_err(|e| ConfigError(format!("jwt_jwks_file {}: {e}", path.display())))
}

/// Checks that `claims` (if auth is on) allow every channel.
pub fn check_channels(claims: Option<&Claims>, channels: &[String]) -> Result<(), ApiError> {
    let Some(claims) = claims else { return Ok(()) };
    match channels.iter().find(|c| !claims.allows(c)) {
        None => Ok(()),
        Some(c) => {
            counter!(m::AUTH_FAILURES_TOTAL, "reason" => "channel_not_allowed").increment(1);
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                error_code::FORBIDDEN,
                format!("the token does not allow channel {}", crate::error::quote(c)),
            ))
        }
    }
}

fn fail(reason: &'static str, message: &str) -> ApiError {
    counter!(m::AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
    ApiError::new(StatusCode::UNAUTHORIZED, error_code::UNAUTHORIZED, message)
}

/// The credentials of an `Authorization: Bearer <credentials>` header, trimmed; the
/// scheme is case-insensitive (RFC 9110 §11.1). Shared by subscriber tokens and publish
/// API keys. `None` for another scheme or empty credentials.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = v.split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(channels: &[&str]) -> Claims {
        Claims { exp: 0, channels: channels.iter().map(|s| s.to_string()).collect(), publish: false }
    }

    #[test]
    fn channel_patterns() {
        let c = claims(&["news.*", "chat:42"]);
        assert!(c.allows("news.sport") && c.allows("news.a.b") && c.allows("chat:42"));
        assert!(!c.allows("news") && !c.allows("chat:43") && !c.allows("newsroom"));
        assert!(claims(&["*"]).allows("anything"));
        assert!(!claims(&[]).allows("x"));
    }

    #[test]
    fn token_sources() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; gateway_token=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, TOKEN_COOKIE), Some("abc"));
        for (value, want) in [
            ("Bearer xyz", Some("xyz")),
            ("bearer xyz", Some("xyz")),
            ("BEARER xyz", Some("xyz")),
            ("BeArEr   xyz ", Some("xyz")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearerxyz", None),
            ("Basic xyz", None),
            ("xyz", None),
        ] {
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&h), want, "{value:?}");
        }
    }

    #[test]
    fn far_future_expiry_saturates() {
        let now = tokio::time::Instant::now();
        for exp in [u64::MAX, 1_000_000_000_000_000_000] {
            let c = Claims { exp, channels: vec![], publish: false };
            assert_eq!(c.remaining(), FAR_FUTURE);
            assert!(c.expires_at(now) > now + Duration::from_secs(3600));
        }
    }

    fn token(kid: Option<&str>, alg: Algorithm, secret: &[u8]) -> String {
        let header = jsonwebtoken::Header { kid: kid.map(str::to_owned), ..jsonwebtoken::Header::new(alg) };
        let claims = serde_json::json!({"exp": u64::MAX / 2, "channels": ["*"]});
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
    }

    fn jwks_auth(static_secret: Option<&str>) -> Authenticator {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
        let text = format!(
            r#"{{"keys":[{{"kty":"oct","kid":"h1","k":"{}"}},{{"kty":"RSA","kid":"r1","n":"{}","e":"AQAB"}}]}}"#,
            B64.encode(b"jwks-secret"),
            B64.encode([0xc5; 256]),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, text).unwrap();
        let cfg = AuthSettings {
            jwks_file: Some(path),
            hs256_secret: static_secret.map(crate::config::Secret::new),
            ..Default::default()
        };
        Authenticator::new(&cfg).unwrap().expect("auth on")
    }

    #[test]
    fn key_files_are_read_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad) = (dir.path().join("good.json"), dir.path().join("bad.json"));
        std::fs::write(&good, r#"{"keys":[{"kty":"oct","kid":"k1","k":"c2VjcmV0"}]}"#).unwrap();
        std::fs::write(&bad, "{\"keys\": [").unwrap();
        let with =
            |path: &std::path::Path| AuthSettings { jwks_file: Some(path.to_owned()), ..Default::default() };
        let auth = Authenticator::new(&with(&good)).unwrap().expect("auth on");
        assert!(auth.by_kid.contains_key("k1"), "the JWKS file is read");
        let err = Authenticator::new(&with(&bad)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid configuration: jwt_jwks_file {}: invalid JSON", bad.display())),
            "{err}"
        );
        let missing = dir.path().join("missing.json");
        let err = Authenticator::new(&with(&missing)).unwrap_err().to_string();
        assert!(err.contains(&format!("cannot read jwt_jwks_file {}", missing.display())), "{err}");
        let pem = AuthSettings { rs256_public_key: Some(good.clone()), ..Default::default() };
        let err = Authenticator::new(&pem).unwrap_err().to_string();
        assert!(err.contains("jwt_rs256_public_key") && err.contains("not an RSA public key"), "{err}");
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_with_the_keys_algorithm() {
        let auth = jwks_auth(None);
        assert!(auth.verify(&token(Some("h1"), Algorithm::HS256, b"jwks-secret")).is_ok());
        let message = |t: &str| auth.verify(t).unwrap_err().message;
        assert_eq!(
            message(&token(Some("nope"), Algorithm::HS256, b"jwks-secret")),
            "unknown token key id (kid) \"nope\""
        );
        assert!(message(&token(None, Algorithm::HS256, b"jwks-secret")).contains("kid header"));
        assert!(message(&token(Some("h1"), Algorithm::HS256, b"other")).contains("signature"));
        // An RSA key's kid with an HMAC algorithm: refused before any HMAC is computed.
        assert_eq!(
            message(&token(Some("r1"), Algorithm::HS256, b"x")),
            "token algorithm does not match its key"
        );
        assert_eq!(
            message(&token(Some("h1"), Algorithm::HS384, b"jwks-secret")),
            "token algorithm does not match its key"
        );
    }

    #[test]
    fn tokens_without_kid_use_the_static_keys_and_kid_goes_to_the_jwks_only() {
        let auth = jwks_auth(Some("static-secret"));
        assert!(auth.verify(&token(None, Algorithm::HS256, b"static-secret")).is_ok());
        let e = auth.verify(&token(Some("other"), Algorithm::HS256, b"static-secret")).unwrap_err();
        assert!(e.message.contains("unknown token key id"), "{}", e.message);
        // Without a JWKS a kid is ignored, as before.
        let cfg = AuthSettings { hs256_secret: Some(crate::config::Secret::new("s")), ..Default::default() };
        let plain = Authenticator::new(&cfg).unwrap().unwrap();
        assert!(plain.verify(&token(Some("whatever"), Algorithm::HS256, b"s")).is_ok());
    }
}
