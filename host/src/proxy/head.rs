//! A request's head that owns its bytes.
//!
//! hyper parses a request's URI and header values as slices of the
//! connection's read buffer. A scheduled request keeps its head until it is
//! dispatched, possibly for minutes; holding hyper's slices would keep that
//! whole buffer (8 KiB or more) alive, and hyper, which reads on to notice a
//! client that goes away, would allocate a second one for each waiting
//! connection. Copying the few hundred bytes of the head frees the first.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Uri};

/// What maitre keeps of a request's head: what it reads (headers) and what
/// it forwards (method, URI, headers).
#[derive(Debug, Clone)]
pub(super) struct Head {
    /// The request method.
    pub(super) method: Method,
    /// The request target.
    pub(super) uri: Uri,
    /// Every header, as the client sent them.
    pub(super) headers: HeaderMap,
}

impl Head {
    /// Copies the head out of hyper's read buffer; the `Parts` are dropped.
    pub(super) fn own(parts: Parts) -> Head {
        Head {
            uri: own_uri(&parts.uri).unwrap_or(parts.uri),
            headers: own_headers(&parts.headers),
            method: parts.method,
        }
    }
}

/// The URI in a buffer of its own.
fn own_uri(uri: &Uri) -> Option<Uri> {
    Uri::from_maybe_shared(Bytes::from(uri.to_string())).ok()
}

/// The headers with every value in a buffer of its own (names hyper already
/// copies, or are static).
fn own_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (k, v) in h {
        let mut owned = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
        owned.set_sensitive(v.is_sensitive());
        out.append(k.clone(), owned);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owned_head_is_the_same_head_in_fresh_buffers() {
        let buffer = Bytes::from_static(b"/api/generate?x=1 batch");
        let (mut parts, ()) = http::Request::builder()
            .method("POST")
            .uri(Uri::from_maybe_shared(buffer.slice(0..17)).unwrap())
            .header(
                "x-priority",
                HeaderValue::from_maybe_shared(buffer.slice(18..)).unwrap(),
            )
            .header("x-key", "a")
            .header("x-key", "b")
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.get_mut("x-key").unwrap().set_sensitive(true);
        let before = parts.clone();
        let head = Head::own(parts);
        assert_eq!(head.method, before.method);
        assert_eq!(head.uri, before.uri);
        assert_eq!(head.headers, before.headers);
        assert!(head.headers.get("x-key").unwrap().is_sensitive());
        let p = head.headers.get("x-priority").unwrap().as_bytes().as_ptr();
        assert!(
            !buffer.as_ptr_range().contains(&p),
            "the value still points into the read buffer"
        );
    }
}
