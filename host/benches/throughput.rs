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
//! SECONDS (10 per row), CONNS ("32,256").

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
    let seconds: u64 = env_or("SECONDS", 10);
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
    // (row, conns, rate, non-2xx)
    let mut rows: Vec<(String, usize, f64, u64)> = Vec::new();
    for &c in &conns {
        let (rate, bad) = wrk(&fake.url(), c, seconds, &script);
        rows.push(("upstream direct (no maitre)".into(), c, rate, bad));
    }
    for (name, arm) in arms {
        let m = binary(
            &PolicyFile::new(fake.url(), SLOTS)
                .limits(Limits {
                    max_waiting: Some(100_000),
                    ..Limits::default()
                })
                .arm(arm),
        );
        for &c in &conns {
            let (rate, bad) = wrk(&m.url, c, seconds, &script);
            rows.push((name.to_string(), c, rate, bad));
        }
    }
    println!();
    println!(
        "throughput: wrk -t2, keep-alive, one-token non-streaming generate; upstream model in-process ({SLOTS} slots, no token delay); maitre binary ({SLOTS} slots); {seconds} s per row"
    );
    println!();
    println!(
        "{:<28} {:>6} {:>12} {:>8} {:>14}",
        "target", "conns", "requests/s", "non-2xx", "vs first conns"
    );
    for (name, c, rate, bad) in &rows {
        let base = rows.iter().find(|r| &r.0 == name).map_or(f64::NAN, |r| r.2);
        println!(
            "{:<28} {:>6} {:>12.0} {:>8} {:>13.1}%",
            name,
            c,
            rate,
            bad,
            100.0 * rate / base
        );
    }
    println!();
    if let (Some(lo), Some(hi)) = (conns.first(), conns.last()) {
        println!("target: {hi} connections reach >= 90% of the rate with {lo}");
        let names: Vec<&String> = rows.iter().map(|r| &r.0).collect();
        let mut seen = Vec::new();
        for name in names {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name);
            let at = |c: usize| {
                rows.iter()
                    .find(|r| &r.0 == name && r.1 == c)
                    .map_or(f64::NAN, |r| r.2)
            };
            let ratio = at(*hi) / at(*lo);
            println!(
                "  {name}: {:.1}% {}",
                100.0 * ratio,
                if ratio >= 0.9 { "MET" } else { "MISSED" }
            );
        }
    }
}
