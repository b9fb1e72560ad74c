//! Ollama's native endpoints that need a model: generate, chat, embed,
//! embeddings, show and pull.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Map, Value, json};

use crate::content::Asks;
use crate::generation::{self, Flavor, Gen};
use crate::routes::{Call, details};
use crate::state::Tracker;
use crate::util::{self, Body};

/// Checks `model` as Ollama does: present, and known to the fake. Returns
/// the error to answer with.
pub(crate) fn model_error(model: &str) -> Option<(StatusCode, String)> {
    if model.is_empty() {
        Some((StatusCode::BAD_REQUEST, "model is required".into()))
    } else if !util::known_model(model) {
        Some((StatusCode::NOT_FOUND, util::not_found_msg(model)))
    } else {
        None
    }
}

/// Token count for a request with body `m` (a chat when `chat`):
/// `X-Fake-Tokens`, else the given limit, else the default. The bool says
/// whether the limit was what stopped it ("length"); the last number is the
/// words of the answer so far a chat continues (its trailing assistant
/// message), which an answer of a natural length (no limit) has that much
/// less to say after.
pub(crate) fn token_count(
    call: &Call,
    m: &Map<String, Value>,
    chat: bool,
    limit: Option<u64>,
) -> (u64, bool, u64) {
    let default = call.tracker.state().cfg.default_tokens;
    let (n, length) = crate::timing::token_count(call.shape.tokens, limit, default);
    let prefill = if chat { crate::content::prefill(m) } else { 0 };
    let n = if limit.is_none() && prefill > 0 {
        n.saturating_sub(prefill).max(1)
    } else {
        n
    };
    (n, length, prefill)
}

/// `POST /api/generate` and `POST /api/chat`.
pub(crate) async fn generate(
    call: Call,
    model: &str,
    m: &Map<String, Value>,
    chat: bool,
) -> Response<Body> {
    if let Some((status, msg)) = model_error(model) {
        return call.error(status, &msg);
    }
    let stream = util::stream_flag(m, true);
    let keep_alive = m.get("keep_alive").cloned();
    let num_ctx = num_ctx(m);
    let (empty, prompt_tokens) = if chat {
        let msgs = m.get("messages").and_then(Value::as_array);
        let words = msgs
            .into_iter()
            .flatten()
            .map(|msg| util::count_words(msg.get("content").and_then(Value::as_str).unwrap_or("")))
            .sum();
        (msgs.is_none_or(|v| v.is_empty()), words)
    } else {
        let prompt = util::str_field(m, "prompt");
        let system = util::str_field(m, "system");
        (
            prompt.is_empty(),
            util::count_words(prompt) + util::count_words(system),
        )
    };
    if empty {
        // Preload or unload: one JSON object, no slot, no token time.
        let st = call.tracker.state().clone();
        let reason = if util::keep_alive_zero(keep_alive.as_ref()) {
            st.set_unloaded(model);
            "unload"
        } else {
            st.load(model, keep_alive.as_ref(), num_ctx).await;
            "load"
        };
        let mut v = json!({
            "model": model,
            "created_at": util::now_rfc3339(),
        });
        if chat {
            v["message"] = json!({ "role": "assistant", "content": "" });
        } else {
            v["response"] = "".into();
        }
        v["done_reason"] = reason.into();
        v["done"] = true.into();
        return call.ok(&v);
    }
    let limit = util::pos_int(m.get("options").and_then(|o| o.get("num_predict")));
    let (n, length, prefill) = token_count(&call, m, chat, limit);
    let flavor = if chat { Flavor::Chat } else { Flavor::Generate };
    let mut g = Gen::new(
        call.tracker,
        flavor,
        model.to_string(),
        n,
        length,
        prompt_tokens.max(1),
        false,
        call.shape,
        keep_alive,
        Asks::native(m, chat),
    )
    .continuing(prefill);
    g.num_ctx = num_ctx;
    generation::respond(g, stream).await
}

/// `options.num_ctx`, as Ollama reads it (a number; anything else is the
/// default context).
fn num_ctx(m: &Map<String, Value>) -> Option<u64> {
    util::pos_int(m.get("options").and_then(|o| o.get("num_ctx")))
}

/// `POST /api/embed` (`input`) and the legacy `POST /api/embeddings`
/// (`prompt`): a slot for prompt delay + one token delay, never streamed.
pub(crate) async fn embed(mut call: Call, model: &str, m: &Map<String, Value>) -> Response<Body> {
    if let Some((status, msg)) = model_error(model) {
        return call.error(status, &msg);
    }
    let legacy = call.route == crate::routes::Route::Embeddings;
    let inputs: Vec<String> = if legacy {
        let p = util::str_field(m, "prompt");
        if p.is_empty() {
            vec![]
        } else {
            vec![p.to_string()]
        }
    } else {
        match m.get("input") {
            Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect(),
            _ => vec![],
        }
    };
    let st = call.tracker.state().clone();
    let keep_alive = m.get("keep_alive");
    if inputs.is_empty() {
        // An empty input only loads the model.
        st.load(model, keep_alive, num_ctx(m)).await;
        let v = if legacy {
            json!({ "embedding": [] })
        } else {
            json!({ "model": model, "embeddings": [] })
        };
        return call.ok(&v);
    }
    st.load(model, keep_alive, num_ctx(m)).await;
    let load = call.tracker.t0.elapsed();
    call.tracker.acquire().await;
    util::Pacer::start()
        .until(call.shape.timing.token_ready(0))
        .await;
    if call.shape.fail_after == Some(0) {
        return call.error(StatusCode::INTERNAL_SERVER_ERROR, util::FAKE_FAILURE);
    }
    let dims = util::pos_int(m.get("dimensions")).map_or(st.cfg.embedding_dims, |d| d as usize);
    let v = if legacy {
        json!({ "embedding": util::embedding(&inputs[0], dims) })
    } else {
        let embs: Vec<Vec<f32>> = inputs.iter().map(|s| util::embedding(s, dims)).collect();
        let words: u64 = inputs.iter().map(|s| util::count_words(s).max(1)).sum();
        json!({
            "model": model,
            "embeddings": embs,
            "total_duration": util::nanos(call.tracker.t0.elapsed()),
            "load_duration": util::nanos(load),
            "prompt_eval_count": words,
        })
    };
    call.ok(&v)
}

/// `POST /api/show`.
pub(crate) fn show(call: Call, model: &str, _m: &Map<String, Value>) -> Response<Body> {
    if let Some((status, msg)) = model_error(model) {
        return call.error(status, &msg);
    }
    if !crate::residency::on_disk(&call.tracker.state().cfg, model) {
        return call.error(StatusCode::NOT_FOUND, &util::not_found_msg(model));
    }
    let dims = call.tracker.state().cfg.embedding_dims;
    let caps = if model.contains("embed") {
        json!(["embedding"])
    } else {
        json!(["completion"])
    };
    let v = json!({
        "license": "",
        "modelfile": format!(
            "# Modelfile generated by \"ollama show\"\nFROM {}\nTEMPLATE {{{{ .Prompt }}}}\n",
            crate::state::full_name(model)
        ),
        "parameters": "stop                           \"<|end|>\"",
        "template": "{{ .Prompt }}",
        "details": details(),
        "model_info": {
            "general.architecture": "fake",
            "general.parameter_count": 1_200_000_000u64,
            "fake.context_length": util::CONTEXT_LENGTH,
            "fake.embedding_length": dims,
        },
        "capabilities": caps,
        "modified_at": "2026-01-01T00:00:00.000000Z",
    });
    call.ok(&v)
}

const PULL_FAILED: &str = "pull model manifest: file does not exist";

/// A pull's progress, one NDJSON line at a time.
struct Pull {
    tracker: Tracker,
    known: bool,
    steps: u64,
    delay: Duration,
    phase: u8,
}

impl Pull {
    /// The next progress object; `None` after the last.
    async fn next(&mut self) -> Option<Value> {
        let v = match self.phase {
            0 => {
                self.phase = if self.known { 1 } else { 9 };
                json!({ "status": "pulling manifest" })
            }
            1 if self.tracker.tokens < self.steps => {
                util::pause(self.delay).await;
                self.tracker.tokens += 1;
                let total = util::MODEL_SIZE;
                let hex = util::DIGEST.trim_start_matches("sha256:");
                json!({
                    "status": format!("pulling {}", &hex[..12]),
                    "digest": util::DIGEST,
                    "total": total,
                    "completed": total * self.tracker.tokens / self.steps,
                })
            }
            1 => {
                self.phase = 3;
                json!({ "status": "verifying sha256 digest" })
            }
            3 => {
                self.phase = 4;
                json!({ "status": "writing manifest" })
            }
            4 => {
                self.phase = 10;
                self.tracker.finish();
                json!({ "status": "success" })
            }
            9 => {
                self.phase = 10;
                self.tracker.fail();
                json!({ "error": PULL_FAILED })
            }
            _ => return None,
        };
        Some(v)
    }
}

/// `POST /api/pull`: progress NDJSON (or one object with `stream:false`).
/// Takes no slot. Models not starting with "fake" fail like a missing
/// manifest. The number of progress lines is the request's token count.
pub(crate) async fn pull(call: Call, model: &str, m: &Map<String, Value>) -> Response<Body> {
    if model.is_empty() {
        return call.error(StatusCode::BAD_REQUEST, "model is required");
    }
    let steps = call
        .shape
        .tokens
        .unwrap_or(call.tracker.state().cfg.default_tokens)
        .max(1);
    let mut p = Pull {
        known: util::known_model(model),
        steps,
        delay: call.shape.timing.per_token,
        phase: 0,
        tracker: call.tracker,
    };
    if !util::stream_flag(m, true) {
        let mut last = Value::Null;
        while let Some(v) = p.next().await {
            last = v;
        }
        let status = if last.get("error").is_some() {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        return util::json_response(status, &last);
    }
    let stream = futures_util::stream::unfold(p, |mut p| async move {
        let v = p.next().await?;
        let mut b = serde_json::to_vec(&v).unwrap_or_default();
        b.push(b'\n');
        Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(b))), p))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(util::NDJSON));
    r
}
