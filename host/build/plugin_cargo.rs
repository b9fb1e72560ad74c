//! How maitre runs the nested cargo that builds the `plugins/` workspace for
//! `wasm32-wasip2`. Shared by `host/build.rs` (the built-in plugins, on every
//! build) and the e2e test kit (the hostile test plugins, on first use), so
//! both call cargo the same way.
//!
//! The nested cargo always gets its own target dir: sharing the outer build's
//! would deadlock on cargo's build-directory lock.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target every policy plugin is built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// The cargo to run: the one running us (`CARGO`), else `cargo` on the PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `cargo <args>` with the outer build's variables removed: its flags,
/// wrappers and target settings are meant for the host, not for wasm32.
pub fn nested_cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let cargo_var = k.starts_with("CARGO_")
            && k != "CARGO_HOME"
            && k != "CARGO_MAKEFLAGS"
            && !k.starts_with("CARGO_REGISTRIES")
            && !k.starts_with("CARGO_NET")
            && !k.starts_with("CARGO_HTTP");
        if cargo_var || k == "RUSTFLAGS" || k == "RUSTC_WORKSPACE_WRAPPER" || k == "RUSTC_WRAPPER" {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// `cargo build --release --locked --target wasm32-wasip2` of `packages` (or
/// `-p` patterns such as `hostile-*`) of the plugins workspace whose manifest
/// is `manifest`, into `target_dir`.
pub fn build_plugins(manifest: &Path, target_dir: &Path, packages: &[&str]) -> Command {
    let mut cmd = nested_cargo(&["build", "--release", "--locked", "--target", WASM_TARGET]);
    cmd.arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd
}

/// Where [`build_plugins`] puts the components (`<crate_name>.wasm`).
pub fn output_dir(target_dir: &Path) -> PathBuf {
    target_dir.join(WASM_TARGET).join("release")
}
