//! Load test (not run in CI): 10,000 concurrent waiting connections against a
//! slow upstream, then a full drain. Prints maitre's idle RSS, its RSS once
//! every request waits, the memory per waiting request, the peak during the
//! drain, and how many requests got their answer.
//!
//!     cargo bench -p maitre --bench load_10k            # N=10000
//!     MAITRE_LOAD_N=2000 cargo bench -p maitre --bench load_10k
//!
//! The fake Ollama runs in this process with 2 slots; the first two requests
//! hold both slots while every other request queues in maitre, then the rest
//! drain fast. Needs `ulimit -n` above N + a few hundred (maitre and this
//! process each hold N sockets).
//!
//! Connections are opened in batches of `MAITRE_LOAD_BATCH` (default 500),
//! each batch once maitre counts the previous one as waiting
//! (`maitre_waiting_requests`): opening 10,000 at once overflows the listen
//! queue of a small machine, and the connections that time out in the SYN
//! queue would never wait in maitre, making the figure per waiting request
//! meaningless. `MAITRE_LOAD_BIN` runs another program instead of the
//! `maitre` binary (e.g. a script that runs it under `valgrind --tool=massif`).

use std::time::{Duration, Instant};

use maitre_testkit::{
    Arm, EventKind, Limits, ModelConfig, PolicyFile, Scrape, Serve, UpstreamModel, rss_kib,
};

/// Requests maitre counts as waiting, over all arms.
async fn waiting(admin: &str) -> usize {
    Scrape::get(admin).await.sum("maitre_waiting_requests", &[]) as usize
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = env("MAITRE_LOAD_N", 10_000);
    let batch = env("MAITRE_LOAD_BATCH", 500).max(1);
    let fake = UpstreamModel::start(ModelConfig {
        slots: 2,
        token_delay: Duration::ZERO,
        default_tokens: 1,
        ..ModelConfig::default()
    })
    .await
    .unwrap();
    let policy = PolicyFile::new(fake.url(), 2)
        .limits(Limits {
            max_waiting: Some(n as u64 + 100),
            max_connections: Some(n as u64 + 100),
            ..Limits::default()
        })
        .arm(Arm::builtin("reserved-aging", "reserved-aging").config("rt_reserved_slots", 1));
    let bin = std::env::var("MAITRE_LOAD_BIN").unwrap_or(env!("CARGO_BIN_EXE_maitre").into());
    let mut maitre = Serve::new(bin)
        .policy(&policy)
        .timeout(Duration::from_secs(600))
        .env("MAITRE_LOG", "warn,maitre=info,maitre::request=warn")
        .start();
    let url = maitre.url.clone();
    let admin = maitre.admin.clone();
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
    let held = rss_kib(maitre.pid());
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(n);
    let mut held_now = 0;
    while pending.len() < n {
        for _ in 0..batch.min(n - pending.len()) {
            let i = pending.len();
            let r = client
                .post(format!("{url}/api/generate"))
                .header("x-priority", if i % 50 == 0 { "realtime" } else { "batch" })
                .json(&body);
            pending.push(tokio::spawn(async move {
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
        // This batch waits in maitre before the next one connects.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            held_now = waiting(&admin).await;
            if held_now >= pending.len() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let fill = t0.elapsed();
    // Let maitre settle, then sample with every request waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_waiting = waiting(&admin).await.max(held_now);
    let all_waiting = rss_kib(maitre.pid());
    let received = fake
        .log()
        .iter()
        .filter(|e| e.kind == EventKind::Received)
        .count();
    // Release the two holders: cancel them (the client goes away), the rest drains.
    for t in &tasks {
        t.abort();
    }
    let t1 = Instant::now();
    let mut ok = 0;
    let mut statuses = std::collections::BTreeMap::new();
    let mut peak = all_waiting;
    for t in pending {
        let (s, good) = t.await.unwrap();
        *statuses.entry(s).or_insert(0) += 1;
        if good {
            ok += 1;
        }
        peak = peak.max(rss_kib(maitre.pid()));
    }
    let drain = t1.elapsed();
    let after = rss_kib(maitre.pid());
    // A graceful stop, so a wrapper such as massif writes its profile.
    maitre.terminate();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per = all_waiting.saturating_sub(held) as f64 / held_waiting.max(1) as f64;
    println!("| figure | value |");
    println!("|---|---|");
    println!("| requests sent / waiting in maitre | {n} / {held_waiting} |");
    println!("| requests upstream while they waited | {received} (2 = only the holders) |");
    println!("| maitre RSS idle | {:.1} MiB |", mib(idle));
    println!("| maitre RSS, 2 holders running | {:.1} MiB |", mib(held));
    println!(
        "| maitre RSS, all waiting | {:.1} MiB ({:.1} MB) |",
        mib(all_waiting),
        all_waiting as f64 * 1024.0 / 1e6
    );
    println!("| memory per waiting request | {per:.1} KiB |");
    println!(
        "| memory for the waiting requests | {:.1} MiB ({:.1} MB) |",
        mib(all_waiting.saturating_sub(held)),
        all_waiting.saturating_sub(held) as f64 * 1024.0 / 1e6
    );
    println!(
        "| maitre RSS peak during the drain | {:.1} MiB |",
        mib(peak)
    );
    println!("| maitre RSS after drain | {:.1} MiB |", mib(after));
    println!(
        "| time to queue all (batches of {batch}) | {:.1} s |",
        fill.as_secs_f64()
    );
    println!("| time to drain all | {:.1} s |", drain.as_secs_f64());
    println!("| answered 200 with done:true | {ok} / {n} |");
    println!("| statuses | {statuses:?} |");
    println!("| upstream max concurrent | {} |", fake.max_concurrent());
}
