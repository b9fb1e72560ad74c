//! Ollama transparency: every endpoint works through maitre as it does direct.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::StreamExt;

#[tokio::test]
async fn root_version_tags_ps_show_pass_through() {
    let fake = fake(2, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
    );
    let c = client();

    let head = c.head(format!("{}/", m.url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let root = c.get(format!("{}/", m.url)).send().await.unwrap();
    assert_eq!(root.status(), 200);
    assert_eq!(
        root.headers().get("x-fake-upstream").unwrap(),
        "1",
        "response headers pass through"
    );
    assert_eq!(root.text().await.unwrap(), "Ollama is running");

    for path in ["/api/version", "/api/tags", "/api/ps", "/v1/models"] {
        let direct = get_json(&c, &format!("{}{path}", fake.url())).await;
        let via = c.get(format!("{}{path}", m.url)).send().await.unwrap();
        assert_eq!(via.status(), 200, "{path}");
        assert!(
            via.headers().get("x-maitre-arm").is_none(),
            "{path} is not scheduled"
        );
        let via: serde_json::Value = via.json().await.unwrap();
        if path != "/api/ps" {
            assert_eq!(via, direct, "{path}");
        } else {
            assert!(via.get("models").is_some());
        }
    }
    let show = c
        .post(format!("{}/api/show", m.url))
        .json(&serde_json::json!({"model": "fake"}))
        .send()
        .await
        .unwrap();
    assert_eq!(show.status(), 200);
    let show: serde_json::Value = show.json().await.unwrap();
    assert!(show.get("capabilities").is_some(), "{show}");
    // Passthrough never takes a slot.
    assert!(fake.log().iter().all(|e| e.kind != EventKind::Started));
}

#[tokio::test]
async fn host_is_rewritten_and_headers_pass_through() {
    let fake = fake(2, 5).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging")));
    let c = client();
    // Direct with a foreign Host, the fake (like Ollama on loopback) refuses.
    let direct = c
        .get(format!("{}/api/version", fake.url()))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 403);
    let via = c
        .get(format!("{}/_fake/echo", m.url))
        .header("host", "example.com")
        .header("x-custom", "kept")
        .header("authorization", "Bearer abc")
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), 200);
    let echo: serde_json::Value = via.json().await.unwrap();
    let text = echo.to_string();
    assert!(
        text.contains(&fake.addr().to_string()),
        "Host rewritten to the upstream: {text}"
    );
    assert!(
        text.contains("kept") && text.contains("Bearer abc"),
        "{text}"
    );
}

#[tokio::test]
async fn ndjson_streams_token_by_token() {
    let fake = fake(2, 60).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging")));
    let c = client();
    let resp = c
        .post(format!("{}/api/generate", m.url))
        .json(&serde_json::json!({"model": "fake", "prompt": "hi", "options": {"num_predict": 6}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/x-ndjson")
    );
    assert_eq!(resp.headers().get("x-maitre-arm").unwrap(), "main");
    let q: f64 = resp
        .headers()
        .get("x-maitre-queue-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(q >= 0.0);
    let mut arrivals = Vec::new();
    let mut body = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        arrivals.push(Instant::now());
        body.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "6 tokens and a done chunk: {text}");
    assert_eq!(lines.last().unwrap()["done"], true);
    // Not buffered: the chunks arrived spread over the generation time
    // (6 tokens × 60 ms), not all at the end.
    assert!(arrivals.len() >= 5, "got {} reads", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(200),
        "chunks arrived within {spread:?}"
    );
}

#[tokio::test]
async fn non_streaming_and_embeddings_match_direct() {
    let fake = fake(2, 1).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging")));
    let c = client();
    for (path, body) in [
        (
            "/api/chat",
            serde_json::json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": false}),
        ),
        (
            "/api/embed",
            serde_json::json!({"model": "fake", "input": ["a", "b"]}),
        ),
        (
            "/api/embeddings",
            serde_json::json!({"model": "fake", "prompt": "a"}),
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": "fake", "input": "a"}),
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let via = c
            .post(format!("{}{path}", m.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(via.status(), 200, "{path}");
        assert!(
            via.headers().get("x-maitre-arm").is_some(),
            "{path} is scheduled"
        );
        let via: serde_json::Value = via.json().await.unwrap();
        let direct: serde_json::Value = c
            .post(format!("{}{path}", fake.url()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let keys =
            |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(&via), keys(&direct), "{path}: {via}");
    }
}

#[tokio::test]
async fn openai_sse_stream_ends_with_done() {
    let fake = fake(2, 10).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging")));
    let resp = client()
        .post(format!("{}/v1/chat/completions", m.url))
        .json(&serde_json::json!({"model": "fake", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.matches("data: ").count() >= 6, "{text}");
}

#[tokio::test]
async fn pull_streams_progress() {
    let fake = fake(2, 10).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging")));
    let text = client()
        .post(format!("{}/api/pull", m.url))
        .json(&serde_json::json!({"model": "fake"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "success");
    assert!(text.lines().count() >= 4, "{text}");
}

#[tokio::test]
async fn upstream_down_is_a_quick_502_in_ollama_shape() {
    // A port nobody listens on: bind, learn it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = start(
        &PolicyFile::new(format!("http://127.0.0.1:{port}"), 2)
            .arm(Arm::builtin("main", "reserved-aging")),
    );
    let c = client();
    for path in ["/api/tags", "/api/generate"] {
        let t = Instant::now();
        let r = c
            .post(format!("{}{path}", m.url))
            .json(&serde_json::json!({"model": "fake", "prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{path}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("unreachable"), "{v}");
    }
    // The slot was given back: a second scheduled request is answered too.
    let r = generate(&c, &m.url, "again", None, 1).send().await.unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn malformed_json_is_answered_by_ollama_without_a_slot() {
    let fake = fake(1, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    for body in ["{not json", "", "[1,2]", r#"{"prompt":"no model"}"#] {
        let r = c
            .post(format!("{}/api/generate", m.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body:?}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{v}");
    }
    // Nothing was left holding a slot.
    let r = generate(&c, &m.url, "ok", None, 2).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn queue_full_is_503_with_retry_after() {
    let fake = fake(1, 50).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .limits(Limits {
                max_waiting: Some(1),
                retry_after_seconds: Some(7),
                ..Limits::default()
            })
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let running = tokio::spawn(generate(&c, &m.url, "r", None, 20).send());
    fake.wait_for("r", EventKind::Started, Duration::from_secs(5))
        .await
        .unwrap();
    let waiting = tokio::spawn(generate(&c, &m.url, "w", None, 1).send());
    // Until "w" is queued, a third request might still be admitted; wait for it.
    let status_has_waiting = async {
        for _ in 0..200 {
            let s = m.status().await;
            if s["waiting"] == 1 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    assert!(status_has_waiting.await);
    let full = generate(&c, &m.url, "full", None, 1).send().await.unwrap();
    assert_eq!(full.status(), 503);
    assert_eq!(full.headers().get("retry-after").unwrap(), "7");
    let v: serde_json::Value = full.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("max_waiting"), "{v}");
    assert_eq!(running.await.unwrap().unwrap().status(), 200);
    assert_eq!(waiting.await.unwrap().unwrap().status(), 200);
    assert!(seq_of(&fake.log(), "full", EventKind::Received).is_none());
}
