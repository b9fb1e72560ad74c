//! What the e2e tests share: the test kit (`maitre-testkit`, shared with the
//! benches) and the path of the binary under test, which only this crate
//! knows (`CARGO_BIN_EXE_maitre` is set when a test target is compiled).

pub mod hostile_plugins;

pub use maitre_testkit::*;

/// The `maitre` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_maitre");

/// `maitre serve`, to configure before [`Serve::start`].
pub fn serve() -> Serve {
    Serve::new(BIN)
}

/// `maitre serve` on `policy`, once it is ready.
pub fn start(policy: &PolicyFile) -> Maitre {
    serve().policy(policy).start()
}
