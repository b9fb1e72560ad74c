//! `hostile-panic`: a Rust `panic!` with a message in one export (config
//! `call`, default `schedule`; `after_calls` good calls first). The panic
//! message goes to the guest's stderr (a WASI write the host must survive),
//! then the panic aborts, which traps. maitre must eject it with a `trap`
//! fault whose message includes the panic message.

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// The text every panic of this plugin starts with (tests look for it).
pub const MESSAGE: &str = "hostile-panic: deliberate panic";

/// FIFO that panics in its chosen call.
pub struct PanicPolicy(Trigger);

impl Policy for PanicPolicy {
    fn init(config: &Config) -> Result<Self, String> {
        let t = trigger(config, &[])?;
        if t.fires(Call::Init) {
            panic!("{MESSAGE} in init");
        }
        Ok(PanicPolicy(t))
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.0.fires(Call::Admit) {
            panic!("{MESSAGE} in admit of request {}", req.id);
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.0.fires(Call::Schedule) {
            panic!("{MESSAGE} in schedule with {} waiting", view.waiting.len());
        }
        fifo_schedule(view)
    }
}

export_policy!(PanicPolicy);
