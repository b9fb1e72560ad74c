//! Hot reload: plugin swaps and a weight change under continuous load lose no
//! request; broken changes keep the running policy until fixed; a reload
//! compiles only the plugins whose bytes changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// The same component with a custom section appended: valid, same
/// behaviour, different bytes (so a new sha256 that must be compiled).
fn with_custom_section(mut component: Vec<u8>, note: &str) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"maitre-test";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(note.as_bytes());
    component.push(0); // custom section id
    leb(payload.len(), &mut component);
    component.extend_from_slice(&payload);
    component
}

/// A valid, empty WebAssembly component: it compiles but exports nothing of
/// maitre's policy world.
const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\x00\x01\x00";

// Hot swaps under continuous load.

#[derive(Debug)]
struct Done {
    tag: String,
    sent_at: Instant,
    status: u16,
    done: bool,
    arm: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_swaps_and_weight_change_under_load_lose_no_request() {
    let fake = fake(4, 1).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_plugin_path("fifo"), dir.path().join("alpha.wasm")).unwrap();
    let policy_for = |alpha_plugin: &str| {
        live_policy(&fake.url(), 4)
            .arm(
                Arm::new("alpha", alpha_plugin)
                    .weight(100)
                    .config("default_class", "batch"),
            )
            .arm(Arm::builtin("beta", "fifo").weight(100))
    };
    let policy = dir.path().join("policy.toml");
    policy_for("alpha.wasm").write(&policy);
    let m = Arc::new(serve().policy_in(dir, policy.clone()).start());
    let dir = m.dir.path().to_path_buf();
    let s0 = status(&m).await;
    assert_eq!(
        arm(&s0, "alpha")["plugin_sha256"],
        sha256_hex(&plugin_bytes("fifo"))
    );

    // Four client loops, each sending short requests back to back with
    // distinct A/B keys, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for l in 0..4 {
        let (m, stop, completed) = (m.clone(), stop.clone(), completed.clone());
        loops.push(tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let tag = format!("l{l}-{n}");
                let sent_at = Instant::now();
                let resp = generate(&c, &m.url, &tag, None, 3)
                    .header("x-maitre-key", format!("key-{l}-{n}"))
                    .send()
                    .await;
                let (status, arm, done) = match resp {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let arm = r
                            .headers()
                            .get("x-maitre-arm")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        (status, arm, body["done"] == true)
                    }
                    Err(_) => (0, String::new(), false),
                };
                out.push(Done {
                    tag,
                    sent_at,
                    status,
                    done,
                    arm,
                });
                completed.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            out
        }));
    }
    let until = |n: usize| {
        let completed = completed.clone();
        async move {
            let end = Instant::now() + T;
            while completed.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < end, "load stalled below {n} requests");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            completed.load(Ordering::Relaxed)
        }
    };
    until(100).await;

    // Swap 1: overwrite the plugin file in place (fifo -> reserved-aging).
    std::fs::copy(built_plugin_path("reserved-aging"), dir.join("alpha.wasm")).unwrap();
    let ra = sha256_hex(&plugin_bytes("reserved-aging"));
    wait_status(&m, "alpha.wasm to be reserved-aging", |s| {
        arm(s, "alpha")["plugin_sha256"] == ra
    })
    .await;
    let c1 = completed.load(Ordering::Relaxed);
    until(c1 + 100).await;

    // Swap 2: a new plugin file, and the policy pointed at it.
    std::fs::copy(built_plugin_path("preemptive"), dir.join("alpha-v2.wasm")).unwrap();
    policy_for("alpha-v2.wasm").write(&policy);
    let pre = sha256_hex(&plugin_bytes("preemptive"));
    wait_status(&m, "alpha to run alpha-v2.wasm", |s| {
        let a = arm(s, "alpha");
        a["plugin_sha256"] == pre && a["plugin"].as_str().unwrap().ends_with("alpha-v2.wasm")
    })
    .await;
    let c2 = completed.load(Ordering::Relaxed);
    until(c2 + 100).await;

    // Weight change: alpha drains, every new request goes to beta.
    let (code, body) = put_weight(&m, "alpha", json!({"weight": 0}), Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let weight_changed = Instant::now();
    let c3 = completed.load(Ordering::Relaxed);
    until(c3 + 100).await;

    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Done> = Vec::new();
    for l in loops {
        all.extend(l.await.unwrap());
    }

    // Every request answered 200 with a complete body.
    let bad: Vec<&Done> = all.iter().filter(|d| d.status != 200 || !d.done).collect();
    assert!(
        bad.is_empty(),
        "{} failed requests: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    // None lost or duplicated: the fake finished each tag exactly once, and
    // nothing was cancelled or failed upstream.
    let log = fake.log();
    let mut finished: HashMap<String, usize> = HashMap::new();
    for e in &log {
        match e.kind {
            EventKind::Finished => {
                *finished
                    .entry(e.tag.clone().unwrap_or_default())
                    .or_default() += 1
            }
            EventKind::Failed | EventKind::Cancelled => panic!("upstream saw {e:?}"),
            _ => {}
        }
    }
    assert_eq!(
        finished.len(),
        all.len(),
        "requests sent vs finished upstream"
    );
    for d in &all {
        assert_eq!(
            finished.get(&d.tag),
            Some(&1),
            "{} finished {:?} times",
            d.tag,
            finished.get(&d.tag)
        );
    }
    assert!(all.len() >= 400, "only {} requests", all.len());
    // Both arms served before the weight change; only beta after it.
    let before: BTreeSet<&str> = all
        .iter()
        .filter(|d| d.sent_at < weight_changed)
        .map(|d| d.arm.as_str())
        .collect();
    assert_eq!(before, BTreeSet::from(["alpha", "beta"]));
    let after: Vec<&Done> = all.iter().filter(|d| d.sent_at > weight_changed).collect();
    assert!(after.len() >= 50, "{}", after.len());
    assert!(
        after.iter().all(|d| d.arm == "beta"),
        "requests sent after alpha's weight went to 0 landed in alpha; log:\n{}",
        m.logs()
            .iter()
            .filter(|l| l.contains("reload") || l.contains("weight") || l.contains("changed"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Both reloads worked, none failed, and the scheduler is idle again.
    let metrics = Scrape::get(&m.admin).await;
    let reloads = |result| metrics.get_exact("maitre_reloads_total", &[("result", result)]);
    assert_eq!(reloads("failed"), Some(0.0), "{metrics}");
    assert!(reloads("ok").unwrap() >= 2.0, "{metrics}");
    let s = wait_status(&m, "idle", |s| s["slots_busy"] == 0 && s["waiting"] == 0).await;
    assert!(s["last_reload_error"].is_null());
    assert_eq!(arm(&s, "alpha")["weight"], 0);
    assert_eq!(arm(&s, "beta")["slots"], 4);
    eprintln!(
        "under load: {} requests, 2 plugin swaps + 1 weight change, 0 failed",
        all.len()
    );
}

// Broken changes keep the old policy; fixing them loads the fix.

#[tokio::test]
async fn broken_changes_keep_the_running_policy_until_fixed() {
    let fake = fake(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_plugin_path("fifo"), dir.path().join("p.wasm")).unwrap();
    let file = |plugin: &str, key: &str, value: &str| {
        live_policy(&fake.url(), 2)
            .arm(Arm::new("main", plugin).weight(100).config(key, value))
            .to_toml()
    };
    let good = file("p.wasm", "default_class", "batch");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, &good).unwrap();
    let m = serve().policy_in(dir, policy.clone()).start();
    let p = m.dir.path().join("p.wasm");
    let fifo = sha256_hex(&plugin_bytes("fifo"));
    let c = client();
    let mut n = 0;
    let mut served = |m: &Maitre| {
        n += 1;
        let tag = format!("r{n}");
        let c = c.clone();
        let url = m.url.clone();
        async move {
            let r = generate(&c, &url, &tag, None, 2).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-maitre-arm"], "main");
        }
    };
    served(&m).await;

    // Each broken change: the error names the file and the reason, /status
    // shows it, the old plugin keeps serving. Policy-file cases first (the
    // plugin file is good), then plugin-file cases (the policy file is good).
    type Case<'a> = (&'a str, Box<dyn Fn()>, Vec<&'a str>);
    let broken: Vec<Case> = vec![
        (
            "bad TOML",
            Box::new({
                let policy = policy.clone();
                let text = good.replace("weight = 100", "weight = = 100");
                assert_ne!(text, good);
                move || std::fs::write(&policy, &text).unwrap()
            }),
            vec!["policy.toml:", "weight"],
        ),
        (
            "a config the plugin's init rejects",
            Box::new({
                let policy = policy.clone();
                let text = file("p.wasm", "bogus_key", "1");
                move || std::fs::write(&policy, &text).unwrap()
            }),
            vec!["refused its [policy.config]", "bogus_key"],
        ),
        (
            "a missing plugin file",
            Box::new({
                let policy = policy.clone();
                let text = file("later.wasm", "default_class", "batch");
                move || std::fs::write(&policy, &text).unwrap()
            }),
            vec!["later.wasm", "cannot read plugin"],
        ),
        (
            "garbage plugin bytes",
            Box::new({
                let p = p.clone();
                move || std::fs::write(&p, b"this is not wasm").unwrap()
            }),
            vec!["p.wasm", "is not a valid WebAssembly component"],
        ),
        (
            "a component of another interface",
            Box::new({
                let p = p.clone();
                move || std::fs::write(&p, EMPTY_COMPONENT).unwrap()
            }),
            vec![
                "p.wasm",
                "does not implement a policy interface this maitre supports",
            ],
        ),
    ];
    let mut failures = 0.0;
    for (what, breakit, expect) in &broken {
        breakit();
        let s = wait_status(&m, what, |s| {
            s["last_reload_error"]
                .as_str()
                .is_some_and(|e| expect.iter().all(|x| e.contains(x)))
        })
        .await;
        failures += 1.0;
        let a = arm(&s, "main");
        assert_eq!(
            a["plugin_sha256"], fifo,
            "{what}: the old plugin must keep serving"
        );
        assert_eq!(s["last_reload"]["ok"], false);
        assert_eq!(s["last_reload"]["trigger"], "file");
        served(&m).await;
        // POST /reload does the same on demand, with the reason in the answer.
        let (code, body) = post_reload(&m, Some(TOKEN)).await;
        assert_eq!(code, 422, "{what}: {body}");
        let e = body["error"].as_str().unwrap();
        assert!(expect.iter().all(|x| e.contains(x)), "{what}: {e}");
        failures += 1.0;
        // Put the policy file back for the next case (a broken plugin file
        // stays broken: it is fixed last).
        if what.contains("TOML") || what.contains("init") || what.contains("missing") {
            std::fs::write(&policy, &good).unwrap();
        }
    }
    let log = m.logs().join("\n");
    assert!(
        log.contains("reload failed; the previous policy keeps serving"),
        "{log}"
    );
    assert!(log.contains("policy.toml"), "the log names the file");

    // The fix: a real plugin in p.wasm loads, and the error clears.
    std::fs::copy(built_plugin_path("reserved-aging"), &p).unwrap();
    let ra = sha256_hex(&plugin_bytes("reserved-aging"));
    let s = wait_status(&m, "the fixed plugin", |s| {
        arm(s, "main")["plugin_sha256"] == ra && s["last_reload_error"].is_null()
    })
    .await;
    assert_eq!(s["last_reload"]["ok"], true);
    served(&m).await;

    // A missing plugin that appears later is picked up by the watcher too.
    std::fs::write(&policy, file("later.wasm", "default_class", "batch")).unwrap();
    wait_status(&m, "later.wasm missing", |s| {
        s["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("later.wasm"))
    })
    .await;
    std::fs::copy(built_plugin_path("fifo"), m.dir.path().join("later.wasm")).unwrap();
    wait_status(&m, "later.wasm loaded", |s| {
        arm(s, "main")["plugin"]
            .as_str()
            .unwrap()
            .ends_with("later.wasm")
            && s["last_reload_error"].is_null()
    })
    .await;
    served(&m).await;

    let metrics = Scrape::get(&m.admin).await;
    let reloads = |result| metrics.get_exact("maitre_reloads_total", &[("result", result)]);
    let failed = reloads("failed").unwrap();
    assert!(
        failed >= failures + 1.0,
        "{failed} failed reloads counted, {failures}+1 expected"
    );
    assert!(reloads("ok").unwrap() >= 2.0, "{metrics}");
    // Every request was served; nothing failed upstream.
    assert!(
        !fake
            .log()
            .iter()
            .any(|e| matches!(e.kind, EventKind::Failed | EventKind::Cancelled))
    );
}

/// A plugin whose bytes changed is compiled; unchanged ones come from the
/// cache. Prints the measured reload times (a figure, not a threshold).
#[tokio::test]
async fn reload_compiles_changed_plugins_and_caches_the_rest() {
    let fake = fake(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let ra_path = dir.path().join("ra.wasm");
    std::fs::copy(built_plugin_path("reserved-aging"), &ra_path).unwrap();
    let policy = dir.path().join("policy.toml");
    live_policy(&fake.url(), 2)
        .arm(
            Arm::new("main", "ra.wasm")
                .weight(100)
                .config("rt_reserved_slots", 1),
        )
        .write(&policy);
    let m = serve().policy_in(dir, policy).start();

    let mut cached = Vec::new();
    let mut compiled = Vec::new();
    for round in 0..3 {
        // Unchanged: from the cache.
        let (code, r) = post_reload(&m, Some(TOKEN)).await;
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["builds"][0]["compiled"], false, "{r}");
        cached.push((
            r["build_ms"].as_f64().unwrap(),
            r["total_ms"].as_f64().unwrap(),
        ));

        // New bytes (same code, one more custom section): compiled. The
        // watcher reloads it; its report is in /status.
        let bytes = with_custom_section(plugin_bytes("reserved-aging"), &format!("round {round}"));
        let sha = sha256_hex(&bytes);
        // Written whole and renamed into place: an in-place write can be
        // seen (and reloaded) twice, and the second reload, a cache hit,
        // would be the report read below.
        let tmp = ra_path.with_extension("wasm.tmp");
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, &ra_path).unwrap();
        let s = wait_status(&m, "the changed plugin", |s| {
            arm(s, "main")["plugin_sha256"] == sha
        })
        .await;
        let report = &s["last_reload"]["report"];
        assert_eq!(report["builds"][0]["compiled"], true, "{s:#}");
        assert_eq!(report["builds"][0]["sha256"], sha);
        compiled.push((
            report["builds"][0]["compile_ms"].as_f64().unwrap(),
            report["build_ms"].as_f64().unwrap(),
            report["total_ms"].as_f64().unwrap(),
        ));
    }
    eprintln!("reload of reserved-aging, cached (build_ms, total_ms): {cached:?}");
    eprintln!(
        "reload of reserved-aging, changed bytes (compile_ms, build_ms, total_ms): {compiled:?}"
    );
    let r = generate(&client(), &m.url, "after", None, 2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Exactly one reload per change or request: reading the files during a
    // reload is not a change (inotify reports opens and reads too), so the
    // watcher must not keep reloading on its own. Several debounce periods
    // pass without a new reload.
    tokio::time::sleep(maitre::reload::DEBOUNCE * 4).await;
    let metrics = Scrape::get(&m.admin).await;
    let reloads = |result| metrics.get_exact("maitre_reloads_total", &[("result", result)]);
    assert_eq!(reloads("ok"), Some(6.0), "3 POST /reload + 3 file changes");
    assert_eq!(reloads("failed"), Some(0.0), "{metrics}");
}
