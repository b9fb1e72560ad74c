//! The HTTP side of the tests: a client that never goes through a proxy, the
//! request shape most tests send, and the Python that has the official
//! Ollama clients.

use std::path::PathBuf;

/// An HTTP client that never goes through a proxy (tests talk to 127.0.0.1).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// A non-streaming `/api/generate` with a tag (`X-Test-Tag`, which the
/// upstream model logs), a priority and a token count.
pub fn generate(
    c: &reqwest::Client,
    base: &str,
    tag: &str,
    priority: Option<&str>,
    tokens: u64,
) -> reqwest::RequestBuilder {
    let mut r = c
        .post(format!("{base}/api/generate"))
        .header("x-test-tag", tag)
        .json(&serde_json::json!({"model": "fake", "prompt": "hi", "stream": false, "options": {"num_predict": tokens}}));
    if let Some(p) = priority {
        r = r.header("x-priority", p);
    }
    r
}

/// The Python that has the official clients and prometheus_client:
/// `MAITRE_PYTHON`, else the venv `.ci/run` creates in target/pyenv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MAITRE_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/pyenv/bin/python"
    ));
    assert!(
        venv.exists(),
        "no Python with the test packages: run .ci/run (it creates target/pyenv), or set MAITRE_PYTHON to a python with `pip install -r tests/python/requirements.txt`"
    );
    venv
}
