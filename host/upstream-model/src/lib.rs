//! A model of an Ollama server, served over HTTP: the upstream of
//! `maitre serve --demo`, of the tests and of the benchmarks, and the timing
//! model of the simulator to come.
//!
//! It models what a scheduling proxy can observe of real Ollama (see
//! `ollama-api.md`): a fixed number of generation slots with a FIFO queue in
//! front of them ([`slots`]), a prompt time and a per-token time
//! ([`timing`]), no response headers before the first token, NDJSON / SSE
//! streams flushed per token, Ollama's error shapes, the loopback Host check,
//! and immediate cancellation when the client goes away (or, like
//! llama-server, none for non-streaming requests:
//! [`ModelConfig::ignore_disconnect_non_streaming`]). What it sees goes
//! to a bounded event log ([`ModelConfig::log_capacity`]) that tests can
//! query in-process ([`UpstreamModel::log`]) or over HTTP (`GET /_fake/log`).
//!
//! | Route | Slot | Answer |
//! |---|---|---|
//! | `POST /api/generate`, `/api/chat` | yes | NDJSON (stream omitted = true) or one JSON object; preload / unload with an empty prompt |
//! | `POST /api/embed`, `/api/embeddings` | yes | one JSON object after prompt delay + one token delay |
//! | `POST /v1/chat/completions`, `/v1/completions` | yes | JSON (stream omitted = false) or SSE ending in `data: [DONE]` |
//! | `POST /v1/embeddings` | yes | OpenAI list of embeddings (`encoding_format: "base64"` honoured) |
//! | `GET\|HEAD /`, `/api/version`, `/api/tags`; `GET /api/ps`, `/v1/models`, `/v1/models/{m}`; `POST /api/show`, `/api/pull` | no | as Ollama |
//! | `GET /_fake/log`, `/_fake/stats`; `POST /_fake/reset`; any `/_fake/echo` | no | control (no Host check, not logged); 404 unless [`ModelConfig::control_routes`] |
//!
//! Answers say `tok0 tok1 …`; a request asking for thinking (`think`,
//! `reasoning_effort`) thinks for half its tokens first, one offering tools
//! calls up to two of them, and one asking for a `format` answers a JSON
//! object, streamed or not, in Ollama's shapes (module `content`).
//! Residency (`residency.rs`): a model that is not loaded takes
//! [`ModelConfig::load_time`] to load before its request asks for a slot
//! (one load at a time); at most [`ModelConfig::max_loaded`] stay loaded, the
//! least recently used going first; `/api/ps` lists them, `/api/tags` lists
//! [`ModelConfig::models`].
//!
//! Per-request headers: `X-Fake-Token-Ms`, `X-Fake-Prompt-Ms`,
//! `X-Fake-Tokens` (token count; pull: progress lines), `X-Fake-Fail-After: N`
//! (error after N tokens; 0 = HTTP 500 before any byte), `X-Fake-Status: S`
//! (answer S at once with Ollama's body for it), `X-Fake-Hang-Up-Reused`
//! (close the connection without an answer if the request is not its
//! first: a kept-alive connection dying just as it is reused). `X-Test-Tag` and
//! `X-Priority` are recorded in the log. Every response carries
//! `X-Fake-Upstream: 1`. Models must start with "fake" (else 404).
//!
//! Requests are read as Ollama's Go server reads them: the path
//! percent-decoded, body keys matched without case, the last of repeated
//! keys winning, data after the JSON value ignored ([`go_json`]).
//!
//! Timing: a request waits FIFO for a slot, then `prompt_delay`, then each
//! token takes `token_delay` (TTFT = prompt + one token); token `i` is due at
//! a fixed offset from the slot grant ([`timing::Plan`]). Streaming answers
//! send no headers until the first token is ready, like Ollama.

mod content;
mod event_log;
mod generation;
mod go_json;
mod late_notice;
mod native;
mod openai;
mod residency;
mod routes;
pub mod slots;
mod state;
pub mod timing;
mod util;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use event_log::DEFAULT_LOG_CAPACITY;
pub use state::{EventKind, LogEvent, Stats};

/// What `GET /api/version` reports.
pub const VERSION: &str = "0.33.0-fake";

/// How the model behaves. Per-request `X-Fake-*` headers override the
/// delays and the token count.
///
/// The default suits tests and benches: control routes on and a log of
/// [`DEFAULT_LOG_CAPACITY`] events. [`ModelConfig::demo`] is the one to
/// put in front of people.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Requests generating at once (`OLLAMA_NUM_PARALLEL`); others queue FIFO.
    pub slots: usize,
    /// Time to produce each token (the first one included).
    pub token_delay: Duration,
    /// Prefill time, after getting a slot and before the first token's time.
    pub prompt_delay: Duration,
    /// More prefill time per prompt token (words of the prompt, the
    /// messages and the system prompt): a chat that continues a long
    /// assistant message takes longer to start.
    pub prompt_token_delay: Duration,
    /// Tokens per answer when the request sets no limit.
    pub default_tokens: u64,
    /// Answer 403 (empty body) to a Host that is not loopback, like Ollama
    /// bound to 127.0.0.1.
    pub check_host: bool,
    /// Length of the fake embedding vectors when the request sets none.
    pub embedding_dims: usize,
    /// Serve `/_fake/log`, `/_fake/stats`, `/_fake/reset` and `/_fake/echo`.
    /// Off, they answer 404 like any path Ollama does not know.
    pub control_routes: bool,
    /// Events the log keeps (the most recent ones); 0 switches it off.
    pub log_capacity: usize,
    /// llama-server's habit: a non-streaming generation whose client goes
    /// away runs on to its end, holding its slot (logged as
    /// [`EventKind::Orphaned`], counted in [`Stats::orphans`]). Streaming
    /// ones stop at once, as always. Off, every generation stops when its
    /// client goes away, like Ollama.
    pub ignore_disconnect_non_streaming: bool,
    /// How long the model takes to notice that a client went away (its end
    /// of file or a reset); meanwhile the generation goes on, holding its
    /// slot, and the connection stays open. Zero: at once, like Ollama.
    /// llama-server notices a streaming client's departure within tens of
    /// ms; a proxy that frees the slot before the upstream lets go of the
    /// connection overruns such an engine.
    pub disconnect_notice: Duration,
    /// How long a cancelled generation keeps its slot after its connection
    /// closed: an engine that frees the slot on its next loop turn
    /// (llama-server). A request sent meanwhile queues inside the model;
    /// `GET /slots` (OpenAI-only mode) shows the slot busy. Zero: freed at
    /// once.
    pub release_lag: Duration,
    /// Models on disk, as `/api/tags` and `/v1/models` list them and
    /// `/api/show` describes them (any model whose name starts with "fake"
    /// can generate, listed or not).
    pub models: Vec<String>,
    /// Models loaded from the start (no load time for their first request).
    pub preloaded: Vec<String>,
    /// Time to load a model that is not loaded; loads run one at a time.
    pub load_time: Duration,
    /// Models loaded at once (`OLLAMA_MAX_LOADED_MODELS`); loading one more
    /// evicts the least recently used.
    pub max_loaded: usize,
    /// An OpenAI-compatible server, like llama-server or vLLM, instead of
    /// Ollama: `/v1/*` and `GET /health` only; every `/api/*` route (and
    /// `/`) answers 404 in the OpenAI error shape.
    pub openai_only: bool,
}

impl ModelConfig {
    /// The upstream of `maitre serve --demo`: default timing, no control
    /// routes, no log, so that it shows only Ollama's surface and its
    /// memory stays flat however long it runs.
    pub fn demo(slots: usize) -> Self {
        ModelConfig {
            slots,
            control_routes: false,
            log_capacity: 0,
            ..ModelConfig::default()
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            slots: 2,
            token_delay: Duration::from_millis(20),
            prompt_delay: Duration::ZERO,
            prompt_token_delay: Duration::ZERO,
            default_tokens: 5,
            check_host: true,
            embedding_dims: 8,
            control_routes: true,
            log_capacity: DEFAULT_LOG_CAPACITY,
            ignore_disconnect_non_streaming: false,
            disconnect_notice: Duration::ZERO,
            release_lag: Duration::ZERO,
            models: vec!["fake".into()],
            preloaded: Vec::new(),
            load_time: Duration::ZERO,
            max_loaded: 16,
            openai_only: false,
        }
    }
}

/// A running model of Ollama. Dropping it (or [`UpstreamModel::shutdown`])
/// stops the server and closes its connections.
pub struct UpstreamModel {
    addr: SocketAddr,
    state: Arc<state::State>,
    task: JoinHandle<()>,
}

impl UpstreamModel {
    /// Starts one on `127.0.0.1` with an OS-chosen port, serving in a
    /// background task of the current tokio runtime.
    pub async fn start(cfg: ModelConfig) -> io::Result<UpstreamModel> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(listener, cfg).await
    }

    /// Starts one on an already bound listener.
    pub async fn start_on(listener: TcpListener, cfg: ModelConfig) -> io::Result<UpstreamModel> {
        let addr = listener.local_addr()?;
        let state = Arc::new(state::State::new(cfg));
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(UpstreamModel { addr, state, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ModelConfig {
        &self.state.cfg
    }

    /// A snapshot of the event log, in `seq` order: the last
    /// [`ModelConfig::log_capacity`] events.
    pub fn log(&self) -> Vec<LogEvent> {
        self.state.log_snapshot()
    }

    /// The highest number of requests that held a slot at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.state.stats().max_concurrent
    }

    /// Live counters: max concurrent, active, waiting, slots.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Models loaded now (and loading), as `/api/ps` lists them.
    pub fn loaded_models(&self) -> Vec<String> {
        self.state
            .loaded()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Models loaded since the start (the preloaded ones not counted): how
    /// often a model had to be swapped in.
    pub fn loads(&self) -> u64 {
        self.state.loads()
    }

    /// Clears the log and resets `max_concurrent` to the current `active`.
    /// Sequence and request numbers keep counting.
    pub fn reset(&self) {
        self.state.reset()
    }

    /// Waits until `pred` holds for the log (the events it keeps), or
    /// `timeout` passes; returns whether it held. Wakes on every new event,
    /// so no polling is needed.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[LogEvent]) -> bool) -> bool {
        self.state.wait_until(timeout, pred).await
    }

    /// Waits for an event of `kind` for the request tagged `tag`.
    pub async fn wait_for(
        &self,
        tag: &str,
        kind: EventKind,
        timeout: Duration,
    ) -> Option<LogEvent> {
        let find = |log: &[LogEvent]| {
            log.iter()
                .find(|e| e.kind == kind && e.tag.as_deref() == Some(tag))
                .cloned()
        };
        self.wait_until(timeout, |log| find(log).is_some()).await;
        find(&self.log())
    }

    /// Stops serving and closes every connection (also done on drop).
    pub fn shutdown(self) {}
}

impl Drop for UpstreamModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves forever on `listener` (what the binary runs).
pub async fn serve_forever(listener: TcpListener, cfg: ModelConfig) {
    serve(listener, Arc::new(state::State::new(cfg))).await
}

async fn serve(listener: TcpListener, state: Arc<state::State>) {
    // Connections live in the JoinSet, so aborting this task drops them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let st = state.clone();
                    let notice = state.cfg.disconnect_notice;
                    conns.spawn(async move {
                        let served = AtomicU64::new(0);
                        let svc = service_fn(move |req| {
                            let st = st.clone();
                            let reused = served.fetch_add(1, Ordering::Relaxed) > 0;
                            routes::serve(st, req, reused)
                        });
                        let http = http1::Builder::new();
                        if notice.is_zero() {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        } else {
                            let io = TokioIo::new(late_notice::LateNotice::new(stream, notice));
                            let _ = http.serve_connection(io, svc).await;
                        }
                    });
                }
                // Out of file descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
