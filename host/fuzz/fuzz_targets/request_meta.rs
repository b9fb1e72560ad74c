//! Any bytes as a scheduled request's body on every scheduled path, and as a
//! request path: the reader never panics, and what it reads is consistent
//! (with serde_json where both read the same plain object).
#![no_main]

#[allow(dead_code, missing_docs)]
#[path = "../../src/request.rs"]
mod request;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Where the body is a plain object (ASCII keys, only `model` spelled
    // like `model`), Go's reading and serde_json's agree on the model.
    let plain_model = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(serde_json::Value::Object(map))
            if map.keys().all(|k| k.is_ascii())
                && map
                    .keys()
                    .all(|k| k == "model" || !k.eq_ignore_ascii_case("model")) =>
        {
            Some(
                map.get("model")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
            )
        }
        _ => None,
    };
    for path in request::SCHEDULED_PATHS {
        let m = request::extract_meta(path, data);
        if path.contains("embed") {
            assert!(!m.stream);
        }
        if let Some(model) = &plain_model {
            assert_eq!(&m.model, model);
        }
    }
    if let Ok(raw) = std::str::from_utf8(data)
        && let Some(p) = request::scheduled_path(&http::Method::POST, raw)
    {
        assert!(request::SCHEDULED_PATHS.contains(&p));
    }
});
