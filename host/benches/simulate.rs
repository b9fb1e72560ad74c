//! `maitre simulate`'s speed: one hour of field-like traffic (2 slots,
//! about 5,000 requests: 20% real-time streams, 80% batch answers sent
//! whole, 20 ms a token, as `maitre simulate --synthetic` generates by
//! default) replayed through each built-in policy, and an overloaded hour
//! (batch piling up) for the worst case, where every decision copies a
//! queue of thousands into the plugin. Target: under 10 s per policy.
//!
//! `cargo bench -p maitre --bench simulate`; knobs (environment): SECONDS
//! (3600), RATE (1.4 arrivals/s), SEED (1).

mod common;

use std::time::Instant;

use common::env_or;
use maitre::policy::Class;
use maitre::simulate::synthetic::{Synthetic, TokenDist};
use maitre::simulate::{Options, simulate};
use maitre_testkit::{Arm, PolicyFile};

fn main() {
    let seconds: f64 = env_or("SECONDS", 3600.0);
    let rate: f64 = env_or("RATE", 1.4);
    let seed: u64 = env_or("SEED", 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let policies: Vec<(&str, Arm)> = vec![
        ("fifo", Arm::builtin("main", "fifo")),
        (
            "reserved-aging",
            Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1),
        ),
        ("preemptive", Arm::builtin("main", "preemptive")),
    ];
    let loads = [
        ("field-like", TokenDist::LogNormal(30.0, 0.6)),
        ("overloaded", TokenDist::LogNormal(60.0, 0.6)),
    ];
    println!(
        "{:<11} {:<15} {:>8} {:>9} {:>12} {:>14}",
        "load", "policy", "requests", "seconds", "requests/s", "rt_ttft_p99_ms"
    );
    for (load, batch) in loads {
        let trace = Synthetic {
            rate_per_s: rate,
            duration_s: seconds,
            mix: vec![(Class::Realtime, 20.0), (Class::Batch, 80.0)],
            realtime_tokens: TokenDist::LogNormal(40.0, 0.5),
            batch_tokens: batch,
            model: "fake".into(),
            prompt_ms: 0.0,
            token_ms: 20.0,
            seed,
        }
        .generate();
        for (name, arm) in &policies {
            let path = dir.path().join(format!("{name}.toml"));
            PolicyFile::new("http://127.0.0.1:11434", 2)
                .arm(arm.clone())
                .write(&path);
            let t = Instant::now();
            let sim = simulate(trace.clone(), &[path], &Options::default()).expect("simulates");
            let took = t.elapsed().as_secs_f64();
            let p99 = sim.policies[0]
                .report
                .rows
                .iter()
                .find(|r| r.class == "realtime")
                .and_then(|r| r.ttft_p99_ms)
                .unwrap_or(f64::NAN);
            println!(
                "{load:<11} {name:<15} {:>8} {took:>9.2} {:>12.0} {p99:>14.1}",
                sim.requests,
                sim.requests as f64 / took
            );
        }
    }
    println!(
        "target: one hour of field-like traffic (2 slots, ~5,000 requests) under 10 s per policy"
    );
}
