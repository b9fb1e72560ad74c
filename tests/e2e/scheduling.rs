//! Scheduling through the real binary: order, reservation, aging,
//! cancellation and the slot bound, asserted on what reached the fake Ollama.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn realtime_is_dispatched_ahead_of_earlier_batch() {
    let fake = fake(2, 20).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
    );
    let c = client();
    let mut tasks = Vec::new();
    // A batch flood: b0 takes the shared slot, b1..b5 wait.
    for i in 0..6 {
        let tag = format!("b{i}");
        tasks.push(tokio::spawn(
            generate(&c, &m.url, &tag, Some("batch"), 15).send(),
        ));
        fake.wait_until(T, |l| {
            l.iter().filter(|e| e.kind == EventKind::Received).count() >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fake.wait_for("b0", EventKind::Started, T).await.unwrap();
    // rt0 takes the reserved slot at once; rt1 must wait for a slot...
    tasks.push(tokio::spawn(
        generate(&c, &m.url, "rt0", Some("realtime"), 30).send(),
    ));
    fake.wait_for("rt0", EventKind::Started, T)
        .await
        .expect("rt0 uses the reserved slot");
    tasks.push(tokio::spawn(
        generate(&c, &m.url, "rt1", Some("RT"), 5).send(),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...and gets the shared slot when b0 ends, ahead of b1..b5 that came first.
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    let log = fake.log();
    let order = start_order(&log);
    let pos = |t: &str| order.iter().position(|x| x == t).unwrap();
    assert!(pos("rt1") < pos("b1"), "start order {order:?}");
    // Batch never used the reserved slot: at most one batch ran at a time.
    let mut batch_running = 0i32;
    for e in &log {
        let batch = e.tag.as_deref().is_some_and(|t| t.starts_with('b'));
        match e.kind {
            EventKind::Started if batch => batch_running += 1,
            EventKind::Finished | EventKind::Cancelled if batch => batch_running -= 1,
            _ => {}
        }
        assert!(
            batch_running <= 1,
            "two batch requests ran at once: {order:?}"
        );
    }
    assert!(fake.max_concurrent() <= 2);
}

/// Returns the start order of "b-aged" and "rt-late" in a scenario where a
/// batch request has waited 0.8 s when the shared slot frees, and a realtime
/// request arrived later; the reserved slot is busy throughout.
async fn aging_scenario(boost: f64) -> Vec<String> {
    let fake = fake(2, 50).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2).arm(
            Arm::builtin("main", "reserved-aging")
                .config("rt_reserved_slots", 1)
                .config("aging_threshold_seconds", 0.3)
                .config("aging_boost", boost),
        ),
    );
    let c = client();
    let hold_shared = tokio::spawn(generate(&c, &m.url, "b-hold", Some("batch"), 20).send());
    fake.wait_for("b-hold", EventKind::Started, T)
        .await
        .unwrap();
    let hold_reserved = tokio::spawn(generate(&c, &m.url, "rt-hold", Some("realtime"), 40).send());
    fake.wait_for("rt-hold", EventKind::Started, T)
        .await
        .unwrap();
    let aged = tokio::spawn(generate(&c, &m.url, "b-aged", Some("batch"), 1).send());
    tokio::time::sleep(Duration::from_millis(450)).await;
    let late = tokio::spawn(generate(&c, &m.url, "rt-late", Some("realtime"), 1).send());
    for t in [hold_shared, hold_reserved, aged, late] {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    start_order(&fake.log())
}

#[tokio::test]
async fn aged_batch_overtakes_realtime_only_with_aging() {
    // 0.8 s waited = 2 thresholds: priority 0 + 2 × 0.6 = 1.2 > realtime's 1.0.
    let with = aging_scenario(0.6).await;
    let pos = |o: &[String], t: &str| o.iter().position(|x| x == t).unwrap();
    assert!(pos(&with, "b-aged") < pos(&with, "rt-late"), "{with:?}");
    // Without aging, the later realtime request goes first.
    let without = aging_scenario(0.0).await;
    assert!(
        pos(&without, "rt-late") < pos(&without, "b-aged"),
        "{without:?}"
    );
}

#[tokio::test]
async fn disconnect_while_waiting_never_reaches_upstream() {
    let fake = fake(1, 20).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let hold = tokio::spawn(generate(&c, &m.url, "hold", None, 25).send());
    fake.wait_for("hold", EventKind::Started, T).await.unwrap();
    let gone = tokio::spawn(generate(&c, &m.url, "gone", None, 5).send());
    tokio::time::sleep(Duration::from_millis(150)).await;
    gone.abort();
    let _ = gone.await;
    let after = generate(&c, &m.url, "after", None, 2).send().await.unwrap();
    assert_eq!(after.status(), 200);
    assert_eq!(hold.await.unwrap().unwrap().status(), 200);
    let log = fake.log();
    assert!(
        seq_of(&log, "gone", EventKind::Received).is_none(),
        "the abandoned request reached the upstream"
    );
    assert!(
        m.wait_log(T, |l| l.contains("request ended")
            && l.contains("outcome=\"cancelled\""))
            .await,
        "the abandoned request is logged as cancelled"
    );
    let ended = |m: &Maitre| {
        m.logs()
            .iter()
            .filter(|l| l.contains("request ended"))
            .count()
    };
    assert!(m.wait_log(T, |_| ended(&m) >= 3).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ended(&m), 3, "one line per request");
}

#[tokio::test]
async fn disconnect_while_running_cancels_upstream_and_starts_the_next() {
    let fake = fake(1, 20).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let resp = c
        .post(format!("{}/api/generate", m.url))
        .header("x-test-tag", "long")
        .json(&serde_json::json!({"model": "fake", "prompt": "x", "options": {"num_predict": 500}}))
        .send()
        .await
        .unwrap();
    let next = tokio::spawn(generate(&c, &m.url, "next", None, 2).send());
    fake.wait_until(T, |l| seq_of(l, "long", EventKind::FirstToken).is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(resp); // the client goes away mid-stream
    assert_eq!(next.await.unwrap().unwrap().status(), 200);
    let log = fake.log();
    let cancelled = log
        .iter()
        .find(|e| e.kind == EventKind::Cancelled && e.tag.as_deref() == Some("long"))
        .expect("the upstream generation was cancelled");
    assert!(cancelled.tokens < 500, "it was cut short");
    let started = log
        .iter()
        .find(|e| e.kind == EventKind::Started && e.tag.as_deref() == Some("next"))
        .unwrap();
    assert!(started.seq > cancelled.seq, "next started after the cancel");
    // The slot went on at once (generous bound: this is not a benchmark).
    assert!(
        started.at - cancelled.at < Duration::from_millis(500),
        "{:?}",
        started.at - cancelled.at
    );
    assert!(fake.max_concurrent() <= 1);
}

#[tokio::test]
async fn slots_are_never_overrun_and_every_request_is_answered() {
    let fake = fake(2, 2).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
    );
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let p = if i % 5 == 0 { "rt" } else { "be" };
        let stream = i % 2 == 0;
        let req = c
            .post(format!("{}/api/chat", m.url))
            .header("x-priority", p)
            .header("x-test-tag", format!("r{i}"))
            .json(&serde_json::json!({"model": "fake", "stream": stream, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}}));
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().text().await.unwrap()
        }));
    }
    for t in tasks {
        let body = t.await.unwrap();
        assert!(body.contains("\"done\":true"), "{body}");
    }
    let log = fake.log();
    assert_eq!(
        log.iter().filter(|e| e.kind == EventKind::Finished).count(),
        40
    );
    assert!(
        fake.max_concurrent() <= 2,
        "upstream saw {} at once",
        fake.max_concurrent()
    );
    assert_eq!(fake.stats().waiting, 0);
}

#[tokio::test]
async fn each_request_gets_one_structured_log_line() {
    let fake = fake(2, 1).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging")));
    let c = client();
    let r = generate(&c, &m.url, "x", Some("high"), 2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    assert!(m.wait_log(T, |l| l.contains("request ended")).await);
    let line = m
        .logs()
        .into_iter()
        .find(|l| l.contains("request ended"))
        .unwrap();
    for field in [
        "arm=main",
        "class=\"realtime\"",
        "path=/api/generate",
        "model=fake",
        "queue_ms=",
        "upstream_ttfb_ms=",
        "client_ttfb_ms=",
        "total_ms=",
        "outcome=\"ok\"",
    ] {
        assert!(line.contains(field), "missing {field} in {line}");
    }
}

#[tokio::test]
async fn all_slots_reserved_is_refused_with_an_explanation() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.toml");
    let all_reserved = |slots| {
        PolicyFile::new("http://127.0.0.1:1", slots)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1))
    };
    all_reserved(1).write(&f);
    for cmd in [
        vec!["check", f.to_str().unwrap()],
        vec!["serve", "--policy", f.to_str().unwrap()],
    ] {
        let out = std::process::Command::new(BIN).args(&cmd).output().unwrap();
        assert!(!out.status.success(), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("p.toml")
                && err.contains("rt_reserved_slots")
                && err.contains("batch requests could never run"),
            "{err}"
        );
    }
    let zero_slots = all_reserved(0);
    zero_slots.write(&f);
    let out = std::process::Command::new(BIN)
        .args(["check", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let slots_line = 1 + zero_slots
        .to_toml()
        .lines()
        .position(|l| l == "slots = 0")
        .expect("a slots line");
    assert!(
        err.contains(&format!("p.toml:{slots_line}: upstream.slots")),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .args(["check", "examples/policy.toml"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// fair-share: a tenant that floods the queue does not starve another.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_serves_a_late_tenant_between_a_floods_requests() {
    let fake = fake(1, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .tenant_header("X-Tenant")
            .arm(Arm::builtin("fair", "fair-share")),
    );
    let c = client();
    let send = |tag: String, tenant: &'static str| {
        generate(&c, &m.url, &tag, None, 5)
            .header("x-tenant", tenant)
            .send()
    };
    // Tenant a queues 8 requests; once they wait, tenant b sends 2.
    let flood: Vec<_> = (0..8).map(|i| send(format!("a{i}"), "a")).collect();
    let flood = futures_util::future::join_all(flood);
    let late = async {
        for _ in 0..200 {
            if m.status().await["requests"].as_array().unwrap().len() == 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        futures_util::future::join_all([send("b0".into(), "b"), send("b1".into(), "b")]).await
    };
    let (a, b) = tokio::join!(flood, late);
    assert!(a.into_iter().chain(b).all(|r| r.unwrap().status() == 200));
    let order = start_order(&fake.log());
    let pos = |t: &str| order.iter().position(|x| x == t).unwrap();
    // FIFO would start b0 ninth; fair share starts it right after the
    // requests of a already running or next in line.
    assert!(pos("b0") <= 3, "{order:?}");
    assert!(pos("b1") <= 5, "{order:?}");
}
