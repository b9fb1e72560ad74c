//! Shared helpers of maitre's benchmarks (`cargo bench -p maitre --bench NAME`):
//! maitre in-process or as the real binary, a seeded RNG, percentiles, and
//! table printing. Benchmarks print tables; they assert nothing. The policy
//! builder, the process launcher, the metrics parser and the upstream model
//! come from the test kit (`maitre-testkit`), shared with the e2e tests.
#![allow(dead_code)]

use std::time::Duration;

use tokio::net::TcpListener;

use maitre_testkit::{Maitre, PolicyFile, Serve};

/// The real `maitre` binary (`maitre serve`) on `policy`, once it is ready;
/// killed when dropped.
pub fn binary(policy: &PolicyFile) -> Maitre {
    Serve::new(env!("CARGO_BIN_EXE_maitre"))
        .policy(policy)
        .start()
}

/// maitre served in-process (`maitre::serve`) on loopback port 0, on the
/// current tokio runtime; stops when dropped.
pub struct InProc {
    /// `http://127.0.0.1:PORT` of the client listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl InProc {
    /// Parses `policy` (written to a temp folder, as hot reload wants a
    /// file) and serves it.
    pub async fn start(policy: &PolicyFile) -> InProc {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("policy.toml");
        let text = policy.to_toml();
        std::fs::write(&path, &text).expect("write policy");
        let cfg = maitre::config::Config::parse(&path, &text).expect("valid policy");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = maitre::serve(cfg, listener, Some(admin), None, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("maitre::serve failed: {e:#}");
            }
        });
        InProc {
            url,
            admin: admin_url,
            stop: Some(tx),
            _dir: dir,
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// SplitMix64: a small seeded generator, so every policy sees the same
/// arrivals and job sizes.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and a stream number.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    /// Exponentially distributed with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// Nearest-rank percentile (`q` in 0..=1) of unsorted values.
pub fn pct(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Arithmetic mean.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends a streaming Ollama request and reads its answer to the end: the
/// time to its first body byte (ms) if it ended with `"done": true`, else
/// `None` (refused, broken off or incomplete).
pub async fn streamed_ttft(req: reqwest::RequestBuilder) -> Option<f64> {
    use futures_util::StreamExt;
    let sent = std::time::Instant::now();
    let mut s = req.send().await.ok()?.bytes_stream();
    let mut body = Vec::new();
    let mut ttft = None;
    while let Some(chunk) = s.next().await {
        let Ok(chunk) = chunk else { break };
        if ttft.is_none() && !chunk.is_empty() {
            ttft = Some(ms(sent.elapsed()));
        }
        body.extend_from_slice(&chunk);
    }
    let done = String::from_utf8_lossy(&body)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .is_some_and(|v| v["done"] == true);
    ttft.filter(|_| done)
}

/// An environment variable parsed as a number, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Separate runtimes for the fake upstream (1 worker), an in-process maitre
/// (2 workers) and the measuring client (current thread), so that none of
/// them delays the others' timers.
pub fn runtimes() -> (
    tokio::runtime::Runtime,
    tokio::runtime::Runtime,
    tokio::runtime::Runtime,
) {
    let multi = |workers| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    };
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (multi(1), multi(2), client)
}
