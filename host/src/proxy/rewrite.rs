//! The body maitre sends upstream for a client that asked for no stream:
//! the same request, asking for a stream.
//!
//! maitre streams from every upstream, so that it sees each request's
//! progress and can stop one by closing its connection, and folds the stream
//! back into a non-streamed answer for such a client (`aggregate`).
//!
//! The body is read the way Ollama's Go decoder reads it (lossy UTF-8, keys
//! matched without case, the last of repeated keys winning, data after the
//! first value ignored) and rewritten member by member: every top-level
//! member whose key Go would read as `stream` (or, on `/v1`,
//! `stream_options`) is dropped, every other one is kept byte for byte, and
//! `"stream":true` (on `/v1` also `"stream_options":{"include_usage":true}`,
//! so that the usage comes with the stream) is added last. A body maitre
//! cannot read as a JSON object is forwarded untouched, and its answer
//! relayed as it comes.
//!
//! The same member-by-member rewrite adds the per-request `priority` an
//! engine such as vLLM takes (an upstream's `pass_priority`), on `/v1`
//! generations ([`with_priority`]): every top-level `priority` member is
//! dropped (vLLM reads keys as written, the last of repeated keys winning)
//! and maitre's `"priority":N` is added last.

use bytes::Bytes;
use serde::de::IgnoredAny;

use super::aggregate::Api;
use crate::request::{go_key_matches, go_lossy};

/// A body rewritten to ask for a stream, and the API its answer speaks.
#[derive(Debug)]
pub(crate) struct Streamed {
    /// What to send upstream.
    pub body: Bytes,
    /// How to fold the streamed answer.
    pub api: Api,
}

/// The body to send upstream instead of `body` so that the answer streams,
/// for a request to `path` whose client asked for no stream
/// (`client_streams` false). `None`: send `body` as it is (the client
/// streams, the path never streams, or the body is not a JSON object).
pub(crate) fn ask_for_stream(path: &str, body: &[u8], client_streams: bool) -> Option<Streamed> {
    let (openai, chat) = match path {
        "/api/generate" => (false, false),
        "/api/chat" => (false, true),
        "/v1/chat/completions" => (true, true),
        "/v1/completions" => (true, false),
        _ => return None,
    };
    if client_streams {
        return None;
    }
    let text = go_lossy(body);
    let end = first_object_end(&text)?;
    let members = members(&text[..end])?;
    let dropped = |key: &str| named(key, "stream") || (openai && named(key, "stream_options"));
    let mut added = vec!["\"stream\":true"];
    if openai {
        added.push("\"stream_options\":{\"include_usage\":true}");
    }
    let out = rebuild(&text, end, &members, dropped, &added);
    let api = if openai {
        Api::OpenAi { chat }
    } else {
        // The last `tools` wins; `null` or `[]` offers none.
        let tools = members
            .iter()
            .rev()
            .find(|m| named(m.key, "tools"))
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m.value).ok())
            .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()));
        Api::Ollama {
            chat,
            tools: chat && tools,
        }
    };
    Some(Streamed {
        body: Bytes::from(out),
        api,
    })
}

/// Whether maitre may add a per-request priority to a request to `path`:
/// the OpenAI-compatible generations (vLLM takes `priority` on both).
pub(crate) fn takes_priority(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/v1/completions")
}

/// `body` with its top-level `priority` members replaced by
/// `"priority":value`, added last; `None` when it is not a JSON object
/// (then it is sent as it is). Only for paths that [`takes_priority`].
pub(crate) fn with_priority(body: &[u8], value: i64) -> Option<Bytes> {
    let text = go_lossy(body);
    let end = first_object_end(&text)?;
    let members = members(&text[..end])?;
    // vLLM (Python) matches keys exactly.
    let dropped = |key: &str| serde_json::from_str::<String>(key).is_ok_and(|k| k == "priority");
    let added = format!("\"priority\":{value}");
    Some(Bytes::from(rebuild(
        &text,
        end,
        &members,
        dropped,
        &[&added],
    )))
}

/// Whether `raw`, a member's key as written (quotes and escapes), is one Go's
/// decoder reads as the struct field `name`.
pub(super) fn named(raw: &str, name: &str) -> bool {
    serde_json::from_str::<String>(raw).is_ok_and(|k| go_key_matches(k.as_bytes(), name))
}

/// The object that ends at `end` in `text`, without its `dropped` members
/// (the others byte for byte) and with `added` last, then whatever followed.
pub(super) fn rebuild(
    text: &str,
    end: usize,
    members: &[Member<'_>],
    dropped: impl Fn(&str) -> bool,
    added: &[&str],
) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    out.push('{');
    let kept = members.iter().filter(|m| !dropped(m.key)).map(|m| m.whole);
    for (i, part) in kept.chain(added.iter().copied()).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(part);
    }
    out.push('}');
    out.push_str(&text[end..]);
    out
}

/// Where the first JSON value of `text` ends, if it is a valid object.
pub(super) fn first_object_end(text: &str) -> Option<usize> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
    match values.next() {
        Some(Ok(_)) => Some(values.byte_offset()),
        _ => None,
    }
}

/// One top-level member of an object, as raw text.
pub(super) struct Member<'a> {
    /// The key with its quotes and escapes.
    pub(super) key: &'a str,
    /// The value.
    pub(super) value: &'a str,
    /// From the key to the end of the value.
    pub(super) whole: &'a str,
}

/// The members of `obj`, a valid JSON object (checked by the caller), in
/// order. `None` only if the scan goes wrong, which a valid object cannot
/// make it do.
pub(super) fn members(obj: &str) -> Option<Vec<Member<'_>>> {
    let b = obj.as_bytes();
    let mut i = skip_ws(b, 0);
    (b.get(i)? == &b'{').then_some(())?;
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    if b.get(i)? == &b'}' {
        return Some(out);
    }
    loop {
        let k0 = i;
        i = skip_string(b, i)?;
        let k1 = i;
        i = skip_ws(b, i);
        (b.get(i)? == &b':').then_some(())?;
        i = skip_ws(b, i + 1);
        let v0 = i;
        i = skip_value(b, i)?;
        out.push(Member {
            key: obj.get(k0..k1)?,
            value: obj.get(v0..i)?,
            whole: obj.get(k0..i)?,
        });
        i = skip_ws(b, i);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Past the string starting at `i` (its opening quote).
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    (b.get(i)? == &b'"').then_some(())?;
    i += 1;
    loop {
        match b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Past the value starting at `i`.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            while b
                .get(i)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                i += 1;
            }
            Some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::extract_meta;

    fn rewrite(path: &str, body: &str) -> Option<(String, Api)> {
        let meta = extract_meta(path, body.as_bytes());
        ask_for_stream(path, body.as_bytes(), meta.stream)
            .map(|s| (String::from_utf8(s.body.to_vec()).unwrap(), s.api))
    }

    fn body(path: &str, body: &str) -> String {
        rewrite(path, body).expect("rewritten").0
    }

    #[test]
    fn stream_false_becomes_true_and_the_rest_stays_byte_for_byte() {
        assert_eq!(
            body(
                "/api/generate",
                r#"{"model":"fake", "prompt":"hi","stream":false, "options":{"num_predict":1.0e2,"stream":false}}"#
            ),
            // Members keep their bytes; the space between them goes.
            r#"{"model":"fake","prompt":"hi","options":{"num_predict":1.0e2,"stream":false},"stream":true}"#
        );
        assert_eq!(
            body("/api/chat", " {\"stream\":false\n} trailing"),
            "{\"stream\":true} trailing"
        );
    }

    #[test]
    fn every_key_go_reads_as_stream_goes() {
        assert_eq!(
            body(
                "/api/chat",
                r#"{"Stream":false,"model":"m","ſtream":false,"\u0073TREAM":false,"messages":[]}"#
            ),
            r#"{"model":"m","messages":[],"stream":true}"#
        );
    }

    #[test]
    fn openai_asks_for_the_usage_too() {
        assert_eq!(
            body(
                "/v1/chat/completions",
                r#"{"model":"m","STREAM_OPTIONS":{"include_usage":false},"messages":[{"role":"user","content":"}{\""}]}"#
            ),
            r#"{"model":"m","messages":[{"role":"user","content":"}{\""}],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let (_, api) = rewrite("/v1/completions", r#"{"model":"m","prompt":"x"}"#).unwrap();
        assert_eq!(api, Api::OpenAi { chat: false });
    }

    #[test]
    fn what_is_left_alone() {
        // The client streams already (explicitly, or by Ollama's default).
        assert!(rewrite("/api/generate", r#"{"model":"m","stream":true}"#).is_none());
        assert!(rewrite("/api/generate", r#"{"model":"m"}"#).is_none());
        // Embeddings never stream; other paths are not generations.
        assert!(rewrite("/api/embed", r#"{"model":"m","stream":false}"#).is_none());
        assert!(rewrite("/v1/embeddings", r#"{"model":"m"}"#).is_none());
        // Not a JSON object maitre can read: forwarded as it is.
        for bad in ["", "[1]", "\"x\"", "{\"model\":", "{\"a\" 1}", "nope"] {
            assert!(
                ask_for_stream("/api/generate", bad.as_bytes(), false).is_none(),
                "{bad}"
            );
        }
    }

    #[test]
    fn priority_replaces_the_clients_own_and_comes_last() {
        let p = |b: &str, v: i64| {
            String::from_utf8(with_priority(b.as_bytes(), v).expect("rewritten").to_vec()).unwrap()
        };
        assert_eq!(
            p(
                r#"{"model":"m","priority":-5,"messages":[{"priority":3}],"stream":true}"#,
                1
            ),
            r#"{"model":"m","messages":[{"priority":3}],"stream":true,"priority":1}"#
        );
        assert_eq!(p("{}", 0), r#"{"priority":0}"#);
        // A body rewritten to ask for a stream takes it as well.
        let streamed = body("/v1/chat/completions", r#"{"model":"m","stream":false}"#);
        assert_eq!(
            p(&streamed, 1),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"priority":1}"#
        );
        assert!(with_priority(b"not json", 1).is_none());
        assert!(takes_priority("/v1/completions") && takes_priority("/v1/chat/completions"));
        assert!(!takes_priority("/api/chat") && !takes_priority("/v1/embeddings"));
    }

    #[test]
    fn invalid_utf8_is_sent_as_go_reads_it() {
        let b = b"{\"model\":\"m\",\"prompt\":\"a\xffb\",\"stream\":false}";
        let s = ask_for_stream("/api/generate", b, false).unwrap();
        assert_eq!(
            std::str::from_utf8(&s.body).unwrap(),
            "{\"model\":\"m\",\"prompt\":\"a\u{FFFD}b\",\"stream\":true}"
        );
    }

    #[test]
    fn tools_are_noticed_on_chat_only() {
        let api = |path: &str, b: &str| rewrite(path, b).unwrap().1;
        let tools = r#"[{"type":"function","function":{"name":"f"}}]"#;
        assert_eq!(
            api(
                "/api/chat",
                &format!(r#"{{"stream":false,"tools":{tools}}}"#)
            ),
            Api::Ollama {
                chat: true,
                tools: true
            }
        );
        assert_eq!(
            api(
                "/api/chat",
                &format!(r#"{{"stream":false,"tools":{tools},"TOOLS":null}}"#)
            ),
            Api::Ollama {
                chat: true,
                tools: false
            }
        );
        assert_eq!(
            api(
                "/api/generate",
                &format!(r#"{{"stream":false,"tools":{tools}}}"#)
            ),
            Api::Ollama {
                chat: false,
                tools: false
            }
        );
    }

    #[test]
    fn ollama_reads_the_rewritten_body_as_the_original_but_streamed() {
        for (path, b) in [
            (
                "/api/generate",
                r#"{"model":"a","stream":false,"options":{"num_predict":7}}"#,
            ),
            (
                "/api/chat",
                r#"{"MODEL":"b","Stream":false,"model":"c","options":null}"#,
            ),
            (
                "/v1/completions",
                r#"{"model":"d","max_tokens":3,"stream":false}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"e","stream":null} {"model":"x"}"#,
            ),
        ] {
            let before = extract_meta(path, b.as_bytes());
            let after = extract_meta(path, body(path, b).as_bytes());
            assert!(after.stream, "{b}");
            assert_eq!(
                (after.model, after.num_predict),
                (before.model, before.num_predict),
                "{b}"
            );
        }
    }
}
