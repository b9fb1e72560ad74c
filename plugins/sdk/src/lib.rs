//! Write a maitre scheduling policy in plain Rust.
//!
//! This crate hides `wit_bindgen` from plugin authors. It generates the
//! bindings of the `maitre:policy@0.1.0` WIT world (`wit/v0.1.0/policy.wit`) once,
//! re-exports its types, and offers:
//!
//! - [`Policy`]: the trait a plugin implements (`init` builds the policy from
//!   its config, `admit` classifies, `schedule` returns actions);
//! - [`export_policy!`]: exports a [`Policy`] type as the component's `init`,
//!   `admit` and `schedule` functions;
//! - [`Config`]: typed, checked access to the arm's `[policy.config]` table;
//! - [`class_from_hint`], [`Aging`] and [`order_waiting`]: the classification,
//!   aging and ordering rules shared by maitre's own plugins;
//! - [`View::best_backend`], [`Plan`] and [`Plan::hold`]: the backend choice
//!   (model loaded, else room to load it, else the host's) and the grouping
//!   of requests by model under memory pressure;
//! - [`testing`]: builders of hand-made views for native unit tests.
//!
//! Everything but the export compiles on the native target too, so a plugin's
//! decisions can be unit-tested with a plain `cargo test` on hand-built views.
//!
//! ```
//! use maitre_policy_sdk::*;
//!
//! struct Fifo;
//!
//! impl Policy for Fifo {
//!     fn init(config: &Config) -> Result<Self, String> {
//!         config.reject_unknown(&[])?;
//!         Ok(Fifo)
//!     }
//!     fn admit(&self, req: &Request, _view: &View) -> Admission {
//!         Admission::Queue(Placement { class: class_from_hint(req, Class::Batch), priority: 0.0 })
//!     }
//!     fn schedule(&self, view: &View) -> Vec<Action> {
//!         view.waiting.iter().take(view.free_slots as usize).map(|w| start(w.id)).collect()
//!     }
//! }
//!
//! export_policy!(Fifo);
//! ```

// Lets the generated code (and the exported macros) name this crate by the
// same path from inside it and from a plugin crate.
extern crate self as maitre_policy_sdk;

mod config;
mod fleet;
pub mod testing;

pub use config::{Config, invalid};
pub use fleet::{
    Fit, GROUP_MAX_WAIT_DEFAULT_MS, GROUP_MAX_WAIT_KEY, Hold, Pick, Plan, RT_GROUP_MAX_WAIT_DEFAULT_MS,
    RT_GROUP_MAX_WAIT_KEY, model_key, start_on,
};

/// Generated bindings of the WIT world. Not part of the API: use the
/// re-exports at the crate root instead.
#[doc(hidden)]
#[allow(missing_docs, clippy::all, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/v0.2.0",
        world: "policy",
        pub_export_macro: true,
        default_bindings_module: "maitre_policy_sdk::bindings",
        export_macro_name: "__export_policy_world",
        runtime_path: "maitre_policy_sdk::__private::rt",
    });
}

/// Support items the exported macros refer to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::Guest;
    pub use wit_bindgen::rt;

    use crate::{Action, Admission, Config, Policy, Request, View};
    use std::sync::Mutex;

    /// The one policy instance of a loaded plugin, built by `init`.
    pub struct Slot<P>(Mutex<Option<P>>);

    impl<P: Policy> Slot<P> {
        /// An empty slot, filled by [`Slot::init`].
        pub const fn new() -> Self {
            Slot(Mutex::new(None))
        }

        /// Builds the policy from its config; a later `init` replaces it.
        pub fn init(&self, config: Vec<(String, String)>) -> Result<(), String> {
            let policy = P::init(&Config::from(config))?;
            *self.lock() = Some(policy);
            Ok(())
        }

        /// Calls [`Policy::admit`] on the initialised policy.
        pub fn admit(&self, req: Request, view: View) -> Admission {
            self.with(|p| p.admit(&req, &view))
        }

        /// Calls [`Policy::schedule`] on the initialised policy.
        pub fn schedule(&self, view: View) -> Vec<Action> {
            self.with(|p| p.schedule(&view))
        }

        fn with<R>(&self, f: impl FnOnce(&P) -> R) -> R {
            let guard = self.lock();
            // The host always calls `init` first; a trap tells it otherwise.
            let policy = guard
                .as_ref()
                .expect("maitre policy called before init succeeded");
            f(policy)
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Option<P>> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl<P: Policy> Default for Slot<P> {
        fn default() -> Self {
            Self::new()
        }
    }
}

pub use bindings::maitre::policy::types::{
    Action, Admission, Backend, BackendKind, Class, LoadedModel, Placement, Preemption,
    RejectWaiting, Rejection, Request, Running, Start, View, Waiting,
};

impl View {
    /// The model or tenant name a record's index points at
    /// (`waiting.model`, `running.tenant`, `loaded-model.model`, ...).
    /// Names are interned once per call, so equal names have equal indices.
    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }
}

/// A scheduling policy: what a plugin implements.
///
/// The host owns every request; a policy only decides. It is built once per
/// load from its arm's config and then answers `admit` and `schedule` calls on
/// snapshots ([`View`]). Keep it free of per-request state so the host can
/// swap it between two decisions.
pub trait Policy: Sized + Send + 'static {
    /// Builds the policy from its arm's `[policy.config]` table (plus the
    /// host's `maitre.slots` and `maitre.arm`). An error refuses the load and
    /// is shown to the user: say which key is wrong and how to fix it.
    fn init(config: &Config) -> Result<Self, String>;

    /// Classifies an arriving request (class and priority), or rejects it.
    fn admit(&self, req: &Request, view: &View) -> Admission;

    /// Decides what to do now: start, pre-empt or reject requests. Use only
    /// ids from this `view` and start at most `view.free_slots` requests
    /// (plus one per pre-emption in the same answer): the host refuses an
    /// answer with unknown ids, double starts or starts beyond the free
    /// slots as a whole and ejects the plugin (see `action` in the WIT).
    fn schedule(&self, view: &View) -> Vec<Action>;
}

/// Exports a [`Policy`] type as this component's `init`, `admit` and
/// `schedule`. Use it once, at the root of a `cdylib` crate.
///
/// On the native target it expands to nothing, so the crate's logic can be
/// unit-tested with `cargo test`.
#[macro_export]
macro_rules! export_policy {
    ($ty:ident) => {
        // The generated export glue is `unsafe` ABI code, checked by wit-bindgen.
        #[cfg(target_family = "wasm")]
        #[allow(unsafe_code)]
        const _: () = {
            static __MAITRE_POLICY: $crate::__private::Slot<$ty> = $crate::__private::Slot::new();

            struct __MaitrePolicyExport;

            impl $crate::__private::Guest for __MaitrePolicyExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __MAITRE_POLICY.init(config)
                }
                fn admit(req: $crate::Request, view: $crate::View) -> $crate::Admission {
                    __MAITRE_POLICY.admit(req, view)
                }
                fn schedule(view: $crate::View) -> ::std::vec::Vec<$crate::Action> {
                    __MAITRE_POLICY.schedule(view)
                }
            }

            $crate::bindings::__export_policy_world!(__MaitrePolicyExport);
        };
    };
}

/// `Action::Start` for a waiting request, letting the host pick the backend.
pub fn start(id: u64) -> Action {
    Action::Start(Start { id, backend: None })
}

/// `Action::Preempt` for a running request; `cut_streaming` allows cutting a
/// request that is already streaming to its client.
pub fn preempt(id: u64, cut_streaming: bool) -> Action {
    Action::Preempt(Preemption { id, cut_streaming })
}

/// `Action::Reject` for a waiting request, answered as `status` + `{"error": message}`.
pub fn reject(id: u64, status: u16, message: impl Into<String>) -> Action {
    Action::Reject(RejectWaiting {
        id,
        rejection: Rejection {
            status,
            message: message.into(),
        },
    })
}

/// The request's class from its `X-Priority` header (as read by the host),
/// or `default` when the header is absent or not recognised.
pub fn class_from_hint(req: &Request, default: Class) -> Class {
    req.class_hint.unwrap_or(default)
}

/// Aging of waiting batch requests, so that batch work never starves.
///
/// Effective priority = admission priority
/// + `boost` × ⌊waited seconds / `threshold_seconds`⌋ for batch requests,
///   where waited = `now-ms − arrival-ms`. Real-time requests do not age.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aging {
    /// Seconds of waiting per aging step (> 0).
    pub threshold_seconds: f64,
    /// Priority added per full step (≥ 0).
    pub boost: f64,
}

impl Aging {
    /// Config key of [`Aging::threshold_seconds`].
    pub const THRESHOLD_KEY: &'static str = "aging_threshold_seconds";
    /// Config key of [`Aging::boost`].
    pub const BOOST_KEY: &'static str = "aging_boost";

    /// Reads `aging_threshold_seconds` (a number > 0) and `aging_boost`
    /// (a number ≥ 0) from the config, with the given defaults.
    pub fn from_config(
        config: &Config,
        default_threshold_seconds: f64,
        default_boost: f64,
    ) -> Result<Self, String> {
        let threshold_seconds = config.get_f64(Self::THRESHOLD_KEY, default_threshold_seconds)?;
        if threshold_seconds <= 0.0 {
            return Err(format!(
                "{}: must be greater than 0 seconds, got {threshold_seconds}",
                Self::THRESHOLD_KEY
            ));
        }
        let boost = config.get_f64(Self::BOOST_KEY, default_boost)?;
        if boost < 0.0 {
            return Err(format!(
                "{}: must be 0 or more, got {boost}",
                Self::BOOST_KEY
            ));
        }
        Ok(Aging {
            threshold_seconds,
            boost,
        })
    }

    /// Number of full aging steps after waiting `waited_ms` milliseconds.
    pub fn steps(&self, waited_ms: u64) -> f64 {
        (waited_ms as f64 / (self.threshold_seconds * 1000.0)).floor()
    }

    /// Effective priority of a waiting request at `now_ms`.
    pub fn priority(&self, w: &Waiting, now_ms: u64) -> f64 {
        self.effective(w.class, w.priority, w.arrival_ms, now_ms)
    }

    /// Effective priority of a running request at `now_ms` (aged from its
    /// arrival, like a waiting one).
    pub fn running_priority(&self, r: &Running, now_ms: u64) -> f64 {
        self.effective(r.class, r.priority, r.arrival_ms, now_ms)
    }

    /// Base priority plus, for batch, `boost` per full threshold waited since arrival.
    pub fn effective(&self, class: Class, base: f64, arrival_ms: u64, now_ms: u64) -> f64 {
        match class {
            Class::Realtime => base,
            Class::Batch => base + self.boost * self.steps(now_ms.saturating_sub(arrival_ms)),
        }
    }
}

/// Reads a class name: `realtime`/`rt`/`high` or `batch`/`be`/`low`
/// (case-insensitive), the same words the `X-Priority` header takes.
pub fn parse_class(value: &str) -> Option<Class> {
    let v = value.trim();
    if ["realtime", "rt", "high"]
        .iter()
        .any(|w| v.eq_ignore_ascii_case(w))
    {
        Some(Class::Realtime)
    } else if ["batch", "be", "low"]
        .iter()
        .any(|w| v.eq_ignore_ascii_case(w))
    {
        Some(Class::Batch)
    } else {
        None
    }
}

/// Order of waiting requests: effective priority descending, then arrival
/// ascending, then id ascending. Yields indices into `view.waiting`.
///
/// `priority` gives each request's effective priority; it is called once per
/// request, not once per comparison. The order is made lazily (a heap): a
/// decision that stops after its free slots are filled pays for the few
/// requests it looked at, not for sorting the whole window.
pub fn order_waiting(
    view: &View,
    mut priority: impl FnMut(&Waiting) -> f64,
) -> impl Iterator<Item = usize> {
    let mut heap: std::collections::BinaryHeap<InLine> = view
        .waiting
        .iter()
        .enumerate()
        .map(|(i, w)| InLine {
            priority: priority(w),
            arrival_ms: w.arrival_ms,
            id: w.id,
            index: i,
        })
        .collect();
    std::iter::from_fn(move || heap.pop().map(|k| k.index))
}

/// A waiting request's place in [`order_waiting`]: the greatest goes first.
struct InLine {
    priority: f64,
    arrival_ms: u64,
    id: u64,
    index: usize,
}

impl Ord for InLine {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then(other.arrival_ms.cmp(&self.arrival_ms))
            .then(other.id.cmp(&self.id))
    }
}

impl PartialOrd for InLine {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for InLine {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for InLine {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::waiting;

    /// A policy that starts the first `n` waiting requests, `n` from config.
    struct FirstN(usize);

    impl Policy for FirstN {
        fn init(config: &Config) -> Result<Self, String> {
            config.reject_unknown(&["n"])?;
            Ok(FirstN(config.get_u32("n", 1)? as usize))
        }
        fn admit(&self, req: &Request, _view: &View) -> Admission {
            Admission::Queue(Placement {
                class: class_from_hint(req, Class::Batch),
                priority: self.0 as f64,
            })
        }
        fn schedule(&self, view: &View) -> Vec<Action> {
            view.waiting
                .iter()
                .take(self.0)
                .map(|w| start(w.id))
                .collect()
        }
    }

    #[test]
    fn export_slot_keeps_the_policy_built_by_the_last_successful_init() {
        use crate::testing::{request, started, view};
        let slot = __private::Slot::<FirstN>::new();
        let kv = |n: &str| vec![("n".to_owned(), n.to_owned())];
        let v = || {
            view(
                0,
                4,
                vec![],
                vec![
                    waiting(1, Class::Batch, 0.0, 0),
                    waiting(2, Class::Batch, 0.0, 1),
                ],
            )
        };
        assert_eq!(
            slot.init(kv("x")),
            Err("n: expected a whole number, got \"x\"".into())
        );
        slot.init(kv("1")).unwrap();
        assert_eq!(started(&slot.schedule(v())), [1]);
        slot.init(kv("2")).unwrap();
        assert_eq!(started(&slot.schedule(v())), [1, 2]);
        // A failed re-init keeps the working policy.
        assert!(slot.init(kv("-1")).is_err());
        assert_eq!(started(&slot.schedule(v())), [1, 2]);
        match slot.admit(request(1, 0, Some(Class::Realtime)), v()) {
            Admission::Queue(p) => assert_eq!((p.class, p.priority), (Class::Realtime, 2.0)),
            Admission::Reject(r) => panic!("rejected: {}", r.message),
        }
    }

    #[test]
    #[should_panic(expected = "before init")]
    fn export_slot_traps_when_called_before_init() {
        let slot = __private::Slot::<FirstN>::new();
        slot.schedule(crate::testing::view(0, 1, vec![], vec![]));
    }

    #[test]
    fn aging_adds_boost_per_full_threshold_for_batch_only() {
        let aging = Aging {
            threshold_seconds: 60.0,
            boost: 0.5,
        };
        let b = waiting(1, Class::Batch, 0.0, 1_000);
        assert_eq!(aging.priority(&b, 1_000), 0.0);
        assert_eq!(aging.priority(&b, 60_999), 0.0);
        assert_eq!(aging.priority(&b, 61_000), 0.5);
        assert_eq!(aging.priority(&b, 121_000), 1.0);
        assert_eq!(aging.priority(&b, 181_000), 1.5);
        // A clock before arrival (should not happen) does not underflow.
        assert_eq!(aging.priority(&b, 0), 0.0);
        let rt = waiting(2, Class::Realtime, 1.0, 0);
        assert_eq!(aging.priority(&rt, 10_000_000), 1.0);
    }

    #[test]
    fn aging_config_defaults_and_errors() {
        let d = Aging::from_config(&Config::default(), 60.0, 0.5).unwrap();
        assert_eq!((d.threshold_seconds, d.boost), (60.0, 0.5));
        let bad = |k: &str, v: &str| {
            Aging::from_config(&Config::from(vec![(k.to_owned(), v.to_owned())]), 60.0, 0.5)
                .unwrap_err()
        };
        assert!(bad("aging_threshold_seconds", "0").starts_with("aging_threshold_seconds:"));
        assert!(bad("aging_threshold_seconds", "-1").starts_with("aging_threshold_seconds:"));
        assert!(bad("aging_boost", "-0.5").starts_with("aging_boost:"));
        assert!(bad("aging_boost", "lots").starts_with("aging_boost:"));
    }

    #[test]
    fn class_words_match_the_header_words() {
        assert_eq!(parse_class("RealTime"), Some(Class::Realtime));
        assert_eq!(parse_class("rt"), Some(Class::Realtime));
        assert_eq!(parse_class("HIGH"), Some(Class::Realtime));
        assert_eq!(parse_class("batch"), Some(Class::Batch));
        assert_eq!(parse_class("be"), Some(Class::Batch));
        assert_eq!(parse_class("low"), Some(Class::Batch));
        assert_eq!(parse_class("urgent"), None);
    }

    #[test]
    fn order_is_priority_then_arrival_then_id() {
        let view = View {
            now_ms: 0,
            total_slots: 1,
            free_slots: 1,
            names: vec!["m".into()],
            backends: vec![],
            running: vec![],
            waiting: vec![
                waiting(5, Class::Batch, 0.0, 10),
                waiting(4, Class::Batch, 0.0, 10),
                waiting(3, Class::Realtime, 1.0, 20),
                waiting(2, Class::Batch, 0.0, 5),
            ],
            beyond: vec![],
        };
        assert_eq!(view.name(view.waiting[0].model), "m");
        assert_eq!(view.name(7), "");
        let ids: Vec<u64> = order_waiting(&view, |w| w.priority)
            .map(|i| view.waiting[i].id)
            .collect();
        assert_eq!(ids, [3, 2, 4, 5]);
    }
}
