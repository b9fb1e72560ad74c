//! Chunks out of a streamed body, whatever its frames: NDJSON lines and
//! server-sent events may be split across frames or share one, so they are
//! cut at their own delimiters, not at frame boundaries.

/// Cuts a byte stream into lines (`\n`, with a `\r` before it dropped).
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// Adds bytes; calls `line` with each line they complete.
    pub(crate) fn feed(&mut self, mut data: &[u8], mut line: impl FnMut(&[u8])) {
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            let (head, rest) = data.split_at(i);
            if self.buf.is_empty() {
                line(trim_cr(head));
            } else {
                self.buf.extend_from_slice(head);
                line(trim_cr(&self.buf));
                self.buf.clear();
            }
            data = &rest[1..];
        }
        self.buf.extend_from_slice(data);
    }

    /// The last line, if the stream did not end with a newline.
    pub(crate) fn rest(&self) -> Option<&[u8]> {
        (!self.buf.is_empty()).then(|| trim_cr(&self.buf))
    }
}

fn trim_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Collects the `data` of server-sent events from their lines: `data:`
/// lines (one space after the colon dropped) joined by `\n`, an event
/// ending at a blank line. Other fields and comments are ignored.
#[derive(Debug, Default)]
pub(crate) struct Events {
    data: Option<Vec<u8>>,
}

impl Events {
    /// Takes one line; returns an event's data when the line ends one.
    pub(crate) fn line(&mut self, l: &[u8]) -> Option<Vec<u8>> {
        if l.is_empty() {
            return self.data.take();
        }
        if let Some(v) = l.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            match &mut self.data {
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
                None => self.data = Some(v.to_vec()),
            }
        }
        None
    }

    /// The data of an event the stream ended in without a blank line.
    pub(crate) fn rest(&mut self) -> Option<Vec<u8>> {
        self.data.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(frames: &[&[u8]]) -> Vec<String> {
        let mut l = Lines::default();
        let mut out = Vec::new();
        for f in frames {
            l.feed(f, |x| out.push(String::from_utf8_lossy(x).into_owned()));
        }
        if let Some(r) = l.rest() {
            out.push(format!("rest:{}", String::from_utf8_lossy(r)));
        }
        out
    }

    #[test]
    fn lines_are_cut_at_newlines_not_at_frames() {
        assert_eq!(
            lines(&[b"{\"a\":1}\n{\"b\"", b":2}\r\n\n{\"c\":", b"3}"]),
            ["{\"a\":1}", "{\"b\":2}", "", "rest:{\"c\":3}"]
        );
        assert!(lines(&[b"x\n"]).iter().all(|l| !l.starts_with("rest")));
    }

    #[test]
    fn events_join_data_lines_and_skip_the_rest() {
        let mut e = Events::default();
        let mut out = Vec::new();
        let mut l = Lines::default();
        let body = b": comment\nevent: x\ndata: {\"a\":\ndata:1}\n\ndata: [DONE]\n\ndata: tail";
        l.feed(body, |line| out.extend(e.line(line)));
        if let Some(r) = l.rest() {
            out.extend(e.line(r));
        }
        out.extend(e.rest());
        let out: Vec<String> = out
            .into_iter()
            .map(|d| String::from_utf8(d).unwrap())
            .collect();
        assert_eq!(out, ["{\"a\":\n1}", "[DONE]", "tail"]);
    }
}
