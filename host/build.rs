//! Builds the policy plugins (the `plugins/` workspace) for wasm32-wasip2 so the
//! default plugin is embedded in the `maitre` binary and nobody has to build it
//! by hand. The nested cargo gets its own target dir (`<target>/plugins`):
//! sharing the outer one would deadlock on cargo's build-directory lock.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .expect("host/ sits in the workspace root");
    let plugins = root.join("plugins");
    println!("cargo:rerun-if-changed={}", plugins.display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!("cargo:rerun-if-env-changed=MAITRE_PLUGIN_TARGET_DIR");

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = match env::var_os("MAITRE_PLUGIN_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        // OUT_DIR is <target>/<profile>/build/maitre-<hash>/out
        None => out_dir
            .ancestors()
            .nth(4)
            .map(|t| t.join("plugins"))
            .unwrap_or_else(|| out_dir.join("plugins")),
    };

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ensure_wasm_target();

    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--locked", "--target", WASM_TARGET])
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags and wrappers are meant for the host target.
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_")
            && k != "CARGO_HOME"
            && k != "CARGO_MAKEFLAGS"
            && !k.starts_with("CARGO_REGISTRIES")
            && !k.starts_with("CARGO_NET")
            && !k.starts_with("CARGO_HTTP")
            || k == "RUSTFLAGS"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTC_WRAPPER"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run {cargo} to build the policy plugins: {e}"));
    if !status.success() {
        panic!(
            "building the policy plugins in {} for {WASM_TARGET} failed (see the output above)",
            plugins.display()
        );
    }
    let dir = target_dir.join(WASM_TARGET).join("release");
    for name in ["reserved_aging", "fifo", "preemptive"] {
        let f = dir.join(format!("{name}.wasm"));
        assert!(
            f.exists(),
            "the plugin build did not produce {}",
            f.display()
        );
    }
    println!("cargo:rustc-env=MAITRE_PLUGIN_DIR={}", dir.display());
}

/// Adds the wasm32-wasip2 target with rustup when it is missing, so a fresh
/// machine needs no manual step.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = |root: &Path| root.join("lib/rustlib").join(WASM_TARGET).exists();
    if sysroot.as_deref().is_some_and(installed) {
        return;
    }
    println!(
        "cargo:warning=adding the {WASM_TARGET} target with rustup (needed to build the policy plugins)"
    );
    let ok = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "the {WASM_TARGET} Rust target is missing and `rustup target add {WASM_TARGET}` failed; install it by hand and build again"
        );
    }
}
