//! maitre: a scheduling host in front of Ollama whose decisions come from
//! WebAssembly policy plugins.
//!
//! Data flows one way: [`proxy`] → [`scheduler`] → [`plugin`] → [`scheduler`] →
//! [`proxy`]. [`config`] reads the policy file, [`builtins`] holds the plugins
//! compiled into the binary, [`reload`] swaps policies while
//! traffic flows, [`admin`] and [`metrics`] let operators watch and steer.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod ab_table;
pub mod admin;
pub mod builtins;
pub mod config;
pub mod conns;
pub mod escape;
pub mod fleet;
pub mod memory_mode;
pub mod metrics;
pub mod plugin;
pub mod policy;
pub mod proxy;
pub mod ready;
pub mod reload;
pub mod request;
pub mod scheduler;
pub mod simulate;
pub mod trace;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::scheduler::SchedulerHandle;

/// How long running requests may finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The host's shared parts, as the admin API and hot reload see them.
pub struct Host {
    /// The validated config currently in force.
    pub config: arc_swap::ArcSwap<Config>,
    /// The scheduler task.
    pub sched: SchedulerHandle,
    /// The proxy.
    pub proxy: Arc<Proxy>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Reloads the policy from its file.
    pub reloader: reload::Reloader,
}

/// Runs maitre until `shutdown` resolves: client listener, admin listener,
/// scheduler and file watcher. Listeners are passed in so tests can bind port 0.
/// With `ready_file`, writes the bound addresses there ([`ready`]) once the
/// plugins are loaded and both listeners are bound.
pub async fn serve(
    cfg: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    ready_file: Option<&Path>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let reloader = reload::Reloader::new(metrics.clone());
    let arms = reloader.build_arms(&cfg).await?;
    let trace = cfg
        .trace
        .as_ref()
        .map(|t| trace::TraceSink::start(t, metrics.trace_dropped.clone()))
        .transpose()?;
    let sched = scheduler::spawn(
        scheduler::Setup {
            arms,
            ab: cfg.ab.clone(),
            backends: cfg
                .upstreams
                .iter()
                .map(fleet::BackendSpec::from_config)
                .collect(),
            max_failovers: cfg.fleet.max_failovers,
            limits: cfg.limits.clone(),
            trace,
        },
        metrics.clone(),
    );
    let proxy = Arc::new(Proxy::new(&cfg, sched.clone(), metrics.clone()));
    let host = Arc::new(Host {
        config: arc_swap::ArcSwap::from_pointee(cfg.clone()),
        sched: sched.clone(),
        proxy: proxy.clone(),
        metrics,
        reloader,
    });
    let _watcher = reload::watch(host.clone())?;

    let stop = CancellationToken::new();
    fleet::watch::spawn(proxy.clone(), sched.clone(), &cfg.fleet, stop.clone());
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, host.clone(), stop.clone())));
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        backends = ?cfg.upstreams.iter().map(|u| format!("{}={} ({} slots)", u.name, u.url, u.slots)).collect::<Vec<_>>(),
        slots = cfg.total_slots(),
        arms = ?cfg.arms.iter().map(|a| format!("{}={}", a.name, a.plugin)).collect::<Vec<_>>(),
        "maitre serving; point Ollama clients at OLLAMA_HOST={local}"
    );
    if let Some(path) = ready_file {
        let ready = ready::Ready {
            listen: local,
            admin: admin_addr,
        };
        ready::write(path, &ready)
            .map_err(|e| anyhow::anyhow!("cannot write the ready file {}: {e}", path.display()))?;
    }

    let header_timeout = Duration::from_secs(cfg.limits.header_read_timeout_seconds);
    let (max_connections, lowered_by) =
        conns::fit_to_fd_limit(cfg.limits.max_connections, cfg.total_slots());
    if let Some(nofile) = lowered_by {
        tracing::warn!(
            max_connections,
            configured = cfg.limits.max_connections,
            open_file_limit = nofile,
            "limits.max_connections lowered to fit the open-file limit; raise `ulimit -n` to allow more"
        );
    }
    let cap = conns::ConnectionCap::new(max_connections, host.metrics.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: new clients wait in the listen queue.
        let open = tokio::select! {
            o = cap.admit() => o,
            _ = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = {
            let proxy = proxy.clone();
            service_fn(move |req| proxy.clone().handle(req, remote))
        };
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            // A client that never finishes its headers cannot hold a socket forever.
            .header_read_timeout(header_timeout)
            .max_buf_size(1 << 20)
            .serve_connection(TokioIo::new(stream), svc);
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = watched.await;
            drop(open);
        });
    }

    // Stop accepting; waiting requests and new ones on open connections get
    // 503 + Retry-After; running ones may finish within the grace period.
    drop(listener);
    tracing::info!(
        "shutting down: answering waiting requests with 503, letting running ones finish"
    );
    sched.shutdown().await;
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    stop.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
