//! The llama-server-like mode (`ignore_disconnect_non_streaming`): a
//! non-streaming generation whose client leaves runs on and keeps its slot;
//! a streaming one stops at once. Generations in flight are counted at the
//! model, zombies included.

mod common;

use std::time::Duration;

use common::*;
use upstream_model::{EventKind, ModelConfig};

fn llama_like(slots: usize, token_ms: u64) -> ModelConfig {
    ModelConfig {
        ignore_disconnect_non_streaming: true,
        ..cfg(slots, token_ms, 5)
    }
}

fn kinds(f: &upstream_model::UpstreamModel, tag: &str) -> Vec<EventKind> {
    f.log()
        .iter()
        .filter(|e| e.tag.as_deref() == Some(tag))
        .map(|e| e.kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streaming_generation_outlives_its_client_and_keeps_its_slot() {
    let f = fake(llama_like(1, 20)).await;
    let s = raw_post(
        f.addr(),
        "/api/generate",
        "X-Test-Tag: zombie\r\nX-Fake-Tokens: 15\r\n",
        r#"{"model":"fake","prompt":"x","stream":false}"#,
    )
    .await;
    f.wait_for("zombie", EventKind::FirstToken, 5 * SECOND)
        .await
        .expect("first token");
    drop(s);
    let orphaned = f
        .wait_for("zombie", EventKind::Orphaned, 5 * SECOND)
        .await
        .expect("Orphaned logged");
    assert_eq!(f.stats().orphans, 1);
    // Another request has to wait for the zombie's slot.
    let r = post(
        f.addr(),
        "/api/generate",
        &[("x-test-tag", "next"), ("x-fake-tokens", "2")],
        r#"{"model":"fake","prompt":"x","stream":false}"#,
    )
    .await;
    assert_eq!(json(r).await["eval_count"], 2);
    let finished = f
        .wait_for("zombie", EventKind::Finished, 5 * SECOND)
        .await
        .expect("the zombie ran to its end");
    assert_eq!(finished.tokens, 15);
    assert!(finished.seq > orphaned.seq);
    let next = f
        .wait_for("next", EventKind::Started, SECOND)
        .await
        .unwrap();
    assert!(next.seq > finished.seq, "{:#?}", f.log());
    assert_eq!(
        kinds(&f, "zombie"),
        [
            EventKind::Received,
            EventKind::Queued,
            EventKind::Started,
            EventKind::FirstToken,
            EventKind::Orphaned,
            EventKind::Finished
        ]
    );
    let stats = f.stats();
    assert_eq!((stats.orphans, stats.in_flight), (0, 0));
    // The zombie and the next one were in flight together.
    assert_eq!(stats.max_in_flight, 2);
    assert_eq!(stats.max_concurrent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_generation_still_stops_with_its_client() {
    let f = fake(llama_like(1, 300)).await;
    let mut s = raw_post(
        f.addr(),
        "/v1/chat/completions",
        "X-Test-Tag: leaver\r\nX-Fake-Tokens: 50\r\n",
        r#"{"model":"fake","messages":[{"role":"user","content":"x"}],"stream":true}"#,
    )
    .await;
    read_until(&mut s, "tok0 ").await;
    drop(s);
    let c = f
        .wait_for("leaver", EventKind::Cancelled, 5 * SECOND)
        .await
        .expect("cancelled at once");
    assert_eq!(c.tokens, 1);
    assert!(f.log().iter().all(|e| e.kind != EventKind::Orphaned));
    assert!(f.log().iter().any(|e| e.stream), "the log says it streamed");
    assert_eq!(f.stats().orphans, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_mode_a_non_streaming_generation_stops_with_its_client() {
    let f = fake(cfg(1, 20, 5)).await;
    let s = raw_post(
        f.addr(),
        "/api/generate",
        "X-Test-Tag: leaver\r\nX-Fake-Tokens: 100\r\n",
        r#"{"model":"fake","prompt":"x","stream":false}"#,
    )
    .await;
    f.wait_for("leaver", EventKind::FirstToken, 5 * SECOND)
        .await
        .unwrap();
    drop(s);
    let c = f
        .wait_for("leaver", EventKind::Cancelled, 5 * SECOND)
        .await
        .expect("cancelled");
    assert!(c.tokens < 100);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!kinds(&f, "leaver").contains(&EventKind::Orphaned));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_endpoint_counts_in_flight_generations() {
    let f = fake(cfg(1, 20, 5)).await;
    let addr = f.addr();
    let reqs: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(async move {
                let tag = format!("r{i}");
                let r = post(
                    addr,
                    "/api/generate",
                    &[("x-test-tag", tag.as_str())],
                    r#"{"model":"fake","prompt":"x","stream":false}"#,
                )
                .await;
                json(r).await
            })
        })
        .collect();
    for r in reqs {
        r.await.unwrap();
    }
    let v = json(get(addr, "/_fake/stats").await).await;
    assert_eq!(v["max_in_flight"], 3, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    assert_eq!(v["max_concurrent"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_notice_keeps_generating_and_the_connection_open_for_a_while() {
    let f = fake(ModelConfig {
        disconnect_notice: Duration::from_millis(300),
        ..cfg(1, 20, 5)
    })
    .await;
    let mut s = raw_post(
        f.addr(),
        "/api/generate",
        "X-Test-Tag: leaver\r\nX-Fake-Tokens: 100\r\n",
        r#"{"model":"fake","prompt":"x"}"#,
    )
    .await;
    read_until(&mut s, "tok1 ").await;
    let t0 = std::time::Instant::now();
    drop(s);
    let c = f
        .wait_for("leaver", EventKind::Cancelled, 5 * SECOND)
        .await
        .expect("cancelled in the end");
    let noticed = t0.elapsed();
    assert!(
        noticed >= Duration::from_millis(250) && noticed < Duration::from_millis(1500),
        "noticed after {noticed:?}"
    );
    assert!(c.tokens >= 10, "it generated on meanwhile: {c:?}");
}
