//! Pre-emption end to end, through the real binary with `builtin:preemptive`
//! on 2 slots: asserted on the order of the fake Ollama's log, on what every
//! client received, and on maitre's metrics.

use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(20);

/// A `builtin:preemptive` policy on 2 slots, with extra `[policy.config]`
/// keys and an optional `[limits] max_preemptions`.
fn preemptive(
    upstream: &str,
    config: toml::Table,
    host_max_preemptions: Option<u64>,
) -> PolicyFile {
    let p = PolicyFile::new(upstream, 2).arm(Arm::builtin("main", "preemptive").configs(config));
    match host_max_preemptions {
        Some(n) => p.limits(Limits {
            max_preemptions: Some(n),
            ..Limits::default()
        }),
        None => p,
    }
}

/// A streaming `/api/generate`.
fn generate_stream(
    c: &reqwest::Client,
    base: &str,
    tag: &str,
    priority: &str,
    tokens: u64,
) -> reqwest::RequestBuilder {
    c.post(format!("{base}/api/generate"))
        .header("x-test-tag", tag)
        .header("x-priority", priority)
        .json(&serde_json::json!({"model": "fake", "prompt": "hi", "stream": true, "options": {"num_predict": tokens}}))
}

/// What a client got back.
#[derive(Debug)]
struct Answer {
    status: u16,
    preempted: Option<String>,
    /// NDJSON lines (one object for a non-streamed answer).
    lines: Vec<serde_json::Value>,
}

impl Answer {
    fn last(&self) -> &serde_json::Value {
        self.lines.last().expect("at least one line")
    }
    /// The generated text, over all lines.
    fn text(&self) -> String {
        self.lines
            .iter()
            .filter_map(|l| l["response"].as_str())
            .collect()
    }
}

/// Reads a whole response, keeping the NDJSON lines.
async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let preempted = resp
        .headers()
        .get("x-maitre-preempted")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {text}")))
        .collect();
    Answer {
        status,
        preempted,
        lines,
    }
}

/// Reads a stream whose first line the caller already took.
async fn rest_of_stream(
    first: Vec<u8>,
    mut s: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> Vec<serde_json::Value> {
    let mut body = first;
    while let Some(chunk) = s.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {text}")))
        .collect()
}

/// Starts a streaming request and returns once its first chunk reached the
/// client (so maitre knows it is streaming); a task finishes reading it.
async fn streaming_started(
    req: reqwest::RequestBuilder,
) -> tokio::task::JoinHandle<Vec<serde_json::Value>> {
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let first = s.next().await.expect("a first chunk").unwrap().to_vec();
    tokio::spawn(rest_of_stream(first, s))
}

fn count(log: &[LogEvent], tag: &str, kind: EventKind) -> usize {
    log.iter()
        .filter(|e| e.kind == kind && e.tag.as_deref() == Some(tag))
        .count()
}

/// Asserts that `victim`'s (first) generation was cancelled and that the next
/// generation to start upstream, at once, was `rt`'s.
fn assert_handoff(log: &[LogEvent], victim: &str, rt: &str) {
    let cancelled = seq_of(log, victim, EventKind::Cancelled)
        .unwrap_or_else(|| panic!("{victim} was not cancelled upstream: {log:#?}"));
    let next_start = log
        .iter()
        .find(|e| e.kind == EventKind::Started && e.seq > cancelled)
        .unwrap_or_else(|| panic!("nothing started after the cancel: {log:#?}"));
    assert_eq!(
        next_start.tag.as_deref(),
        Some(rt),
        "the first request started after {victim}'s cancel was not {rt}: {log:#?}"
    );
    assert!(
        seq_of(log, rt, EventKind::Started).unwrap() > cancelled,
        "{rt} started before {victim} was cancelled: {log:#?}"
    );
}

#[tokio::test]
async fn preempted_batch_is_answered_in_full_and_realtime_takes_its_slot() {
    let fake = fake(2, 20).await;
    let m = start(&preemptive(&fake.url(), toml::Table::new(), None));
    let c = client();
    let b1 = tokio::spawn(generate(&c, &m.url, "b1", Some("batch"), 40).send());
    fake.wait_for("b1", EventKind::Started, T).await.unwrap();
    let b2 = tokio::spawn(generate(&c, &m.url, "b2", Some("batch"), 40).send());
    // Both slots hold batch work that has produced tokens.
    fake.wait_for("b2", EventKind::FirstToken, T).await.unwrap();
    fake.wait_for("b1", EventKind::FirstToken, T).await.unwrap();

    let rt = generate_stream(&c, &m.url, "rt", "realtime", 5)
        .send()
        .await
        .unwrap();
    let rt = answer(rt).await;
    assert_eq!(rt.status, 200);
    assert_eq!(rt.preempted, None);
    assert_eq!(rt.lines.len(), 6, "5 tokens and done: {rt:?}");
    assert_eq!(rt.last()["done"], true);

    let b1 = answer(b1.await.unwrap().unwrap()).await;
    let b2 = answer(b2.await.unwrap().unwrap()).await;
    let log = fake.log();
    // The victim is the one with the least work: b2 started later.
    assert_handoff(&log, "b2", "rt");
    assert_eq!(count(&log, "b1", EventKind::Cancelled), 0, "{log:#?}");
    assert_eq!(count(&log, "b2", EventKind::Started), 2, "{log:#?}");
    let thrown = log
        .iter()
        .find(|e| e.kind == EventKind::Cancelled && e.tag.as_deref() == Some("b2"))
        .unwrap()
        .tokens;
    assert!(
        (1..40).contains(&thrown),
        "b2 was cut mid-generation: {thrown}"
    );

    // The victim's client never noticed, except for the header.
    for (b, preempted) in [(&b1, None), (&b2, Some("1"))] {
        assert_eq!(b.status, 200, "{b:?}");
        assert_eq!(b.preempted.as_deref(), preempted, "{b:?}");
        assert_eq!(b.lines.len(), 1, "one JSON object: {b:?}");
        assert_eq!(b.last()["done"], true, "{b:?}");
        assert_eq!(b.last()["eval_count"], 40, "{b:?}");
        let text = b.text();
        let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
        assert_eq!(text, expected);
    }
    assert!(fake.max_concurrent() <= 2);

    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.sum("maitre_preemptions_total", &[("arm", "main")]),
        1.0,
        "{metrics}"
    );
    assert!(
        m.wait_log(T, |l| l.contains("pre-empted")
            && l.contains("class=\"batch\""))
            .await,
        "a pre-empted line is logged: {:#?}",
        m.logs()
    );
}

#[tokio::test]
async fn streaming_requests_are_never_cut_by_default() {
    let fake = fake(2, 20).await;
    let m = start(&preemptive(&fake.url(), toml::Table::new(), None));
    let c = client();
    let b1 = streaming_started(generate_stream(&c, &m.url, "b1", "batch", 30)).await;
    let b2 = streaming_started(generate_stream(&c, &m.url, "b2", "batch", 30)).await;
    let rt = generate_stream(&c, &m.url, "rt", "realtime", 3)
        .send()
        .await
        .unwrap();
    let rt = answer(rt).await;
    assert_eq!(rt.status, 200);
    assert_eq!(rt.last()["done"], true);
    for b in [b1, b2] {
        let lines = b.await.unwrap();
        assert_eq!(lines.len(), 31, "30 tokens and done: {lines:?}");
        assert_eq!(lines.last().unwrap()["done"], true);
        assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");
    }
    let log = fake.log();
    assert_eq!(
        log.iter()
            .filter(|e| e.kind == EventKind::Cancelled)
            .count(),
        0,
        "{log:#?}"
    );
    // The real-time request waited for a batch stream to finish.
    let first_finish = log
        .iter()
        .find(|e| e.kind == EventKind::Finished)
        .unwrap()
        .seq;
    assert!(seq_of(&log, "rt", EventKind::Started).unwrap() > first_finish);
    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.sum("maitre_preemptions_total", &[]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("maitre_plugin_invalid_actions_total", &[]),
        0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_policy_that_opts_in_cuts_a_stream_with_an_error_line() {
    let fake = fake(2, 20).await;
    let m = start(&preemptive(
        &fake.url(),
        toml::toml! { preempt_streaming = true },
        None,
    ));
    let c = client();
    let b1 = streaming_started(generate_stream(&c, &m.url, "b1", "batch", 60)).await;
    let b2 = streaming_started(generate_stream(&c, &m.url, "b2", "batch", 60)).await;
    let rt = generate_stream(&c, &m.url, "rt", "realtime", 3)
        .send()
        .await
        .unwrap();
    let rt = answer(rt).await;
    assert_eq!(rt.status, 200);
    assert_eq!(rt.last()["done"], true);
    let (l1, l2) = (b1.await.unwrap(), b2.await.unwrap());
    let log = fake.log();
    let cut: Vec<&str> = ["b1", "b2"]
        .into_iter()
        .filter(|t| count(&log, t, EventKind::Cancelled) > 0)
        .collect();
    assert_eq!(cut.len(), 1, "exactly one stream was cut: {log:#?}");
    let (victim, kept) = if cut[0] == "b1" { (l1, l2) } else { (l2, l1) };
    assert_handoff(&log, cut[0], "rt");
    // The cut stream ends with an Ollama-style error line, never with done.
    let last = victim.last().unwrap();
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("pre-empted")),
        "{victim:?}"
    );
    assert!(victim.iter().all(|l| l["done"] != true), "{victim:?}");
    assert!(victim.len() < 61, "{victim:?}");
    // The other one completes.
    assert_eq!(kept.len(), 61, "{kept:?}");
    assert_eq!(kept.last().unwrap()["done"], true);
    // A cut stream is not retried: it started upstream exactly once.
    assert_eq!(count(&log, cut[0], EventKind::Started), 1);

    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.sum("maitre_preemptions_total", &[("arm", "main")]),
        1.0,
        "{metrics}"
    );
    assert!(
        metrics.sum(
            "maitre_requests_total",
            &[
                ("arm", "main"),
                ("class", "batch"),
                ("outcome", "cancelled")
            ]
        ) == 1.0,
        "{metrics}"
    );
    assert!(
        m.wait_log(T, |l| l.contains("pre-empted")
            && l.contains("cut_stream=true"))
            .await
    );
}

#[tokio::test]
async fn a_cut_closes_the_upstream_at_once_not_at_the_next_token() {
    // Tokens 2 s apart: a cut noticed only when the next token arrives
    // would let the fake produce a second one before it sees the cancel.
    let fake = fake(2, 20).await;
    let m = start(&preemptive(
        &fake.url(),
        toml::toml! { preempt_streaming = true },
        None,
    ));
    let c = client();
    let slow = |tag: &str| {
        generate_stream(&c, &m.url, tag, "batch", 100).header("x-fake-token-ms", "2000")
    };
    let (b1, b2) = tokio::join!(streaming_started(slow("b1")), streaming_started(slow("b2")));
    let rt = generate_stream(&c, &m.url, "rt", "realtime", 2)
        .send()
        .await
        .unwrap();
    let rt = answer(rt).await;
    assert_eq!(rt.last()["done"], true);
    let log = fake.log();
    let victim = ["b1", "b2"]
        .into_iter()
        .find(|t| count(&log, t, EventKind::Cancelled) > 0)
        .unwrap_or_else(|| panic!("no stream was cut: {log:#?}"));
    assert_handoff(&log, victim, "rt");
    let cancelled = log
        .iter()
        .find(|e| e.kind == EventKind::Cancelled && e.tag.as_deref() == Some(victim))
        .unwrap();
    assert_eq!(
        cancelled.tokens, 1,
        "the upstream kept generating after the cut: {log:#?}"
    );
    let (cut, kept) = if victim == "b1" { (b1, b2) } else { (b2, b1) };
    let lines = cut.await.unwrap();
    assert_eq!(lines.len(), 2, "one token, then the error line: {lines:?}");
    assert!(lines[1]["error"].is_string(), "{lines:?}");
    kept.abort();
}

/// Batch request "b" holds one slot, a long real-time request the other
/// (never a victim). Real-time requests arrive one after another, each once b
/// has produced a token again. With a bound of `n`, the first `n` of them
/// pre-empt b and the next one waits for b to finish; b still completes.
async fn bound_scenario(plugin_max: u32, host_max: Option<u64>, n: usize) {
    let fake = fake(2, 20).await;
    let config = toml::Table::from_iter([("max_preemptions".to_string(), plugin_max.into())]);
    let m = start(&preemptive(&fake.url(), config, host_max));
    let c = client();
    // Outlasts everything below; aborted at the end.
    let hold = tokio::spawn(generate(&c, &m.url, "hold", Some("realtime"), 1000).send());
    fake.wait_for("hold", EventKind::Started, T).await.unwrap();
    let b = tokio::spawn(generate(&c, &m.url, "b", Some("batch"), 30).send());
    for k in 0..=n {
        // b's current attempt has done some work.
        assert!(
            fake.wait_until(T, |l| count(l, "b", EventKind::FirstToken)
                > count(l, "b", EventKind::Cancelled))
                .await
        );
        let tag = format!("rt{k}");
        let before = fake.log().len();
        let r = generate(&c, &m.url, &tag, Some("realtime"), 2)
            .send()
            .await
            .unwrap();
        let r = answer(r).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.last()["eval_count"], 2);
        let log = fake.log();
        if k < n {
            assert_handoff(&log[before..], "b", &tag);
        } else {
            // At the bound, b is no longer a victim: rt waits for its slot.
            assert!(
                seq_of(&log, &tag, EventKind::Started).unwrap()
                    > seq_of(&log, "b", EventKind::Finished).unwrap(),
                "{tag} pre-empted b beyond the bound of {n}: {log:#?}"
            );
        }
    }
    let b = answer(b.await.unwrap().unwrap()).await;
    assert_eq!(b.status, 200);
    assert_eq!(b.preempted.as_deref(), Some(n.to_string().as_str()));
    assert_eq!(b.last()["done"], true);
    assert_eq!(b.last()["eval_count"], 30);
    let log = fake.log();
    assert_eq!(count(&log, "b", EventKind::Cancelled), n, "{log:#?}");
    assert_eq!(count(&log, "b", EventKind::Started), n + 1, "{log:#?}");
    assert_eq!(count(&log, "b", EventKind::Finished), 1, "{log:#?}");
    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.sum("maitre_preemptions_total", &[("arm", "main")]),
        n as f64,
        "{metrics}"
    );
    assert_eq!(
        metrics.sum("maitre_plugin_invalid_actions_total", &[]),
        0.0,
        "{metrics}"
    );
    hold.abort();
}

#[tokio::test]
async fn host_bound_on_preemptions_holds_and_the_batch_request_completes() {
    // The plugin would allow 5; the host's [limits] allows 1.
    bound_scenario(5, Some(1), 1).await;
}

#[tokio::test]
async fn plugin_bound_on_preemptions_holds_and_the_batch_request_completes() {
    // The host would allow 5; the plugin's max_preemptions allows 2.
    bound_scenario(2, Some(5), 2).await;
}

#[tokio::test]
async fn example_preemptive_policy_passes_check() {
    let out = std::process::Command::new(BIN)
        .args(["check", "examples/preemptive.toml"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A non-streaming chat of `tokens` tokens, tagged.
fn chat(
    c: &reqwest::Client,
    base: &str,
    tag: &str,
    path: &str,
    tokens: u64,
) -> reqwest::RequestBuilder {
    let body = if path == "/api/chat" {
        serde_json::json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
            "stream": false, "options": {"num_predict": tokens}})
    } else {
        serde_json::json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens})
    };
    c.post(format!("{base}{path}"))
        .header("x-test-tag", tag)
        .header("x-priority", "batch")
        .json(&body)
}

/// The tokens the upstream made for `tag`, over all its generations:
/// those of cancelled ones and of the finished one.
fn made(log: &[LogEvent], tag: &str) -> u64 {
    log.iter()
        .filter(|e| e.tag.as_deref() == Some(tag))
        .filter(|e| matches!(e.kind, EventKind::Cancelled | EventKind::Finished))
        .map(|e| e.tokens)
        .sum()
}

/// With `resume_preempted`, a pre-empted chat continues its answer so far:
/// the client gets the answer an uninterrupted generation gives, and the
/// upstream makes each token once.
async fn resumed(path: &str) {
    let fake = fake(2, 20).await;
    let mut rule = toml::Table::new();
    rule.insert("resume_preempted".into(), true.into());
    let m = start(&preemptive(&fake.url(), toml::Table::new(), None).model_rule("fake", rule));
    let c = client();
    let b1 = tokio::spawn(chat(&c, &m.url, "b1", path, 40).send());
    fake.wait_for("b1", EventKind::FirstToken, T).await.unwrap();
    let b2 = tokio::spawn(chat(&c, &m.url, "b2", path, 40).send());
    fake.wait_for("b2", EventKind::FirstToken, T).await.unwrap();
    // b2 has made a few tokens when the real-time request takes its slot.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rt = answer(
        generate_stream(&c, &m.url, "rt", "realtime", 5)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(rt.status, 200);
    let b1 = b1.await.unwrap().unwrap();
    let b2 = b2.await.unwrap().unwrap();
    let (s1, s2) = (b1.status().as_u16(), b2.status().as_u16());
    let p2 = b2
        .headers()
        .get("x-maitre-preempted")
        .map(|v| v.to_str().unwrap().to_string());
    let (b1, b2): (serde_json::Value, serde_json::Value) =
        (b1.json().await.unwrap(), b2.json().await.unwrap());
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(p2.as_deref(), Some("1"), "b2 was pre-empted: {b2}");
    let log = fake.log();
    let thrown = log
        .iter()
        .find(|e| e.kind == EventKind::Cancelled && e.tag.as_deref() == Some("b2"))
        .unwrap_or_else(|| panic!("b2 was not cancelled upstream: {log:#?}"))
        .tokens;
    assert!((1..40).contains(&thrown), "cut mid-generation: {thrown}");
    let metrics = Scrape::get(&m.admin).await;
    let kept = metrics.sum("maitre_resumed_tokens_total", &[("arm", "main")]) as u64;
    // maitre keeps what reached it; a token still on its way when the
    // connection closed is the only one made twice.
    assert!(
        kept >= 1 && thrown - kept <= 1,
        "kept {kept} of {thrown}: {metrics}"
    );
    // Each token made once: the resumed generation made the rest.
    assert_eq!(made(&log, "b2"), 40 + thrown - kept, "{log:#?}");
    // The A/B report counts the pre-emption, and no token thrown away.
    let ab = m.ab().await;
    let batch = ab["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["class"] == "batch")
        .unwrap_or_else(|| panic!("a batch row: {ab}"));
    assert_eq!(batch["preemptions"], 1, "{ab}");
    assert_eq!(batch["preempted_tokens"], 0, "{ab}");
    let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
    for b in [&b1, &b2] {
        if path == "/api/chat" {
            assert_eq!(b["message"]["content"], expected.as_str(), "{b}");
            assert_eq!(b["message"]["role"], "assistant", "{b}");
            assert_eq!(b["eval_count"], 40, "{b}");
            assert_eq!(b["done_reason"], "length", "{b}");
        } else {
            assert_eq!(
                b["choices"][0]["message"]["content"],
                expected.as_str(),
                "{b}"
            );
            assert_eq!(b["usage"]["completion_tokens"], 40, "{b}");
            assert_eq!(b["choices"][0]["finish_reason"], "length", "{b}");
        }
    }
}

#[tokio::test]
async fn a_preempted_native_chat_of_a_resumable_model_continues_its_answer() {
    resumed("/api/chat").await;
}

#[tokio::test]
async fn a_preempted_openai_chat_of_a_resumable_model_continues_its_answer() {
    resumed("/v1/chat/completions").await;
}

#[tokio::test]
async fn without_resume_a_preempted_chat_starts_over() {
    let fake = fake(2, 20).await;
    let m = start(&preemptive(&fake.url(), toml::Table::new(), None));
    let c = client();
    let b1 = tokio::spawn(chat(&c, &m.url, "b1", "/api/chat", 40).send());
    fake.wait_for("b1", EventKind::FirstToken, T).await.unwrap();
    let b2 = tokio::spawn(chat(&c, &m.url, "b2", "/api/chat", 40).send());
    fake.wait_for("b2", EventKind::FirstToken, T).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rt = generate_stream(&c, &m.url, "rt", "realtime", 5)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(rt).await.status, 200);
    let b2: serde_json::Value = b2.await.unwrap().unwrap().json().await.unwrap();
    b1.await.unwrap().unwrap();
    let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
    assert_eq!(b2["message"]["content"], expected.as_str(), "{b2}");
    // The tokens before the pre-emption were made twice.
    assert!(made(&fake.log(), "b2") > 40);
}
