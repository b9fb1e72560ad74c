//! Any bytes as a scheduled request's body, on every scheduled path:
//! `extract_meta` never panics, and what it extracts is consistent.
#![no_main]

#[allow(dead_code, missing_docs)]
#[path = "../../src/request.rs"]
mod request;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for path in request::SCHEDULED_PATHS {
        if let Some(m) = request::extract_meta(path, data) {
            assert!(!m.model.is_empty());
            if path.contains("embed") {
                assert!(!m.stream);
            }
        }
    }
});
