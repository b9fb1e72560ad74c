//! The request reader against what Ollama's Go server does with the same
//! bytes (each expectation follows from Go's `encoding/json`, net/http and
//! gin, and from Ollama's request structs).

use super::*;

fn meta(path: &str, body: &str) -> BodyMeta {
    extract_meta(path, body.as_bytes())
}

#[test]
fn stream_defaults_follow_ollama() {
    assert!(meta("/api/chat", r#"{"model":"m","messages":[]}"#).stream);
    assert!(!meta("/v1/chat/completions", r#"{"model":"m","messages":[]}"#).stream);
    assert!(!meta("/api/generate", r#"{"model":"m","stream":false}"#).stream);
    assert!(!meta("/api/embed", r#"{"model":"m","input":"x"}"#).stream);
    // Embedding requests have no `stream` field at all.
    assert!(!meta("/api/embed", r#"{"model":"m","stream":true}"#).stream);
    assert!(!meta("/v1/embeddings", r#"{"model":"m","stream":true}"#).stream);
}

#[test]
fn num_predict_from_options_or_max_tokens() {
    let m = meta(
        "/api/generate",
        r#"{"model":"m","options":{"num_predict":42,"temperature":0.1}}"#,
    );
    assert_eq!(m.num_predict, Some(42));
    assert_eq!(
        meta("/v1/completions", r#"{"model":"m","max_tokens":7}"#).num_predict,
        Some(7)
    );
    // A map value is a float64 in Go, truncated by Options.FromMap.
    assert_eq!(
        meta(
            "/api/chat",
            r#"{"model":"m","options":{"num_predict":7.9}}"#
        )
        .num_predict,
        Some(7)
    );
    // Ollama reads `max_tokens` only; `max_completion_tokens` is ignored.
    assert_eq!(
        meta(
            "/v1/chat/completions",
            r#"{"model":"m","max_completion_tokens":7}"#
        )
        .num_predict,
        None
    );
    // `max_tokens` is an `*int`: a fraction is a type error (Ollama: 400).
    assert_eq!(
        meta("/v1/completions", r#"{"model":"m","max_tokens":7.5}"#).num_predict,
        None
    );
    // Options keys are map keys: exact, not folded.
    assert_eq!(
        meta(
            "/api/generate",
            r#"{"model":"m","options":{"NUM_PREDICT":3}}"#
        )
        .num_predict,
        None
    );
    // Fields of the other dialect are not fields of this request type.
    assert_eq!(
        meta("/api/generate", r#"{"model":"m","max_tokens":3}"#).num_predict,
        None
    );
    assert_eq!(
        meta(
            "/v1/completions",
            r#"{"model":"m","options":{"num_predict":3}}"#
        )
        .num_predict,
        None
    );
}

#[test]
fn keys_match_fields_case_insensitively_like_go() {
    let m = meta(
        "/api/generate",
        r#"{"Model":"llama3","STREAM":false,"Options":{"num_predict":5}}"#,
    );
    assert_eq!(m.model, "llama3");
    assert!(!m.stream);
    assert_eq!(m.num_predict, Some(5));
    let m = meta(
        "/v1/chat/completions",
        r#"{"mOdEl":"x","Stream":true,"MAX_TOKENS":9}"#,
    );
    assert_eq!(
        (m.model.as_str(), m.stream, m.num_predict),
        ("x", true, Some(9))
    );
    // Unicode simple folding maps LONG S onto `s`, KELVIN SIGN onto `k` and
    // both Turkish I's onto `i`.
    let m = meta(
        "/api/generate",
        "{\"model\":\"m\",\"\u{17F}tream\":false,\"opt\u{130}ons\":{\"num_predict\":2}}",
    );
    assert!(!m.stream);
    assert_eq!(m.num_predict, Some(2));
    assert_eq!(
        meta(
            "/v1/completions",
            "{\"model\":\"m\",\"max_to\u{212A}ens\":4}"
        )
        .num_predict,
        Some(4)
    );
    // Other letters do not fold onto ASCII, and escapes are decoded first.
    assert_eq!(meta("/api/generate", "{\"m\u{F6}del\":\"m\"}").model, "");
    assert_eq!(meta("/api/generate", r#"{"\u004Dodel":"m"}"#).model, "m");
}

#[test]
fn the_last_of_repeated_keys_wins() {
    assert_eq!(meta("/api/chat", r#"{"model":"a","model":"b"}"#).model, "b");
    assert_eq!(meta("/api/chat", r#"{"model":"a","MODEL":"b"}"#).model, "b");
    assert_eq!(meta("/api/chat", r#"{"MODEL":"a","model":"b"}"#).model, "b");
    assert!(!meta("/api/chat", r#"{"model":"m","stream":true,"stream":false}"#).stream);
    assert_eq!(
        meta(
            "/v1/completions",
            r#"{"model":"m","max_tokens":1,"max_tokens":8}"#
        )
        .num_predict,
        Some(8)
    );
}

#[test]
fn null_follows_go() {
    // A string ignores null; a pointer (native `stream`) is reset by it; a
    // plain bool (`/v1` `stream`) ignores it.
    assert_eq!(
        meta("/api/chat", r#"{"model":"a","model":null}"#).model,
        "a"
    );
    assert!(meta("/api/chat", r#"{"model":"m","stream":false,"stream":null}"#).stream);
    assert!(
        meta(
            "/v1/completions",
            r#"{"model":"m","stream":true,"stream":null}"#
        )
        .stream
    );
    assert_eq!(
        meta(
            "/v1/completions",
            r#"{"model":"m","max_tokens":3,"max_tokens":null}"#
        )
        .num_predict,
        None
    );
    // Go decodes repeated `options` into the same map; null makes it nil.
    let merged = r#"{"model":"m","options":{"num_predict":5},"options":{"temperature":1}}"#;
    assert_eq!(meta("/api/generate", merged).num_predict, Some(5));
    let reset = r#"{"model":"m","options":{"num_predict":5},"options":null,"options":{}}"#;
    assert_eq!(meta("/api/generate", reset).num_predict, None);
    let entry = r#"{"model":"m","options":{"num_predict":5,"num_predict":null}}"#;
    assert_eq!(meta("/api/generate", entry).num_predict, None);
}

#[test]
fn data_after_the_first_value_is_ignored() {
    let m = meta(
        "/api/generate",
        r#" {"model":"m","stream":false} and then {garbage"#,
    );
    assert_eq!(m.model, "m");
    assert!(!m.stream);
    assert_eq!(
        meta("/api/generate", r#"{"model":"a"}{"model":"b"}"#).model,
        "a"
    );
}

#[test]
fn strings_are_decoded_like_go() {
    // Invalid UTF-8 in a string: one U+FFFD per bad byte.
    let m = extract_meta("/api/generate", b"{\"model\":\"a\xff\xfeb\"}");
    assert_eq!(m.model, "a\u{FFFD}\u{FFFD}b");
    // A lone surrogate escape: one U+FFFD, and not an error (also in a key).
    assert_eq!(
        meta("/api/generate", r#"{"model":"x\ud800y"}"#).model,
        "x\u{FFFD}y"
    );
    let m = meta(
        "/api/generate",
        r#"{"\udc00":1,"model":"m","stream":false}"#,
    );
    assert_eq!((m.model.as_str(), m.stream), ("m", false));
    // Deeply nested values elsewhere are skipped, not refused.
    let deep = format!(
        r#"{{"prompt":{}{},"model":"m"}}"#,
        "[".repeat(500),
        "]".repeat(500)
    );
    assert_eq!(meta("/api/generate", &deep).model, "m");
}

#[test]
fn unreadable_bodies_are_scheduled_with_an_empty_model() {
    let defaults = |path: &str| BodyMeta {
        model: String::new(),
        stream: !path.starts_with("/v1/") && !path.contains("embed"),
        num_predict: None,
    };
    for body in [
        "",
        "   ",
        "{not json",
        r#"{"model":"m",}"#,
        "[1,2]",
        "null",
        r#""model""#,
        r#"{"messages":[]}"#,
        r#"{"model":""}"#,
    ] {
        for path in SCHEDULED_PATHS {
            assert_eq!(meta(path, body), defaults(path), "{path} {body:?}");
        }
    }
    // A type error on a field leaves that field unset, as in Go (Ollama then
    // answers 400).
    let m = meta("/api/chat", r#"{"model":"m","stream":"yes"}"#);
    assert_eq!((m.model.as_str(), m.stream), ("m", true));
}

#[test]
fn scheduled_paths_are_matched_as_ollamas_router_matches_them() {
    let post = |p: &str| scheduled_path(&Method::POST, p);
    for p in SCHEDULED_PATHS {
        assert_eq!(post(p), Some(*p));
    }
    assert_eq!(post("/api/%67enerate"), Some("/api/generate"));
    assert_eq!(post("/api/%67%65nerate"), Some("/api/generate"));
    assert_eq!(post("/api%2Fchat"), Some("/api/chat"));
    assert_eq!(post("/v1/chat%2fcompletions"), Some("/v1/chat/completions"));
    // Redirected by Go's mux or by gin, never served: not scheduled.
    for p in [
        "/api/generate/",
        "//api/generate",
        "/api//generate",
        "/api/./generate",
        "/x/../api/generate",
        "/API/generate",
        "/api/generate%2F",
        "/api/%2e/generate",
        "/api/%zzgenerate",
        "/api/generat%e",
    ] {
        assert_eq!(post(p), None, "{p}");
    }
    assert_eq!(scheduled_path(&Method::GET, "/api/generate"), None);
    assert_eq!(scheduled_path(&Method::PUT, "/api/%67enerate"), None);
    assert_eq!(post("/api/show"), None);
}
