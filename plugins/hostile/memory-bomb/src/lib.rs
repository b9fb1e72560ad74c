//! `hostile-memory-bomb`: allocates (and touches) 1 MiB after 1 MiB without
//! bound in one export (config `call`, default `schedule`; `after_calls` good
//! calls first). maitre must stop it at its memory cap
//! (`[limits] plugin_memory_mib`) and eject it with a `memory` fault.

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// FIFO that exhausts memory in its chosen call.
pub struct MemoryBomb(Trigger);

/// Allocates until the host stops it.
fn bomb() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![0xA5; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

impl Policy for MemoryBomb {
    fn init(config: &Config) -> Result<Self, String> {
        let t = trigger(config, &[])?;
        if t.fires(Call::Init) {
            bomb();
        }
        Ok(MemoryBomb(t))
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.0.fires(Call::Admit) {
            bomb();
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.0.fires(Call::Schedule) {
            bomb();
        }
        fifo_schedule(view)
    }
}

export_policy!(MemoryBomb);
