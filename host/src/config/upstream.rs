//! The upstreams of a policy file: one `[upstream]` table (a single backend,
//! named `default` unless it says otherwise) or a list of `[[upstream]]`
//! entries (a fleet, each entry named), and the `[fleet]` table that tunes
//! how maitre watches them (health probes, `/api/ps` polls, fail-over).

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::parse::{Ctx, valid_name};
use super::{
    BackendKind, ConfigError, DEFAULT_UPSTREAM, FleetConfig, PassPriority, UpstreamConfig,
};

/// Name of the backend a single `[upstream]` table describes when it gives none.
pub const DEFAULT_BACKEND_NAME: &str = "default";

/// One `[upstream]` table or `[[upstream]]` entry, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    name: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    slots: Option<Spanned<i64>>,
    max_loaded_models: Option<Spanned<i64>>,
    connect_timeout_ms: Option<Spanned<i64>>,
    first_byte_timeout_seconds: Option<Spanned<i64>>,
    kind: Option<Spanned<String>>,
    pass_priority: Option<Spanned<String>>,
    busy_check: Option<Spanned<String>>,
}

/// `upstream` is a table (one backend) or an array of tables (a fleet).
pub(super) enum RawUpstreams {
    One(Box<RawUpstream>),
    Many(Vec<Spanned<RawUpstream>>),
}

impl<'de> Deserialize<'de> for RawUpstreams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawUpstreams;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an [upstream] table or [[upstream]] entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawUpstreams, A::Error> {
                RawUpstream::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|u| RawUpstreams::One(Box::new(u)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawUpstreams, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(RawUpstreams::Many)
            }
        }
        d.deserialize_any(V)
    }
}

/// The `[fleet]` table, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    probe_interval_ms: Option<Spanned<i64>>,
    ps_interval_ms: Option<Spanned<i64>>,
    max_failovers: Option<Spanned<i64>>,
}

/// Checks the upstreams: a missing table is one local Ollama; names and
/// URLs are unique, so metrics, `/status` and `X-Maitre-Backend` tell the
/// backends apart.
pub(super) fn upstreams(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<RawUpstreams>>,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let Some(raw) = raw else {
        let none = RawUpstream {
            name: None,
            url: None,
            slots: None,
            max_loaded_models: None,
            connect_timeout_ms: None,
            first_byte_timeout_seconds: None,
            kind: None,
            pass_priority: None,
            busy_check: None,
        };
        return Ok(vec![one(cx, &none, "upstream", 0..0, false)?]);
    };
    let entries: Vec<(String, &RawUpstream, std::ops::Range<usize>)> = match raw.get_ref() {
        RawUpstreams::One(u) => vec![("upstream".into(), &**u, raw.span())],
        RawUpstreams::Many(v) if v.is_empty() => {
            return Err(cx.err(
                raw.span(),
                "upstream",
                "needs at least one [[upstream]] entry with a name and a url",
            ));
        }
        RawUpstreams::Many(v) => v
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("upstream[{i}]"), u.get_ref(), u.span()))
            .collect(),
    };
    let list = matches!(raw.get_ref(), RawUpstreams::Many(_));
    let mut out: Vec<UpstreamConfig> = Vec::new();
    let mut names = BTreeSet::new();
    for (key, u, span) in entries {
        let up = one(cx, u, &key, span.clone(), list)?;
        let name_span = u.name.as_ref().map(|n| n.span()).unwrap_or(span.clone());
        if !names.insert(up.name.clone()) {
            return Err(cx.err(
                name_span,
                &format!("{key}.name"),
                format!(
                    "duplicate backend name {:?}: every [[upstream]] needs its own name",
                    up.name
                ),
            ));
        }
        if let Some(other) = out.iter().find(|o| o.url == up.url) {
            return Err(cx.err(
                u.url.as_ref().map(|n| n.span()).unwrap_or(span),
                &format!("{key}.url"),
                format!(
                    "{} is already backend {:?}: list each Ollama server once, with all its slots",
                    up.url, other.name
                ),
            ));
        }
        out.push(up);
    }
    Ok(out)
}

/// One backend; `list` says it is an `[[upstream]]` entry, which must name itself.
fn one(
    cx: &Ctx<'_>,
    u: &RawUpstream,
    key: &str,
    span: std::ops::Range<usize>,
    list: bool,
) -> Result<UpstreamConfig, ConfigError> {
    let k = |f: &str| format!("{key}.{f}");
    let name = match &u.name {
        Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            return Err(cx.err(
                n.span(),
                &k("name"),
                "use letters, digits, '-', '_' or '.' (it appears in headers and metrics)",
            ));
        }
        None if list => {
            return Err(cx.err(
                span,
                &k("name"),
                "every [[upstream]] needs a name, e.g. name = \"gpu-1\"",
            ));
        }
        None => DEFAULT_BACKEND_NAME.to_string(),
    };
    let url = match &u.url {
        None if list => {
            return Err(cx.err(
                span,
                &k("url"),
                "every [[upstream]] needs a url, e.g. url = \"http://127.0.0.1:11434\"",
            ));
        }
        None => DEFAULT_UPSTREAM.parse().expect("valid default"),
        Some(s) => {
            super::parse_upstream_url(s.get_ref()).map_err(|m| cx.err(s.span(), &k("url"), m))?
        }
    };
    let kind = match &u.kind {
        None => BackendKind::default(),
        Some(s) => BackendKind::from_name(s.get_ref()).ok_or_else(|| {
            cx.err(
                s.span(),
                &k("kind"),
                format!(
                    "unknown kind {:?}: use \"ollama\" (an Ollama server, the default) or \"openai\" (an OpenAI-compatible server such as llama-server, vLLM or LM Studio)",
                    s.get_ref()
                ),
            )
        })?,
    };
    let pass_priority = match &u.pass_priority {
        None => None,
        Some(s) if s.get_ref() == "vllm" && kind == BackendKind::OpenAi => Some(PassPriority::Vllm),
        Some(s) if s.get_ref() == "vllm" => {
            return Err(cx.err(
                s.span(),
                &k("pass_priority"),
                "only an OpenAI-compatible server takes a per-request priority: add kind = \"openai\" to this upstream, or remove pass_priority",
            ));
        }
        Some(s) => {
            return Err(cx.err(
                s.span(),
                &k("pass_priority"),
                format!(
                    "unknown priority convention {:?}: use \"vllm\" (vLLM's `priority` field, lower runs first; start vLLM with --scheduling-policy priority), or remove the key",
                    s.get_ref()
                ),
            ));
        }
    };
    let busy_check = match &u.busy_check {
        None => None,
        Some(s) if s.get_ref() == "none" => None,
        Some(s) if matches!(s.get_ref().as_str(), "llama-server" | "metrics") => {
            if kind != BackendKind::OpenAi {
                return Err(cx.err(
                    s.span(),
                    &k("busy_check"),
                    "llama-server's /slots and the /metrics of llama-server and vLLM are on OpenAI-compatible servers: add kind = \"openai\" to this upstream, or remove busy_check",
                ));
            }
            Some(if s.get_ref() == "metrics" {
                super::BusyCheck::Metrics
            } else {
                super::BusyCheck::Slots
            })
        }
        Some(s) => {
            return Err(cx.err(
                s.span(),
                &k("busy_check"),
                format!(
                    "unknown busy check {:?}: use \"llama-server\" (GET /slots before each dispatch), \"metrics\" (GET /metrics: llama-server with --metrics, vLLM) or \"none\"",
                    s.get_ref()
                ),
            ));
        }
    };
    Ok(UpstreamConfig {
        kind,
        pass_priority,
        busy_check,
        name,
        url,
        slots: cx.int(&u.slots, &k("slots"), 1, 4096, 1)? as u32,
        max_loaded_models: cx.int(&u.max_loaded_models, &k("max_loaded_models"), 1, 1024, 3)?
            as u32,
        connect_timeout_ms: cx.int(
            &u.connect_timeout_ms,
            &k("connect_timeout_ms"),
            1,
            600_000,
            3_000,
        )? as u64,
        first_byte_timeout_seconds: cx.int(
            &u.first_byte_timeout_seconds,
            &k("first_byte_timeout_seconds"),
            1,
            86_400,
            900,
        )? as u64,
    })
}

/// Checks the `[fleet]` table. Probes and polls default to on for a fleet
/// and off for a single backend: with nowhere else to send a request, they
/// would only add traffic to its log (0 switches one off; a single backend
/// may switch them on to see health and residency in `/status`).
pub(super) fn fleet(
    cx: &Ctx<'_>,
    raw: Option<&RawFleet>,
    backends: usize,
) -> Result<FleetConfig, ConfigError> {
    let d = if backends > 1 {
        FleetConfig::default()
    } else {
        FleetConfig {
            probe_interval_ms: 0,
            ps_interval_ms: 0,
            ..FleetConfig::default()
        }
    };
    let Some(f) = raw else { return Ok(d) };
    let interval = |v: &Option<Spanned<i64>>, key: &str, default: u64| match v {
        Some(s) if *s.get_ref() == 0 => Ok(0),
        Some(s) if !(100..=3_600_000).contains(s.get_ref()) => Err(cx.err(
            s.span(),
            key,
            format!(
                "must be 0 (off) or a whole number of ms from 100 to 3600000, got {}",
                s.get_ref()
            ),
        )),
        Some(s) => Ok(*s.get_ref() as u64),
        None => Ok(default),
    };
    Ok(FleetConfig {
        probe_interval_ms: interval(
            &f.probe_interval_ms,
            "fleet.probe_interval_ms",
            d.probe_interval_ms,
        )?,
        ps_interval_ms: interval(&f.ps_interval_ms, "fleet.ps_interval_ms", d.ps_interval_ms)?,
        max_failovers: cx.int(
            &f.max_failovers,
            "fleet.max_failovers",
            0,
            100,
            d.max_failovers as i64,
        )? as u32,
    })
}
