//! `hostile-loop`: loops forever in one export (config `call`, default
//! `schedule`; `after_calls` good calls first). maitre must stop it after its
//! CPU budget (`[limits] plugin_call_ms`) and eject it with a `timeout` fault.

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// FIFO that loops forever in its chosen call.
pub struct Loop(Trigger);

/// Burns CPU forever; `black_box` keeps the compiler from proving anything.
fn spin() -> ! {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
}

impl Policy for Loop {
    fn init(config: &Config) -> Result<Self, String> {
        let t = trigger(config, &[])?;
        if t.fires(Call::Init) {
            spin();
        }
        Ok(Loop(t))
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.0.fires(Call::Admit) {
            spin();
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.0.fires(Call::Schedule) {
            spin();
        }
        fifo_schedule(view)
    }
}

export_policy!(Loop);
