//! One parser for maitre's `/metrics` (Prometheus text 0.0.4 and OpenMetrics
//! 1.0 text): every sample as a name, a label map and a value.
//!
//! Why not the `prometheus-parse` crate: it matches lines with a regex that
//! ends label values at the first `}`, skips any line it cannot read without
//! saying so, and would bring chrono and itertools for a job this small. A
//! test kit must fail loudly on a line it does not understand. The official
//! Python parsers still check the format itself (`tests/python/metrics_parse.py`).

use std::collections::BTreeMap;
use std::fmt;

/// One sample line: `name{label="value",...} value [timestamp] [# exemplar]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's name (for a counter, with its `_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A line the parser could not read.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}: {text:?}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: &'static str,
    /// The line.
    pub text: String,
}

/// A parsed `/metrics` answer; keeps its text for assertion messages.
#[derive(Clone, Debug)]
pub struct Scrape {
    /// Every sample, in the order of the text.
    pub samples: Vec<Sample>,
    /// The text it was parsed from.
    pub text: String,
}

impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Scrape {
    /// Parses a `/metrics` text; comments (`# HELP`, `# TYPE`, `# EOF`) and
    /// blank lines are skipped, any other line must be a sample.
    pub fn parse(text: &str) -> Result<Scrape, ParseError> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message| ParseError {
                line: i + 1,
                message,
                text: line.to_string(),
            };
            samples.push(parse_sample(line).map_err(err)?);
        }
        Ok(Scrape {
            samples,
            text: text.to_string(),
        })
    }

    /// GETs `{admin}/metrics` and parses it; panics on any failure.
    pub async fn get(admin: &str) -> Scrape {
        let url = format!("{admin}/metrics");
        let text = crate::client()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        Scrape::parse(&text).unwrap_or_else(|e| panic!("{url}: {e}\n{text}"))
    }

    /// The value of the sample `name` whose labels are exactly `labels`, if
    /// there is one.
    pub fn get_exact(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The sum over the samples `name` that carry every one of `labels`
    /// (and maybe more): e.g. a counter over all its label values. 0 when
    /// none matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .fold(0.0, |sum, s| sum + s.value)
    }
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    // The value, then an optional timestamp and an optional exemplar.
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next().ok_or("no value")?).ok_or("bad value")?;
    match fields.next() {
        None | Some("#") => {}
        Some(ts) => {
            ts.parse::<f64>().map_err(|_| "bad timestamp")?;
            if !matches!(fields.next(), None | Some("#")) {
                return Err("trailing text");
            }
        }
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Reads `k="v",...}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("bad label name");
        }
        let after_eq = s[eq + 1..].trim_start();
        let mut chars = after_eq.char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err("label value not quoted");
        }
        let mut value = String::new();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("unterminated label value")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    _ => return Err("bad escape in label value"),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err("label given twice");
        }
        s = after_eq[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label");
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP maitre_requests Requests.
# TYPE maitre_requests counter
maitre_requests_total{arm="main",class="batch",outcome="ok"} 8
maitre_requests_total{arm="main",class="realtime",outcome="ok"} 4
maitre_requests_total{arm="b",class="batch",outcome="rejected"} 1.5e0
maitre_slots 2
maitre_queue_wait_seconds_bucket{arm="main",class="batch",le="+Inf"} 8 1700000000
odd{v="a}b, \"c\"\\d\ne"} -1 # {trace_id="x"} 1
# EOF
"#;

    #[test]
    fn reads_names_labels_and_values() {
        let s = Scrape::parse(TEXT).unwrap();
        assert_eq!(s.samples.len(), 6);
        assert_eq!(s.get_exact("maitre_slots", &[]), Some(2.0));
        assert_eq!(
            s.get_exact(
                "maitre_requests_total",
                &[("arm", "main"), ("class", "batch"), ("outcome", "ok")]
            ),
            Some(8.0)
        );
        // Exact means every label: a subset does not match.
        assert_eq!(
            s.get_exact("maitre_requests_total", &[("arm", "main")]),
            None
        );
        assert_eq!(s.sum("maitre_requests_total", &[("arm", "main")]), 12.0);
        assert_eq!(s.sum("maitre_requests_total", &[]), 13.5);
        assert_eq!(s.sum("absent", &[]), 0.0);
        assert_eq!(
            s.get_exact(
                "maitre_queue_wait_seconds_bucket",
                &[("arm", "main"), ("class", "batch"), ("le", "+Inf")]
            ),
            Some(8.0)
        );
        assert_eq!(s.get_exact("odd", &[("v", "a}b, \"c\"\\d\ne")]), Some(-1.0));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "name",
            "name{a=\"1\"",
            "name{a=1} 2",
            "name{a=\"1\" b=\"2\"} 2",
            "name{a=\"1\",a=\"2\"} 2",
            "name twelve",
            "na-me 1",
            "name 1 2 3",
        ] {
            let err = Scrape::parse(bad).expect_err(bad);
            assert_eq!(err.line, 1, "{bad}");
        }
    }
}
