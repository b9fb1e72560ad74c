//! maitre in front of a fleet: three upstream models with different models
//! loaded. Requests land where their model is resident; a backend killed
//! mid-run loses no request that had sent nothing (it is retried on another
//! backend); `/api/tags` and `/api/ps` are merged (checked with the official
//! `ollama` client); the built-in plugins and a 0.1.0 plugin work with several
//! backends; `maitre check`, `/status` and metrics show every backend.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(20);

/// The three backends: each has one model of its own loaded and on disk,
/// and a shared one on disk only.
const BACKENDS: [(&str, &str); 3] = [("a", "fake-alpha"), ("b", "fake-beta"), ("c", "fake-gamma")];

struct Fleet3 {
    fakes: Vec<UpstreamModel>,
    m: Maitre,
}

/// An upstream model with `own` loaded and on disk, and `fake-shared` on
/// disk, keeping at most 2 models loaded.
fn model_cfg(own: &str, slots: usize, token_ms: u64) -> ModelConfig {
    ModelConfig {
        slots,
        token_delay: Duration::from_millis(token_ms),
        models: vec![own.into(), "fake-shared".into()],
        preloaded: vec![own.into()],
        load_time: Duration::from_millis(400),
        max_loaded: 2,
        ..ModelConfig::default()
    }
}

/// Three upstream models behind maitre, with `arm`; probes and polls fast.
async fn fleet3(arm: Arm, token_ms: u64) -> Fleet3 {
    fleet3_keeping(arm, token_ms, 2).await
}

/// [`fleet3`] with backends that keep at most `max_loaded` models loaded.
async fn fleet3_keeping(arm: Arm, token_ms: u64, max_loaded: u32) -> Fleet3 {
    let mut fakes = Vec::new();
    for (_, own) in BACKENDS {
        let cfg = ModelConfig {
            max_loaded: max_loaded as usize,
            ..model_cfg(own, 2, token_ms)
        };
        fakes.push(
            UpstreamModel::start(cfg)
                .await
                .expect("start an upstream model"),
        );
    }
    let policy =
        PolicyFile::new("http://unused", 1)
            .backends(BACKENDS.iter().zip(&fakes).map(|((name, _), f)| {
                Backend::new(*name, f.url(), 2).max_loaded_models(max_loaded)
            }))
            .fleet(Fleet {
                probe_interval_ms: Some(200),
                ps_interval_ms: Some(200),
                ..Fleet::default()
            })
            .arm(arm);
    let m = start(&policy);
    let f = Fleet3 { fakes, m };
    f.wait_residency().await;
    f
}

impl Fleet3 {
    /// Waits until `/status` shows each backend's own model loaded.
    async fn wait_residency(&self) {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let st = self.m.status().await;
            let ok = BACKENDS.iter().enumerate().all(|(i, (_, own))| {
                st["backends"][i]["loaded"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|m| m["name"] == format!("{own}:latest")))
            });
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "residency never showed in /status: {st}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A non-streaming generation for `model`, tagged.
fn gen_for(c: &reqwest::Client, url: &str, model: &str, tag: &str) -> reqwest::RequestBuilder {
    c.post(format!("{url}/api/generate"))
        .header("x-test-tag", tag)
        .json(&json!({"model": model, "prompt": "hi", "stream": false, "options": {"num_predict": 3}}))
}

/// Sends every request at once; returns each one's status, backend header
/// and body.
async fn all(reqs: Vec<reqwest::RequestBuilder>) -> Vec<(u16, String, Value)> {
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            tokio::spawn(async move {
                let resp = r.send().await.expect("an answer");
                let status = resp.status().as_u16();
                let backend = resp
                    .headers()
                    .get("x-maitre-backend")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let text = resp.text().await.unwrap();
                let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                (status, backend, body)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn requests_land_where_their_model_is_resident() {
    let f = fleet3(Arm::builtin("main", "fifo"), 20).await;
    let c = client();
    // Two rounds of two requests per model, all at once: as many as each
    // model's backend has slots (a 0.1.0 policy starts a request on any
    // free slot; the host picks the backend among those with one).
    for round in 0..2 {
        let mut reqs = Vec::new();
        for i in 0..2 {
            for (_, own) in BACKENDS {
                reqs.push(gen_for(&c, &f.m.url, own, &format!("{own}-{round}-{i}")));
            }
        }
        for (status, backend, body) in all(reqs).await {
            assert_eq!(status, 200, "{body}");
            let model = body["model"].as_str().unwrap();
            let want = BACKENDS.iter().find(|(_, own)| *own == model).unwrap().0;
            assert_eq!(backend, want, "{model} ran on {backend}");
        }
    }
    for (fake, (_, own)) in f.fakes.iter().zip(BACKENDS) {
        assert_eq!(
            fake.loads(),
            0,
            "no model was swapped in on {own}'s backend"
        );
        let models: std::collections::BTreeSet<String> = fake
            .log()
            .iter()
            .filter(|e| e.kind == EventKind::Started)
            .map(|e| e.model.clone())
            .collect();
        assert_eq!(models.into_iter().collect::<Vec<_>>(), [own]);
    }
    // A model loaded nowhere is loaded once, then found where it is.
    let first = all(vec![gen_for(&c, &f.m.url, "fake-shared", "shared-0")]).await;
    let home = first[0].1.clone();
    for i in 1..3 {
        let r = all(vec![gen_for(
            &c,
            &f.m.url,
            "fake-shared",
            &format!("shared-{i}"),
        )])
        .await;
        assert_eq!((r[0].0, &r[0].1), (200, &home), "{:?}", r[0].2);
    }
    // The request log names the backend.
    assert!(
        f.m.logs().iter().any(|l| l.contains("request ended")
            && l.contains("model=fake-beta")
            && l.contains("backend=\"b\"")),
        "{:#?}",
        f.m.logs()
    );
    let loads: u64 = f.fakes.iter().map(UpstreamModel::loads).sum();
    assert_eq!(loads, 1, "fake-shared was loaded once, on {home}");
    let scrape = Scrape::get(&f.m.admin).await;
    let requests = scrape.get_exact("maitre_backend_requests_total", &[("backend", &home)]);
    assert!(requests.unwrap() >= 7.0, "{}", scrape.text);
    assert!(
        scrape.get_exact("maitre_backend_model_loads_total", &[("backend", &home)]) >= Some(1.0)
    );
}

#[tokio::test]
async fn a_backend_killed_mid_run_loses_no_request() {
    let mut f = fleet3(Arm::builtin("main", "fifo"), 10).await;
    let c = client();
    // The shared model is loaded nowhere yet: every request waits through a
    // load and then a long prompt, sending nothing to its client meanwhile.
    let reqs: Vec<_> = (0..12)
        .map(|i| {
            gen_for(&c, &f.m.url, "fake-shared", &format!("r{i}")).header("x-fake-prompt-ms", "600")
        })
        .collect();
    let answers = tokio::spawn(all(reqs));
    // Kill backend b once it holds requests.
    assert!(
        f.fakes[1]
            .wait_until(T, |l| l
                .iter()
                .filter(|e| e.kind == EventKind::Received)
                .count()
                >= 2)
            .await,
        "b never got a request"
    );
    let killed: Vec<String> = f.fakes[1]
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Received)
        .filter_map(|e| e.tag.clone())
        .collect();
    let b_addr = f.fakes[1].addr();
    drop(f.fakes.remove(1));
    let answers = answers.await.unwrap();
    let mut per_backend = BTreeMap::new();
    for (status, backend, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["done"], true, "{body}");
        *per_backend.entry(backend.clone()).or_insert(0) += 1;
    }
    assert_eq!(answers.len(), 12);
    assert!(!per_backend.contains_key("b"), "{per_backend:?}");
    // What b held was answered by a or c.
    for tag in &killed {
        let done = f.fakes.iter().any(|fake| {
            fake.log()
                .iter()
                .any(|e| e.kind == EventKind::Finished && e.tag.as_ref() == Some(tag))
        });
        assert!(done, "{tag} was lost with b");
    }
    let scrape = Scrape::get(&f.m.admin).await;
    let moved = scrape.get_exact("maitre_backend_failovers_total", &[("backend", "b")]);
    assert!(moved.unwrap() >= killed.len() as f64, "{}", scrape.text);
    let st = f.m.status().await;
    assert_eq!(st["backends"][1]["healthy"], false, "{st}");
    assert_eq!(
        scrape.get_exact("maitre_backend_up", &[("backend", "b")]),
        Some(0.0)
    );
    // b gets nothing more while down.
    let later = all((0..4)
        .map(|i| gen_for(&c, &f.m.url, "fake-shared", &format!("later{i}")))
        .collect())
    .await;
    assert!(
        later.iter().all(|(s, b, _)| *s == 200 && b != "b"),
        "{later:?}"
    );
    // b back on its address: its probe says so, and its model goes to it again.
    let listener = tokio::net::TcpListener::bind(b_addr).await.unwrap();
    let _b = UpstreamModel::start_on(listener, model_cfg("fake-beta", 2, 10))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while f.m.status().await["backends"][1]["healthy"] != true {
        assert!(tokio::time::Instant::now() < deadline, "b never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = all(vec![gen_for(&c, &f.m.url, "fake-beta", "back")]).await;
    assert_eq!((back[0].0, back[0].1.as_str()), (200, "b"), "{back:?}");
}

#[tokio::test]
async fn merged_tags_and_ps_through_the_official_client() {
    let f = fleet3(Arm::builtin("main", "reserved-aging"), 5).await;
    run_python(
        "fleet.py",
        &f.m.url,
        &[
            (
                "ON_DISK",
                "fake-alpha:latest,fake-beta:latest,fake-gamma:latest,fake-shared:latest",
            ),
            (
                "LOADED",
                "fake-alpha:latest,fake-beta:latest,fake-gamma:latest",
            ),
        ],
        "python fleet ok",
    )
    .await;
    // /api/ps names the backend of each model; /api/version is the fleet's lowest.
    let c = client();
    let ps = get_json(&c, &format!("{}/api/ps", f.m.url)).await;
    let by_backend: BTreeMap<String, String> = ps["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["backend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(by_backend["fake-beta:latest"], "b", "{ps}");
    let v = get_json(&c, &format!("{}/api/version", f.m.url)).await;
    assert_eq!(v["version"], "0.33.0-fake");
    // Every backend pulled.
    for fake in &f.fakes {
        assert!(
            fake.log()
                .iter()
                .any(|e| e.path == "/api/pull" && e.model == "fake-shared")
        );
    }
    // X-Maitre-Backend sends a request to one backend only; an unknown name is refused.
    let r = c
        .post(format!("{}/api/pull", f.m.url))
        .header("x-maitre-backend", "c")
        .json(&json!({"model": "fake-one", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pulled: Vec<usize> = (0..3)
        .filter(|&i| f.fakes[i].log().iter().any(|e| e.model == "fake-one"))
        .collect();
    assert_eq!(pulled, [2]);
    let r = c
        .get(format!("{}/api/tags", f.m.url))
        .header("x-maitre-backend", "nope")
        .send()
        .await
        .unwrap();
    let e = error_of(r, 400).await;
    assert!(e.contains("the backends are a, b, c"), "{e}");
}

#[tokio::test]
async fn the_built_in_plugins_work_with_several_backends() {
    for plugin in ["fifo", "reserved-aging", "preemptive"] {
        let f = fleet3(Arm::builtin("main", plugin), 5).await;
        let c = client();
        let mut reqs = Vec::new();
        for i in 0..9 {
            let (_, own) = BACKENDS[i % 3];
            let p = if i % 2 == 0 { "realtime" } else { "batch" };
            reqs.push(gen_for(&c, &f.m.url, own, &format!("{plugin}-{i}")).header("x-priority", p));
        }
        let answers = all(reqs).await;
        let backends: std::collections::BTreeSet<&str> =
            answers.iter().map(|(_, b, _)| b.as_str()).collect();
        assert!(
            answers.iter().all(|(s, _, _)| *s == 200),
            "{plugin}: {answers:?}"
        );
        assert_eq!(
            backends.len(),
            3,
            "{plugin} used every backend: {answers:?}"
        );
        let st = f.m.status().await;
        assert!(
            st["arms"][0]["fallback"] == false,
            "{plugin} was ejected: {st}"
        );
    }
}

#[tokio::test]
async fn a_plugin_built_for_0_1_0_works_with_several_backends() {
    // 0.1.0 knows one upstream: its starts name no backend, and the host
    // places each one.
    let plugin = crate::common::hostile_plugins::hostile_plugin("compat-fifo-v0-1-0");
    let f = fleet3(Arm::new("old", plugin.to_string_lossy()), 5).await;
    let c = client();
    let reqs = (0..9)
        .map(|i| gen_for(&c, &f.m.url, BACKENDS[i % 3].1, &format!("old-{i}")))
        .collect();
    let answers = all(reqs).await;
    assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
    let used: std::collections::BTreeSet<&str> =
        answers.iter().map(|(_, b, _)| b.as_str()).collect();
    assert_eq!(used.len(), 3, "every backend served: {answers:?}");
    let st = f.m.status().await;
    assert_eq!(st["arms"][0]["interface"], "maitre:policy@0.1.0", "{st}");
    assert_eq!(st["arms"][0]["fallback"], false, "{st}");
}

#[tokio::test]
async fn reserved_aging_sends_each_model_to_its_backend_without_swaps() {
    // Each backend keeps one model (its own): a request for it anywhere
    // else evicts. Reserved-aging keeps one real-time slot per backend, so
    // one batch request at a time runs on each.
    let arm = Arm::builtin("main", "reserved-aging").config("group_max_wait_ms", 20_000);
    let f = fleet3_keeping(arm, 30, 1).await;
    let c = client();
    // More alpha requests than a has batch slots, all at once: the host's
    // own choice would spill the extra ones onto b and c, loading alpha there.
    let mut reqs = Vec::new();
    for i in 0..6 {
        reqs.push(gen_for(&c, &f.m.url, "fake-alpha", &format!("alpha-{i}")));
    }
    for (_, own) in &BACKENDS[1..] {
        for i in 0..2 {
            reqs.push(gen_for(&c, &f.m.url, own, &format!("{own}-{i}")));
        }
    }
    for (status, backend, body) in all(reqs).await {
        assert_eq!(status, 200, "{body}");
        let model = body["model"].as_str().unwrap();
        let want = BACKENDS.iter().find(|(_, own)| *own == model).unwrap().0;
        assert_eq!(backend, want, "{model} ran on {backend}");
    }
    let loads: Vec<u64> = f.fakes.iter().map(UpstreamModel::loads).collect();
    assert_eq!(loads, [0, 0, 0], "no model was swapped in");
    let st = f.m.status().await;
    assert!(st["arms"][0]["fallback"] == false, "ejected: {st}");
}

#[tokio::test]
async fn check_and_status_list_every_backend() {
    let out = std::process::Command::new(BIN)
        .args(["check", "examples/fleet.toml"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["gpu-a", "gpu-b", "cpu"] {
        assert!(stdout.contains(&format!("backend {name}")), "{stdout}");
    }
    assert!(stdout.contains("3 backend(s), 7 slots in all"), "{stdout}");
    // --upstream cannot stand for three backends.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--policy",
            "examples/fleet.toml",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("lists 3 backends (gpu-a, gpu-b, cpu)"),
        "{err}"
    );
    // /status: name, url, slots, busy, health, loaded models.
    let f = fleet3(Arm::builtin("main", "fifo"), 5).await;
    let st = f.m.status().await;
    assert_eq!(st["slots"], 6);
    for (i, (name, own)) in BACKENDS.iter().enumerate() {
        let b = &st["backends"][i];
        assert_eq!(b["name"], *name);
        assert_eq!(b["url"], format!("{}/", f.fakes[i].url()));
        assert_eq!(
            (b["slots"].clone(), b["busy"].clone()),
            (json!(2), json!(0))
        );
        assert_eq!(b["healthy"], true);
        assert_eq!(b["version"], "0.33.0-fake");
        assert_eq!(b["loaded"][0]["name"], format!("{own}:latest"));
        assert!(
            b["loaded"][0]["size"].as_u64().is_some() && b["loaded"][0]["expires_at"].is_string()
        );
    }
    let scrape = Scrape::get(&f.m.admin).await;
    for (name, _) in BACKENDS {
        assert_eq!(
            scrape.get_exact("maitre_backend_slots", &[("backend", name)]),
            Some(2.0)
        );
        assert_eq!(
            scrape.get_exact("maitre_backend_up", &[("backend", name)]),
            Some(1.0)
        );
        assert_eq!(
            scrape.get_exact("maitre_backend_slots_busy", &[("backend", name)]),
            Some(0.0)
        );
    }
}
