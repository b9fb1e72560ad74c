//! Hot reload: building arms off the request path and swapping them in.
//!
//! A reload parses and validates the policy file, compiles each plugin (cached
//! by sha256, so an unchanged plugin costs a hash, not a compile), instantiates
//! it and runs its `init`, all while the old policy keeps serving. Only when
//! every arm is ready does the scheduler swap them in, between two decisions.
//! Any error leaves the old policy serving; it is logged, counted, and shown in
//! `/status` until a later reload succeeds.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::RecursiveMode;
use tokio::sync::Mutex;

use crate::Host;
use crate::config::{AbMode, Config, PluginSource};
use crate::metrics::{Metrics, ReloadLabels, ReloadResult};
use crate::plugin::{Compiled, PluginError, PluginLimits, Runtime};
use crate::proxy::LiveSettings;
use crate::scheduler::{ArmSpec, slot_shares};

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The policy file is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// One arm's plugin failed to load.
    #[error("{file}:{line}: policy {arm:?}: {error}")]
    Plugin {
        /// Policy file.
        file: PathBuf,
        /// Line of the `[[policy]]`.
        line: usize,
        /// Arm name.
        arm: String,
        /// What went wrong.
        error: PluginError,
    },
}

/// Compiles and initialises arms, with a compile cache keyed by sha256.
pub struct Reloader {
    metrics: Arc<Metrics>,
    cache: Mutex<HashMap<String, Compiled>>,
    serial: Mutex<()>,
}

impl Reloader {
    /// A reloader with an empty cache.
    pub fn new(metrics: Arc<Metrics>) -> Reloader {
        Reloader {
            metrics,
            cache: Mutex::new(HashMap::new()),
            serial: Mutex::new(()),
        }
    }

    async fn compile(&self, source: &PluginSource) -> Result<Compiled, PluginError> {
        let bytes: Vec<u8> = match source {
            PluginSource::Builtin(name) => crate::plugin::builtin_bytes(name)
                .ok_or_else(|| PluginError::Compile {
                    source_name: source.to_string(),
                    reason: "no such built-in plugin".into(),
                })?
                .to_vec(),
            PluginSource::File(p) => tokio::fs::read(p).await.map_err(|e| PluginError::Read {
                path: p.clone(),
                error: e,
            })?,
        };
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        if let Some(c) = self.cache.lock().await.get(&sha) {
            if c.source() == source {
                return Ok(c.clone());
            }
        }
        let src = source.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            Runtime::global().compile_bytes(&bytes, src.clone(), src.to_string())
        })
        .await
        .expect("compile task does not panic")?;
        self.cache.lock().await.insert(sha, compiled.clone());
        Ok(compiled)
    }

    /// Compiles, instantiates and initialises every arm of `cfg`.
    pub async fn build_arms(&self, cfg: &Config) -> Result<Vec<ArmSpec>, LoadError> {
        let weights: Vec<u32> = cfg.arms.iter().map(|a| a.weight).collect();
        let shares = match cfg.ab.mode {
            AbMode::Weighted => slot_shares(cfg.upstream.slots, &weights, None),
            // In switchback each arm owns every slot during its windows.
            AbMode::Switchback => vec![cfg.upstream.slots; cfg.arms.len()],
        };
        let limits = PluginLimits {
            call_budget: cfg.limits.plugin_call_ms,
            memory_bytes: cfg.limits.plugin_memory_mib << 20,
        };
        let mut out = Vec::new();
        for (arm, share) in cfg.arms.iter().zip(shares) {
            let err = |error| LoadError::Plugin {
                file: cfg.path.clone(),
                line: arm.line,
                arm: arm.name.clone(),
                error,
            };
            let compiled = self.compile(&arm.plugin).await.map_err(err)?;
            let mut config = arm.config.clone();
            // A weight-0 arm owns no slot yet; check its config against them all.
            let slots = if share == 0 {
                cfg.upstream.slots
            } else {
                share
            };
            config.push(("maitre.slots".into(), slots.to_string()));
            config.push(("maitre.arm".into(), arm.name.clone()));
            let instance = Runtime::global()
                .instantiate(&compiled, limits, &config)
                .await
                .map_err(err)?;
            out.push(ArmSpec {
                name: arm.name.clone(),
                weight: arm.weight,
                instance,
                source: arm.plugin.clone(),
                sha256: compiled.sha256().to_string(),
            });
        }
        Ok(out)
    }

    /// Reloads the policy file of `host` and swaps the new arms in.
    pub async fn reload(&self, host: &Host) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.serial.lock().await;
        let t = Instant::now();
        let old = host.config.load_full();
        let result = async {
            let cfg = Config::load(&old.path)?;
            let arms = self.build_arms(&cfg).await?;
            Ok::<_, LoadError>((cfg, arms))
        }
        .await;
        match result {
            Ok((cfg, arms)) => {
                let build = t.elapsed();
                for (what, changed) in [
                    ("listen", cfg.listen != old.listen),
                    ("admin_listen", cfg.admin_listen != old.admin_listen),
                    ("[upstream]", cfg.upstream != old.upstream),
                    ("[limits]", cfg.limits != old.limits),
                ] {
                    if changed {
                        tracing::warn!(
                            "{what} changed in {}: restart maitre to apply it",
                            cfg.path.display()
                        );
                    }
                }
                let names: Vec<String> = arms
                    .iter()
                    .map(|a| format!("{}={}", a.name, a.source))
                    .collect();
                host.sched.install(arms, cfg.ab.clone()).await;
                host.proxy
                    .live
                    .store(Arc::new(LiveSettings::from_config(&cfg)));
                host.config.store(Arc::new(cfg));
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels {
                        result: ReloadResult::Ok,
                    })
                    .inc();
                let report = ReloadReport {
                    arms: names,
                    build_ms: build.as_secs_f64() * 1000.0,
                    total_ms: t.elapsed().as_secs_f64() * 1000.0,
                };
                tracing::info!(arms = ?report.arms, build_ms = report.build_ms, total_ms = report.total_ms, "policy reloaded");
                Ok(report)
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "reload failed; the previous policy keeps serving");
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels {
                        result: ReloadResult::Failed,
                    })
                    .inc();
                host.sched.reload_failed(msg.clone());
                Err(msg)
            }
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// `name=plugin` of each arm now serving.
    pub arms: Vec<String>,
    /// Time to parse, compile and initialise (ms).
    pub build_ms: f64,
    /// Including the swap (ms).
    pub total_ms: f64,
}

/// Files a config depends on: the policy file and every plugin file.
fn watched_files(cfg: &Config) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    files.insert(absolute(&cfg.path));
    for a in &cfg.arms {
        if let PluginSource::File(p) = &a.plugin {
            files.insert(absolute(p));
        }
    }
    files
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A running file watcher; dropping it stops watching.
pub struct WatchGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches the policy file and its plugin files; a change (debounced, so an
/// editor's save is one event) triggers a reload.
pub fn watch(host: Arc<Host>) -> anyhow::Result<WatchGuard> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = notify_debouncer_mini::new_debouncer(
        Duration::from_millis(150),
        move |res: notify_debouncer_mini::DebounceEventResult| {
            if let Ok(events) = res {
                let _ = tx.send(events.into_iter().map(|e| e.path).collect());
            }
        },
    )?;
    // Watch folders, not files: editors save by writing a new file and
    // renaming it over the old one, which a watch on the old inode misses.
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut sync_dirs = move |debouncer: &mut notify_debouncer_mini::Debouncer<
        notify::RecommendedWatcher,
    >,
                              files: &BTreeSet<PathBuf>| {
        for f in files {
            if let Some(d) = f.parent() {
                if d.exists() && dirs.insert(d.to_path_buf()) {
                    if let Err(e) = debouncer.watcher().watch(d, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch folder for hot reload");
                        dirs.remove(d);
                    }
                }
            }
        }
    };
    let mut files = watched_files(&host.config.load());
    sync_dirs(&mut debouncer, &files);
    let task = tokio::spawn(async move {
        while let Some(paths) = rx.recv().await {
            if !paths.iter().any(|p| files.contains(&absolute(p))) {
                continue;
            }
            tracing::info!(changed = ?paths, "policy or plugin file changed; reloading");
            let _ = host.reloader.reload(&host).await;
            files = watched_files(&host.config.load());
            sync_dirs(&mut debouncer, &files);
        }
    });
    Ok(WatchGuard { task })
}
