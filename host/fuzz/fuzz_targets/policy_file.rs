//! Any text as a policy file: `Config::parse` returns a config or an error
//! naming file, line and key, and never panics.
#![no_main]

#[allow(dead_code, missing_docs)]
#[path = "../../src/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match config::Config::parse(std::path::Path::new("fuzz.toml"), text) {
            Ok(c) => {
                assert!(!c.arms.is_empty());
                assert!(c.upstreams.iter().all(|u| u.slots >= 1));
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("fuzz.toml:"), "{msg}");
            }
        }
    }
});
