//! Load test (not run in CI): 10,000 concurrent waiting connections against a
//! slow upstream, then a full drain. Prints maitre's idle and peak RSS, the
//! memory per waiting request, and how many requests got their answer.
//!
//!     cargo bench -p maitre --bench load_10k            # N=10000
//!     MAITRE_LOAD_N=2000 cargo bench -p maitre --bench load_10k
//!
//! The fake Ollama runs in this process with 2 slots; the first two requests
//! hold both slots while every other request queues in maitre, then the rest
//! drain fast. Needs `ulimit -n` above N + a few hundred (maitre and this
//! process each hold N sockets).

use std::time::{Duration, Instant};

use maitre_testkit::{Arm, EventKind, Limits, ModelConfig, PolicyFile, Serve, UpstreamModel};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("MAITRE_LOAD_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let fake = UpstreamModel::start(ModelConfig {
        slots: 2,
        token_delay: Duration::ZERO,
        default_tokens: 1,
        ..ModelConfig::default()
    })
    .await
    .unwrap();
    let policy = PolicyFile::new(fake.url(), 2)
        .no_admin()
        .limits(Limits {
            max_waiting: Some(n as u64 + 100),
            ..Limits::default()
        })
        .arm(Arm::builtin("reserved-aging", "reserved-aging").config("rt_reserved_slots", 1));
    let maitre = Serve::new(env!("CARGO_BIN_EXE_maitre"))
        .policy(&policy)
        .env("MAITRE_LOG", "warn,maitre=info,maitre::request=warn")
        .start();
    let url = maitre.url.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_kib(maitre.pid());

    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let body = serde_json::json!({"model": "fake", "prompt": "x", "stream": false});
    // Two long requests hold both slots (the reserved one needs a real-time request).
    let mut tasks = Vec::new();
    for (tag, prio) in [("hold-batch", "batch"), ("hold-rt", "realtime")] {
        let r = client
            .post(format!("{url}/api/generate"))
            .header("x-test-tag", tag)
            .header("x-priority", prio)
            .header("x-fake-prompt-ms", "1000000")
            .json(&body);
        tasks.push(tokio::spawn(async move {
            r.send().await.map(|r| r.status().as_u16())
        }));
    }
    fake.wait_until(Duration::from_secs(10), |l| {
        l.iter().filter(|e| e.kind == EventKind::Started).count() == 2
    })
    .await;
    let t0 = Instant::now();
    let mut waiting = Vec::with_capacity(n);
    for i in 0..n {
        let r = client
            .post(format!("{url}/api/generate"))
            .header("x-priority", if i % 50 == 0 { "realtime" } else { "batch" })
            .json(&body);
        waiting.push(tokio::spawn(async move {
            match r.send().await {
                Ok(resp) => {
                    let s = resp.status().as_u16();
                    let ok = resp
                        .text()
                        .await
                        .map(|t| t.contains("\"done\":true"))
                        .unwrap_or(false);
                    (s, ok)
                }
                Err(e) => {
                    // Status 0: no answer; say why once, so a failure explains itself.
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| eprintln!("first client error: {e:?}"));
                    (0, false)
                }
            }
        }));
    }
    // Wait until maitre holds them all.
    let mut peak = 0;
    let admin_deadline = Instant::now() + Duration::from_secs(300);
    loop {
        peak = peak.max(rss_kib(maitre.pid()));
        let queued = waiting.iter().filter(|t| !t.is_finished()).count();
        let received = fake
            .log()
            .iter()
            .filter(|e| e.kind == EventKind::Received)
            .count();
        if queued == n && t0.elapsed() > Duration::from_secs(2) && received == 2 {
            // Give maitre a moment to admit the last arrivals, then sample.
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak = peak.max(rss_kib(maitre.pid()));
            break;
        }
        if Instant::now() > admin_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fill = t0.elapsed();
    // Release the two holders: cancel them (the client goes away), the rest drains.
    for t in &tasks {
        t.abort();
    }
    let t1 = Instant::now();
    let mut ok = 0;
    let mut statuses = std::collections::BTreeMap::new();
    for t in waiting {
        let (s, good) = t.await.unwrap();
        *statuses.entry(s).or_insert(0) += 1;
        if good {
            ok += 1;
        }
        peak = peak.max(rss_kib(maitre.pid()));
    }
    let drain = t1.elapsed();
    let after = rss_kib(maitre.pid());
    drop(maitre);
    println!("| figure | value |");
    println!("|---|---|");
    println!("| waiting requests held | {n} |");
    println!("| maitre RSS idle | {:.1} MiB |", idle as f64 / 1024.0);
    println!(
        "| maitre RSS peak (all waiting) | {:.1} MiB |",
        peak as f64 / 1024.0
    );
    println!(
        "| memory per waiting request | {:.1} KiB |",
        (peak.saturating_sub(idle)) as f64 / n as f64
    );
    println!(
        "| maitre RSS after drain | {:.1} MiB |",
        after as f64 / 1024.0
    );
    println!("| time to queue all | {:.1} s |", fill.as_secs_f64());
    println!("| time to drain all | {:.1} s |", drain.as_secs_f64());
    println!("| answered 200 with done:true | {ok} / {n} |");
    println!("| statuses | {statuses:?} |");
    println!("| upstream max concurrent | {} |", fake.max_concurrent());
}
