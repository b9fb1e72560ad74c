//! Header hygiene: hop-by-hop headers never cross the proxy, and maitre's own
//! `x-maitre-*` headers are set in one way.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Copies headers minus hop-by-hop ones (and those named in `Connection`).
pub fn strip_hop_by_hop(h: &HeaderMap) -> HeaderMap {
    let mut named: Vec<String> = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            named.extend(
                s.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    let mut out = HeaderMap::with_capacity(h.len());
    for (k, v) in h {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|x| x == n) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// Sets one of maitre's own headers; a value that is not a valid header value
/// (an arm name with a newline, say) is left out rather than failing the answer.
pub(super) fn set_header(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-priority", HeaderValue::from_static("rt"));
        let out = strip_hop_by_hop(&h);
        assert_eq!(out.len(), 1);
        assert_eq!(out.get("x-priority").unwrap(), "rt");
    }

    #[test]
    fn invalid_header_values_are_left_out() {
        let mut h = HeaderMap::new();
        set_header(&mut h, "x-maitre-arm", "main");
        set_header(&mut h, "x-maitre-queue-ms", "bad\nvalue");
        assert_eq!(h.get("x-maitre-arm").unwrap(), "main");
        assert!(h.get("x-maitre-queue-ms").is_none());
    }
}
