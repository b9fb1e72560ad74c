//! `hostile-sleep`: sleeps `sleep_ms` (default 250) in one export (config
//! `call`, default `schedule`; `after_calls` good calls first). The sleep is
//! a WASI clock wait: the guest burns no CPU while it is blocked in the host,
//! so only a wall-clock deadline per call (`[limits] plugin_call_ms`) can stop
//! it. maitre must eject it with a `timeout` fault, or refuse to load it when
//! it sleeps in `init`.

use std::time::Duration;

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// Config key: how long the bad call sleeps, in milliseconds.
const SLEEP_MS: &str = "sleep_ms";

/// FIFO that sleeps in its chosen call.
pub struct Sleep {
    trigger: Trigger,
    sleep: Duration,
}

impl Policy for Sleep {
    fn init(config: &Config) -> Result<Self, String> {
        let trigger = trigger(config, &[SLEEP_MS])?;
        let sleep = Duration::from_millis(config.get_u32(SLEEP_MS, 250)?.into());
        if trigger.fires(Call::Init) {
            std::thread::sleep(sleep);
        }
        Ok(Sleep { trigger, sleep })
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.trigger.fires(Call::Admit) {
            std::thread::sleep(self.sleep);
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.trigger.fires(Call::Schedule) {
            std::thread::sleep(self.sleep);
        }
        fifo_schedule(view)
    }
}

export_policy!(Sleep);
