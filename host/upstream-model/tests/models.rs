//! Model management and control routes: preload, unload and `/api/ps`,
//! the endpoints Ollama serves without generating (tags, show, pull, ...),
//! and the upstream model's own `/_fake/*` controls.

mod common;

use common::*;
use serde_json::json;
use upstream_model::{EventKind, LogEvent};

#[tokio::test]
async fn preload_unload_and_ps() {
    let f = fake(cfg(1, 1000, 5)).await;
    let a = f.addr();
    let v = json(get(a, "/api/ps").await).await;
    assert_eq!(v, json!({"models": []}));
    // Preload: one JSON object at once, even though stream defaults to true.
    let t0 = std::time::Instant::now();
    let r = post(a, "/api/generate", &[], r#"{"model":"fake"}"#).await;
    assert_eq!(
        header(&r, "content-type"),
        "application/json; charset=utf-8"
    );
    let v = json(r).await;
    assert!(t0.elapsed() < std::time::Duration::from_millis(500));
    assert_eq!(
        (v["done"].clone(), v["done_reason"].clone()),
        (json!(true), json!("load"))
    );
    let v = json(
        post(
            a,
            "/api/chat",
            &[],
            r#"{"model":"fake-chat","messages":[]}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["done_reason"], "load");
    assert_eq!(v["message"]["content"], "");
    let ps = json(get(a, "/api/ps").await).await;
    let names: Vec<&str> = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"fake:latest") && names.contains(&"fake-chat:latest"));
    let m = &ps["models"][0];
    for k in [
        "model",
        "size",
        "size_vram",
        "digest",
        "details",
        "expires_at",
        "context_length",
    ] {
        assert!(m.get(k).is_some(), "ps lacks {k}");
    }
    let v = json(
        post(
            a,
            "/api/generate",
            &[],
            r#"{"model":"fake","keep_alive":0}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["done_reason"], "unload");
    let ps = json(get(a, "/api/ps").await).await;
    assert_eq!(ps["models"].as_array().unwrap().len(), 1);
    assert_eq!(f.max_concurrent(), 0);
}

#[tokio::test]
async fn pass_through_endpoints() {
    let f = fake(cfg(1, 1, 3)).await;
    let a = f.addr();
    let r = get(a, "/").await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/plain"));
    assert_eq!(text(r).await, "Ollama is running");
    let r = send(a, "HEAD", "/", &[], "").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-fake-upstream"), "1");
    assert_eq!(text(r).await, "");
    for m in ["GET", "HEAD"] {
        let r = send(a, m, "/api/version", &[], "").await;
        assert_eq!(r.status(), 200);
        if m == "GET" {
            assert_eq!(json(r).await, json!({"version": "0.33.0-fake"}));
        }
    }
    let r = send(a, "HEAD", "/api/tags", &[], "").await;
    assert_eq!(r.status(), 200);
    let tags = json(get(a, "/api/tags").await).await;
    let m = &tags["models"][0];
    assert_eq!(m["name"], "fake:latest");
    for k in ["model", "modified_at", "size", "digest"] {
        assert!(m.get(k).is_some(), "tags lacks {k}");
    }
    for k in [
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    ] {
        assert!(m["details"].get(k).is_some(), "details lacks {k}");
    }
    let show = json(post(a, "/api/show", &[], r#"{"model":"fake"}"#).await).await;
    assert_eq!(show["capabilities"], json!(["completion"]));
    for k in [
        "modelfile",
        "parameters",
        "template",
        "details",
        "model_info",
    ] {
        assert!(show.get(k).is_some(), "show lacks {k}");
    }
    let r = post(a, "/api/show", &[], r#"{"model":"nope"}"#).await;
    assert_eq!(r.status(), 404);

    // Pull: progress lines, then success.
    let r = post(a, "/api/pull", &[], r#"{"model":"fake"}"#).await;
    assert_eq!(header(&r, "content-type"), "application/x-ndjson");
    let lines = ndjson(&text(r).await);
    let statuses: Vec<&str> = lines
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[0], "pulling manifest");
    assert_eq!(
        &statuses[statuses.len() - 3..],
        ["verifying sha256 digest", "writing manifest", "success"]
    );
    assert_eq!(lines.len(), 1 + 3 + 3);
    assert_eq!(lines[3]["completed"], lines[3]["total"]);
    let v = json(post(a, "/api/pull", &[], r#"{"model":"fake","stream":false}"#).await).await;
    assert_eq!(v, json!({"status": "success"}));
    let lines = ndjson(&text(post(a, "/api/pull", &[], r#"{"model":"other"}"#).await).await);
    assert!(lines.last().unwrap().get("error").is_some());

    // Embeddings, native and OpenAI.
    let v = json(
        post(
            a,
            "/api/embed",
            &[],
            r#"{"model":"fake","input":["a","b c"]}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 8);
    assert_eq!(v["prompt_eval_count"], 3);
    assert!(v["total_duration"].is_u64() && v["load_duration"].is_u64());
    let v = json(
        post(
            a,
            "/api/embed",
            &[],
            r#"{"model":"fake","input":"x","dimensions":4}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 4);
    let v = json(
        post(
            a,
            "/api/embeddings",
            &[],
            r#"{"model":"fake","prompt":"x"}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["embedding"].as_array().unwrap().len(), 8);
    let v = json(
        post(
            a,
            "/v1/embeddings",
            &[],
            r#"{"model":"fake","input":["x","y"]}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][1]["object"], "embedding");
    assert_eq!(v["data"][1]["index"], 1);
    assert!(v["usage"]["prompt_tokens"].is_u64());
    let v = json(
        post(
            a,
            "/v1/embeddings",
            &[],
            r#"{"model":"fake","input":"x","encoding_format":"base64"}"#,
        )
        .await,
    )
    .await;
    assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 44);

    let v = json(get(a, "/v1/models").await).await;
    assert_eq!(v["object"], "list");
    assert_eq!(
        v["data"][0],
        json!({"id":"fake:latest","object":"model","created":1767225600u64,"owned_by":"library"})
    );
    let v = json(get(a, "/v1/models/fake:latest").await).await;
    assert_eq!(v["id"], "fake:latest");

    // Embeddings took a slot, the rest did not.
    let started: Vec<String> = f
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Started)
        .map(|e| e.path.clone())
        .collect();
    assert_eq!(
        started,
        [
            "/api/embed",
            "/api/embed",
            "/api/embeddings",
            "/v1/embeddings",
            "/v1/embeddings"
        ]
    );
}

#[tokio::test]
async fn control_endpoints() {
    let f = fake(cfg(2, 0, 2)).await;
    let a = f.addr();
    let r = post(
        a,
        "/api/generate",
        &[("x-test-tag", "t1"), ("x-priority", "realtime")],
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    text(r).await;
    let r = get(a, "/_fake/log").await;
    assert_eq!(header(&r, "x-fake-upstream"), "1");
    let log: Vec<LogEvent> = serde_json::from_str(&text(r).await).unwrap();
    assert_eq!(log, f.log());
    let kinds: Vec<EventKind> = log.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Received,
            EventKind::Queued,
            EventKind::Started,
            EventKind::FirstToken,
            EventKind::Finished
        ]
    );
    assert!(
        log.iter()
            .all(|e| e.tag.as_deref() == Some("t1") && e.priority.as_deref() == Some("realtime"))
    );
    assert!(
        log.iter()
            .all(|e| e.model == "fake" && e.path == "/api/generate")
    );
    assert_eq!(log[3].tokens, 1);
    assert_eq!(log[4].tokens, 2);
    let v = json(get(a, "/_fake/stats").await).await;
    assert_eq!(
        v,
        json!({"max_concurrent":1,"active":0,"waiting":0,"slots":2,"in_flight":0,"max_in_flight":1,"orphans":0})
    );
    let r = post(a, "/_fake/reset", &[], "").await;
    assert_eq!(r.status(), 200);
    assert!(f.log().is_empty());
    assert_eq!(f.max_concurrent(), 0);
    let v = json(get(a, "/_fake/log").await).await;
    assert_eq!(v, json!([]));
}
