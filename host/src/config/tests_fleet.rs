//! Unit tests of the upstreams in a policy file: one `[upstream]` table,
//! `[[upstream]]` entries, `[fleet]`, and each mistake with its line and key.

use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("dir/fleet.toml"), text)
}

const ARM: &str = "\n[[policy]]\nname = \"main\"\nplugin = \"builtin:fifo\"\n";

const FLEET: &str = r#"
[[upstream]]
name = "gpu-a"
url = "http://127.0.0.1:11434"
slots = 2

[[upstream]]
name = "gpu-b"
url = "http://127.0.0.1:11444"
slots = 4
max_loaded_models = 2

[fleet]
probe_interval_ms = 500
ps_interval_ms = 1500
max_failovers = 1
"#;

fn fleet() -> String {
    format!("{FLEET}{ARM}")
}

#[test]
fn a_fleet_lists_every_backend_in_order() {
    let c = parse(&fleet()).unwrap();
    let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["gpu-a", "gpu-b"]);
    assert_eq!(c.upstreams[1].url, "http://127.0.0.1:11444");
    assert_eq!((c.upstreams[0].slots, c.upstreams[1].slots), (2, 4));
    assert_eq!(c.upstreams[0].max_loaded_models, 3, "Ollama's default");
    assert_eq!(c.upstreams[1].max_loaded_models, 2);
    assert_eq!(c.total_slots(), 6);
    assert_eq!(
        c.fleet,
        FleetConfig {
            probe_interval_ms: 500,
            ps_interval_ms: 1500,
            max_failovers: 1,
        }
    );
}

#[test]
fn a_single_upstream_table_is_one_backend_named_default() {
    let c = parse(&format!(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\nslots = 3\n{ARM}"
    ))
    .unwrap();
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(c.upstreams[0].name, DEFAULT_BACKEND_NAME);
    assert_eq!(c.total_slots(), 3);
    // One backend: no probes or polls unless asked for.
    assert_eq!(
        c.fleet,
        FleetConfig {
            probe_interval_ms: 0,
            ps_interval_ms: 0,
            max_failovers: 2,
        }
    );
    let asked = parse(&format!("[fleet]\nps_interval_ms = 1000\n{ARM}")).unwrap();
    assert_eq!(
        (asked.fleet.probe_interval_ms, asked.fleet.ps_interval_ms),
        (0, 1000)
    );
    let no_table = fleet().replace(
        "[fleet]\nprobe_interval_ms = 500\nps_interval_ms = 1500\nmax_failovers = 1\n",
        "",
    );
    let two = parse(&no_table).unwrap();
    assert_eq!(
        two.fleet,
        FleetConfig::default(),
        "a fleet probes and polls"
    );
    // It may name itself; with no table at all it is a local Ollama.
    let named = parse(&format!("[upstream]\nname = \"box\"\n{ARM}")).unwrap();
    assert_eq!(named.upstreams[0].name, "box");
    let none = parse(ARM).unwrap();
    assert_eq!(none.upstreams[0].url, DEFAULT_UPSTREAM);
}

#[test]
fn duplicate_backend_names_point_at_the_second_one() {
    let text = fleet().replace("name = \"gpu-b\"", "name = \"gpu-a\"");
    let e = parse(&text).unwrap_err().to_string();
    assert_eq!(
        e,
        "dir/fleet.toml:8: upstream[1].name: duplicate backend name \"gpu-a\": every [[upstream]] needs its own name"
    );
}

#[test]
fn one_server_listed_twice_is_refused() {
    let text = fleet().replace("11444", "11434");
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.starts_with("dir/fleet.toml:9: upstream[1].url: "), "{e}");
    assert!(e.contains("already backend \"gpu-a\""), "{e}");
}

#[test]
fn a_fleet_entry_needs_a_name_and_a_url() {
    let e = parse(&fleet().replace("name = \"gpu-b\"\n", ""))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("dir/fleet.toml:7: upstream[1].name: "), "{e}");
    assert!(e.contains("needs a name"), "{e}");
    let e = parse(&fleet().replace("url = \"http://127.0.0.1:11444\"\n", ""))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("dir/fleet.toml:7: upstream[1].url: "), "{e}");
}

#[test]
fn bad_values_name_the_entry_line_and_key() {
    let e = parse(&fleet().replace("slots = 4", "slots = 0"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "dir/fleet.toml:10: upstream[1].slots: must be a whole number from 1 to 4096, got 0"
    );
    let e = parse(&fleet().replace("name = \"gpu-b\"", "name = \"gpu b\""))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("dir/fleet.toml:8: upstream[1].name: "), "{e}");
    let e = parse(&fleet().replace("probe_interval_ms = 500", "probe_interval_ms = 5"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/fleet.toml:14: fleet.probe_interval_ms: must be 0 (off) or"),
        "{e}"
    );
    let off = parse(&fleet().replace("probe_interval_ms = 500", "probe_interval_ms = 0"));
    assert_eq!(off.unwrap().fleet.probe_interval_ms, 0);
    let e = parse(&fleet().replace("max_loaded_models = 2", "max_loaded = 2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `max_loaded`"), "{e}");
}

#[test]
fn weighted_arms_share_the_slots_of_the_whole_fleet() {
    // Two one-slot backends carry two weighted arms.
    let text = fleet()
        .replace("slots = 2", "slots = 1")
        .replace("slots = 4", "slots = 1")
        + "\n[[policy]]\nname = \"b\"\nplugin = \"builtin:fifo\"\n";
    assert_eq!(parse(&text).unwrap().total_slots(), 2);
    let three = text + "\n[[policy]]\nname = \"c\"\nplugin = \"builtin:fifo\"\n";
    let e = parse(&three).unwrap_err().to_string();
    assert!(e.contains("add up to 2"), "{e}");
}

#[test]
fn the_command_line_upstream_replaces_a_single_backend_only() {
    let mut one = parse(ARM).unwrap();
    one.override_upstream("http://127.0.0.1:7".parse().unwrap())
        .unwrap();
    assert_eq!(one.upstreams[0].url, "http://127.0.0.1:7");
    let mut many = parse(&fleet()).unwrap();
    let e = many
        .override_upstream("http://127.0.0.1:7".parse().unwrap())
        .unwrap_err();
    assert!(e.contains("lists 2 backends (gpu-a, gpu-b)"), "{e}");
    assert!(e.contains("edit the [[upstream]] entries"), "{e}");
    assert_eq!(many.upstreams[0].url, "http://127.0.0.1:11434");
}

#[test]
fn an_upstream_is_ollama_unless_it_says_openai() {
    let c = parse(&fleet().replace(
        "name = \"gpu-b\"\n",
        "name = \"gpu-b\"\nkind = \"openai\"\npass_priority = \"vllm\"\n",
    ))
    .unwrap();
    assert_eq!(c.upstreams[0].kind, BackendKind::Ollama);
    assert_eq!(c.upstreams[0].pass_priority, None, "off by default");
    assert_eq!(c.upstreams[1].kind, BackendKind::OpenAi);
    assert_eq!(c.upstreams[1].pass_priority, Some(PassPriority::Vllm));
    let one = parse(&format!("[upstream]\nkind = \"openai\"\n{ARM}")).unwrap();
    assert_eq!(one.upstreams[0].kind, BackendKind::OpenAi);
    assert_eq!(one.upstreams[0].pass_priority, None);
    let explicit = parse(&format!("[upstream]\nkind = \"ollama\"\n{ARM}")).unwrap();
    assert_eq!(explicit.upstreams[0].kind, BackendKind::Ollama);
}

#[test]
fn a_bad_kind_names_the_allowed_ones() {
    let e = parse(&fleet().replace("slots = 4\n", "slots = 4\nkind = \"vllm\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/fleet.toml:11: upstream[1].kind: "),
        "{e}"
    );
    assert!(e.contains("unknown kind \"vllm\""), "{e}");
    for allowed in BackendKind::NAMES {
        assert!(e.contains(&format!("\"{allowed}\"")), "{e}");
    }
}

#[test]
fn priority_is_passed_only_in_a_known_convention_to_an_openai_server() {
    let e = parse(&format!("[upstream]\npass_priority = \"vllm\"\n{ARM}"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/fleet.toml:2: upstream.pass_priority: "),
        "{e}"
    );
    assert!(e.contains("kind = \"openai\""), "{e}");
    let e = parse(&format!(
        "[upstream]\nkind = \"openai\"\npass_priority = \"sglang\"\n{ARM}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown priority convention \"sglang\""), "{e}");
    assert!(e.contains("\"vllm\""), "{e}");
    // vLLM runs LOWER values first: real-time below batch.
    use crate::policy::Class;
    assert!(PassPriority::Vllm.value(Class::Realtime) < PassPriority::Vllm.value(Class::Batch));
    assert_eq!(
        PassPriority::Vllm.value(Class::Realtime),
        0,
        "vLLM's default"
    );
}
