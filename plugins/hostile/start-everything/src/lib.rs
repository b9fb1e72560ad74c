//! `hostile-start-everything`: starts every waiting request on every call,
//! ignoring the free slots. maitre must refuse the answer (the upstream never
//! sees more requests than slots) and eject it with an `invalid` fault
//! (`no_free_slot`).

use hostile_common::fifo_admit;
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy, start};

/// Starts everything.
pub struct StartEverything;

impl Policy for StartEverything {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[])?;
        Ok(StartEverything)
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        view.waiting.iter().map(|w| start(w.id)).collect()
    }
}

export_policy!(StartEverything);
