//! Reading a policy file: TOML into the raw, spanned shape, then checked
//! field by field into a [`Config`], each error pointing at its line and key.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::builtins;

use super::upstream::{self, RawFleet, RawUpstreams};
use super::{
    AbConfig, AbMode, ArmConfig, Config, ConfigError, DEFAULT_LISTEN, Limits, PluginSource,
    TraceConfig,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    listen: Option<Spanned<String>>,
    admin_listen: Option<Spanned<String>>,
    admin_token: Option<String>,
    tenant_header: Option<String>,
    upstream: Option<Spanned<RawUpstreams>>,
    fleet: Option<RawFleet>,
    limits: Option<RawLimits>,
    ab: Option<RawAb>,
    trace: Option<Spanned<RawTrace>>,
    models: Option<Spanned<std::collections::BTreeMap<String, Spanned<super::models::RawModel>>>>,
    policy: Option<Spanned<Vec<Spanned<RawPolicy>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_waiting: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<i64>>,
    tick_ms: Option<Spanned<i64>>,
    candidate_window: Option<Spanned<i64>>,
    plugin_call_ms: Option<Spanned<i64>>,
    plugin_memory_mib: Option<Spanned<i64>>,
    max_preemptions: Option<Spanned<i64>>,
    starvation_ms: Option<Spanned<i64>>,
    retry_after_seconds: Option<Spanned<i64>>,
    header_read_timeout_seconds: Option<Spanned<i64>>,
    body_read_timeout_seconds: Option<Spanned<i64>>,
    max_total_body_bytes: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAb {
    mode: Option<AbMode>,
    key_header: Option<String>,
    window_seconds: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrace {
    path: Option<Spanned<String>>,
    rotate_bytes: Option<Spanned<i64>>,
    keep: Option<Spanned<i64>>,
}

/// `[trace] rotate_bytes` when the file does not set it.
pub const DEFAULT_TRACE_ROTATE_BYTES: u64 = 64 << 20;
/// `[trace] keep` when the file does not set it.
pub const DEFAULT_TRACE_KEEP: u32 = 3;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    plugin: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    config: Option<toml::Table>,
    shadow: Option<bool>,
}

/// The file being read, to point errors at a line.
pub(super) struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].matches('\n').count() + 1
    }

    pub(super) fn err(
        &self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line_of(span),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A whole number within `min..=max`, or the default when absent.
    pub(super) fn int(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> Result<i64, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) if (min..=max).contains(s.get_ref()) => Ok(*s.get_ref()),
            Some(s) => Err(self.err(
                s.span(),
                key,
                format!(
                    "must be a whole number from {min} to {max}, got {}",
                    s.get_ref()
                ),
            )),
        }
    }
}

impl Config {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(path, &text)
    }

    /// Validates policy-file text; `path` names it in errors and anchors plugin paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { path, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let line_no = cx.line_of(span.clone());
            let line = text.lines().nth(line_no.saturating_sub(1)).unwrap_or("");
            let key = line
                .split_once('=')
                .map(|(k, _)| k.trim().to_string())
                .filter(|k| !k.is_empty() && !k.starts_with('['))
                .unwrap_or_else(|| line.trim().to_string());
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_no,
                key,
                message: e.message().to_string(),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));

        let listen = parse_addr(&cx, raw.listen.as_ref(), "listen", DEFAULT_LISTEN)?;
        let admin_listen = match &raw.admin_listen {
            None => None,
            Some(s) => Some(parse_addr(&cx, Some(s), "admin_listen", "")?),
        };

        let upstreams = upstream::upstreams(&cx, raw.upstream.as_ref())?;
        let fleet = upstream::fleet(&cx, raw.fleet.as_ref(), upstreams.len())?;
        let total_slots: u32 = upstreams.iter().map(|u| u.slots).sum();

        let d = Limits::default();
        let limits = match &raw.limits {
            None => d,
            Some(l) => Limits {
                max_waiting: cx.int(
                    &l.max_waiting,
                    "limits.max_waiting",
                    0,
                    10_000_000,
                    d.max_waiting as i64,
                )? as usize,
                max_body_bytes: cx.int(
                    &l.max_body_bytes,
                    "limits.max_body_bytes",
                    1024,
                    1 << 34,
                    d.max_body_bytes as i64,
                )? as usize,
                tick_ms: cx.int(&l.tick_ms, "limits.tick_ms", 1, 60_000, d.tick_ms as i64)? as u64,
                candidate_window: cx.int(
                    &l.candidate_window,
                    "limits.candidate_window",
                    16,
                    1_000_000,
                    d.candidate_window as i64,
                )? as usize,
                plugin_call_ms: cx.int(
                    &l.plugin_call_ms,
                    "limits.plugin_call_ms",
                    1,
                    10_000,
                    d.plugin_call_ms as i64,
                )? as u64,
                plugin_memory_mib: cx.int(
                    &l.plugin_memory_mib,
                    "limits.plugin_memory_mib",
                    1,
                    4096,
                    d.plugin_memory_mib as i64,
                )? as usize,
                max_preemptions: cx.int(
                    &l.max_preemptions,
                    "limits.max_preemptions",
                    0,
                    1000,
                    d.max_preemptions as i64,
                )? as u32,
                starvation_ms: cx.int(
                    &l.starvation_ms,
                    "limits.starvation_ms",
                    10,
                    3_600_000,
                    d.starvation_ms as i64,
                )? as u64,
                retry_after_seconds: cx.int(
                    &l.retry_after_seconds,
                    "limits.retry_after_seconds",
                    0,
                    3600,
                    d.retry_after_seconds as i64,
                )? as u64,
                header_read_timeout_seconds: cx.int(
                    &l.header_read_timeout_seconds,
                    "limits.header_read_timeout_seconds",
                    1,
                    3600,
                    d.header_read_timeout_seconds as i64,
                )? as u64,
                body_read_timeout_seconds: cx.int(
                    &l.body_read_timeout_seconds,
                    "limits.body_read_timeout_seconds",
                    1,
                    86_400,
                    d.body_read_timeout_seconds as i64,
                )? as u64,
                max_total_body_bytes: cx.int(
                    &l.max_total_body_bytes,
                    "limits.max_total_body_bytes",
                    1024,
                    1 << 40,
                    d.max_total_body_bytes as i64,
                )? as usize,
                max_connections: cx.int(
                    &l.max_connections,
                    "limits.max_connections",
                    1,
                    1_000_000,
                    d.max_connections as i64,
                )? as usize,
            },
        };
        if let Some(l) = &raw.limits
            && limits.max_total_body_bytes < limits.max_body_bytes
        {
            let span = l
                .max_total_body_bytes
                .as_ref()
                .or(l.max_body_bytes.as_ref())
                .map(|s| s.span())
                .unwrap_or(0..0);
            return Err(cx.err(
                span,
                "limits.max_total_body_bytes",
                format!(
                    "{} is less than limits.max_body_bytes = {}, so a body that one request may send could never be held; raise max_total_body_bytes or lower max_body_bytes",
                    limits.max_total_body_bytes, limits.max_body_bytes
                ),
            ));
        }

        let ab = match &raw.ab {
            None => AbConfig {
                mode: AbMode::Weighted,
                key_header: "X-Maitre-Key".into(),
                window_seconds: 60.0,
            },
            Some(a) => {
                let window_seconds = match &a.window_seconds {
                    None => 60.0,
                    Some(w) if *w.get_ref() > 0.0 && w.get_ref().is_finite() => *w.get_ref(),
                    Some(w) => {
                        return Err(cx.err(
                            w.span(),
                            "ab.window_seconds",
                            "must be a number of seconds above 0",
                        ));
                    }
                };
                AbConfig {
                    mode: a.mode.unwrap_or_default(),
                    key_header: a
                        .key_header
                        .clone()
                        .unwrap_or_else(|| "X-Maitre-Key".into()),
                    window_seconds,
                }
            }
        };

        let trace = match &raw.trace {
            None => None,
            Some(t) => Some(parse_trace(&cx, t, base)?),
        };
        let models = super::models::models(&cx, raw.models.as_ref())?;

        let Some(policies) = raw.policy.as_ref() else {
            return Err(cx.err(
                0..0,
                "policy",
                "no [[policy]] table: add one, e.g. [[policy]] name = \"reserved-aging\" plugin = \"builtin:reserved-aging\"",
            ));
        };
        if policies.get_ref().is_empty() {
            return Err(cx.err(
                policies.span(),
                "policy",
                "needs at least one [[policy]] arm",
            ));
        }
        let mut arms = Vec::new();
        let mut names = BTreeSet::new();
        for (i, p) in policies.get_ref().iter().enumerate() {
            let key = |k: &str| format!("policy[{i}].{k}");
            let span = p.span();
            let p = p.get_ref();
            let name = match &p.name {
                Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
                Some(n) => {
                    return Err(cx.err(
                        n.span(),
                        &key("name"),
                        "use letters, digits, '-', '_' or '.' (it appears in headers and metrics)",
                    ));
                }
                None => return Err(cx.err(span, &key("name"), "every [[policy]] needs a name")),
            };
            if !names.insert(name.clone()) {
                return Err(cx.err(
                    p.name.as_ref().map(|n| n.span()).unwrap_or(span.clone()),
                    &key("name"),
                    format!("duplicate arm name {name:?}: arm names must be unique"),
                ));
            }
            let plugin = match &p.plugin {
                None => {
                    return Err(cx.err(
                        span,
                        &key("plugin"),
                        format!(
                            "missing: give {} or a path to a .wasm component",
                            builtins::names()
                                .map(|n| format!("builtin:{n}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                Some(s) => match s.get_ref().strip_prefix("builtin:") {
                    Some(b) => {
                        if builtins::bytes(b).is_none() {
                            return Err(cx.err(
                                s.span(),
                                &key("plugin"),
                                format!(
                                    "no built-in plugin {b:?}; built in are: {}",
                                    builtins::names().collect::<Vec<_>>().join(", ")
                                ),
                            ));
                        }
                        PluginSource::Builtin(b.to_string())
                    }
                    None => {
                        let rel = Path::new(s.get_ref());
                        PluginSource::File(if rel.is_absolute() {
                            rel.to_path_buf()
                        } else {
                            base.join(rel)
                        })
                    }
                },
            };
            let shadow = p.shadow.unwrap_or(false);
            let weight = match (&p.weight, shadow) {
                (Some(w), true) if *w.get_ref() != 0 => {
                    return Err(cx.err(
                        w.span(),
                        &key("weight"),
                        "a shadow arm takes no traffic, so it has no weight; remove `weight`, or set `shadow = false` to make the arm serve",
                    ));
                }
                (_, true) => 0,
                (w, false) => cx.int(w, &key("weight"), 0, 1_000_000, 100)? as u32,
            };
            let mut config = Vec::new();
            if let Some(t) = &p.config {
                flatten("", t, &mut config);
            }
            arms.push(ArmConfig {
                name,
                plugin,
                weight,
                config,
                shadow,
                line: cx.line_of(span),
            });
        }
        if arms.iter().all(|a| a.weight == 0) {
            if arms.iter().all(|a| a.shadow) {
                return Err(cx.err(
                    policies.span(),
                    "policy.shadow",
                    "every arm is a shadow, so no request could be served; a shadow arm only watches a serving arm, so add one without `shadow = true`",
                ));
            }
            return Err(cx.err(
                policies.span(),
                "policy.weight",
                "every arm has weight 0, so no request could be served; give at least one arm a weight above 0",
            ));
        }
        let serving = arms.iter().filter(|a| !a.shadow).count();
        if ab.mode == AbMode::Weighted && serving as u32 > total_slots {
            return Err(cx.err(
                policies.span(),
                "policy",
                format!(
                    "{} arms in weighted mode need at least one slot each, but the upstream slots add up to {}; use [ab] mode = \"switchback\" (the whole upstream alternates between arms) or fewer arms",
                    serving,
                    total_slots
                ),
            ));
        }

        Ok(Config {
            path: path.to_path_buf(),
            listen,
            admin_listen,
            admin_token: raw.admin_token.clone().filter(|t| !t.is_empty()),
            tenant_header: raw.tenant_header.clone().filter(|t| !t.is_empty()),
            upstreams,
            fleet,
            limits,
            ab,
            arms,
            trace,
            models,
        })
    }
}

/// The `[trace]` table: a path is required, the rest has defaults.
fn parse_trace(
    cx: &Ctx<'_>,
    t: &Spanned<RawTrace>,
    base: &Path,
) -> Result<TraceConfig, ConfigError> {
    let raw = t.get_ref();
    let path = match &raw.path {
        Some(p) if !p.get_ref().trim().is_empty() => {
            let rel = Path::new(p.get_ref());
            if rel.is_absolute() {
                rel.to_path_buf()
            } else {
                base.join(rel)
            }
        }
        Some(p) => {
            return Err(cx.err(
                p.span(),
                "trace.path",
                "is empty: give the file to write, e.g. path = \"maitre-trace.jsonl\"",
            ));
        }
        None => {
            return Err(cx.err(
                t.span(),
                "trace.path",
                "missing: [trace] needs the file to write, e.g. path = \"maitre-trace.jsonl\" (relative to this file), or remove [trace]",
            ));
        }
    };
    Ok(TraceConfig {
        path,
        rotate_bytes: cx.int(
            &raw.rotate_bytes,
            "trace.rotate_bytes",
            4096,
            1 << 40,
            DEFAULT_TRACE_ROTATE_BYTES as i64,
        )? as u64,
        keep: cx.int(&raw.keep, "trace.keep", 1, 100, DEFAULT_TRACE_KEEP as i64)? as u32,
    })
}

/// A name that can go in a header, a metric label and a log line as it is.
pub(super) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_addr(
    cx: &Ctx<'_>,
    v: Option<&Spanned<String>>,
    key: &str,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let (text, span) = match v {
        Some(s) => (s.get_ref().as_str(), s.span()),
        None => (default, 0..0),
    };
    text.parse().map_err(|_| {
        cx.err(
            span,
            key,
            format!("{text:?} is not an address:port like \"127.0.0.1:11435\""),
        )
    })
}

/// Parses an upstream base URL (`http://host:port`, optionally with a path prefix).
pub fn parse_upstream_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL like \"http://127.0.0.1:11434\": {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "{s:?}: scheme {other:?} is not supported; maitre talks plain http to Ollama"
            ));
        }
        None => return Err(format!("{s:?} has no scheme; write \"http://{s}\"")),
    }
    if uri.host().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    Ok(uri)
}

/// Flattens a TOML table to `a.b = value` pairs: strings unquoted, other
/// values as TOML writes them.
fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            toml::Value::String(s) => out.push((key, s.clone())),
            other => out.push((key, other.to_string())),
        }
    }
}
