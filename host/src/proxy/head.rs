//! A request's head that owns its bytes, and the packed form a queued
//! request keeps while it waits.
//!
//! hyper parses a request's URI and header values as slices of the
//! connection's read buffer. A scheduled request keeps its head until it is
//! dispatched, possibly for minutes; holding hyper's slices would keep that
//! whole buffer (8 KiB or more) alive, and hyper, which reads on to notice a
//! client that goes away, would allocate a second one for each waiting
//! connection. Copying the few hundred bytes of the head frees the first.
//!
//! A `HeaderMap` of a typical client's five headers takes about 700 bytes
//! (its index, its entries, a buffer per value); a waiting request needs
//! its headers only to send them upstream, so it keeps them as one buffer of
//! header lines ([`PackedHead`], about 150 bytes) and rebuilds the map when
//! it is dispatched.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
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

/// A waiting request's head: what is sent upstream when it is dispatched
/// (method, path and query, headers), in as few bytes as it takes.
///
/// Each header is a line `name:value\n` in one buffer: names cannot hold
/// `:` or a line break, values cannot hold a line break, so the lines read
/// back unambiguously, in their order. Values read back as slices of the
/// buffer, without a copy. A header's sensitive flag (HTTP/2's hint not to
/// index it) is not kept: hyper's HTTP/1 parser never sets it, and the
/// upstream is spoken to in HTTP/1.
pub(super) struct PackedHead {
    method: Method,
    target: PathAndQuery,
    lines: Bytes,
}

impl PackedHead {
    /// Packs `head`, which can be dropped then.
    pub(super) fn pack(head: &Head) -> PackedHead {
        let size = head
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 2)
            .sum();
        let mut lines = Vec::with_capacity(size);
        for (k, v) in &head.headers {
            lines.extend_from_slice(k.as_str().as_bytes());
            lines.push(b':');
            lines.extend_from_slice(v.as_bytes());
            lines.push(b'\n');
        }
        PackedHead {
            method: head.method.clone(),
            target: head
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            lines: Bytes::from(lines),
        }
    }

    /// The head again, to send upstream (the URI is its path and query).
    pub(super) fn unpack(&self) -> Head {
        let count = self.lines.iter().filter(|&&b| b == b'\n').count();
        let mut headers = HeaderMap::with_capacity(count);
        let mut start = 0;
        for line in self.lines.split(|&b| b == b'\n') {
            let end = start + line.len();
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = HeaderName::from_bytes(&line[..colon]);
                let value =
                    HeaderValue::from_maybe_shared(self.lines.slice(start + colon + 1..end));
                if let (Ok(name), Ok(value)) = (name, value) {
                    headers.append(name, value);
                }
            }
            start = end + 1;
        }
        Head {
            method: self.method.clone(),
            uri: Uri::from(self.target.clone()),
            headers,
        }
    }
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

    #[test]
    fn a_packed_head_unpacks_to_the_head_sent_upstream() {
        let (parts, ()) = http::Request::builder()
            .method("POST")
            .uri("http://example.com/api/generate?x=1&y=%20")
            .header("content-type", "application/json")
            .header("x-priority", "batch")
            .header("x-key", "a")
            .header("x-key", "b: c")
            .header("x-empty", "")
            .header("x-obs", HeaderValue::from_bytes(b"caf\xc3\xa9\tx").unwrap())
            .body(())
            .unwrap()
            .into_parts();
        let head = Head::own(parts);
        let back = PackedHead::pack(&head).unpack();
        assert_eq!(back.method, head.method);
        assert_eq!(back.uri, "/api/generate?x=1&y=%20");
        assert_eq!(back.headers, head.headers);
        let keys: Vec<_> = back.headers.get_all("x-key").iter().collect();
        assert_eq!(keys, ["a", "b: c"], "repeated headers keep their order");
    }

    #[test]
    fn a_head_without_headers_packs_too() {
        let (parts, ()) = http::Request::builder()
            .method("GET")
            .uri("/")
            .body(())
            .unwrap()
            .into_parts();
        let back = PackedHead::pack(&Head::own(parts)).unpack();
        assert!(back.headers.is_empty());
        assert_eq!(back.uri, "/");
    }
}
