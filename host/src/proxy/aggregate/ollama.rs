//! Ollama's NDJSON stream folded into its non-streamed answer, the way
//! Ollama builds that answer from its own stream (server/routes.go, the
//! `stream: false` branches of `GenerateHandler` and `writeChatResponse`):
//!
//! - the answer is the last chunk (`done`, `done_reason`, `context`, the
//!   counters and durations, `created_at`), with
//! - `response` / `message.content` and `thinking` concatenated over every
//!   chunk (`thinking` left out when empty), `logprobs` appended,
//! - and, on `/api/chat` when the request offered `tools`, the `tool_calls`
//!   of every chunk merged into the message (without tools, the last chunk's
//!   stay, as in Ollama);
//! - an `{"error": ...}` line becomes Ollama's `500 {"error": ...}`.
//!
//! Fields keep Ollama's struct order (`api.GenerateResponse`,
//! `api.ChatResponse`, `api.Message`), new ones in their place.

use http::StatusCode;

use super::json::{Json, Obj};
use super::{Fold, Folded, Partial};

/// `api.GenerateResponse`'s fields in order (`Metrics` inlined).
const GENERATE: &[&str] = &[
    "model",
    "remote_model",
    "remote_host",
    "created_at",
    "response",
    "thinking",
    "done",
    "done_reason",
    "context",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
    "tool_calls",
    "_debug_info",
    "logprobs",
];

/// `api.ChatResponse`'s fields in order (`Metrics` inlined).
const CHAT: &[&str] = &[
    "model",
    "remote_model",
    "remote_host",
    "created_at",
    "message",
    "done",
    "done_reason",
    "_debug_info",
    "logprobs",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
];

/// `api.Message`'s fields in order.
const MESSAGE: &[&str] = &[
    "role",
    "content",
    "thinking",
    "images",
    "tool_calls",
    "tool_name",
    "tool_call_id",
];

/// Folds an `/api/generate` (`chat` false) or `/api/chat` stream.
#[derive(Debug, Default)]
pub(crate) struct Ollama {
    chat: bool,
    tools: bool,
    last: Option<Obj>,
    text: String,
    thinking: String,
    calls: Vec<Json>,
    logprobs: Vec<Json>,
    done: bool,
    /// Chunks that carried text (counting a seed's).
    text_tokens: u64,
    /// Tokens of the pre-empted generation this one continues.
    seeded: u64,
}

impl Ollama {
    /// For `/api/chat` when `chat`; `tools` says whether the request offered
    /// any (only then are tool calls merged over the chunks).
    pub(crate) fn new(chat: bool, tools: bool) -> Ollama {
        Ollama {
            chat,
            tools,
            ..Ollama::default()
        }
    }

    fn answer(mut self) -> Folded {
        let Some(mut r) = self.last.take() else {
            return Folded::Cut("the stream ended before its first line");
        };
        if !self.done {
            return Folded::Cut("the stream ended before its done:true line");
        }
        let logprobs = (!self.logprobs.is_empty()).then_some(Json::Array(self.logprobs));
        if self.seeded > 0
            && let Some(n) = r.get("eval_count").and_then(Json::as_u64)
        {
            // The resumed generation's count is of its own tokens.
            let order = if self.chat { CHAT } else { GENERATE };
            r.set_in_order("eval_count", Json::Number((n + self.seeded).into()), order);
        }
        if self.chat {
            let mut msg = match r.get("message") {
                Some(Json::Object(m)) => m.clone(),
                _ => Obj::default(),
            };
            msg.set_in_order("content", self.text.into(), MESSAGE);
            set_or_remove(&mut msg, "thinking", non_empty(self.thinking), MESSAGE);
            if self.tools && !self.calls.is_empty() {
                msg.set_in_order("tool_calls", Json::Array(self.calls), MESSAGE);
            }
            r.set_in_order("message", msg.into(), CHAT);
            set_or_remove(&mut r, "logprobs", logprobs, CHAT);
        } else {
            r.set_in_order("response", self.text.into(), GENERATE);
            set_or_remove(&mut r, "thinking", non_empty(self.thinking), GENERATE);
            set_or_remove(&mut r, "logprobs", logprobs, GENERATE);
        }
        Folded::Answer(Json::Object(r).to_go_vec())
    }
}

fn non_empty(s: String) -> Option<Json> {
    (!s.is_empty()).then_some(Json::String(s))
}

/// Go's `omitempty`: the field is there with a value, gone without.
fn set_or_remove(o: &mut Obj, key: &str, value: Option<Json>, order: &[&str]) {
    match value {
        Some(v) => o.set_in_order(key, v, order),
        None => o.remove(key),
    }
}

impl Fold for Ollama {
    fn chunk(&mut self, line: &[u8]) -> Option<Folded> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let Ok(Json::Object(chunk)) = serde_json::from_slice::<Json>(line) else {
            return Some(Folded::Cut("a line that is not a JSON object"));
        };
        if let Some(e) = chunk.get("error") {
            // Ollama's own words when the error is not a string.
            let msg = e.as_str().unwrap_or("unexpected error format in response");
            let mut body = Obj::default();
            body.push("error", msg.into());
            return Some(Folded::Error(
                StatusCode::INTERNAL_SERVER_ERROR,
                Json::Object(body).to_go_vec(),
            ));
        }
        let part = if self.chat {
            chunk.get("message").and_then(Json::as_obj)
        } else {
            Some(&chunk)
        };
        if let Some(p) = part {
            let text_key = if self.chat { "content" } else { "response" };
            let text = p.get(text_key).and_then(Json::as_str).unwrap_or("");
            if !text.is_empty() {
                self.text_tokens += 1;
            }
            self.text.push_str(text);
            self.thinking
                .push_str(p.get("thinking").and_then(Json::as_str).unwrap_or(""));
            if self.chat && self.tools {
                let calls = p.get("tool_calls").and_then(Json::as_array);
                self.calls.extend(calls.into_iter().flatten().cloned());
            }
        }
        let logprobs = chunk.get("logprobs").and_then(Json::as_array);
        self.logprobs
            .extend(logprobs.into_iter().flatten().cloned());
        self.done = matches!(chunk.get("done"), Some(Json::Bool(true)));
        self.last = Some(chunk);
        None
    }

    fn end(self: Box<Self>) -> Folded {
        self.answer()
    }

    fn partial(&self) -> Option<Partial> {
        let plain = self.chat
            && !self.done
            && self.thinking.is_empty()
            && self.calls.is_empty()
            && self.logprobs.is_empty();
        (plain && !self.text.is_empty()).then(|| Partial {
            text: self.text.clone(),
            tokens: self.text_tokens,
        })
    }

    fn seed(&mut self, p: &Partial) {
        self.text = p.text.clone();
        self.text_tokens = p.tokens;
        self.seeded = p.tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(chat: bool, tools: bool, lines: &[&str]) -> Folded {
        let mut f = Box::new(Ollama::new(chat, tools));
        for l in lines {
            if let Some(v) = f.chunk(l.as_bytes()) {
                return v;
            }
        }
        f.end()
    }

    fn text(f: Folded) -> String {
        match f {
            Folded::Answer(b) => String::from_utf8(b).unwrap(),
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn generate_is_the_last_chunk_with_the_text_and_thinking_of_all() {
        let out = text(fold(
            false,
            false,
            &[
                r#"{"model":"m","created_at":"t1","response":"","thinking":"hm ","done":false}"#,
                r#"{"model":"m","created_at":"t2","response":"Hi <b>","done":false}"#,
                r#"{"model":"m","created_at":"t3","response":"","done":true,"done_reason":"stop","context":[1,2],"total_duration":9,"eval_count":2}"#,
            ],
        ));
        assert_eq!(
            out,
            r#"{"model":"m","created_at":"t3","response":"Hi \u003cb\u003e","thinking":"hm ","done":true,"done_reason":"stop","context":[1,2],"total_duration":9,"eval_count":2}"#
        );
    }

    #[test]
    fn chat_merges_tool_calls_only_when_tools_were_offered() {
        let lines = [
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"","tool_calls":[{"id":"a","function":{"index":0,"name":"f","arguments":{"z":1,"a":2}}}]},"done":false}"#,
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"","tool_calls":[{"id":"b","function":{"index":1,"name":"g","arguments":{}}}]},"done":false}"#,
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"ok"},"done":false}"#,
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","eval_count":3}"#,
        ];
        let with = text(fold(true, true, &lines));
        assert_eq!(
            with,
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"ok","tool_calls":[{"id":"a","function":{"index":0,"name":"f","arguments":{"z":1,"a":2}}},{"id":"b","function":{"index":1,"name":"g","arguments":{}}}]},"done":true,"done_reason":"stop","eval_count":3}"#
        );
        let without = text(fold(true, false, &lines));
        assert!(!without.contains("tool_calls"), "{without}");
    }

    #[test]
    fn chat_thinking_and_logprobs_go_in_their_place() {
        let out = text(fold(
            true,
            false,
            &[
                r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"","thinking":"a"},"done":false,"logprobs":[{"token":"a"}]}"#,
                r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"b"},"done":false,"logprobs":[{"token":"b"}]}"#,
                r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":""},"done":true,"done_reason":"length","total_duration":5}"#,
            ],
        ));
        assert_eq!(
            out,
            r#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"b","thinking":"a"},"done":true,"done_reason":"length","logprobs":[{"token":"a"},{"token":"b"}],"total_duration":5}"#
        );
    }

    #[test]
    fn an_error_line_is_ollamas_500() {
        let f = fold(
            false,
            false,
            &[
                r#"{"model":"m","created_at":"t","response":"a","done":false}"#,
                r#"{"error":"model runner has unexpectedly stopped"}"#,
            ],
        );
        match f {
            Folded::Error(s, b) => {
                assert_eq!(s, 500);
                assert_eq!(b, br#"{"error":"model runner has unexpectedly stopped"}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stream_without_its_done_line_is_cut() {
        let f = fold(
            false,
            false,
            &[r#"{"model":"m","created_at":"t","response":"a","done":false}"#],
        );
        assert!(matches!(f, Folded::Cut(_)), "{f:?}");
        assert!(matches!(fold(false, false, &[]), Folded::Cut(_)));
        assert!(matches!(fold(false, false, &["nope"]), Folded::Cut(_)));
    }

    #[test]
    fn a_chat_cut_short_continues_where_it_stopped() {
        let mut f = Box::new(Ollama::new(true, false));
        for l in [
            r#"{"model":"m","message":{"role":"assistant","content":"a "},"done":false}"#,
            r#"{"model":"m","message":{"role":"assistant","content":""},"done":false}"#,
            r#"{"model":"m","message":{"role":"assistant","content":"b "},"done":false}"#,
        ] {
            assert!(f.chunk(l.as_bytes()).is_none());
        }
        let p = f.partial().expect("plain text resumes");
        assert_eq!((p.text.as_str(), p.tokens), ("a b ", 2));
        let mut g = Box::new(Ollama::new(true, false));
        g.seed(&p);
        for l in [
            r#"{"model":"m","message":{"role":"assistant","content":"c "},"done":false}"#,
            r#"{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","eval_count":1}"#,
        ] {
            assert!(g.chunk(l.as_bytes()).is_none());
        }
        assert_eq!(
            text(g.end()),
            r#"{"model":"m","message":{"role":"assistant","content":"a b c "},"done":true,"done_reason":"stop","eval_count":3}"#
        );
    }

    #[test]
    fn thinking_tool_calls_and_generate_restart() {
        let think = r#"{"model":"m","message":{"role":"assistant","content":"x","thinking":"t"},"done":false}"#;
        let mut f = Box::new(Ollama::new(true, false));
        f.chunk(think.as_bytes());
        assert!(f.partial().is_none());
        let call = r#"{"model":"m","message":{"role":"assistant","content":"x","tool_calls":[{"function":{"name":"f"}}]},"done":false}"#;
        let mut f = Box::new(Ollama::new(true, true));
        f.chunk(call.as_bytes());
        assert!(f.partial().is_none());
        let mut f = Box::new(Ollama::new(false, false));
        f.chunk(br#"{"model":"m","response":"x","done":false}"#);
        assert!(
            f.partial().is_none(),
            "generate has no assistant message to continue"
        );
        // Nothing said yet: nothing to continue.
        assert!(Ollama::new(true, false).partial().is_none());
    }
}
