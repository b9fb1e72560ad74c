//! The `maitre` command: `serve`, `check`, `ab` and `simulate`.

mod simulate_cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use maitre::config::{Config, parse_upstream_url};
use maitre::scheduler::AbReport;

// jemalloc rather than the system allocator: every open connection holds two
// 8 KiB hyper buffers that a waiting request never writes to; jemalloc keeps
// no header inside an allocation, so their untouched pages stay out of
// memory (the load_10k bench: 16.2 KiB per waiting request with glibc's
// malloc, ~10 with jemalloc).
#[cfg(unix)]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// jemalloc's options, read once at its start (`_RJEM_MALLOC_CONF` in the
// environment still overrides them). Each connection's first read buffer
// is touched and freed as soon as its request is copied out; with the
// defaults, the thread cache hands that touched page to the next
// connection's untouched buffers. Buffers of a page or more bypass the
// thread cache (`tcache_max:4096`). Freed pages kept for reuse do the same,
// so when many requests wait, maitre also has them returned at once
// (`install_crowding_purge`, below, and maitre::memory_mode).
#[cfg(unix)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 16] = b"tcache_max:4096\0";

/// The dirty-page decay jemalloc started with (its default or the
/// environment's), restored when the queue is no longer crowded.
#[cfg(unix)]
static RELAXED_DECAY_MS: std::sync::OnceLock<isize> = std::sync::OnceLock::new();

/// Has maitre::memory_mode switch jemalloc's dirty-page decay: 0 (freed
/// pages returned at once, so new buffers start untouched: 9.3 -> 4.3 KiB per
/// waiting request in the load_10k bench) while many requests wait, the
/// start value otherwise (returning pages at once costs a TLB flush per
/// return: about a third of the request rate in the throughput bench).
#[cfg(unix)]
fn install_crowding_purge() {
    // SAFETY: `arenas.dirty_decay_ms` is jemalloc's documented ssize_t
    // setting, read with a name that ends in NUL.
    let start: Option<isize> =
        unsafe { tikv_jemalloc_ctl::raw::read(b"arenas.dirty_decay_ms\0") }.ok();
    // Unreadable (not jemalloc after all): crowding changes nothing.
    let Some(start) = start else { return };
    let _ = RELAXED_DECAY_MS.set(start);
    maitre::memory_mode::on_crowding(|crowded| {
        let relaxed = RELAXED_DECAY_MS.get().copied().unwrap_or(10_000);
        set_dirty_decay_ms(if crowded { 0 } else { relaxed });
    });
}

/// Sets the dirty-page decay of every arena and of arenas made later; setting
/// it also purges the unused dirty pages an arena holds.
#[cfg(unix)]
fn set_dirty_decay_ms(ms: isize) {
    // SAFETY: documented jemalloc settings (ssize_t decay times, an unsigned
    // arena count), named with NUL-terminated strings.
    unsafe {
        let _ = tikv_jemalloc_ctl::raw::write(b"arenas.dirty_decay_ms\0", ms);
    }
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
    for i in 0..arenas {
        let name = format!("arena.{i}.dirty_decay_ms\0");
        // An arena not made yet answers an error; it starts with the value above.
        // SAFETY: as above.
        let _ = unsafe { tikv_jemalloc_ctl::raw::write(name.as_bytes(), ms) };
    }
}

#[derive(Parser)]
#[command(
    name = "maitre",
    version,
    about = "A scheduling host in front of Ollama, driven by WebAssembly policy plugins"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// `maitre serve`'s options (the variant's doc comment is its help).
#[derive(clap::Args)]
struct ServeArgs {
    /// Policy file (see examples/policy.toml).
    #[arg(long, short)]
    policy: PathBuf,
    /// Client listener, overriding `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Upstream Ollama URL, overriding `[upstream] url` (a file with several
    /// `[[upstream]]` backends refuses it).
    #[arg(long)]
    upstream: Option<String>,
    /// Admin listener, overriding `admin_listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Start the project's model of Ollama (model "fake") on a free
    /// loopback port and use it as the upstream: see maitre work without
    /// installing Ollama.
    #[arg(long)]
    demo: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Once the plugins are loaded and the listeners bound, write
    /// `{"listen":"ADDR","admin":"ADDR"}` to this file (atomically); it is
    /// removed again on a graceful stop. For supervisors and tests.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve Ollama clients, scheduling their requests with the file's policy.
    Serve(ServeArgs),
    /// Validate a policy file and load its plugins; exits non-zero on any error.
    Check {
        /// Policy file.
        file: PathBuf,
    },
    /// Print the A/B comparison of the arms of a running maitre.
    Ab {
        /// Admin URL of the running maitre.
        #[arg(long, default_value = "http://127.0.0.1:11436")]
        admin: String,
        /// Window to compare, in seconds.
        #[arg(long, default_value_t = 600.0)]
        window: f64,
    },
    /// Replay a trace (or a generated one) through policy files in virtual
    /// time, with the same scheduler and plugins as `serve`, and compare
    /// them like `maitre ab`.
    Simulate(simulate_cli::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(unix)]
    install_crowding_purge();
    let cli = match cli.cmd {
        // Runs its own runtimes, each on a virtual clock.
        Cmd::Simulate(args) => {
            init_quiet_logs();
            return exit(simulate_cli::run(args));
        }
        cmd => cmd,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async move {
        match cli {
            Cmd::Serve(args) => serve(args).await,
            Cmd::Check { file } => check(file).await,
            Cmd::Ab { admin, window } => ab(&admin, window).await,
            Cmd::Simulate(_) => unreachable!("run without a runtime above"),
        }
    });
    exit(r)
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maitre: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Warnings and errors only (a plugin ejected during a simulation), unless
/// `MAITRE_LOG` says otherwise.
fn init_quiet_logs() {
    let spec = std::env::var("MAITRE_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&spec)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn init_logs(json: bool) {
    let spec = std::env::var("MAITRE_LOG").unwrap_or_else(|_| "info".into());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // notify warns about its own bookkeeping when a watched folder is deleted
    // (a ConfigMap update deletes one every time); maitre logs what matters.
    if !spec.contains("notify") {
        filter = filter.add_directive("notify=error".parse().expect("a valid directive"));
    }
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// The policy file plus `MAITRE_ADMIN_TOKEN`, exactly as hot reload reads it.
fn load(policy: &std::path::Path) -> anyhow::Result<Config> {
    Ok(maitre::reload::load_config(policy)?)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        policy,
        listen,
        upstream,
        admin_listen,
        demo,
        log_json,
        ready_file,
    } = args;
    init_logs(log_json);
    // A file left by an earlier run must not announce this one early.
    if let Some(path) = &ready_file {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                anyhow::bail!("cannot remove the old ready file {}: {e}", path.display())
            }
            _ => {}
        }
    }
    let mut cfg = load(&policy)?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(a) = admin_listen {
        cfg.admin_listen = Some(a);
    }
    if let Some(u) = upstream {
        let url = parse_upstream_url(&u).map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
        cfg.override_upstream(url)
            .map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
    }
    let mut _fakes = Vec::new();
    if demo {
        // One model of Ollama per backend. No control routes and no event
        // log: the demo shows Ollama's surface only, and its memory stays
        // flat however long it runs.
        for up in &mut cfg.upstreams {
            let model = upstream_model::ModelConfig::demo(up.slots as usize);
            let fake = upstream_model::UpstreamModel::start(model)
                .await
                .context("starting the demo upstream")?;
            tracing::info!(backend = %up.name, upstream = %fake.url(), "demo: serving the project's model of Ollama (model \"fake\") as the upstream");
            up.url = parse_upstream_url(&fake.url()).map_err(|e| anyhow::anyhow!(e))?;
            _fakes.push(fake);
        }
    }
    if let Some(a) = cfg.admin_listen
        && !a.ip().is_loopback()
        && cfg.admin_token.is_none()
    {
        anyhow::bail!(
            "admin_listen = {a} is not a loopback address: set admin_token in {} or MAITRE_ADMIN_TOKEN so the control endpoints are protected",
            policy.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (listen)", cfg.listen))?;
    let admin = match cfg.admin_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (admin_listen)"))?,
        ),
        None => None,
    };
    maitre::serve(
        cfg,
        listener,
        admin,
        ready_file.as_deref(),
        maitre::shutdown_signal(),
    )
    .await?;
    if let Some(path) = &ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

async fn check(file: PathBuf) -> anyhow::Result<()> {
    let cfg = load(&file)?;
    let metrics = std::sync::Arc::new(maitre::metrics::Metrics::new());
    let reloader = maitre::reload::Reloader::new(metrics);
    let arms = reloader.build_arms(&cfg).await?;
    println!("{}: ok", file.display());
    println!(
        "  listen {}  {} backend(s), {} slots in all",
        cfg.listen,
        cfg.upstreams.len(),
        cfg.total_slots()
    );
    match &cfg.trace {
        Some(t) => println!(
            "  trace {} (rotated at {} bytes, {} old files kept; no prompts or bodies)",
            t.path.display(),
            t.rotate_bytes,
            t.keep
        ),
        None => println!("  trace off"),
    }
    for u in &cfg.upstreams {
        println!(
            "  backend {:<16} {}  kind {}  slots {}  max_loaded_models {}{}",
            u.name,
            u.url,
            u.kind.name(),
            u.slots,
            u.max_loaded_models,
            match u.pass_priority {
                Some(_) => "  pass_priority vllm (real-time 0, batch 1)",
                None => "",
            }
        );
    }
    for (model, rule) in cfg.models.iter() {
        let num_ctx = rule.num_ctx.map(|n| n.to_string());
        println!(
            "  model {model}: num_ctx {}  keep_alive {}{}",
            num_ctx.as_deref().unwrap_or("(as asked)"),
            rule.keep_alive.as_deref().unwrap_or("(as asked)"),
            if rule.resume_preempted {
                "  resume_preempted"
            } else {
                ""
            }
        );
    }
    for (a, spec) in cfg.arms.iter().zip(&arms) {
        let role = if a.shadow {
            "shadow      ".to_string()
        } else {
            format!("weight {:<5}", a.weight)
        };
        println!(
            "  arm {:<20} {role} plugin {} ({}, sha256 {})",
            a.name,
            a.plugin,
            spec.interface,
            &spec.sha256[..12]
        );
    }
    Ok(())
}

async fn ab(admin: &str, window: f64) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty};
    let uri: http::Uri = format!("{}/ab?window={window}", admin.trim_end_matches('/'))
        .parse()
        .context("--admin must be a URL like http://127.0.0.1:11436")?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let resp = client
        .get(uri.clone())
        .await
        .with_context(|| format!("cannot reach the admin API at {uri}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "{uri} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let report: AbReport = serde_json::from_slice(&body).context("unexpected /ab answer")?;
    print!("{}", maitre::ab_table::format_ab(&report));
    Ok(())
}
