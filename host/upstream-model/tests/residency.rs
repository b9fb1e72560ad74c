//! Model residency in the upstream model: the load time of a model that is
//! not loaded (one load at a time, one load for concurrent requests), the
//! limit on loaded models with the least recently used evicted, preloaded
//! models, and `/api/ps` and `/api/tags` in Ollama's shape.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use upstream_model::ModelConfig;

fn residency(load_ms: u64, max_loaded: usize, preloaded: &[&str]) -> ModelConfig {
    ModelConfig {
        load_time: Duration::from_millis(load_ms),
        max_loaded,
        preloaded: preloaded.iter().map(|s| s.to_string()).collect(),
        models: vec!["fake-a".into(), "fake-b:7b".into()],
        ..cfg(4, 1, 1)
    }
}

async fn generate(a: std::net::SocketAddr, model: &str) -> (Duration, Value) {
    let t0 = Instant::now();
    let body = format!(r#"{{"model":"{model}","prompt":"hi","stream":false}}"#);
    let v = json(post(a, "/api/generate", &[], &body).await).await;
    (t0.elapsed(), v)
}

async fn ps_names(a: std::net::SocketAddr) -> Vec<String> {
    let ps = json(get(a, "/api/ps").await).await;
    let mut v: Vec<String> = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_model_not_loaded_takes_its_load_time_once() {
    let f = fake(residency(300, 2, &["fake-hot"])).await;
    let a = f.addr();
    assert_eq!(ps_names(a).await, ["fake-hot:latest"]);
    let (t, v) = generate(a, "fake-hot").await;
    assert!(t < Duration::from_millis(200), "preloaded: {t:?}");
    assert_eq!(f.loads(), 0);
    // Two requests for a cold model at once share one load.
    let (x, y) = tokio::join!(generate(a, "fake-cold"), generate(a, "fake-cold"));
    for (t, v) in [&x, &y] {
        assert!(*t >= Duration::from_millis(300), "{t:?}");
        assert!(*t < Duration::from_millis(550), "one load, not two: {t:?}");
        // load_duration (ns) includes the load, as in Ollama.
        assert!(v["load_duration"].as_u64().unwrap() >= 300_000_000, "{v}");
    }
    assert_eq!(f.loads(), 1);
    assert!(v["load_duration"].as_u64().unwrap() < 100_000_000, "{v}");
    let (t, _) = generate(a, "fake-cold").await;
    assert!(t < Duration::from_millis(200), "loaded now: {t:?}");
}

#[tokio::test]
async fn loads_run_one_at_a_time() {
    let f = fake(residency(250, 4, &[])).await;
    let a = f.addr();
    let t0 = Instant::now();
    let (x, y) = tokio::join!(generate(a, "fake-x"), generate(a, "fake-y"));
    let (first, second) = if x.0 < y.0 { (x.0, y.0) } else { (y.0, x.0) };
    assert!(first >= Duration::from_millis(250), "{first:?}");
    assert!(second >= Duration::from_millis(500), "{second:?}");
    assert!(t0.elapsed() < Duration::from_millis(900));
    assert_eq!(f.loads(), 2);
}

#[tokio::test]
async fn past_the_limit_the_least_recently_used_model_is_evicted() {
    let f = fake(residency(20, 2, &[])).await;
    let a = f.addr();
    generate(a, "fake-1").await;
    generate(a, "fake-2").await;
    generate(a, "fake-1").await; // fake-2 is now the least recently used
    generate(a, "fake-3").await;
    assert_eq!(ps_names(a).await, ["fake-1:latest", "fake-3:latest"]);
    assert_eq!(f.loaded_models().len(), 2);
    // fake-2 must load again.
    let (t, _) = generate(a, "fake-2").await;
    assert!(t >= Duration::from_millis(20), "{t:?}");
    assert_eq!(f.loads(), 4);
    assert_eq!(ps_names(a).await, ["fake-2:latest", "fake-3:latest"]);
}

#[tokio::test]
async fn tags_and_v1_models_list_the_models_on_disk() {
    let f = fake(residency(0, 2, &[])).await;
    let a = f.addr();
    let tags = json(get(a, "/api/tags").await).await;
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fake-a:latest", "fake-b:7b"]);
    assert!(tags["models"][0]["size"].as_u64().is_some());
    let oa = json(get(a, "/v1/models").await).await;
    assert_eq!(oa["data"][1]["id"], "fake-b:7b");
    // /api/show knows the models on disk only.
    let show = post(a, "/api/show", &[], r#"{"model":"fake-b:7b"}"#).await;
    assert_eq!(show.status(), 200);
    let show = post(a, "/api/show", &[], r#"{"model":"fake-elsewhere"}"#).await;
    assert_eq!(show.status(), 404);
    // Nothing loaded until used; then /api/ps has Ollama's fields.
    assert!(ps_names(a).await.is_empty());
    generate(a, "fake-a").await;
    let ps = json(get(a, "/api/ps").await).await;
    let m = &ps["models"][0];
    for k in [
        "name",
        "model",
        "size",
        "size_vram",
        "expires_at",
        "details",
    ] {
        assert!(m.get(k).is_some(), "ps lacks {k}: {m}");
    }
}

#[tokio::test]
async fn another_num_ctx_reloads_the_model_as_ollama_does() {
    let f = fake(residency(20, 2, &["fake-a"])).await;
    let a = f.addr();
    let with_ctx = |n: Option<u64>| {
        let options = n.map_or(String::new(), |n| {
            format!(r#","options":{{"num_ctx":{n}}}"#)
        });
        format!(r#"{{"model":"fake-a","prompt":"hi","stream":false{options}}}"#)
    };
    // Preloaded with the default context: asking for it costs nothing.
    json(post(a, "/api/generate", &[], &with_ctx(Some(4096))).await).await;
    assert_eq!(f.loads(), 0);
    // Another context reloads; the same one again does not.
    let t0 = Instant::now();
    json(post(a, "/api/generate", &[], &with_ctx(Some(8192))).await).await;
    assert!(t0.elapsed() >= Duration::from_millis(20));
    json(post(a, "/api/generate", &[], &with_ctx(Some(8192))).await).await;
    assert_eq!(f.loads(), 1);
    // No num_ctx is the default context: a reload again.
    json(post(a, "/api/generate", &[], &with_ctx(None)).await).await;
    assert_eq!(f.loads(), 2);
    assert_eq!(ps_names(a).await, ["fake-a:latest"]);
}
