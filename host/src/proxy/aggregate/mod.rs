//! Non-streamed answers built from the upstream's stream.
//!
//! maitre asks the upstream for a stream even when its client asked for none
//! (see `rewrite`), so that it sees every request's progress and can stop
//! one by closing its connection (engines like llama-server only stop a
//! streaming request then). For such a client it reads the stream to its end
//! and folds it into exactly the answer the upstream would have given
//! without a stream: [`ollama`] for `/api/generate` and `/api/chat` (the way
//! Ollama builds its own), [`openai`] for `/v1/chat/completions` and
//! `/v1/completions`. [`frames`] cuts the body into lines and events,
//! [`json`] keeps the upstream's field order.

mod frames;
mod json;
mod ollama;
mod openai;

use bytes::Bytes;
use http::StatusCode;
use http_body::Body;
use http_body_util::BodyExt;

use self::frames::{Events, Lines};
use super::body::Framing;

/// Which API a streamed answer speaks, and so how it folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    /// `/api/generate` (`chat` false) or `/api/chat`; `tools` says whether
    /// the request offered tools.
    Ollama {
        /// `/api/chat`.
        chat: bool,
        /// The request's `tools` is a non-empty array.
        tools: bool,
    },
    /// `/v1/chat/completions` (`chat` true) or `/v1/completions`.
    OpenAi {
        /// `/v1/chat/completions`.
        chat: bool,
    },
}

impl Api {
    /// The `Content-Type` of the non-streamed answer, as Ollama sets it
    /// (gin's `c.JSON` natively, a plain `application/json` on `/v1`).
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Api::Ollama { .. } => "application/json; charset=utf-8",
            Api::OpenAi { .. } => "application/json",
        }
    }

    /// The path of a chat; `None` for the completions.
    pub(crate) fn chat_path(self) -> Option<&'static str> {
        match self {
            Api::Ollama { chat: true, .. } => Some("/api/chat"),
            Api::OpenAi { chat: true } => Some("/v1/chat/completions"),
            _ => None,
        }
    }

    /// The framing of the stream this API answers with.
    pub(crate) fn framing(self) -> Framing {
        match self {
            Api::Ollama { .. } => Framing::Ndjson,
            Api::OpenAi { .. } => Framing::Sse,
        }
    }

    fn fold(self) -> Box<dyn Fold + Send> {
        match self {
            Api::Ollama { chat, tools } => Box::new(ollama::Ollama::new(chat, tools)),
            Api::OpenAi { chat } => Box::new(openai::OpenAi::new(chat)),
        }
    }
}

/// What a stream folds into.
#[derive(Debug)]
pub(crate) enum Folded {
    /// The non-streamed answer's body (status 200).
    Answer(Vec<u8>),
    /// The error answer the upstream would have given: status and body.
    Error(StatusCode, Vec<u8>),
    /// The stream broke off or made no sense; says how.
    Cut(&'static str),
}

/// The answer so far of a chat that was pre-empted before its end: what a
/// resumed generation continues from (`resume`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Partial {
    /// The answer's text so far.
    pub text: String,
    /// The tokens that made it (chunks that carried text).
    pub tokens: u64,
}

/// Folds one API's stream, chunk by chunk.
pub(crate) trait Fold {
    /// One chunk (an NDJSON line, an event's data); `Some` when it decides
    /// the answer (an error chunk), and the rest of the stream is not needed.
    fn chunk(&mut self, data: &[u8]) -> Option<Folded>;
    /// The stream ended.
    fn end(self: Box<Self>) -> Folded;
    /// What a resumed generation can continue from, had the stream stopped
    /// here: a chat's plain text, one choice, with no thinking, tool calls
    /// or logprobs (which a trailing assistant message cannot carry on).
    /// `None`: restart it instead.
    fn partial(&self) -> Option<Partial> {
        None
    }
    /// Starts from `p`: the stream that follows continues it, so the answer
    /// is `p`'s text and then the stream's, its token counts `p.tokens`
    /// higher.
    fn seed(&mut self, _p: &Partial) {}
}

/// Chunks out of the body's frames into the fold.
pub(crate) struct Reader<T> {
    fold: Box<dyn Fold + Send>,
    lines: Lines,
    /// For SSE; `None` for NDJSON.
    events: Option<Events>,
    decided: Option<Folded>,
    tick: T,
}

impl<T: FnMut()> Reader<T> {
    /// A reader of a streamed answer of `api`, continuing `seed` when the
    /// request resumes a pre-empted generation; `tick` is called once per
    /// chunk, as the relay of a stream counts its chunks.
    pub(crate) fn new(api: Api, seed: Option<&Partial>, tick: T) -> Self {
        let mut fold = api.fold();
        if let Some(p) = seed {
            fold.seed(p);
        }
        Reader {
            fold,
            lines: Lines::default(),
            events: matches!(api, Api::OpenAi { .. }).then(Events::default),
            decided: None,
            tick,
        }
    }

    /// What a resumed generation can continue from, as far as the stream
    /// was read ([`Fold::partial`]).
    pub(crate) fn partial(&self) -> Option<Partial> {
        self.fold.partial()
    }

    fn line(&mut self, l: &[u8]) {
        if self.decided.is_some() {
            return;
        }
        let chunk = match &mut self.events {
            None if l.iter().all(u8::is_ascii_whitespace) => return,
            None => l.to_vec(),
            Some(events) => match events.line(l) {
                Some(data) => data,
                None => return,
            },
        };
        (self.tick)();
        self.decided = self.fold.chunk(&chunk);
    }

    fn feed(&mut self, data: &[u8]) {
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(data, |l| self.line(l));
        self.lines = lines;
    }

    /// Reads the body to its end (or to an error chunk). `None`: read on
    /// to [`Reader::end`]. `Err` when the body failed (the connection was
    /// lost), with the error and its causes.
    pub(crate) async fn read<B>(&mut self, mut body: B) -> Result<Option<Folded>, String>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::error::Error,
    {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        self.feed(&data);
                    }
                }
                Err(e) => return Err(super::target::causes(&e)),
            }
            if let Some(d) = self.decided.take() {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// The body ended: the folded answer.
    pub(crate) fn end(mut self) -> Folded {
        if let Some(rest) = self.lines.rest().map(<[u8]>::to_vec) {
            self.line(&rest);
        }
        if let Some(data) = self.events.as_mut().and_then(Events::rest)
            && self.decided.is_none()
        {
            (self.tick)();
            self.decided = self.fold.chunk(&data);
        }
        match self.decided {
            Some(d) => d,
            None => self.fold.end(),
        }
    }
}

/// Reads a streamed answer of `api` to its end (or to an error chunk) and
/// folds it; `tick` is called once per chunk. `Err` when the body failed
/// (the connection was lost), with the error and its causes.
#[cfg(test)]
pub(crate) async fn read_whole<B>(body: B, api: Api, tick: impl FnMut()) -> Result<Folded, String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error,
{
    let mut r = Reader::new(api, None, tick);
    match r.read(body).await? {
        Some(d) => Ok(d),
        None => Ok(r.end()),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;

    type Frames = Vec<Item>;

    type Body = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Item>>>;
    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn body(frames: &[&str]) -> Body {
        let v: Frames = frames
            .iter()
            .map(|f| Ok(Frame::data(Bytes::from(f.to_string()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(v))
    }

    fn read(frames: &[&str], api: Api) -> (Result<Folded, String>, usize) {
        let mut ticks = 0;
        let r = read_whole(body(frames), api, || ticks += 1)
            .now_or_never()
            .expect("ready");
        (r, ticks)
    }

    #[test]
    fn ndjson_split_across_frames_folds_and_counts_each_line() {
        let (r, ticks) = read(
            &[
                "{\"model\":\"m\",\"response\":\"a\",\"done\":fa",
                "lse}\n{\"model\":\"m\",\"response\":\"b\",\"done\":false}\n",
                "{\"model\":\"m\",\"response\":\"\",\"done\":true,\"eval_count\":2}",
            ],
            Api::Ollama {
                chat: false,
                tools: false,
            },
        );
        match r.unwrap() {
            Folded::Answer(b) => assert_eq!(
                b,
                br#"{"model":"m","response":"ab","done":true,"eval_count":2}"#
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(ticks, 3);
    }

    #[test]
    fn sse_events_fold_and_an_error_line_stops_early() {
        let (r, ticks) = read(
            &[
                "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\n",
                "data: [DONE]\n\n",
            ],
            Api::OpenAi { chat: false },
        );
        assert!(matches!(r.unwrap(), Folded::Answer(_)));
        assert_eq!(ticks, 2);
        let (r, ticks) = read(
            &["{\"error\":\"boom\"}\n{\"never\":\"read\"}\n"],
            Api::Ollama {
                chat: true,
                tools: false,
            },
        );
        assert!(matches!(r.unwrap(), Folded::Error(..)));
        assert_eq!(ticks, 1);
    }

    #[test]
    fn a_failing_body_is_a_lost_upstream() {
        let v: Frames = vec![
            Ok(Frame::data(Bytes::from_static(b"{\"done\":false}\n"))),
            Err(std::io::Error::other("connection reset")),
        ];
        let r = read_whole(
            StreamBody::new(futures_util::stream::iter(v)),
            Api::Ollama {
                chat: false,
                tools: false,
            },
            || {},
        )
        .now_or_never()
        .unwrap();
        assert_eq!(r.unwrap_err(), "connection reset");
    }
}
