//! Shadow arms through the real binary: a candidate plugin is shown real
//! traffic, its disagreements are reported in `/ab` and `maitre ab`, and a
//! hostile shadow never touches serving.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::common::*;
use crate::hostile::{limits, wasm};

/// Sends `n` batch requests at once and, once they are all queued or
/// running, one real-time request; returns every (status, arm) pair.
async fn batch_then_realtime(m: &Maitre, n: usize) -> Vec<(u16, String)> {
    let c = client();
    let batch = (0..n).map(|i| generate(&c, &m.url, &format!("b{i}"), Some("batch"), 40).send());
    let batch = futures_util::future::join_all(batch);
    let rt = async {
        for _ in 0..200 {
            if m.status().await["requests"].as_array().unwrap().len() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        generate(&c, &m.url, "rt", Some("realtime"), 2).send().await
    };
    let (batch, rt) = tokio::join!(batch, rt);
    batch
        .into_iter()
        .chain([rt])
        .map(|r| {
            let r = r.expect("request");
            let arm = r.headers()["x-maitre-arm"].to_str().unwrap().to_string();
            (r.status().as_u16(), arm)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_sees_real_traffic_reports_where_it_differs_and_never_acts() {
    let fake = fake(1, 5).await;
    // Serving: reserved-aging with no reserved slot, which lets the
    // real-time request wait for a free slot. Shadow: preemptive, which would
    // cut a batch request for it. (A shadow sees the serving arm's queue,
    // with the classes and priorities the serving arm gave.)
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("live", "reserved-aging").config("rt_reserved_slots", 0))
            .arm(Arm::builtin("cand", "preemptive").shadow()),
    );
    let answers = batch_then_realtime(&m, 3).await;
    assert!(
        answers.iter().all(|(s, a)| *s == 200 && a == "live"),
        "{answers:?}"
    );
    // The shadow acted on nothing: no pre-emption happened.
    let scrape = Scrape::get(&m.admin).await;
    assert_eq!(scrape.sum("maitre_preemptions_total", &[]), 0.0);
    let ab = m.ab().await;
    let s = &ab["shadows"][0];
    assert_eq!(s["arm"], "cand");
    assert_eq!(s["watches"], "live");
    assert_eq!(s["faults"], 0, "{s}");
    assert!(s["schedule_differ"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["schedule_agree"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(
        s["admit_agree"].as_u64().unwrap() + s["admit_differ"].as_u64().unwrap(),
        4
    );
    let examples = s["examples"].to_string();
    assert!(
        examples.contains("would pre-empt {1} and start {4}, the serving arm chose to do nothing"),
        "{examples}"
    );
    // A shadow is not an arm: /status lists it apart, with no slots.
    let status = m.status().await;
    assert_eq!(status["arms"].as_array().unwrap().len(), 1);
    assert_eq!(status["shadows"][0]["arm"], "cand");
    // `maitre ab` prints it.
    let out = tokio::process::Command::new(BIN)
        .args(["ab", "--admin", &m.admin, "--window", "60"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("shadow cand (builtin:preemptive) watching live: schedule agrees"),
        "{stdout}"
    );
    // It cannot be given weight live: it is a shadow until the file says not.
    let r = client()
        .put(format!("{}/policies/cand/weight", m.admin))
        .json(&serde_json::json!({"weight": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("is a shadow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_sleeps_past_its_deadline_never_delays_serving() {
    let fake = fake(2, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let plugin = wasm("hostile-sleep", dir.path());
    PolicyFile::new(fake.url(), 2)
        .limits(limits())
        .arm(Arm::builtin("live", "fifo"))
        .arm(
            Arm::new("cand", plugin)
                .shadow()
                .configs(toml::toml! { after_calls = 2 sleep_ms = 250 }),
        )
        .write(&file);
    // `maitre check` names it a shadow.
    let out = std::process::Command::new(BIN)
        .args(["check", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("arm cand") && l.contains(" shadow ")),
        "{stdout}"
    );
    let m = Serve::new(BIN).policy_in(dir, file).start();
    let c = client();
    // 40 requests, 4 at a time: all served by the live arm while the shadow
    // sleeps, times out and is ejected.
    let codes: Vec<u16> = futures_util::stream::iter(0..40)
        .map(|i| {
            let r = generate(&c, &m.url, &format!("r{i}"), None, 1);
            async move { r.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    // The shadow may still be asleep in its call: its deadline ejects it.
    let mut s = Value::Null;
    for _ in 0..100 {
        s = m.ab().await["shadows"][0].clone();
        if s["ejected"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (s["ejected"].as_bool(), s["faults"].as_u64()),
        (Some(true), Some(1)),
        "{s}"
    );
    assert!(
        s["last_error"].as_str().unwrap().contains("ran past"),
        "{s}"
    );
    let scrape = Scrape::get(&m.admin).await;
    assert_eq!(
        scrape.sum(
            "maitre_plugin_faults_total",
            &[("arm", "cand"), ("kind", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        scrape.sum("maitre_plugin_faults_total", &[("arm", "live")]),
        0.0
    );
    let status = m.status().await;
    assert_eq!(status["arms"][0]["fallback"], false, "{status}");
}
