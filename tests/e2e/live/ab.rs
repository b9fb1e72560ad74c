//! The A/B split: weighted mode follows the weights and keys are sticky,
//! switchback alternates the whole upstream, weights change live; `maitre ab`
//! prints the comparison of a running maitre.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::*;

/// One scheduled request with an A/B key; returns (status, arm, done).
async fn keyed(
    c: &reqwest::Client,
    m: &Maitre,
    tag: &str,
    key: Option<&str>,
) -> (u16, String, bool) {
    let mut r = generate(c, &m.url, tag, None, 1);
    if let Some(k) = key {
        r = r.header("x-maitre-key", k);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let arm = resp
        .headers()
        .get("x-maitre-arm")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, arm, body["done"] == true)
}

// The A/B split follows the weights; keys are sticky.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_split_follows_weights_and_keys_are_sticky() {
    let fake = fake(2, 0).await;
    let weighted = |alpha, beta| {
        live_policy(&fake.url(), 2)
            .arm(Arm::builtin("alpha", "fifo").weight(alpha))
            .arm(Arm::builtin("beta", "fifo").weight(beta))
    };
    let m = Arc::new(start(&weighted(70, 30)));
    let s = status(&m).await;
    assert_eq!(s["ab_mode"], "weighted");
    assert_eq!(
        arm(&s, "alpha")["slots"],
        1,
        "each arm owns one of the two slots"
    );
    assert_eq!(arm(&s, "beta")["slots"], 1);

    // Sends `keys` (tag, key) 16 at a time; returns the arm of each.
    async fn send_all(
        m: &Arc<Maitre>,
        keys: Vec<(String, Option<String>)>,
    ) -> Vec<(String, String)> {
        let c = client();
        let mut out = Vec::new();
        for chunk in keys.chunks(16) {
            let mut tasks = Vec::new();
            for (tag, key) in chunk.iter().cloned() {
                let (c, m) = (c.clone(), m.clone());
                tasks.push(tokio::spawn(async move {
                    let (status, arm, done) = keyed(&c, &m, &tag, key.as_deref()).await;
                    assert_eq!((status, done), (200, true), "{tag}");
                    (key.unwrap_or_default(), arm)
                }));
            }
            for t in tasks {
                out.push(t.await.unwrap());
            }
        }
        out
    }
    fn count(arms: &[(String, String)], name: &str) -> usize {
        arms.iter().filter(|(_, a)| a == name).count()
    }

    // 400 distinct keys at 70/30: expect 280 in alpha, sd = sqrt(400*.7*.3)
    // ≈ 9.2; allow 4 sd.
    let n = 400;
    let keys = (0..n)
        .map(|i| (format!("split-{i}"), Some(format!("user-{i}"))))
        .collect();
    let got = send_all(&m, keys).await;
    let alpha = count(&got, "alpha");
    assert_eq!(alpha + count(&got, "beta"), n);
    assert!(
        (alpha as i64 - 280).abs() <= 37,
        "alpha got {alpha} of {n} at weight 70/30"
    );

    // Sticky: 20 keys, 6 requests each, always one arm per key.
    let keys = (0..120)
        .map(|i| (format!("sticky-{i}"), Some(format!("user-{}", i % 20))))
        .collect();
    let got = send_all(&m, keys).await;
    let mut arms_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (k, a) in &got {
        arms_of.entry(k.clone()).or_default().insert(a.clone());
    }
    assert_eq!(arms_of.len(), 20);
    assert!(
        arms_of.values().all(|s| s.len() == 1),
        "a key changed arm: {arms_of:?}"
    );
    // Without the header the client address is the key: one arm for all.
    let keys = (0..20).map(|i| (format!("addr-{i}"), None)).collect();
    let got = send_all(&m, keys).await;
    let one: BTreeSet<&String> = got.iter().map(|(_, a)| a).collect();
    assert_eq!(one.len(), 1, "{got:?}");

    // Weights change live through the file: 30/70 is the mirror image.
    weighted(30, 70).write(&m.policy);
    wait_status(&m, "weights from the file", |s| {
        arm(s, "alpha")["weight"] == 30 && arm(s, "beta")["weight"] == 70
    })
    .await;
    let keys = (0..n)
        .map(|i| (format!("flip-{i}"), Some(format!("user-{i}"))))
        .collect();
    let got = send_all(&m, keys).await;
    let alpha = count(&got, "alpha");
    assert!(
        (alpha as i64 - 120).abs() <= 37,
        "alpha got {alpha} of {n} at weight 30/70"
    );

    // ...and through the admin API: beta at 0 takes nothing new.
    let (code, body) = put_weight(&m, "beta", json!({"weight": 0}), Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let keys = (0..60)
        .map(|i| (format!("drain-{i}"), Some(format!("user-{i}"))))
        .collect();
    let got = send_all(&m, keys).await;
    assert_eq!(count(&got, "alpha"), 60);
    let s = status(&m).await;
    assert_eq!(arm(&s, "alpha")["slots"], 2);
    assert_eq!(arm(&s, "beta")["slots"], 0);
}

#[tokio::test]
async fn switchback_alternates_the_whole_upstream_between_arms() {
    let fake = fake(2, 0).await;
    let m = start(
        &live_policy(&fake.url(), 2)
            .ab(Ab::switchback(0.3))
            .arm(
                Arm::builtin("alpha", "reserved-aging")
                    .weight(50)
                    .config("rt_reserved_slots", 1),
            )
            .arm(Arm::builtin("beta", "fifo").weight(50)),
    );
    let c = client();
    // Sequential requests over ~1.5 s: runs of one arm, switching with the
    // windows, whatever the key.
    let mut arms = Vec::new();
    let end = Instant::now() + Duration::from_millis(1500);
    let mut i = 0;
    while Instant::now() < end {
        let (status, arm, done) = keyed(&c, &m, &format!("sb-{i}"), Some(&format!("k{i}"))).await;
        assert_eq!((status, done), (200, true));
        arms.push(arm);
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let runs = 1 + arms.windows(2).filter(|w| w[0] != w[1]).count();
    let used: BTreeSet<&String> = arms.iter().collect();
    assert_eq!(used.len(), 2, "{arms:?}");
    // 1.5 s of 0.3 s windows is 5 turns (6 if the start falls mid-window).
    assert!((3..=7).contains(&runs), "{runs} runs: {arms:?}");
    let s = status(&m).await;
    assert_eq!(s["ab_mode"], "switchback");
    let slots: Vec<u64> = s["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["slots"].as_u64().unwrap())
        .collect();
    assert!(
        slots == [2, 0] || slots == [0, 2],
        "one arm owns every slot: {slots:?}"
    );
    // The comparison counts windows, not requests: the requests of one
    // window share its load, so they are not independent samples.
    let ab = m.ab().await;
    assert_eq!(ab["mode"], "switchback");
    let p50 = ab["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["class"] == "batch" && c["metric"] == "ttft_p50_ms")
        .unwrap_or_else(|| panic!("{ab}"));
    assert_eq!(p50["unit"], "windows", "{p50}");
    // About 1.5 s of 0.6 s cycles: one or two complete windows per arm.
    for n in ["baseline_n", "arm_n"] {
        assert!((1..=3).contains(&p50[n].as_u64().unwrap()), "{p50}");
    }
}

// `maitre ab` prints the comparison of a running maitre.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maitre_ab_prints_both_arms() {
    let fake = fake(2, 1).await;
    let m = start(
        &live_policy(&fake.url(), 2)
            .arm(
                Arm::builtin("reserved", "reserved-aging")
                    .weight(50)
                    .config("rt_reserved_slots", 0),
            )
            .arm(Arm::builtin("fifo", "fifo").weight(50)),
    );
    let c = client();
    let mut sent: HashMap<(String, &str), usize> = HashMap::new();
    for i in 0..40 {
        let class = if i % 4 == 0 { "realtime" } else { "batch" };
        let r = generate(&c, &m.url, &format!("ab{i}"), Some(class), 2)
            .header("x-maitre-key", format!("client-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let arm = r.headers()["x-maitre-arm"].to_str().unwrap().to_string();
        *sent.entry((arm, class)).or_default() += 1;
    }
    wait_status(&m, "every request recorded", |s| {
        s["requests"].as_array().unwrap().is_empty()
    })
    .await;
    let out = tokio::process::Command::new(BIN)
        .args(["ab", "--admin", &m.admin, "--window", "60"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("A/B comparison over the last 60 s"),
        "{stdout}"
    );
    let header = stdout.lines().nth(1).unwrap();
    for col in [
        "arm",
        "class",
        "reqs",
        "ok",
        "rej",
        "cxl",
        "err",
        "ttft_n",
        "ttft_p50",
        "ttft_p95",
        "ttft_p99",
        "queue_p50",
        "queue_p95",
        "done/min",
        "preempt",
        "lost_tok",
    ] {
        assert!(
            header.split_whitespace().any(|c| c == col),
            "{col} missing: {header}"
        );
    }
    // One row per arm and class; its request and TTFT-sample counts are the
    // requests that arm answered.
    for arm in ["reserved", "fifo"] {
        for class in ["realtime", "batch"] {
            let row: Vec<&str> = stdout
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() == 16 && f[0] == arm && f[1] == class)
                .unwrap_or_else(|| panic!("no row {arm} {class}:\n{stdout}"));
            let n = sent
                .get(&(arm.to_string(), class))
                .copied()
                .unwrap_or(0)
                .to_string();
            assert_eq!(
                (row[2], row[3], row[4], row[5], row[6], row[7]),
                (n.as_str(), n.as_str(), "0", "0", "0", n.as_str()),
                "{stdout}"
            );
            assert_eq!((row[14], row[15]), ("0", "0"), "no pre-emption: {stdout}");
        }
    }
    assert!(sent.keys().any(|(a, _)| a == "reserved") && sent.keys().any(|(a, _)| a == "fifo"));
    // An unreachable admin is a clear error.
    let out = tokio::process::Command::new(BIN)
        .args(["ab", "--admin", "http://127.0.0.1:9", "--window", "60"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

// `/ab` and `maitre ab` say whether a difference between arms is real.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_says_which_arm_is_slower_with_a_confidence_interval() {
    let fake = fake(4, 0).await;
    let m = Arc::new(start(
        &live_policy(&fake.url(), 4)
            .arm(Arm::builtin("fast", "fifo").weight(50))
            .arm(Arm::builtin("slow", "fifo").weight(50)),
    ));
    let c = client();
    // Learn each key's arm (keys are sticky), then send three more requests
    // per key; those of the "slow" arm take 60 ms to their first token, as a
    // slower policy would make them.
    let mut arm_of = Vec::new();
    for i in 0..60 {
        let (code, arm, _) = keyed(&c, &m, &format!("learn{i}"), Some(&format!("k{i}"))).await;
        assert_eq!(code, 200);
        arm_of.push(arm);
    }
    assert!(arm_of.iter().any(|a| a == "slow") && arm_of.iter().any(|a| a == "fast"));
    let jobs = arm_of.iter().enumerate().flat_map(|(i, arm)| {
        let (c, m) = (c.clone(), m.clone());
        (0..3).map(move |j| {
            let mut r = generate(&c, &m.url, &format!("k{i}-{j}"), None, 1)
                .header("x-maitre-key", format!("k{i}"));
            if arm == "slow" {
                r = r.header("x-fake-prompt-ms", "60");
            }
            async move { r.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
    });
    let codes: Vec<u16> = futures_util::stream::iter(jobs)
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    wait_status(&m, "every request recorded", |s| {
        s["requests"].as_array().unwrap().is_empty()
    })
    .await;

    let ab = m.ab().await;
    assert_eq!(ab["mode"], "weighted");
    let find = |class: &str, metric: &str| {
        ab["comparisons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["class"] == class && c["metric"] == metric)
            .unwrap_or_else(|| panic!("no {class} {metric} in {ab}"))
            .clone()
    };
    let p50 = find("batch", "ttft_p50_ms");
    assert_eq!(
        (&p50["baseline"], &p50["arm"]),
        (&json!("fast"), &json!("slow"))
    );
    let lo = p50["ci95"][0].as_f64().unwrap();
    assert!(lo > 30.0, "the interval excludes 0 by far: {p50}");
    let verdict = p50["verdict"].as_str().unwrap();
    assert!(
        verdict.starts_with("slow is slower than fast at TTFT p50"),
        "{verdict}"
    );
    // No real-time request was sent: the verdict says what is missing.
    assert_eq!(
        find("realtime", "ttft_p95_ms")["verdict"],
        "not enough data yet: about 20 more requests per arm needed"
    );

    let out = tokio::process::Command::new(BIN)
        .args(["ab", "--admin", &m.admin, "--window", "60"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("differences from fast"), "{stdout}");
    assert!(stdout.contains(verdict), "{stdout}");
}

/// The A/B example is valid as shipped: `maitre check` loads both plugins.
#[test]
fn ab_example_checks() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ab-test.toml");
    let out = std::process::Command::new(BIN)
        .args(["check", example])
        .env_remove("MAITRE_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("arm reserved-aging") && stdout.contains("arm fifo"),
        "{stdout}"
    );
}
