//! `hostile-resources`: in one export (config `call`, default `schedule`;
//! `after_calls` good calls first) creates `count` WASI pollables (default
//! 20000) and never drops them. Each lives in the host, outside the plugin's
//! memory cap, and the host keeps them across calls: without a cap on the
//! resource table the host's memory grows with every call. maitre must eject
//! it with a `resources` fault.

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// Config key: pollables created per bad call.
const COUNT: &str = "count";

/// FIFO that leaks pollables in its chosen call.
pub struct Resources {
    trigger: Trigger,
    count: u32,
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod raw {
    #[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.0")]
    unsafe extern "C" {
        /// `subscribe-duration: func(when: duration) -> pollable`, lowered.
        #[link_name = "subscribe-duration"]
        fn subscribe_duration(nanos: u64) -> u32;
    }

    /// Creates one pollable (a one-hour timer) and leaks its handle.
    pub fn leak_pollable() {
        // SAFETY: a plain import taking a u64 and returning a handle.
        let _ = unsafe { subscribe_duration(3_600_000_000_000) };
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod raw {
    /// Natively there is no WASI: nothing to create.
    pub fn leak_pollable() {}
}

impl Resources {
    fn leak(&self) {
        for _ in 0..self.count {
            raw::leak_pollable();
        }
    }
}

impl Policy for Resources {
    fn init(config: &Config) -> Result<Self, String> {
        let trigger = trigger(config, &[COUNT])?;
        let r = Resources {
            trigger,
            count: config.get_u32(COUNT, 20_000)?,
        };
        if r.trigger.fires(Call::Init) {
            r.leak();
        }
        Ok(r)
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.trigger.fires(Call::Admit) {
            self.leak();
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.trigger.fires(Call::Schedule) {
            self.leak();
        }
        fifo_schedule(view)
    }
}

export_policy!(Resources);
