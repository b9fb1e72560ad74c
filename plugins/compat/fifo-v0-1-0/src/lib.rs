//! FIFO written against `maitre:policy@0.1.0` directly with `wit-bindgen`,
//! as a plugin from before 0.2.0 was: it must keep loading and serving.
//! It sees the whole queue (0.1.0 has no candidate window) and strings for
//! model names; it starts the oldest waiting requests, one per free slot,
//! and admits each request in its hinted class (batch when none).

// The generated bindings and export glue are unsafe code; the workspace
// denies it, the SDK contains it for every other plugin.
#![allow(missing_docs, unsafe_code)]

wit_bindgen::generate!({
    path: "../../../wit/v0.1.0",
    world: "policy",
});

use maitre::policy::types::{Class, Placement, Start};

struct Fifo;

impl Guest for Fifo {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        match config.iter().find(|(k, _)| !k.starts_with("maitre.")) {
            Some((k, _)) => Err(format!("unknown config key {k:?}: this plugin takes none")),
            None => Ok(()),
        }
    }

    fn admit(req: Request, _view: View) -> Admission {
        Admission::Queue(Placement {
            class: req.class_hint.unwrap_or(Class::Batch),
            priority: 0.0,
        })
    }

    fn schedule(view: View) -> Vec<Action> {
        view.waiting
            .iter()
            .take(view.free_slots as usize)
            .map(|w| Action::Start(Start {
                id: w.id,
                backend: None,
            }))
            .collect()
    }
}

export!(Fifo);
