//! `hostile-starve`: admits everything and never starts anything. maitre's
//! starvation watchdog (`[limits] starvation_ms`) must eject it with a
//! `starvation` fault and serve the queue with FIFO.

use hostile_common::fifo_admit;
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// Never starts anything.
pub struct Starve;

impl Policy for Starve {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[])?;
        Ok(Starve)
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        fifo_admit(req)
    }

    fn schedule(&self, _view: &View) -> Vec<Action> {
        Vec::new()
    }
}

export_policy!(Starve);
