//! Who may use the admin API: the bearer token, and the guard against web
//! pages. Pure functions of a request's head (no I/O, no panic on any input),
//! unit-tested here and fuzzed with the routes (host/fuzz `admin_request`).
//!
//! A web page in a browser on the operator's machine can reach a loopback
//! admin API in two ways: by DNS rebinding (its own name, `evil.example`,
//! re-resolved to 127.0.0.1, so the browser sends `Host: evil.example` and
//! lets the page read the answers), or by a cross-site form POST (which the
//! browser marks `Origin: https://evil.example`). So unless a request
//! carries the admin token, which such a page cannot know:
//! - its `Host` must name this listener: a loopback name or address
//!   (`localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`) or the address the
//!   connection arrived on, with any port;
//! - if it changes something (any method but GET and HEAD), it must have no
//!   `Origin` (curl, scripts) or come from a page on such a host.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Method, Uri, header, request::Parts};

/// What the guard knows besides the request.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    /// The `admin_token` in force, if one is configured.
    pub token: Option<&'a str>,
    /// The local address the connection arrived on: the admin listener's
    /// address, concrete even when the listener is bound to `0.0.0.0`.
    pub local: Option<SocketAddr>,
}

/// Why the guard refused a request (answered 403 with this text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// `Host` (or the authority of an absolute-form target) names another site.
    #[error(
        "Host {host:?} does not name this admin API: use a loopback name or address (localhost, 127.0.0.1, [::1]){}, with any port. Other names are refused so that a web page cannot reach the admin API through DNS rebinding{}",
        listener_hint(*.local),
        token_hint(*.token)
    )]
    Host {
        /// The refused value (shortened).
        host: String,
        /// The connection's local address.
        local: Option<SocketAddr>,
        /// Whether a token is configured (then it lifts the check).
        token: bool,
    },
    /// A change requested by a page on another site.
    #[error(
        "Origin {origin:?} may not change maitre: the admin API takes POST and PUT only without an Origin header (curl, scripts) or from a page on a loopback host (http://localhost, http://127.0.0.1){}. This stops cross-site requests from web pages{}",
        listener_hint(*.local),
        token_hint(*.token)
    )]
    Origin {
        /// The refused value (shortened).
        origin: String,
        /// The connection's local address.
        local: Option<SocketAddr>,
        /// Whether a token is configured (then it lifts the check).
        token: bool,
    },
}

fn listener_hint(local: Option<SocketAddr>) -> String {
    match local {
        Some(a) if !a.ip().to_canonical().is_loopback() => {
            format!(" or this listener's {}", a.ip())
        }
        _ => String::new(),
    }
}

fn token_hint(token: bool) -> &'static str {
    if token {
        "; a request with the admin token (Authorization: Bearer) may use any name"
    } else {
        ""
    }
}

/// At most this many characters of a refused header go into the answer.
const SHOWN: usize = 100;

fn shown(v: &[u8]) -> String {
    String::from_utf8_lossy(v).chars().take(SHOWN).collect()
}

/// Whether the request carries the configured token (`Authorization: Bearer
/// TOKEN`); true when no token is configured.
pub fn authorized(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison: the token guards live control.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Refuses a request from a web page on another site (see the module doc);
/// a request with the configured token passes whatever its `Host` and `Origin`.
pub fn check(parts: &Parts, access: &Access<'_>) -> Result<(), Denied> {
    if access.token.is_some() && authorized(&parts.headers, access.token) {
        return Ok(());
    }
    let token = access.token.is_some();
    let local = access.local;
    let host_denied = |host: &[u8]| Denied::Host {
        host: shown(host),
        local,
        token,
    };
    // An absolute-form target (`GET http://name/status`) names the host too.
    if let Some(a) = parts.uri.authority()
        && !name_allowed(a.host(), local)
    {
        return Err(host_denied(a.as_str().as_bytes()));
    }
    for v in parts.headers.get_all(header::HOST) {
        // No Host (an HTTP/1.0 client) or an empty one names no other site.
        if !v.is_empty() && !host_allowed(v.as_bytes(), local) {
            return Err(host_denied(v.as_bytes()));
        }
    }
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        for v in parts.headers.get_all(header::ORIGIN) {
            if !origin_allowed(v.as_bytes(), local) {
                return Err(Denied::Origin {
                    origin: shown(v.as_bytes()),
                    local,
                    token,
                });
            }
        }
    }
    Ok(())
}

/// A `Host` value (`name[:port]`) that names this listener.
fn host_allowed(v: &[u8], local: Option<SocketAddr>) -> bool {
    // `Authority` also takes `user@host`, which no Host header holds.
    !v.contains(&b'@')
        && http::uri::Authority::try_from(v).is_ok_and(|a| name_allowed(a.host(), local))
}

/// An `Origin` value (`scheme://name[:port]`) of a page on this machine.
fn origin_allowed(v: &[u8], local: Option<SocketAddr>) -> bool {
    let Ok(uri) = Uri::try_from(v) else {
        return false; // `null` (sandboxed frames, file:// pages) included
    };
    matches!(uri.scheme_str(), Some("http" | "https"))
        && matches!(uri.path(), "" | "/")
        && uri.query().is_none()
        && uri
            .authority()
            .is_some_and(|a| !a.as_str().contains('@') && name_allowed(a.host(), local))
}

/// A host name or address (no port) that is loopback or the connection's
/// local address. `*.localhost` is loopback by RFC 6761; browsers resolve
/// it themselves and no DNS answers for it, so a rebinding site cannot use it.
fn name_allowed(host: &str, local: Option<SocketAddr>) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return true;
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let Ok(ip) = literal.parse::<IpAddr>() else {
        return false;
    };
    let ip = ip.to_canonical();
    ip.is_loopback() || (!ip.is_unspecified() && local.is_some_and(|l| l.ip().to_canonical() == ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/status");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const LOOPBACK: Access<'static> = Access {
        token: None,
        local: Some(SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            11436,
        )),
    };

    #[test]
    fn loopback_names_and_addresses_pass() {
        for h in [
            "localhost",
            "LOCALHOST:1",
            "localhost.",
            "maitre.localhost:8080",
            "127.0.0.1",
            "127.0.0.1:11436",
            "127.9.9.9:80",
            "[::1]",
            "[::1]:11436",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(
                check(&parts("GET", &[("host", h)]), &LOOPBACK),
                Ok(()),
                "{h}"
            );
        }
        assert_eq!(check(&parts("GET", &[]), &LOOPBACK), Ok(()), "no Host");
    }

    #[test]
    fn other_names_are_refused() {
        for h in [
            "evil.example",
            "evil.example:11436",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "localhostx",
            "10.0.0.5:11436",
            "0.0.0.0:11436",
            "[::]:11436",
            "user@127.0.0.1",
            "127.0.0.1 evil",
            "127.1",
        ] {
            let e = check(&parts("GET", &[("host", h)]), &LOOPBACK).unwrap_err();
            assert!(matches!(e, Denied::Host { .. }), "{h}: {e}");
            assert!(e.to_string().contains("DNS rebinding"), "{e}");
        }
        // Any one bad Host among several.
        let p = parts("GET", &[("host", "localhost"), ("host", "evil.example")]);
        assert!(check(&p, &LOOPBACK).is_err());
        // The authority of an absolute-form target.
        let p = http::Request::get("http://evil.example/status")
            .header("host", "localhost")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(check(&p, &LOOPBACK).is_err());
    }

    #[test]
    fn the_listeners_own_address_passes() {
        let lan = Access {
            token: None,
            local: Some("10.0.0.5:11436".parse().unwrap()),
        };
        assert_eq!(
            check(&parts("GET", &[("host", "10.0.0.5:11436")]), &lan),
            Ok(())
        );
        assert_eq!(check(&parts("GET", &[("host", "10.0.0.5")]), &lan), Ok(()));
        let e = check(&parts("GET", &[("host", "10.0.0.6")]), &lan).unwrap_err();
        assert!(e.to_string().contains("this listener's 10.0.0.5"), "{e}");
    }

    #[test]
    fn origin_is_checked_on_changes_only() {
        let host = ("host", "127.0.0.1:11436");
        for o in [
            "http://evil.example",
            "https://evil.example:443",
            "null",
            "http://127.0.0.1.evil.example",
            "file://",
            "http://127.0.0.1/x",
            "chrome-extension://abc",
        ] {
            for m in ["POST", "PUT", "DELETE", "PATCH"] {
                let e = check(&parts(m, &[host, ("origin", o)]), &LOOPBACK).unwrap_err();
                assert!(matches!(e, Denied::Origin { .. }), "{m} {o}: {e}");
            }
            assert_eq!(
                check(&parts("GET", &[host, ("origin", o)]), &LOOPBACK),
                Ok(())
            );
        }
        for o in [
            "http://127.0.0.1:11436",
            "http://localhost:3000",
            "https://[::1]",
        ] {
            assert_eq!(
                check(&parts("POST", &[host, ("origin", o)]), &LOOPBACK),
                Ok(()),
                "{o}"
            );
        }
        assert_eq!(check(&parts("POST", &[host]), &LOOPBACK), Ok(()));
    }

    #[test]
    fn the_token_lifts_the_guard() {
        let with_token = Access {
            token: Some("s3cret"),
            ..LOOPBACK
        };
        let foreign = [
            ("host", "maitre.internal"),
            ("origin", "https://ops.example"),
        ];
        let e = check(&parts("POST", &foreign), &with_token).unwrap_err();
        assert!(e.to_string().contains("admin token"), "{e}");
        let mut authed = foreign.to_vec();
        authed.push(("authorization", "Bearer s3cret"));
        assert_eq!(check(&parts("POST", &authed), &with_token), Ok(()));
        authed[2] = ("authorization", "Bearer s3cre");
        assert!(check(&parts("POST", &authed), &with_token).is_err());
        // Without a configured token nothing lifts the guard.
        authed[2] = ("authorization", "Bearer anything");
        assert!(check(&parts("POST", &authed), &LOOPBACK).is_err());
    }

    #[test]
    fn authorized_compares_the_whole_token() {
        let h = |v: &str| parts("POST", &[("authorization", v)]).headers;
        assert!(authorized(&h("Bearer s3cret"), Some("s3cret")));
        for v in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "bearer s3cret",
            "s3cret",
            "",
        ] {
            assert!(!authorized(&h(v), Some("s3cret")), "{v}");
        }
        assert!(authorized(&HeaderMap::new(), None));
    }
}
