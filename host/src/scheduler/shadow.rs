//! Shadow arms: a candidate plugin that watches real traffic and never acts.
//!
//! A `[[policy]] shadow = true` arm gets no requests and no slots. At every
//! decision of the first serving arm (the one it watches), the scheduler
//! hands the shadow the same view and the answer the serving arm gave; the
//! shadow's plugin is asked too (`admit` for each arrival, `schedule` for
//! each decision), its answer is checked exactly as a live answer would be,
//! and compared: it agrees when it would have admitted in the same class and
//! started and pre-empted the same requests.
//!
//! The shadow runs in its own task behind a bounded queue, so a slow, hung
//! or trapping shadow never delays a decision: when its queue is full the
//! scheduler skips it (counted). Its faults, timeouts and nonsense answers
//! are counted with its arm name in the same metrics as a live arm's, and it
//! is ejected on the first one, as a live arm would be (a live arm would then
//! be served by FIFO; a shadow simply stops until the next reload).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::check::{check_answer, summarize_invalid};
use super::decider::Decider;
use crate::config::PluginSource;
use crate::escape::Escaped;
use crate::metrics::{ArmKind, Metrics, ShadowLabels};
use crate::plugin::PluginError;
use crate::policy::{Action, Admission, Request, View};

/// Jobs a shadow may have queued before the scheduler skips it.
const QUEUE: usize = 256;
/// Differences kept as examples.
const EXAMPLES: usize = 5;

/// What the shadow is asked, with the serving arm's answer.
enum Job {
    Admit {
        req: Request,
        view: View,
        live: Admission,
    },
    Schedule {
        view: View,
        live: Vec<Action>,
        inflight: i64,
    },
}

/// A shadow arm as the scheduler keeps it.
pub(super) struct Shadow {
    pub(super) name: Arc<str>,
    pub(super) source: PluginSource,
    pub(super) sha256: String,
    tx: mpsc::Sender<Job>,
    stats: Arc<Mutex<Stats>>,
    metrics: Arc<Metrics>,
}

/// Counts of one shadow arm.
#[derive(Debug, Default)]
struct Stats {
    schedule_agree: u64,
    schedule_differ: u64,
    admit_agree: u64,
    admit_differ: u64,
    skipped: u64,
    faults: u64,
    ejected: bool,
    last_error: Option<String>,
    examples: VecDeque<String>,
}

/// One shadow arm in `/ab` and `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShadowReport {
    /// The shadow arm.
    pub arm: String,
    /// The serving arm whose decisions it is shown.
    pub watches: String,
    /// Plugin path or `builtin:NAME`.
    pub plugin: String,
    /// sha256 of the plugin.
    pub plugin_sha256: String,
    /// `schedule` answers equal to the serving arm's (same starts and pre-emptions).
    pub schedule_agree: u64,
    /// `schedule` answers that differ.
    pub schedule_differ: u64,
    /// `admit` answers in the same class (or both rejecting).
    pub admit_agree: u64,
    /// `admit` answers that differ.
    pub admit_differ: u64,
    /// Calls skipped because the shadow was still busy with earlier ones.
    pub skipped: u64,
    /// Faults, timeouts and invalid answers (the first one ejects it).
    pub faults: u64,
    /// Ejected: it is no longer asked until the next reload.
    pub ejected: bool,
    /// Its last fault.
    pub last_error: Option<String>,
    /// The latest differences, newest last, e.g.
    /// `schedule: would start [7], the serving arm started [3]`.
    pub examples: Vec<String>,
}

impl Shadow {
    /// Starts the shadow's task on the current runtime.
    pub(super) fn spawn(
        name: Arc<str>,
        source: PluginSource,
        sha256: String,
        decider: Box<dyn Decider>,
        metrics: Arc<Metrics>,
    ) -> Shadow {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let runner = Runner {
            name: name.clone(),
            decider,
            stats: stats.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(runner.run(rx));
        Shadow {
            name,
            source,
            sha256,
            tx,
            stats,
            metrics,
        }
    }

    /// Shows the shadow an arrival and the serving arm's admission.
    pub(super) fn admit(&self, req: &Request, view: &View, live: &Admission) {
        self.send(Job::Admit {
            req: req.clone(),
            view: view.clone(),
            live: live.clone(),
        });
    }

    /// Shows the shadow a decision and the serving arm's (checked) answer.
    pub(super) fn schedule(&self, view: &View, live: &[Action], inflight: i64) {
        self.send(Job::Schedule {
            view: view.clone(),
            live: live.to_vec(),
            inflight,
        });
    }

    /// Whether it is still asked (not ejected).
    pub(super) fn active(&self) -> bool {
        !self.stats.lock().unwrap().ejected
    }

    fn send(&self, job: Job) {
        if self.tx.try_send(job).is_err() {
            self.stats.lock().unwrap().skipped += 1;
            count(&self.metrics, &self.name, "skipped");
        }
    }

    /// Its report; `watches` names the serving arm it is shown.
    pub(super) fn report(&self, watches: &str) -> ShadowReport {
        let s = self.stats.lock().unwrap();
        ShadowReport {
            arm: self.name.to_string(),
            watches: watches.to_string(),
            plugin: self.source.to_string(),
            plugin_sha256: self.sha256.clone(),
            schedule_agree: s.schedule_agree,
            schedule_differ: s.schedule_differ,
            admit_agree: s.admit_agree,
            admit_differ: s.admit_differ,
            skipped: s.skipped,
            faults: s.faults,
            ejected: s.ejected,
            last_error: s.last_error.clone(),
            examples: s.examples.iter().cloned().collect(),
        }
    }
}

fn count(metrics: &Metrics, arm: &str, result: &str) {
    metrics
        .shadow_decisions
        .get_or_create(&ShadowLabels {
            arm: arm.to_string(),
            result: result.into(),
        })
        .inc();
}

/// The shadow's task: owns its decider, answers jobs in order.
struct Runner {
    name: Arc<str>,
    decider: Box<dyn Decider>,
    stats: Arc<Mutex<Stats>>,
    metrics: Arc<Metrics>,
}

impl Runner {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.recv().await {
            let t = std::time::Instant::now();
            let (call, verdict) = match job {
                Job::Admit { req, view, live } => {
                    let r = self.decider.admit(&req, &view).await;
                    ("admit", self.judge_admit(&req, r, &live))
                }
                Job::Schedule {
                    view,
                    live,
                    inflight,
                } => {
                    let r = self.decider.schedule(&view).await;
                    ("schedule", judge_schedule(&view, r, &live, inflight))
                }
            };
            self.metrics
                .plugin_call
                .get_or_create(&ArmKind {
                    arm: self.name.to_string(),
                    kind: call.into(),
                })
                .observe(t.elapsed().as_secs_f64());
            match verdict {
                Verdict::Agree => self.tally(call, true, None),
                Verdict::Differ(example) => self.tally(call, false, Some(example)),
                Verdict::Fault(e, invalid) => {
                    self.eject(call, &e, invalid);
                    // Ejected: drain what is queued without asking it.
                    rx.close();
                    while rx.recv().await.is_some() {}
                    return;
                }
            }
        }
    }

    fn judge_admit(
        &self,
        req: &Request,
        r: Result<Admission, PluginError>,
        live: &Admission,
    ) -> Verdict {
        let shadow = match r {
            Ok(Admission::Queue(p)) if p.priority.is_nan() => {
                return Verdict::Fault(
                    PluginError::Invalid {
                        call: "admit",
                        summary: format!("priority NaN for request {}", req.id),
                    },
                    Some("bad_priority"),
                );
            }
            Ok(a) => a,
            Err(e) => return Verdict::Fault(e, None),
        };
        let said = |a: &Admission| match a {
            Admission::Queue(p) => format!("queue as {}", p.class.name()),
            Admission::Reject(r) => format!("reject ({})", r.status),
        };
        if said(&shadow) == said(live) {
            Verdict::Agree
        } else {
            Verdict::Differ(format!(
                "admit request {}: would {}, the serving arm chose to {}",
                req.id,
                said(&shadow),
                said(live)
            ))
        }
    }

    fn tally(&self, call: &str, agree: bool, example: Option<String>) {
        let mut s = self.stats.lock().unwrap();
        match (call, agree) {
            ("admit", true) => s.admit_agree += 1,
            ("admit", false) => s.admit_differ += 1,
            (_, true) => s.schedule_agree += 1,
            (_, false) => s.schedule_differ += 1,
        }
        if let Some(e) = example {
            if s.examples.len() == EXAMPLES {
                s.examples.pop_front();
            }
            s.examples.push_back(e);
        }
        drop(s);
        let result = if agree { "agree" } else { "differ" };
        count(&self.metrics, &self.name, &format!("{call}_{result}"));
    }

    fn eject(&self, call: &str, e: &PluginError, invalid: Option<&str>) {
        tracing::warn!(
            arm = %self.name,
            fault = e.kind(),
            during = call,
            error = %Escaped(e),
            "shadow plugin ejected; serving is not affected, and it is asked again after the next reload"
        );
        let labels = |kind: &str| ArmKind {
            arm: self.name.to_string(),
            kind: kind.into(),
        };
        if let Some(kind) = invalid {
            self.metrics
                .invalid_actions
                .get_or_create(&labels(kind))
                .inc();
        }
        self.metrics
            .plugin_faults
            .get_or_create(&labels(e.kind()))
            .inc();
        let mut s = self.stats.lock().unwrap();
        s.faults += 1;
        s.ejected = true;
        s.last_error = Some(format!("ejected: {e}"));
    }
}

enum Verdict {
    Agree,
    Differ(String),
    /// The error, and the invalid-action kind when it was a nonsense answer.
    Fault(PluginError, Option<&'static str>),
}

/// Checks the shadow's answer as a live one would be, then compares what it
/// would start and pre-empt with what the serving arm did.
fn judge_schedule(
    view: &View,
    r: Result<Vec<Action>, PluginError>,
    live: &[Action],
    inflight: i64,
) -> Verdict {
    let actions = match r {
        Ok(a) => a,
        Err(e) => return Verdict::Fault(e, None),
    };
    let bad = check_answer(view, &actions, inflight);
    if let Some((kind, _)) = bad.first() {
        let e = PluginError::Invalid {
            call: "schedule",
            summary: summarize_invalid(&bad, actions.len()),
        };
        return Verdict::Fault(e, Some(kind.as_str()));
    }
    let (s, l) = (Acts::of(&actions), Acts::of(live));
    if s == l {
        Verdict::Agree
    } else {
        Verdict::Differ(format!(
            "schedule at {} ms: would {}, the serving arm chose to {}",
            view.now_ms,
            s.said(),
            l.said()
        ))
    }
}

/// The parts of an answer compared: starts, pre-emptions and rejections.
#[derive(PartialEq)]
struct Acts {
    start: BTreeSet<u64>,
    preempt: BTreeSet<u64>,
    reject: BTreeSet<u64>,
}

impl Acts {
    fn of(actions: &[Action]) -> Acts {
        let mut a = Acts {
            start: BTreeSet::new(),
            preempt: BTreeSet::new(),
            reject: BTreeSet::new(),
        };
        for x in actions {
            match x {
                Action::Start { id, .. } => a.start.insert(*id),
                Action::Preempt { id, .. } => a.preempt.insert(*id),
                Action::Reject { id, .. } => a.reject.insert(*id),
            };
        }
        a
    }

    fn said(&self) -> String {
        let mut parts = Vec::new();
        for (verb, ids) in [
            ("pre-empt", &self.preempt),
            ("start", &self.start),
            ("reject", &self.reject),
        ] {
            if !ids.is_empty() {
                parts.push(format!("{verb} {ids:?}"));
            }
        }
        if parts.is_empty() {
            "do nothing".into()
        } else {
            parts.join(" and ")
        }
    }
}
