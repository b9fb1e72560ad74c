//! The policy plugins compiled into the `maitre` binary (`builtin:NAME` in a
//! policy file).
//!
//! The list is not written here: `host/build.rs` builds every package of the
//! `plugins/` workspace whose Cargo.toml says `[package.metadata.maitre]
//! builtin = true` and generates the table this module includes. Adding a
//! built-in is therefore one key in its Cargo.toml (and a line in the docs,
//! which a test below checks).

use std::path::PathBuf;

/// One plugin embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// The name after `builtin:` (its package name in `plugins/`).
    pub name: &'static str,
    /// The component's file name in [`BUILT_PLUGIN_DIR`], e.g. `reserved_aging.wasm`.
    pub file: &'static str,
    /// The WebAssembly component.
    pub wasm: &'static [u8],
}

// Defines `TABLE`, `DIR` and `TARGET_DIR` (see host/build.rs).
include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// Every built-in plugin, sorted by name.
pub const BUILTINS: &[Builtin] = TABLE;

/// Where the build put the built-in components on disk, for tests and
/// benchmarks that need plugin files (e.g. to exercise hot reload).
pub const BUILT_PLUGIN_DIR: &str = DIR;

/// The target dir of the nested cargo that builds the `plugins/` workspace
/// (`BUILT_PLUGIN_DIR` is `wasm32-wasip2/release` inside it), so the test kit
/// can build the hostile test plugins there on first use.
pub const PLUGIN_TARGET_DIR: &str = TARGET_DIR;

/// Names accepted after `builtin:` in a policy file, sorted.
pub fn names() -> impl Iterator<Item = &'static str> + Clone {
    BUILTINS.iter().map(|b| b.name)
}

/// The component of the built-in plugin `name`, if there is one.
pub fn bytes(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|b| b.name == name).map(|b| b.wasm)
}

/// Path of a built-in plugin's component on disk, e.g.
/// `built_plugin_path("fifo")`, for tests and benchmarks.
///
/// # Panics
///
/// If `crate_name` is not a built-in: callers pass a literal, so this is a
/// bug in the caller.
pub fn built_plugin_path(crate_name: &str) -> PathBuf {
    let b = BUILTINS
        .iter()
        .find(|b| b.name == crate_name)
        .unwrap_or_else(|| {
            panic!(
                "{crate_name:?} is not a built-in plugin (built in are: {})",
                names().collect::<Vec<_>>().join(", ")
            )
        });
    PathBuf::from(BUILT_PLUGIN_DIR).join(b.file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header of every WebAssembly component (magic, then the component
    /// layer's version), as opposed to a core module.
    const COMPONENT_HEADER: [u8; 8] = [0x00, b'a', b's', b'm', 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn every_builtin_is_an_embedded_component_equal_to_its_file() {
        assert!(!BUILTINS.is_empty());
        for b in BUILTINS {
            assert!(
                b.wasm.starts_with(&COMPONENT_HEADER),
                "builtin:{} is not a WebAssembly component",
                b.name
            );
            let on_disk = std::fs::read(built_plugin_path(b.name)).unwrap();
            assert!(
                on_disk == b.wasm,
                "builtin:{} differs from its file",
                b.name
            );
            assert_eq!(bytes(b.name), Some(b.wasm));
        }
        assert_eq!(bytes("no-such-plugin"), None);
    }

    /// The docs cannot be generated, so this keeps them honest: a new
    /// built-in fails here until the README and plugins/README.md list it.
    #[test]
    fn the_docs_list_every_builtin() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let plugins = std::fs::read_to_string(format!("{root}/plugins/README.md")).unwrap();
        for name in names() {
            let shipped = format!("[`{name}`](plugins/{name}/README.md)");
            assert!(
                readme.contains(&shipped),
                "README.md's \"Plugins shipped\" lacks {shipped}"
            );
            let row = format!("| `{name}` |");
            assert!(
                plugins.contains(&row),
                "plugins/README.md lacks a row {row}"
            );
        }
    }
}
