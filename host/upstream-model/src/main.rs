//! `upstream-model`: the model of an Ollama server as a process, for
//! benchmarks, tests that drive real processes, and trying a client
//! against it by hand.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use upstream_model::ModelConfig;

/// A model of an Ollama server: slots, a FIFO queue, prompt and per-token
/// time, streaming, Ollama's errors and Host check. Serves until killed.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the real one is printed).
    #[arg(long, default_value = "127.0.0.1:11434")]
    listen: SocketAddr,
    /// Requests generating at once (OLLAMA_NUM_PARALLEL).
    #[arg(long, default_value_t = 2)]
    slots: usize,
    /// Milliseconds per generated token.
    #[arg(long, default_value_t = 20)]
    token_ms: u64,
    /// Milliseconds of prompt processing before the first token.
    #[arg(long, default_value_t = 0)]
    prompt_ms: u64,
    /// More milliseconds of prompt processing per prompt word (fractions
    /// allowed: 0.5).
    #[arg(long, default_value_t = 0.0)]
    prompt_token_ms: f64,
    /// Tokens per answer when the request sets no limit.
    #[arg(long, default_value_t = 5)]
    tokens: u64,
    /// Accept any Host header (Ollama bound to a non-loopback address).
    #[arg(long)]
    no_host_check: bool,
    /// Answer 404 on /_fake/log, /_fake/stats, /_fake/reset and /_fake/echo,
    /// like Ollama.
    #[arg(long)]
    no_control_routes: bool,
    /// Events the log behind /_fake/log keeps (the most recent); 0 = no log.
    #[arg(long, default_value_t = upstream_model::DEFAULT_LOG_CAPACITY)]
    log_capacity: usize,
    /// Like llama-server: a non-streaming generation whose client goes away
    /// runs on to its end, holding its slot (streaming ones still stop).
    #[arg(long)]
    ignore_disconnect_non_streaming: bool,
    /// Milliseconds the model takes to notice that a client went away; the
    /// generation goes on meanwhile (llama-server: tens of ms).
    #[arg(long, default_value_t = 0)]
    disconnect_notice_ms: u64,
    /// Milliseconds a cancelled generation keeps its slot after its
    /// connection closed (llama-server frees it on its next loop turn).
    #[arg(long, default_value_t = 0)]
    release_lag_ms: u64,
    /// Models on disk, as /api/tags lists them (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "fake")]
    models: Vec<String>,
    /// Models loaded from the start (comma-separated).
    #[arg(long, value_delimiter = ',')]
    preload: Vec<String>,
    /// Milliseconds to load a model that is not loaded (one load at a time).
    #[arg(long, default_value_t = 0)]
    load_ms: u64,
    /// Models loaded at once (OLLAMA_MAX_LOADED_MODELS); the least recently
    /// used one is evicted.
    #[arg(long, default_value_t = 16)]
    max_loaded: usize,
    /// What to be: `ollama`, or `openai`, an OpenAI-compatible server like
    /// llama-server or vLLM (/v1/*, GET /health and /v1/models; 404 on
    /// /api/*).
    #[arg(long, value_enum, default_value_t = Kind::Ollama)]
    kind: Kind,
}

/// The server the model plays.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Ollama.
    Ollama,
    /// An OpenAI-compatible server (llama-server, vLLM).
    Openai,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = ModelConfig {
        slots: args.slots,
        token_delay: Duration::from_millis(args.token_ms),
        prompt_delay: Duration::from_millis(args.prompt_ms),
        prompt_token_delay: Duration::from_secs_f64(args.prompt_token_ms.max(0.0) / 1000.0),
        default_tokens: args.tokens,
        check_host: !args.no_host_check,
        control_routes: !args.no_control_routes,
        log_capacity: args.log_capacity,
        ignore_disconnect_non_streaming: args.ignore_disconnect_non_streaming,
        disconnect_notice: Duration::from_millis(args.disconnect_notice_ms),
        release_lag: Duration::from_millis(args.release_lag_ms),
        models: args.models,
        preloaded: args.preload,
        load_time: Duration::from_millis(args.load_ms),
        max_loaded: args.max_loaded,
        openai_only: args.kind == Kind::Openai,
        ..ModelConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "upstream-model listening on http://{addr}")?;
    out.flush()?;
    drop(out);
    tokio::select! {
        _ = upstream_model::serve_forever(listener, cfg) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
