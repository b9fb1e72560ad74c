//! The admin API's routes as pure functions: from a request's head (and,
//! for a weight change, its body) to what it asks for ([`Plan`]) or why it
//! is refused ([`Refused`]: 400, 401, 403 or 404 with a message that says
//! how to fix it). No I/O and no panic on any input (fuzzed by host/fuzz
//! `admin_request`); [`super::serve`] reads the request and carries out
//! the plan.

use std::time::Duration;

use http::{Method, StatusCode, request::Parts};

use super::guard::{self, Access};

/// The `/ab` window when the query names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// The longest `/ab` window, in seconds (365 days).
pub const MAX_WINDOW_SECONDS: f64 = 365.0 * 24.0 * 3600.0;
/// The largest arm weight (the policy file's bound too).
pub const MAX_WEIGHT: u32 = 1_000_000;
/// The largest body `PUT /policies/{name}/weight` reads.
pub const MAX_WEIGHT_BODY: usize = 4096;

/// What an allowed, well-formed admin request asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// `GET /`: the list of endpoints.
    Index,
    /// `GET /metrics`.
    Metrics,
    /// `GET /status`.
    Status,
    /// `GET /ab?window=SECONDS`.
    Report {
        /// The comparison window: more than 0, at most [`MAX_WINDOW_SECONDS`].
        window: Duration,
    },
    /// `POST /reload` (token checked).
    Reload,
    /// `PUT /policies/{arm}/weight` (token checked); the weight is in the
    /// body, read with [`weight_from_body`].
    SetWeight {
        /// The arm's name, not empty.
        arm: String,
    },
}

/// A refused admin request: the status and the message the client sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Refused {
    /// 400, 401, 403 or 404.
    pub status: StatusCode,
    /// What was wrong and how to fix it.
    pub message: String,
}

impl Refused {
    fn new(status: StatusCode, message: impl Into<String>) -> Refused {
        Refused {
            status,
            message: message.into(),
        }
    }
}

impl From<guard::Denied> for Refused {
    fn from(d: guard::Denied) -> Refused {
        Refused::new(StatusCode::FORBIDDEN, d.to_string())
    }
}

/// The message of a 401.
pub const UNAUTHORIZED: &str = "missing or wrong bearer token: send `Authorization: Bearer <admin_token>` (admin_token in the policy file or MAITRE_ADMIN_TOKEN)";

/// Routes a request by its head: guard ([`guard::check`]), then method and
/// path, then the token for endpoints that change something.
pub fn plan(parts: &Parts, access: &Access<'_>) -> Result<Plan, Refused> {
    guard::check(parts, access)?;
    let path = parts.uri.path();
    let authorize = || {
        if guard::authorized(&parts.headers, access.token) {
            Ok(())
        } else {
            Err(Refused::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED))
        }
    };
    match (&parts.method, path) {
        (&Method::GET, "/") => Ok(Plan::Index),
        (&Method::GET, "/metrics") => Ok(Plan::Metrics),
        (&Method::GET, "/status") => Ok(Plan::Status),
        (&Method::GET, "/ab") => Ok(Plan::Report {
            window: window_from_query(parts.uri.query())?,
        }),
        (&Method::POST, "/reload") => authorize().map(|()| Plan::Reload),
        (&Method::PUT, p) if p.starts_with("/policies/") && p.ends_with("/weight") => {
            authorize()?;
            match p
                .strip_prefix("/policies/")
                .and_then(|rest| rest.strip_suffix("/weight"))
            {
                Some(arm) if !arm.is_empty() => Ok(Plan::SetWeight { arm: arm.into() }),
                _ => Err(Refused::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "PUT {} names no arm: send PUT /policies/ARM/weight with the arm name from the policy file (GET /status lists the arms)",
                        shown(p)
                    ),
                )),
            }
        }
        (method, _) => Err(Refused::new(
            StatusCode::NOT_FOUND,
            format!(
                "no admin endpoint {} {}; see GET /",
                shown(method.as_str()),
                shown(path)
            ),
        )),
    }
}

/// `window=SECONDS` from the `/ab` query: absent means [`DEFAULT_WINDOW`];
/// anything but a number of seconds in (0, [`MAX_WINDOW_SECONDS`]] is a 400.
pub fn window_from_query(query: Option<&str>) -> Result<Duration, Refused> {
    let Some(raw) = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("window="))
    else {
        return Ok(DEFAULT_WINDOW);
    };
    let seconds = raw
        .parse::<f64>()
        .ok()
        .filter(|w| *w > 0.0 && *w <= MAX_WINDOW_SECONDS);
    seconds
        .and_then(|w| Duration::try_from_secs_f64(w).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Refused::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "window={} is not a window: give a number of seconds more than 0 and at most {MAX_WINDOW_SECONDS} (365 days), e.g. /ab?window=600",
                    shown(raw)
                ),
            )
        })
}

/// The weight of `PUT /policies/{name}/weight`: a body `{"weight": N}` or
/// `N`, with N a whole number from 0 to [`MAX_WEIGHT`].
pub fn weight_from_body(body: &[u8]) -> Result<u32, Refused> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("weight")
                .and_then(serde_json::Value::as_u64)
                .or_else(|| v.as_u64())
        })
        .and_then(|w| u32::try_from(w).ok())
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or_else(|| {
            Refused::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "body must be {{\"weight\": N}} with N a whole number from 0 to {MAX_WEIGHT}"
                ),
            )
        })
}

/// At most this many characters of the request go into an answer.
const SHOWN: usize = 100;

fn shown(s: &str) -> String {
    s.chars().take(SHOWN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Access<'static> = Access {
        token: None,
        local: None,
    };

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn refused(method: &str, uri: &str, access: &Access<'_>) -> Refused {
        plan(&head(method, uri, &[]), access).unwrap_err()
    }

    #[test]
    fn routes() {
        let p = |m, u| plan(&head(m, u, &[]), &OPEN);
        assert_eq!(p("GET", "/"), Ok(Plan::Index));
        assert_eq!(p("GET", "/metrics"), Ok(Plan::Metrics));
        assert_eq!(p("GET", "/status?x=1"), Ok(Plan::Status));
        assert_eq!(
            p("GET", "/ab"),
            Ok(Plan::Report {
                window: DEFAULT_WINDOW
            })
        );
        assert_eq!(
            p("GET", "/ab?x=1&window=1.5"),
            Ok(Plan::Report {
                window: Duration::from_millis(1500)
            })
        );
        assert_eq!(p("POST", "/reload"), Ok(Plan::Reload));
        assert_eq!(
            p("PUT", "/policies/a.b-c/weight"),
            Ok(Plan::SetWeight {
                arm: "a.b-c".into()
            })
        );
        let e = refused("DELETE", "/status", &OPEN);
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("DELETE /status"), "{e}");
    }

    #[test]
    fn a_put_without_an_arm_name_is_a_400() {
        for uri in ["/policies/weight", "/policies//weight"] {
            let e = refused("PUT", uri, &OPEN);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{uri}");
            assert!(e.message.contains("names no arm"), "{e}");
        }
    }

    #[test]
    fn control_needs_the_token_first() {
        let access = Access {
            token: Some("t"),
            local: None,
        };
        for (m, u) in [
            ("POST", "/reload"),
            ("PUT", "/policies/a/weight"),
            ("PUT", "/policies/weight"),
        ] {
            assert_eq!(
                refused(m, u, &access).status,
                StatusCode::UNAUTHORIZED,
                "{m} {u}"
            );
            let authed = head(m, u, &[("authorization", "Bearer t")]);
            assert_ne!(
                plan(&authed, &access).map_err(|e| e.status),
                Err(StatusCode::UNAUTHORIZED)
            );
        }
        assert_eq!(
            plan(&head("GET", "/status", &[]), &access),
            Ok(Plan::Status)
        );
    }

    #[test]
    fn a_foreign_host_is_a_403() {
        let e = plan(&head("GET", "/status", &[("host", "evil.example")]), &OPEN).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn windows_out_of_range_are_a_400() {
        for w in [
            "1e300", "1e20", "31536001", "inf", "-inf", "NaN", "-1", "0", "-0", "1e-300", "",
            "abc", "6%300",
        ] {
            let e = window_from_query(Some(&format!("window={w}"))).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{w}");
            assert!(e.message.contains("seconds"), "{e}");
        }
        assert_eq!(
            window_from_query(Some("window=31536000")),
            Ok(Duration::from_secs(31_536_000))
        );
        assert_eq!(
            window_from_query(Some("window=1e-9")),
            Ok(Duration::from_nanos(1))
        );
        assert_eq!(window_from_query(None), Ok(DEFAULT_WINDOW));
        assert_eq!(window_from_query(Some("windows=5")), Ok(DEFAULT_WINDOW));
    }

    #[test]
    fn weights() {
        assert_eq!(weight_from_body(br#"{"weight": 7}"#), Ok(7));
        assert_eq!(weight_from_body(b"1000000"), Ok(MAX_WEIGHT));
        for b in [
            &br#"{"weight": -1}"#[..],
            b"1000001",
            b"4294967296",
            b"1.5",
            br#"{"w": 1}"#,
            b"",
            b"\xff",
        ] {
            let e = weight_from_body(b).unwrap_err();
            assert_eq!(
                e.status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }
}
