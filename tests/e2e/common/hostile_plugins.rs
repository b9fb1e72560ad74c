//! The hostile test plugins of `plugins/hostile/` and the compat ones of
//! `plugins/compat/` (built against older interfaces), built on first use.
//!
//! A production build (`host/build.rs`) builds only the built-in plugins;
//! these exist for the tests alone. The first call in a test process builds
//! all of them (`-p 'hostile-*'`) with one nested cargo, into the plugins
//! workspace's own target dir (the one `host/build.rs` uses, never the outer
//! one, whose lock `cargo test` holds). Later calls reuse that build, and a
//! later run costs cargo's freshness check only, so a plain `cargo test` works
//! on a clean clone.

#[path = "../../../host/build/plugin_cargo.rs"]
pub mod plugin_cargo;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Path of the built component of a hostile plugin, e.g.
/// `hostile_plugin("hostile-trap")`, building them all first if this process
/// has not yet.
pub fn hostile_plugin(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(build_all)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} was not built: is {crate_name} a member of plugins/Cargo.toml, named hostile-* or compat-*?",
        path.display()
    );
    path
}

/// Builds every `hostile-*` package for wasm32-wasip2; returns the folder of
/// the components.
fn build_all() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.toml");
    let target_dir = Path::new(maitre::builtins::PLUGIN_TARGET_DIR);
    let status = plugin_cargo::build_plugins(&manifest, target_dir, &["hostile-*", "compat-*"])
        .status()
        .map_err(|e| format!("could not run cargo to build the hostile plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the hostile plugins of {} failed (see the cargo output above)",
            manifest.display()
        ));
    }
    Ok(plugin_cargo::output_dir(target_dir))
}
