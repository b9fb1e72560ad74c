//! Scheduling metadata from a request: which requests are scheduled, and the
//! few body fields a policy needs. Kept free of the rest of the host so the
//! fuzz target (host/fuzz) can build it alone.

use http::Method;
use serde::Deserialize;

/// Paths whose POSTs are generation or embedding work, and so are scheduled.
pub const SCHEDULED_PATHS: &[&str] = &[
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
];

/// Whether a request is scheduled (as opposed to passed through).
pub fn is_scheduled(method: &Method, path: &str) -> bool {
    method == Method::POST && SCHEDULED_PATHS.contains(&path)
}

/// The scheduling-relevant fields of a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyMeta {
    /// `model`.
    pub model: String,
    /// `stream`, with Ollama's default for the path applied.
    pub stream: bool,
    /// `options.num_predict`, or `max_tokens` on `/v1`.
    pub num_predict: Option<i64>,
}

#[derive(Deserialize)]
struct RawBody {
    model: Option<String>,
    stream: Option<bool>,
    options: Option<RawOptions>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawOptions {
    num_predict: Option<serde_json::Value>,
}

/// Extracts [`BodyMeta`] from a scheduled request's body. `None` when the body
/// is not a JSON object with a string `model`: such a request is passed
/// through so that Ollama answers it with its own error.
pub fn extract_meta(path: &str, body: &[u8]) -> Option<BodyMeta> {
    let raw: RawBody = serde_json::from_slice(body).ok()?;
    let model = raw.model.filter(|m| !m.is_empty())?;
    let openai = path.starts_with("/v1/");
    let embedding = path.contains("embed");
    // `stream` omitted means true on Ollama's own API, false on /v1;
    // embeddings never stream.
    let stream = !embedding && raw.stream.unwrap_or(!openai);
    let num = |v: Option<serde_json::Value>| {
        v.and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
    };
    let num_predict = if openai {
        num(raw.max_tokens).or(num(raw.max_completion_tokens))
    } else {
        num(raw.options.and_then(|o| o.num_predict))
    };
    Some(BodyMeta {
        model,
        stream,
        num_predict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_defaults_follow_ollama() {
        let m = extract_meta("/api/chat", br#"{"model":"m","messages":[]}"#).unwrap();
        assert!(m.stream);
        let m = extract_meta("/v1/chat/completions", br#"{"model":"m","messages":[]}"#).unwrap();
        assert!(!m.stream);
        let m = extract_meta("/api/generate", br#"{"model":"m","stream":false}"#).unwrap();
        assert!(!m.stream);
        let m = extract_meta("/api/embed", br#"{"model":"m","input":"x"}"#).unwrap();
        assert!(!m.stream);
    }

    #[test]
    fn num_predict_from_options_or_max_tokens() {
        let m = extract_meta(
            "/api/generate",
            br#"{"model":"m","options":{"num_predict":42,"temperature":0.1}}"#,
        )
        .unwrap();
        assert_eq!(m.num_predict, Some(42));
        let m = extract_meta("/v1/completions", br#"{"model":"m","max_tokens":7}"#).unwrap();
        assert_eq!(m.num_predict, Some(7));
    }

    #[test]
    fn unschedulable_bodies_are_none() {
        assert_eq!(extract_meta("/api/chat", b"{not json"), None);
        assert_eq!(extract_meta("/api/chat", br#"{"messages":[]}"#), None);
        assert_eq!(extract_meta("/api/chat", br#"{"model":""}"#), None);
        assert_eq!(extract_meta("/api/chat", br#"[1,2]"#), None);
        assert_eq!(
            extract_meta("/api/chat", br#"{"model":"m","stream":"yes"}"#),
            None
        );
    }
}
