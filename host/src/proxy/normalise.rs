//! Per-model normalisation (`[models."NAME"]`): the body of a request for a
//! model with a rule gets the rule's `options.num_ctx` and `keep_alive`,
//! whatever the client asked, so that clients that disagree do not make
//! Ollama reload the model (a different `num_ctx` forces a reload,
//! ollama#7773; a short `keep_alive` unloads it for the next client).
//!
//! The body is read the way Ollama's Go decoder reads it (see `rewrite`):
//! top-level keys match without case and the last repeated one wins; the
//! `options` map keeps exact keys, and repeated `options` members merge (Go
//! decodes each into the same map). Every other member is kept byte for
//! byte. A body that is not a JSON object, or whose `options` Ollama would
//! refuse (not an object), is left alone: Ollama answers it with its own
//! error. Only Ollama's native API takes these fields; `/v1` requests are
//! left alone (set the same `num_ctx` in the Modelfile for them).

use bytes::Bytes;

use super::rewrite::{Member, first_object_end, members, named, rebuild};
use crate::config::ModelRule;
use crate::request::go_lossy;

/// The paths whose bodies take `options` and `keep_alive`.
const NATIVE: [&str; 4] = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
];

/// `body` with `rule` applied, for a request to `path`; `None`: send it as
/// it is (another path, a body Ollama would refuse, or nothing to change).
pub(crate) fn normalise(path: &str, body: &[u8], rule: &ModelRule) -> Option<Bytes> {
    if !NATIVE.contains(&path) || (rule.num_ctx.is_none() && rule.keep_alive.is_none()) {
        return None;
    }
    let text = go_lossy(body);
    let end = first_object_end(&text)?;
    let all = members(&text[..end])?;
    let options = if rule.num_ctx.is_some() {
        go_options(&all)?
    } else {
        Vec::new()
    };
    let replaced = |key: &str| {
        (rule.num_ctx.is_some() && named(key, "options"))
            || (rule.keep_alive.is_some() && named(key, "keep_alive"))
    };
    let mut added = Vec::new();
    if let Some(n) = rule.num_ctx {
        added.push(options_with(&options, "num_ctx", &n.to_string())?);
    }
    if let Some(k) = &rule.keep_alive {
        added.push(format!("\"keep_alive\":{k}"));
    }
    let added: Vec<&str> = added.iter().map(String::as_str).collect();
    Some(Bytes::from(rebuild(&text, end, &all, replaced, &added)))
}

/// The `options` map of a body's top-level `members` as Go builds it:
/// entries in first-seen order, the last value of a key winning, `null`
/// emptying it. `None`: Ollama would refuse the options (not an object).
pub(super) fn go_options<'a>(all: &[Member<'a>]) -> Option<Vec<(String, &'a str)>> {
    let mut options: Vec<(String, &str)> = Vec::new();
    for m in all.iter().filter(|m| named(m.key, "options")) {
        if m.value == "null" {
            options.clear();
            continue;
        }
        for e in members(m.value)? {
            let key: String = serde_json::from_str(e.key).ok()?;
            match options.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = e.value,
                None => options.push((key, e.value)),
            }
        }
    }
    Some(options)
}

/// `"options":{...}`: `options` (as [`go_options`] gives them) with `key`
/// set to `value` (JSON), last. `None`: a key that cannot be written.
pub(super) fn options_with(options: &[(String, &str)], key: &str, value: &str) -> Option<String> {
    let mut o = String::from("\"options\":{");
    for (k, v) in options.iter().filter(|(k, _)| k != key) {
        o.push_str(&serde_json::to_string(k).ok()?);
        o.push(':');
        o.push_str(v);
        o.push(',');
    }
    o.push_str(&serde_json::to_string(key).ok()?);
    o.push(':');
    o.push_str(value);
    o.push('}');
    Some(o)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn rule(num_ctx: Option<u32>, keep_alive: Option<&str>) -> ModelRule {
        ModelRule {
            num_ctx,
            keep_alive: keep_alive.map(str::to_string),
            resume_preempted: false,
        }
    }

    fn apply(path: &str, body: &str, r: &ModelRule) -> Option<Value> {
        normalise(path, body.as_bytes(), r).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn num_ctx_and_keep_alive_replace_what_the_client_asked() {
        let r = rule(Some(8192), Some("\"30m\""));
        let v = apply(
            "/api/chat",
            r#"{"model":"m","Keep_Alive":"1m","options":{"temperature":0.5,"num_ctx":2048},"messages":[]}"#,
            &r,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"model":"m","messages":[],
                "options":{"temperature":0.5,"num_ctx":8192},"keep_alive":"30m"})
        );
    }

    #[test]
    fn a_body_without_options_gets_them() {
        let v = apply(
            "/api/generate",
            r#"{"model":"m","prompt":"hi"}"#,
            &rule(Some(4096), None),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"model":"m","prompt":"hi","options":{"num_ctx":4096}})
        );
        let v = apply("/api/embed", r#"{"model":"m"}"#, &rule(None, Some("-1"))).unwrap();
        assert_eq!(v, json!({"model":"m","keep_alive":-1}));
    }

    #[test]
    fn repeated_options_merge_as_go_decodes_them() {
        let v = apply(
            "/api/generate",
            r#"{"model":"m","options":{"top_k":1,"num_ctx":1},"OPTIONS":{"top_k":2,"seed":3}}"#,
            &rule(Some(512), None),
        )
        .unwrap();
        assert_eq!(v["options"], json!({"top_k":2,"seed":3,"num_ctx":512}));
        let v = apply(
            "/api/generate",
            r#"{"model":"m","options":{"top_k":1},"options":null}"#,
            &rule(Some(512), None),
        )
        .unwrap();
        assert_eq!(v["options"], json!({"num_ctx":512}));
    }

    #[test]
    fn what_is_left_alone() {
        let r = rule(Some(512), Some("\"5m\""));
        // OpenAI-compatible paths take neither field.
        assert!(apply("/v1/chat/completions", r#"{"model":"m"}"#, &r).is_none());
        // Not an object: Ollama answers it.
        assert!(apply("/api/generate", "[1]", &r).is_none());
        assert!(apply("/api/generate", "{\"model\":", &r).is_none());
        // Options Ollama would refuse stay as they are, for Ollama to refuse.
        assert!(apply("/api/generate", r#"{"model":"m","options":"x"}"#, &r).is_none());
    }

    #[test]
    fn other_members_and_trailing_data_are_kept_byte_for_byte() {
        let body = "{ \"model\" : \"m\", \"prompt\":\"a\\u00e9\" ,\"stream\":false} trailing";
        let out = normalise("/api/generate", body.as_bytes(), &rule(None, Some("0"))).unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(
            s.starts_with("{\"model\" : \"m\",\"prompt\":\"a\\u00e9\",\"stream\":false,"),
            "{s}"
        );
        assert!(s.ends_with(",\"keep_alive\":0} trailing"), "{s}");
    }
}
