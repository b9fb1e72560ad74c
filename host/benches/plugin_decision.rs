//! Cost of one scheduling decision: a `schedule` call into the real built-in
//! plugins (compiled and sandboxed exactly as `maitre serve` does, with the
//! default limits), with 10 / 100 / 1,000 waiting requests and 3 running.
//!
//! - "1 free": one slot free, so the plugin orders the queue and starts one.
//! - "0 free, RT waits": every slot busy and a real-time request waits
//!   (preemptive picks a victim; the others have nothing to do).
//! - "fifo, 0 free" returns before looking at the queue: what remains is
//!   the host → wasm call itself: converting the host's view to the 0.1.0
//!   interface types, copying it in and the actions out.
//! - "view build" builds the host's view the way the scheduler does (a
//!   replica of the private `Core::view`: one `Waiting` per queued entry,
//!   strings shared as `Arc<str>`).
//!
//! Target (design.md): < 20 µs median with 100 waiting.
//!
//! `cargo bench -p maitre --bench plugin_decision`

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use maitre::config::PluginSource;
use maitre::plugin::{Instance, PluginLimits, Runtime};
use maitre::policy::{Backend, Class, Running, View, Waiting};

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

/// `n` waiting requests: 1 in 50 real-time, arrivals spread over the last
/// 50 s (below the default 60 s aging threshold, so a waiting real-time
/// request is first in line), listed oldest first like the host does.
fn entries(n: usize, origin: Instant, model: &str) -> (HashMap<u64, Entry>, BTreeSet<u64>) {
    let mut rng = Rng::new(7, n as u64);
    let mut arrivals: Vec<u64> = (0..n).map(|_| NOW_MS - rng.range(0, 50_000)).collect();
    arrivals.sort_unstable();
    let mut map = HashMap::new();
    let mut ids = BTreeSet::new();
    for (i, a) in arrivals.into_iter().enumerate() {
        let id = 100 + i as u64;
        let rt = i % 50 == 49;
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
        ids.insert(id);
    }
    (map, ids)
}

fn running() -> Vec<Running> {
    let r = |id: u64, class: Class, started_ms: u64, tokens: u64, streaming: bool| Running {
        id,
        class,
        priority: if class == Class::Realtime { 1.0 } else { 0.0 },
        model: "llama3.2:3b-instruct-q4_K_M".into(),
        tenant: None,
        backend: 0,
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
        r(3, Class::Realtime, NOW_MS - 2_000, 90, true),
    ]
}

/// The scheduler's view of one arm, built like `Core::view`.
fn build_view(
    origin: Instant,
    map: &HashMap<u64, Entry>,
    ids: &BTreeSet<u64>,
    running: &[Running],
    free: u32,
) -> View {
    let ms_of = |t: Instant| t.saturating_duration_since(origin).as_millis() as u64;
    let waiting = ids
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
        backends: vec![Backend {
            name: "http://127.0.0.1:11434".into(),
            total_slots: TOTAL_SLOTS,
            free_slots: free,
        }],
        running: running.to_vec(),
        waiting,
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

async fn instance(name: &str) -> Instance {
    let rt = Runtime::global();
    let bytes = maitre::builtins::bytes(name).expect("a built-in plugin");
    let source = PluginSource::Builtin(name.into());
    let compiled = rt
        .compile_bytes(bytes, source.to_string())
        .expect("built-in plugin compiles");
    let config = vec![
        ("maitre.slots".to_string(), TOTAL_SLOTS.to_string()),
        ("maitre.arm".to_string(), "bench".to_string()),
    ];
    rt.instantiate(&compiled, PluginLimits::default(), &config)
        .await
        .expect("instantiate")
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let calls_for = |n: usize| if n >= 1000 { 2_000 } else { 10_000 };
    rt.block_on(async {
        let origin = Instant::now() - Duration::from_millis(NOW_MS);
        let run = running();
        let mut rows: Vec<(String, usize, Stats, String)> = Vec::new();
        for n in [10usize, 100, 1000] {
            let (map, ids) = entries(n, origin, "llama3.2:3b-instruct-q4_K_M");
            let calls = calls_for(n);
            // View building (host side, no plugin).
            let mut us = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                let v = build_view(origin, &map, &ids, &run, 1);
                us.push(t.elapsed().as_secs_f64() * 1e6);
                std::hint::black_box(v);
            }
            rows.push(("view build (host, replica)".into(), n, stats(&us), "-".into()));
            let free1 = build_view(origin, &map, &ids, &run, 1);
            let free0 = build_view(origin, &map, &ids, &run, 0);
            for plugin in ["fifo", "reserved-aging", "preemptive"] {
                let mut inst = instance(plugin).await;
                let (s, a) = time_schedule(&mut inst, &free1, calls).await;
                rows.push((format!("{plugin}, 1 free"), n, s, a.to_string()));
                let (s, a) = time_schedule(&mut inst, &free0, calls).await;
                let what = if plugin == "fifo" {
                    "fifo, 0 free (call + copy only)".to_string()
                } else {
                    format!("{plugin}, 0 free, RT waits")
                };
                rows.push((what, n, s, a.to_string()));
            }
            // The same without any string to copy (empty model names): what
            // the per-request strings of the view cost.
            let (map, ids) = entries(n, origin, "");
            let bare = build_view(origin, &map, &ids, &run, 0);
            let mut inst = instance("fifo").await;
            let (s, a) = time_schedule(&mut inst, &bare, calls).await;
            rows.push((
                "fifo, 0 free, model \"\" (no strings)".into(),
                n,
                s,
                a.to_string(),
            ));
        }
        println!();
        println!(
            "plugin_decision: one schedule call into the built-in plugins (wasmtime, default limits), {TOTAL_SLOTS} slots, 3 running (2 batch, 1 RT streaming), 1 in 50 waiting is RT"
        );
        println!("200 warm-up calls, then 10,000 timed calls (2,000 at 1,000 waiting)");
        println!();
        println!(
            "{:<34} {:>8} {:>11} {:>9} {:>10} {:>8}",
            "call", "waiting", "median µs", "p99 µs", "mean µs", "actions"
        );
        for (name, n, s, a) in &rows {
            println!(
                "{:<34} {:>8} {:>11.2} {:>9.2} {:>10.2} {:>8}",
                name, n, s.median, s.p99, s.mean, a
            );
        }
        println!();
        println!("target: < 20 µs median at 100 waiting (decision = view build + schedule call)");
        for (name, n, s, _) in rows.iter().filter(|r| r.1 == 100) {
            if name.starts_with("view") {
                continue;
            }
            let view = rows
                .iter()
                .find(|r| r.1 == *n && r.0.starts_with("view"))
                .map(|r| r.2.median)
                .unwrap_or(0.0);
            let total = s.median + view;
            println!(
                "  {name}: {total:.2} µs (call {:.2} + view {view:.2}) {}",
                s.median,
                if total < 20.0 { "MET" } else { "MISSED" }
            );
        }
    });
}
