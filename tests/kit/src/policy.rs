//! A typed builder for maitre's policy file. Tests used to fill `format!`
//! templates and patch them with `str::replace`; a typo there wrote a file
//! maitre refused (or worse, read differently). Here every key is a field and
//! the text comes from the `toml` serialiser.
//!
//! ```
//! use maitre_testkit::{Arm, Limits, PolicyFile};
//! let text = PolicyFile::new("http://127.0.0.1:9", 2)
//!     .arm(Arm::builtin("main", "reserved-aging").config("rt_reserved_slots", 1))
//!     .limits(Limits { max_waiting: Some(1), ..Limits::default() })
//!     .to_toml();
//! assert!(text.contains("plugin = \"builtin:reserved-aging\""));
//! ```

use std::path::Path;

use serde::Serialize;

/// One policy file: the listeners, the upstream, optional `[limits]` and
/// `[ab]`, and one `[[policy]]` per arm. Listeners default to loopback port 0
/// (the OS picks; the ready file says which).
#[derive(Clone, Debug, Serialize)]
pub struct PolicyFile {
    listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_header: Option<String>,
    upstream: Upstreams,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<Fleet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ab: Option<Ab>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<Trace>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    models: std::collections::BTreeMap<String, toml::Table>,
    #[serde(rename = "policy", skip_serializing_if = "Vec::is_empty")]
    arms: Vec<Arm>,
}

/// One `[upstream]` table, or `[[upstream]]` entries.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
enum Upstreams {
    One(Backend),
    Many(Vec<Backend>),
}

/// One backend: the `[upstream]` table or one `[[upstream]]` entry.
#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    url: String,
    slots: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_loaded_models: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass_priority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    busy_check: Option<String>,
}

impl Backend {
    /// A `[[upstream]]` entry named `name` at `url` with `slots` slots.
    pub fn new(name: impl Into<String>, url: impl Into<String>, slots: u32) -> Backend {
        Backend {
            name: Some(name.into()),
            url: url.into(),
            slots,
            max_loaded_models: None,
            first_byte_timeout_seconds: None,
            kind: None,
            pass_priority: None,
            busy_check: None,
        }
    }

    /// Its `kind` (`"ollama"` or `"openai"`).
    pub fn kind(mut self, kind: &str) -> Backend {
        self.kind = Some(kind.into());
        self
    }

    /// Its `pass_priority` (`"vllm"`).
    pub fn pass_priority(mut self, convention: &str) -> Backend {
        self.pass_priority = Some(convention.into());
        self
    }

    /// Its `max_loaded_models`.
    pub fn max_loaded_models(mut self, n: u32) -> Backend {
        self.max_loaded_models = Some(n);
        self
    }
}

/// `[fleet]`: each field left `None` keeps maitre's default.
#[derive(Clone, Debug, Default, Serialize)]
#[allow(missing_docs)] // the keys are documented in the README's fleet section
pub struct Fleet {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ps_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_failovers: Option<u32>,
}

/// `[limits]`: each field left `None` keeps maitre's default.
#[derive(Clone, Debug, Default, Serialize)]
#[allow(missing_docs)] // the keys are documented in the README's policy-file table
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_window: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_waiting: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tick_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_call_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_preemptions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starvation_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_read_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_total_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
}

/// `[trace]`: where each scheduled request is recorded.
#[derive(Clone, Debug, Serialize)]
struct Trace {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rotate_bytes: Option<u64>,
}

/// `[ab]`: how traffic is split between the arms.
#[derive(Clone, Debug, Serialize)]
pub struct Ab {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_seconds: Option<f64>,
}

impl Ab {
    /// `mode = "switchback"`: the whole upstream alternates between arms in
    /// turns of `window_seconds`.
    pub fn switchback(window_seconds: f64) -> Ab {
        Ab {
            mode: "switchback",
            window_seconds: Some(window_seconds),
        }
    }
}

/// One `[[policy]]`: an arm with its plugin, weight and `[policy.config]`.
#[derive(Clone, Debug, Serialize)]
pub struct Arm {
    name: String,
    plugin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow: bool,
    #[serde(skip_serializing_if = "toml::Table::is_empty")]
    config: toml::Table,
}

impl Arm {
    /// An arm running `plugin`: `builtin:NAME` or a path to a `.wasm` file
    /// (relative to the policy file's folder).
    pub fn new(name: impl Into<String>, plugin: impl Into<String>) -> Arm {
        Arm {
            name: name.into(),
            plugin: plugin.into(),
            weight: None,
            shadow: false,
            config: toml::Table::new(),
        }
    }

    /// An arm running the built-in plugin `builtin` (e.g. `"reserved-aging"`).
    pub fn builtin(name: impl Into<String>, builtin: &str) -> Arm {
        Arm::new(name, format!("builtin:{builtin}"))
    }

    /// Its A/B weight (maitre's default when not set).
    pub fn weight(mut self, weight: u32) -> Arm {
        self.weight = Some(weight);
        self
    }

    /// Makes it a shadow arm (`shadow = true`): it watches, never serves.
    pub fn shadow(mut self) -> Arm {
        self.shadow = true;
        self
    }

    /// One `[policy.config]` key, handed to the plugin's `init`.
    pub fn config(mut self, key: &str, value: impl Into<toml::Value>) -> Arm {
        self.config.insert(key.to_string(), value.into());
        self
    }

    /// Several `[policy.config]` keys at once, e.g. from `toml::toml! { .. }`.
    pub fn configs(mut self, table: toml::Table) -> Arm {
        self.config.extend(table);
        self
    }
}

impl PolicyFile {
    /// A file with loopback port-0 listeners (client and admin) in front of
    /// `upstream` with `slots` slots, and no arm yet.
    pub fn new(upstream: impl Into<String>, slots: u32) -> PolicyFile {
        PolicyFile {
            listen: "127.0.0.1:0".into(),
            admin_listen: Some("127.0.0.1:0".into()),
            admin_token: None,
            tenant_header: None,
            upstream: Upstreams::One(Backend {
                name: None,
                url: upstream.into(),
                slots,
                max_loaded_models: None,
                first_byte_timeout_seconds: None,
                kind: None,
                pass_priority: None,
                busy_check: None,
            }),
            fleet: None,
            limits: None,
            ab: None,
            trace: None,
            models: Default::default(),
            arms: Vec::new(),
        }
    }

    /// Sets `tenant_header`: the header that names a request's tenant.
    pub fn tenant_header(mut self, header: &str) -> PolicyFile {
        self.tenant_header = Some(header.into());
        self
    }

    /// Adds an arm (a `[[policy]]`); arms keep the order they are added in.
    pub fn arm(mut self, arm: Arm) -> PolicyFile {
        self.arms.push(arm);
        self
    }

    /// Sets `[limits]`.
    pub fn limits(mut self, limits: Limits) -> PolicyFile {
        self.limits = Some(limits);
        self
    }

    /// Sets `[ab]`.
    pub fn ab(mut self, ab: Ab) -> PolicyFile {
        self.ab = Some(ab);
        self
    }

    /// Sets `[trace]`: one JSON line per scheduled request to `path`
    /// (relative to the policy file's folder), rotated past `rotate_bytes`.
    pub fn trace(mut self, path: impl Into<String>, rotate_bytes: Option<u64>) -> PolicyFile {
        self.trace = Some(Trace {
            path: path.into(),
            rotate_bytes,
        });
        self
    }

    /// Leaves out `admin_listen`: no admin listener.
    pub fn no_admin(mut self) -> PolicyFile {
        self.admin_listen = None;
        self
    }

    /// Sets `admin_token`: the bearer token the mutating admin endpoints need.
    pub fn admin_token(mut self, token: impl Into<String>) -> PolicyFile {
        self.admin_token = Some(token.into());
        self
    }

    /// Sets `kind` (and `pass_priority`, if given) of the one `[upstream]`.
    pub fn upstream_kind(mut self, kind: &str, pass_priority: Option<&str>) -> PolicyFile {
        if let Upstreams::One(b) = &mut self.upstream {
            b.kind = Some(kind.into());
            b.pass_priority = pass_priority.map(Into::into);
        }
        self
    }

    /// Sets `busy_check` of a single `[upstream]` (`"llama-server"`).
    pub fn busy_check(mut self, check: &str) -> PolicyFile {
        if let Upstreams::One(b) = &mut self.upstream {
            b.busy_check = Some(check.into());
        }
        self
    }

    /// Sets `first_byte_timeout_seconds` of every backend.
    pub fn first_byte_timeout_seconds(mut self, seconds: u64) -> PolicyFile {
        match &mut self.upstream {
            Upstreams::One(b) => b.first_byte_timeout_seconds = Some(seconds),
            Upstreams::Many(v) => {
                for b in v {
                    b.first_byte_timeout_seconds = Some(seconds);
                }
            }
        }
        self
    }

    /// A fleet: `[[upstream]]` entries replace the one `[upstream]`.
    pub fn backends(mut self, backends: impl IntoIterator<Item = Backend>) -> PolicyFile {
        self.upstream = Upstreams::Many(backends.into_iter().collect());
        self
    }

    /// Sets `[fleet]`.
    pub fn fleet(mut self, fleet: Fleet) -> PolicyFile {
        self.fleet = Some(fleet);
        self
    }

    /// Adds a `[models."NAME"]` table (`num_ctx`, `keep_alive`).
    pub fn model_rule(mut self, model: &str, rule: toml::Table) -> PolicyFile {
        self.models.insert(model.into(), rule);
        self
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a policy file always serialises")
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_every_part_in_a_form_toml_reads_back() {
        let file = PolicyFile::new("http://127.0.0.1:9", 2)
            .admin_token("t")
            .first_byte_timeout_seconds(1)
            .limits(Limits {
                max_waiting: Some(1),
                ..Limits::default()
            })
            .ab(Ab::switchback(0.3))
            .arm(
                Arm::builtin("alpha", "reserved-aging")
                    .weight(50)
                    .config("rt_reserved_slots", 1)
                    .config("aging_boost", 0.5),
            )
            .arm(Arm::new("beta", "p.wasm").configs(toml::toml! { call = "admit" }));
        let back: toml::Table = toml::from_str(&file.to_toml()).unwrap();
        assert_eq!(back["admin_token"].as_str(), Some("t"));
        assert_eq!(back["upstream"]["slots"].as_integer(), Some(2));
        assert_eq!(
            back["upstream"]["first_byte_timeout_seconds"].as_integer(),
            Some(1)
        );
        assert_eq!(back["limits"]["max_waiting"].as_integer(), Some(1));
        assert_eq!(
            back["limits"].as_table().unwrap().len(),
            1,
            "unset limits are left out"
        );
        assert_eq!(back["ab"]["mode"].as_str(), Some("switchback"));
        let arms = back["policy"].as_array().unwrap();
        assert_eq!(arms[0]["plugin"].as_str(), Some("builtin:reserved-aging"));
        assert_eq!(arms[0]["weight"].as_integer(), Some(50));
        assert_eq!(arms[0]["config"]["aging_boost"].as_float(), Some(0.5));
        assert_eq!(arms[1]["config"]["call"].as_str(), Some("admit"));
        assert!(arms[1].get("weight").is_none());
    }

    #[test]
    fn a_fleet_is_written_as_upstream_entries() {
        let file = PolicyFile::new("http://unused", 1)
            .backends([
                Backend::new("a", "http://127.0.0.1:1", 2).max_loaded_models(1),
                Backend::new("b", "http://127.0.0.1:2", 3),
            ])
            .fleet(Fleet {
                probe_interval_ms: Some(100),
                ..Fleet::default()
            })
            .arm(Arm::builtin("main", "fifo"));
        let back: toml::Table = toml::from_str(&file.to_toml()).unwrap();
        let ups = back["upstream"].as_array().unwrap();
        assert_eq!(ups.len(), 2);
        assert_eq!(ups[0]["name"].as_str(), Some("a"));
        assert_eq!(ups[0]["max_loaded_models"].as_integer(), Some(1));
        assert_eq!(ups[1]["slots"].as_integer(), Some(3));
        assert_eq!(back["fleet"]["probe_interval_ms"].as_integer(), Some(100));
    }

    #[test]
    fn strings_are_escaped() {
        let file = PolicyFile::new("http://127.0.0.1:9", 1)
            .arm(Arm::builtin("main", "fifo").config("note", "a \"quoted\"\nline"));
        let back: toml::Table = toml::from_str(&file.to_toml()).unwrap();
        assert_eq!(
            back["policy"][0]["config"]["note"].as_str(),
            Some("a \"quoted\"\nline")
        );
    }
}
