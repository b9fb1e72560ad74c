//! maitre always streams from the upstream: a non-streaming request is sent
//! upstream as a streaming one, its progress counts while it runs, and its
//! pre-emption closes a stream, which stops even an engine that lets
//! non-streaming generations run on without their client (llama-server,
//! modelled by the upstream model's llama-like mode).

use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(20);

/// The tokens `/status` shows for the one request tagged by its path, once
/// it shows at least `at_least` (or after `T`).
async fn running_tokens(m: &Maitre, at_least: u64) -> u64 {
    let end = Instant::now() + T;
    loop {
        let s = m.status().await;
        let most = s["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "running")
            .filter_map(|r| r["tokens"].as_u64())
            .max()
            .unwrap_or(0);
        if most >= at_least || Instant::now() > end {
            return most;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_non_streaming_request_streams_upstream_and_shows_its_progress() {
    let fake = fake(2, 30).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "fifo")));
    let c = client();
    let req = tokio::spawn(generate(&c, &m.url, "whole", None, 40).send());
    let seen = running_tokens(&m, 3).await;
    assert!(
        seen >= 3,
        "/status showed {seen} tokens for a running non-streaming request"
    );
    let r = req.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["done"], true);
    assert_eq!(v["eval_count"], 40);
    let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
    assert_eq!(v["response"], expected);
    let received = fake
        .wait_for("whole", EventKind::Received, T)
        .await
        .unwrap();
    assert!(received.stream, "the upstream was not asked for a stream");
}

#[tokio::test]
async fn embeddings_and_streaming_requests_reach_the_upstream_as_they_are() {
    let fake = fake(2, 5).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "fifo")));
    let c = client();
    let r = c
        .post(format!("{}/api/embed", m.url))
        .header("x-test-tag", "embed")
        .json(&serde_json::json!({"model": "fake", "input": ["a"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v1/chat/completions", m.url))
        .header("x-test-tag", "sse")
        .json(
            &serde_json::json!({"model": "fake", "stream": true, "max_tokens": 2,
            "messages": [{"role": "user", "content": "x"}]}),
        )
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    // No usage chunk the client did not ask for.
    assert!(!body.contains("\"usage\""), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let log = fake.log();
    let received = |tag: &str| {
        log.iter()
            .find(|e| e.kind == EventKind::Received && e.tag.as_deref() == Some(tag))
            .unwrap()
            .clone()
    };
    assert!(!received("embed").stream);
    assert!(received("sse").stream);
}

/// The `tokens_thrown_away` of maitre's `pre-empted` log line.
fn thrown_away(logs: &[String]) -> Vec<u64> {
    logs.iter()
        .filter(|l| l.contains("pre-empted"))
        .filter_map(|l| {
            let rest = &l[l.find("tokens_thrown_away=")? + "tokens_thrown_away=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test]
async fn a_preempted_non_streaming_request_stops_a_llama_like_upstream() {
    let fake = llama_like(2, 20).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("main", "preemptive").config("default_class", "batch")),
    );
    let c = client();
    let b1 = tokio::spawn(generate(&c, &m.url, "b1", Some("batch"), 60).send());
    fake.wait_for("b1", EventKind::Started, T).await.unwrap();
    let b2 = tokio::spawn(generate(&c, &m.url, "b2", Some("batch"), 60).send());
    fake.wait_for("b2", EventKind::FirstToken, T).await.unwrap();
    // Both have done some work (about 5 tokens more) by now.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let rt = generate(&c, &m.url, "rt", Some("realtime"), 3)
        .send()
        .await
        .unwrap();
    assert_eq!(rt.status(), 200);
    let rt: serde_json::Value = rt.json().await.unwrap();
    assert_eq!(rt["eval_count"], 3);
    let (b1, b2) = (b1.await.unwrap().unwrap(), b2.await.unwrap().unwrap());
    let victim = if b1.headers().contains_key("x-maitre-preempted") {
        "b1"
    } else {
        "b2"
    };
    for b in [b1, b2] {
        assert_eq!(b.status(), 200);
        let v: serde_json::Value = b.json().await.unwrap();
        assert_eq!(v["eval_count"], 60, "{v}");
    }

    let log = fake.log();
    assert!(
        log.iter().all(|e| e.kind != EventKind::Orphaned),
        "a pre-empted generation ran on at the upstream: {log:#?}"
    );
    let cancelled = log
        .iter()
        .find(|e| e.kind == EventKind::Cancelled && e.tag.as_deref() == Some(victim))
        .unwrap_or_else(|| panic!("{victim} was not stopped upstream: {log:#?}"));
    let stats = fake.stats();
    assert!(
        stats.max_in_flight <= 2,
        "{} generations in flight at the upstream on 2 slots: {log:#?}",
        stats.max_in_flight
    );
    // maitre saw the victim's tokens, and the upstream made at most two
    // more before it stopped.
    let thrown = thrown_away(&m.logs());
    assert_eq!(thrown.len(), 1, "{:#?}", m.logs());
    assert!(thrown[0] >= 1, "{thrown:?}");
    assert!(
        cancelled.tokens <= thrown[0] + 2,
        "the upstream generated {} tokens, maitre had seen {}",
        cancelled.tokens,
        thrown[0]
    );
    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.sum("maitre_preempted_tokens_total", &[("arm", "main")]),
        thrown[0] as f64,
        "{metrics}"
    );
}
