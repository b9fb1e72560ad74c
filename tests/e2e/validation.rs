//! The simulator against reality. Two live runs of the real binary in front
//! of the upstream model (2 slots, 20 ms a token), one with reserved-aging
//! and one with fifo, each under a batch flood (four clients sending jobs
//! answered whole, back to back) and real-time chat streams arriving at
//! random (seeded) intervals, each recording a trace. Then `maitre simulate`
//! replays each trace through the policy that served it, and through the
//! other one.
//!
//! Asserted: the simulated real-time TTFT p50 and p99 and the batch
//! completions per minute land within 10 % (or 20 ms) of the live ones, for
//! both policies; and the simulator ranks the policies for real-time TTFT as
//! the live runs did (see the last assertions for which trace shows what).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maitre::simulate::rng::Rng;
use serde_json::{Value, json};

use crate::common::*;

/// Seconds of load in each live run.
const SECONDS: f64 = 60.0;
/// Mean seconds between real-time arrivals.
const RT_MEAN: f64 = 1.0;
/// Batch clients sending back to back.
const BATCH_LOOPS: u64 = 4;

/// What a run's trace says about it.
#[derive(Debug, Clone, Copy)]
struct Stats {
    rt_p50: f64,
    rt_p95: f64,
    rt_p99: f64,
    batch_per_min: f64,
}

/// The real-time TTFTs and batch throughput in a trace: what maitre
/// measured live (arrival → first byte to the client), per request.
fn live_stats(lines: &[Value]) -> Stats {
    let mut rt: Vec<f64> = lines
        .iter()
        .filter(|l| l["class"] == "realtime" && l["outcome"] == "ok")
        .map(|l| l["ttft_ms"].as_f64().unwrap())
        .collect();
    rt.sort_by(f64::total_cmp);
    let first = lines
        .iter()
        .map(|l| l["arrival_ms"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let last_end = lines
        .iter()
        .map(|l| l["arrival_ms"].as_f64().unwrap() + l["duration_ms"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let batch_ok = lines
        .iter()
        .filter(|l| l["class"] == "batch" && l["outcome"] == "ok")
        .count();
    Stats {
        rt_p50: maitre::scheduler::percentile(&rt, 0.5).unwrap(),
        rt_p95: maitre::scheduler::percentile(&rt, 0.95).unwrap(),
        rt_p99: maitre::scheduler::percentile(&rt, 0.99).unwrap(),
        batch_per_min: batch_ok as f64 / ((last_end - first) / 60_000.0),
    }
}

/// The same figures from `maitre simulate --json`, for one policy.
fn sim_stats(policy: &Value) -> Stats {
    let row = |class: &str| {
        policy["report"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["class"] == class)
            .unwrap()
            .clone()
    };
    Stats {
        rt_p50: row("realtime")["ttft_p50_ms"].as_f64().unwrap(),
        rt_p95: row("realtime")["ttft_p95_ms"].as_f64().unwrap(),
        rt_p99: row("realtime")["ttft_p99_ms"].as_f64().unwrap(),
        batch_per_min: row("batch")["completions_per_min"].as_f64().unwrap(),
    }
}

/// Within 10 % or 20 ms.
fn close(live: f64, sim: f64, ms: bool) -> bool {
    let d = (live - sim).abs();
    d <= 0.10 * live.abs() || (ms && d <= 20.0)
}

/// One live run: maitre with `arm` and a trace, the load, then maitre
/// stopped. Returns the policy file and the trace's lines (the folder
/// holding them lives as long as the returned [`Maitre`]).
async fn live(arm: Arm) -> (Maitre, PathBuf, Vec<Value>) {
    let fake = fake(2, 20).await;
    let policy = PolicyFile::new(fake.url(), 2)
        .arm(arm)
        .trace("trace.jsonl", None);
    let mut m = start(&policy);
    let c = client();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(SECONDS);
    let mut tasks = Vec::new();
    for b in 0..BATCH_LOOPS {
        let (c, url) = (c.clone(), m.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(7, 100 + b);
            let mut sent = 0u64;
            while Instant::now() < end {
                let n = 20 + rng.below(21) as u64;
                let r = c
                    .post(format!("{url}/api/generate"))
                    .header("x-priority", "batch")
                    .json(
                        &json!({"model": "fake", "prompt": "summarise", "stream": false,
                                  "options": {"num_predict": n}}),
                    )
                    .send()
                    .await
                    .expect("batch request");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("batch body");
                sent += 1;
            }
            sent
        }));
    }
    let mut rng = Rng::new(7, 1);
    let mut at = 0.0;
    loop {
        at += rng.exp(RT_MEAN);
        if at >= SECONDS {
            break;
        }
        let n = 10 + rng.below(21) as u64;
        let (c, url) = (c.clone(), m.url.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(at)).into()).await;
            let r = c
                .post(format!("{url}/api/chat"))
                .header("x-priority", "realtime")
                .json(
                    &json!({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                              "options": {"num_predict": n}}),
                )
                .send()
                .await
                .expect("real-time request");
            assert_eq!(r.status(), 200);
            let mut s = r.bytes_stream();
            while let Some(chunk) = s.next().await {
                chunk.expect("stream chunk");
            }
            1
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap();
    }
    let path = m.dir.path().join("trace.jsonl");
    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (read(&path).len() as u64) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(m.terminate().success());
    let lines = read(&path);
    assert_eq!(lines.len() as u64, sent, "every request traced");
    let policy_path = m.policy.clone();
    (m, policy_path, lines)
}

/// `maitre simulate --trace TRACE --policy P... --json`.
fn simulate(trace: &Path, policies: &[&Path]) -> Value {
    let mut cmd = Command::new(BIN);
    cmd.arg("simulate").arg("--trace").arg(trace).arg("--json");
    for p in policies {
        cmd.arg("--policy").arg(p);
    }
    let out = cmd.output().expect("run maitre simulate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_ttft_and_throughput_match_live_runs_and_rank_policies_alike() {
    let ((ra_m, ra_policy, ra_lines), (fifo_m, fifo_policy, fifo_lines)) = tokio::join!(
        live(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1)),
        live(Arm::builtin("main", "fifo")),
    );
    let ra_trace = ra_m.dir.path().join("trace.jsonl");
    let fifo_trace = fifo_m.dir.path().join("trace.jsonl");
    // Kept for a look after a failure.
    if let Ok(dir) = std::env::var("MAITRE_VALIDATION_KEEP") {
        let dir = Path::new(&dir);
        let _ = std::fs::copy(&ra_trace, dir.join("reserved-aging.jsonl"));
        let _ = std::fs::copy(&fifo_trace, dir.join("fifo.jsonl"));
    }
    let live_ra = live_stats(&ra_lines);
    let live_fifo = live_stats(&fifo_lines);
    // Each trace through both policies: the one that served it first.
    let sim_a = simulate(&ra_trace, &[&ra_policy, &fifo_policy]);
    let sim_b = simulate(&fifo_trace, &[&fifo_policy, &ra_policy]);
    let (sim_ra, sim_ra_as_fifo) = (
        sim_stats(&sim_a["policies"][0]),
        sim_stats(&sim_a["policies"][1]),
    );
    let (sim_fifo, sim_fifo_as_ra) = (
        sim_stats(&sim_b["policies"][0]),
        sim_stats(&sim_b["policies"][1]),
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>12}",
        "run", "rt_p50_ms", "rt_p95_ms", "rt_p99_ms", "batch/min"
    );
    for (name, s) in [
        ("reserved-aging live", live_ra),
        ("reserved-aging simulated", sim_ra),
        ("fifo live", live_fifo),
        ("fifo simulated", sim_fifo),
        ("ra trace, simulated as fifo", sim_ra_as_fifo),
        ("fifo trace, simulated as ra", sim_fifo_as_ra),
    ] {
        println!(
            "{name:<34} {:>10.1} {:>10.1} {:>10.1} {:>12.1}",
            s.rt_p50, s.rt_p95, s.rt_p99, s.batch_per_min
        );
    }
    for (name, live, sim) in [
        ("reserved-aging", live_ra, sim_ra),
        ("fifo", live_fifo, sim_fifo),
    ] {
        assert!(
            close(live.rt_p50, sim.rt_p50, true),
            "{name}: rt p50 live {live:?} sim {sim:?}"
        );
        assert!(
            close(live.rt_p99, sim.rt_p99, true),
            "{name}: rt p99 live {live:?} sim {sim:?}"
        );
        assert!(
            close(live.batch_per_min, sim.batch_per_min, false),
            "{name}: batch/min live {live:?} sim {sim:?}"
        );
    }
    // Live, reserving a slot for real-time beats FIFO's queue behind batch
    // (TTFT p50 and p95; a p99 of some 60 samples is one or two of them).
    // The simulator ranks them alike, each on its own trace, and both on
    // fifo's trace. Reserved-aging's trace is printed, not asserted: its
    // batch clients sent their next job when the last one ended, and
    // reserved-aging gave them one slot, so replayed to fifo (two slots for
    // batch) that load is lighter than fifo's own, and fifo comes close.
    for (better, worse, what) in [
        (live_ra, live_fifo, "live"),
        (sim_ra, sim_fifo, "simulated, each on its own trace"),
        (sim_fifo_as_ra, sim_fifo, "fifo's trace"),
    ] {
        assert!(
            better.rt_p50 < worse.rt_p50 && better.rt_p95 < worse.rt_p95,
            "{what}: reserved-aging {better:?} fifo {worse:?}"
        );
    }
}
