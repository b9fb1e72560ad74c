//! `hostile-garbage`: answers with nonsense, chosen with the config key `mode`:
//!
//! | mode | nonsense | what maitre does |
//! |---|---|---|
//! | `all` (default) | every `schedule` answer mixes a start, a pre-emption and a reject of unknown (or running) ids, a duplicate start and a reject with status 0 | refuses the answer, ejects (`invalid`) |
//! | `unknown_id` | `schedule` starts an id that was never waiting | refuses, ejects |
//! | `duplicate_start` | `schedule` starts the same request twice (or a running one) | refuses, ejects |
//! | `reject_running` | `schedule` rejects requests that are running, not waiting | refuses, ejects |
//! | `nan_priority` | `admit` queues with priority NaN | ejects in `admit`, admits with FIFO |
//! | `bad_status` | `admit` rejects every request with HTTP status 1000 | answers 503 (the WIT's rule), counts `bad_status`, keeps the plugin |
//! | `long_message` | `admit` rejects every request (429) with a 1 MiB message | cuts the message to 1 KiB, counts `long_message`, keeps the plugin |
//!
//! Outside its nonsense it behaves like FIFO, so the first call that returns
//! nonsense is the one that gets it ejected.

use hostile_common::{fifo_admit, fifo_schedule};
use maitre_policy_sdk::{
    Action, Admission, Class, Config, Placement, Policy, Rejection, Request, View, export_policy,
    invalid, preempt, reject, start,
};

/// Config key selecting the nonsense.
pub const MODE: &str = "mode";

/// An id no request ever gets (the host counts ids up from 1).
pub const BOGUS_ID: u64 = u64::MAX - 7;

/// Which nonsense to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All of the `schedule` nonsense at once.
    All,
    /// Start an id that was never waiting.
    UnknownId,
    /// Start a request twice.
    DuplicateStart,
    /// Reject running requests.
    RejectRunning,
    /// Admit with priority NaN.
    NanPriority,
    /// Reject in `admit` with status 1000.
    BadStatus,
    /// Reject in `admit` with a 1 MiB message.
    LongMessage,
}

/// A policy that answers with nonsense.
pub struct Garbage(Mode);

impl Policy for Garbage {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[MODE])?;
        let mode = match config.get_str(MODE, "all")? {
            "all" => Mode::All,
            "unknown_id" => Mode::UnknownId,
            "duplicate_start" => Mode::DuplicateStart,
            "reject_running" => Mode::RejectRunning,
            "nan_priority" => Mode::NanPriority,
            "bad_status" => Mode::BadStatus,
            "long_message" => Mode::LongMessage,
            other => {
                return Err(invalid(
                    MODE,
                    "all, unknown_id, duplicate_start, reject_running, nan_priority, bad_status or long_message",
                    other,
                ));
            }
        };
        Ok(Garbage(mode))
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        match self.0 {
            Mode::NanPriority => Admission::Queue(Placement {
                class: Class::Batch,
                priority: f64::NAN,
            }),
            Mode::BadStatus => Admission::Reject(Rejection {
                status: 1000,
                message: format!(
                    "hostile-garbage refuses request {} with status 1000",
                    req.id
                ),
            }),
            Mode::LongMessage => Admission::Reject(Rejection {
                status: 429,
                message: format!("hostile-garbage: {}", "x".repeat(1 << 20)),
            }),
            _ => fifo_admit(req),
        }
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        let mut out = Vec::new();
        let first = view.waiting.first().map(|w| w.id);
        match self.0 {
            Mode::All => {
                out.push(start(BOGUS_ID));
                out.push(preempt(BOGUS_ID - 1, true));
                let running = view.running.first().map(|r| r.id).unwrap_or(BOGUS_ID - 2);
                out.push(reject(running, 503, "rejecting a running request"));
                if let Some(id) = first {
                    out.push(start(id));
                    out.push(start(id));
                }
                if let Some(last) = view.waiting.last().filter(|w| Some(w.id) != first) {
                    out.push(reject(last.id, 0, "status 0"));
                }
            }
            Mode::UnknownId => {
                out.push(start(BOGUS_ID));
                out.extend(fifo_schedule(view));
            }
            Mode::DuplicateStart => match first {
                Some(id) if view.free_slots > 0 => {
                    out.push(start(id));
                    out.push(start(id));
                }
                _ => out.extend(view.running.iter().map(|r| start(r.id))),
            },
            Mode::RejectRunning => {
                out.extend(
                    view.running
                        .iter()
                        .map(|r| reject(r.id, 503, "rejecting a running request")),
                );
                out.extend(fifo_schedule(view));
            }
            Mode::NanPriority | Mode::BadStatus | Mode::LongMessage => {
                out.extend(fifo_schedule(view))
            }
        }
        out
    }
}

export_policy!(Garbage);
