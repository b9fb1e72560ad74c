//! One policy file replayed in virtual time.
//!
//! A current-thread tokio runtime with a paused clock: time jumps to the
//! next timer whenever every task waits, so an hour of traffic takes as long
//! as its decisions take to compute. In it run the scheduler task that
//! `serve` runs ([`crate::scheduler::spawn`], with the policy file's arms
//! built by [`Reloader`] like `serve` builds them), one task per request
//! that plays the client and the proxy (submit, wait for a slot, dispatch,
//! relay, the same calls on [`Ticket`] and [`Run`] as `proxy::scheduled`
//! makes), and the simulated upstream ([`Upstream`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use upstream_model::timing::Plan;

use super::SimError;
use super::upstream::{Lease, Upstream};
use super::workload::Job;
use crate::config::Config;
use crate::fleet::BackendSpec;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::scheduler::{self, AbReport, Outcome, RequestMeta, Run, SchedulerHandle, Setup, Ticket};

/// What one replay measured.
pub struct Replayed {
    /// The A/B report over the whole replay, as `GET /ab` would give it.
    pub report: AbReport,
    /// Virtual time from the first arrival to the last end.
    pub span: Duration,
    /// The most upstream slots held at once.
    pub upstream_max_active: usize,
}

/// Replays `jobs` through the policy `cfg`, in a runtime of its own.
pub fn replay(cfg: &Config, jobs: &Arc<[Job]>, reloader: &Reloader) -> Result<Replayed, SimError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(SimError::Runtime)?;
    rt.block_on(async {
        let arms = reloader.build_arms_virtual(cfg).await?;
        let sched = scheduler::spawn(
            Setup {
                arms,
                ab: cfg.ab.clone(),
                // The simulated upstream is one pool of the fleet's slots.
                backends: vec![BackendSpec::single("default", cfg.total_slots())],
                max_failovers: cfg.fleet.max_failovers,
                limits: cfg.limits.clone(),
                trace: None,
            },
            Arc::new(Metrics::new()),
        );
        let up = Upstream::new(cfg.total_slots() as usize);
        let origin = Instant::now();
        let mut clients = JoinSet::new();
        for i in 0..jobs.len() {
            sleep_until(origin + Duration::from_secs_f64(jobs[i].at_ms / 1000.0)).await;
            let job = &jobs[i];
            let rule = cfg.models.get(&job.model);
            let resumes = crate::proxy::resume::resumes(rule, &job.path, job.stream);
            clients.spawn(client(sched.clone(), jobs.clone(), i, up.clone(), resumes));
        }
        while clients.join_next().await.is_some() {}
        let span = origin.elapsed();
        let report = sched
            .report(span.max(Duration::from_millis(1)))
            .await
            .ok_or(SimError::SchedulerStopped)?;
        Ok(Replayed {
            report,
            span,
            upstream_max_active: up.max_active(),
        })
    })
}

/// One request: arrives now, and leaves early if the trace says its client
/// gave up (unless it was served by then).
async fn client(
    sched: SchedulerHandle,
    jobs: Arc<[Job]>,
    i: usize,
    up: Arc<Upstream>,
    resumes: bool,
) {
    let job = &jobs[i];
    let arrival = Instant::now();
    let meta = RequestMeta {
        path: job.path.clone(),
        model: job.model.as_str().into(),
        stream: job.stream,
        priority_header: job.priority_header.clone(),
        tenant: job.tenant.as_deref().map(Into::into),
        num_predict: job.num_predict,
        body_bytes: job.body_bytes,
        client_key: job.client_key.clone(),
        arrival,
    };
    let served = serve(&sched, meta, job, &up, resumes);
    match job.leave_after {
        None => served.await,
        // Dropping the request's future drops its ticket (the scheduler
        // hears the client went away) and its slot lease.
        Some(patience) => tokio::select! {
            biased;
            () = served => {}
            () = sleep_until(arrival + patience) => {}
        },
    }
}

/// The proxy's phases for one request: submit, then wait for a slot and
/// dispatch until the answer's head comes (a pre-emption before that
/// requeues it), then relay. `resumes`: a pre-emption keeps what the
/// upstream had made, and the next dispatch makes only the rest.
async fn serve(
    sched: &SchedulerHandle,
    meta: RequestMeta,
    job: &Job,
    up: &Arc<Upstream>,
    resumes: bool,
) {
    let Ok(mut ticket) = sched.submit(meta).await else {
        return;
    };
    let mut plan = Plan {
        timing: job.timing,
        tokens: job.tokens,
        fail_after: None,
    };
    loop {
        // The upstream's response head comes with the first token of a
        // stream, and with the whole answer otherwise (as Ollama sends them).
        let head = match (job.stream, plan.first_token()) {
            (true, Some(first)) => first,
            _ => plan.end(),
        };
        let Ok(grant) = ticket.wait_start().await else {
            return;
        };
        let run = grant.run;
        let lease = up.acquire().await;
        let preempted = tokio::select! {
            biased;
            () = run.preempt.cancelled() => true,
            () = sleep_until(due(lease.granted, head)) => false,
        };
        if !preempted {
            run.mark_upstream_first_byte();
            if run.mark_streaming() {
                return relay(ticket, &run, lease, &plan, job.stream).await;
            }
        }
        // Aborted before anything reached the client: requeued, and what
        // the upstream had made is thrown away, or kept by a resume.
        let made = lease.made_by(&plan, Instant::now());
        drop(lease);
        if resumes && made > 0 {
            plan.tokens = plan.tokens.saturating_sub(made).max(1);
            ticket.requeue_after_preempt();
        } else {
            ticket.requeue_after_preempt_losing(made);
        }
    }
}

/// Relays the answer: one chunk per token and Ollama's final frame for a
/// stream, one chunk for an answer sent whole. A cut ends it at once.
async fn relay(ticket: Ticket, run: &Arc<Run>, lease: Lease, plan: &Plan, stream: bool) {
    let granted = lease.granted;
    // The scheduler closes a cut stream's upstream itself (the slot is free
    // at once), as it does through a live relay's closer.
    let held = Arc::new(Mutex::new(Some(lease)));
    // In-process: the modelled upstream lets go at once (no connection to
    // drain), so the slot is free as the cut happens.
    let close = {
        let held = held.clone();
        move || {
            drop(take(&held));
            None
        }
    };
    if !run.on_cut(Box::new(close)) {
        drop(take(&held));
        return ticket.finish(Outcome::Cancelled);
    }
    run.mark_client_first_byte();
    if stream {
        let cut = run.preempt.cancelled();
        tokio::pin!(cut);
        let n = plan.produced();
        for i in 0..n {
            if i > 0 {
                tokio::select! {
                    biased;
                    () = &mut cut => {
                        drop(take(&held));
                        return ticket.finish(Outcome::Cancelled);
                    }
                    () = sleep_until(due(granted, plan.timing.token_ready(i))) => {}
                }
            }
            run.add_token();
        }
    }
    // The final frame (a stream's `done` line, or the whole answer).
    run.add_token();
    drop(take(&held));
    ticket.finish(Outcome::Ok);
}

/// `offset` after `from`, to the nearest millisecond. Timers fire on whole
/// milliseconds (tokio's resolution) and would round every wait up; rounding
/// to the nearest keeps a queue of back-to-back requests from drifting late
/// by half a millisecond per request.
fn due(from: Instant, offset: Duration) -> Instant {
    from + Duration::from_millis(((offset.as_nanos() + 500_000) / 1_000_000) as u64)
}

fn take(held: &Mutex<Option<Lease>>) -> Option<Lease> {
    held.lock().unwrap_or_else(PoisonError::into_inner).take()
}
