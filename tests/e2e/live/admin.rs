//! The admin API: `/metrics` parsed by the official Prometheus parsers, the
//! bearer token guarding live control, and a non-loopback admin listener
//! that needs a token.

use serde_json::{Value, json};

use super::*;

// /metrics, parsed by the real Prometheus parsers.

#[tokio::test]
async fn metrics_parse_with_the_prometheus_parsers() {
    let fake = fake(2, 1).await;
    let m = start(
        &live_policy(&fake.url(), 2).arm(
            Arm::builtin("main", "reserved-aging")
                .weight(100)
                .config("rt_reserved_slots", 1),
        ),
    );
    let c = client();
    for i in 0..8 {
        let r = generate(&c, &m.url, &format!("b{i}"), Some("batch"), 2)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for i in 0..4 {
        let r = generate(&c, &m.url, &format!("rt{i}"), Some("realtime"), 2)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(post_reload(&m, Some(TOKEN)).await.0, 200);
    wait_status(&m, "idle", |s| s["requests"].as_array().unwrap().is_empty()).await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/python/metrics_parse.py"
    );
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(format!("{}/metrics", m.admin))
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "the Prometheus parsers rejected /metrics:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("script output is JSON");
    assert!(
        parsed["openmetrics"]["content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    assert!(
        parsed["prometheus"]["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    for format in ["openmetrics", "prometheus"] {
        let fams = &parsed[format]["families"];
        let fam = |name: &str, ty: &str| -> Vec<Value> {
            let f = &fams[name];
            assert_eq!(f["type"], ty, "{format}: {name} in {fams:#}");
            f["samples"].as_array().unwrap().clone()
        };
        let value = |samples: &[Value], name: &str, labels: &[(&str, &str)]| -> f64 {
            samples
                .iter()
                .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][k] == *v))
                .unwrap_or_else(|| panic!("{format}: no {name} {labels:?} in {samples:?}"))[2]
                .as_f64()
                .unwrap()
        };
        // Requests by arm, class and outcome.
        let req = fam("maitre_requests", "counter");
        let ok = |class| {
            value(
                &req,
                "maitre_requests_total",
                &[("arm", "main"), ("class", class), ("outcome", "ok")],
            )
        };
        assert_eq!((ok("batch"), ok("realtime")), (8.0, 4.0), "{format}");
        // The four latency histograms: counts match, buckets rise to +Inf = count.
        for h in [
            "maitre_queue_wait_seconds",
            "maitre_upstream_ttfb_seconds",
            "maitre_client_ttfb_seconds",
            "maitre_total_seconds",
        ] {
            let samples = fam(h, "histogram");
            for (class, n) in [("batch", 8.0), ("realtime", 4.0)] {
                let labels = [("arm", "main"), ("class", class)];
                assert_eq!(
                    value(&samples, &format!("{h}_count"), &labels),
                    n,
                    "{format} {h}"
                );
                let sum = value(&samples, &format!("{h}_sum"), &labels);
                assert!(sum >= 0.0 && sum < 60.0 * n, "{format} {h} sum {sum}");
                let buckets: Vec<f64> = samples
                    .iter()
                    .filter(|s| s[0] == format!("{h}_bucket") && s[1]["class"] == class)
                    .map(|s| s[2].as_f64().unwrap())
                    .collect();
                assert!(buckets.len() > 5);
                assert!(
                    buckets.windows(2).all(|w| w[0] <= w[1]),
                    "{format} {h}: {buckets:?}"
                );
                assert_eq!(*buckets.last().unwrap(), n);
                assert_eq!(
                    samples
                        .iter()
                        .rfind(|s| s[0] == format!("{h}_bucket") && s[1]["class"] == class)
                        .unwrap()[1]["le"],
                    "+Inf"
                );
            }
        }
        // Slots, waiting, plugin calls, reloads.
        assert_eq!(
            value(&fam("maitre_slots", "gauge"), "maitre_slots", &[]),
            2.0
        );
        assert_eq!(
            value(&fam("maitre_slots_busy", "gauge"), "maitre_slots_busy", &[]),
            0.0
        );
        assert_eq!(
            value(
                &fam("maitre_waiting_requests", "gauge"),
                "maitre_waiting_requests",
                &[("arm", "main")]
            ),
            0.0
        );
        let calls = fam("maitre_plugin_call_seconds", "histogram");
        assert_eq!(
            value(
                &calls,
                "maitre_plugin_call_seconds_count",
                &[("arm", "main"), ("kind", "admit")]
            ),
            12.0
        );
        assert!(
            value(
                &calls,
                "maitre_plugin_call_seconds_count",
                &[("arm", "main"), ("kind", "schedule")]
            ) >= 1.0
        );
        let reloads = fam("maitre_reloads", "counter");
        assert_eq!(
            value(&reloads, "maitre_reloads_total", &[("result", "ok")]),
            1.0
        );
        assert_eq!(
            value(&reloads, "maitre_reloads_total", &[("result", "failed")]),
            0.0
        );
        // No plugin fault happened: the family is absent or all zero.
        if let Some(f) = fams["maitre_plugin_faults"]["samples"].as_array() {
            assert!(f.iter().all(|s| s[2] == 0.0), "{format}: {f:?}");
        }
    }
}

// The bearer token guards live control; a non-loopback admin needs one.

#[tokio::test]
async fn token_guards_mutating_endpoints() {
    let fake = fake(2, 1).await;
    let m = start(
        &live_policy(&fake.url(), 2)
            .arm(Arm::builtin("alpha", "fifo").weight(50))
            .arm(Arm::builtin("beta", "fifo").weight(50)),
    );
    for token in [
        None,
        Some("wrong-token"),
        Some("live-test-token-but-longer"),
    ] {
        let (code, body) = post_reload(&m, token).await;
        assert_eq!(code, 401, "{token:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains("bearer token"));
        let (code, _) = put_weight(&m, "alpha", json!({"weight": 10}), token).await;
        assert_eq!(code, 401, "{token:?}");
    }
    let r = client()
        .post(format!("{}/reload", m.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"maitre admin\""
    );
    // Nothing changed.
    assert_eq!(arm(&status(&m).await, "alpha")["weight"], 50);
    // Read-only endpoints need no token.
    for p in ["/status", "/metrics", "/ab?window=60", "/"] {
        let r = client()
            .get(format!("{}{p}", m.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{p}");
    }
    // With the token.
    let (code, body) = post_reload(&m, Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["arms"],
        json!(["alpha=builtin:fifo", "beta=builtin:fifo"])
    );
    let (code, body) = put_weight(&m, "alpha", json!({"weight": 10}), Some(TOKEN)).await;
    assert_eq!((code, &body), (200, &json!({"arm": "alpha", "weight": 10})));
    assert_eq!(arm(&status(&m).await, "alpha")["weight"], 10);
    // Clear answers for wrong requests.
    assert_eq!(
        put_weight(&m, "gamma", json!({"weight": 1}), Some(TOKEN))
            .await
            .0,
        404
    );
    assert_eq!(
        put_weight(&m, "alpha", json!({"weight": -1}), Some(TOKEN))
            .await
            .0,
        400
    );
    assert_eq!(
        put_weight(&m, "alpha", json!({"w": 1}), Some(TOKEN))
            .await
            .0,
        400
    );
    assert_eq!(
        put_weight(&m, "alpha", json!({"weight": 0}), Some(TOKEN))
            .await
            .0,
        200
    );
    // The last serving arm cannot go to 0; its weight stays.
    let (code, body) = put_weight(&m, "beta", json!({"weight": 0}), Some(TOKEN)).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(arm(&status(&m).await, "beta")["weight"], 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_admin_needs_a_token() {
    let fake = fake(1, 1).await;
    // No admin_token in the file.
    let policy = PolicyFile::new(fake.url(), 1).arm(Arm::builtin("main", "fifo"));
    let admin_on = |addr: &str| serve().policy(&policy).args(["--admin-listen", addr]);

    // No token: refused, saying why and how to fix it.
    let exited = admin_on("0.0.0.0:0")
        .try_start()
        .map(|_| ())
        .expect_err("maitre must refuse a non-loopback admin without a token");
    assert!(!exited.status.success());
    assert!(
        exited.log.contains("is not a loopback address")
            && exited.log.contains("MAITRE_ADMIN_TOKEN"),
        "{}",
        exited.log
    );

    // MAITRE_ADMIN_TOKEN: serves, and the token guards control, also after
    // a reload (the file has no token; the environment's stays in force).
    let m = admin_on("0.0.0.0:0")
        .env("MAITRE_ADMIN_TOKEN", "env-token")
        .start();
    assert!(
        m.ready.admin.unwrap().ip().is_unspecified(),
        "the ready file names the bound address: {:?}",
        m.ready
    );
    let c = client();
    let reload = |token: Option<&'static str>| {
        let mut r = c.post(format!("{}/reload", m.admin));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(reload(None).await, 401);
    assert_eq!(reload(Some("env-token")).await, 200);
    assert_eq!(reload(None).await, 401, "a reload must not drop the token");
    assert_eq!(reload(Some("env-token")).await, 200);
    drop(m);

    // Loopback needs no token.
    let m = admin_on("127.0.0.1:0").start();
    let r = c.post(format!("{}/reload", m.admin)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
