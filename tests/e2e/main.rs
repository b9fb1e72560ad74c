//! maitre's end-to-end tests, in one test binary (one link instead of one per
//! topic): each module starts the real `maitre` binary against the upstream
//! model on loopback ports and checks what clients, the upstream, the log and
//! `/metrics` see. `cargo test --release -p maitre --test e2e [MODULE::]`.

mod common;

mod admin_hardening;
mod aggregate;
mod bypass;
mod clients;
mod faults;
mod fleet;
mod hostile;
mod interfaces;
mod live;
mod memory;
mod normalise;
mod openai_upstream;
mod preemption;
mod proxy;
mod ready;
mod sandbox;
mod scheduling;
mod shadow;
mod simulate;
mod stalls;
mod streaming;
mod template;
mod validation;
