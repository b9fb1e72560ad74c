//! The upstream the tests run maitre against: the project's model of an
//! Ollama server (the `upstream-model` crate in host/upstream-model). This is the one file of the
//! kit that names that crate; the tests and benches import it from here.

use std::time::Duration;

pub use upstream_model::{EventKind, LogEvent, ModelConfig, UpstreamModel};

/// Starts the upstream model with `slots` slots and `token_ms` per token.
pub async fn fake(slots: usize, token_ms: u64) -> UpstreamModel {
    UpstreamModel::start(ModelConfig {
        slots,
        token_delay: Duration::from_millis(token_ms),
        ..ModelConfig::default()
    })
    .await
    .expect("start the upstream model")
}

/// The `seq` of the first `kind` event of the request tagged `tag`.
pub fn seq_of(log: &[LogEvent], tag: &str, kind: EventKind) -> Option<u64> {
    log.iter()
        .find(|e| e.kind == kind && e.tag.as_deref() == Some(tag))
        .map(|e| e.seq)
}

/// Tags in the order their requests started upstream.
pub fn start_order(log: &[LogEvent]) -> Vec<String> {
    log.iter()
        .filter(|e| e.kind == EventKind::Started)
        .filter_map(|e| e.tag.clone())
        .collect()
}

/// Starts the upstream model in its llama-server-like mode
/// ([`ModelConfig::ignore_disconnect_non_streaming`]): a non-streaming
/// generation whose client leaves runs on to its end, holding its slot.
pub async fn llama_like(slots: usize, token_ms: u64) -> UpstreamModel {
    UpstreamModel::start(ModelConfig {
        slots,
        token_delay: Duration::from_millis(token_ms),
        ignore_disconnect_non_streaming: true,
        ..ModelConfig::default()
    })
    .await
    .expect("start the upstream model")
}
