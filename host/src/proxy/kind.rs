//! Which backends may answer a request, by what they speak: an
//! OpenAI-compatible server (`kind = "openai"`) has no Ollama `/api/*`
//! routes, so such a request never goes to one. When no backend that could
//! answer it is left, maitre answers 404 itself, naming the backend and its
//! kind and the `/v1` route to use instead, in Ollama's error shape.

use percent_encoding::percent_decode_str;

use super::{Proxy, Refusal};

impl Proxy {
    /// The refusal for a request to `path` (raw or decoded) when no backend
    /// speaks its API: an `/api/*` request to a fleet of OpenAI-compatible
    /// servers only. Names the first backend (the only one, in a
    /// single-backend setup).
    pub(super) fn unserved(&self, path: &str) -> Option<Refusal> {
        let path = percent_decode_str(path).decode_utf8_lossy();
        if self.backends.iter().any(|t| t.kind.serves(&path)) {
            return None;
        }
        Some(not_ollama(&self.backends.first()?.name, &path))
    }

    /// The Ollama backends: the ones an `/api/*` call for the whole fleet
    /// (pull, push, create, copy, delete, blobs) goes to.
    pub(super) fn ollama_backends(&self) -> impl Iterator<Item = &super::Target> {
        self.backends
            .iter()
            .filter(|t| t.kind == crate::config::BackendKind::Ollama)
    }

    /// Of `candidates`, the backends that speak `path`'s API (decoded).
    pub(super) fn serving(&self, candidates: &[usize], path: &str) -> Vec<usize> {
        candidates
            .iter()
            .copied()
            .filter(|&b| self.backends[b].kind.serves(path))
            .collect()
    }
}

/// The 404 for an `/api/*` request to OpenAI-compatible backend `backend`.
pub(super) fn not_ollama(backend: &std::sync::Arc<str>, path: &str) -> Refusal {
    Refusal::NotOllama {
        backend: backend.clone(),
        path: path.to_string(),
        instead: openai_twin(path),
    }
}

/// The `/v1` route that does what an Ollama `/api/*` route does.
fn openai_twin(path: &str) -> &'static str {
    match path {
        "/api/chat" | "/api/generate" => "/v1/chat/completions (or /v1/completions)",
        "/api/embed" | "/api/embeddings" => "/v1/embeddings",
        "/api/tags" | "/api/ps" => "/v1/models",
        "/api/show" => "/v1/models/{model}",
        _ => "its OpenAI-compatible /v1 routes",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_message_names_the_backend_its_kind_and_the_route_to_use() {
        let r = super::not_ollama(&"llama".into(), "/api/generate");
        assert_eq!(r.status(), http::StatusCode::NOT_FOUND);
        assert_eq!(
            r.to_string(),
            "maitre: backend \"llama\" is an OpenAI-compatible server (kind = \"openai\"): it has no /api/generate; use /v1/chat/completions (or /v1/completions)"
        );
    }
}
