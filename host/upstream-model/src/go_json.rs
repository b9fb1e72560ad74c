//! Request bodies read the way Ollama's Go decoder reads them, so that the
//! model serves what Ollama serves (and a proxy in front of it can be tested
//! against that): Go's `encoding/json` matches an object's keys to struct
//! fields case-insensitively, lets the last of repeated keys win, and
//! Ollama's `json.Decoder` ignores whatever follows the first value.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// The first JSON value of `body`; data after it is ignored. An object's
/// top-level keys are folded onto the lower-case ASCII field names the model
/// looks up (`"Model"` and `"MODEL"` become `"model"`), and of keys that fold
/// alike the last one wins.
pub(crate) fn first_value(body: &[u8]) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(body);
    // No `de.end()`: trailing data is not an error, as for Go's json.Decoder.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        de.deserialize_map(FoldedObject).map(Value::Object)
    } else {
        Value::deserialize(&mut de)
    }
}

/// A key as Go compares it with an ASCII field name: ASCII letters without
/// case, plus the four non-ASCII letters that Unicode simple case folding
/// maps onto ASCII ones (KELVIN SIGN, LONG S, dotted and dotless I).
fn fold_key(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            '\u{212A}' => 'k',
            '\u{017F}' => 's',
            '\u{0130}' | '\u{0131}' => 'i',
            _ => c,
        })
        .collect()
}

/// An object whose keys are folded, in document order, last one winning.
struct FoldedObject;

impl<'de> Visitor<'de> for FoldedObject {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            out.insert(fold_key(&key), value);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fold_and_the_last_one_wins() {
        let v = first_value(r#"{"Model":"a","MODEL":"b","ſtream":false}"#.as_bytes()).unwrap();
        assert_eq!(v["model"], "b");
        assert_eq!(v["stream"], false);
        let v = first_value(br#"{"model":"a","model":"fake"}"#).unwrap();
        assert_eq!(v["model"], "fake");
    }

    #[test]
    fn data_after_the_first_value_is_ignored() {
        let v = first_value(b" {\"model\":\"fake\"} trailing {garbage").unwrap();
        assert_eq!(v["model"], "fake");
        assert!(first_value(b"[1] x").unwrap().is_array());
        assert!(first_value(b"{\"model\":").is_err());
        assert!(first_value(b"xyz").is_err());
    }
}
