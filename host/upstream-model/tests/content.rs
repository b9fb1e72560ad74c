//! Thinking, tool calls and `format` answers, streamed and not, in Ollama's
//! shapes: the pieces of a stream add up to the non-streamed answer.

mod common;

use common::*;
use serde_json::{Value, json};

const TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","parameters":{}}},
                       {"type":"function","function":{"name":"get_time","parameters":{}}}]"#;

async fn both(path: &str, body: Value) -> (String, Value) {
    let f = fake(cfg(2, 1, 8)).await;
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let mut whole = body;
    whole["stream"] = false.into();
    let s = text(post(f.addr(), path, &[], &streamed.to_string()).await).await;
    let w = json(post(f.addr(), path, &[], &whole.to_string()).await).await;
    (s, w)
}

#[tokio::test]
async fn chat_thinks_calls_tools_and_answers_json() {
    let body = json!({
        "model": "fake",
        "messages": [{"role": "user", "content": "x"}],
        "think": true,
        "format": "json",
        "tools": serde_json::from_str::<Value>(TOOLS).unwrap(),
    });
    let (s, w) = both("/api/chat", body).await;
    let lines = ndjson(&s);
    let thinking: String = lines
        .iter()
        .filter_map(|l| l["message"]["thinking"].as_str())
        .collect();
    let content: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    let calls: Vec<Value> = lines
        .iter()
        .filter_map(|l| l["message"]["tool_calls"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(thinking, "think0 think1 think2 think3 ");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_eq!(
        calls[1]["function"]["arguments"],
        json!({"zeta": 1, "alpha": "tok"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&content).unwrap(),
        json!({"t0": 0, "t1": 1})
    );
    let m = &w["message"];
    assert_eq!(m["thinking"], thinking);
    assert_eq!(m["content"], content);
    assert_eq!(m["tool_calls"], Value::Array(calls));
    assert_eq!(w["eval_count"], 8);
}

#[tokio::test]
async fn generate_thinks_with_a_schema() {
    let body =
        json!({"model": "fake", "prompt": "x", "think": "low", "format": {"type": "object"}});
    let (s, w) = both("/api/generate", body).await;
    let lines = ndjson(&s);
    let thinking: String = lines
        .iter()
        .filter_map(|l| l["thinking"].as_str())
        .collect();
    let response: String = lines
        .iter()
        .filter_map(|l| l["response"].as_str())
        .collect();
    assert_eq!(w["thinking"], thinking);
    assert_eq!(w["response"], response);
    assert!(
        serde_json::from_str::<Value>(&response)
            .unwrap()
            .is_object()
    );
    // Go's omitempty: no thinking key on answer chunks.
    assert!(lines.last().unwrap().get("thinking").is_none());
}

#[tokio::test]
async fn openai_chat_reasons_and_calls_tools() {
    let body = json!({
        "model": "fake",
        "messages": [{"role": "user", "content": "x"}],
        "reasoning_effort": "high",
        "tools": serde_json::from_str::<Value>(TOOLS).unwrap(),
    });
    let (s, w) = both("/v1/chat/completions", body).await;
    let events = sse(&s);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert_eq!(deltas[0]["role"], "assistant");
    assert!(deltas[1..].iter().all(|d| d.get("role").is_none()));
    let reasoning: String = deltas
        .iter()
        .filter_map(|d| d["reasoning"].as_str())
        .collect();
    let calls: Vec<Value> = deltas
        .iter()
        .filter_map(|d| d["tool_calls"].as_array())
        .flatten()
        .cloned()
        .collect();
    let finish = chunks.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let m = &w["choices"][0]["message"];
    assert_eq!(m["reasoning"], reasoning);
    assert_eq!(m["tool_calls"], Value::Array(calls));
    assert_eq!(
        m["tool_calls"][0]["function"]["arguments"],
        r#"{"alpha":"tok","zeta":0}"#
    );
    assert_eq!(w["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn openai_completions_put_zero_usage_on_every_chunk_then_the_real_one() {
    let body = json!({"model": "fake", "prompt": "x y", "max_tokens": 2, "stream_options": {"include_usage": true}});
    let (s, w) = both("/v1/completions", body).await;
    let events = sse(&s);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks[..3].iter().all(|c| c["usage"]["total_tokens"] == 0));
    assert_eq!(chunks[3]["usage"], w["usage"]);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(w["choices"][0]["text"], text);
    assert!(w["choices"][0].get("logprobs").is_none());
}
