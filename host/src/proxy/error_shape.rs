//! The shape of an error maitre answers itself: Ollama's `{"error": "..."}`,
//! or OpenAI's envelope on `/v1`, so each client library reads it as its own.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;

/// An error in Ollama's shape (`{"error": "..."}`), or OpenAI's envelope on
/// `/v1`, with `Retry-After` when given.
pub fn error_response(
    status: StatusCode,
    path: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response<ProxyBody> {
    let body = if path.starts_with("/v1/") {
        let kind = match status.as_u16() {
            400 | 413 => "invalid_request_error",
            404 => "not_found_error",
            _ => "api_error",
        };
        serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
    } else {
        serde_json::json!({ "error": message })
    };
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

#[cfg(test)]
pub(super) mod tests {
    use futures_util::FutureExt;

    use super::*;

    /// The JSON body of an answer built from a `Full` body (ready at once).
    pub(in crate::proxy) fn body_json(r: Response<ProxyBody>) -> serde_json::Value {
        let bytes = r
            .into_body()
            .collect()
            .now_or_never()
            .expect("a Full body is ready at once")
            .expect("a Full body cannot fail")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("error bodies are JSON")
    }

    #[test]
    fn openai_paths_get_openai_errors() {
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "/v1/chat/completions",
            "busy",
            Some(2),
        );
        assert_eq!(r.headers().get("retry-after").unwrap(), "2");
        assert_eq!(
            body_json(r),
            serde_json::json!({"error": {"message": "busy", "type": "api_error", "param": null, "code": null}})
        );
        let r = error_response(StatusCode::PAYLOAD_TOO_LARGE, "/v1/embeddings", "big", None);
        assert_eq!(body_json(r)["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn ollama_paths_get_ollama_errors() {
        let r = error_response(StatusCode::BAD_GATEWAY, "/api/chat", "down", None);
        assert!(r.headers().get("retry-after").is_none());
        assert_eq!(
            r.headers().get("content-type").unwrap(),
            "application/json; charset=utf-8"
        );
        assert_eq!(body_json(r), serde_json::json!({"error": "down"}));
    }
}
