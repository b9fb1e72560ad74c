//! An OpenAI-style SSE stream (`chat.completion.chunk` or `text_completion`
//! events, then `data: [DONE]`) folded into the one `chat.completion` /
//! `text_completion` object a non-streaming request gets:
//!
//! - `id`, `created`, `model` and `system_fingerprint` of the stream;
//! - per choice (by `index`): the deltas' `role`, `content` and reasoning
//!   (`reasoning`, `reasoning_content`) concatenated into `message` (chat),
//!   or the `text` concatenated (completions); `tool_calls` merged by
//!   `index` (a later delta of one call appends to its `arguments`); the
//!   last `finish_reason`; `logprobs` arrays appended;
//! - the last non-null `usage` (maitre asks for it with
//!   `stream_options.include_usage`).
//!
//! Field order follows Ollama's `openai.ChatCompletion` / `openai.Completion`.
//! An `error` event becomes the error answer; a stream that ends without
//! `[DONE]` is how Ollama's `/v1` reports a failure mid-generation, so it
//! becomes a 500 in the OpenAI error shape.

use http::StatusCode;

use super::json::{Json, Obj};
use super::{Fold, Folded, Partial};

/// Delta fields holding reasoning text, by upstream: Ollama, vLLM.
const REASONING: &[&str] = &["reasoning", "reasoning_content"];

/// Folds a `/v1/chat/completions` (`chat` true) or `/v1/completions` stream.
#[derive(Debug, Default)]
pub(crate) struct OpenAi {
    chat: bool,
    id: Option<Json>,
    created: Option<Json>,
    model: Option<Json>,
    fingerprint: Option<Json>,
    choices: Vec<Choice>,
    usage: Option<Json>,
    done: bool,
    /// Deltas that carried text (counting a seed's).
    text_tokens: u64,
    /// Tokens of the pre-empted generation this one continues.
    seeded: u64,
}

/// One choice as far as its deltas went.
#[derive(Debug)]
struct Choice {
    index: Json,
    role: Option<Json>,
    /// `None` while no delta carried a string `content`.
    content: Option<String>,
    reasoning: Vec<(&'static str, String)>,
    calls: Vec<Call>,
    finish: Json,
    /// `None` while no chunk carried the key.
    logprobs: Option<Json>,
}

/// One tool call: its first delta, and the `arguments` of all of them.
#[derive(Debug)]
struct Call {
    first: Obj,
    arguments: String,
}

impl Call {
    fn id(&self) -> Option<&str> {
        self.first.get("id").and_then(Json::as_str)
    }

    fn into_json(mut self) -> Json {
        let mut f = match self.first.get("function") {
            Some(Json::Object(f)) => f.clone(),
            _ => Obj::default(),
        };
        f.push("arguments", self.arguments.into());
        self.first.push("function", f.into());
        Json::Object(self.first)
    }
}

impl OpenAi {
    /// For `/v1/chat/completions` when `chat`, else `/v1/completions`.
    pub(crate) fn new(chat: bool) -> OpenAi {
        OpenAi {
            chat,
            ..OpenAi::default()
        }
    }

    fn choice(&mut self, index: &Json) -> &mut Choice {
        let at = match self.choices.iter().position(|c| c.index == *index) {
            Some(at) => at,
            None => {
                self.choices.push(Choice {
                    index: index.clone(),
                    role: None,
                    content: None,
                    reasoning: Vec::new(),
                    calls: Vec::new(),
                    finish: Json::Null,
                    logprobs: None,
                });
                self.choices.len() - 1
            }
        };
        &mut self.choices[at]
    }

    fn add_choice(&mut self, c: &Obj) {
        let index = c.get("index").cloned().unwrap_or(Json::Number(0.into()));
        let chat = self.chat;
        let choice = self.choice(&index);
        let before = choice.content.as_ref().map_or(0, String::len);
        if chat {
            if let Some(d) = c.get("delta").and_then(Json::as_obj) {
                choice.add_delta(d);
            }
        } else if let Some(t) = c.get("text").and_then(Json::as_str) {
            choice.content.get_or_insert_default().push_str(t);
        }
        let grew = choice.content.as_ref().map_or(0, String::len) > before;
        match c.get("finish_reason") {
            None | Some(Json::Null) => {}
            Some(f) => choice.finish = f.clone(),
        }
        if let Some(l) = c.get("logprobs") {
            merge_logprobs(&mut choice.logprobs, l);
        }
        if grew {
            self.text_tokens += 1;
        }
    }

    fn answer(self) -> Folded {
        if !self.done {
            return Folded::Error(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_body(
                    "maitre: the upstream's stream ended before `data: [DONE]`: it failed mid-generation",
                ),
            );
        }
        let chat = self.chat;
        let mut usage = self.usage;
        if self.seeded > 0
            && let Some(Json::Object(u)) = usage.as_mut()
        {
            // The resumed generation's usage counts its own tokens.
            for key in ["completion_tokens", "total_tokens"] {
                if let Some(n) = u.get(key).and_then(Json::as_u64) {
                    u.push(key, Json::Number((n + self.seeded).into()));
                }
            }
        }
        let mut choices = self.choices;
        choices.sort_by_key(|c| c.index.as_u64().unwrap_or(u64::MAX));
        let choices = choices.into_iter().map(|c| c.into_json(chat)).collect();
        let mut r = Obj::default();
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        for (key, value) in [
            ("id", self.id),
            ("object", Some(object.into())),
            ("created", self.created),
            ("model", self.model),
            ("system_fingerprint", self.fingerprint),
            ("choices", Some(Json::Array(choices))),
            ("usage", usage),
        ] {
            if let Some(v) = value {
                r.push(key, v);
            }
        }
        let mut body = Json::Object(r).to_go_vec();
        // Ollama's `/v1` writes with `json.Encoder`, which ends with a newline.
        body.push(b'\n');
        Folded::Answer(body)
    }
}

impl Choice {
    fn add_delta(&mut self, d: &Obj) {
        if self.role.is_none()
            && let Some(r @ Json::String(s)) = d.get("role")
            && !s.is_empty()
        {
            self.role = Some(r.clone());
        }
        if let Some(t) = d.get("content").and_then(Json::as_str) {
            self.content.get_or_insert_default().push_str(t);
        }
        for key in REASONING {
            if let Some(t) = d.get(key).and_then(Json::as_str) {
                match self.reasoning.iter_mut().find(|(k, _)| k == key) {
                    Some((_, acc)) => acc.push_str(t),
                    None => self.reasoning.push((key, t.to_string())),
                }
            }
        }
        for tc in d.get("tool_calls").and_then(Json::as_array).unwrap_or(&[]) {
            if let Some(tc) = tc.as_obj() {
                self.add_call(tc);
            }
        }
    }

    /// A later delta of a call carries its `index` and more `arguments`; a
    /// delta with another `id` under the same index is a call of its own.
    fn add_call(&mut self, tc: &Obj) {
        let index = tc.get("index");
        let id = tc
            .get("id")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty());
        let function = tc.get("function").and_then(Json::as_obj);
        let args = function
            .and_then(|f| f.get("arguments"))
            .and_then(Json::as_str)
            .unwrap_or("");
        let same = self
            .calls
            .iter_mut()
            .rev()
            .find(|c| c.first.get("index") == index && (id.is_none() || c.id() == id));
        match same {
            Some(c) => {
                c.arguments.push_str(args);
                let name = function.and_then(|f| f.get("name"));
                if let Some(name) = name
                    && let Some(Json::Object(f)) = c.first.get_mut("function")
                    && f.get("name").is_none()
                {
                    f.push("name", name.clone());
                }
            }
            None => self.calls.push(Call {
                first: tc.clone(),
                arguments: args.to_string(),
            }),
        }
    }

    fn into_json(self, chat: bool) -> Json {
        let mut c = Obj::default();
        if chat {
            let mut m = Obj::default();
            m.push("role", self.role.unwrap_or_else(|| "assistant".into()));
            m.push("content", self.content.map_or(Json::Null, Json::String));
            for (k, v) in self.reasoning {
                if !v.is_empty() {
                    m.push(k, v.into());
                }
            }
            if !self.calls.is_empty() {
                let calls = self.calls.into_iter().map(Call::into_json).collect();
                m.push("tool_calls", Json::Array(calls));
            }
            c.push("index", self.index);
            c.push("message", m.into());
        } else {
            c.push("text", self.content.unwrap_or_default().into());
            c.push("index", self.index);
        }
        c.push("finish_reason", self.finish);
        if let Some(l) = self.logprobs {
            c.push("logprobs", l);
        }
        Json::Object(c)
    }
}

/// Appends a chunk's `logprobs` (chat: `{"content": [...]}`; completions:
/// `{"tokens": [...], "token_logprobs": [...], ...}`) to what came before:
/// arrays are appended, anything else is the last one's.
fn merge_logprobs(acc: &mut Option<Json>, l: &Json) {
    match (acc.as_mut(), l) {
        (_, Json::Null) => {
            acc.get_or_insert(Json::Null);
        }
        (Some(Json::Object(have)), Json::Object(new)) => {
            for (k, v) in new.iter() {
                match (have.get_mut(k), v) {
                    (Some(Json::Array(a)), Json::Array(b)) => a.extend(b.iter().cloned()),
                    _ => have.push(k, v.clone()),
                }
            }
        }
        _ => *acc = Some(l.clone()),
    }
}

/// The OpenAI error envelope Ollama's `/v1` answers with on a 500.
fn error_body(message: &str) -> Vec<u8> {
    let mut e = Obj::default();
    e.push("message", message.into());
    e.push("type", "api_error".into());
    e.push("param", Json::Null);
    e.push("code", Json::Null);
    let mut o = Obj::default();
    o.push("error", e.into());
    let mut b = Json::Object(o).to_go_vec();
    b.push(b'\n');
    b
}

impl Fold for OpenAi {
    fn chunk(&mut self, data: &[u8]) -> Option<Folded> {
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return None;
        }
        let Ok(Json::Object(chunk)) = serde_json::from_slice::<Json>(data) else {
            return Some(Folded::Cut("an event that is not a JSON object"));
        };
        match chunk.get("error") {
            None | Some(Json::Null) => {}
            Some(Json::String(m)) => {
                return Some(Folded::Error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    error_body(m),
                ));
            }
            Some(e) => {
                let status = e
                    .as_obj()
                    .and_then(|e| e.get("code"))
                    .and_then(Json::as_u64)
                    .and_then(|c| u16::try_from(c).ok())
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut o = Obj::default();
                o.push("error", e.clone());
                let mut b = Json::Object(o).to_go_vec();
                b.push(b'\n');
                return Some(Folded::Error(status, b));
            }
        }
        let first = |slot: &mut Option<Json>, key: &str| {
            if slot.is_none()
                && let Some(v) = chunk.get(key)
                && !matches!(v, Json::Null)
                && v.as_str() != Some("")
            {
                *slot = Some(v.clone());
            }
        };
        first(&mut self.id, "id");
        first(&mut self.created, "created");
        first(&mut self.model, "model");
        first(&mut self.fingerprint, "system_fingerprint");
        match chunk.get("usage") {
            None | Some(Json::Null) => {}
            Some(u) => self.usage = Some(u.clone()),
        }
        for c in chunk.get("choices").and_then(Json::as_array).unwrap_or(&[]) {
            if let Some(c) = c.as_obj() {
                self.add_choice(c);
            }
        }
        None
    }

    fn end(self: Box<Self>) -> Folded {
        self.answer()
    }

    fn partial(&self) -> Option<Partial> {
        let [c] = self.choices.as_slice() else {
            return None;
        };
        let plain = self.chat
            && !self.done
            && c.index.as_u64() == Some(0)
            && c.reasoning.iter().all(|(_, r)| r.is_empty())
            && c.calls.is_empty()
            && c.logprobs.is_none()
            && matches!(c.finish, Json::Null);
        let text = c.content.as_deref().unwrap_or("");
        (plain && !text.is_empty()).then(|| Partial {
            text: text.to_string(),
            tokens: self.text_tokens,
        })
    }

    fn seed(&mut self, p: &Partial) {
        let c = self.choice(&Json::Number(0.into()));
        c.content = Some(p.text.clone());
        self.text_tokens = p.tokens;
        self.seeded = p.tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(chat: bool, events: &[&str]) -> Folded {
        let mut f = Box::new(OpenAi::new(chat));
        for e in events {
            if let Some(v) = f.chunk(e.as_bytes()) {
                return v;
            }
        }
        f.end()
    }

    fn answer(f: Folded) -> String {
        match f {
            Folded::Answer(b) => String::from_utf8(b).unwrap(),
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn ollama_chat_stream_with_reasoning_and_tool_calls() {
        let c = |delta: &str, finish: &str| {
            format!(
                r#"{{"id":"chatcmpl-7","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp_ollama","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
            )
        };
        let events = [
            c(r#"{"role":"assistant","content":"","reasoning":"hm"}"#, "null"),
            c(
                r#"{"content":"","tool_calls":[{"id":"a","index":0,"type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]}"#,
                "null",
            ),
            c(r#"{"content":"ok"}"#, "null"),
            c("{}", r#""tool_calls""#),
            r#"{"id":"chatcmpl-7","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp_ollama","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#.to_string(),
            "[DONE]".to_string(),
        ];
        let events: Vec<&str> = events.iter().map(String::as_str).collect();
        assert_eq!(
            answer(fold(true, &events)),
            concat!(
                r#"{"id":"chatcmpl-7","object":"chat.completion","created":5,"model":"m","system_fingerprint":"fp_ollama","#,
                r#""choices":[{"index":0,"message":{"role":"assistant","content":"ok","reasoning":"hm","#,
                r#""tool_calls":[{"id":"a","index":0,"type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},"#,
                r#""finish_reason":"tool_calls"}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#,
                "\n"
            )
        );
    }

    #[test]
    fn tool_call_arguments_spread_over_deltas_are_joined() {
        let events = [
            r#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"id":"x","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            r#"{"id":"x","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}},{"index":1,"id":"c2","type":"function","function":{"name":"g","arguments":"{}"}}]}}]}"#,
            r#"{"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ];
        let v: serde_json::Value = serde_json::from_str(&answer(fold(true, &events))).unwrap();
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], serde_json::Value::Null);
        assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(m["tool_calls"][1]["id"], "c2");
        assert_eq!(m["tool_calls"].as_array().unwrap().len(), 2);
        assert!(v.get("usage").is_none());
    }

    #[test]
    fn completions_join_text_and_keep_the_real_usage() {
        let zero = r#""usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#;
        let e1 = format!(
            r#"{{"id":"cmpl-1","object":"text_completion","created":5,"choices":[{{"text":"a ","index":0,"finish_reason":null}}],"model":"m","system_fingerprint":"fp_ollama",{zero}}}"#
        );
        let e2 = format!(
            r#"{{"id":"cmpl-1","object":"text_completion","created":5,"choices":[{{"text":"","index":0,"finish_reason":"length"}}],"model":"m","system_fingerprint":"fp_ollama",{zero}}}"#
        );
        let e3 = r#"{"id":"cmpl-1","object":"text_completion","created":5,"choices":[],"model":"m","system_fingerprint":"fp_ollama","usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;
        assert_eq!(
            answer(fold(false, &[&e1, &e2, e3, "[DONE]"])),
            concat!(
                r#"{"id":"cmpl-1","object":"text_completion","created":5,"model":"m","system_fingerprint":"fp_ollama","#,
                r#""choices":[{"text":"a ","index":0,"finish_reason":"length"}],"#,
                r#""usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#,
                "\n"
            )
        );
    }

    #[test]
    fn logprobs_are_appended() {
        let events = [
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[{"token":"a"}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"b"},"logprobs":{"content":[{"token":"b"}]}}]}"#,
            "[DONE]",
        ];
        let v: serde_json::Value = serde_json::from_str(&answer(fold(true, &events))).unwrap();
        assert_eq!(
            v["choices"][0]["logprobs"],
            serde_json::json!({"content": [{"token": "a"}, {"token": "b"}]})
        );
    }

    #[test]
    fn errors_and_unfinished_streams() {
        match fold(true, &[r#"{"choices":[]}"#]) {
            Folded::Error(s, b) => {
                assert_eq!(s, 500);
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(v["error"]["type"], "api_error");
            }
            other => panic!("{other:?}"),
        }
        match fold(
            true,
            &[r#"{"error":{"code":503,"message":"loading model","type":"unavailable_error"}}"#],
        ) {
            Folded::Error(s, b) => {
                assert_eq!(s, 503);
                assert!(String::from_utf8(b).unwrap().contains("loading model"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(fold(false, &["nope"]), Folded::Cut(_)));
    }

    #[test]
    fn a_chat_cut_short_continues_where_it_stopped() {
        let mut f = Box::new(OpenAi::new(true));
        for e in [
            r#"{"id":"c1","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"a "},"finish_reason":null}]}"#,
            r#"{"id":"c1","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"b "},"finish_reason":null}]}"#,
        ] {
            assert!(f.chunk(e.as_bytes()).is_none());
        }
        let p = f.partial().expect("plain text resumes");
        assert_eq!((p.text.as_str(), p.tokens), ("a b ", 2));
        let mut g = Box::new(OpenAi::new(true));
        g.seed(&p);
        for e in [
            r#"{"id":"c2","created":2,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"c "},"finish_reason":null}]}"#,
            r#"{"id":"c2","created":2,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"id":"c2","created":2,"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
            "[DONE]",
        ] {
            assert!(g.chunk(e.as_bytes()).is_none());
        }
        assert_eq!(
            answer(g.end()),
            "{\"id\":\"c2\",\"object\":\"chat.completion\",\"created\":2,\"model\":\"m\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"a b c \"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n"
        );
    }

    #[test]
    fn several_choices_and_tool_calls_restart() {
        let mut f = Box::new(OpenAi::new(true));
        f.chunk(br#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#);
        assert!(f.partial().is_none());
        let mut f = Box::new(OpenAi::new(true));
        f.chunk(br#"{"choices":[{"index":0,"delta":{"content":"a","tool_calls":[{"index":0,"id":"x","function":{"name":"f","arguments":""}}]}}]}"#);
        assert!(f.partial().is_none());
        let mut f = Box::new(OpenAi::new(false));
        f.chunk(br#"{"choices":[{"index":0,"text":"a"}]}"#);
        assert!(
            f.partial().is_none(),
            "completions have no message to continue"
        );
    }
}
