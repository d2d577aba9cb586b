//! A request's query string, decoded: the repeated `channel=` values in order, and the
//! other parameters (last value wins).

/// The query string, decoded.
#[derive(Debug, Default)]
pub struct Query {
    /// Every `channel=` value, in order.
    pub channels: Vec<String>,
    /// Other parameters (last value wins).
    pub params: Vec<(String, String)>,
}

impl Query {
    /// Decodes a raw query string.
    pub fn parse(raw: Option<&str>) -> Self {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if k == "channel" {
                q.channels.push(v.into_owned());
            } else {
                q.params.push((k.into_owned(), v.into_owned()));
            }
        }
        q
    }

    /// The last value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}
