//! `[models."NAME"]`: per-model settings maitre writes into every request for
//! that model, so that clients which disagree (one asks for `num_ctx` 2048,
//! another for 8192, one keeps the model 5 minutes, another unloads it) do
//! not make Ollama reload it (ollama#7773).
//!
//! ```toml
//! [models."llama3.1:8b"]
//! num_ctx = 8192
//! keep_alive = "30m"     # a Go duration, or seconds as a number; -1 keeps it loaded
//! resume_preempted = true  # a pre-empted chat continues its answer so far
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;
use crate::fleet::model_key;

/// One `[models."NAME"]` table, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    num_ctx: Option<Spanned<i64>>,
    keep_alive: Option<Spanned<toml::Value>>,
    resume_preempted: Option<bool>,
}

/// What maitre writes into requests for one model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelRule {
    /// `options.num_ctx` every request for the model gets.
    pub num_ctx: Option<u32>,
    /// `keep_alive` every request for the model gets, as the JSON to send
    /// (a string such as `"30m"`, or a number of seconds).
    pub keep_alive: Option<String>,
    /// A pre-empted non-streamed chat continues its answer so far (sent
    /// as a trailing assistant message, which the model's template must
    /// continue) instead of restarting.
    pub resume_preempted: bool,
}

/// The rules of a policy file, by model name as Ollama matches names
/// (`llama3` and `llama3:latest` are one model).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelRules(BTreeMap<Arc<str>, ModelRule>);

impl ModelRules {
    /// The rule for `model`, if the file has one.
    pub fn get(&self, model: &str) -> Option<&ModelRule> {
        if self.0.is_empty() || model.is_empty() {
            return None;
        }
        self.0.get(&model_key(model))
    }

    /// Whether the file has no `[models]` table.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every rule, by model key, for `maitre check`.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &ModelRule)> {
        self.0.iter()
    }
}

/// Checks the `[models]` tables.
pub(super) fn models(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<BTreeMap<String, Spanned<RawModel>>>>,
) -> Result<ModelRules, ConfigError> {
    let mut rules = BTreeMap::new();
    let Some(raw) = raw else {
        return Ok(ModelRules(rules));
    };
    for (name, m) in raw.get_ref() {
        let key = format!("models.\"{name}\"");
        if name.trim().is_empty() || name.trim() != name {
            return Err(cx.err(
                m.span(),
                &key,
                "a model name must be non-empty with no spaces around it, e.g. [models.\"llama3.1:8b\"]",
            ));
        }
        let raw = m.get_ref();
        let num_ctx = match &raw.num_ctx {
            None => None,
            Some(n) if (256..=(1 << 24)).contains(n.get_ref()) => Some(*n.get_ref() as u32),
            Some(n) => {
                return Err(cx.err(
                    n.span(),
                    &format!("{key}.num_ctx"),
                    format!(
                        "{} is not a context length: give tokens between 256 and 16777216, e.g. num_ctx = 8192",
                        n.get_ref()
                    ),
                ));
            }
        };
        let keep_alive = match &raw.keep_alive {
            None => None,
            Some(v) => Some(keep_alive_json(v.get_ref()).ok_or_else(|| {
                cx.err(
                    v.span(),
                    &format!("{key}.keep_alive"),
                    "must be a duration Ollama reads, such as \"30m\", \"1h30m\" or \"-1\" (keep loaded), or a number of seconds",
                )
            })?),
        };
        let resume_preempted = raw.resume_preempted.unwrap_or(false);
        if num_ctx.is_none() && keep_alive.is_none() && raw.resume_preempted.is_none() {
            return Err(cx.err(
                m.span(),
                &key,
                "sets nothing: give num_ctx, keep_alive and/or resume_preempted, or remove the table",
            ));
        }
        let k = model_key(name);
        if rules.contains_key(&k) {
            return Err(cx.err(
                m.span(),
                &key,
                format!("is the same model as another [models] table (both are {k}): keep one"),
            ));
        }
        rules.insert(
            k,
            ModelRule {
                num_ctx,
                keep_alive,
                resume_preempted,
            },
        );
    }
    Ok(ModelRules(rules))
}

/// `keep_alive` as the JSON maitre sends, if Ollama would read it: a whole
/// number of seconds, or a Go duration string (`"30m"`, `"1h30m"`,
/// `"-1"`, `"0"`; a bare number in a string counts as seconds).
fn keep_alive_json(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::String(s) if go_duration(s) => serde_json::to_string(s).ok(),
        _ => None,
    }
}

/// Whether `s` is a duration Go's `time.ParseDuration` reads, or a number
/// (Ollama reads a bare number as seconds).
fn go_duration(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !s.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return false;
    }
    if s.parse::<f64>().is_ok_and(f64::is_finite) {
        return true;
    }
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 || rest[..digits].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len())
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        for ok in [
            "30m", "1h30m", "-1", "0", "1.5h", "300", "10s", "500ms", "-1m",
        ] {
            assert!(go_duration(ok), "{ok}");
        }
        for bad in ["", "forever", "30 m", "m", "1d", "--1", "1h-"] {
            assert!(!go_duration(bad), "{bad}");
        }
    }

    #[test]
    fn keep_alive_is_sent_as_json() {
        assert_eq!(
            keep_alive_json(&toml::Value::String("30m".into())).as_deref(),
            Some("\"30m\"")
        );
        assert_eq!(
            keep_alive_json(&toml::Value::Integer(-1)).as_deref(),
            Some("-1")
        );
        assert_eq!(keep_alive_json(&toml::Value::Boolean(true)), None);
    }
}
