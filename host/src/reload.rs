//! Hot reload: building arms off the request path and swapping them in.
//!
//! A reload parses and validates the policy file, compiles each plugin (cached
//! by sha256, so an unchanged plugin costs a hash, not a compile), instantiates
//! it and runs its `init`, all while the old policy keeps serving. Only when
//! every arm is ready does the scheduler swap them in, between two decisions;
//! waiting and running requests stay where they are. Any error leaves the old
//! policy serving; it is logged (file, line, reason), counted in
//! `maitre_reloads_total{result="failed"}`, and shown in `/status` until a
//! later reload succeeds.
//!
//! What a reload changes: the arms (plugins, weights, `[policy.config]`), the
//! `[ab]` table, `tenant_header`, `admin_token` and `[models]`. What it cannot change
//! (`listen`, `admin_listen`, `[upstream]`, `[fleet]`, `[limits]`, `[trace]`: sockets
//! are bound, the scheduler is sized, the trace file is open) keeps its running value, including command-line
//! overrides, and a change to it in the file is logged as needing a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use crate::Host;
use crate::config::{AbMode, ArmConfig, Config, ConfigError, PluginSource};
use crate::escape::Escaped;
use crate::metrics::{Metrics, ReloadLabels, ReloadResult};
use crate::plugin::{Compiled, PluginError, PluginLimits, Runtime};
use crate::proxy::LiveSettings;
use crate::scheduler::{ArmSpec, slot_shares};

mod watch;
mod watched;
mod weight;
pub use watch::{WatchGuard, watch};
pub use weight::WeightError;

/// Quiet time after the last change to a watched file before reloading, so
/// an editor's save (write, rename, chmod) or a file copy is one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Environment variable that supplies the admin token when the policy file has none.
pub const ADMIN_TOKEN_ENV: &str = "MAITRE_ADMIN_TOKEN";

/// Reads a policy file the way `maitre serve` and hot reload both do: the
/// file, then `MAITRE_ADMIN_TOKEN` when the file sets no `admin_token`.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let mut cfg = Config::load(path)?;
    if cfg.admin_token.is_none() {
        cfg.admin_token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
    }
    Ok(cfg)
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The policy file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    /// The new file is valid but cannot be applied without a restart.
    #[error("{file}: {message}")]
    NotLive {
        /// Policy file.
        file: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// How one arm's plugin was obtained in a build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArmBuild {
    /// Arm name.
    pub name: String,
    /// Plugin path or `builtin:NAME`.
    pub plugin: String,
    /// sha256 of the plugin bytes.
    pub sha256: String,
    /// True when the bytes were new and had to be compiled; false when the
    /// compiled plugin came from the cache.
    pub compiled: bool,
    /// Time to read, hash and (if needed) compile the plugin (ms).
    pub compile_ms: f64,
    /// Time to instantiate it and run its `init` (ms).
    pub init_ms: f64,
}

/// What a successful reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// `name=plugin` of each arm now serving.
    pub arms: Vec<String>,
    /// Per arm: sha256, compiled or cached, timings.
    pub builds: Vec<ArmBuild>,
    /// Time to parse, compile and initialise (ms).
    pub build_ms: f64,
    /// Including the swap (ms).
    pub total_ms: f64,
}

/// The last reload attempt, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    /// Unix time of the attempt's end.
    pub at_unix: f64,
    /// What started it: `file` (the watcher) or `admin` (`POST /reload`).
    pub trigger: &'static str,
    /// Whether the new policy serves now.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// What it did, when it worked.
    pub report: Option<ReloadReport>,
}

/// Compiles and initialises arms, with a compile cache keyed by sha256.
pub struct Reloader {
    metrics: Arc<Metrics>,
    cache: Mutex<HashMap<(String, String), Compiled>>,
    serial: Mutex<()>,
    last: std::sync::Mutex<Option<ReloadRecord>>,
    /// The policy file as last read, to tell which restart-only settings the
    /// user changed (the running config carries command-line overrides).
    file_seen: std::sync::Mutex<Option<Config>>,
}

impl Reloader {
    /// A reloader with an empty cache.
    pub fn new(metrics: Arc<Metrics>) -> Reloader {
        Reloader {
            metrics,
            cache: Mutex::new(HashMap::new()),
            serial: Mutex::new(()),
            last: std::sync::Mutex::new(None),
            file_seen: std::sync::Mutex::new(None),
        }
    }

    /// The last reload attempt, if any.
    pub fn last(&self) -> Option<ReloadRecord> {
        self.last.lock().expect("not poisoned").clone()
    }

    /// Returns the compiled plugin and whether it had to be compiled now.
    async fn compile(&self, source: &PluginSource) -> Result<(Compiled, bool), PluginError> {
        let bytes: Vec<u8> = match source {
            PluginSource::Builtin(name) => crate::builtins::bytes(name)
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
        let key = (
            hex::encode(sha2::Sha256::digest(&bytes)),
            source.to_string(),
        );
        if let Some(c) = self.cache.lock().await.get(&key) {
            return Ok((c.clone(), false));
        }
        let src = source.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            Runtime::global().compile_bytes(&bytes, src.to_string())
        })
        .await
        .expect("compile task does not panic")?;
        self.cache.lock().await.insert(key, compiled.clone());
        Ok((compiled, true))
    }

    /// Compiles, instantiates and initialises every arm of `cfg`.
    pub async fn build_arms(&self, cfg: &Config) -> Result<Vec<ArmSpec>, LoadError> {
        Ok(self.build_arms_timed(cfg).await?.0)
    }

    /// [`Reloader::build_arms`] for a scheduler on a paused, virtual clock
    /// (`maitre simulate`; see [`PluginLimits::virtual_time`]).
    pub async fn build_arms_virtual(&self, cfg: &Config) -> Result<Vec<ArmSpec>, LoadError> {
        let mut limits = PluginLimits::of(&cfg.limits);
        limits.virtual_time = true;
        Ok(self.build(cfg, limits).await?.0)
    }

    /// [`Reloader::build_arms`], also saying per arm what it cost.
    pub async fn build_arms_timed(
        &self,
        cfg: &Config,
    ) -> Result<(Vec<ArmSpec>, Vec<ArmBuild>), LoadError> {
        self.build(cfg, PluginLimits::of(&cfg.limits)).await
    }

    async fn build(
        &self,
        cfg: &Config,
        limits: PluginLimits,
    ) -> Result<(Vec<ArmSpec>, Vec<ArmBuild>), LoadError> {
        let weights: Vec<u32> = cfg.arms.iter().map(|a| a.weight).collect();
        let mut shares = match cfg.ab.mode {
            AbMode::Weighted => slot_shares(cfg.total_slots(), &weights, None),
            // In switchback each arm owns every slot during its windows.
            AbMode::Switchback => vec![cfg.total_slots(); cfg.arms.len()],
        };
        // A shadow sees the first serving arm's view, so it is initialised
        // with that arm's share.
        let watched = cfg.arms.iter().position(|a| !a.shadow).unwrap_or(0);
        for (i, a) in cfg.arms.iter().enumerate() {
            if a.shadow {
                shares[i] = shares[watched];
            }
        }
        let mut out = Vec::new();
        let mut builds = Vec::new();
        for (arm, share) in cfg.arms.iter().zip(shares) {
            let err = |error| LoadError::Plugin {
                file: cfg.path.clone(),
                line: arm.line,
                arm: arm.name.clone(),
                error,
            };
            let t = Instant::now();
            let (compiled, fresh) = self.compile(&arm.plugin).await.map_err(err)?;
            let compile_ms = ms(t.elapsed());
            // A weight-0 arm owns no slot yet; check its config against them all.
            let slots = if share == 0 { cfg.total_slots() } else { share };
            let config = init_config(arm, slots);
            let t = Instant::now();
            let instance = Runtime::global()
                .instantiate(&compiled, limits, &config)
                .await
                .map_err(err)?;
            builds.push(ArmBuild {
                name: arm.name.clone(),
                plugin: arm.plugin.to_string(),
                sha256: compiled.sha256().to_string(),
                compiled: fresh,
                compile_ms,
                init_ms: ms(t.elapsed()),
            });
            out.push(ArmSpec {
                name: arm.name.clone(),
                weight: arm.weight,
                decider: Box::new(instance),
                source: arm.plugin.clone(),
                sha256: compiled.sha256().to_string(),
                shadow: arm.shadow,
                interface: compiled.interface(),
            });
        }
        Ok((out, builds))
    }

    /// Reads the policy file as the running config would see it: restart-only
    /// settings keep their running values (with command-line overrides).
    fn read_for_reload(&self, running: &Config) -> Result<Config, LoadError> {
        let file = load_config(&running.path)?;
        let mut cfg = file.clone();
        cfg.listen = running.listen;
        cfg.admin_listen = running.admin_listen;
        cfg.upstreams = running.upstreams.clone();
        cfg.fleet = running.fleet.clone();
        cfg.limits = running.limits.clone();
        cfg.trace = running.trace.clone();
        let previous = self
            .file_seen
            .lock()
            .expect("not poisoned")
            .replace(file.clone());
        let before = previous.as_ref().unwrap_or(running);
        for (what, changed) in [
            ("listen", file.listen != before.listen),
            ("admin_listen", file.admin_listen != before.admin_listen),
            ("[upstream]", file.upstreams != before.upstreams),
            ("[fleet]", file.fleet != before.fleet),
            ("[limits]", file.limits != before.limits),
            ("[trace]", file.trace != before.trace),
        ] {
            if changed {
                tracing::warn!(
                    file = %running.path.display(),
                    "{what} changed in the policy file: restart maitre to apply it; the rest of the file is reloaded"
                );
            }
        }
        if cfg.ab.mode == AbMode::Weighted && cfg.arms.len() as u32 > cfg.total_slots() {
            return Err(LoadError::NotLive {
                file: running.path.clone(),
                message: format!(
                    "{} arms in weighted mode need at least one slot each, but maitre runs with {} slot(s); use [ab] mode = \"switchback\" or fewer arms (changing [upstream] slots needs a restart)",
                    cfg.arms.len(),
                    cfg.total_slots()
                ),
            });
        }
        if let Some(a) = cfg.admin_listen
            && !a.ip().is_loopback()
            && cfg.admin_token.is_none()
        {
            return Err(LoadError::NotLive {
                file: running.path.clone(),
                message: format!(
                    "admin_token was removed, but the admin API listens on {a}, which is not loopback; keep admin_token (or set {ADMIN_TOKEN_ENV}) so the control endpoints stay protected"
                ),
            });
        }
        Ok(cfg)
    }

    /// Reloads the policy file of `host` and swaps the new arms in.
    /// `trigger` says what asked for it (`file` or `admin`), for `/status`.
    pub async fn reload(&self, host: &Host, trigger: &'static str) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.serial.lock().await;
        let t = Instant::now();
        let old = host.config.load_full();
        let result = async {
            let cfg = self.read_for_reload(&old)?;
            let (arms, builds) = self.build_arms_timed(&cfg).await?;
            Ok::<_, LoadError>((cfg, arms, builds))
        }
        .await;
        match result {
            Ok((cfg, arms, builds)) => {
                let build_ms = ms(t.elapsed());
                let names: Vec<String> = arms
                    .iter()
                    .map(|a| format!("{}={}", a.name, a.source))
                    .collect();
                // Keep only what serves now: an old plugin version is not
                // worth its memory once replaced.
                self.cache.lock().await.retain(|(sha, src), _| {
                    builds.iter().any(|b| b.sha256 == *sha && b.plugin == *src)
                });
                let report = ReloadReport {
                    arms: names,
                    builds,
                    build_ms,
                    total_ms: ms(t.elapsed()),
                };
                // The record is in place before the scheduler shows the new
                // arms, so whoever sees them in /status also sees `ok: true`.
                self.set_last(ReloadRecord {
                    at_unix: unix_now(),
                    trigger,
                    ok: true,
                    error: None,
                    report: Some(report.clone()),
                });
                host.sched.install(arms, cfg.ab.clone()).await;
                host.proxy
                    .live
                    .store(Arc::new(LiveSettings::from_config(&cfg)));
                host.config.store(Arc::new(cfg));
                self.count(ReloadResult::Ok);
                let compiled: Vec<&str> = report
                    .builds
                    .iter()
                    .filter(|b| b.compiled)
                    .map(|b| b.name.as_str())
                    .collect();
                tracing::info!(
                    trigger,
                    arms = ?report.arms,
                    compiled = ?compiled,
                    build_ms = report.build_ms,
                    total_ms = report.total_ms,
                    "policy reloaded"
                );
                Ok(report)
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(
                    trigger,
                    file = %old.path.display(),
                    error = %Escaped(&msg),
                    "reload failed; the previous policy keeps serving"
                );
                self.count(ReloadResult::Failed);
                // As above: the record first, then the scheduler's error.
                self.set_last(ReloadRecord {
                    at_unix: unix_now(),
                    trigger,
                    ok: false,
                    error: Some(msg.clone()),
                    report: None,
                });
                host.sched.reload_failed(msg.clone());
                Err(msg)
            }
        }
    }

    fn set_last(&self, record: ReloadRecord) {
        *self.last.lock().expect("not poisoned") = Some(record);
    }

    fn count(&self, result: ReloadResult) {
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }
}

/// The key/value pairs an arm's `init` gets: its `[policy.config]` and what
/// maitre tells every plugin (`maitre.slots`, its share; `maitre.arm`).
fn init_config(arm: &ArmConfig, slots: u32) -> Vec<(String, String)> {
    let mut config = arm.config.clone();
    config.push(("maitre.slots".into(), slots.to_string()));
    config.push(("maitre.arm".into(), arm.name.clone()));
    config
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
