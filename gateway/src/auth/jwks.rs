//! A JWK set read from a file (`--jwt-jwks-file`): the signing keys by `kid`, each
//! pinned to the one algorithm it verifies.
//!
//! The algorithm comes from the key, never from the token: the JWK's `alg` when present,
//! else its type — `RSA` → RS256, `EC` on P-256 → ES256, `OKP` Ed25519 → EdDSA, `oct` →
//! HS256. Anything else, a key without `kid` or a `kid` used twice is refused when the
//! file is loaded, so a bad file stops the gateway at startup instead of failing tokens
//! later. Keys meant for encryption (`use: enc`, an `RSA-OAEP`/`RSA1_5` `alg`) are skipped.

use std::{collections::HashMap, fmt};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use serde::Deserialize;
use serde_json::Value;

/// Smallest RSA modulus accepted, in bits; shorter keys are forgeable.
pub const MIN_RSA_BITS: usize = 2048;

/// What a set may hold, for error messages.
const SUPPORTED: &str = "RSA (RS256), EC P-256 (ES256), OKP Ed25519 (EdDSA), oct (HS256)";

/// One verification key of a set.
#[derive(Clone)]
pub struct JwksKey {
    /// The only algorithm a token verified with this key may declare.
    pub alg: Algorithm,
    /// The key material.
    pub key: DecodingKey,
}

/// The usable keys of a JWK set, by `kid`. `Debug` names kids and algorithms only:
/// `oct` keys are secrets.
#[derive(Clone, Default)]
pub struct Jwks {
    keys: HashMap<String, JwksKey>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<_> = self.keys.iter().map(|(kid, k)| format!("{kid}: {:?}", k.alg)).collect();
        keys.sort();
        f.debug_tuple("Jwks").field(&keys).finish()
    }
}

impl Jwks {
    /// Parses a JWK set (`{"keys": [...]}`); the error says which key is wrong and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let Some(raw) = value.get("keys").and_then(Value::as_array) else {
            return Err("not a JWK set: expected an object with a \"keys\" array".to_owned());
        };
        let set = JwkSet::deserialize(&value).map_err(|e| explain_parse_error(raw, e))?;
        let mut keys = HashMap::new();
        for (i, (jwk, raw)) in set.keys.iter().zip(raw).enumerate() {
            let at = key_label(i, jwk.common.key_id.as_deref());
            if let Some((kid, key)) = usable_key(jwk, raw, &at)?
                && keys.insert(kid, key).is_some()
            {
                return Err(format!("{at}: this kid is used by an earlier key too"));
            }
        }
        if keys.is_empty() {
            return Err(format!("no usable signing keys (supported: {SUPPORTED})"));
        }
        Ok(Self { keys })
    }

    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&JwksKey> {
        self.keys.get(kid)
    }

    /// Every key with its `kid`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &JwksKey)> {
        self.keys.iter().map(|(kid, k)| (kid.as_str(), k))
    }
}

/// `keys[2] (kid "abc")`, naming a key in messages.
fn key_label(i: usize, kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("keys[{i}] (kid {kid:?})"),
        None => format!("keys[{i}]"),
    }
}

/// `kty "EC", crv "P-384"`: the fields that decide whether a key is supported.
fn describe(raw: &Value) -> String {
    let fields: Vec<_> = ["kty", "crv", "alg"]
        .iter()
        .filter_map(|f| Some(format!("{f} {:?}", raw.get(f)?.as_str()?)))
        .collect();
    if fields.is_empty() { "no kty".to_owned() } else { fields.join(", ") }
}

/// The set did not deserialize: find the first key that does not, and say why.
fn explain_parse_error(raw: &[Value], err: serde_json::Error) -> String {
    for (i, key) in raw.iter().enumerate() {
        if Jwk::deserialize(key).is_ok() {
            continue;
        }
        let at = key_label(i, key.get("kid").and_then(Value::as_str));
        let needs: &[&str] = match key.get("kty").and_then(Value::as_str) {
            _ if !key.is_object() => return format!("{at}: not a JSON object"),
            Some("RSA") => &["n", "e"],
            Some("EC") => &["crv", "x", "y"],
            Some("OKP") => &["crv", "x"],
            Some("oct") => &["k"],
            _ => return format!("{at}: unsupported key type ({}); supported: {SUPPORTED}", describe(key)),
        };
        return if needs.iter().all(|f| key.get(f).is_some_and(Value::is_string)) {
            format!("{at}: unsupported key ({}); supported: {SUPPORTED}", describe(key))
        } else {
            format!("{at}: malformed key ({}): needs the string fields {}", describe(key), needs.join(", "))
        };
    }
    format!("not a JWK set: {err}")
}

/// The key's `kid` and pinned algorithm, `None` for an encryption key, or why it is refused.
fn usable_key(jwk: &Jwk, raw: &Value, at: &str) -> Result<Option<(String, JwksKey)>, String> {
    use KeyAlgorithm as K;
    let declared = jwk.common.key_algorithm;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption)
        || matches!(declared, Some(K::RSA1_5 | K::RSA_OAEP | K::RSA_OAEP_256))
    {
        return Ok(None);
    }
    let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
        return Err(format!("{at}: no \"kid\"; tokens choose a JWKS key by its kid"));
    };
    let decode = |field: &str, v: &str| {
        URL_SAFE_NO_PAD.decode(v).map_err(|e| format!("{at}: \"{field}\" is not base64url: {e}"))
    };
    let sized = |field: &str, v: &str, len: usize| {
        let bytes = decode(field, v)?;
        if bytes.len() == len {
            Ok(())
        } else {
            Err(format!("{at}: \"{field}\" must be {len} bytes, got {}", bytes.len()))
        }
    };
    let alg = match (&jwk.algorithm, declared) {
        (AlgorithmParameters::RSA(p), None | Some(K::RS256)) => {
            let n = decode("n", &p.n)?;
            let bits = rsa_bits(&n);
            if bits < MIN_RSA_BITS {
                return Err(format!("{at}: RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"));
            }
            if decode("e", &p.e)?.iter().all(|b| *b == 0) {
                return Err(format!("{at}: RSA key without an exponent"));
            }
            Algorithm::RS256
        }
        (AlgorithmParameters::EllipticCurve(p), None | Some(K::ES256)) if p.curve == EllipticCurve::P256 => {
            sized("x", &p.x, 32)?;
            sized("y", &p.y, 32)?;
            Algorithm::ES256
        }
        (AlgorithmParameters::OctetKeyPair(p), None | Some(K::EdDSA))
            if p.curve == EllipticCurve::Ed25519 =>
        {
            sized("x", &p.x, 32)?;
            Algorithm::EdDSA
        }
        (AlgorithmParameters::OctetKey(p), None | Some(K::HS256)) => {
            if decode("k", &p.value)?.is_empty() {
                return Err(format!("{at}: empty oct key"));
            }
            Algorithm::HS256
        }
        _ => return Err(format!("{at}: unsupported key ({}); supported: {SUPPORTED}", describe(raw))),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{at}: {e}"))?;
    Ok(Some((kid, JwksKey { alg, key })))
}

/// Significant bits of a big-endian unsigned integer.
fn rsa_bits(n: &[u8]) -> usize {
    match n.iter().position(|b| *b != 0) {
        Some(i) => (n.len() - i) * 8 - n[i].leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa(kid: &str, extra: &str) -> String {
        let n = b64(&[0xc5; 256]);
        format!(r#"{{"kty":"RSA","kid":"{kid}","n":"{n}","e":"AQAB"{extra}}}"#)
    }

    fn set(keys: &[String]) -> String {
        format!(r#"{{"keys":[{}]}}"#, keys.join(","))
    }

    #[test]
    fn algorithms_are_pinned_by_the_key() {
        let keys = [
            rsa("r1", ""),
            rsa("r2", r#","alg":"RS256","use":"sig""#),
            format!(r#"{{"kty":"EC","crv":"P-256","kid":"e1","x":"{0}","y":"{0}"}}"#, b64(&[1; 32])),
            format!(r#"{{"kty":"OKP","crv":"Ed25519","kid":"d1","x":"{}"}}"#, b64(&[2; 32])),
            format!(r#"{{"kty":"oct","kid":"h1","k":"{}"}}"#, b64(b"0123456789abcdef0123456789abcdef")),
            rsa("enc", r#","use":"enc""#),
            rsa("oaep", r#","alg":"RSA-OAEP""#),
        ];
        let jwks = Jwks::parse(&set(&keys)).unwrap();
        let alg = |kid| jwks.get(kid).map(|k| k.alg);
        assert_eq!(alg("r1"), Some(Algorithm::RS256));
        assert_eq!(alg("r2"), Some(Algorithm::RS256));
        assert_eq!(alg("e1"), Some(Algorithm::ES256));
        assert_eq!(alg("d1"), Some(Algorithm::EdDSA));
        assert_eq!(alg("h1"), Some(Algorithm::HS256));
        assert_eq!((alg("enc"), alg("oaep")), (None, None), "encryption keys are skipped");
        let dbg = format!("{jwks:?}");
        assert!(dbg.contains("h1: HS256") && !dbg.contains("MDEy"), "no key material in Debug: {dbg}");
    }

    #[test]
    fn bad_sets_are_refused_with_the_reason() {
        let err = |text: &str| Jwks::parse(text).unwrap_err();
        assert!(err("{").starts_with("invalid JSON"), "{}", err("{"));
        assert!(err(r#"{"kty":"RSA"}"#).contains("\"keys\" array"));
        assert!(err(r#"{"keys":[]}"#).starts_with("no usable signing keys"));
        assert!(err(&set(&[rsa("enc", r#","use":"enc""#)])).starts_with("no usable signing keys"));
        let cases = [
            (rsa("a", r#","alg":"RS512""#), r#"keys[0] (kid "a"): unsupported key (kty "RSA", alg "RS512")"#),
            (rsa("a", r#","alg":"HS256""#), "unsupported key"),
            (r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#.to_owned(), "keys[0]: no \"kid\""),
            (
                format!(r#"{{"kty":"RSA","kid":"s","n":"{}","e":"AQAB"}}"#, b64(&[0xff; 128])),
                "RSA key of 1024 bits",
            ),
            (
                format!(r#"{{"kty":"EC","crv":"P-384","kid":"p","x":"{0}","y":"{0}"}}"#, b64(&[1; 48])),
                r#"unsupported key (kty "EC", crv "P-384")"#,
            ),
            (
                r#"{"kty":"foo","kid":"f"}"#.to_owned(),
                r#"keys[0] (kid "f"): unsupported key type (kty "foo")"#,
            ),
            (
                r#"{"kty":"RSA","kid":"m"}"#.to_owned(),
                "malformed key (kty \"RSA\"): needs the string fields n, e",
            ),
            (
                r#"{"kty":"EC","crv":"secp256k1","kid":"k","x":"AQ","y":"AQ"}"#.to_owned(),
                "unsupported key (kty",
            ),
            ("1".to_owned(), "keys[0]: not a JSON object"),
            (r#"{"kty":"oct","kid":"o","k":"!!"}"#.to_owned(), "\"k\" is not base64url"),
        ];
        for (key, expected) in cases {
            let e = err(&set(&[key]));
            assert!(e.contains(expected), "{e:?} should contain {expected:?}");
        }
        let dup = err(&set(&[rsa("a", ""), rsa("a", "")]));
        assert!(dup.starts_with(r#"keys[1] (kid "a"): this kid is used"#), "{dup}");
        assert_eq!(rsa_bits(&[0, 0x01, 0]), 9);
    }
}
