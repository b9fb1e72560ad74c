//! `hostile-sockets`: in one export (config `call`, default `schedule`;
//! `after_calls` good calls first) creates `count` TCP sockets (default 256)
//! and never closes them. Where WASI grants sockets, each one is a host file
//! descriptor, so a few calls exhaust the process's descriptors. maitre's
//! sandbox refuses socket creation before any descriptor exists: the plugin
//! keeps serving (it ignores the refusals) and the host's descriptor count
//! stays flat. It calls `wasi:sockets/tcp-create-socket` directly because
//! Rust's `std::net` closes a socket whose bind or connect fails.

use hostile_common::{Call, Trigger, fifo_admit, fifo_schedule, trigger};
use maitre_policy_sdk::{Action, Admission, Config, Policy, Request, View, export_policy};

/// Config key: sockets created per bad call.
const COUNT: &str = "count";

/// FIFO that opens sockets in its chosen call.
pub struct Sockets {
    trigger: Trigger,
    count: u32,
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod raw {
    #[link(wasm_import_module = "wasi:sockets/tcp-create-socket@0.2.0")]
    unsafe extern "C" {
        /// `create-tcp-socket: func(family: ip-address-family) -> result<tcp-socket, error-code>`,
        /// lowered: the family, then a pointer to the 8-byte result
        /// (discriminant byte, then the handle or the error code at offset 4).
        #[link_name = "create-tcp-socket"]
        fn create_tcp_socket(family: i32, ret: *mut u32);
    }

    /// Creates one IPv4 TCP socket and leaks its handle; whether it was created.
    pub fn leak_socket() -> bool {
        let mut ret = [0u32; 2];
        // SAFETY: `ret` is 8 writable, 4-aligned bytes, the result's layout.
        unsafe { create_tcp_socket(0, ret.as_mut_ptr()) };
        ret[0] & 0xff == 0
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod raw {
    /// Natively there is no WASI: nothing to create.
    pub fn leak_socket() -> bool {
        false
    }
}

impl Sockets {
    fn open(&self) {
        let mut created = 0;
        for _ in 0..self.count {
            created += u32::from(raw::leak_socket());
        }
        if created > 0 {
            eprintln!("hostile-sockets: created {created} sockets");
        }
    }
}

impl Policy for Sockets {
    fn init(config: &Config) -> Result<Self, String> {
        let trigger = trigger(config, &[COUNT])?;
        let s = Sockets {
            trigger,
            count: config.get_u32(COUNT, 256)?,
        };
        if s.trigger.fires(Call::Init) {
            s.open();
        }
        Ok(s)
    }

    fn admit(&self, req: &Request, _view: &View) -> Admission {
        if self.trigger.fires(Call::Admit) {
            self.open();
        }
        fifo_admit(req)
    }

    fn schedule(&self, view: &View) -> Vec<Action> {
        if self.trigger.fires(Call::Schedule) {
            self.open();
        }
        fifo_schedule(view)
    }
}

export_policy!(Sockets);
