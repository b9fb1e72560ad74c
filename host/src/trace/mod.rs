//! Request traces: one JSON line per scheduled request, written when the
//! request ends, for `maitre simulate` (which replays the arrivals) and for
//! people (`jq`, a spreadsheet).
//!
//! A line says when the request arrived, what the scheduler knew of it
//! (class hint, tenant, model, path, stream, `num_predict`, body size, a
//! pseudonymous client id), where and how it was served (backend, arm,
//! class, queue time, upstream TTFT, chunks, duration, pre-emptions) and how
//! it ended. It never holds a prompt, a body or a header value: the client
//! id is a keyed hash of the A/B key, with a key that lives only as long as
//! the process, so it keeps a client's requests together in one trace and
//! says nothing about who the client is.
//!
//! - [`TraceRecord`]: the line, shared by the writer and the reader;
//! - `writer`: the bounded channel and the writer thread, with rotation
//!   ([`TraceSink`]);
//! - `read`: reading trace files back, in arrival order ([`read_traces`]).

mod read;
mod writer;

use serde::{Deserialize, Serialize};

pub use read::{TraceError, arrival_offsets, read_traces};
pub use writer::{CHANNEL_CAPACITY, TraceSink};

use crate::policy::Class;

/// How a traced request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceOutcome {
    /// Answered by the upstream.
    Ok,
    /// The client went away.
    Cancelled,
    /// Its stream was cut by a pre-emption.
    Cut,
    /// Refused by the policy, a limit or shutdown.
    Rejected,
    /// The upstream failed or was unreachable.
    UpstreamError,
}

/// One scheduled request, as one line of a trace file. Times are in
/// milliseconds, to the microsecond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Arrival, Unix time (ms): when it happened, for people and for joining
    /// traces of several runs.
    pub arrival_unix_ms: u64,
    /// Arrival on maitre's monotonic clock (ms since it started): exact
    /// spacing between arrivals of one run, whatever the wall clock did.
    pub arrival_ms: f64,
    /// The class `X-Priority` asked for, if it named one.
    #[serde(default)]
    pub class_hint: Option<Class>,
    /// The class the policy gave it.
    pub class: Class,
    /// Tenant (the configured tenant header), if any.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Model named in the body ("" when it could not be read).
    pub model: String,
    /// HTTP path.
    pub path: String,
    /// Whether the answer streams.
    pub stream: bool,
    /// `options.num_predict` / `max_tokens`, if set.
    #[serde(default)]
    pub num_predict: Option<i64>,
    /// Request body size (bytes).
    pub body_bytes: u64,
    /// Pseudonymous client id: a keyed hash of the A/B key that is stable
    /// within one maitre process only.
    #[serde(default)]
    pub client: Option<String>,
    /// The backend that served it (`[[upstream]] name`; `default` for a
    /// single `[upstream]`); empty when it was never dispatched.
    pub backend: String,
    /// The arm that served (or refused) it.
    pub arm: String,
    /// Time waiting in maitre's queue, all waits added up.
    pub queue_ms: f64,
    /// Dispatch → the upstream's first byte (its response head), of the
    /// last dispatch; for a streamed answer that is the first token.
    #[serde(default)]
    pub upstream_ttft_ms: Option<f64>,
    /// Arrival → the first byte sent to the client.
    #[serde(default)]
    pub ttft_ms: Option<f64>,
    /// Response chunks relayed: one per token, plus Ollama's final frame,
    /// for a streamed answer; one for an answer sent whole.
    pub tokens: u64,
    /// Arrival → end.
    pub duration_ms: f64,
    /// Times it was pre-empted.
    #[serde(default)]
    pub preemptions: u32,
    /// How it ended.
    pub outcome: TraceOutcome,
}

/// Rounds milliseconds to the microsecond, so a line stays short.
pub fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}
