//! Log values that a client or a plugin controls (a request's model name,
//! a plugin's error text with its stderr), made safe for the text log.
//!
//! tracing's text format writes a `%` field as is, so a model name holding
//! `\n2030-01-01T00:00:00Z  INFO ...` would print a line of its own, and a
//! space and `outcome=ok` would forge a field. [`Escaped`] writes such a value
//! in logfmt style: unchanged when it is one plain word (`llama3:8b`), else
//! quoted, with `"` and `\` escaped and every control character (and the
//! Unicode line breaks and bidi overrides that reorder a terminal line)
//! written as a Rust escape (`\n`, `\u{1b}`). So one event is one line, and
//! every field in it is one the host wrote.

use std::fmt::{self, Display, Write};

/// Displays `T` as one log-safe field value; see the module doc.
/// Use it as `tracing::info!(model = %Escaped(&meta.model), ...)`.
pub struct Escaped<T>(pub T);

impl<T: Display> Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Most values (model names, paths) are plain words: write them
        // without an allocation; anything else goes through the escaper.
        let mut probe = Probe::default();
        write!(probe, "{}", self.0)?;
        if probe.any && !probe.special {
            return write!(f, "{}", self.0);
        }
        f.write_char('"')?;
        write!(Escaper(f), "{}", self.0)?;
        f.write_char('"')
    }
}

/// Whether a value can be written without quotes or escapes: it is not
/// empty and has no character that is [`special`].
#[derive(Default)]
struct Probe {
    any: bool,
    special: bool,
}

impl Write for Probe {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.any |= !s.is_empty();
        self.special |= s.chars().any(special);
        Ok(())
    }
}

/// Characters that make a value need quotes: space, quote, backslash, `=`,
/// and all that [`needs_escape`].
fn special(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\\' | '=') || needs_escape(c)
}

/// Writes its input quoted-string style into the formatter.
struct Escaper<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Write for Escaper<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                c if needs_escape(c) => write!(self.0, "{}", c.escape_default())?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Characters that break a line or change how a terminal shows it.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // line and paragraph separators
            '\u{2028}' | '\u{2029}'
            // bidi embeddings, overrides and isolates
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    fn esc(s: &str) -> String {
        Escaped(s).to_string()
    }

    #[test]
    fn plain_words_are_unchanged() {
        for s in [
            "llama3:8b",
            "/api/generate",
            "qwen2.5-coder:7b-instruct",
            "modèle",
        ] {
            assert_eq!(esc(s), s);
        }
    }

    #[test]
    fn anything_else_is_one_quoted_escaped_value() {
        assert_eq!(esc(""), r#""""#);
        assert_eq!(esc("a b"), r#""a b""#);
        assert_eq!(esc("x outcome=ok"), r#""x outcome=ok""#);
        assert_eq!(esc("a\nb"), r#""a\nb""#);
        assert_eq!(esc("a\r\u{1b}[2Kb"), r#""a\r\u{1b}[2Kb""#);
        assert_eq!(esc(r#"say "hi" \o/"#), r#""say \"hi\" \\o/""#);
        assert_eq!(
            esc("a\u{2028}b\u{202e}c\u{85}"),
            r#""a\u{2028}b\u{202e}c\u{85}""#
        );
    }

    #[test]
    fn no_output_line_break_whatever_the_input() {
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let s = format!("x{c}y");
            let out = esc(&s);
            assert!(
                !out.contains([
                    '\n', '\r', '\u{b}', '\u{c}', '\u{85}', '\u{2028}', '\u{2029}'
                ]),
                "{c:?}: {out}"
            );
            assert!(!out.chars().any(|c| c.is_control()), "{c:?}: {out}");
        }
    }

    #[test]
    fn display_values_are_escaped_too() {
        let e = std::io::Error::other("line one\nline two");
        assert_eq!(Escaped(&e).to_string(), r#""line one\nline two""#);
    }
}
