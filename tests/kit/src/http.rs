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

/// `GET url` with `c`: the answer's body as JSON (panics on a failure, a
/// non-2xx answer or a body that is not JSON, naming the URL).
pub async fn get_json(c: &reqwest::Client, url: &str) -> serde_json::Value {
    let r = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
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

/// The `error` message of an Ollama-shaped error answer (`{"error": ...}`),
/// after checking that `r` has `status`.
pub async fn error_of(r: reqwest::Response, status: u16) -> String {
    let got = r.status().as_u16();
    let body = r.text().await.expect("error body");
    assert_eq!(got, status, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"))
        .to_string()
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

/// Runs `tests/python/SCRIPT` against maitre at `url` (`MAITRE_URL`, no
/// proxy, plus `env`), checks that it succeeded and printed `done`, and
/// returns what it printed.
pub async fn run_python(script: &str, url: &str, env: &[(&str, &str)], done: &str) -> String {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../python")).join(script);
    let out = tokio::process::Command::new(python())
        .arg(&path)
        .env("MAITRE_URL", url)
        .env("NO_PROXY", "127.0.0.1")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(done), "{stdout}");
    stdout
}
