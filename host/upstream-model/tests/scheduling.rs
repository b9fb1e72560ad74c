//! Timing, slots, the FIFO queue and cancellation, over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use upstream_model::{EventKind, LogEvent};

fn events<'a>(log: &'a [LogEvent], tag: &str) -> Vec<&'a LogEvent> {
    log.iter()
        .filter(|e| e.tag.as_deref() == Some(tag))
        .collect()
}

fn find(log: &[LogEvent], tag: &str, kind: EventKind) -> Option<LogEvent> {
    log.iter()
        .find(|e| e.tag.as_deref() == Some(tag) && e.kind == kind)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_streams_one_chunk_per_token_over_time() {
    let f = fake(cfg(1, 60, 4)).await;
    let t0 = Instant::now();
    let r = post(
        f.addr(),
        "/api/generate",
        &[],
        r#"{"model":"fake","prompt":"hi there"}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/x-ndjson");
    assert_eq!(header(&r, "transfer-encoding"), "chunked");
    assert_eq!(header(&r, "x-fake-upstream"), "1");
    let frames = frames(r, t0).await;
    // 4 tokens and the done chunk, each in its own frame.
    assert_eq!(frames.len(), 5, "{frames:?}");
    for (_, b) in &frames {
        assert!(b.ends_with(b"\n") && b.iter().filter(|&&c| c == b'\n').count() == 1);
    }
    // Tokens arrive ~60 ms apart, not all at once.
    for w in frames[..4].windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            gap >= Duration::from_millis(40),
            "gap {gap:?} in {frames:?}"
        );
    }
    let body: String = frames
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    let lines = ndjson(&body);
    assert_eq!(lines[0]["response"], "tok0 ");
    assert_eq!(lines[0]["done"], false);
    assert_eq!(lines[0]["model"], "fake");
    let last = &lines[4];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["eval_count"], 4);
    assert_eq!(last["prompt_eval_count"], 2);
    let eval_ns = last["eval_duration"].as_u64().unwrap();
    assert!(eval_ns >= 200_000_000, "eval_duration {eval_ns}");
    assert!(last["total_duration"].as_u64().unwrap() >= eval_ns);
    for k in ["load_duration", "prompt_eval_duration"] {
        assert!(last[k].is_u64(), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_headers_before_the_first_token() {
    let f = fake(cfg(1, 30, 2)).await;
    let t0 = Instant::now();
    let r = post(
        f.addr(),
        "/api/chat",
        &[("x-fake-prompt-ms", "250")],
        r#"{"model":"fake","messages":[{"role":"user","content":"hello"}]}"#,
    )
    .await;
    let headers_at = t0.elapsed();
    assert!(
        headers_at >= Duration::from_millis(270),
        "headers after {headers_at:?}"
    );
    let body = text(r).await;
    let lines = ndjson(&body);
    assert_eq!(lines[0]["message"]["role"], "assistant");
    assert_eq!(lines[0]["message"]["content"], "tok0 ");
    assert_eq!(lines[2]["done"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_bound_concurrency_and_the_queue_is_fifo() {
    let f = fake(cfg(2, 25, 3)).await;
    let addr = f.addr();
    let mut tasks = vec![];
    for i in 0..7 {
        let tag = format!("r{i}");
        let t = tag.clone();
        tasks.push(tokio::spawn(async move {
            let r = post(
                addr,
                "/api/generate",
                &[("x-test-tag", &t)],
                r#"{"model":"fake:latest","prompt":"x"}"#,
            )
            .await;
            text(r).await
        }));
        // Make the arrival order certain before sending the next one.
        assert!(
            f.wait_for(&tag, EventKind::Queued, 5 * SECOND)
                .await
                .is_some()
        );
    }
    for t in tasks {
        let body = t.await.unwrap();
        assert_eq!(ndjson(&body).last().unwrap()["done"], true);
    }
    assert_eq!(f.max_concurrent(), 2);
    let log = f.log();
    let starts: Vec<_> = log
        .iter()
        .filter(|e| e.kind == EventKind::Started)
        .map(|e| e.tag.clone().unwrap())
        .collect();
    assert_eq!(
        starts,
        ["r0", "r1", "r2", "r3", "r4", "r5", "r6"],
        "{log:#?}"
    );
    // Replaying the log never shows more than two generating at once.
    let mut active = 0i32;
    for e in &log {
        match e.kind {
            EventKind::Started => active += 1,
            // Every request here gets a slot, so every end frees one.
            EventKind::Finished | EventKind::Cancelled | EventKind::Failed => active -= 1,
            _ => {}
        }
        assert!((0..=2).contains(&active), "active {active} at {e:?}");
    }
    // seq is gap-free and time never goes backwards.
    for w in log.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1);
        assert!(w[1].at >= w[0].at);
    }
    let s = f.stats();
    assert_eq!((s.active, s.waiting, s.slots), (0, 0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_cancels_and_frees_the_slot() {
    // Tokens 300 ms apart: the cancel must be seen long before the next
    // token would be written.
    let f = fake(cfg(1, 300, 50)).await;
    let mut s = raw_post(
        f.addr(),
        "/api/generate",
        "X-Test-Tag: leaver\r\nX-Priority: batch\r\n",
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    read_until(&mut s, "tok0 ").await;
    // A second request queues behind it.
    let addr = f.addr();
    let next = tokio::spawn(async move {
        let r = post(
            addr,
            "/api/generate",
            &[("x-test-tag", "next"), ("x-fake-tokens", "2")],
            r#"{"model":"fake","prompt":"x","stream":false}"#,
        )
        .await;
        json(r).await
    });
    assert!(
        f.wait_for("next", EventKind::Queued, 5 * SECOND)
            .await
            .is_some()
    );
    assert_eq!(f.stats().waiting, 1);
    let t_drop = Instant::now();
    drop(s);
    let cancelled = f
        .wait_for("leaver", EventKind::Cancelled, 5 * SECOND)
        .await
        .expect("Cancelled logged");
    let noticed = t_drop.elapsed();
    assert!(
        noticed < Duration::from_millis(100),
        "noticed after {noticed:?}"
    );
    assert!((1..50).contains(&cancelled.tokens), "{cancelled:?}");
    assert_eq!(cancelled.priority.as_deref(), Some("batch"));
    assert!(find(&f.log(), "leaver", EventKind::Finished).is_none());
    // The slot went straight to the waiting request.
    let started = f
        .wait_for("next", EventKind::Started, 5 * SECOND)
        .await
        .unwrap();
    assert!(started.seq > cancelled.seq);
    let handoff = started.at - cancelled.at;
    assert!(
        handoff < Duration::from_millis(20),
        "handoff took {handoff:?}"
    );
    let v = next.await.unwrap();
    assert_eq!(v["eval_count"], 2);
    assert_eq!(f.stats().active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_while_queued_or_in_prompt_cancels() {
    let f = fake(cfg(1, 20, 25)).await;
    let addr = f.addr();
    let holder = tokio::spawn(async move {
        let r = post(
            addr,
            "/api/generate",
            &[("x-test-tag", "holder")],
            r#"{"model":"fake","prompt":"x"}"#,
        )
        .await;
        text(r).await
    });
    assert!(
        f.wait_for("holder", EventKind::Started, 5 * SECOND)
            .await
            .is_some()
    );

    // Queued: never gets a slot.
    let s = raw_post(
        addr,
        "/api/generate",
        "X-Test-Tag: queued\r\n",
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    assert!(
        f.wait_for("queued", EventKind::Queued, 5 * SECOND)
            .await
            .is_some()
    );
    assert_eq!(f.stats().waiting, 1);
    drop(s);
    let c = f
        .wait_for("queued", EventKind::Cancelled, 5 * SECOND)
        .await
        .expect("cancelled");
    assert_eq!(c.tokens, 0);
    assert_eq!(f.stats().waiting, 0);
    assert!(find(&f.log(), "queued", EventKind::Started).is_none());
    holder.await.unwrap();

    // In the prompt delay: has the slot, no token yet, no headers sent.
    let s = raw_post(
        addr,
        "/v1/chat/completions",
        "X-Test-Tag: prefill\r\nX-Fake-Prompt-Ms: 5000\r\n",
        r#"{"model":"fake","messages":[{"role":"user","content":"x"}],"stream":true}"#,
    )
    .await;
    assert!(
        f.wait_for("prefill", EventKind::Started, 5 * SECOND)
            .await
            .is_some()
    );
    assert_eq!(f.stats().active, 1);
    drop(s);
    let c = f
        .wait_for("prefill", EventKind::Cancelled, 5 * SECOND)
        .await
        .expect("cancelled");
    assert_eq!(c.tokens, 0);
    assert_eq!(f.stats().active, 0);
    let evs: Vec<_> = events(&f.log(), "prefill").iter().map(|e| e.kind).collect();
    assert_eq!(
        evs,
        [
            EventKind::Received,
            EventKind::Queued,
            EventKind::Started,
            EventKind::Cancelled
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_after_sends_an_error_line_and_no_done() {
    let f = fake(cfg(1, 5, 10)).await;
    let r = post(
        f.addr(),
        "/api/generate",
        &[("x-fake-fail-after", "3"), ("x-test-tag", "f")],
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    let lines = ndjson(&text(r).await);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3], serde_json::json!({"error": "fake failure"}));
    assert!(lines.iter().all(|l| l["done"] != true));
    let failed = find(&f.log(), "f", EventKind::Failed).expect("Failed logged");
    assert_eq!(failed.tokens, 3);
    assert_eq!(f.stats().active, 0);

    // Failing before the first token: a real status.
    let r = post(
        f.addr(),
        "/api/chat",
        &[("x-fake-fail-after", "0")],
        r#"{"model":"fake","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status(), 500);
    assert_eq!(json(r).await["error"], "fake failure");

    // Through /v1: an empty chunk, then EOF without [DONE].
    let r = post(
        f.addr(),
        "/v1/chat/completions",
        &[("x-fake-fail-after", "2")],
        r#"{"model":"fake","messages":[{"role":"user","content":"x"}],"stream":true}"#,
    )
    .await;
    let events = sse(&text(r).await);
    assert_eq!(events.len(), 3);
    assert!(!events.iter().any(|e| e == "[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_still_takes_token_time() {
    let f = fake(cfg(1, 40, 5)).await;
    let t0 = Instant::now();
    let r = post(
        f.addr(),
        "/api/generate",
        &[],
        r#"{"model":"fake","prompt":"x","stream":false}"#,
    )
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(190));
    assert_eq!(
        header(&r, "content-type"),
        "application/json; charset=utf-8"
    );
    let v = json(r).await;
    assert_eq!(v["response"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(v["done"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_delays_are_fast() {
    let f = fake(cfg(2, 0, 5)).await;
    let t0 = Instant::now();
    for _ in 0..200 {
        let r = post(
            f.addr(),
            "/api/generate",
            &[],
            r#"{"model":"fake","prompt":"x"}"#,
        )
        .await;
        let lines = ndjson(&text(r).await);
        assert_eq!(lines.len(), 6);
    }
    let per = t0.elapsed() / 200;
    assert!(per < Duration::from_millis(10), "{per:?} per request");
}
