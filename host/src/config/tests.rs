//! Unit tests of the policy-file reader: the documented example, and that
//! each mistake names its file, line and key.

use std::path::{Path, PathBuf};

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("dir/policy.toml"), text)
}

const GOOD: &str = r#"
listen = "127.0.0.1:11435"
admin_listen = "127.0.0.1:11436"

[upstream]
url = "http://127.0.0.1:11434"
slots = 2

[[policy]]
name = "reserved-aging"
plugin = "builtin:reserved-aging"
weight = 100
[policy.config]
rt_reserved_slots = 1
aging_threshold_seconds = 60
aging_boost = 0.5
"#;

#[test]
fn parses_the_documented_example() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.listen, "127.0.0.1:11435".parse().unwrap());
    assert_eq!(c.upstreams[0].slots, 2);
    assert_eq!(c.arms.len(), 1);
    assert_eq!(
        c.arms[0].plugin,
        PluginSource::Builtin("reserved-aging".into())
    );
    assert_eq!(
        c.arms[0].config,
        vec![
            ("aging_boost".to_string(), "0.5".to_string()),
            ("aging_threshold_seconds".to_string(), "60".to_string()),
            ("rt_reserved_slots".to_string(), "1".to_string()),
        ]
    );
}

#[test]
fn relative_plugin_paths_resolve_against_the_file() {
    let c = parse(&GOOD.replace("builtin:reserved-aging", "../plugins/x.wasm")).unwrap();
    assert_eq!(
        c.arms[0].plugin,
        PluginSource::File(PathBuf::from("dir/../plugins/x.wasm"))
    );
}

#[test]
fn bad_slots_names_file_line_and_key() {
    let e = parse(&GOOD.replace("slots = 2", "slots = 0"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "dir/policy.toml:7: upstream.slots: must be a whole number from 1 to 4096, got 0"
    );
}

#[test]
fn unknown_key_is_named() {
    let e = parse(&GOOD.replace("slots = 2", "slot = 2"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/policy.toml:7: slot: unknown field `slot`"),
        "{e}"
    );
}

#[test]
fn wrong_type_is_named() {
    let e = parse(&GOOD.replace("slots = 2", "slots = \"two\""))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("dir/policy.toml:7: slots: "), "{e}");
}

#[test]
fn unknown_builtin_lists_the_known_ones() {
    let e = parse(&GOOD.replace("builtin:reserved-aging", "builtin:nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("policy[0].plugin"), "{e}");
    for name in crate::builtins::names() {
        assert!(e.contains(name), "{e}");
    }
}

#[test]
fn bad_upstream_url() {
    let e = parse(&GOOD.replace("http://127.0.0.1:11434", "https://x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstream.url") && e.contains("plain http"),
        "{e}"
    );
}

#[test]
fn missing_policy_is_explained() {
    let e = parse("[upstream]\nslots = 1\n").unwrap_err().to_string();
    assert!(e.contains("no [[policy]] table"), "{e}");
}

#[test]
fn duplicate_arm_names() {
    let text =
        format!("{GOOD}\n[[policy]]\nname = \"reserved-aging\"\nplugin = \"builtin:fifo\"\n");
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("duplicate arm name"), "{e}");
}

#[test]
fn more_weighted_arms_than_slots_is_refused() {
    let text = GOOD.replace("slots = 2", "slots = 1")
        + "\n[[policy]]\nname = \"b\"\nplugin = \"builtin:fifo\"\n";
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("switchback"), "{e}");
    let ok = text.replace("[upstream]", "[ab]\nmode = \"switchback\"\n\n[upstream]");
    assert_eq!(parse(&ok).unwrap().ab.mode, AbMode::Switchback);
}

const SHADOW: &str = r#"
[[policy]]
name = "candidate"
plugin = "builtin:fifo"
shadow = true
"#;

#[test]
fn a_shadow_arm_has_no_weight_and_needs_no_slot() {
    // Two slots, one serving arm, one shadow: weighted mode needs one slot
    // per *serving* arm only.
    let c = parse(&format!("{GOOD}{SHADOW}")).unwrap();
    assert_eq!(c.arms.len(), 2);
    assert!(c.arms[1].shadow && !c.arms[0].shadow);
    assert_eq!(c.arms[1].weight, 0);
    let one_slot = GOOD.replace("slots = 2", "slots = 1");
    assert!(parse(&format!("{one_slot}{SHADOW}")).is_ok());
}

#[test]
fn a_shadow_arm_with_a_weight_is_refused() {
    let e = parse(&format!("{GOOD}{SHADOW}weight = 10\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(":22: policy[1].weight"), "{e}");
    assert!(e.contains("a shadow arm takes no traffic"), "{e}");
    // weight = 0 says the same thing as no weight.
    assert!(parse(&format!("{GOOD}{SHADOW}weight = 0\n")).is_ok());
}

#[test]
fn only_shadow_arms_serve_nothing() {
    let only = GOOD.replace("weight = 100", "shadow = true");
    let e = parse(&only).unwrap_err().to_string();
    assert!(e.contains("every arm is a shadow"), "{e}");
}

#[test]
fn memory_limits_have_defaults_and_are_read() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.limits.max_total_body_bytes, 256 << 20);
    assert_eq!(c.limits.max_connections, 4096);
    let text = format!(
        "{GOOD}\n[limits]\nmax_total_body_bytes = 1048576\nmax_body_bytes = 4096\nmax_connections = 10\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.limits.max_total_body_bytes, 1 << 20);
    assert_eq!(c.limits.max_connections, 10);
    let e = parse(&format!("{GOOD}\n[limits]\nmax_connections = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_connections"), "{e}");
}

#[test]
fn a_total_body_budget_below_one_body_is_refused() {
    let text = format!("{GOOD}\n[limits]\nmax_total_body_bytes = 2048\nmax_body_bytes = 4096\n");
    let e = parse(&text).unwrap_err().to_string();
    assert!(
        e.contains("limits.max_total_body_bytes")
            && e.contains("less than limits.max_body_bytes = 4096"),
        "{e}"
    );
    // The default budget is below a raised per-request limit: said the same way.
    let text = format!("{GOOD}\n[limits]\nmax_body_bytes = 1073741824\n");
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("raise max_total_body_bytes"), "{e}");
}

#[test]
fn trace_table_resolves_its_path_and_takes_defaults() {
    assert_eq!(parse(GOOD).unwrap().trace, None, "no [trace]: no tracing");
    let c = parse(&format!("{GOOD}\n[trace]\npath = \"traces/t.jsonl\"\n")).unwrap();
    assert_eq!(
        c.trace,
        Some(TraceConfig {
            path: PathBuf::from("dir/traces/t.jsonl"),
            rotate_bytes: DEFAULT_TRACE_ROTATE_BYTES,
            keep: DEFAULT_TRACE_KEEP,
        })
    );
    let c = parse(&format!(
        "{GOOD}\n[trace]\npath = \"/var/t.jsonl\"\nrotate_bytes = 10000\nkeep = 5\n"
    ))
    .unwrap();
    let t = c.trace.unwrap();
    assert_eq!(
        (t.path, t.rotate_bytes, t.keep),
        (PathBuf::from("/var/t.jsonl"), 10_000, 5)
    );
}

#[test]
fn trace_mistakes_name_line_and_key() {
    let e = parse(&format!("{GOOD}\n[trace]\nrotate_bytes = 10000\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dir/policy.toml:18: trace.path: missing"),
        "{e}"
    );
    let e = parse(&format!(
        "{GOOD}\n[trace]\npath = \"t\"\nrotate_bytes = 10\n"
    ))
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "dir/policy.toml:20: trace.rotate_bytes: must be a whole number from 4096 to 1099511627776, got 10"
    );
    let e = parse(&format!("{GOOD}\n[trace]\npath = \"t\"\nrotate = 1\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `rotate`"), "{e}");
    let e = parse(&format!("{GOOD}\n[trace]\npath = \" \"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("trace.path: is empty"), "{e}");
}

#[test]
fn model_rules_are_read_by_ollama_name() {
    let c = parse(&format!(
        "{GOOD}\n[models.\"llama3\"]\nnum_ctx = 8192\nkeep_alive = \"30m\"\n[models.\"qwen:7b\"]\nkeep_alive = -1\n"
    ))
    .unwrap();
    let r = c.models.get("llama3:latest").unwrap();
    assert_eq!(r.num_ctx, Some(8192));
    assert_eq!(r.keep_alive.as_deref(), Some("\"30m\""));
    assert_eq!(c.models.get("llama3"), c.models.get("llama3:latest"));
    assert_eq!(
        c.models.get("qwen:7b").unwrap().keep_alive.as_deref(),
        Some("-1")
    );
    assert!(c.models.get("qwen").is_none());
    assert!(parse(GOOD).unwrap().models.is_empty());
    assert!(!r.resume_preempted);
    let c = parse(&format!(
        "{GOOD}\n[models.\"llama3\"]\nresume_preempted = true\n"
    ))
    .unwrap();
    let r = c.models.get("llama3").unwrap();
    assert!(r.resume_preempted);
    assert_eq!((r.num_ctx, r.keep_alive.as_deref()), (None, None));
}

#[test]
fn a_bad_model_rule_names_its_key() {
    for (rule, key, says) in [
        ("num_ctx = 10", "models.\"m\".num_ctx", "between 256"),
        (
            "keep_alive = \"forever\"",
            "models.\"m\".keep_alive",
            "duration",
        ),
        ("keep_alive = true", "models.\"m\".keep_alive", "duration"),
        ("resume_preempted = 1", "resume_preempted", "bool"),
        ("", "models.\"m\"", "sets nothing"),
    ] {
        let e = parse(&format!("{GOOD}\n[models.\"m\"]\n{rule}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(says), "{rule}: {e}");
    }
    let e = parse(&format!(
        "{GOOD}\n[models.\"m\"]\nnum_ctx = 512\ncontext = 1\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("context"), "{e}");
    let e = parse(&format!(
        "{GOOD}\n[models.\"m\"]\nnum_ctx = 512\n[models.\"m:latest\"]\nnum_ctx = 1024\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("same model"), "{e}");
}

#[test]
fn busy_check_is_for_openai_compatible_servers_only() {
    let with = |extra: &str| parse(&GOOD.replace("slots = 2\n", &format!("slots = 2\n{extra}\n")));
    let c = with("kind = \"openai\"\nbusy_check = \"llama-server\"").unwrap();
    assert_eq!(
        c.upstreams[0].busy_check,
        Some(crate::config::BusyCheck::Slots)
    );
    let c = with("kind = \"openai\"\nbusy_check = \"metrics\"").unwrap();
    assert_eq!(
        c.upstreams[0].busy_check,
        Some(crate::config::BusyCheck::Metrics)
    );
    assert_eq!(parse(GOOD).unwrap().upstreams[0].busy_check, None);
    for check in ["llama-server", "metrics"] {
        let e = with(&format!("busy_check = \"{check}\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstream.busy_check") && e.contains("kind"),
            "{e}"
        );
    }
    let e = with("kind = \"openai\"\nbusy_check = \"vllm\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown busy check"), "{e}");
}
