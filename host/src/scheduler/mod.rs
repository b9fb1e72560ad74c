//! The scheduler: the host's single source of truth about requests and slots.
//!
//! One task owns every waiting and running request, the upstream slots and the
//! policy arms; everything else talks to it through messages, so there are no
//! locks around the queue and every decision sees a consistent state. Each
//! request is represented outside the scheduler by a [`Ticket`]: the proxy
//! holds it while the request waits and streams, and dropping it (the client
//! went away) tells the scheduler at once, which frees the slot and asks the
//! policy for the next start in the same turn.
//!
//! Each arm's decisions come from its [`Decider`] (a plugin instance). A
//! plugin that traps, overruns its budget or memory, answers with nonsense
//! (see [`check`]; nothing of such an answer is applied), or lets every slot
//! idle while requests wait is ejected on that first fault: logged, counted
//! in `maitre_plugin_faults`, and the arm is served by the built-in FIFO
//! ([`Fifo`]) until a plugin is loaded again (a reload). A request whose
//! `admit` faulted is admitted by the FIFO, so a fault never costs a request.
//!
//! Where to look:
//! - [`ticket`]: a request's side (meta, ticket, grant, dispatch phases);
//! - `core`: the task, its message loop, admission and the decide turn;
//! - `dispatch`: the start / requeue / pre-empt / handoff state machine;
//! - `backends`: the scheduler's side of the fleet (what a policy is shown,
//!   where a start goes, backend health, fail-over);
//! - [`arms`]: installing arms, slot shares, switchback, A/B key hashing;
//! - [`check`]: the answer check and its typed [`Invalid`] kinds;
//! - [`decider`]: the seam between the state machine and a policy;
//! - [`letgo`]: when an abandoned upstream connection is closed at both ends;
//! - [`report`]: `/status` and the A/B report;
//! - [`compare`]: whether an A/B difference is real (bootstrap intervals);
//! - [`shadow`]: shadow arms, which watch the serving arm and never act.
//!
//! Time is tokio's clock ([`tokio::time::Instant`]), so the state machine
//! runs unchanged under a paused (virtual) clock in tests.

pub mod arms;
mod backends;
pub mod check;
pub mod compare;
mod core;
pub mod decider;
mod dispatch;
pub mod letgo;
mod names;
pub mod queue;
pub mod report;
pub mod shadow;
pub mod ticket;
mod view;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fleet;
#[cfg(test)]
mod tests_fleet_plugins;
#[cfg(test)]
mod tests_load;
#[cfg(test)]
mod tests_shadow;
#[cfg(test)]
mod tests_trace;
#[cfg(test)]
mod tests_window;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use arms::{ArmSpec, ab_key_hash, slot_shares};
pub use check::Invalid;
pub use decider::{Decider, Fifo};
pub use letgo::{LET_GO_TIMEOUT, LetGo};
pub use report::{AbReport, AbRow, ArmStatus, RequestStatus, Status, percentile};
pub use ticket::{Grant, Outcome, RequestMeta, Run, SubmitError, Ticket};

use ticket::Signal;

use crate::config::{AbConfig, Limits};
use crate::fleet::{BackendSpec, Health, PsModel};
use crate::metrics::Metrics;

/// A message to the scheduler task.
pub(crate) enum Msg {
    Submit {
        meta: RequestMeta,
        reply: oneshot::Sender<Result<Ticket, SubmitError>>,
    },
    Gone {
        id: u64,
    },
    Finished {
        id: u64,
        outcome: Outcome,
    },
    Requeue {
        id: u64,
        why: Requeued,
        /// Where the next go-ahead goes.
        signal: oneshot::Sender<Signal>,
        /// Tokens the upstream had generated for the aborted dispatch, when
        /// the caller knows (the simulator does; the proxy cannot see them).
        lost_tokens: u64,
        /// Of the tokens counted as thrown away, those kept: the request
        /// resumes its answer so far (`resume_preempted`).
        kept_tokens: u64,
    },
    /// The upstream connection of a cut stream is let go: its slot is free.
    LetGo {
        id: u64,
    },
    Failover {
        id: u64,
        backend: usize,
        reply: oneshot::Sender<bool>,
        /// Where the next go-ahead goes, if the request goes back in line.
        signal: oneshot::Sender<Signal>,
    },
    Health {
        backend: usize,
        up: bool,
        version: Option<String>,
    },
    Residency {
        backend: usize,
        sent_at: tokio::time::Instant,
        models: Vec<PsModel>,
    },
    Models {
        backend: usize,
        models: Vec<String>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Install {
        arms: Vec<ArmSpec>,
        ab: AbConfig,
        reply: oneshot::Sender<()>,
    },
    ReloadFailed {
        error: String,
    },
    SetWeight {
        arm: String,
        weight: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Report {
        window: Duration,
        reply: oneshot::Sender<(AbReport, compare::Inputs)>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Why a dispatched request went back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requeued {
    /// A policy pre-empted it before anything reached its client.
    Preempted,
    /// The upstream answered 503 (its own queue is full).
    Busy,
    /// The upstream connection failed before anything reached the client.
    Lost,
}

/// Cheap, cloneable handle to the scheduler task.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Msg>,
    waiting: Arc<AtomicUsize>,
    health: Arc<Health>,
}

impl SchedulerHandle {
    /// Requests waiting now, over all arms, as the scheduler last counted
    /// them (after each admission and each turn). Lets the proxy refuse a
    /// request for a full queue before it reads the body; the exact check
    /// is still made when the request is submitted.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Which backends answer (kept by the scheduler, read lock-free).
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Asks for a place in the queue.
    pub async fn submit(&self, meta: RequestMeta) -> Result<Ticket, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Submit { meta, reply })
            .map_err(|_| SubmitError::ShuttingDown)?;
        rx.await.unwrap_or(Err(SubmitError::ShuttingDown))
    }

    /// A snapshot for `/status`.
    pub async fn status(&self) -> Option<Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Status { reply }).ok()?;
        rx.await.ok()
    }

    /// Swaps in a new set of arms between two decisions. Waiting and running
    /// requests stay; those of an arm that no longer exists move to the
    /// heaviest remaining arm.
    pub async fn install(&self, arms: Vec<ArmSpec>, ab: AbConfig) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Install { arms, ab, reply }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Records a failed reload (shown in `/status`).
    pub fn reload_failed(&self, error: String) {
        let _ = self.tx.send(Msg::ReloadFailed { error });
    }

    /// Changes an arm's weight live.
    pub async fn set_weight(&self, arm: &str, weight: u32) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::SetWeight {
                arm: arm.to_string(),
                weight,
                reply,
            })
            .map_err(|_| "scheduler stopped".to_string())?;
        rx.await.unwrap_or_else(|_| Err("scheduler stopped".into()))
    }

    /// Per-arm comparison over the last `window`, with each arm's
    /// differences from the first ([`compare`]). The resampling runs on a
    /// blocking thread, not on the scheduler task, so it delays no decision.
    pub async fn report(&self, window: Duration) -> Option<AbReport> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Report { window, reply }).ok()?;
        let (mut report, inputs) = rx.await.ok()?;
        report.comparisons = tokio::task::spawn_blocking(move || compare::compare(&inputs))
            .await
            .unwrap_or_default();
        Some(report)
    }

    /// A health probe's verdict on backend `backend` (its `/api/version`
    /// when it answered).
    pub fn backend_health(&self, backend: usize, up: bool, version: Option<String>) {
        let _ = self.tx.send(Msg::Health {
            backend,
            up,
            version,
        });
    }

    /// The models backend `backend` has loaded, from an `/api/ps` poll sent
    /// at `sent_at`.
    pub fn backend_residency(
        &self,
        backend: usize,
        sent_at: tokio::time::Instant,
        models: Vec<PsModel>,
    ) {
        let _ = self.tx.send(Msg::Residency {
            backend,
            sent_at,
            models,
        });
    }

    /// The models an OpenAI-compatible backend serves, from a `/v1/models`
    /// poll.
    pub fn backend_models(&self, backend: usize, models: Vec<String>) {
        let _ = self.tx.send(Msg::Models { backend, models });
    }

    /// Stops admitting: waiting requests and new arrivals get 503 + Retry-After;
    /// running ones continue.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// What the scheduler task is built from.
pub struct Setup {
    /// The arms to serve, ready to decide.
    pub arms: Vec<ArmSpec>,
    /// How traffic is split between them.
    pub ab: AbConfig,
    /// The backends, in config order (their slots add up to what the arms
    /// share).
    pub backends: Vec<BackendSpec>,
    /// Most fail-overs of one request ([`crate::config::FleetConfig`]).
    pub max_failovers: u32,
    /// Host limits.
    pub limits: Limits,
    /// Where each ended request is traced, if anywhere.
    pub trace: Option<crate::trace::TraceSink>,
}

/// Starts the scheduler task on the current tokio runtime.
pub fn spawn(setup: Setup, metrics: Arc<Metrics>) -> SchedulerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let core = core::Core::new(setup, metrics, tx.clone(), waiting.clone());
    let health = core.fleet.health();
    tokio::spawn(core.run(rx));
    SchedulerHandle {
        tx,
        waiting,
        health,
    }
}
