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

/// A llama-like upstream that notices a client's departure only `notice`
/// later, generating on meanwhile.
async fn slow_to_let_go(notice: Duration) -> UpstreamModel {
    UpstreamModel::start(ModelConfig {
        slots: 2,
        token_delay: Duration::from_millis(20),
        ignore_disconnect_non_streaming: true,
        disconnect_notice: notice,
        ..ModelConfig::default()
    })
    .await
    .expect("start the upstream model")
}

/// Two batch requests hold both slots, a real-time one pre-empts one of
/// them; returns the upstream's log once every answer is in.
async fn preempt_one_of_two(fake: &UpstreamModel, streaming: bool) -> Vec<LogEvent> {
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(
                Arm::builtin("main", "preemptive")
                    .config("preempt_streaming", streaming)
                    .config("default_class", "batch")
                    .config("max_preemptions", 2),
            )
            .limits(Limits {
                max_preemptions: Some(2),
                ..Limits::default()
            }),
    );
    let c = client();
    let batch = |tag: &str| {
        c.post(format!("{}/api/generate", m.url))
            .header("x-test-tag", tag)
            .header("x-priority", "batch")
            .json(
                &serde_json::json!({"model": "fake", "prompt": "hi", "stream": streaming,
                "options": {"num_predict": 50}}),
            )
            .send()
    };
    let b1 = tokio::spawn(batch("b1"));
    fake.wait_for("b1", EventKind::FirstToken, T).await.unwrap();
    let b2 = tokio::spawn(batch("b2"));
    fake.wait_for("b2", EventKind::FirstToken, T).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let rt = generate(&c, &m.url, "rt", Some("realtime"), 3)
        .send()
        .await
        .unwrap();
    assert_eq!(rt.status(), 200);
    let rt: serde_json::Value = rt.json().await.unwrap();
    assert_eq!(rt["eval_count"], 3);
    for b in [b1, b2] {
        let r = b.await.unwrap().unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    assert!(
        m.wait_log(T, |l| l.contains("pre-empted")).await,
        "{:#?}",
        m.logs()
    );
    fake.log()
}

/// The victim's cancel at the upstream, and the real-time request's start.
fn cancel_then_start(log: &[LogEvent]) -> (LogEvent, LogEvent) {
    let cancelled = log
        .iter()
        .find(|e| e.kind == EventKind::Cancelled)
        .unwrap_or_else(|| panic!("nothing was stopped upstream: {log:#?}"))
        .clone();
    let rt = log
        .iter()
        .find(|e| e.kind == EventKind::Started && e.tag.as_deref() == Some("rt"))
        .unwrap()
        .clone();
    (cancelled, rt)
}

#[tokio::test]
async fn a_preempted_slot_is_free_only_once_a_slow_upstream_lets_go() {
    let fake = slow_to_let_go(Duration::from_millis(300)).await;
    let log = preempt_one_of_two(&fake, false).await;
    let (cancelled, rt) = cancel_then_start(&log);
    assert!(
        rt.seq > cancelled.seq,
        "the real-time request started before the victim let go: {log:#?}"
    );
    let stats = fake.stats();
    assert!(
        stats.max_in_flight <= 2,
        "{} generations in flight at the upstream on 2 slots: {log:#?}",
        stats.max_in_flight
    );
}

#[tokio::test]
async fn a_cut_stream_frees_its_slot_only_once_a_slow_upstream_lets_go() {
    let fake = slow_to_let_go(Duration::from_millis(300)).await;
    let log = preempt_one_of_two(&fake, true).await;
    let (cancelled, rt) = cancel_then_start(&log);
    assert!(rt.seq > cancelled.seq, "{log:#?}");
    assert!(fake.stats().max_in_flight <= 2, "{log:#?}");
}
