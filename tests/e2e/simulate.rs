//! Traces and `maitre simulate` through the real binary: what `[trace]`
//! records (and never records), rotation, and the example trace replayed
//! through the example policies on a fresh clone, the same way every time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

/// The repository's root (the tests run from `host/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every line of `path` and of its rotated files, oldest file first.
fn trace_lines(path: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = (1..=9)
        .rev()
        .map(|i| PathBuf::from(format!("{}.{i}", path.display())))
        .collect();
    files.push(path.to_path_buf());
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .map(|l| serde_json::from_str(&l).expect("each trace line is JSON"))
        .collect()
}

/// `maitre ARGS` from the repository's root: (exit ok, stdout, stderr).
fn maitre(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(root())
        .env("MAITRE_LOG", "warn")
        .output()
        .expect("run maitre");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SECRET: &str = "the-prompt-nobody-may-read-7f3a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_records_each_request_without_prompts_and_rotates() {
    let fake = fake(2, 2).await;
    let policy = PolicyFile::new(fake.url(), 2)
        .arm(Arm::builtin("main", "fifo"))
        .trace("trace.jsonl", Some(8_192));
    let m = start(&policy);
    let (ok, out, _) = maitre(&["check", m.policy.to_str().unwrap()]);
    assert!(ok && out.contains("trace.jsonl"), "{out}");
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..30u64 {
        let (c, url) = (c.clone(), m.url.clone());
        tasks.push(tokio::spawn(async move {
            let realtime = i % 3 == 0;
            let body = json!({"model": "fake", "prompt": SECRET, "stream": realtime,
                              "options": {"num_predict": 3 + i % 4}});
            let r = c
                .post(format!("{url}/api/generate"))
                .header("x-priority", if realtime { "realtime" } else { "batch" })
                .header("x-test-secret", SECRET)
                .json(&body)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("body");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let path = m.dir.path().join("trace.jsonl");
    let end = Instant::now() + Duration::from_secs(10);
    while trace_lines(&path).len() < 30 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = trace_lines(&path);
    assert_eq!(lines.len(), 30);
    assert!(
        Path::new(&format!("{}.1", path.display())).exists(),
        "rotated past 8 KiB"
    );
    for f in [path.clone(), PathBuf::from(format!("{}.1", path.display()))] {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains(SECRET), "no prompt or header value in {f:?}");
        assert!(
            std::fs::metadata(&f).unwrap().len() < 8_192 + 1_024,
            "{f:?}"
        );
    }
    let client_id = lines[0]["client"].as_str().unwrap().to_string();
    assert_eq!(client_id.len(), 16);
    for l in &lines {
        let stream = l["stream"].as_bool().unwrap();
        let n = l["num_predict"].as_u64().unwrap();
        assert_eq!(l["outcome"], "ok", "{l}");
        assert_eq!(l["model"], "fake");
        assert_eq!(l["path"], "/api/generate");
        assert_eq!(l["arm"], "main");
        assert_eq!(l["client"], client_id.as_str(), "one client, one id");
        assert_eq!(
            l["backend"], "default",
            "a single [upstream] is the backend named default"
        );
        assert_eq!(l["class_hint"], if stream { "realtime" } else { "batch" });
        // The upstream streams for every client (a whole answer is folded
        // from the stream): n tokens and the final frame.
        assert_eq!(l["tokens"], n + 1, "{l}");
        assert!(l["body_bytes"].as_u64().unwrap() > SECRET.len() as u64);
        let ttft = l["upstream_ttft_ms"].as_f64().unwrap();
        let dur = l["duration_ms"].as_f64().unwrap();
        assert!(ttft > 0.0 && dur >= ttft && l["queue_ms"].as_f64().unwrap() >= 0.0);
        assert!(l["arrival_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert!(l["arrival_ms"].as_f64().is_some());
    }
    let scrape = Scrape::get(&m.admin).await;
    assert_eq!(
        scrape.get_exact("maitre_trace_dropped_total", &[]),
        Some(0.0)
    );
}

/// The example trace through the two example policies, as the README says.
const EXAMPLE: &[&str] = &[
    "simulate",
    "--trace",
    "examples/demo-trace.jsonl",
    "--policy",
    "examples/policy.toml",
    "--policy",
    "examples/preemptive.toml",
];

#[test]
fn the_example_trace_simulates_the_example_policies_the_same_way_twice() {
    let (ok, first, err) = maitre(EXAMPLE);
    assert!(ok, "{err}");
    let (_, second, _) = maitre(EXAMPLE);
    assert_eq!(first, second, "same inputs, same output");
    assert!(first.starts_with("Simulated "), "{first}");
    let header = first
        .lines()
        .find(|l| l.starts_with("policy "))
        .expect("a table header");
    for col in [
        "class",
        "reqs",
        "ttft_p50",
        "ttft_p95",
        "ttft_p99",
        "queue_p50",
        "done/min",
        "preempt",
        "lost_tok",
    ] {
        assert!(header.contains(col), "{header}");
    }
    for (policy, class) in [
        ("policy", "realtime"),
        ("policy", "batch"),
        ("preemptive", "realtime"),
        ("preemptive", "batch"),
    ] {
        let row = first
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([policy, class]))
            .unwrap_or_else(|| panic!("no {policy} {class} row in\n{first}"));
        let reqs: u64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(reqs > 0, "{row}");
    }
    assert!(
        err.contains("requests/s"),
        "the speed goes to stderr: {err}"
    );

    let mut json_args = EXAMPLE.to_vec();
    json_args.push("--json");
    let (ok, json_out, err) = maitre(&json_args);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json_out).expect("--json is JSON");
    let policies = v["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2);
    for p in policies {
        assert_eq!(p["report"]["rows"].as_array().unwrap().len(), 2);
        let served: u64 = p["report"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(
            served,
            v["requests"].as_u64().unwrap(),
            "every request ends"
        );
    }
}

#[test]
fn a_written_synthetic_trace_reads_back_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("synthetic.jsonl");
    let file = file.to_str().unwrap();
    let gen_args = [
        "simulate",
        "--synthetic",
        "--duration",
        "300",
        "--rate",
        "2",
        "--mix",
        "realtime=30,batch=70",
        "--tokens",
        "batch=20..60",
        "--write-trace",
        file,
        "--policy",
        "examples/preemptive.toml",
    ];
    let (ok, generated, err) = maitre(&gen_args);
    assert!(ok, "{err}");
    let (ok, replayed, err) = maitre(&[
        "simulate",
        "--trace",
        file,
        "--policy",
        "examples/preemptive.toml",
    ]);
    assert!(ok, "{err}");
    assert_eq!(generated, replayed);
    let (ok, _, err) = maitre(&["simulate", "--policy", "examples/policy.toml"]);
    assert!(!ok && err.contains("--synthetic"), "{err}");
    let (ok, _, err) = maitre(&["simulate", "--trace", file, "--rate", "3", "--policy", "x"]);
    assert!(!ok && err.contains("add --synthetic"), "{err}");
}
