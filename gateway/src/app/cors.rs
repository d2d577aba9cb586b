//! CORS: one policy, from `--allowed-origins`, that answers preflights and adds the
//! grant to every answer — the router's (as middleware) and the lean subscriber
//! routes' (written straight into their heads) alike. Credentials are never granted:
//! with "any origin" that would let every site read responses as the user.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::Response,
};

/// The `Vary` value of every answer: it depends on these request headers.
const VARY: &str = "origin, access-control-request-method, access-control-request-headers";
/// Methods a cross-site page may use.
const ALLOW_METHODS: &str = "GET,POST";
/// Request headers a cross-site page may send.
const ALLOW_HEADERS: &str = "content-type,authorization,x-api-key,last-event-id";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// The CORS policy of the public listener.
#[derive(Debug, Clone)]
pub struct Cors {
    /// Allowed origins, exactly as configured; empty means any.
    allowed: Arc<[HeaderValue]>,
}

impl Cors {
    /// The policy for these origins (already validated by config); none means any.
    pub fn new(allowed: &[String]) -> Self {
        Self { allowed: allowed.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect() }
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`: `*` with no
    /// allowlist, else the origin itself when it is listed (compared byte for byte).
    pub fn allow_origin<'a>(&'a self, origin: Option<&'a HeaderValue>) -> Option<&'a [u8]> {
        if self.allowed.is_empty() {
            return Some(b"*");
        }
        origin.filter(|o| self.allowed.iter().any(|a| a == *o)).map(HeaderValue::as_bytes)
    }

    /// The header fields an answer to a request from `origin` carries, in order:
    /// `Vary`, then the grant when there is one.
    pub fn fields<'a>(
        &'a self,
        origin: Option<&'a HeaderValue>,
    ) -> impl Iterator<Item = (HeaderName, &'a [u8])> {
        let grant = self.allow_origin(origin);
        std::iter::once((header::VARY, VARY.as_bytes()))
            .chain(grant.map(|o| (header::ACCESS_CONTROL_ALLOW_ORIGIN, o)))
    }

    /// Adds [`Self::fields`] to a response.
    pub fn add_to(&self, origin: Option<&HeaderValue>, resp: &mut Response) {
        for (name, value) in self.fields(origin) {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                resp.headers_mut().append(name, value);
            }
        }
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`).
    fn preflight(&self, origin: Option<&HeaderValue>) -> Response {
        let mut resp = Response::new(axum::body::Body::empty());
        *resp.status_mut() = StatusCode::OK;
        self.add_to(origin, &mut resp);
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        resp
    }
}

/// The router's CORS middleware: answers preflights, adds the grant to other answers.
pub async fn middleware(State(cors): State<Cors>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return cors.preflight(origin.as_ref());
    }
    let mut resp = next.run(req).await;
    cors.add_to(origin.as_ref(), &mut resp);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_origin_or_only_listed_ones() {
        let origin = HeaderValue::from_static("https://app.example");
        let any = Cors::new(&[]);
        assert_eq!(any.allow_origin(None), Some(&b"*"[..]));
        let listed = Cors::new(&["https://app.example".to_owned()]);
        assert_eq!(listed.allow_origin(Some(&origin)), Some(origin.as_bytes()));
        assert_eq!(listed.allow_origin(Some(&HeaderValue::from_static("https://evil.example"))), None);
        assert_eq!(listed.allow_origin(None), None);
        let fields: Vec<_> = listed.fields(Some(&origin)).map(|(n, _)| n).collect();
        assert_eq!(fields, [header::VARY, header::ACCESS_CONTROL_ALLOW_ORIGIN]);
    }
}
