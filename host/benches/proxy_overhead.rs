//! Proxy overhead on time to first token (TTFT).
//!
//! 1,000 sequential streaming `/api/generate` requests (1 token, token delay
//! 0) on one keep-alive connection per path, interleaved request by request
//! so that drift hits every path alike:
//! - direct: the client talks to the fake Ollama;
//! - maitre binary: through the real `maitre serve` process (default policy,
//!   logging at info to a pipe, as deployed);
//! - maitre in-process: through `maitre::serve` on its own 2-thread runtime
//!   in this process (no log subscriber).
//!
//! TTFT = request sent → first body byte received. Target (design.md): p50
//! < 0.3 ms and p99 < 1 ms added over direct.
//!
//! `cargo bench -p maitre --bench proxy_overhead` (N=... to change the count).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper_util::rt::TokioIo;
use maitre_testkit::{Arm, ModelConfig, PolicyFile, UpstreamModel};

const BODY: &str = r#"{"model":"fake","prompt":"hi","stream":true,"options":{"num_predict":1}}"#;

/// One keep-alive HTTP/1.1 connection to a base URL.
struct Conn {
    host: String,
    send: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(url: &str) -> Conn {
        let host = url.trim_start_matches("http://").to_string();
        let stream = tokio::net::TcpStream::connect(&host)
            .await
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        let (send, conn) = handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        Conn { host, send }
    }

    /// One request; returns its TTFT.
    async fn ttft(&mut self) -> Duration {
        let req = Request::post("/api/generate")
            .header(header::HOST, &self.host)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap();
        self.send.ready().await.expect("connection alive");
        let t0 = Instant::now();
        let resp = self.send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let ttft = loop {
            let f = body.frame().await.expect("a body").expect("body ok");
            if f.data_ref().is_some_and(|d| !d.is_empty()) {
                break t0.elapsed();
            }
        };
        while let Some(f) = body.frame().await {
            f.expect("body ok");
        }
        ttft
    }
}

fn main() {
    let n: usize = env_or("N", 1000);
    let warmup: usize = env_or("WARMUP", 200);

    let (fake_rt, maitre_rt, client_rt) = runtimes();

    let fake = fake_rt.block_on(async {
        UpstreamModel::start(ModelConfig {
            slots: 2,
            token_delay: Duration::ZERO,
            prompt_delay: Duration::ZERO,
            default_tokens: 1,
            ..ModelConfig::default()
        })
        .await
        .expect("fake ollama")
    });
    let policy = PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "reserved-aging"));
    let binary = binary(&policy);
    let inproc = maitre_rt.block_on(InProc::start(&policy));

    let names = ["direct (fake Ollama)", "maitre binary", "maitre in-process"];
    let samples: Vec<Vec<f64>> = client_rt.block_on(async {
        let mut conns = [
            Conn::open(&fake.url()).await,
            Conn::open(&binary.url).await,
            Conn::open(&inproc.url).await,
        ];
        for _ in 0..warmup {
            for c in conns.iter_mut() {
                c.ttft().await;
            }
        }
        let mut s = vec![Vec::with_capacity(n); conns.len()];
        for _ in 0..n {
            for (i, c) in conns.iter_mut().enumerate() {
                s[i].push(ms(c.ttft().await));
            }
        }
        s
    });

    println!();
    println!(
        "proxy_overhead: {n} sequential streaming /api/generate (1 token, token delay 0), {warmup} warm-up each, paths interleaved"
    );
    println!("TTFT = request sent -> first body byte, one keep-alive connection per path");
    println!();
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} | {:>10} {:>10} {:>10} | {:>9} {:>9}",
        "path",
        "p50 ms",
        "p99 ms",
        "mean ms",
        "max ms",
        "+p50 ms",
        "+p99 ms",
        "+mean ms",
        "p50 ×",
        "p99 ×"
    );
    let d = &samples[0];
    let (d50, d99, dmean) = (pct(d, 0.5), pct(d, 0.99), mean(d));
    for (name, s) in names.iter().zip(&samples) {
        let (p50, p99, m) = (pct(s, 0.5), pct(s, 0.99), mean(s));
        println!(
            "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3} | {:>10.3} {:>10.3} {:>10.3} | {:>9.2} {:>9.2}",
            name,
            p50,
            p99,
            m,
            pct(s, 1.0),
            p50 - d50,
            p99 - d99,
            m - dmean,
            p50 / d50,
            p99 / d99
        );
    }
    println!();
    println!("targets: added p50 < 0.300 ms, added p99 < 1.000 ms");
    for (name, s) in names.iter().zip(&samples).skip(1) {
        let (a50, a99) = (pct(s, 0.5) - d50, pct(s, 0.99) - d99);
        println!(
            "  {name}: p50 {} ({a50:.3} ms), p99 {} ({a99:.3} ms)",
            if a50 < 0.3 { "MET" } else { "MISSED" },
            if a99 < 1.0 { "MET" } else { "MISSED" }
        );
    }
    drop(inproc);
    drop(binary);
    maitre_rt.shutdown_timeout(Duration::from_secs(1));
    drop(fake);
    fake_rt.shutdown_timeout(Duration::from_secs(1));
}
