//! `maitre simulate`: replays a trace's arrivals through policy files in
//! virtual time, and says how each would have served them.
//!
//! One state machine, not a model of it: each policy file's arms are built
//! by the same [`Reloader`] `serve` uses (the same plugins, configs and
//! sandbox), and decide inside the same scheduler task
//! ([`crate::scheduler`]), driven through the same calls the proxy makes.
//! Only the clock (tokio's, paused: time jumps to the next event) and the
//! upstream (the upstream model's slots and timing, in-process) are
//! simulated. The same inputs give the same output: every random draw is
//! seeded, and nothing reads the wall clock.
//!
//! - `workload`: a trace's lines to [`workload::Job`]s, with the upstream
//!   timing measured per model;
//! - `replay`: one policy file's run;
//! - `upstream`: the simulated upstream;
//! - [`synthetic`]: a generated trace (`--synthetic`);
//! - [`rng`]: the seeded random numbers.

pub mod rng;
pub mod synthetic;
pub mod workload;

mod replay;
mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::ab_table::format_rows;
use crate::config::{AbMode, Config, ConfigError};
use crate::metrics::Metrics;
use crate::reload::{LoadError, Reloader};
use crate::scheduler::{AbReport, AbRow};
use crate::trace::{TraceError, TraceRecord, arrival_offsets};
use workload::{Job, ModelTiming, TimingFlags};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A policy file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A policy's plugin did not load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The trace could not be read.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The runtime could not start.
    #[error("cannot start the simulator's runtime: {0}")]
    Runtime(std::io::Error),
    /// The scheduler ended before it reported (a bug).
    #[error("the scheduler stopped before it reported")]
    SchedulerStopped,
    /// The options do not fit a policy file.
    #[error("{0}")]
    Options(String),
}

/// How to simulate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Upstream slots instead of each policy file's `[upstream] slots`.
    pub slots: Option<u32>,
    /// Upstream timing instead of the trace's measurements.
    pub timing: TimingFlags,
    /// Seed of the draws (timings and lengths a request's line does not
    /// show).
    pub seed: u64,
}

/// One policy file's result.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    /// The file, as given.
    pub policy: PathBuf,
    /// Its name in the table (the file's stem).
    pub name: String,
    /// Upstream slots it ran with.
    pub slots: u32,
    /// Virtual time from the first arrival to the last end (s).
    pub simulated_seconds: f64,
    /// The most upstream slots held at once.
    pub upstream_max_active: usize,
    /// What `GET /ab` would have reported over the whole run.
    pub report: AbReport,
}

/// What `maitre simulate` prints (`--json` gives it as it is).
#[derive(Debug, Clone, Serialize)]
pub struct Simulation {
    /// Requests replayed.
    pub requests: usize,
    /// Time from the trace's first arrival to its last (s).
    pub trace_seconds: f64,
    /// The upstream timing per model, as measured and used.
    pub models: Vec<ModelTiming>,
    /// maitre's own time to start a request, measured from the trace and
    /// added to every start (ms; see [`workload::dispatch_ms`]).
    pub dispatch_ms: f64,
    /// One result per policy file, in the order given.
    pub policies: Vec<PolicyRun>,
}

/// Replays `records` through each policy file.
pub fn simulate(
    records: Vec<TraceRecord>,
    policies: &[PathBuf],
    opts: &Options,
) -> Result<Simulation, SimError> {
    let ordered = arrival_offsets(records);
    let trace_seconds = ordered.last().map(|x| x.0).unwrap_or(0.0) / 1000.0;
    let (mut jobs, models) = workload::jobs(&ordered, opts.timing, opts.seed);
    let dispatch_ms = workload::dispatch_ms(&ordered);
    let dispatch = std::time::Duration::from_secs_f64(dispatch_ms / 1000.0);
    for j in &mut jobs {
        j.timing.prompt += dispatch;
    }
    let jobs: Arc<[Job]> = jobs.into();
    let reloader = Reloader::new(Arc::new(Metrics::new()));
    let mut runs = Vec::new();
    for path in policies {
        let cfg = policy_config(path, opts)?;
        let r = replay::replay(&cfg, &jobs, &reloader)?;
        runs.push(PolicyRun {
            policy: path.clone(),
            name: name_of(path, policies),
            slots: cfg.total_slots(),
            simulated_seconds: r.span.as_secs_f64(),
            upstream_max_active: r.upstream_max_active,
            report: r.report,
        });
    }
    Ok(Simulation {
        requests: jobs.len(),
        trace_seconds,
        models,
        dispatch_ms,
        policies: runs,
    })
}

/// A policy file as `serve` reads it, with `--slots` applied.
fn policy_config(path: &Path, opts: &Options) -> Result<Config, SimError> {
    let mut cfg = Config::load(path)?;
    if let Some(slots) = opts.slots {
        if slots == 0 {
            return Err(SimError::Options("--slots must be at least 1".into()));
        }
        if cfg.ab.mode == AbMode::Weighted && (cfg.arms.len() as u32) > slots {
            return Err(SimError::Options(format!(
                "{}: {} arms in weighted mode need at least one slot each, but --slots is {slots}",
                path.display(),
                cfg.arms.len()
            )));
        }
        // The fleet becomes one backend of `slots` slots.
        cfg.upstreams.truncate(1);
        cfg.upstreams[0].slots = slots;
    }
    Ok(cfg)
}

/// A policy's name in the table: its file's stem, or its path when two
/// files share a stem.
fn name_of(path: &Path, all: &[PathBuf]) -> String {
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let s = stem(path);
    if all.iter().filter(|p| stem(p) == s).count() > 1 {
        path.display().to_string()
    } else {
        s
    }
}

impl Simulation {
    /// The text `maitre simulate` prints: what was replayed, then the A/B
    /// table with one row per policy (and arm, when a file has several) and
    /// class.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "Simulated {} requests ({:.1} s of arrivals) through {} policy file(s), in virtual time\n",
            self.requests,
            self.trace_seconds,
            self.policies.len()
        );
        for m in &self.models {
            out.push_str(&format!(
                "  model {:?}: {} requests, {} with their own measured timing; used: prompt p50 {:.1} ms, per token p50 {:.2} ms, length p50 {:.0} tokens\n",
                m.model, m.requests, m.measured, m.prompt_ms_p50, m.token_ms_p50, m.tokens_p50
            ));
        }
        out.push_str(&format!(
            "  maitre's own time to start a request: {:.2} ms (measured, added to every start)\n",
            self.dispatch_ms
        ));
        for p in &self.policies {
            out.push_str(&format!(
                "  policy {} ({}): {} slot(s), last request ended after {:.1} s\n",
                p.name,
                p.policy.display(),
                p.slots,
                p.simulated_seconds
            ));
        }
        let rows: Vec<(String, &AbRow)> = self
            .policies
            .iter()
            .flat_map(|p| {
                let several = p.report.rows.iter().any(|r| r.arm != p.report.rows[0].arm);
                p.report.rows.iter().map(move |r| {
                    let label = if several {
                        format!("{}/{}", p.name, r.arm)
                    } else {
                        p.name.clone()
                    };
                    (label, r)
                })
            })
            .collect();
        out.push('\n');
        out.push_str(&format_rows("policy", &rows));
        out
    }
}

#[cfg(test)]
mod tests;
