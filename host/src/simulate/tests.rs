//! The simulator end to end, in-process: the real plugins, the real
//! scheduler, a virtual clock.

use std::path::PathBuf;

use super::synthetic::{Synthetic, TokenDist};
use super::*;
use crate::policy::Class;
use crate::scheduler::percentile;
use crate::trace::TraceOutcome;

/// A one-arm policy file with `plugin` and `slots`, in `dir`.
fn policy(dir: &Path, name: &str, plugin: &str, slots: u32, config: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[upstream]\nslots = {slots}\n\n[[policy]]\nname = \"main\"\nplugin = \"builtin:{plugin}\"\n{config}"
        ),
    )
    .unwrap();
    path
}

/// Batch jobs answered whole, a few at once, and short real-time streams.
fn flood(seconds: f64) -> Vec<TraceRecord> {
    Synthetic {
        rate_per_s: 2.0,
        duration_s: seconds,
        mix: vec![(Class::Realtime, 10.0), (Class::Batch, 90.0)],
        realtime_tokens: TokenDist::Uniform(10, 30),
        batch_tokens: TokenDist::Uniform(40, 80),
        model: "fake".into(),
        prompt_ms: 10.0,
        token_ms: 20.0,
        seed: 5,
    }
    .generate()
}

fn row<'a>(run: &'a PolicyRun, class: &str) -> &'a AbRow {
    run.report.rows.iter().find(|r| r.class == class).unwrap()
}

#[test]
fn same_inputs_same_output_and_every_request_is_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let policies = vec![
        policy(dir.path(), "fifo", "fifo", 2, ""),
        policy(dir.path(), "preemptive", "preemptive", 2, ""),
    ];
    let opts = Options::default();
    let a = simulate(flood(300.0), &policies, &opts).unwrap();
    let b = simulate(flood(300.0), &policies, &opts).unwrap();
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    for run in &a.policies {
        let total: usize = run.report.rows.iter().map(|r| r.requests).sum();
        let ok: usize = run.report.rows.iter().map(|r| r.ok).sum();
        assert_eq!((total, ok), (a.requests, a.requests), "{}", run.name);
        assert!(run.upstream_max_active <= 2, "{}", run.name);
    }
    // Under the flood, pre-emption serves real-time at once; FIFO makes it
    // queue behind batch. Only the pre-emptive policy throws work away.
    let (fifo, pre) = (&a.policies[0], &a.policies[1]);
    let p99 = |r: &PolicyRun| row(r, "realtime").ttft_p99_ms.unwrap();
    assert!(p99(pre) < p99(fifo) / 2.0, "{} vs {}", p99(pre), p99(fifo));
    assert_eq!(row(fifo, "batch").preemptions, 0);
    assert!(row(pre, "batch").preemptions > 0);
    assert!(
        row(pre, "batch").preempted_tokens > 0,
        "the upstream's lost work of answers sent whole is counted"
    );
    assert!(a.to_text().contains("preemptive"));
}

#[test]
fn a_resumed_chat_keeps_the_work_a_preemption_would_throw_away() {
    let dir = tempfile::tempdir().unwrap();
    let resume = "\n[models.\"fake\"]\nresume_preempted = true\n";
    let policies = vec![
        policy(dir.path(), "restarts", "preemptive", 2, ""),
        policy(dir.path(), "resumes", "preemptive", 2, resume),
    ];
    // The same flood, its batch jobs chats answered whole.
    let mut trace = flood(300.0);
    for r in trace.iter_mut().filter(|r| !r.stream) {
        r.path = "/api/chat".into();
    }
    let a = simulate(trace, &policies, &Options::default()).unwrap();
    let (restarts, resumes) = (&a.policies[0], &a.policies[1]);
    for run in [restarts, resumes] {
        let ok: usize = run.report.rows.iter().map(|r| r.ok).sum();
        assert_eq!(ok, a.requests, "{}", run.name);
        assert!(row(run, "batch").preemptions > 0, "{}", run.name);
    }
    assert!(row(restarts, "batch").preempted_tokens > 0);
    assert_eq!(
        row(resumes, "batch").preempted_tokens,
        0,
        "every pre-empted chat kept its tokens"
    );
    // Kept work is work not done twice: the flood drains sooner.
    assert!(
        resumes.simulated_seconds < restarts.simulated_seconds,
        "{} vs {}",
        resumes.simulated_seconds,
        restarts.simulated_seconds
    );
}

#[test]
fn a_quiet_trace_is_replayed_exactly() {
    // Streams one at a time, far apart, on one slot: no queue, so each
    // request's simulated TTFT is its measured prompt + one token.
    let dir = tempfile::tempdir().unwrap();
    let policies = vec![policy(dir.path(), "fifo", "fifo", 1, "")];
    let recs: Vec<TraceRecord> = (0..20u64)
        .map(|i| {
            let (prompt, token, n) = (5.0 + i as f64, 10.0 + i as f64, 3 + i);
            TraceRecord {
                arrival_unix_ms: 1_000_000 + i * 10_000,
                arrival_ms: (i * 10_000) as f64,
                class_hint: Some(Class::Realtime),
                class: Class::Realtime,
                tenant: None,
                model: "m".into(),
                path: "/api/chat".into(),
                stream: true,
                num_predict: None,
                body_bytes: 10,
                client: None,
                backend: "b".into(),
                arm: "main".into(),
                queue_ms: 0.0,
                upstream_ttft_ms: Some(prompt + token),
                ttft_ms: Some(prompt + token),
                tokens: n + 1,
                duration_ms: prompt + n as f64 * token,
                preemptions: 0,
                outcome: TraceOutcome::Ok,
            }
        })
        .collect();
    let want: Vec<f64> = recs.iter().map(|r| r.ttft_ms.unwrap()).collect();
    let sim = simulate(recs, &policies, &Options::default()).unwrap();
    let rt = row(&sim.policies[0], "realtime");
    assert_eq!(rt.ok, 20);
    let (mut lo, mut hi) = (want.clone(), want);
    lo.sort_by(f64::total_cmp);
    hi.sort_by(f64::total_cmp);
    assert_eq!(rt.ttft_p50_ms, percentile(&lo, 0.5).map(f64::round));
    assert_eq!(rt.ttft_p99_ms, percentile(&hi, 0.99).map(f64::round));
    assert_eq!(rt.queue_p95_ms, Some(0.0));
}

#[test]
fn slots_flag_resizes_the_policy_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = vec![policy(dir.path(), "fifo", "fifo", 1, "")];
    let opts = Options {
        slots: Some(4),
        ..Options::default()
    };
    let sim = simulate(flood(60.0), &p, &opts).unwrap();
    assert_eq!(sim.policies[0].slots, 4);
    assert!(sim.policies[0].upstream_max_active > 2);
    let zero = Options {
        slots: Some(0),
        ..Options::default()
    };
    assert!(simulate(flood(10.0), &p, &zero).is_err());
}
