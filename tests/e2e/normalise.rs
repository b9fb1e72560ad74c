//! `[models."NAME"]` normalisation: clients that disagree on `num_ctx` make
//! Ollama reload a model for each change (the upstream model does the same:
//! another context reloads it). With a rule, maitre writes the model's
//! `num_ctx` and `keep_alive` into every request, and the model stays
//! loaded.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// One upstream model with `fake-a` loaded (at the default context) and a
/// load time long enough to see.
async fn upstream() -> UpstreamModel {
    UpstreamModel::start(ModelConfig {
        slots: 2,
        models: vec!["fake-a".into()],
        preloaded: vec!["fake-a".into()],
        load_time: Duration::from_millis(150),
        max_loaded: 2,
        ..ModelConfig::default()
    })
    .await
    .expect("start an upstream model")
}

/// Three clients one after another, each with its own idea of the context
/// and of how long to keep the model.
async fn three_clients(url: &str) {
    let c = reqwest::Client::new();
    let bodies = [
        json!({"model": "fake-a", "prompt": "hi", "stream": false,
            "options": {"num_ctx": 2048, "num_predict": 2}, "keep_alive": "1m"}),
        json!({"model": "fake-a", "messages": [{"role": "user", "content": "hi"}], "stream": false,
            "options": {"num_predict": 2, "num_ctx": 8192}}),
        json!({"model": "fake-a:latest", "prompt": "hi", "stream": false, "options": {"num_predict": 2}}),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let path = if i == 1 { "/api/chat" } else { "/api/generate" };
        let r = c
            .post(format!("{url}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["done"], true, "{v}");
    }
}

#[tokio::test]
async fn without_a_rule_every_change_of_context_reloads_the_model() {
    let fake = upstream().await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "fifo")));
    three_clients(&m.url).await;
    assert_eq!(
        fake.loads(),
        3,
        "2048, 8192, then the default: three reloads"
    );
}

#[tokio::test]
async fn a_rule_keeps_one_context_and_the_model_loaded() {
    let fake = upstream().await;
    let mut rule = toml::Table::new();
    rule.insert("num_ctx".into(), 4096.into());
    rule.insert("keep_alive".into(), "30m".into());
    let policy = PolicyFile::new(fake.url(), 2)
        .arm(Arm::builtin("main", "fifo"))
        .model_rule("fake-a", rule);
    let m = start(&policy);
    three_clients(&m.url).await;
    assert_eq!(
        fake.loads(),
        0,
        "every request asked for the context it is loaded with"
    );
    // keep_alive "30m" came through, not the client's "1m".
    let ps: Value = reqwest::get(format!("{}/api/ps", fake.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expires = ps["models"][0]["expires_at"].as_str().unwrap().to_string();
    let left = jiff::Timestamp::now()
        .until(expires.parse::<jiff::Timestamp>().unwrap())
        .unwrap()
        .total(jiff::Unit::Minute)
        .unwrap();
    assert!((25.0..=31.0).contains(&left), "expires in {left} min: {ps}");
    let scrape = Scrape::get(&m.admin).await;
    assert_eq!(scrape.sum("maitre_normalised_requests_total", &[]), 3.0);
}
