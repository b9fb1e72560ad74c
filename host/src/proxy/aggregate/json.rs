//! JSON values whose objects keep their keys in the order the upstream wrote
//! them, and a writer that escapes strings the way Go's `encoding/json` does.
//!
//! An aggregated answer is the upstream's last chunk with a few fields
//! replaced; Ollama writes its fields in its Go structs' order (and tool
//! call arguments in the model's order), so the answer keeps that order
//! rather than `serde_json::Map`'s sorted one.

use std::fmt;
use std::io;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON value with ordered objects.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Json>),
    Object(Obj),
}

/// An object: its members in order, each key once.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Obj(Vec<(String, Json)>);

impl Json {
    /// The string, if it is one.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if it is an array.
    pub(crate) fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The object, if it is one.
    pub(crate) fn as_obj(&self) -> Option<&Obj> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The number as an unsigned integer, if it is one.
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// Go's `encoding/json` text of this value (see [`GoFormatter`]).
    pub(crate) fn to_go_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
        // Writing to a Vec cannot fail, and every value here is serialisable.
        let _ = self.serialize(&mut ser);
        out
    }
}

impl Obj {
    /// The value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key`, to change.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key`, last in the object when it is new.
    pub(crate) fn push(&mut self, key: &str, value: Json) {
        match self.get_mut(key) {
            Some(v) => *v = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    /// Removes `key`.
    pub(crate) fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    /// Sets `key` where it is, or, when it is new, right after the nearest
    /// key that comes before it in `order` (a Go struct's field order), so
    /// that unknown keys of a newer upstream keep their place.
    pub(crate) fn set_in_order(&mut self, key: &str, value: Json, order: &[&str]) {
        if let Some(v) = self.get_mut(key) {
            *v = value;
            return;
        }
        let before = order
            .iter()
            .position(|k| *k == key)
            .map_or(&order[..0], |i| &order[..i]);
        let at = before
            .iter()
            .rev()
            .find_map(|k| self.0.iter().position(|(have, _)| have == k))
            .map_or(0, |i| i + 1);
        self.0.insert(at, (key.to_string(), value));
    }

    /// Members in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Json)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Keys in order.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::String(s.to_string())
    }
}

impl From<String> for Json {
    fn from(s: String) -> Json {
        Json::String(s)
    }
}

impl From<Obj> for Json {
    fn from(o: Obj) -> Json {
        Json::Object(o)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
        Ok(Json::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
        Ok(Json::Number(n.into()))
    }
    fn visit_f64<E>(self, x: f64) -> Result<Json, E> {
        Ok(Number::from_f64(x).map_or(Json::Null, Json::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element()? {
            v.push(x);
        }
        Ok(Json::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut o = Obj::default();
        while let Some((k, v)) = map.next_entry::<String, Json>()? {
            // A repeated key keeps its first place and its last value.
            o.push(&k, v);
        }
        Ok(Json::Object(o))
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(x) => s.serialize_str(x),
            Json::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for x in a {
                    seq.serialize_element(x)?;
                }
                seq.end()
            }
            Json::Object(o) => {
                let mut map = s.serialize_map(Some(o.0.len()))?;
                for (k, v) in &o.0 {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Writes strings the way Go's `json.Marshal` does: besides what every JSON
/// writer escapes, `<`, `>`, `&`, U+2028 and U+2029 become `\u003c`, ...
pub(crate) struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                write!(writer, "\\u{:04x}", c as u32)?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Json {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn keys_keep_their_order_and_go_escapes_html() {
        let v = parse(r#"{"zeta":1,"alpha":{"b":[1,2.5,null],"a":"<x> & y"},"mid":true}"#);
        assert_eq!(
            String::from_utf8(v.to_go_vec()).unwrap(),
            r#"{"zeta":1,"alpha":{"b":[1,2.5,null],"a":"\u003cx\u003e \u0026 y"},"mid":true}"#
        );
        let line = parse("\"a\u{2028}b\\n\"");
        assert_eq!(line.to_go_vec(), br#""a\u2028b\n""#);
    }

    #[test]
    fn new_keys_go_after_their_predecessor_in_the_struct_order() {
        let order = ["model", "created_at", "response", "thinking", "done"];
        let mut o = parse(r#"{"model":"m","created_at":"t","response":"","done":true,"x":1}"#)
            .as_obj()
            .unwrap()
            .clone();
        o.set_in_order("thinking", "hmm".into(), &order);
        o.set_in_order("response", "all".into(), &order);
        assert_eq!(
            o.keys(),
            ["model", "created_at", "response", "thinking", "done", "x"]
        );
        assert_eq!(o.get("response").and_then(Json::as_str), Some("all"));
        // No predecessor present: first.
        let mut o = Obj::default();
        o.push("done", Json::Bool(true));
        o.set_in_order("model", "m".into(), &order);
        assert_eq!(o.keys(), ["model", "done"]);
        // Not in the order at all: first too, never lost.
        o.set_in_order("other", Json::Null, &order);
        assert_eq!(o.keys(), ["other", "model", "done"]);
        o.remove("other");
        assert_eq!(o.keys(), ["model", "done"]);
    }

    #[test]
    fn a_repeated_key_keeps_its_place_and_its_last_value() {
        let v = parse(r#"{"a":1,"b":2,"a":3}"#);
        assert_eq!(v.to_go_vec(), br#"{"a":3,"b":2}"#);
    }
}
