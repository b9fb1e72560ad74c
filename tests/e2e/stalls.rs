//! Streams cut under pressure and clients that stall: a cut `/v1` stream ends
//! with an error event the OpenAI clients raise, a batch client that stops
//! reading does not hold a real-time request back, and a weight change that
//! would leave an arm's plugin unable to work is refused.

use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(20);

/// `builtin:preemptive` on `slots` slots, allowed to cut streams.
fn cutting(upstream: &str, slots: u32) -> PolicyFile {
    PolicyFile::new(upstream, slots)
        .arm(Arm::builtin("main", "preemptive").configs(toml::toml! { preempt_streaming = true }))
}

/// A streamed `/v1/chat/completions`.
fn chat_stream(
    c: &reqwest::Client,
    base: &str,
    tag: &str,
    priority: &str,
    tokens: u64,
) -> reqwest::RequestBuilder {
    c.post(format!("{base}/v1/chat/completions"))
        .header("x-test-tag", tag)
        .header("x-priority", priority)
        .json(&serde_json::json!({
            "model": "fake",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true,
            "max_tokens": tokens,
        }))
}

#[tokio::test]
async fn a_cut_v1_stream_ends_with_an_error_event_not_silently() {
    let fake = fake(1, 20).await;
    let m = start(&cutting(&fake.url(), 1));
    let c = client();
    let resp = chat_stream(&c, &m.url, "b", "batch", 200)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let mut body = s.next().await.expect("a first chunk").unwrap().to_vec();
    let rt = chat_stream(&c, &m.url, "rt", "realtime", 3)
        .send()
        .await
        .unwrap();
    let rt = rt.text().await.unwrap();
    assert!(rt.contains("data: [DONE]"), "{rt}");
    while let Some(chunk) = tokio::time::timeout(T, s.next())
        .await
        .expect("stream ends")
    {
        body.extend_from_slice(&chunk.unwrap());
    }
    let body = String::from_utf8(body).unwrap();
    assert!(
        !body.contains("[DONE]"),
        "a cut stream looks complete: {body}"
    );
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    let last = events.last().unwrap().strip_prefix("data: ").unwrap();
    let last: serde_json::Value = serde_json::from_str(last).unwrap();
    let error = &last["error"];
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("pre-empted")),
        "{body}"
    );
    assert_eq!(error["type"], "server_error", "{body}");
    assert_eq!(error["code"], "preempted", "{body}");
    assert!(events.len() < 200, "{body}");
}

#[tokio::test]
async fn a_weight_change_that_leaves_a_plugin_no_workable_share_is_refused() {
    let fake = fake(2, 5).await;
    let reserving = |name: &str, weight: u32| {
        Arm::builtin(name, "reserved-aging")
            .weight(weight)
            .config("rt_reserved_slots", 1)
    };
    let m = start(
        &PolicyFile::new(fake.url(), 2)
            .admin_token("t0k3n")
            .arm(reserving("alpha", 100))
            .arm(reserving("beta", 0)),
    );
    let c = client();
    let r = c
        .put(format!("{}/policies/beta/weight", m.admin))
        .bearer_auth("t0k3n")
        .json(&serde_json::json!({"weight": 100}))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(code, 409, "{body}");
    let e = body["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("1 of 2 slot(s)") && e.contains("rt_reserved_slots"),
        "the plugin's reason is given: {body}"
    );
    let s = m.status().await;
    let weights: Vec<u64> = s["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [100, 0], "{s:#}");
    // Batch work is served as before, and no plugin is ejected later.
    for i in 0..4 {
        let r = generate(&c, &m.url, &format!("b{i}"), Some("batch"), 2)
            .header("x-maitre-key", format!("k{i}"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = m.status().await;
    for a in s["arms"].as_array().unwrap() {
        assert_eq!(a["fallback"], false, "{s:#}");
    }
}

#[tokio::test]
async fn a_stalled_batch_client_does_not_hold_back_a_realtime_request() {
    use tokio::io::AsyncWriteExt;
    // Tokens as fast as the upstream can make them: the stalled client's
    // socket and maitre's buffers fill within moments.
    let fake = fake(1, 0).await;
    let m = start(&cutting(&fake.url(), 1));
    let addr: std::net::SocketAddr = m.url.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(addr).await.unwrap();
    let body = serde_json::json!({"model": "fake", "prompt": "hi", "stream": true,
        "options": {"num_predict": 100_000_000u64}})
    .to_string();
    let head = format!(
        "POST /api/generate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-Priority: batch\r\nX-Test-Tag: stalled\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(body.as_bytes()).await.unwrap();
    // It never reads. Wait until it streams and the buffers are full.
    let end = tokio::time::Instant::now() + T;
    while seq_of(&fake.log(), "stalled", EventKind::Started).is_none() {
        assert!(tokio::time::Instant::now() < end, "the batch never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = client();
    let t = std::time::Instant::now();
    let rt = generate(&c, &m.url, "rt", Some("realtime"), 2)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let waited = t.elapsed();
    let rt = rt.unwrap_or_else(|e| {
        panic!(
            "the real-time request was held back by the stalled stream: {e}\n{}",
            m.logs().join("\n")
        )
    });
    assert_eq!(rt.status(), 200);
    eprintln!("real-time request answered {waited:?} after it was sent");
    assert!(
        waited < Duration::from_secs(1),
        "the real-time request waited {waited:?}"
    );
    let log = fake.log();
    assert!(
        seq_of(&log, "stalled", EventKind::Cancelled) < seq_of(&log, "rt", EventKind::Started),
        "the stalled stream's upstream was closed before the real-time request started"
    );
    drop(stalled);
}
