//! The OpenAI-compatible `/v1` endpoints that need a model.

use http::Response;
use serde_json::{Map, Value, json};

use crate::content::Asks;
use crate::generation::{self, Flavor, Gen};
use crate::native::{model_error, token_count};
use crate::routes::{Call, Route};
use crate::util::{self, Body};

/// Words in a `/v1` prompt or input: a string, an array of strings, or
/// token arrays (counted as their length).
fn count_input(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => util::count_words(s),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::Number(_) => 1,
                other => count_input(Some(other)),
            })
            .sum(),
        _ => 0,
    }
}

/// `POST /v1/chat/completions` and `POST /v1/completions`.
pub(crate) async fn completion(call: Call, model: &str, m: &Map<String, Value>) -> Response<Body> {
    if let Some((status, msg)) = model_error(model) {
        return call.error(status, &msg);
    }
    let chat = call.route == Route::OaChat;
    let prompt_tokens = if chat {
        m.get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|msg| match msg.get("content") {
                // Content may be a string or an array of parts.
                Some(Value::Array(parts)) => parts.iter().map(|p| count_input(p.get("text"))).sum(),
                other => count_input(other),
            })
            .sum::<u64>()
    } else {
        count_input(m.get("prompt"))
    };
    let stream = util::stream_flag(m, false);
    let include_usage = m
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // Ollama reads `max_tokens` only (openai.go); `max_completion_tokens`
    // is ignored.
    let limit = util::pos_int(m.get("max_tokens"));
    let (n, length, prefill) = token_count(&call, m, chat, limit);
    let flavor = if chat {
        Flavor::OaChat
    } else {
        Flavor::OaCompletion
    };
    let g = Gen::new(
        call.tracker,
        flavor,
        model.to_string(),
        n,
        length,
        prompt_tokens.max(1),
        include_usage,
        call.shape,
        None,
        Asks::openai(m, chat),
    )
    .continuing(prefill);
    generation::respond(g, stream).await
}

/// `POST /v1/embeddings`: like `/api/embed`, in OpenAI's shape. Honours
/// `encoding_format: "base64"` (little-endian f32, as OpenAI does).
pub(crate) async fn embeddings(
    mut call: Call,
    model: &str,
    m: &Map<String, Value>,
) -> Response<Body> {
    if let Some((status, msg)) = model_error(model) {
        return call.error(status, &msg);
    }
    let inputs: Vec<String> = match m.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_number) && !a.is_empty() => {
            vec![Value::Array(a.clone()).to_string()]
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect(),
        _ => vec![],
    };
    if inputs.is_empty() {
        return call.error(http::StatusCode::BAD_REQUEST, "invalid input");
    }
    let st = call.tracker.state().clone();
    st.load(model, None, None).await;
    call.tracker.acquire().await;
    util::Pacer::start()
        .until(call.shape.timing.token_ready(0))
        .await;
    if call.shape.fail_after == Some(0) {
        return call.error(http::StatusCode::INTERNAL_SERVER_ERROR, util::FAKE_FAILURE);
    }
    let dims = util::pos_int(m.get("dimensions")).map_or(st.cfg.embedding_dims, |d| d as usize);
    let base64 = m.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let e = util::embedding(s, dims);
            let e = if base64 {
                let bytes: Vec<u8> = e.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(util::base64(&bytes))
            } else {
                json!(e)
            };
            json!({ "object": "embedding", "embedding": e, "index": i })
        })
        .collect();
    let tokens = count_input(m.get("input")).max(1);
    let v = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    call.ok(&v)
}
