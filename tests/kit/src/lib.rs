//! maitre's test kit: what the end-to-end tests (`tests/e2e`) and the
//! benchmarks (`host/benches`) share, in one place.
//!
//! - [`policy`]: a typed policy-file builder, serialised with `toml`, so a
//!   test cannot write a malformed file by accident.
//! - [`process`]: `maitre serve` as a child process, started with
//!   `--ready-file` and waited for on that file, not on a log line.
//! - [`prom`]: one Prometheus/OpenMetrics text parser for `/metrics`.
//! - [`upstream`]: the upstream model (host/upstream-model) and helpers on its log.
//! - [`http`]: the HTTP client and request shapes the tests send.
//!
//! A dev-dependency of `maitre` only; it does not depend on `maitre` itself
//! (the binary's path comes from the caller's `env!("CARGO_BIN_EXE_maitre")`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod http;
pub mod policy;
pub mod process;
pub mod prom;
pub mod upstream;

pub use http::{client, error_of, generate, get_json, python, run_python};
pub use policy::{Ab, Arm, Backend, Fleet, Limits, PolicyFile};
pub use process::{Exited, Maitre, Ready, Serve, rss_kib};
pub use prom::Scrape;
pub use upstream::{
    EventKind, LogEvent, ModelConfig, UpstreamModel, fake, llama_like, seq_of, start_order,
};
