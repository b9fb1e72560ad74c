//! Typed, checked access to a policy arm's `[policy.config]` table.
//!
//! The host flattens the table to key/value strings (nested keys joined with
//! dots, strings unquoted, numbers and booleans as TOML writes them) and adds
//! `maitre.slots` and `maitre.arm`. Every getter names the key in its error,
//! because the user reads that error when the policy file is refused.

use crate::{Class, parse_class};

/// Prefix of the keys the host adds itself; never reported as unknown.
const HOST_PREFIX: &str = "maitre.";

/// A policy's configuration: the arm's `[policy.config]` as key/value strings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl From<Vec<(String, String)>> for Config {
    fn from(entries: Vec<(String, String)>) -> Self {
        Config { entries }
    }
}

impl<K: Into<String>, V: Into<String>, const N: usize> From<[(K, V); N]> for Config {
    fn from(entries: [(K, V); N]) -> Self {
        Config {
            entries: entries
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

impl Config {
    /// The raw value of `key`, if present (the last one wins if repeated).
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All entries, in the order the host gave them.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// `key` as a whole number ≥ 0, or `default` when absent.
    pub fn get_u32(&self, key: &str, default: u32) -> Result<u32, String> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u32>()
                .map_err(|_| match v.trim().parse::<i64>() {
                    Ok(n) if n < 0 => invalid(key, "0 or more", v),
                    _ => invalid(key, "a whole number", v),
                }),
        }
    }

    /// `key` as a finite number, or `default` when absent.
    pub fn get_f64(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(n),
                _ => Err(invalid(key, "a number", v)),
            },
        }
    }

    /// `key` as `true` or `false`, or `default` when absent.
    pub fn get_bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.raw(key).map(str::trim) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(invalid(key, "true or false", v)),
        }
    }

    /// `key` as a string, or `default` when absent.
    pub fn get_str<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str, String> {
        Ok(self.raw(key).unwrap_or(default))
    }

    /// `key` as a class (`"batch"` or `"realtime"`, also `be`/`low` and
    /// `rt`/`high`, case-insensitive), or `default` when absent.
    pub fn get_class(&self, key: &str, default: Class) -> Result<Class, String> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => parse_class(v).ok_or_else(|| invalid(key, "\"batch\" or \"realtime\"", v)),
        }
    }

    /// The arm's total upstream slots (`maitre.slots`, added by the host).
    pub fn slots(&self) -> Result<Option<u32>, String> {
        self.raw("maitre.slots")
            .map(|_| self.get_u32("maitre.slots", 0))
            .transpose()
    }

    /// The arm's name (`maitre.arm`, added by the host).
    pub fn arm(&self) -> Option<&str> {
        self.raw("maitre.arm")
    }

    /// Refuses keys other than `known` (and the host's `maitre.*` keys),
    /// naming the first unknown key and listing the known ones, so that a
    /// typo does not silently fall back to a default.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), String> {
        let Some((key, _)) = self
            .entries
            .iter()
            .find(|(k, _)| !k.starts_with(HOST_PREFIX) && !known.contains(&k.as_str()))
        else {
            return Ok(());
        };
        if known.is_empty() {
            Err(format!(
                "unknown config key \"{key}\": this policy takes no [policy.config] keys"
            ))
        } else {
            Err(format!(
                "unknown config key \"{key}\": this policy knows {}",
                known.join(", ")
            ))
        }
    }
}

/// The error for a value of the wrong form, e.g.
/// `rt_reserved_slots: expected a whole number, got "abc"`.
pub fn invalid(key: &str, expected: &str, got: &str) -> String {
    format!("{key}: expected {expected}, got {got:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_keys_give_defaults() {
        let c = Config::default();
        assert_eq!(c.get_u32("a", 7), Ok(7));
        assert_eq!(c.get_f64("a", 1.5), Ok(1.5));
        assert_eq!(c.get_bool("a", true), Ok(true));
        assert_eq!(c.get_str("a", "x"), Ok("x"));
        assert_eq!(c.get_class("a", Class::Batch), Ok(Class::Batch));
        assert_eq!(c.slots(), Ok(None));
        assert_eq!(c.arm(), None);
    }

    #[test]
    fn values_parse_as_toml_writes_them() {
        let c = Config::from([
            ("n", "3"),
            ("f", "60"),
            ("g", "0.5"),
            ("b", "true"),
            ("s", "hello"),
            ("c", "Realtime"),
            ("maitre.slots", "2"),
            ("maitre.arm", "a"),
        ]);
        assert_eq!(c.get_u32("n", 0), Ok(3));
        assert_eq!(c.get_f64("f", 0.0), Ok(60.0));
        assert_eq!(c.get_f64("g", 0.0), Ok(0.5));
        assert_eq!(c.get_bool("b", false), Ok(true));
        assert_eq!(c.get_str("s", ""), Ok("hello"));
        assert_eq!(c.get_class("c", Class::Batch), Ok(Class::Realtime));
        assert_eq!(c.slots(), Ok(Some(2)));
        assert_eq!(c.arm(), Some("a"));
    }

    #[test]
    fn bad_values_name_the_key_and_the_value() {
        let c = Config::from([
            ("rt_reserved_slots", "abc"),
            ("neg", "-1"),
            ("frac", "1.5"),
            ("x", "inf"),
            ("y", "nan"),
            ("b", "yes"),
            ("c", "urgent"),
        ]);
        assert_eq!(
            c.get_u32("rt_reserved_slots", 1).unwrap_err(),
            "rt_reserved_slots: expected a whole number, got \"abc\""
        );
        assert_eq!(
            c.get_u32("neg", 1).unwrap_err(),
            "neg: expected 0 or more, got \"-1\""
        );
        assert!(c.get_u32("frac", 1).unwrap_err().starts_with("frac: "));
        assert!(c.get_f64("x", 1.0).unwrap_err().starts_with("x: "));
        assert!(c.get_f64("y", 1.0).unwrap_err().starts_with("y: "));
        assert_eq!(
            c.get_bool("b", false).unwrap_err(),
            "b: expected true or false, got \"yes\""
        );
        assert_eq!(
            c.get_class("c", Class::Batch).unwrap_err(),
            "c: expected \"batch\" or \"realtime\", got \"urgent\""
        );
    }

    #[test]
    fn unknown_keys_are_named_and_host_keys_ignored() {
        let c = Config::from([
            ("maitre.slots", "2"),
            ("maitre.arm", "a"),
            ("agin_boost", "1"),
        ]);
        assert_eq!(
            c.reject_unknown(&["aging_boost", "default_class"])
                .unwrap_err(),
            "unknown config key \"agin_boost\": this policy knows aging_boost, default_class"
        );
        let ok = Config::from([("maitre.slots", "2"), ("aging_boost", "1")]);
        assert_eq!(ok.reject_unknown(&["aging_boost"]), Ok(()));
        assert!(
            c.reject_unknown(&[])
                .unwrap_err()
                .contains("takes no [policy.config] keys")
        );
    }
}
