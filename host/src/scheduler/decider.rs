//! The seam between the scheduler's state machine and a policy.
//!
//! The state machine asks a [`Decider`] to admit a request and to schedule
//! an arm; it never knows whether a WebAssembly plugin, the built-in FIFO
//! or a test double answers. That keeps wasmtime out of the state machine's
//! unit tests, and lets a simulator drive the same code.

use std::future::Future;
use std::pin::Pin;

use crate::plugin::{Instance, PluginError};
use crate::policy::{Action, Admission, Class, Placement, Request, View};

/// A decision in flight: boxed so [`Decider`] can be a trait object.
pub type Decision<'a, T> = Pin<Box<dyn Future<Output = Result<T, PluginError>> + Send + 'a>>;

/// Something that decides for one arm.
pub trait Decider: Send {
    /// Classifies an arriving request, or rejects it.
    fn admit<'a>(&'a mut self, req: &'a Request, view: &'a View) -> Decision<'a, Admission>;
    /// What to do now, given the arm's view.
    fn schedule<'a>(&'a mut self, view: &'a View) -> Decision<'a, Vec<Action>>;
    /// Whether it decides on a candidate window of the queue rather than
    /// the whole queue (interface 0.2.0 and later; the built-in FIFO).
    fn windowed(&self) -> bool {
        false
    }
}

impl Decider for Instance {
    fn admit<'a>(&'a mut self, req: &'a Request, view: &'a View) -> Decision<'a, Admission> {
        Box::pin(Instance::admit(self, req, view))
    }
    fn schedule<'a>(&'a mut self, view: &'a View) -> Decision<'a, Vec<Action>> {
        Box::pin(Instance::schedule(self, view))
    }
    fn windowed(&self) -> bool {
        Instance::windowed(self)
    }
}

/// The built-in FIFO: serves an arm whose plugin was ejected. Never fails.
pub struct Fifo;

impl Fifo {
    /// Queues every request in its hinted class (batch when none), in order.
    pub fn admission(req: &Request) -> Admission {
        Admission::Queue(Placement {
            class: req.class_hint.unwrap_or(Class::Batch),
            priority: 0.0,
        })
    }

    /// Starts the oldest waiting requests, one per free slot.
    pub fn actions(view: &View) -> Vec<Action> {
        view.waiting
            .iter()
            .take(view.free_slots as usize)
            .map(|w| Action::Start {
                id: w.id,
                backend: None,
            })
            .collect()
    }
}

impl Decider for Fifo {
    fn admit<'a>(&'a mut self, req: &'a Request, _view: &'a View) -> Decision<'a, Admission> {
        let a = Fifo::admission(req);
        Box::pin(async move { Ok(a) })
    }
    fn schedule<'a>(&'a mut self, view: &'a View) -> Decision<'a, Vec<Action>> {
        let a = Fifo::actions(view);
        Box::pin(async move { Ok(a) })
    }
    /// The oldest requests of each class are always in the window, so the
    /// oldest overall is too: FIFO needs no more.
    fn windowed(&self) -> bool {
        true
    }
}
