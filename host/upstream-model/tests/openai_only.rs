//! The OpenAI-only mode (`--kind openai`): like llama-server or vLLM, it
//! serves `/v1/*` and `GET /health`, answers 404 on every `/api/*` route,
//! and records the `priority` member of each `/v1` generation it receives.

mod common;

use common::*;
use http::StatusCode;
use upstream_model::{EventKind, ModelConfig};

fn openai() -> ModelConfig {
    ModelConfig {
        openai_only: true,
        ..cfg(2, 1, 3)
    }
}

#[tokio::test]
async fn it_serves_v1_and_health_and_refuses_api() {
    let f = fake(openai()).await;
    let r = get(f.addr(), "/health").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await["status"], "ok");
    let r = get(f.addr(), "/v1/models").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await["data"][0]["id"], "fake:latest");
    let r = post(
        f.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"fake","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(json(r).await["choices"][0]["message"]["content"].is_string());
    for (method, path) in [
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
        ("GET", "/api/version"),
        ("GET", "/api/ps"),
    ] {
        let r = send(f.addr(), method, path, &[], "{}").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {path}");
        assert!(json(r).await["error"]["message"].is_string(), "{path}");
    }
    // Ollama's mode has no /health.
    let o = fake(cfg(1, 1, 1)).await;
    assert_eq!(
        get(o.addr(), "/health").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn it_records_the_priority_it_received() {
    let f = fake(openai()).await;
    for (tag, body) in [
        ("with", r#"{"model":"fake","prompt":"x","priority":7}"#),
        ("without", r#"{"model":"fake","prompt":"x"}"#),
    ] {
        let r = post(f.addr(), "/v1/completions", &[("x-test-tag", tag)], body).await;
        assert_eq!(r.status(), StatusCode::OK);
        let _ = text(r).await;
    }
    let log = f.log();
    let got = |tag: &str| {
        log.iter()
            .find(|e| e.kind == EventKind::Received && e.tag.as_deref() == Some(tag))
            .map(|e| e.body_priority)
            .expect("received")
    };
    assert_eq!(got("with"), Some(7));
    assert_eq!(got("without"), None);
}
