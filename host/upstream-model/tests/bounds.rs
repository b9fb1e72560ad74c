//! What the model keeps and shows: a bounded event log under many requests,
//! no log at all when it is off, and no control routes unless switched on.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use upstream_model::{EventKind, ModelConfig, UpstreamModel};

/// Requests sent per run, over `CONNS` keep-alive connections.
const REQUESTS: usize = 3000;
const CONNS: usize = 8;
/// Events one short generation logs: received, queued, started, first
/// token, finished.
const EVENTS_PER_REQUEST: u64 = 5;

/// Sends `REQUESTS` one-token generations with no delay and checks each
/// answered 200; fails if that takes more than 60 s.
async fn flood(addr: SocketAddr) {
    let body = r#"{"model":"fake","prompt":"hi","stream":false}"#;
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            for _ in 0..REQUESTS / CONNS {
                let req = Request::post("/api/generate")
                    .header("host", addr.to_string())
                    .header("x-fake-tokens", "1")
                    .header("x-fake-token-ms", "0")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap();
                tx.ready().await.expect("connection ready");
                let r = tx.send_request(req).await.expect("send");
                assert_eq!(r.status(), 200);
                r.into_body().collect().await.expect("body");
            }
        }));
    }
    tokio::time::timeout(60 * SECOND, async {
        for t in tasks {
            t.await.expect("client task");
        }
    })
    .await
    .expect("the flood took over 60 s");
}

fn with_log(capacity: usize) -> ModelConfig {
    ModelConfig {
        slots: 4,
        log_capacity: capacity,
        ..ModelConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stays_at_its_capacity_and_seq_keeps_counting() {
    let cap = 500;
    let f = UpstreamModel::start(with_log(cap)).await.unwrap();
    flood(f.addr()).await;
    let total = REQUESTS as u64 * EVENTS_PER_REQUEST;
    let log = f.log();
    assert_eq!(log.len(), cap);
    // The last `cap` events, gap-free, numbered over the whole run.
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (total - cap as u64 + 1..=total).collect();
    assert_eq!(seqs, want);
    assert_eq!(log.last().unwrap().kind, EventKind::Finished);
    // Readers see the same window: over HTTP, and through wait_until.
    let over_http = json(get(f.addr(), "/_fake/log").await).await;
    assert_eq!(over_http.as_array().unwrap().len(), cap);
    assert!(
        f.wait_until(SECOND, |l| l.len() == cap && l[0].seq == want[0])
            .await
    );
    // The counters are not part of the log and stay exact.
    let stats = f.stats();
    assert_eq!(stats.active, 0);
    assert!((1..=4).contains(&stats.max_concurrent), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_log_off_nothing_is_kept() {
    let f = UpstreamModel::start(with_log(0)).await.unwrap();
    flood(f.addr()).await;
    assert!(f.log().is_empty());
    let over_http = json(get(f.addr(), "/_fake/log").await).await;
    assert_eq!(over_http, serde_json::json!([]));
    assert!(
        !f.wait_until(Duration::from_millis(50), |l| !l.is_empty())
            .await
    );
    // Slots still work without a log.
    let stats = f.stats();
    assert_eq!(stats.active, 0);
    assert!((1..=4).contains(&stats.max_concurrent), "{stats:?}");
}

#[tokio::test]
async fn control_routes_off_answer_404_like_ollama() {
    let cfg = ModelConfig {
        control_routes: false,
        ..ModelConfig::default()
    };
    let f = UpstreamModel::start(cfg).await.unwrap();
    let a = f.addr();
    for (method, path) in [
        ("GET", "/_fake/log"),
        ("GET", "/_fake/stats"),
        ("POST", "/_fake/reset"),
        ("POST", "/_fake/echo"),
        ("GET", "/_fake/echo"),
    ] {
        let r = send(a, method, path, &[], "").await;
        assert_eq!(r.status(), 404, "{method} {path}");
        assert_eq!(text(r).await, "404 page not found");
    }
    // Like any other path, they are now behind the Host check.
    let r = send(a, "GET", "/_fake/echo", &[("host", "example.com")], "").await;
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn the_demo_config_serves_ollama_without_control_routes_or_log() {
    let cfg = ModelConfig::demo(3);
    assert!(!cfg.control_routes);
    assert_eq!(cfg.log_capacity, 0);
    let f = UpstreamModel::start(cfg).await.unwrap();
    let r = post(
        f.addr(),
        "/api/generate",
        &[],
        r#"{"model":"fake","prompt":"hi","stream":false,"options":{"num_predict":2}}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["response"], "tok0 tok1 ");
    assert_eq!(get(f.addr(), "/_fake/stats").await.status(), 404);
    assert!(f.log().is_empty());
    assert_eq!(f.stats().slots, 3);
}
