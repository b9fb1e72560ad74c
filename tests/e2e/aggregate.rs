//! Differential tests: the non-streamed answer maitre folds from the
//! upstream's stream equals the upstream model's own non-streamed answer to
//! the same request, field by field, status and `Content-Type` included.
//!
//! Fields that cannot match between two requests are left out of the
//! comparison: the timestamps (`created_at`, `created`), the durations
//! (`total_duration`, `load_duration`, `prompt_eval_duration`,
//! `eval_duration`) and the `/v1` `id` (one per request; only its prefix is
//! compared).

use serde_json::{Value, json};

use crate::common::*;

/// Fields that differ between any two requests.
const VARYING: &[&str] = &[
    "created_at",
    "created",
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
];

/// One answer, as a client reads it.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

async fn ask(base: &str, path: &str, tag: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
    let mut r = client()
        .post(format!("{base}{path}"))
        .header("x-test-tag", tag)
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path} via {base}: not one JSON object ({e}): {text}"));
    Answer {
        status,
        content_type,
        body,
    }
}

/// `v` without the fields that vary, and with `id` cut to its prefix.
fn comparable(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in VARYING {
            o.remove(*k);
        }
        if let Some(Value::String(id)) = o.get_mut("id") {
            *id = id.split('-').next().unwrap_or("").to_string();
        }
    }
    v
}

/// Sends `body` to the upstream model directly and through maitre, and
/// asserts that both answers are the same; returns maitre's.
async fn same_answer(path: &str, headers: &[(&str, &str)], body: Value) -> Answer {
    let fake = fake(2, 2).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "fifo")));
    let direct = ask(&fake.url(), path, "direct", headers, &body).await;
    let via = ask(&m.url, path, "via", headers, &body).await;
    assert_eq!(
        via.status, direct.status,
        "{path} {body}: {via:#?} vs {direct:#?}"
    );
    assert_eq!(via.content_type, direct.content_type, "{path} {body}");
    assert_eq!(
        comparable(via.body.clone()),
        comparable(direct.body.clone()),
        "{path} {body}"
    );
    let log = fake.log();
    let streamed = |tag: &str| {
        log.iter()
            .find(|e| e.kind == EventKind::Received && e.tag.as_deref() == Some(tag))
            .map(|e| e.stream)
    };
    assert_eq!(streamed("direct"), Some(false), "{log:#?}");
    assert_eq!(
        streamed("via"),
        Some(true),
        "maitre did not ask for a stream"
    );
    via
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ])
}

#[tokio::test]
async fn generate() {
    let a = same_answer(
        "/api/generate",
        &[],
        json!({"model": "fake", "prompt": "hi there", "stream": false, "options": {"num_predict": 6}}),
    )
    .await;
    assert_eq!(a.body["done_reason"], "length");
    assert_eq!(a.body["response"], "tok0 tok1 tok2 tok3 tok4 tok5 ");
}

#[tokio::test]
async fn generate_thinking_in_format_json() {
    let a = same_answer(
        "/api/generate",
        &[("x-fake-tokens", "8")],
        json!({"model": "fake", "prompt": "hi", "stream": false, "think": true, "format": "json"}),
    )
    .await;
    assert_eq!(a.body["thinking"], "think0 think1 think2 think3 ");
    let text: Value = serde_json::from_str(a.body["response"].as_str().unwrap()).unwrap();
    assert!(text.is_object(), "{text}");
}

#[tokio::test]
async fn chat_with_tool_calls_and_thinking() {
    let a = same_answer(
        "/api/chat",
        &[("x-fake-tokens", "8")],
        json!({"model": "fake", "stream": false, "think": true, "tools": tools(),
               "messages": [{"role": "user", "content": "weather?"}]}),
    )
    .await;
    let msg = &a.body["message"];
    assert_eq!(msg["tool_calls"].as_array().unwrap().len(), 2, "{msg}");
    assert_eq!(msg["tool_calls"][1]["function"]["name"], "get_time");
    assert!(msg["thinking"].as_str().unwrap().starts_with("think0"));
}

#[tokio::test]
async fn chat_in_format_json_with_a_schema() {
    let a = same_answer(
        "/api/chat",
        &[],
        json!({"model": "fake", "stream": false, "format": {"type": "object"},
               "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    let text: Value = serde_json::from_str(a.body["message"]["content"].as_str().unwrap()).unwrap();
    assert!(text.is_object(), "{text}");
    assert!(a.body["message"].get("thinking").is_none());
}

#[tokio::test]
async fn openai_chat_with_tool_calls_reasoning_and_json() {
    let a = same_answer(
        "/v1/chat/completions",
        &[("x-fake-tokens", "9")],
        json!({"model": "fake", "reasoning_effort": "low", "tools": tools(),
               "response_format": {"type": "json_object"},
               "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(a.content_type, "application/json");
    let choice = &a.body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["tool_calls"].as_array().unwrap().len(), 2);
    assert_eq!(a.body["usage"]["completion_tokens"], 9);
}

#[tokio::test]
async fn openai_completions() {
    let a = same_answer(
        "/v1/completions",
        &[],
        json!({"model": "fake", "prompt": "say hi", "max_tokens": 4, "stream": false}),
    )
    .await;
    assert_eq!(a.body["object"], "text_completion");
    assert_eq!(a.body["choices"][0]["text"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(a.body["usage"]["prompt_tokens"], 2);
}

#[tokio::test]
async fn an_error_mid_generation_is_the_upstreams_error_answer() {
    let a = same_answer(
        "/api/chat",
        &[("x-fake-fail-after", "2")],
        json!({"model": "fake", "stream": false, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(a.status, 500);
    assert_eq!(a.body, json!({"error": "fake failure"}));
}

#[tokio::test]
async fn a_preload_and_an_unknown_model_are_relayed_as_they_come() {
    same_answer(
        "/api/generate",
        &[],
        json!({"model": "fake", "stream": false}),
    )
    .await;
    let a = same_answer(
        "/api/chat",
        &[],
        json!({"model": "nope", "stream": false, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(a.status, 404);
}

/// On `/v1`, Ollama's stream says nothing of a failure but ends without
/// `[DONE]`: maitre answers with a 500 in the OpenAI shape, as the upstream
/// does, but cannot know the upstream's message.
#[tokio::test]
async fn an_openai_error_mid_generation_is_a_500_in_openai_shape() {
    let fake = fake(2, 2).await;
    let m = start(&PolicyFile::new(fake.url(), 2).arm(Arm::builtin("main", "fifo")));
    let body = json!({"model": "fake", "messages": [{"role": "user", "content": "x"}]});
    let h = [("x-fake-fail-after", "2")];
    let direct = ask(&fake.url(), "/v1/chat/completions", "direct", &h, &body).await;
    let via = ask(&m.url, "/v1/chat/completions", "via", &h, &body).await;
    assert_eq!((via.status, direct.status), (500, 500));
    assert_eq!(via.body["error"]["type"], direct.body["error"]["type"]);
    assert!(via.body["error"]["message"].is_string(), "{:?}", via.body);
}
