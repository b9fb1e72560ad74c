//! Requests that try to skip the scheduler: bodies and paths that Ollama's Go
//! server reads differently from a strict reader. Every POST to a scheduled
//! path takes a slot, whatever its body, so the upstream never holds more
//! requests than maitre has slots.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

/// One way of spelling a scheduled request.
struct Case {
    tag: &'static str,
    path: &'static str,
    body: &'static str,
    /// Whether Ollama generates for it (else it answers 400 at once).
    generates: bool,
}

const GENERATE: &str =
    r#"{"model":"fake","prompt":"x","stream":false,"options":{"num_predict":4}}"#;

const CASES: &[Case] = &[
    Case {
        tag: "model-key-case",
        path: "/api/generate",
        body: r#"{"Model":"fake","prompt":"x","stream":false,"options":{"num_predict":4}}"#,
        generates: true,
    },
    Case {
        tag: "duplicate-model",
        path: "/api/generate",
        body: r#"{"model":"other","model":"fake","prompt":"x","stream":false,"options":{"num_predict":4}}"#,
        generates: true,
    },
    Case {
        tag: "trailing-data",
        path: "/api/generate",
        body: r#"{"model":"fake","prompt":"x","stream":false,"options":{"num_predict":4}} and then {some"#,
        generates: true,
    },
    Case {
        tag: "encoded-path",
        path: "/api/%67enerate",
        body: GENERATE,
        generates: true,
    },
    Case {
        tag: "encoded-v1-path",
        path: "/v1/chat%2Fcompletions",
        body: r#"{"MODEL":"fake","messages":[{"role":"user","content":"x"}],"max_tokens":4}"#,
        generates: true,
    },
    Case {
        tag: "invalid-json",
        path: "/api/generate",
        body: r#"{"model":"fake", nope}"#,
        generates: false,
    },
    Case {
        tag: "not-an-object",
        path: "/api/chat",
        body: "[1,2]",
        generates: false,
    },
    Case {
        tag: "empty-body",
        path: "/api/generate",
        body: "",
        generates: false,
    },
    Case {
        tag: "model-not-a-string",
        path: "/api/embed",
        body: r#"{"model":5,"input":"x"}"#,
        generates: false,
    },
];

/// The most requests the upstream was handling at once, from its log
/// (received to ended), whether or not they took a generation slot there.
fn max_in_flight(log: &[LogEvent]) -> i64 {
    let (mut now, mut max) = (0i64, 0i64);
    for e in log {
        match e.kind {
            EventKind::Received => now += 1,
            EventKind::Finished | EventKind::Failed | EventKind::Cancelled => now -= 1,
            _ => {}
        }
        max = max.max(now);
    }
    max
}

#[tokio::test]
async fn every_post_to_a_scheduled_path_takes_a_slot_whatever_its_body() {
    // The upstream would take them all at once; maitre has one slot.
    let fake = fake(16, 20).await;
    let m = start(
        &PolicyFile::new(fake.url(), 1)
            .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 0)),
    );
    let c = client();
    let holder = tokio::spawn(generate(&c, &m.url, "holder", None, 25).send());
    fake.wait_for("holder", EventKind::Started, T)
        .await
        .expect("the holder takes the one slot");
    // Two of each, all at once, while the slot is held.
    let mut tasks = Vec::new();
    for case in CASES.iter().chain(CASES) {
        let req = c
            .post(format!("{}{}", m.url, case.path))
            .header("content-type", "application/json")
            .header("x-test-tag", case.tag)
            .body(case.body);
        tasks.push((case, tokio::spawn(req.send())));
    }
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    let mut answers = Vec::new();
    for (case, task) in tasks {
        let resp = task.await.unwrap().unwrap();
        let status = resp.status();
        let scheduled = resp.headers().contains_key("x-maitre-arm");
        let from_upstream = resp.headers().contains_key("x-fake-upstream");
        let body: serde_json::Value = resp.json().await.unwrap();
        answers.push((case, status, scheduled, from_upstream, body));
    }
    // The rule: the upstream never held more requests than maitre has slots,
    // and none got in while the one slot was held.
    let log = fake.log();
    assert_eq!(fake.max_concurrent(), 1, "generation slots held at once");
    assert_eq!(max_in_flight(&log), 1, "requests in the upstream at once");
    let holder_end = seq_of(&log, "holder", EventKind::Finished).unwrap();
    for case in CASES {
        let received = seq_of(&log, case.tag, EventKind::Received).unwrap();
        assert!(
            received > holder_end,
            "{} reached the upstream while the one slot was held",
            case.tag
        );
    }
    // Every client got an answer: a generation, or Ollama's own error.
    for (case, status, scheduled, from_upstream, body) in answers {
        assert!(scheduled, "{}: not scheduled ({status} {body})", case.tag);
        assert!(from_upstream, "{}: answered by maitre: {body}", case.tag);
        if case.generates {
            assert_eq!(status, 200, "{}: {body}", case.tag);
            assert!(
                body["done"] == true || body["choices"][0]["finish_reason"] == "length",
                "{}: {body}",
                case.tag
            );
        } else {
            // Ollama's own error, in Ollama's shape.
            assert_eq!(status, 400, "{}: {body}", case.tag);
            assert!(body["error"].is_string(), "{}: {body}", case.tag);
        }
    }
    let generating = log
        .iter()
        .filter(|e| e.kind == EventKind::Started && e.tag.as_deref() != Some("holder"));
    assert!(
        generating.clone().all(|e| e.model == "fake"),
        "the upstream read the model of each"
    );
    let expected = 2 * CASES.iter().filter(|c| c.generates).count();
    assert_eq!(generating.count(), expected);
}
