//! A fleet of model servers, three ways of placing requests on it, one run:
//! how many model loads does each cause, and what do they cost?
//!
//! Each setup is one maitre (the real binary) in front of its own fleet of 4
//! upstream models (in this process) with 2 slots each, 6 models on disk
//! (`fake-m0` … `fake-m5`), at most 2 loaded per backend (the least
//! recently used one evicted), a model load of `LOAD_MS` (3 s; one load at a
//! time per backend), 20 ms per token. Every backend starts with two models
//! loaded (backend i: m(2i mod 6) and m(2i+1 mod 6), so all six are resident
//! somewhere and m0, m1 twice); maitre is told `max_loaded_models = 2` and
//! polls `/api/ps` at its default interval.
//!
//! The setups, side by side in the same run (same machine noise):
//! - **host choice**: a built-in that names no backend, so the host places
//!   each start (a free slot where the model is loaded, else room to load
//!   it, else the least busy): `fifo`, and `reserved-aging` with one
//!   real-time slot (`rt_reserved_slots = 1`);
//! - **round-robin**: `plugins/bench/round-robin` (built here from source),
//!   FIFO with backends named in rotation, blind to residency;
//! - **fair-share**: the built-in, three batch tenants and one real-time one.
//!
//! Plus an **idle** fleet (the same 4 backends, host choice, no batch load)
//! that receives the same real-time arrivals: the idle TTFT of this run.
//! The plugin of every row (spec, sha256, interface) is printed from
//! `/status`, so a re-run after the built-ins change shows what ran.
//!
//! The load, field-like and identical for every setup (seeded):
//! - batch (≈ 90 %): `BATCH_LOOPS` closed client loops per setup sending
//!   non-streaming jobs of 20–60 tokens back to back (more loops than slots:
//!   a queue always waits), each for a model drawn from a Zipf law over the
//!   six models (weight 1/rank^`ZIPF_S`; s = 1: m0 41 %, m1 20 %, m2 14 %,
//!   m3 10 %, m4 8 %, m5 7 %), tenants `t0`–`t2` by loop;
//! - real-time (≈ 10 %): streaming chat on the most popular model (m0),
//!   5–15 tokens, exponential arrivals with mean `RT_MEAN_S`, tenant `chat`.
//!
//! Measured after `WARMUP_S`, over `DURATION_S`: model loads per minute
//! (the upstream models' own count of loads, over the whole fleet; maitre's
//! `maitre_backend_model_loads_total` beside it as a cross-check), real-time
//! TTFT (request sent → first body byte) p50 / p99, and complete batch
//! answers per minute (whole fleet).
//!
//! Targets (issue 10): residency-aware routing makes at least 5× fewer loads
//! than round-robin; real-time p99 within 50 ms of idle when a real-time slot
//! is free (the reserved-aging row: one slot is kept for real-time).
//!
//! `cargo bench -p maitre --bench fleet`; knobs (environment): DURATION_S
//! (60: a short run, ~1.5 min in all; 180 for the README table, ~3.5 min), WARMUP_S (15),
//! LOAD_MS (3000), BATCH_LOOPS (12), RT_MEAN_S (1.0), ZIPF_S (1.0), SEED (42).

#[path = "../build/plugin_cargo.rs"]
mod plugin_cargo;

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use maitre_testkit::{Arm, Backend, Maitre, ModelConfig, PolicyFile, Scrape, UpstreamModel};

const BACKENDS: usize = 4;
const SLOTS: u32 = 2;
const MODELS: usize = 6;
const MAX_LOADED: u32 = 2;
const TOKEN_MS: u64 = 20;
const BATCH_TOKENS: (u64, u64) = (20, 60);
const RT_TOKENS: (u64, u64) = (5, 15);
const TENANT_HEADER: &str = "X-Tenant";
/// Name of the round-robin row (the reference of the loads ratio).
const ROUND_ROBIN: &str = "round-robin";

#[derive(Clone)]
struct Knobs {
    duration: f64,
    warmup: f64,
    load_ms: u64,
    loops: usize,
    rt_mean: f64,
    zipf_s: f64,
    seed: u64,
}

fn model(i: usize) -> String {
    format!("fake-m{i}")
}

/// A Zipf law over the models: index drawn with weight 1/(rank)^s.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let w: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(s)).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        Zipf(
            w.iter()
                .map(|x| {
                    acc += x / total;
                    acc
                })
                .collect(),
        )
    }
    fn share(&self, i: usize) -> f64 {
        self.0[i] - if i == 0 { 0.0 } else { self.0[i - 1] }
    }
    fn draw(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.0.len() - 1)
    }
}

/// What one setup measured.
#[derive(Default)]
struct Record {
    /// (arrival offset s, TTFT ms) of complete real-time answers.
    rt: Vec<(f64, f64)>,
    rt_bad: usize,
    /// End offsets (s) of complete batch answers.
    batch_done: Vec<f64>,
    batch_bad: usize,
}

type Shared = Arc<Mutex<Record>>;

fn body(model: &str, tokens: u64, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "prompt": "summarise this article", "stream": stream, "options": {"num_predict": tokens}})
}

/// One batch client loop: a job, then the next, until `end`.
#[allow(clippy::too_many_arguments)]
async fn batch_loop(
    c: reqwest::Client,
    url: String,
    tenant: String,
    mut rng: Rng,
    zipf: Arc<Zipf>,
    t0: Instant,
    end: Instant,
    rec: Shared,
) {
    tokio::time::sleep_until(t0.into()).await;
    while Instant::now() < end {
        let m = model(zipf.draw(&mut rng));
        let tokens = rng.range(BATCH_TOKENS.0, BATCH_TOKENS.1);
        let r = c
            .post(format!("{url}/api/generate"))
            .header("x-priority", "batch")
            .header(TENANT_HEADER, &tenant)
            .json(&body(&m, tokens, false))
            .send()
            .await;
        let ok = match r {
            Ok(r) if r.status() == 200 => r
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|b| b["done"] == true && b["eval_count"] == tokens),
            Ok(_) | Err(_) => false,
        };
        let at = t0.elapsed().as_secs_f64();
        if ok {
            rec.lock().unwrap().batch_done.push(at);
        } else {
            rec.lock().unwrap().batch_bad += 1;
            // A refusal must not turn the loop into a busy spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One real-time streaming request at `offset` s after `t0`.
async fn realtime(
    c: reqwest::Client,
    url: String,
    t0: Instant,
    offset: f64,
    tokens: u64,
    rec: Shared,
) {
    tokio::time::sleep_until((t0 + Duration::from_secs_f64(offset)).into()).await;
    let req = c
        .post(format!("{url}/api/generate"))
        .header("x-priority", "realtime")
        .header(TENANT_HEADER, "chat")
        .json(&body(&model(0), tokens, true));
    let ttft = streamed_ttft(req).await;
    let mut g = rec.lock().unwrap();
    match ttft {
        Some(t) => g.rt.push((offset, t)),
        None => g.rt_bad += 1,
    }
}

/// Arrival offsets (s) and token counts of the real-time requests, the same
/// for every setup.
fn rt_schedule(k: &Knobs) -> Vec<(f64, u64)> {
    let mut rng = Rng::new(k.seed, 1_000);
    let mut t = 0.0;
    let mut v = Vec::new();
    loop {
        t += rng.exp(k.rt_mean);
        if t >= k.warmup + k.duration {
            return v;
        }
        v.push((t, rng.range(RT_TOKENS.0, RT_TOKENS.1)));
    }
}

/// One maitre and its fleet.
struct Setup {
    name: String,
    fakes: Vec<UpstreamModel>,
    maitre: Maitre,
    client: reqwest::Client,
}

/// Four upstream models (started on `upstream`, the runtime that serves
/// them) behind the maitre binary running `arm`.
fn setup(name: &str, arm: Arm, k: &Knobs, upstream: &tokio::runtime::Runtime) -> Setup {
    let fakes: Vec<UpstreamModel> = (0..BACKENDS)
        .map(|i| {
            let cfg = ModelConfig {
                slots: SLOTS as usize,
                token_delay: Duration::from_millis(TOKEN_MS),
                models: (0..MODELS).map(model).collect(),
                preloaded: vec![model((2 * i) % MODELS), model((2 * i + 1) % MODELS)],
                load_time: Duration::from_millis(k.load_ms),
                max_loaded: MAX_LOADED as usize,
                log_capacity: 0,
                ..ModelConfig::default()
            };
            upstream
                .block_on(UpstreamModel::start(cfg))
                .expect("start an upstream model")
        })
        .collect();
    let policy = PolicyFile::new("http://unused", 1)
        .backends(fakes.iter().enumerate().map(|(i, f)| {
            Backend::new(format!("b{i}"), f.url(), SLOTS).max_loaded_models(MAX_LOADED)
        }))
        .tenant_header(TENANT_HEADER)
        .arm(arm);
    Setup {
        name: name.to_string(),
        fakes,
        maitre: binary(&policy),
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

impl Setup {
    /// Model loads so far, by the upstream models' own count.
    fn loads(&self) -> u64 {
        self.fakes.iter().map(|f| f.loads()).sum()
    }

    /// maitre's count of model loads (`maitre_backend_model_loads_total`).
    async fn maitre_loads(&self) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.maitre.admin))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap();
        Scrape::parse(&text)
            .expect("valid /metrics")
            .sum("maitre_backend_model_loads_total", &[])
    }

    /// Waits (bounded) until maitre's `/status` shows both preloaded models
    /// of every backend, so the host's choice starts informed.
    async fn wait_residency(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.maitre.status().await;
            let ok = (0..BACKENDS).all(|i| {
                st["backends"][i]["loaded"]
                    .as_array()
                    .is_some_and(|l| l.len() >= MAX_LOADED as usize)
            });
            if ok || Instant::now() > deadline {
                if !ok {
                    eprintln!("fleet: {}: residency not in /status after 30 s", self.name);
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The arm's plugin as maitre reports it: spec, sha256 prefix,
    /// interface, and whether the host's FIFO replaced it (ejected).
    async fn plugin(&self) -> (String, String, String, bool) {
        let st = self.maitre.status().await;
        let a = &st["arms"][0];
        (
            a["plugin"].as_str().unwrap_or("?").to_string(),
            a["plugin_sha256"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(12)
                .collect(),
            a["interface"].as_str().unwrap_or("?").to_string(),
            a["fallback"] == true,
        )
    }
}

/// The round-robin plugin (plugins/bench/round-robin), built with a nested
/// cargo into the plugins' target dir.
fn round_robin_plugin(dir: &std::path::Path) -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml");
    let target = std::path::Path::new(maitre::builtins::PLUGIN_TARGET_DIR);
    let status = plugin_cargo::build_plugins(&manifest, target, &["bench-round-robin"])
        .status()
        .expect("run cargo for the round-robin plugin");
    assert!(status.success(), "building bench-round-robin failed");
    let built = plugin_cargo::output_dir(target).join("bench_round_robin.wasm");
    let copy = dir.join("round-robin.wasm");
    std::fs::copy(&built, &copy).expect("copy the round-robin plugin");
    copy
}

fn main() {
    let k = Knobs {
        duration: env_or("DURATION_S", 60.0),
        warmup: env_or("WARMUP_S", 15.0),
        load_ms: env_or("LOAD_MS", 3000),
        loops: env_or("BATCH_LOOPS", 12),
        rt_mean: env_or("RT_MEAN_S", 1.0),
        zipf_s: env_or("ZIPF_S", 1.0),
        seed: env_or("SEED", 42),
    };
    let dir = tempfile::tempdir().unwrap();
    let rr = round_robin_plugin(dir.path());
    let upstream = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let arms: Vec<(&str, Arm)> = vec![
        ("host choice, fifo", Arm::builtin("main", "fifo")),
        (
            "host choice, reserved-aging",
            Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1),
        ),
        (ROUND_ROBIN, Arm::new("main", rr.display().to_string())),
        ("fair-share", Arm::builtin("main", "fair-share")),
    ];
    let started = Instant::now();
    let setups: Vec<Setup> = arms
        .into_iter()
        .map(|(name, arm)| setup(name, arm, &k, &upstream))
        .collect();
    let idle = setup("idle", Arm::builtin("main", "fifo"), &k, &upstream);
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client_rt.block_on(run(&k, &setups, &idle, started));
    drop(setups);
    drop(idle);
    upstream.shutdown_timeout(Duration::from_secs(1));
}

async fn run(k: &Knobs, setups: &[Setup], idle: &Setup, started: Instant) {
    let all = || setups.iter().chain(std::iter::once(idle));
    for s in all() {
        s.wait_residency().await;
    }
    let mut plugins = Vec::new();
    for s in all() {
        plugins.push(s.plugin().await);
    }
    eprintln!(
        "fleet: {} maitre + {} upstream models up in {:.1} s; running {} s warm-up + {} s measured",
        setups.len() + 1,
        (setups.len() + 1) * BACKENDS,
        started.elapsed().as_secs_f64(),
        k.warmup,
        k.duration
    );

    let zipf = Arc::new(Zipf::new(MODELS, k.zipf_s));
    let t0 = Instant::now() + Duration::from_millis(200);
    let measure_from = t0 + Duration::from_secs_f64(k.warmup);
    let end = measure_from + Duration::from_secs_f64(k.duration);
    let recs: Vec<Shared> = (0..=setups.len()).map(|_| Shared::default()).collect();
    let schedule = rt_schedule(k);
    let mut tasks = Vec::new();
    for (si, s) in all().enumerate() {
        let url = s.maitre.url.clone();
        if si < setups.len() {
            for j in 0..k.loops {
                tasks.push(tokio::spawn(batch_loop(
                    s.client.clone(),
                    url.clone(),
                    format!("t{}", j % 3),
                    Rng::new(k.seed, j as u64),
                    zipf.clone(),
                    t0,
                    end,
                    recs[si].clone(),
                )));
            }
        }
        for &(offset, tokens) in &schedule {
            let (c, rec) = (s.client.clone(), recs[si].clone());
            tasks.push(tokio::spawn(realtime(
                c,
                url.clone(),
                t0,
                offset,
                tokens,
                rec,
            )));
        }
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let mut before = Vec::new();
    for s in all() {
        before.push((s.loads(), s.maitre_loads().await));
    }
    tokio::time::sleep_until(end.into()).await;
    let mut after = Vec::new();
    for s in all() {
        after.push((s.loads(), s.maitre_loads().await));
    }
    let mut ejected = Vec::new();
    for s in all() {
        ejected.push(s.plugin().await.3);
    }
    // Real-time requests still streaming get a moment to finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for t in &tasks {
        t.abort();
    }

    // The table.
    let from = k.warmup;
    let to = k.warmup + k.duration;
    let minutes = k.duration / 60.0;
    let take = |rec: &Shared| -> (Vec<f64>, usize, usize) {
        let g = rec.lock().unwrap();
        let ttft: Vec<f64> =
            g.rt.iter()
                .filter(|(at, _)| (from..to).contains(at))
                .map(|(_, t)| *t)
                .collect();
        let batch = g
            .batch_done
            .iter()
            .filter(|at| (from..=to).contains(*at))
            .count();
        (ttft, batch, g.batch_bad + g.rt_bad)
    };
    let (idle_ttft, _, idle_bad) = take(&recs[setups.len()]);
    let idle_p50 = pct(&idle_ttft, 0.5);
    let idle_p99 = pct(&idle_ttft, 0.99);
    let zipf_shares: Vec<String> = (0..MODELS)
        .map(|i| format!("m{i} {:.0}%", 100.0 * zipf.share(i)))
        .collect();
    println!();
    println!(
        "fleet: per setup 1 maitre + {BACKENDS} upstream models × {SLOTS} slots, {MODELS} models, at most {MAX_LOADED} loaded per backend, load {} ms, {TOKEN_MS} ms/token; {} batch loops (non-streaming, {}-{} tokens, Zipf s={} over the models: {}), RT streaming {}-{} tokens on m0, exponential arrivals mean {} s; {} s warm-up, {} s measured; seed {}",
        k.load_ms,
        k.loops,
        BATCH_TOKENS.0,
        BATCH_TOKENS.1,
        k.zipf_s,
        zipf_shares.join(", "),
        RT_TOKENS.0,
        RT_TOKENS.1,
        k.rt_mean,
        k.warmup,
        k.duration,
        k.seed
    );
    println!();
    println!(
        "{:<28} {:<40} {:>14} {:>19} {:>8}",
        "setup", "plugin", "sha256", "interface", "ejected"
    );
    for ((s, (spec, sha, iface, _)), out) in all().zip(&plugins).zip(&ejected) {
        let spec = if spec.ends_with("round-robin.wasm") {
            "plugins/bench/round-robin (file)"
        } else {
            spec
        };
        println!(
            "{:<28} {:<40} {:>14} {:>19} {:>8}",
            s.name,
            spec,
            sha,
            iface,
            if *out { "YES" } else { "no" }
        );
    }
    println!(
        "idle-fleet RT TTFT (same RT arrivals, no batch load): n {}  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms{}",
        idle_ttft.len(),
        idle_p50,
        idle_p99,
        pct(&idle_ttft, 1.0),
        if idle_bad > 0 {
            format!("  ({idle_bad} incomplete)")
        } else {
            String::new()
        }
    );
    println!();
    println!(
        "{:<28} {:>6} {:>10} {:>8} {:>9} | {:>5} {:>5} {:>9} {:>9} {:>10} | {:>10} {:>7} | {:>6}",
        "setup",
        "loads",
        "loads/min",
        "RR ÷",
        "(maitre)",
        "RT n",
        "RT %",
        "p50 ms",
        "p99 ms",
        "p99-idle",
        "batch/min",
        "batch n",
        "errors"
    );
    let loads_of = |i: usize| after[i].0 - before[i].0;
    let rr = setups.iter().position(|s| s.name == ROUND_ROBIN);
    let rr_loads = rr.map_or(f64::NAN, |i| loads_of(i) as f64);
    let mut verdicts = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let (ttft, batch, bad) = take(&recs[i]);
        let loads = loads_of(i);
        let p99 = pct(&ttft, 0.99);
        let ratio = rr_loads / (loads as f64).max(1.0);
        println!(
            "{:<28} {:>6} {:>10.1} {:>7.1}× {:>9} | {:>5} {:>5.1} {:>9.1} {:>9.1} {:>+10.1} | {:>10.1} {:>7} | {:>6}",
            s.name,
            loads,
            loads as f64 / minutes,
            ratio,
            after[i].1 - before[i].1,
            ttft.len(),
            100.0 * ttft.len() as f64 / (ttft.len() + batch).max(1) as f64,
            pct(&ttft, 0.5),
            p99,
            p99 - idle_p50,
            batch as f64 / minutes,
            batch,
            bad
        );
        if s.name.starts_with("host choice") {
            verdicts.push(format!(
                "  {}: {:.1}× fewer loads than round-robin (target ≥ 5×): {}",
                s.name,
                ratio,
                if ratio >= 5.0 { "MET" } else { "MISSED" }
            ));
        }
        if s.name.contains("reserved-aging") {
            verdicts.push(format!(
                "  {}: RT p99 - idle p50 = {:+.1} ms (target ≤ 50 ms, a real-time slot kept free): {}",
                s.name,
                p99 - idle_p50,
                if p99 - idle_p50 <= 50.0 { "MET" } else { "MISSED" }
            ));
        }
    }
    println!();
    println!(
        "loads = model loads in the measured window, the upstream models' own count, whole fleet; RR ÷ = round-robin's loads / this row's; (maitre) = maitre_backend_model_loads_total over the same window; p99-idle = RT p99 - idle p50; batch/min = complete batch answers per minute, whole fleet; errors = incomplete answers (whole run)"
    );
    for v in verdicts {
        println!("{v}");
    }
}
