//! `hostile-huge`: answers `schedule` with a million actions (config
//! `actions`, default 1 000 000), all starts of the oldest waiting request.
//! maitre must refuse the answer without applying any of it and eject the
//! plugin with an `invalid` fault (`too_many_actions`).

use hostile_common::fifo_admit;
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy, start};

/// Config key: how many actions to return.
pub const ACTIONS: &str = "actions";

/// Floods the host with actions.
pub struct Huge(u32);

impl Policy for Huge {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[ACTIONS])?;
        Ok(Huge(config.get_u32(ACTIONS, 1_000_000)?))
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        let id = view.waiting.first().map(|w| w.id).unwrap_or(u64::MAX);
        vec![start(id); self.0 as usize]
    }
}

export_policy!(Huge);
