//! Cost of one scheduling decision, interface 0.1.0 against 0.2.0 in the
//! same run: a `schedule` call into real plugins (compiled and sandboxed
//! exactly as `maitre serve` does, with limits generous enough that a busy
//! machine trips no deadline), with 100 / 1,000 /
//! 10,000 waiting requests and 3 running.
//!
//! - 0.1.0 copies the whole queue into the sandbox, with every model name
//!   as a string; the plugin is `compat-fifo-v0-1-0` (FIFO built against
//!   0.1.0, as plugins from before 0.2.0 are).
//! - 0.2.0 gets the host's default candidate window (per class the oldest and the
//!   highest-priority) and interned names; the plugins are the built-ins.
//!   (`admit` gets no waiting request at all, only per-class counts.)
//! - "1 free": one slot free, so the plugin orders its queue and starts one.
//!   "0 free, RT waits": every slot busy and a real-time request waits.
//!   "1 free kept for RT": reserved-aging under a batch flood, its one free
//!   slot kept for real-time work and only batch waiting: nothing can start.
//!   "flood, 2 free": the same flood as a slot frees: one batch
//!   request starts.
//! - "view build" builds the host's view the way the scheduler does (a
//!   replica of the private `Core::view_of`), whole or windowed.
//!
//! Targets (issue 10): < 20 µs median decision (view + call) at 100
//! waiting; >= 2,000 decisions/s while 10,000 wait.
//!
//! `cargo bench -p maitre --bench plugin_decision` (`WAITING=100` for one
//! queue length only)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use maitre::config::PluginSource;
use maitre::plugin::{Instance, PluginLimits, Runtime};
use maitre::policy::{Backend, Class, Running, View, Waiting};
use maitre::scheduler::queue::Queue;
use rustc_hash::FxHashMap;

#[path = "../build/plugin_cargo.rs"]
mod plugin_cargo;

const NOW_MS: u64 = 1_000_000;
const TOTAL_SLOTS: u32 = 4;
/// What the scheduler keeps per waiting request (the fields the view needs).
struct Entry {
    class: Class,
    priority: f64,
    model: Arc<str>,
    tenant: Option<Arc<str>>,
    stream: bool,
    num_predict: Option<i64>,
    arrival_ms: u64,
    enqueued_at: Instant,
    preemptions: u32,
}

/// `n` waiting requests: 1 in 50 real-time (none with `batch_only`),
/// arrivals spread over the last 50 s (below the default 60 s aging
/// threshold, so a waiting real-time request is first in line), listed
/// oldest first like the host does.
fn entries(
    n: usize,
    origin: Instant,
    model: &str,
    batch_only: bool,
) -> (FxHashMap<u64, Entry>, Queue) {
    let mut rng = Rng::new(7, n as u64);
    let mut arrivals: Vec<u64> = (0..n).map(|_| NOW_MS - rng.range(0, 50_000)).collect();
    arrivals.sort_unstable();
    let mut map = FxHashMap::default();
    let mut ids = Queue::default();
    for (i, a) in arrivals.into_iter().enumerate() {
        let id = 100 + i as u64;
        let rt = !batch_only && i % 50 == 49;
        map.insert(
            id,
            Entry {
                class: if rt { Class::Realtime } else { Class::Batch },
                priority: if rt { 1.0 } else { 0.0 },
                model: model.into(),
                tenant: None,
                stream: rt,
                num_predict: Some(300),
                arrival_ms: a,
                enqueued_at: origin + Duration::from_millis(a),
                preemptions: 0,
            },
        );
        ids.insert(id, map[&id].class, map[&id].priority);
    }
    (map, ids)
}

/// 2 batch and 1 real-time request running, or (`all_batch`) 3 batch:
/// then reserved-aging's batch cap (4 slots, 1 kept for real-time) is
/// reached and its one free slot is the reserved one.
fn running(all_batch: bool) -> Vec<Running> {
    let r = |id: u64, class: Class, started_ms: u64, tokens: u64, streaming: bool| Running {
        id,
        class,
        priority: if class == Class::Realtime { 1.0 } else { 0.0 },
        model: "llama3.2:3b-instruct-q4_K_M".into(),
        tenant: None,
        backend: 0,
        num_predict: Some(300),
        arrival_ms: started_ms - 500,
        started_ms,
        first_token_ms: Some(started_ms + 200),
        tokens,
        preemptible: !streaming,
        streaming,
        preemptions: 0,
    };
    vec![
        r(1, Class::Batch, NOW_MS - 4_000, 0, false),
        r(2, Class::Batch, NOW_MS - 1_000, 0, false),
        if all_batch {
            r(3, Class::Batch, NOW_MS - 2_000, 90, false)
        } else {
            r(3, Class::Realtime, NOW_MS - 2_000, 90, true)
        },
    ]
}

/// The scheduler's view of one arm, built like `Core::view_of`: the whole
/// queue, or the candidate window of the scheduler's own [`Queue`] with a
/// summary of the rest.
fn build_view(
    origin: Instant,
    map: &FxHashMap<u64, Entry>,
    queue: &Queue,
    running: &[Running],
    free: u32,
    window: Option<usize>,
) -> View {
    let ms_of = |t: Instant| t.saturating_duration_since(origin).as_millis() as u64;
    let (shown, beyond) = match window {
        None => (queue.iter().copied().collect(), Vec::new()),
        Some(w) => {
            let w = queue.window(w);
            let beyond = w.beyond(|id| map.get(&id).map(|e| e.arrival_ms));
            (w.ids, beyond)
        }
    };
    let waiting: Vec<Waiting> = shown
        .iter()
        .filter_map(|id| map.get(id).map(|e| (id, e)))
        .map(|(id, e)| Waiting {
            id: *id,
            class: e.class,
            priority: e.priority,
            model: e.model.clone(),
            tenant: e.tenant.clone(),
            stream: e.stream,
            num_predict: e.num_predict,
            arrival_ms: e.arrival_ms,
            enqueued_ms: ms_of(e.enqueued_at),
            preemptions: e.preemptions,
        })
        .collect();
    View {
        now_ms: NOW_MS,
        total_slots: TOTAL_SLOTS,
        free_slots: free,
        backends: vec![Backend::new(
            "http://127.0.0.1:11434".into(),
            TOTAL_SLOTS,
            free,
        )],
        running: running.to_vec(),
        waiting,
        beyond,
    }
}

struct Stats {
    median: f64,
    p99: f64,
    mean: f64,
}

fn stats(us: &[f64]) -> Stats {
    Stats {
        median: pct(us, 0.5),
        p99: pct(us, 0.99),
        mean: mean(us),
    }
}

/// A built-in plugin (0.2.0) by name, or the 0.1.0 FIFO (`compat`) built
/// here from plugins/compat.
async fn instance(name: &str) -> Instance {
    let rt = Runtime::global();
    let bytes = match name {
        "compat" => std::fs::read(compat_plugin()).expect("read the 0.1.0 plugin"),
        _ => maitre::builtins::bytes(name)
            .expect("a built-in plugin")
            .to_vec(),
    };
    let source = PluginSource::Builtin(name.into());
    let compiled = rt
        .compile_bytes(&bytes, source.to_string())
        .expect("plugin compiles");
    let config = vec![
        ("maitre.slots".to_string(), TOTAL_SLOTS.to_string()),
        ("maitre.arm".to_string(), "bench".to_string()),
    ];
    // Generous limits: this measures cost, and a busy machine must not
    // trip a deadline mid-run (0.1.0 at 10,000 waiting copies megabytes).
    let limits = PluginLimits {
        call_budget: 5_000,
        memory_bytes: 512 << 20,
        ..PluginLimits::default()
    };
    rt.instantiate(&compiled, limits, &config)
        .await
        .expect("instantiate")
}

/// Builds `compat-fifo-v0-1-0` (FIFO against 0.1.0) with a nested cargo
/// into the plugins' own target dir; returns its component.
fn compat_plugin() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml");
    let target = std::path::Path::new(maitre::builtins::PLUGIN_TARGET_DIR);
    let status = plugin_cargo::build_plugins(&manifest, target, &["compat-fifo-v0-1-0"])
        .status()
        .expect("run cargo for the 0.1.0 plugin");
    assert!(status.success(), "building compat-fifo-v0-1-0 failed");
    plugin_cargo::output_dir(target).join("compat_fifo_v0_1_0.wasm")
}

async fn time_schedule(inst: &mut Instance, view: &View, calls: usize) -> (Stats, usize) {
    let mut actions = 0;
    for _ in 0..200 {
        actions = inst.schedule(view).await.expect("schedule").len();
    }
    let mut us = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let a = inst.schedule(view).await.expect("schedule");
        us.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(a);
    }
    (stats(&us), actions)
}

fn main() {
    // The host's default `[limits] candidate_window`.
    let default_window = maitre::config::Limits::default().candidate_window;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Fewer calls where one costs milliseconds (0.1.0 at 10,000 waiting).
    let calls_for = |n: usize, whole: bool| match (n, whole) {
        (10_000, true) => 300,
        (n, _) if n >= 1000 => 2_000,
        _ => 10_000,
    };
    // `WAITING=100` (a comma-separated list) runs only those queue lengths,
    // e.g. under a profiler.
    let sizes: Vec<usize> = std::env::var("WAITING")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("WAITING is a list of numbers"))
                .collect()
        })
        .unwrap_or_else(|_| vec![100, 1000, 10_000]);
    rt.block_on(async {
        let origin = Instant::now() - Duration::from_millis(NOW_MS);
        let run = running(false);
        // (call, interface, waiting, stats, actions)
        let mut rows: Vec<(String, &str, usize, Stats, String)> = Vec::new();
        let mut compat = instance("compat").await;
        for &n in &sizes {
            let (map, ids) = entries(n, origin, "llama3.2:3b-instruct-q4_K_M", false);
            for (iface, window) in [("0.1.0", None), ("0.2.0", Some(default_window))] {
                let calls = calls_for(n, window.is_none());
                let mut us = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let t = Instant::now();
                    let v = build_view(origin, &map, &ids, &run, 1, window);
                    us.push(t.elapsed().as_secs_f64() * 1e6);
                    std::hint::black_box(v);
                }
                rows.push(("view build".into(), iface, n, stats(&us), "-".into()));
            }
            let whole = build_view(origin, &map, &ids, &run, 1, None);
            let (s, a) = time_schedule(&mut compat, &whole, calls_for(n, true)).await;
            rows.push(("fifo, 1 free".into(), "0.1.0", n, s, a.to_string()));
            let free1 = build_view(origin, &map, &ids, &run, 1, Some(default_window));
            let free0 = build_view(origin, &map, &ids, &run, 0, Some(default_window));
            let calls = calls_for(n, false);
            for plugin in ["fifo", "reserved-aging", "preemptive"] {
                let mut inst = instance(plugin).await;
                let (s, a) = time_schedule(&mut inst, &free1, calls).await;
                rows.push((format!("{plugin}, 1 free"), "0.2.0", n, s, a.to_string()));
                if plugin != "fifo" {
                    let (s, a) = time_schedule(&mut inst, &free0, calls).await;
                    rows.push((format!("{plugin}, 0 free, RT waits"), "0.2.0", n, s, a.to_string()));
                }
                if plugin == "reserved-aging" {
                    // A batch flood: the free slot is kept for real-time
                    // and only batch waits (the throughput bench's case).
                    let (map, ids) = entries(n, origin, "llama3.2:3b-instruct-q4_K_M", true);
                    let v = build_view(origin, &map, &ids, &running(true), 1, Some(default_window));
                    let (s, a) = time_schedule(&mut inst, &v, calls).await;
                    rows.push((format!("{plugin}, 1 free kept for RT"), "0.2.0", n, s, a.to_string()));
                    // The same flood as a slot frees: one batch request
                    // starts, and the rest of the order is not walked.
                    let two = running(true)[..2].to_vec();
                    let v = build_view(origin, &map, &ids, &two, 2, Some(default_window));
                    let (s, a) = time_schedule(&mut inst, &v, calls).await;
                    rows.push((format!("{plugin}, flood, 2 free"), "0.2.0", n, s, a.to_string()));
                }
            }
        }
        println!();
        println!(
            "plugin_decision: one schedule call (wasmtime, generous limits), {TOTAL_SLOTS} slots, 3 running (2 batch, 1 RT streaming), 1 in 50 waiting is RT; 0.1.0 = whole queue + strings (compat FIFO), 0.2.0 = window {default_window} + interned names (built-ins)"
        );
        println!("200 warm-up calls, then 10,000 timed calls (2,000 at 1,000+ waiting, 300 for 0.1.0 at 10,000)");
        println!();
        println!(
            "{:<36} {:>6} {:>8} {:>11} {:>9} {:>10} {:>8}",
            "call", "iface", "waiting", "median µs", "p99 µs", "mean µs", "actions"
        );
        for (name, iface, n, s, a) in &rows {
            println!(
                "{:<36} {:>6} {:>8} {:>11.2} {:>9.2} {:>10.2} {:>8}",
                name, iface, n, s.median, s.p99, s.mean, a
            );
        }
        let view = |iface: &str, n: usize| {
            rows.iter()
                .find(|r| r.0 == "view build" && r.1 == iface && r.2 == n)
                .map_or(0.0, |r| r.3.median)
        };
        let decision = |name: &str, iface: &str, n: usize| {
            rows.iter()
                .find(|r| r.0 == name && r.1 == iface && r.2 == n)
                .map_or(f64::NAN, |r| r.3.median + view(iface, n))
        };
        println!();
        println!("decision = view build + schedule call (medians)");
        for &n in &sizes {
            let old = decision("fifo, 1 free", "0.1.0", n);
            let new = decision("fifo, 1 free", "0.2.0", n);
            println!(
                "  fifo at {n:>6} waiting: 0.1.0 {old:>9.2} µs ({:>8.0}/s)  0.2.0 {new:>7.2} µs ({:>8.0}/s)  ratio {:.1}x",
                1e6 / old,
                1e6 / new,
                old / new
            );
        }
        println!("targets:");
        for name in ["fifo, 1 free", "reserved-aging, 1 free", "preemptive, 1 free"] {
            let at100 = decision(name, "0.2.0", 100);
            let per_s = 1e6 / decision(name, "0.2.0", 10_000);
            println!(
                "  {name} (0.2.0): {at100:.2} µs at 100 waiting (target < 20: {}), {per_s:.0} decisions/s at 10,000 (target >= 2,000: {})",
                if at100 < 20.0 { "MET" } else { "MISSED" },
                if per_s >= 2000.0 { "MET" } else { "MISSED" }
            );
        }
    });
}
