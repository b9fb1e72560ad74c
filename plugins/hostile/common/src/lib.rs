//! Shared parts of maitre's hostile test plugins (see `plugins/hostile/README.md`).
//!
//! A hostile plugin behaves like FIFO except in one export, chosen with the
//! `call` config key, where it misbehaves once `after_calls` calls of that
//! export went well. That way a test knows exactly which call the host had to
//! stop, and that the requests started before the fault keep running.

use std::sync::atomic::{AtomicU64, Ordering};

use maitre_policy_sdk::{
    Action, Admission, Class, Config, Placement, Request, View, class_from_hint, invalid, start,
};

/// Config key naming the export that misbehaves.
pub const CALL: &str = "call";
/// Config key: good calls before the first bad one.
pub const AFTER_CALLS: &str = "after_calls";
/// The keys [`Trigger::from_config`] reads.
pub const KEYS: [&str; 2] = [CALL, AFTER_CALLS];

/// One of the plugin's exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `init`.
    Init,
    /// `admit`.
    Admit,
    /// `schedule`.
    Schedule,
}

/// Decides when the plugin misbehaves.
#[derive(Debug)]
pub struct Trigger {
    call: Call,
    after: u64,
    seen: AtomicU64,
}

impl Trigger {
    /// Reads `call` (`init`, `admit` or `schedule`, default `schedule`) and
    /// `after_calls` (default 0).
    pub fn from_config(config: &Config) -> Result<Trigger, String> {
        let call = match config.get_str(CALL, "schedule")? {
            "init" => Call::Init,
            "admit" => Call::Admit,
            "schedule" => Call::Schedule,
            other => return Err(invalid(CALL, "\"init\", \"admit\" or \"schedule\"", other)),
        };
        Ok(Trigger {
            call,
            after: config.get_u32(AFTER_CALLS, 0)?.into(),
            seen: AtomicU64::new(0),
        })
    }

    /// Whether this call of `call` is a bad one (counts the call).
    pub fn fires(&self, call: Call) -> bool {
        call == self.call && self.seen.fetch_add(1, Ordering::Relaxed) >= self.after
    }
}

/// FIFO admission: the header's class, priority 0.
pub fn fifo_admit(req: &Request) -> Admission {
    Admission::Queue(Placement {
        class: class_from_hint(req, Class::Batch),
        priority: 0.0,
    })
}

/// FIFO scheduling: start the oldest waiting requests while slots are free.
pub fn fifo_schedule(view: &View) -> Vec<Action> {
    view.waiting
        .iter()
        .take(view.free_slots as usize)
        .map(|w| start(w.id))
        .collect()
}

/// Parses the config, checks its keys, and returns the trigger.
pub fn trigger(config: &Config, extra_keys: &[&str]) -> Result<Trigger, String> {
    let mut known: Vec<&str> = KEYS.to_vec();
    known.extend_from_slice(extra_keys);
    config.reject_unknown(&known)?;
    Trigger::from_config(config)
}
