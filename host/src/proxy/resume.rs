//! Resuming a pre-empted generation instead of restarting it
//! (`[models."NAME"] resume_preempted = true`).
//!
//! A non-streamed chat that is pre-empted has reached nobody yet: maitre
//! holds its answer so far ([`Partial`]). Restarting it throws that work
//! away. Resuming sends the same request with the answer so far as a
//! trailing assistant message, which the model continues (Ollama's chat
//! templates leave the last assistant turn open; llama.cpp's server does the
//! same; vLLM is asked to with `continue_final_message`), with the token
//! limit lowered by the tokens already made. The folded answer is then the
//! text so far and the continuation, its token counts the sum of both.
//!
//! Only plain text resumes: a chat that asks for a structured answer
//! (`format`, `response_format`), whose answer so far holds thinking, tool
//! calls or logprobs, that asks for several choices, or whose body maitre
//! cannot read, restarts as before. Opt-in per model, since a template that closes
//! every assistant turn would start a new answer instead of continuing.
//!
//! The body is read the way the upstream reads it (see `rewrite`): on
//! `/api/chat` Go's decoder (keys without case, the last repeated key
//! winning, repeated `options` merging); on `/v1/chat/completions` keys as
//! written, the last winning. Every other member is kept byte for byte.

use bytes::Bytes;
use serde_json::Value;

use super::aggregate::Partial;
use super::normalise::{go_options, options_with};
use super::rewrite::{Member, first_object_end, members, named, rebuild};
use crate::config::ModelRule;
use crate::request::go_lossy;

/// Whether a request to `path` for a model with `rule` resumes when it is
/// pre-empted: a chat answered whole (`stream` false) of a model with
/// `resume_preempted`. The proxy and the simulator both ask this.
pub(crate) fn resumes(rule: Option<&ModelRule>, path: &str, stream: bool) -> bool {
    !stream
        && matches!(path, "/api/chat" | "/v1/chat/completions")
        && rule.is_some_and(|r| r.resume_preempted)
}

/// The body that resumes the pre-empted generation `p` of a request to
/// `path` whose upstream body is `body`. `None`: restart it instead (another
/// path, or a body that is not the JSON object the upstream reads).
pub(crate) fn continued(path: &str, body: &[u8], p: &Partial) -> Option<Bytes> {
    let openai = match path {
        "/api/chat" => false,
        "/v1/chat/completions" => true,
        _ => return None,
    };
    let text = go_lossy(body);
    let end = first_object_end(&text)?;
    let all = members(&text[..end])?;
    let is = |key: &str, name: &str| {
        if openai {
            serde_json::from_str::<String>(key).is_ok_and(|k| k == name)
        } else {
            named(key, name)
        }
    };
    let last = |name: &str| all.iter().rev().find(|m| is(m.key, name));
    // A structured answer (JSON, a schema) cannot be continued: the
    // continuation's constraint would start a new value.
    let format = if openai { "response_format" } else { "format" };
    if last(format).is_some_and(|m| structured(m.value)) {
        return None;
    }
    let mut messages: Vec<Value> = serde_json::from_str(last("messages")?.value).ok()?;
    // A chat that already ends with the assistant's words (the client's own
    // prefill) is continued by the answer so far: the two make one message.
    match messages.last_mut().and_then(Value::as_object_mut) {
        Some(m) if m.get("role").and_then(Value::as_str) == Some("assistant") => {
            let Some(Value::String(c)) = m.get_mut("content") else {
                return None;
            };
            c.push_str(&p.text);
        }
        _ => messages.push(serde_json::json!({"role": "assistant", "content": p.text})),
    }
    let mut added = vec![format!(
        "\"messages\":{}",
        serde_json::to_string(&messages).ok()?
    )];
    let mut replaced: Vec<&str> = vec!["messages"];
    if openai {
        // A limit counts the new tokens: what is left of it.
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = last(key).and_then(|m| limit(m.value)) {
                added.push(format!("\"{key}\":{}", left(n, p.tokens)));
                replaced.push(key);
            }
        }
        // vLLM continues the last message only when asked; others ignore
        // these.
        added.push("\"continue_final_message\":true".into());
        added.push("\"add_generation_prompt\":false".into());
        replaced.extend(["continue_final_message", "add_generation_prompt"]);
    } else if let Some(options) = lowered_options(&all, p.tokens)? {
        added.push(options);
        replaced.push("options");
    }
    let added: Vec<&str> = added.iter().map(String::as_str).collect();
    let dropped = |key: &str| replaced.iter().any(|name| is(key, name));
    Some(Bytes::from(rebuild(&text, end, &all, dropped, &added)))
}

/// Whether a `format` / `response_format` value asks for a structured
/// answer: anything but absent, `null`, `""` or `{"type":"text"}`.
fn structured(value: &str) -> bool {
    match serde_json::from_str::<Value>(value) {
        Ok(Value::Null) => false,
        Ok(Value::String(s)) => !s.is_empty(),
        Ok(Value::Object(o)) => {
            !(o.is_empty()
                || (o.len() == 1 && o.get("type").and_then(Value::as_str) == Some("text")))
        }
        _ => true,
    }
}

/// A positive whole-number token limit as written, if it is one.
fn limit(value: &str) -> Option<u64> {
    value.trim().parse::<u64>().ok().filter(|n| *n > 0)
}

/// What is left of a limit of `n` tokens after `made`: at least one, so
/// the continuation ends the answer.
fn left(n: u64, made: u64) -> u64 {
    n.saturating_sub(made).max(1)
}

/// `"options":{...}` with `num_predict` lowered by `made` (outer `None`:
/// options Ollama would refuse; inner `None`: no positive `num_predict`, so
/// nothing to change).
fn lowered_options(all: &[Member<'_>], made: u64) -> Option<Option<String>> {
    let options = go_options(all)?;
    let Some(n) = options
        .iter()
        .find(|(k, _)| k == "num_predict")
        .and_then(|(_, v)| limit(v))
    else {
        return Some(None);
    };
    options_with(&options, "num_predict", &left(n, made).to_string()).map(Some)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn partial(text: &str, tokens: u64) -> Partial {
        Partial {
            text: text.to_string(),
            tokens,
        }
    }

    fn resume(path: &str, body: &str, p: &Partial) -> Option<Value> {
        continued(path, body.as_bytes(), p).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn a_native_chat_continues_its_answer_with_what_is_left_of_its_limit() {
        let v = resume(
            "/api/chat",
            r#"{"model":"m","Messages":[{"role":"system","content":"s"}],"messages":[{"role":"user","content":"hi"}],"options":{"temperature":0,"num_predict":50},"options":{"seed":7},"stream":true}"#,
            &partial("tok0 tok1 tok2 ", 3),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"model":"m","stream":true,
                "messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"tok0 tok1 tok2 "}],
                "options":{"temperature":0,"seed":7,"num_predict":47}})
        );
    }

    #[test]
    fn without_a_limit_the_options_stay_as_they_were() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":-1}}"#;
        let v = resume("/api/chat", body, &partial("a ", 1)).unwrap();
        assert_eq!(v["options"], json!({"num_predict": -1}));
        assert_eq!(v["messages"][1], json!({"role":"assistant","content":"a "}));
        // A limit already used up leaves one token, to end the answer.
        let body = r#"{"model":"m","messages":[],"options":{"num_predict":3}}"#;
        let v = resume("/api/chat", body, &partial("a b c ", 3)).unwrap();
        assert_eq!(v["options"]["num_predict"], 1);
    }

    #[test]
    fn an_openai_chat_continues_its_final_message() {
        let v = resume(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":20,"Max_Tokens":99,"stream":true}"#,
            &partial("tok0 ", 1),
        )
        .unwrap();
        assert_eq!(v["max_tokens"], 19);
        // Python reads keys as written: `Max_Tokens` is another key.
        assert_eq!(v["Max_Tokens"], 99);
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(
            v["messages"],
            json!([{"role":"user","content":"hi"},{"role":"assistant","content":"tok0 "}])
        );
    }

    #[test]
    fn a_chat_the_client_prefilled_continues_the_same_message() {
        let v = resume(
            "/api/chat",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Sure: "}]}"#,
            &partial("tok0 ", 1),
        )
        .unwrap();
        assert_eq!(
            v["messages"],
            json!([{"role":"user","content":"hi"},{"role":"assistant","content":"Sure: tok0 "}])
        );
    }

    #[test]
    fn what_cannot_be_continued_restarts() {
        let p = partial("a ", 1);
        // Structured answers: a continuation would start a new JSON value.
        let json = r#"{"model":"m","messages":[],"format":"json"}"#;
        assert!(resume("/api/chat", json, &p).is_none());
        let schema = r#"{"model":"m","messages":[],"Format":{"type":"object"}}"#;
        assert!(resume("/api/chat", schema, &p).is_none());
        let oa = r#"{"model":"m","messages":[],"response_format":{"type":"json_object"}}"#;
        assert!(resume("/v1/chat/completions", oa, &p).is_none());
        // Plain text asked for in so many words still resumes.
        let text = r#"{"model":"m","messages":[],"format":"","response_format":{"type":"text"}}"#;
        assert!(resume("/api/chat", text, &p).is_some());
        let oa = r#"{"model":"m","messages":[],"response_format":{"type":"text"}}"#;
        assert!(resume("/v1/chat/completions", oa, &p).is_some());
        assert!(resume("/api/generate", r#"{"model":"m","prompt":"x"}"#, &p).is_none());
        assert!(resume("/api/chat", r#"{"model":"m"}"#, &p).is_none());
        assert!(resume("/api/chat", r#"{"model":"m","messages":"x"}"#, &p).is_none());
        assert!(resume("/api/chat", r#"[1]"#, &p).is_none());
        assert!(
            resume(
                "/api/chat",
                r#"{"model":"m","messages":[],"options":[1]}"#,
                &p
            )
            .is_none()
        );
    }
}
