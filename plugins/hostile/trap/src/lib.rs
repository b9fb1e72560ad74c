//! `hostile-trap`: aborts (the WebAssembly `unreachable` instruction) in one
//! export (config `call`, default `schedule`; `after_calls` good calls
//! first). maitre must eject it with a `trap` fault.

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// FIFO that traps in its chosen call.
pub struct TrapPolicy(Trigger);

impl Policy for TrapPolicy {
    fn init(config: &Config) -> Result<Self, String> {
        let t = trigger(config, &[])?;
        if t.fires(Call::Init) {
            std::process::abort();
        }
        Ok(TrapPolicy(t))
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.0.fires(Call::Admit) {
            std::process::abort();
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.0.fires(Call::Schedule) {
            std::process::abort();
        }
        fifo_schedule(view)
    }
}

export_policy!(TrapPolicy);
