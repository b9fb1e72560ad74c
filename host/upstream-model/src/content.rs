//! What an answer says, token by token, the way Ollama's parsers hand it
//! out: thinking first (when the request asks for it), then tool calls (when
//! it offers tools), then text, a JSON object when the request asks for a
//! `format`. Each token is one piece of one of these, so a streamed answer
//! and a non-streamed one say the same thing, and a proxy that aggregates the
//! stream can be checked against the model's own non-streamed answer.

use serde_json::{Map, Value, json};

/// Tool calls an answer makes at most (one token each).
const MAX_CALLS: usize = 2;

/// What a request asks for beyond plain text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Asks {
    /// Thinking before the answer (`think` on `/api`, `reasoning_effort`
    /// or `reasoning.effort` on `/v1`).
    pub think: bool,
    /// The names of the tools offered (`tools[].function.name`), in order.
    pub tools: Vec<String>,
    /// Text as JSON (`format` on `/api`, `response_format` on `/v1`).
    pub json: bool,
}

impl Asks {
    /// What an `/api/generate` (`chat` false) or `/api/chat` body asks for.
    /// Generate takes no tools.
    pub fn native(m: &Map<String, Value>, chat: bool) -> Asks {
        let think = match m.get("think") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => !s.is_empty() && s != "false",
            _ => false,
        };
        let json = match m.get("format") {
            Some(Value::String(s)) => s == "json",
            Some(Value::Object(o)) => !o.is_empty(),
            _ => false,
        };
        Asks {
            think,
            tools: if chat { tool_names(m) } else { Vec::new() },
            json,
        }
    }

    /// What a `/v1/chat/completions` (`chat` true) or `/v1/completions` body
    /// asks for. Completions take neither thinking, tools nor a format.
    pub fn openai(m: &Map<String, Value>, chat: bool) -> Asks {
        if !chat {
            return Asks::default();
        }
        let effort = m
            .get("reasoning")
            .and_then(|r| r.get("effort"))
            .or_else(|| m.get("reasoning_effort"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let json = m
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| matches!(t.trim(), "json_object" | "json_schema"));
        Asks {
            think: !effort.is_empty() && effort != "none",
            tools: tool_names(m),
            json,
        }
    }
}

fn tool_names(m: &Map<String, Value>) -> Vec<String> {
    m.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("function")?.get("name")?.as_str())
        .map(str::to_string)
        .collect()
}

/// One token's worth of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Thinking text.
    Thinking(String),
    /// The `k`-th tool call.
    Call(usize),
    /// Answer text.
    Text(String),
}

/// The plan of an answer's content: which token is which piece.
#[derive(Clone, Debug)]
pub(crate) struct Script {
    think: u64,
    calls: Vec<String>,
    json: bool,
    tokens: u64,
    /// Text tokens already in the answer: a chat whose last message is the
    /// assistant's continues it, numbering on.
    offset: u64,
}

/// The words of a chat's trailing assistant message: the answer so far a
/// chat continues (as Ollama's templates leave the last assistant turn
/// open). 0 when the last message is not the assistant's.
pub(crate) fn prefill(m: &Map<String, Value>) -> u64 {
    let last = m
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|v| v.last());
    match last {
        Some(msg) if msg.get("role").and_then(Value::as_str) == Some("assistant") => {
            crate::util::count_words(msg.get("content").and_then(Value::as_str).unwrap_or(""))
        }
        _ => 0,
    }
}

impl Script {
    /// An answer of `tokens` tokens for `asks`: half of them thinking when it
    /// asks for thinking, then one per tool call (two at most).
    pub fn new(asks: Asks, tokens: u64) -> Script {
        let think = if asks.think { tokens / 2 } else { 0 };
        let room = usize::try_from(tokens - think).unwrap_or(usize::MAX);
        let mut calls = asks.tools;
        calls.truncate(MAX_CALLS.min(room));
        Script {
            think,
            calls,
            json: asks.json,
            tokens,
            offset: 0,
        }
    }

    /// The answer continues `words` tokens of text already given.
    pub fn continuing(mut self, words: u64) -> Script {
        self.offset = words;
        self
    }

    /// Token `i` (0-based).
    pub fn piece(&self, i: u64) -> Piece {
        if i < self.think {
            return Piece::Thinking(format!("think{i} "));
        }
        let j = i - self.think;
        let calls = self.calls.len() as u64;
        if j < calls {
            return Piece::Call(j as usize);
        }
        if !self.json {
            return Piece::Text(format!("tok{} ", i + self.offset));
        }
        let k = j - calls;
        let open = if k == 0 { "{" } else { "," };
        let close = if i + 1 == self.tokens { "}" } else { "" };
        Piece::Text(format!("{open}\"t{k}\":{k}{close}"))
    }

    /// A tool call as Ollama's native API writes it (`api.ToolCall`).
    pub fn native_call(&self, k: usize) -> Value {
        json!({
            "id": call_id(k),
            "function": {
                "index": k,
                "name": self.calls[k],
                "arguments": arguments(k),
            },
        })
    }

    /// A tool call as Ollama's `/v1` writes it (`openai.ToolCall`): the
    /// arguments as a JSON string.
    pub fn openai_call(&self, k: usize) -> Value {
        json!({
            "id": call_id(k),
            "index": k,
            "type": "function",
            "function": {
                "name": self.calls[k],
                "arguments": arguments(k).to_string(),
            },
        })
    }
}

/// Deterministic, so that two answers to the same request are equal (Ollama
/// draws them at random).
fn call_id(k: usize) -> String {
    format!("call_fake{k}")
}

fn arguments(k: usize) -> Value {
    json!({ "zeta": k, "alpha": "tok" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn thinking_then_calls_then_json_text() {
        let asks = Asks {
            think: true,
            tools: vec!["a".into(), "b".into(), "c".into()],
            json: true,
        };
        let s = Script::new(asks, 7);
        let pieces: Vec<Piece> = (0..7).map(|i| s.piece(i)).collect();
        assert_eq!(
            pieces,
            [
                Piece::Thinking("think0 ".into()),
                Piece::Thinking("think1 ".into()),
                Piece::Thinking("think2 ".into()),
                Piece::Call(0),
                Piece::Call(1),
                Piece::Text("{\"t0\":0".into()),
                Piece::Text(",\"t1\":1}".into()),
            ]
        );
        let text: String = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, json!({"t0": 0, "t1": 1}));
        assert_eq!(s.openai_call(1)["function"]["name"], "b");
        assert_eq!(
            s.openai_call(1)["function"]["arguments"],
            r#"{"alpha":"tok","zeta":1}"#
        );
    }

    #[test]
    fn plain_text_is_unchanged() {
        let s = Script::new(Asks::default(), 3);
        assert_eq!(s.piece(2), Piece::Text("tok2 ".into()));
    }

    #[test]
    fn calls_never_outnumber_the_tokens() {
        let asks = Asks {
            tools: vec!["a".into(), "b".into()],
            ..Asks::default()
        };
        let s = Script::new(asks, 1);
        assert_eq!(s.piece(0), Piece::Call(0));
        assert_eq!(s.calls.len(), 1);
    }

    #[test]
    fn asks_are_read_like_ollama_reads_them() {
        let a = Asks::native(
            &body(
                json!({"think": "high", "format": "json", "tools": [{"function": {"name": "f"}}]}),
            ),
            true,
        );
        assert_eq!(
            a,
            Asks {
                think: true,
                tools: vec!["f".into()],
                json: true
            }
        );
        let g = Asks::native(
            &body(json!({"think": false, "tools": [{"function": {"name": "f"}}]})),
            false,
        );
        assert_eq!(g, Asks::default());
        let o = Asks::openai(
            &body(json!({"reasoning_effort": "low", "response_format": {"type": "json_object"}})),
            true,
        );
        assert!(o.think && o.json);
        let none = Asks::openai(&body(json!({"reasoning": {"effort": "none"}})), true);
        assert!(!none.think);
    }

    #[test]
    fn a_chat_ending_with_the_assistant_continues_its_numbering() {
        let m = body(json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "tok0 tok1 tok2 "}
        ]}));
        assert_eq!(prefill(&m), 3);
        let s = Script::new(Asks::default(), 2).continuing(prefill(&m));
        assert_eq!(s.piece(0), Piece::Text("tok3 ".into()));
        assert_eq!(s.piece(1), Piece::Text("tok4 ".into()));
        let m = body(json!({"messages": [{"role": "user", "content": "a b"}]}));
        assert_eq!(prefill(&m), 0);
    }
}
