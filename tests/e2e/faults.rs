//! Upstream faults, hostile or broken clients, and graceful shutdown: every
//! request gets a defined answer and nothing stalls the scheduler.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(20);

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Sends raw bytes and reads until the server closes or `timeout`.
fn raw(url: &str, bytes: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr(url)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn upstream_busy_goes_back_to_the_queue() {
    let fake = fake(1, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    // The fake answers 503 "server busy" once, then serves.
    let r = generate(&c, &m.url, "busy-once", None, 3)
        .header("x-fake-status", "503")
        .header("x-fake-status-times", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["done"], true);
    let log = fake.log();
    let received = log
        .iter()
        .filter(|e| e.kind == EventKind::Received && e.tag.as_deref() == Some("busy-once"))
        .count();
    assert_eq!(received, 2, "one 503, one retry");
    // Always busy: after a bounded number of retries the 503 reaches the client
    // in Ollama's own words.
    let r = generate(&c, &m.url, "busy-always", None, 3)
        .header("x-fake-status", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("server busy"), "{v}");
    let tries = fake
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Received && e.tag.as_deref() == Some("busy-always"))
        .count();
    assert!((2..=5).contains(&tries), "{tries} tries");
    let metrics = c
        .get(format!("{}/metrics", m.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("maitre_upstream_busy_retries_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_first_byte_times_out_with_504_and_frees_the_slot() {
    let fake = fake(1, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .first_byte_timeout_seconds(1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let t = Instant::now();
    let r = generate(&c, &m.url, "slow", None, 1)
        .header("x-fake-prompt-ms", "4000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(t.elapsed() < Duration::from_secs(4));
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("first_byte_timeout_seconds"),
        "{v}"
    );
    // The upstream request was abandoned and the slot is free again.
    assert!(
        fake.wait_for("slow", EventKind::Cancelled, T)
            .await
            .is_some()
    );
    assert_eq!(
        generate(&c, &m.url, "next", None, 1)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn upstream_dropping_mid_stream_gives_an_error_line_and_frees_the_slot() {
    let fake = fake(1, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let r = c
        .post(format!("{}/api/generate", m.url))
        .header("x-fake-drop-after", "2")
        .header("x-test-tag", "drop")
        .json(&serde_json::json!({"model": "fake", "prompt": "x", "options": {"num_predict": 10}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // At least the first token, then maitre's error line (the fake may lose
    // its last unflushed token when it aborts the connection).
    assert!((2..=3).contains(&lines.len()), "{text}");
    assert!(
        lines.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("upstream connection lost"),
        "{text}"
    );
    assert!(lines.iter().all(|l| l["done"] != true));
    // A mid-stream error line from Ollama itself passes through as is.
    let r = c
        .post(format!("{}/api/chat", m.url))
        .header("x-fake-fail-after", "1")
        .json(&serde_json::json!({"model": "fake", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.lines().last().unwrap().contains("\"error\""), "{text}");
    assert_eq!(
        generate(&c, &m.url, "after", None, 1)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        m.wait_log(T, |l| l.contains("request ended")
            && l.contains("upstream_error"))
            .await
    );
}

// Multi-threaded: the raw-socket helpers block, and the fake runs in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_defined_answers_and_stall_nobody() {
    let fake = fake(2, 5).await;
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .limits(Limits {
                max_body_bytes: Some(2048),
                body_read_timeout_seconds: Some(1),
                header_read_timeout_seconds: Some(1),
                ..Limits::default()
            })
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
    );
    let c = client();

    // Too large a body: 413 in Ollama's shape.
    let big = serde_json::json!({"model": "fake", "prompt": "x".repeat(5000)});
    let r = c
        .post(format!("{}/api/generate", m.url))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("max_body_bytes"));

    // Half a body, then silence: 408 after the body timeout, while others are served.
    let url = m.url.clone();
    let half = std::thread::spawn(move || {
        raw(
            &url,
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":\"fa",
            Duration::from_secs(10),
        )
    });
    // Headers that never end: the connection is closed.
    let url = m.url.clone();
    let slow_headers = std::thread::spawn(move || {
        let t = Instant::now();
        let out = raw(
            &url,
            b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            Duration::from_secs(10),
        );
        (out, t.elapsed())
    });
    for i in 0..5 {
        let r = generate(&c, &m.url, &format!("ok{i}"), None, 2)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "a stalled client stalled others");
    }
    let half = half.join().unwrap();
    assert!(half.starts_with("HTTP/1.1 408"), "{half}");
    assert!(half.contains("body_read_timeout_seconds"), "{half}");
    let (out, took) = slow_headers.join().unwrap();
    assert!(
        took < Duration::from_secs(8),
        "slow headers held the socket {took:?}: {out}"
    );

    // HTTP/1.0, a chunked upload and two pipelined requests.
    let body = r#"{"model":"fake","prompt":"hi","stream":false,"options":{"num_predict":2}}"#;
    let http10 = raw(
        &m.url,
        format!("POST /api/generate HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        T,
    );
    assert!(http10.starts_with("HTTP/1.0 200"), "{http10}");
    assert!(http10.contains("\"done\":true"), "{http10}");
    let chunked = raw(
        &m.url,
        format!(
            "POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        T,
    );
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert!(chunked.contains("\"done\":true"), "{chunked}");
    let one = format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let two = "GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let piped = raw(&m.url, format!("{one}{two}").as_bytes(), T);
    assert_eq!(piped.matches("HTTP/1.1 200").count(), 2, "{piped}");
    assert!(
        piped.find("\"done\":true").unwrap() < piped.find("0.33.0-fake").unwrap(),
        "answers in order: {piped}"
    );

    // Missing model, unknown path, malformed JSON: answered, never a hang.
    let r = c
        .post(format!("{}/api/chat", m.url))
        .json(&serde_json::json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c.get(format!("{}/api/nope", m.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/v1/chat/completions", m.url))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(fake.max_concurrent() <= 2);
}

#[tokio::test]
async fn sigterm_finishes_running_answers_waiting_and_exits() {
    let fake = fake(1, 20).await;
    let mut m = start(
        &PolicyFile::new(fake.url(), 1)
            .limits(Limits {
                retry_after_seconds: Some(3),
                ..Limits::default()
            })
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let running = tokio::spawn(generate(&c, &m.url, "running", None, 40).send());
    fake.wait_for("running", EventKind::Started, T)
        .await
        .unwrap();
    let waiting = tokio::spawn(generate(&c, &m.url, "waiting", None, 2).send());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let url = m.url.clone();
    let status = tokio::task::spawn_blocking(move || m.terminate());
    let w = waiting.await.unwrap().unwrap();
    assert_eq!(w.status(), 503);
    assert_eq!(w.headers().get("retry-after").unwrap(), "3");
    assert!(w.text().await.unwrap().contains("shutting down"));
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["done"], true, "the running request finished in full");
    assert!(status.await.unwrap().success());
    assert!(
        TcpStream::connect(addr(&url)).is_err(),
        "no longer accepting"
    );
    assert!(seq_of(&fake.log(), "waiting", EventKind::Received).is_none());
}

fn kinds_of(log: &[LogEvent], tag: &str) -> Vec<EventKind> {
    log.iter()
        .filter(|e| e.tag.as_deref() == Some(tag))
        .map(|e| e.kind)
        .collect()
}

#[tokio::test]
async fn a_kept_alive_connection_the_upstream_hangs_up_on_is_retried_transparently() {
    let fake = fake(1, 5).await;
    let m = start(&PolicyFile::new(fake.url(), 1).arm(Arm::builtin("main", "fifo")));
    let c = client();
    // The first request leaves a kept-alive connection in maitre's pool.
    let r = generate(&c, &m.url, "first", None, 2).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    // The upstream closes it just as maitre sends the next request on it.
    for stream in [false, true] {
        let tag = format!("reused-{stream}");
        let r = c
            .post(format!("{}/api/generate", m.url))
            .header("x-test-tag", &tag)
            .header("x-fake-hang-up-reused", "1")
            .json(
                &serde_json::json!({"model": "fake", "prompt": "x", "stream": stream,
                "options": {"num_predict": 3}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{tag}");
        let text = r.text().await.unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["eval_count"], 3, "{tag}: {text}");
        let log = fake.log();
        let kinds = kinds_of(&log, &tag);
        assert_eq!(
            kinds[..2],
            [EventKind::Received, EventKind::Failed],
            "{tag}: the upstream did not hang up first: {log:#?}"
        );
        assert_eq!(kinds.last(), Some(&EventKind::Finished), "{log:#?}");
    }
    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.get_exact("maitre_upstream_lost_retries_total", &[]),
        Some(2.0),
        "{metrics}"
    );
    assert!(
        m.wait_log(T, |l| l.contains("request requeued")
            && l.contains("connection closed before message completed"))
            .await,
        "{:#?}",
        m.logs()
    );
}

#[tokio::test]
async fn a_stream_lost_while_folding_is_retried_twice_then_fails() {
    let fake = fake(1, 5).await;
    let m = start(&PolicyFile::new(fake.url(), 1).arm(Arm::builtin("main", "fifo")));
    let r = client()
        .post(format!("{}/api/generate", m.url))
        .header("x-test-tag", "lost")
        .header("x-fake-drop-after", "2")
        .json(
            &serde_json::json!({"model": "fake", "prompt": "x", "stream": false,
            "options": {"num_predict": 10}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("broke off"), "{v}");
    let log = fake.log();
    let started = kinds_of(&log, "lost")
        .iter()
        .filter(|k| **k == EventKind::Started)
        .count();
    assert_eq!(started, 3, "one attempt and two retries: {log:#?}");
    let metrics = Scrape::get(&m.admin).await;
    assert_eq!(
        metrics.get_exact("maitre_upstream_lost_retries_total", &[]),
        Some(2.0),
        "{metrics}"
    );
}
