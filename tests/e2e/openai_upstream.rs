//! maitre in front of OpenAI-compatible servers (`kind = "openai"`): the
//! upstream model in its OpenAI-only mode (like llama-server or vLLM) serves
//! `/v1/*` through maitre, streamed and folded; `/api/*` requests are
//! answered 404 by maitre naming the backend's kind; its health comes from
//! `/health`, its models from `/v1/models`; a mixed fleet sends `/api/*`
//! only to Ollama; `pass_priority = "vllm"` writes the class into the body.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(20);

/// An OpenAI-only upstream model listing `models`.
async fn openai_model(slots: usize, token_ms: u64, models: &[&str]) -> UpstreamModel {
    UpstreamModel::start(ModelConfig {
        slots,
        token_delay: Duration::from_millis(token_ms),
        models: models.iter().map(|m| m.to_string()).collect(),
        openai_only: true,
        ..ModelConfig::default()
    })
    .await
    .expect("start an upstream model")
}

fn chat(c: &reqwest::Client, url: &str, stream: bool) -> reqwest::RequestBuilder {
    c.post(format!("{url}/v1/chat/completions")).json(&json!({
        "model": "fake", "stream": stream, "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}],
    }))
}

/// The upstream's `/api/*` requests, by path.
fn api_paths(f: &UpstreamModel) -> Vec<String> {
    f.log()
        .iter()
        .filter(|e| e.kind == EventKind::Received && e.path.starts_with("/api/"))
        .map(|e| e.path.clone())
        .collect()
}

#[tokio::test]
async fn one_openai_backend_serves_v1_and_maitre_refuses_api_naming_its_kind() {
    let f = openai_model(2, 5, &["fake"]).await;
    let m = start(
        &PolicyFile::new(f.url(), 2)
            .upstream_kind("openai", None)
            .arm(Arm::builtin("main", "fifo")),
    );
    let c = client();
    // Not streamed: folded from the stream maitre asked for.
    let r = chat(&c, &m.url, false).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-maitre-backend"], "default");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 1,
        "{v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    // Streamed: SSE to the end.
    let r = chat(&c, &m.url, true).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let streamed: Vec<bool> = f
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Received && e.path == "/v1/chat/completions")
        .map(|e| e.stream)
        .collect();
    assert_eq!(
        streamed,
        [true, true],
        "maitre asks for a stream both times"
    );
    // /api/*: maitre's own 404, in Ollama's shape, naming the kind.
    for (method, path) in [
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
    ] {
        let r = c
            .request(method.parse().unwrap(), format!("{}{path}", m.url))
            .json(&json!({"model": "fake", "prompt": "hi"}))
            .send()
            .await
            .unwrap();
        let msg = error_of(r, 404).await;
        assert!(
            msg.starts_with(&format!(
                "maitre: backend \"default\" is an OpenAI-compatible server (kind = \"openai\"): it has no {path}; use /v1/"
            )),
            "{path}: {msg}"
        );
    }
    assert!(api_paths(&f).is_empty(), "{:?}", api_paths(&f));
    assert_eq!(m.status().await["backends"][0]["kind"], "openai");
}

#[tokio::test]
async fn the_official_openai_client_works() {
    let f = openai_model(2, 2, &["fake"]).await;
    let m = start(
        &PolicyFile::new(f.url(), 2)
            .upstream_kind("openai", None)
            .arm(Arm::builtin("main", "reserved-aging")),
    );
    run_python(
        "openai_upstream.py",
        &m.url,
        &[],
        "python openai upstream ok",
    )
    .await;
}

/// A fleet of one Ollama (`ollama`, 1 slot) and one OpenAI-compatible
/// server (`llama`, 2 slots), probed and polled every 200 ms.
async fn mixed(llama_priority: Option<&str>) -> (UpstreamModel, UpstreamModel, Maitre) {
    let ollama = fake(1, 5).await;
    let llama = openai_model(2, 5, &["fake-oa"]).await;
    let mut oa = Backend::new("llama", llama.url(), 2).kind("openai");
    if let Some(p) = llama_priority {
        oa = oa.pass_priority(p);
    }
    let m = start(
        &PolicyFile::new("http://unused", 1)
            .backends([Backend::new("ollama", ollama.url(), 1), oa])
            .fleet(Fleet {
                probe_interval_ms: Some(200),
                ps_interval_ms: Some(200),
                ..Fleet::default()
            })
            .arm(Arm::builtin("main", "fifo")),
    );
    (ollama, llama, m)
}

#[tokio::test]
async fn a_mixed_fleet_sends_api_only_to_ollama() {
    let (ollama, llama, m) = mixed(None).await;
    let c = client();
    // More /api requests than Ollama has slots, with the OpenAI server idle.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let r = generate(&c, &m.url, &format!("api-{i}"), None, 3);
            tokio::spawn(async move {
                let r = r.send().await.unwrap();
                let backend = r.headers()["x-maitre-backend"]
                    .to_str()
                    .unwrap()
                    .to_string();
                (r.status().as_u16(), backend)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "ollama".to_string()));
    }
    assert!(api_paths(&llama).is_empty(), "{:?}", api_paths(&llama));
    assert_eq!(
        ollama
            .log()
            .iter()
            .filter(|e| e.kind == EventKind::Started && e.path == "/api/generate")
            .count(),
        4
    );
    // /v1 goes to either; the OpenAI server's own model goes to it.
    let r = c
        .post(format!("{}/v1/chat/completions", m.url))
        .json(&json!({"model": "fake-oa", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-maitre-backend"], "llama");
    // Merged lists: /api/tags from Ollama only, /v1/models from both.
    let tags = get_json(&c, &format!("{}/api/tags", m.url)).await;
    assert_eq!(tags["models"][0]["name"], "fake:latest", "{tags}");
    let r = c.get(format!("{}/v1/models", m.url)).send().await.unwrap();
    assert!(r.headers().get("x-maitre-backends-failed").is_none());
    let models: Value = r.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"fake-oa:latest") && ids.len() == 2,
        "{models}"
    );
    // Named on /api/*: the kind's 404.
    let r = c
        .get(format!("{}/api/tags", m.url))
        .header("x-maitre-backend", "llama")
        .send()
        .await
        .unwrap();
    let msg = error_of(r, 404).await;
    assert!(
        msg.contains("backend \"llama\" is an OpenAI-compatible server (kind = \"openai\")"),
        "{msg}"
    );
    assert!(api_paths(&llama).is_empty(), "{:?}", api_paths(&llama));
}

#[tokio::test]
async fn the_health_probe_of_an_openai_backend_is_get_health() {
    let (_ollama, llama, m) = mixed(None).await;
    // Up, with its /v1/models list, and no Ollama version.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = m.status().await;
        let b = &st["backends"][1];
        if b["available"] == json!(["fake-oa:latest"]) {
            assert_eq!(b["kind"], "openai");
            assert_eq!(b["healthy"], true, "{st}");
            assert!(b["version"].is_null(), "{st}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no model list in /status: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen: Vec<String> = llama
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Received)
        .map(|e| e.path.clone())
        .collect();
    assert!(seen.iter().any(|p| p == "/health"), "{seen:?}");
    assert!(
        seen.iter().all(|p| p == "/health" || p == "/v1/models"),
        "{seen:?}"
    );
    // Killed: the probe marks it down.
    llama.shutdown();
    let deadline = tokio::time::Instant::now() + T;
    while m.status().await["backends"][1]["healthy"] != false {
        assert!(tokio::time::Instant::now() < deadline, "never marked down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `priority` each tagged request carried upstream.
fn priorities(f: &UpstreamModel) -> Vec<(String, Option<i64>)> {
    let mut v: Vec<(String, Option<i64>)> = f
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Received && e.path.starts_with("/v1/"))
        .filter_map(|e| e.tag.clone().map(|t| (t, e.body_priority)))
        .collect();
    v.sort();
    v
}

/// One `/v1` generation of each class, streamed and not, one with a
/// priority of its own.
async fn send_classes(url: &str) {
    let c = client();
    for (tag, class, stream, own) in [
        ("batch", "batch", false, None),
        ("batch-own", "batch", true, Some(-7)),
        ("rt", "realtime", false, None),
        ("rt-stream", "realtime", true, None),
    ] {
        let mut body = json!({"model": "fake", "prompt": "hi", "max_tokens": 2, "stream": stream});
        if let Some(p) = own {
            body["priority"] = p.into();
        }
        let r = c
            .post(format!("{url}/v1/completions"))
            .header("x-test-tag", tag)
            .header("x-priority", class)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{tag}");
        let _ = r.text().await.unwrap();
    }
}

#[tokio::test]
async fn priority_reaches_the_upstream_only_when_opted_in() {
    let plain = openai_model(2, 2, &["fake"]).await;
    let vllm = openai_model(2, 2, &["fake"]).await;
    let m_plain = start(
        &PolicyFile::new(plain.url(), 2)
            .upstream_kind("openai", None)
            .arm(Arm::builtin("main", "reserved-aging")),
    );
    let m_vllm = start(
        &PolicyFile::new(vllm.url(), 2)
            .upstream_kind("openai", Some("vllm"))
            .arm(Arm::builtin("main", "reserved-aging")),
    );
    send_classes(&m_plain.url).await;
    send_classes(&m_vllm.url).await;
    // Off: bodies pass as the client wrote them.
    assert_eq!(
        priorities(&plain),
        [
            ("batch".into(), None),
            ("batch-own".into(), Some(-7)),
            ("rt".into(), None),
            ("rt-stream".into(), None),
        ]
    );
    // On: vLLM's convention, lower first: real-time 0, batch 1, the
    // client's own replaced.
    assert_eq!(
        priorities(&vllm),
        [
            ("batch".into(), Some(1)),
            ("batch-own".into(), Some(1)),
            ("rt".into(), Some(0)),
            ("rt-stream".into(), Some(0)),
        ]
    );
}

/// A batch `/v1` request (not streamed, long) pre-empted by a real-time one
/// on a 1-slot llama-like upstream that frees a cancelled generation's slot
/// 300 ms after closing its connection; returns the most generations the
/// upstream held at once.
async fn preempt_on_a_slow_releasing_engine(busy_check: Option<&str>) -> usize {
    let f = UpstreamModel::start(ModelConfig {
        slots: 1,
        token_delay: Duration::from_millis(10),
        models: vec!["fake".into()],
        openai_only: true,
        release_lag: Duration::from_millis(300),
        ..ModelConfig::default()
    })
    .await
    .expect("start an upstream model");
    let mut policy = PolicyFile::new(f.url(), 1)
        .upstream_kind("openai", None)
        .arm(Arm::builtin("main", "preemptive").config("max_wait_ms", 0));
    if let Some(check) = busy_check {
        policy = policy.busy_check(check);
    }
    let m = start(&policy);
    let c = client();
    let batch = c
        .post(format!("{}/v1/chat/completions", m.url))
        .header("x-priority", "batch")
        .json(&json!({"model": "fake", "max_tokens": 300,
            "messages": [{"role": "user", "content": "long"}]}))
        .send();
    let batch = tokio::spawn(batch);
    assert!(
        f.wait_until(T, |log| log.iter().any(|e| e.kind == EventKind::Started))
            .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rt = chat(&c, &m.url, true)
        .header("x-priority", "realtime")
        .send()
        .await
        .unwrap();
    assert_eq!(rt.status(), 200);
    let text = rt.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let b = batch.await.unwrap().unwrap();
    assert_eq!(
        b.status(),
        200,
        "the pre-empted batch request is answered after all"
    );
    let st = m.status().await;
    assert_eq!(st["arms"][0]["fallback"], false, "{st}");
    f.stats().max_in_flight
}

#[tokio::test]
async fn busy_check_keeps_a_slow_releasing_engine_within_its_slots() {
    // Without the check maitre frees the slot when the connection closes,
    // and the real-time request queues inside the engine beside the
    // cancelled generation that still holds the slot.
    assert_eq!(preempt_on_a_slow_releasing_engine(None).await, 2);
    // With it, maitre waits until /slots shows the slot free.
    assert_eq!(
        preempt_on_a_slow_releasing_engine(Some("llama-server")).await,
        1
    );
    // Or until /metrics (llama-server's `llamacpp:requests_processing`)
    // does.
    assert_eq!(preempt_on_a_slow_releasing_engine(Some("metrics")).await, 1);
}
