//! Requests per second through maitre as the number of client connections
//! grows: does throughput hold when hundreds of requests wait?
//!
//! Upstream: the upstream model, in this process, with 8 slots, no token
//! delay and one-token answers, so maitre (not the model) is the bottleneck.
//! maitre: the real binary, one arm, 8 slots. Load: `wrk` (keep-alive
//! connections, each sending the next request as soon as its answer ends),
//! with 32 and 256 connections, for each policy; and straight to the
//! upstream, the ceiling of this machine with this load generator.
//!
//! With 256 connections about 248 requests wait at any moment. Every
//! admission and decision of a 0.1.0 plugin copies that whole queue into
//! the sandbox; 0.2.0 plugins get the candidate window.
//!
//! Target (issue 10): with 256 connections at least 90 % of the rate with 32.
//!
//! `cargo bench -p maitre --bench throughput`; needs `wrk` on PATH. Knobs:
//! SECONDS (5 per measurement), ROUNDS (3), CONNS ("32,256"), POLICIES (e.g. "fifo": only the
//! rows whose name starts so; all by default).

#[path = "../build/plugin_cargo.rs"]
mod plugin_cargo;

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use maitre_testkit::{Arm, Limits, ModelConfig, PolicyFile, UpstreamModel};

const SLOTS: u32 = 8;

/// `wrk` Lua script: POST a one-token non-streaming generate.
const SCRIPT: &str = r#"
wrk.method = "POST"
wrk.body = '{"model":"fake","prompt":"hi","stream":false,"options":{"num_predict":1}}'
wrk.headers["Content-Type"] = "application/json"
"#;

/// Requests/s and non-2xx answers that `wrk` reports for `conns` connections.
fn wrk(url: &str, conns: usize, seconds: u64, script: &std::path::Path) -> (f64, u64) {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{seconds}s"),
            "--timeout",
            "10s",
            "-s",
        ])
        .arg(script)
        .arg(format!("{url}/api/generate"))
        .output()
        .expect("run wrk (install it: apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let bad = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (rate, bad)
}

/// The 0.1.0 FIFO (plugins/compat), built with a nested cargo.
fn compat_plugin() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml");
    let target = std::path::Path::new(maitre::builtins::PLUGIN_TARGET_DIR);
    let status = plugin_cargo::build_plugins(&manifest, target, &["compat-fifo-v0-1-0"])
        .status()
        .expect("run cargo for the 0.1.0 plugin");
    assert!(status.success(), "building compat-fifo-v0-1-0 failed");
    plugin_cargo::output_dir(target).join("compat_fifo_v0_1_0.wasm")
}

fn main() {
    let seconds: u64 = env_or("SECONDS", 5);
    let rounds: usize = env_or("ROUNDS", 3);
    let conns: Vec<usize> = std::env::var("CONNS")
        .unwrap_or_else(|_| "32,256".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("throughput: needs wrk on PATH (apt-get install wrk)");
        return;
    }
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fake = upstream_rt
        .block_on(UpstreamModel::start(ModelConfig {
            slots: SLOTS as usize,
            token_delay: Duration::ZERO,
            default_tokens: 1,
            ..ModelConfig::default()
        }))
        .expect("upstream model");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("post.lua");
    std::fs::write(&script, SCRIPT).unwrap();
    let compat = dir.path().join("fifo-0.1.0.wasm");
    std::fs::copy(compat_plugin(), &compat).unwrap();

    let arms: Vec<(&str, Arm)> = vec![
        ("fifo (0.2.0)", Arm::builtin("main", "fifo")),
        (
            "reserved-aging (0.2.0)",
            Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1),
        ),
        ("preemptive (0.2.0)", Arm::builtin("main", "preemptive")),
        (
            "fifo (0.1.0, compat)",
            Arm::new("main", compat.display().to_string()),
        ),
    ];
    // (row, conns, rate per round, non-2xx over all rounds)
    let mut rows: Vec<(String, usize, Vec<f64>, u64)> = Vec::new();
    // Each target gets `rounds` rounds of every connection count in turn, so
    // a slow spell of this shared machine hits both counts alike; the ratio
    // is the median of the rounds' own ratios.
    let mut measure = |name: &str, url: &str| {
        let first = rows.len();
        for &c in &conns {
            rows.push((name.to_string(), c, Vec::new(), 0));
        }
        for _ in 0..rounds {
            for (i, &c) in conns.iter().enumerate() {
                let (rate, bad) = wrk(url, c, seconds, &script);
                rows[first + i].2.push(rate);
                rows[first + i].3 += bad;
            }
        }
    };
    measure("upstream direct (no maitre)", &fake.url());
    // `POLICIES=fifo,preemptive` keeps only the rows whose name starts so.
    let only: Option<Vec<String>> = std::env::var("POLICIES")
        .ok()
        .map(|v| v.split(',').map(|p| p.trim().to_string()).collect());
    for (name, arm) in arms {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|p| name.starts_with(p.as_str())))
        {
            continue;
        }
        let m = binary(
            &PolicyFile::new(fake.url(), SLOTS)
                .limits(Limits {
                    max_waiting: Some(100_000),
                    ..Limits::default()
                })
                .arm(arm),
        );
        measure(name, &m.url);
    }
    println!();
    println!(
        "throughput: wrk -t2, keep-alive, one-token non-streaming generate; upstream model in-process ({SLOTS} slots, no token delay); maitre binary ({SLOTS} slots); {rounds} rounds of {seconds} s per connection count, the counts in turn"
    );
    println!();
    println!(
        "{:<28} {:>6} {:>16} {:>8} {:>18}",
        "target", "conns", "median req/s", "non-2xx", "median vs first"
    );
    let ratio_of = |name: &str, c: usize| {
        let of = |c: usize| rows.iter().find(|r| r.0 == name && r.1 == c).map(|r| &r.2);
        match (of(conns[0]), of(c)) {
            (Some(lo), Some(hi)) => {
                let per_round: Vec<f64> = lo.iter().zip(hi).map(|(l, h)| h / l).collect();
                pct(&per_round, 0.5)
            }
            _ => f64::NAN,
        }
    };
    for (name, c, rates, bad) in &rows {
        println!(
            "{:<28} {:>6} {:>16.0} {:>8} {:>17.1}%",
            name,
            c,
            pct(rates, 0.5),
            bad,
            100.0 * ratio_of(name, *c)
        );
    }
    println!();
    if let (Some(lo), Some(hi)) = (conns.first(), conns.last()) {
        println!(
            "target: {hi} connections reach >= 90% of the rate with {lo} (median of the rounds' ratios)"
        );
        let mut seen: Vec<&str> = Vec::new();
        for (name, ..) in &rows {
            if seen.contains(&name.as_str()) {
                continue;
            }
            seen.push(name);
            let ratio = ratio_of(name, *hi);
            println!(
                "  {name}: {:.1}% {}",
                100.0 * ratio,
                if ratio >= 0.9 { "MET" } else { "MISSED" }
            );
        }
    }
}
