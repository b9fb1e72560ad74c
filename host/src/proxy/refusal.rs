//! Every answer maitre gives itself instead of the upstream's, as one typed
//! [`Refusal`], and the one function that turns it into an HTTP response.
//!
//! The rule for `Retry-After` lives here and nowhere else: every 503 and 429
//! maitre answers itself carries it (`limits.retry_after_seconds`), whichever
//! phase refused.

use std::sync::Arc;

use http::{Response, StatusCode};

use super::ProxyBody;
use super::error_shape::error_response;
use super::headers::set_header;

/// Why maitre answers a request itself. The `Display` text is the message the
/// client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The body is over `limits.max_body_bytes` (413).
    #[error("maitre: request body is larger than {limit} bytes (limits.max_body_bytes)")]
    BodyTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// Reading the body failed (400).
    #[error("maitre: could not read the request body: {detail}")]
    BodyUnreadable {
        /// The read error, as text.
        detail: String,
    },
    /// The body did not arrive within `limits.body_read_timeout_seconds` (408).
    #[error(
        "maitre: the request body did not arrive within {seconds} s (limits.body_read_timeout_seconds)"
    )]
    BodyTimeout {
        /// The timeout in force.
        seconds: u64,
    },
    /// The request bodies maitre holds already fill
    /// `limits.max_total_body_bytes` (503).
    #[error(
        "server busy, please try again.  maitre: the request bodies it holds already take {limit} bytes (limits.max_total_body_bytes)"
    )]
    BodyBudgetSpent {
        /// The budget in force.
        limit: usize,
    },
    /// `limits.max_waiting` requests wait already (503).
    #[error(
        "server busy, please try again.  maitre: {max_waiting} requests are already waiting (limits.max_waiting)"
    )]
    QueueFull {
        /// The limit in force.
        max_waiting: usize,
    },
    /// The host is shutting down and takes no new request (503).
    #[error("maitre is shutting down; retry shortly")]
    ShuttingDown,
    /// The policy refused the request on arrival, with its own status.
    #[error("{message}")]
    RejectedByPolicy {
        /// The arm whose policy decided.
        arm: Arc<str>,
        /// The policy's HTTP status (503 when it is not a valid one).
        status: u16,
        /// The policy's message.
        message: String,
    },
    /// The policy (or shutdown) refused the request while it waited.
    #[error("{message}")]
    RejectedWhileWaiting {
        /// The arm the request waited in.
        arm: Arc<str>,
        /// The policy's HTTP status (503 when it is not a valid one).
        status: u16,
        /// The policy's message.
        message: String,
    },
    /// The upstream sent no response head within
    /// `upstream.first_byte_timeout_seconds` (504).
    #[error(
        "maitre: the upstream sent no response within {seconds} s (upstream.first_byte_timeout_seconds)"
    )]
    UpstreamTimeout {
        /// The timeout in force.
        seconds: u64,
    },
    /// The upstream could not be reached (502).
    #[error("maitre: upstream {upstream} is unreachable ({detail}); is Ollama running?")]
    UpstreamUnreachable {
        /// The upstream's base URL.
        upstream: String,
        /// The connection error with its causes.
        detail: String,
    },
    /// An Ollama `/api/*` request for an OpenAI-compatible backend, which
    /// has no such route (404).
    #[error(
        "maitre: backend {backend:?} is an OpenAI-compatible server (kind = \"openai\"): it has no {path}; use {instead}"
    )]
    NotOllama {
        /// The backend's name.
        backend: Arc<str>,
        /// The path asked for.
        path: String,
        /// What to use instead.
        instead: &'static str,
    },
    /// The stream maitre was folding into a non-streamed answer broke off:
    /// the connection was lost, or the stream ended without its end marker
    /// (502).
    #[error("maitre: the upstream's answer broke off before its end ({detail})")]
    UpstreamBrokeOff {
        /// What went wrong.
        detail: String,
    },
}

impl Refusal {
    /// The HTTP status of this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BodyUnreadable { .. } => StatusCode::BAD_REQUEST,
            Refusal::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Refusal::QueueFull { .. } | Refusal::BodyBudgetSpent { .. } | Refusal::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::RejectedByPolicy { status, .. }
            | Refusal::RejectedWhileWaiting { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            Refusal::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::NotOllama { .. } => StatusCode::NOT_FOUND,
            Refusal::UpstreamUnreachable { .. } | Refusal::UpstreamBrokeOff { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The arm that refused, for `X-Maitre-Arm`; only policy decisions name one.
    fn arm(&self) -> Option<&str> {
        match self {
            Refusal::RejectedByPolicy { arm, .. } | Refusal::RejectedWhileWaiting { arm, .. } => {
                Some(arm)
            }
            _ => None,
        }
    }

    /// The HTTP answer: the status, the error in the shape `path`'s clients
    /// expect, `Retry-After: retry_after_seconds` on every 503 and 429, and
    /// `X-Maitre-Arm` when a policy decided.
    pub fn into_response(self, path: &str, retry_after_seconds: u64) -> Response<ProxyBody> {
        let status = self.status();
        let retry = matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        )
        .then_some(retry_after_seconds);
        let mut r = error_response(status, path, &self.to_string(), retry);
        if let Some(arm) = self.arm() {
            set_header(r.headers_mut(), "x-maitre-arm", arm);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::error_shape::tests::body_json;
    use super::*;

    /// One of each kind, with the status, `Retry-After` and arm it must map to.
    fn every_kind() -> Vec<(Refusal, u16, bool, Option<&'static str>)> {
        let arm: Arc<str> = Arc::from("main");
        let rejected = |status: u16| Refusal::RejectedByPolicy {
            arm: arm.clone(),
            status,
            message: format!("policy says {status}"),
        };
        let waiting = |status: u16| Refusal::RejectedWhileWaiting {
            arm: arm.clone(),
            status,
            message: format!("policy says {status} while waiting"),
        };
        vec![
            (Refusal::BodyTooLarge { limit: 10 }, 413, false, None),
            (
                Refusal::BodyUnreadable {
                    detail: "reset".into(),
                },
                400,
                false,
                None,
            ),
            (Refusal::BodyTimeout { seconds: 5 }, 408, false, None),
            (Refusal::QueueFull { max_waiting: 4 }, 503, true, None),
            (Refusal::BodyBudgetSpent { limit: 1024 }, 503, true, None),
            (Refusal::ShuttingDown, 503, true, None),
            (rejected(503), 503, true, Some("main")),
            (rejected(429), 429, true, Some("main")),
            (rejected(403), 403, false, Some("main")),
            (rejected(1000), 503, true, Some("main")),
            (waiting(503), 503, true, Some("main")),
            (waiting(429), 429, true, Some("main")),
            (waiting(500), 500, false, Some("main")),
            (Refusal::UpstreamTimeout { seconds: 30 }, 504, false, None),
            (
                Refusal::NotOllama {
                    backend: "llama".into(),
                    path: "/api/generate".into(),
                    instead: "/v1/completions",
                },
                404,
                false,
                None,
            ),
            (
                Refusal::UpstreamUnreachable {
                    upstream: "http://127.0.0.1:1".into(),
                    detail: "connection refused".into(),
                },
                502,
                false,
                None,
            ),
            (
                Refusal::UpstreamBrokeOff {
                    detail: "connection reset".into(),
                },
                502,
                false,
                None,
            ),
        ]
    }

    #[test]
    fn every_refusal_maps_to_its_status_shape_and_headers() {
        for (refusal, status, retry, arm) in every_kind() {
            let message = refusal.to_string();
            for path in ["/api/chat", "/v1/chat/completions"] {
                let r = refusal.clone().into_response(path, 7);
                let what = format!("{refusal:?} on {path}");
                assert_eq!(r.status().as_u16(), status, "{what}");
                assert_eq!(
                    r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
                    retry.then_some("7"),
                    "{what}"
                );
                assert_eq!(
                    r.headers().get("x-maitre-arm").map(|v| v.to_str().unwrap()),
                    arm,
                    "{what}"
                );
                let body = body_json(r);
                if path.starts_with("/v1/") {
                    assert_eq!(body["error"]["message"], message, "{what}");
                    assert!(body["error"]["type"].is_string(), "{what}");
                } else {
                    assert_eq!(body, serde_json::json!({ "error": message }), "{what}");
                }
            }
        }
    }

    #[test]
    fn messages_name_the_limit_in_force() {
        let m = |r: Refusal| r.to_string();
        assert_eq!(
            m(Refusal::BodyTooLarge { limit: 10 }),
            "maitre: request body is larger than 10 bytes (limits.max_body_bytes)"
        );
        assert_eq!(
            m(Refusal::QueueFull { max_waiting: 4 }),
            "server busy, please try again.  maitre: 4 requests are already waiting (limits.max_waiting)"
        );
        assert_eq!(
            m(Refusal::UpstreamUnreachable {
                upstream: "http://127.0.0.1:1".into(),
                detail: "connection refused".into(),
            }),
            "maitre: upstream http://127.0.0.1:1 is unreachable (connection refused); is Ollama running?"
        );
    }
}
