//! What the scheduler reports of each ended request: its trace line and its
//! A/B sample, with the pre-emptions it suffered and the tokens they threw
//! away (chunks relayed, plus what a caller says the upstream had made).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::Value;

use super::tests::{arm, granted, meta, preempt_for_realtime, script, weighted};
use super::*;
use crate::config::{Limits, TraceConfig};
use crate::trace::TraceSink;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn each_ended_request_is_traced_with_its_preemptions_and_lost_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    let cfg = TraceConfig {
        path: path.clone(),
        rotate_bytes: 1 << 20,
        keep: 1,
    };
    let sink = TraceSink::start(&cfg, Counter::default()).unwrap();
    let (d, _) = script(preempt_for_realtime);
    let sched = spawn(
        Setup {
            arms: vec![arm("a", 100, d)],
            ab: weighted(),
            backends: vec![crate::fleet::BackendSpec::single("up", 1)],
            max_failovers: 2,
            limits: Limits::default(),
            trace: Some(sink),
        },
        Arc::new(Metrics::new()),
    );
    // A batch request is pre-empted before it answers; its caller says the
    // upstream had made 7 tokens. A real-time request takes its slot.
    let mut b = sched.submit(meta(Some("batch"), "k")).await.unwrap();
    let g = granted(&mut b).await;
    let mut rt = sched.submit(meta(Some("rt"), "k")).await.unwrap();
    assert!(g.run.preempt.is_cancelled());
    b.requeue_after_preempt_losing(7);
    let grt = granted(&mut rt).await;
    assert!(grt.run.mark_streaming());
    grt.run.mark_client_first_byte();
    for _ in 0..3 {
        grt.run.add_token();
    }
    rt.finish(Outcome::Ok);
    // Served again, it streams two chunks and is cut for another one.
    let g = granted(&mut b).await;
    assert!(g.run.mark_streaming());
    g.run.add_token();
    g.run.add_token();
    assert!(g.run.on_cut(Box::new(|| None)));
    let mut rt2 = sched.submit(meta(Some("realtime"), "k")).await.unwrap();
    granted(&mut rt2).await;
    b.finish(Outcome::Cancelled);
    rt2.finish(Outcome::Ok);

    let report = sched.report(Duration::from_secs(60)).await.unwrap();
    let row = |class: &str| report.rows.iter().find(|r| r.class == class).unwrap();
    assert_eq!(
        (row("batch").preemptions, row("batch").preempted_tokens),
        (2, 7 + 2)
    );
    assert_eq!(row("realtime").preemptions, 0);

    let end = std::time::Instant::now() + Duration::from_secs(10);
    while lines(&path).len() < 3 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let l = lines(&path);
    assert_eq!(l.len(), 3);
    let first = &l[0];
    assert_eq!(
        (&first["class_hint"], &first["class"], &first["outcome"]),
        (&"realtime".into(), &"realtime".into(), &"ok".into())
    );
    assert_eq!(first["tokens"], 3);
    assert_eq!(first["backend"], "up");
    let cut = &l[1];
    assert_eq!(cut["outcome"], "cut");
    assert_eq!(cut["preemptions"], 2);
    assert_eq!(cut["tokens"], 2);
    assert_eq!(cut["class"], "batch");
    assert_eq!(l[2]["outcome"], "ok");
    assert_eq!(cut["client"], first["client"], "one key, one id");
}
