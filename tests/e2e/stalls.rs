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
    let status = |m: &Maitre| {
        let url = format!("{}/status", m.admin);
        let c = c.clone();
        async move {
            let s: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
            s
        }
    };
    let s = status(&m).await;
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
    let s = status(&m).await;
    for a in s["arms"].as_array().unwrap() {
        assert_eq!(a["fallback"], false, "{s:#}");
    }
}
