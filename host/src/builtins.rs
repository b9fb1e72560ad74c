//! The plugins compiled into the `maitre` binary (`plugin = "builtin:NAME"`).

use std::path::{Path, PathBuf};

/// The built-in plugins, by name.
pub const BUILTINS: &[(&str, &[u8])] = &[
    (
        "reserved-aging",
        include_bytes!(concat!(env!("MAITRE_PLUGIN_DIR"), "/reserved_aging.wasm")),
    ),
    (
        "fifo",
        include_bytes!(concat!(env!("MAITRE_PLUGIN_DIR"), "/fifo.wasm")),
    ),
    (
        "preemptive",
        include_bytes!(concat!(env!("MAITRE_PLUGIN_DIR"), "/preemptive.wasm")),
    ),
];

/// Names accepted after `builtin:` in a policy file.
pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}

/// The bytes of a built-in plugin.
pub fn bytes(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Where the build put the plugin components (used by tests and benchmarks
/// that need plugin files on disk, e.g. to exercise hot reload).
pub const BUILT_PLUGIN_DIR: &str = env!("MAITRE_PLUGIN_DIR");

/// Path of a built plugin component on disk, e.g. `built_plugin_path("fifo")`.
pub fn built_plugin_path(crate_name: &str) -> PathBuf {
    Path::new(BUILT_PLUGIN_DIR).join(format!("{}.wasm", crate_name.replace('-', "_")))
}
