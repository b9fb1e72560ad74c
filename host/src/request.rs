//! Scheduling metadata from a request, read the way Ollama will read it:
//! which requests are scheduled, and the few body fields a policy needs.
//! Kept free of the rest of the host so the fuzz target (host/fuzz) can build
//! it alone.
//!
//! Reading a request differently from Ollama is a hole: a request Ollama
//! serves but maitre does not recognise would reach the upstream without a
//! slot. So the path is matched percent-decoded, as Go's router matches it;
//! every POST to a scheduled path is scheduled, whatever its body; and the
//! body is read as Go's `encoding/json` reads it into Ollama's request
//! structs ([`extract_meta`]), so that the policy decides on what Ollama
//! will act on.

use std::borrow::Cow;
use std::fmt;

use http::Method;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Paths whose POSTs are generation or embedding work, and so are scheduled.
pub const SCHEDULED_PATHS: &[&str] = &[
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
];

/// The scheduled path a request is for, as Ollama's router sees it; `None`
/// when the request is passed through.
///
/// Ollama serves gin behind Go's `http.DefaultServeMux` (server/routes.go).
/// Go percent-decodes the path (`%2F` included) and gin matches the decoded
/// path, so `/api/%67enerate` is `/api/generate`. Other spellings never reach
/// a handler: the mux redirects a path with `//`, `.` or `..` segments to its
/// clean form, and gin redirects `/api/generate/` to `/api/generate`; a
/// client that follows comes back through maitre at the clean path.
pub fn scheduled_path(method: &Method, raw_path: &str) -> Option<&'static str> {
    if method != Method::POST {
        return None;
    }
    // Go refuses a malformed escape with 400; left as is, it matches nothing.
    let path = percent_decode_str(raw_path).decode_utf8().ok()?;
    SCHEDULED_PATHS.iter().copied().find(|p| *p == path)
}

/// The scheduling-relevant fields of a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyMeta {
    /// `model`, or "" when the body has none that Ollama would read (then
    /// Ollama answers the request with its own error).
    pub model: String,
    /// `stream`, with Ollama's default for the path applied.
    pub stream: bool,
    /// `options.num_predict`, or `max_tokens` on `/v1`.
    pub num_predict: Option<i64>,
}

/// Reads [`BodyMeta`] from a scheduled request's body the way Ollama's Go
/// decoder reads it, so that a body Ollama accepts is never read as
/// something else:
/// - keys match fields case-insensitively (`"Model"`, `"MODEL"`);
/// - of repeated keys the last one wins;
/// - data after the first JSON value is ignored (`json.Decoder`);
/// - invalid UTF-8 in a string becomes U+FFFD;
/// - `null` leaves a plain field as it was and resets an optional one;
///   repeated `options` objects merge, as Go decodes into the same map.
///
/// A body Ollama cannot decode (bad JSON, not an object) gives an empty
/// model and the path's defaults: Ollama answers it with a 400 before any
/// work, but it is scheduled like any other.
pub fn extract_meta(path: &str, body: &[u8]) -> BodyMeta {
    let shape = Shape::of(path);
    let text = go_lossy(body);
    let mut de = serde_json::Deserializer::from_str(&text);
    // No `de.end()`: what follows the first value is not an error.
    let fields = de.deserialize_any(Reader(shape)).unwrap_or_default();
    shape.meta(fields)
}

/// The fields a path's request type has, as declared in Ollama's Go structs
/// (`api.GenerateRequest`, `api.ChatRequest`, `api.EmbedRequest`,
/// `openai.ChatCompletionRequest`, ...). A key for a field the type lacks is
/// ignored, as Go ignores it.
#[derive(Debug, Clone, Copy)]
struct Shape {
    stream: StreamField,
    /// `options map[string]any` (native API).
    options: bool,
    /// `max_tokens *int` (`/v1` completions).
    max_tokens: bool,
}

/// How a request type declares `stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamField {
    /// No such field (embeddings): never streamed.
    Absent,
    /// `*bool`, omitted means true (native API); `null` resets it.
    Pointer,
    /// `bool`, omitted means false (`/v1`); `null` leaves it as it was.
    Plain,
}

impl Shape {
    fn of(path: &str) -> Shape {
        let openai = path.starts_with("/v1/");
        let embedding = path.contains("embed");
        Shape {
            stream: match (embedding, openai) {
                (true, _) => StreamField::Absent,
                (false, false) => StreamField::Pointer,
                (false, true) => StreamField::Plain,
            },
            options: !openai,
            max_tokens: openai && !embedding,
        }
    }

    fn meta(self, f: Fields) -> BodyMeta {
        let stream = match self.stream {
            StreamField::Absent => false,
            StreamField::Pointer => f.stream.unwrap_or(true),
            StreamField::Plain => f.stream.unwrap_or(false),
        };
        let num_predict = if self.max_tokens {
            f.max_tokens
        } else {
            // Go decodes a number in a map[string]any as float64, and
            // Ollama's Options.FromMap truncates it to an integer; any other
            // value is an error Ollama answers with 400.
            match f.options.flatten() {
                Some(Loose::Number { float, .. }) => Some(float as i64),
                _ => None,
            }
        };
        BodyMeta {
            model: f.model,
            stream,
            num_predict,
        }
    }
}

/// The body's fields as Go would have decoded them so far.
#[derive(Debug, Default)]
struct Fields {
    model: String,
    stream: Option<bool>,
    /// `None`: a nil map. `Some(entry)`: the map, with its last
    /// `num_predict` entry if any.
    options: Option<Option<Loose>>,
    max_tokens: Option<i64>,
}

/// Which field of the path's request type a key names.
enum Field {
    Model,
    Stream,
    Options,
    MaxTokens,
    Other,
}

/// Whether `key` names the field `name` (lower-case ASCII) for Go's
/// `encoding/json`: equal under Unicode simple case folding, like
/// `bytes.EqualFold`. Besides ASCII letters, four letters fold onto ASCII
/// ones: KELVIN SIGN, LONG S, and dotted and dotless I.
pub fn go_key_matches(key: &[u8], name: &str) -> bool {
    // A key that is not UTF-8 (a lone surrogate escape) folds to no name.
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let fold = |c: char| match c {
        'A'..='Z' => c.to_ascii_lowercase(),
        '\u{212A}' => 'k',
        '\u{017F}' => 's',
        '\u{0130}' | '\u{0131}' => 'i',
        _ => c,
    };
    key.chars().map(fold).eq(name.chars())
}

/// The body as Go's decoder sees its strings: each byte of an invalid UTF-8
/// sequence becomes U+FFFD (outside strings it is a syntax error either way).
pub fn go_lossy(body: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(body) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(body.len() + 16);
    for chunk in body.utf8_chunks() {
        out.push_str(chunk.valid());
        out.extend(chunk.invalid().iter().map(|_| char::REPLACEMENT_CHARACTER));
    }
    Cow::Owned(out)
}

/// Reads the top-level object into [`Fields`]. Anything but an object is an
/// error (Go: a type error, nothing decoded; or `null`, nothing decoded).
struct Reader(Shape);

impl<'de> Visitor<'de> for Reader {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let shape = self.0;
        let mut f = Fields::default();
        while let Some(field) = map.next_key_seed(KeySeed(shape))? {
            match field {
                // A string, or null (left as it was). Anything else is a type
                // error: Ollama answers 400, so the whole read may fail.
                Field::Model => {
                    if let Some(GoString(m)) = map.next_value()? {
                        f.model = m;
                    }
                }
                Field::Stream => match map.next_value()? {
                    Loose::Bool(b) => f.stream = Some(b),
                    Loose::Null if shape.stream == StreamField::Pointer => f.stream = None,
                    _ => {}
                },
                Field::Options => match map.next_value()? {
                    OptionsValue::Null => f.options = None,
                    OptionsValue::Object(entry) => {
                        let current = f.options.get_or_insert(None);
                        if entry.is_some() {
                            *current = entry;
                        }
                    }
                    OptionsValue::Other => {}
                },
                // Go's `*int` takes an integer literal only.
                Field::MaxTokens => match map.next_value()? {
                    Loose::Null => f.max_tokens = None,
                    Loose::Number { int: Some(n), .. } => f.max_tokens = Some(n),
                    _ => {}
                },
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(f)
    }
}

/// Reads a key as raw bytes (so that a lone surrogate escape is not an
/// error, as in Go) and names its field.
struct KeySeed(Shape);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_bytes<E: de::Error>(self, key: &[u8]) -> Result<Field, E> {
        let s = self.0;
        let is = |name| go_key_matches(key, name);
        Ok(if is("model") {
            Field::Model
        } else if s.stream != StreamField::Absent && is("stream") {
            Field::Stream
        } else if s.options && is("options") {
            Field::Options
        } else if s.max_tokens && is("max_tokens") {
            Field::MaxTokens
        } else {
            Field::Other
        })
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Field, E> {
        self.visit_bytes(key.as_bytes())
    }
}

/// A JSON string, read as raw bytes so that a lone surrogate escape is not
/// an error: it becomes U+FFFD, as in Go.
struct GoString(String);

impl<'de> Deserialize<'de> for GoString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GoString, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GoString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<GoString, E> {
                Ok(GoString(from_wtf8(b)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GoString, E> {
                Ok(GoString(s.to_string()))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Text whose only invalid sequences are lone surrogates encoded as UTF-8
/// (3 bytes, `ED A0..BF ..`): each becomes one U+FFFD.
fn from_wtf8(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    let mut rest = b;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                break;
            }
            Err(e) => {
                let (valid, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                out.push(char::REPLACEMENT_CHARACTER);
                // A surrogate's three bytes, or whatever the error spans.
                let skip = if bad.len() >= 3 && bad[0] == 0xED && bad[1] >= 0xA0 {
                    3
                } else {
                    e.error_len().unwrap_or(bad.len())
                };
                rest = &bad[skip.min(bad.len())..];
            }
        }
    }
    out
}

/// Any JSON value, kept only as far as a scheduling field needs it; arrays
/// and objects are skipped without building them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loose {
    Null,
    Bool(bool),
    /// `int` when the literal is an integer that fits an i64 (what Go's
    /// `ParseInt` takes); `float` as Go's float64 reads it.
    Number {
        int: Option<i64>,
        float: f64,
    },
    Other,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Loose, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Loose, E> {
        Ok(Loose::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Loose, E> {
        Ok(Loose::Number {
            int: Some(n),
            float: n as f64,
        })
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Loose, E> {
        Ok(Loose::Number {
            int: i64::try_from(n).ok(),
            float: n as f64,
        })
    }
    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Loose, E> {
        Ok(Loose::Number {
            int: None,
            float: x,
        })
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Loose, E> {
        Ok(Loose::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
}

/// The value of `options`: `null` (a nil map), an object (its last
/// `num_predict` entry; keys of a map are exact in Go), or anything else (a
/// type error, left as it was).
enum OptionsValue {
    Null,
    Object(Option<Loose>),
    Other,
}

impl<'de> Deserialize<'de> for OptionsValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OptionsValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptionsValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an options object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OptionsValue, A::Error> {
                let mut num_predict = None;
                while let Some(ExactKey(is_num_predict)) = map.next_key()? {
                    if is_num_predict {
                        num_predict = Some(map.next_value::<Loose>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(OptionsValue::Object(num_predict))
            }
            fn visit_unit<E: de::Error>(self) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Null)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Other)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<OptionsValue, E> {
                Ok(OptionsValue::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OptionsValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(OptionsValue::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether a key of the options map is exactly `num_predict`.
struct ExactKey(bool);

impl<'de> Deserialize<'de> for ExactKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ExactKey, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ExactKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_bytes<E: de::Error>(self, k: &[u8]) -> Result<ExactKey, E> {
                Ok(ExactKey(k == b"num_predict"))
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<ExactKey, E> {
                self.visit_bytes(k.as_bytes())
            }
        }
        d.deserialize_bytes(V)
    }
}

// An explicit path: the fuzz target includes this file with `#[path]`, which
// would otherwise look for the tests next to it.
#[cfg(test)]
#[path = "request/tests.rs"]
mod tests;
