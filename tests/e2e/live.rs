//! Live policy control through the real binary: hot reload of the policy file
//! and its plugin files (under load, and when the change is broken), the A/B
//! split and its weights, the admin API (metrics parsed by the real Prometheus
//! parsers, status, bearer token) and `maitre ab`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use maitre::builtins::built_plugin_path;
use serde_json::{Value, json};
use sha2::Digest;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "live-test-token";

/// A policy file with `admin_token = TOKEN`, `extra` top-level text (e.g. an
/// `[ab]` table) and one `[[policy]]` per (name, plugin, weight, config).
fn arms_policy(
    upstream: &str,
    slots: u32,
    extra: &str,
    arms: &[(&str, &str, u32, &str)],
) -> String {
    let mut s = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n\n[upstream]\nurl = \"{upstream}\"\nslots = {slots}\n\n{extra}\n"
    );
    for (name, plugin, weight, config) in arms {
        s.push_str(&format!(
            "\n[[policy]]\nname = \"{name}\"\nplugin = \"{plugin}\"\nweight = {weight}\n[policy.config]\n{config}\n"
        ));
    }
    s
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn plugin_bytes(name: &str) -> Vec<u8> {
    std::fs::read(built_plugin_path(name)).expect("built plugin")
}

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

async fn get_json(url: &str) -> Value {
    let r = client().get(url).send().await.expect("GET");
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.expect("JSON")
}

async fn status(m: &Maitre) -> Value {
    get_json(&format!("{}/status", m.admin)).await
}

/// Polls `/status` until `pred` holds; panics with the last status otherwise.
async fn wait_status(m: &Maitre, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + T;
    loop {
        let s = status(m).await;
        if pred(&s) {
            return s;
        }
        if Instant::now() > end {
            panic!(
                "timed out waiting for {what}; /status:\n{s:#}\nlog:\n{}",
                m.logs().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn arm<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no arm {name} in {status:#}"))
}

async fn post_reload(m: &Maitre, token: Option<&str>) -> (u16, Value) {
    let mut r = client().post(format!("{}/reload", m.admin));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("POST /reload");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}

async fn put_weight(m: &Maitre, arm: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut r = client()
        .put(format!("{}/policies/{arm}/weight", m.admin))
        .json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("PUT weight");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}

/// One sample value from Prometheus text 0.0.4, e.g.
/// `metric(&text, "maitre_reloads_total", "result=\"failed\"")`.
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .and_then(|v| v.trim().parse().ok())
}

async fn metrics_text(m: &Maitre) -> String {
    client()
        .get(format!("{}/metrics", m.admin))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text")
}

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

// ---------------------------------------------------------------------------
// (a) Hot swaps under continuous load.

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
        arms_policy(
            &fake.url(),
            4,
            "",
            &[
                ("alpha", alpha_plugin, 100, "default_class = \"batch\""),
                ("beta", "builtin:fifo", 100, ""),
            ],
        )
    };
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, policy_for("alpha.wasm")).unwrap();
    let m = Arc::new(Maitre::spawn(dir, policy.clone(), &[]));
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
    std::fs::write(&policy, policy_for("alpha-v2.wasm")).unwrap();
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
    let text = metrics_text(&m).await;
    assert_eq!(
        metric(&text, "maitre_reloads_total", "result=\"failed\""),
        Some(0.0),
        "{text}"
    );
    assert!(metric(&text, "maitre_reloads_total", "result=\"ok\"").unwrap() >= 2.0);
    let s = wait_status(&m, "idle", |s| s["slots_busy"] == 0 && s["waiting"] == 0).await;
    assert!(s["last_reload_error"].is_null());
    assert_eq!(arm(&s, "alpha")["weight"], 0);
    assert_eq!(arm(&s, "beta")["slots"], 4);
    eprintln!(
        "under load: {} requests, 2 plugin swaps + 1 weight change, 0 failed",
        all.len()
    );
}

// ---------------------------------------------------------------------------
// (b) Broken changes keep the old policy; fixing them loads the fix.

#[tokio::test]
async fn broken_changes_keep_the_running_policy_until_fixed() {
    let fake = fake(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_plugin_path("fifo"), dir.path().join("p.wasm")).unwrap();
    let good = arms_policy(
        &fake.url(),
        2,
        "",
        &[("main", "p.wasm", 100, "default_class = \"batch\"")],
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, &good).unwrap();
    let m = Maitre::spawn(dir, policy.clone(), &[]);
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
                move || std::fs::write(&policy, &text).unwrap()
            }),
            vec!["policy.toml:", "weight"],
        ),
        (
            "a config the plugin's init rejects",
            Box::new({
                let policy = policy.clone();
                let text = good.replace("default_class = \"batch\"", "bogus_key = 1");
                move || std::fs::write(&policy, &text).unwrap()
            }),
            vec!["refused its [policy.config]", "bogus_key"],
        ),
        (
            "a missing plugin file",
            Box::new({
                let policy = policy.clone();
                let text = good.replace("p.wasm", "later.wasm");
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
            vec!["p.wasm", "does not match maitre's policy interface"],
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
    std::fs::write(&policy, good.replace("p.wasm", "later.wasm")).unwrap();
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

    let text = metrics_text(&m).await;
    let failed = metric(&text, "maitre_reloads_total", "result=\"failed\"").unwrap();
    assert!(
        failed >= failures + 1.0,
        "{failed} failed reloads counted, {failures}+1 expected"
    );
    assert!(metric(&text, "maitre_reloads_total", "result=\"ok\"").unwrap() >= 2.0);
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
    let text = arms_policy(
        &fake.url(),
        2,
        "",
        &[("main", "ra.wasm", 100, "rt_reserved_slots = 1")],
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, text).unwrap();
    let m = Maitre::spawn(dir, policy, &[]);

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
        std::fs::write(&ra_path, &bytes).unwrap();
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
    let text = metrics_text(&m).await;
    assert_eq!(
        metric(&text, "maitre_reloads_total", "result=\"ok\""),
        Some(6.0),
        "3 POST /reload + 3 file changes"
    );
    assert_eq!(
        metric(&text, "maitre_reloads_total", "result=\"failed\""),
        Some(0.0)
    );
}

// ---------------------------------------------------------------------------
// (c) The A/B split follows the weights; keys are sticky.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_split_follows_weights_and_keys_are_sticky() {
    let fake = fake(2, 0).await;
    let text = arms_policy(
        &fake.url(),
        2,
        "",
        &[
            ("alpha", "builtin:fifo", 70, ""),
            ("beta", "builtin:fifo", 30, ""),
        ],
    );
    let m = Arc::new(Maitre::start(&text));
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
    let flipped = text
        .replace("weight = 70", "weight = 30x")
        .replace("weight = 30\n", "weight = 70\n")
        .replace("weight = 30x", "weight = 30");
    std::fs::write(&m.policy, flipped).unwrap();
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
    let text = arms_policy(
        &fake.url(),
        2,
        "[ab]\nmode = \"switchback\"\nwindow_seconds = 0.3\n",
        &[
            (
                "alpha",
                "builtin:reserved-aging",
                50,
                "rt_reserved_slots = 1",
            ),
            ("beta", "builtin:fifo", 50, ""),
        ],
    );
    let m = Maitre::start(&text);
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
}

// ---------------------------------------------------------------------------
// (d) /metrics, parsed by the real Prometheus parsers.

#[tokio::test]
async fn metrics_parse_with_the_prometheus_parsers() {
    let fake = fake(2, 1).await;
    let m = Maitre::start(&arms_policy(
        &fake.url(),
        2,
        "",
        &[(
            "main",
            "builtin:reserved-aging",
            100,
            "rt_reserved_slots = 1",
        )],
    ));
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

// ---------------------------------------------------------------------------
// (e) The bearer token guards live control; a non-loopback admin needs one.

#[tokio::test]
async fn token_guards_mutating_endpoints() {
    let fake = fake(2, 1).await;
    let m = Maitre::start(&arms_policy(
        &fake.url(),
        2,
        "",
        &[
            ("alpha", "builtin:fifo", 50, ""),
            ("beta", "builtin:fifo", 50, ""),
        ],
    ));
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

/// Runs `maitre serve` with its own environment; returns the child and the
/// admin port once it serves, or its exit status and stderr if it exits.
fn serve_with_env(
    policy: &Path,
    args: &[&str],
    token_env: Option<&str>,
) -> Result<(std::process::Child, u16), (std::process::ExitStatus, String)> {
    use std::io::{BufRead, BufReader};
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_maitre"));
    cmd.arg("serve")
        .arg("--policy")
        .arg(policy)
        .args(args)
        .env("MAITRE_LOG", "info")
        .env_remove("MAITRE_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(t) = token_env {
        cmd.env("MAITRE_ADMIN_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("start maitre");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.find("admin=") {
                let addr = line[i + 6..].split_whitespace().next().unwrap_or("");
                if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                    let _ = tx.send(Ok(port));
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(Err(all));
    });
    match rx
        .recv_timeout(T)
        .expect("maitre neither served nor exited")
    {
        Ok(port) => Ok((child, port)),
        Err(log) => Err((child.wait().unwrap(), log)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_admin_needs_a_token() {
    let fake = fake(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, policy_text_without_token(&fake.url())).unwrap();

    // No token: refused, saying why and how to fix it.
    let (code, log) = serve_with_env(&policy, &["--admin-listen", "0.0.0.0:0"], None)
        .map(|_| ())
        .expect_err("maitre must refuse a non-loopback admin without a token");
    assert!(!code.success());
    assert!(
        log.contains("is not a loopback address") && log.contains("MAITRE_ADMIN_TOKEN"),
        "{log}"
    );

    // MAITRE_ADMIN_TOKEN: serves, and the token guards control, also after
    // a reload (the file has no token; the environment's stays in force).
    let (mut child, port) =
        serve_with_env(&policy, &["--admin-listen", "0.0.0.0:0"], Some("env-token"))
            .expect("maitre serves with MAITRE_ADMIN_TOKEN");
    let admin = format!("http://127.0.0.1:{port}");
    let c = client();
    let reload = |token: Option<&'static str>| {
        let mut r = c.post(format!("{admin}/reload"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(reload(None).await, 401);
    assert_eq!(reload(Some("env-token")).await, 200);
    assert_eq!(reload(None).await, 401, "a reload must not drop the token");
    assert_eq!(reload(Some("env-token")).await, 200);
    let _ = child.kill();
    let _ = child.wait();

    // Loopback needs no token.
    let (mut child, port) = serve_with_env(&policy, &["--admin-listen", "127.0.0.1:0"], None)
        .expect("loopback admin without token serves");
    let r = c
        .post(format!("http://127.0.0.1:{port}/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
}

fn policy_text_without_token(upstream: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[upstream]\nurl = \"{upstream}\"\nslots = 1\n\n[[policy]]\nname = \"main\"\nplugin = \"builtin:fifo\"\n"
    )
}

// ---------------------------------------------------------------------------
// (f) `maitre ab` prints the comparison of a running maitre.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maitre_ab_prints_both_arms() {
    let fake = fake(2, 1).await;
    let m = Maitre::start(&arms_policy(
        &fake.url(),
        2,
        "",
        &[
            (
                "reserved",
                "builtin:reserved-aging",
                50,
                "rt_reserved_slots = 0",
            ),
            ("fifo", "builtin:fifo", 50, ""),
        ],
    ));
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
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_maitre"))
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
                .find(|f| f.len() == 14 && f[0] == arm && f[1] == class)
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
        }
    }
    assert!(sent.keys().any(|(a, _)| a == "reserved") && sent.keys().any(|(a, _)| a == "fifo"));
    // An unreachable admin is a clear error.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_maitre"))
        .args(["ab", "--admin", "http://127.0.0.1:9", "--window", "60"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

/// The A/B example is valid as shipped: `maitre check` loads both plugins.
#[test]
fn ab_example_checks() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ab-test.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_maitre"))
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
