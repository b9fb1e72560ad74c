//! Token generation shared by the native and OpenAI endpoints: slot, prompt
//! delay, per-token delay, failure injection, and the wire format of every
//! chunk.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};

use crate::state::Tracker;
use crate::timing::{Next, Plan};
use crate::util::{self, Body, Pacer, Shape};

/// Which API a generation answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// `/api/generate`
    Generate,
    /// `/api/chat`
    Chat,
    /// `/v1/chat/completions`
    OaChat,
    /// `/v1/completions`
    OaCompletion,
}

impl Flavor {
    fn openai(self) -> bool {
        matches!(self, Flavor::OaChat | Flavor::OaCompletion)
    }
}

/// One generation in progress. Owns the [`Tracker`], so dropping it (the
/// handler future or the streaming body) is a cancellation.
pub(crate) struct Gen {
    pub tracker: Tracker,
    pub flavor: Flavor,
    pub model: String,
    /// Its timing, length and failure point.
    pub plan: Plan,
    /// `done_reason: "length"` rather than `"stop"`.
    pub length: bool,
    pub prompt_tokens: u64,
    pub include_usage: bool,
    pub shape: Shape,
    pub keep_alive: Option<Value>,
    id: String,
    created: u64,
    load_dur: Duration,
    prompt_dur: Duration,
    gen_start: Instant,
    /// Sleeps to the plan's offsets; restarted when the slot is granted.
    pacer: Pacer,
    pending: VecDeque<Bytes>,
    ended: bool,
}

enum Step {
    Token(String),
    Fail,
    Done,
}

/// What [`Gen::run`] ended with.
pub(crate) enum Outcome {
    /// A streaming response, first frame ready.
    Stream(Gen),
    /// The complete (non-streamed) text.
    Text(Gen, String),
    /// Failed before any byte was written: answer with a 500.
    Failed,
}

impl Gen {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tracker: Tracker,
        flavor: Flavor,
        model: String,
        n: u64,
        length: bool,
        prompt_tokens: u64,
        include_usage: bool,
        shape: Shape,
        keep_alive: Option<Value>,
    ) -> Self {
        let id = match flavor {
            Flavor::OaChat => format!("chatcmpl-{}", tracker.req()),
            _ => format!("cmpl-{}", tracker.req()),
        };
        let plan = Plan {
            timing: shape.timing,
            tokens: n,
            fail_after: shape.fail_after,
        };
        Gen {
            tracker,
            flavor,
            model,
            plan,
            length,
            prompt_tokens,
            include_usage,
            shape,
            keep_alive,
            id,
            created: util::unix_secs(),
            load_dur: Duration::ZERO,
            prompt_dur: Duration::ZERO,
            gen_start: Instant::now(),
            pacer: Pacer::start(),
            pending: VecDeque::new(),
            ended: false,
        }
    }

    /// Takes a slot, waits out the prompt delay, and then either produces the
    /// first frame of a stream or the whole text.
    pub async fn run(mut self, stream: bool) -> Outcome {
        // The model first (its load time if it is not loaded), then a slot.
        let state = self.tracker.state().clone();
        state.load(&self.model, self.keep_alive.as_ref()).await;
        self.load_dur = self.tracker.t0.elapsed();
        self.tracker.acquire().await;
        let started = Instant::now();
        self.pacer = Pacer::start();
        self.pacer.until(self.plan.timing.prompt).await;
        self.prompt_dur = started.elapsed();
        self.gen_start = Instant::now();
        if stream {
            if self.plan.next(0) == Next::Fail {
                // Failing on the very first token: nothing written yet, so
                // Ollama answers with a real status.
                self.tracker.fail();
                return Outcome::Failed;
            }
            match self.next_frame().await {
                Some(first) => {
                    self.pending.push_front(first);
                    Outcome::Stream(self)
                }
                None => Outcome::Failed,
            }
        } else {
            let mut text = String::new();
            loop {
                match self.step().await {
                    Step::Token(t) => text.push_str(&t),
                    Step::Fail => {
                        self.tracker.fail();
                        return Outcome::Failed;
                    }
                    Step::Done => {
                        self.ended = true;
                        self.tracker.finish();
                        self.unload_if_asked();
                        return Outcome::Text(self, text);
                    }
                }
            }
        }
    }

    async fn step(&mut self) -> Step {
        let i = self.tracker.tokens;
        match self.plan.next(i) {
            Next::Fail => return Step::Fail,
            Next::Done => return Step::Done,
            Next::Token(at) => self.pacer.until(at).await,
        }
        self.tracker.tokens += 1;
        if i == 0 {
            self.tracker.first_token();
        }
        Step::Token(format!("tok{i} "))
    }

    fn unload_if_asked(&self) {
        if util::keep_alive_zero(self.keep_alive.as_ref()) {
            self.tracker.state().set_unloaded(&self.model);
        }
    }

    /// The next frame of a streaming answer; `None` at the end.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(b) = self.pending.pop_front() {
            return Some(b);
        }
        if self.ended {
            return None;
        }
        match self.step().await {
            Step::Token(t) => Some(self.token_frame(&t)),
            Step::Fail => {
                self.ended = true;
                self.tracker.fail();
                Some(self.error_frame())
            }
            Step::Done => {
                self.ended = true;
                self.final_frames();
                self.tracker.finish();
                self.unload_if_asked();
                self.pending.pop_front()
            }
        }
    }

    fn done_reason(&self) -> &'static str {
        if self.length { "length" } else { "stop" }
    }

    /// The `done:true` metrics (nanoseconds).
    fn metrics(&self, obj: &mut serde_json::Map<String, Value>) {
        let eval = self.gen_start.elapsed();
        obj.insert("done_reason".into(), self.done_reason().into());
        obj.insert(
            "total_duration".into(),
            util::nanos(self.tracker.t0.elapsed()).into(),
        );
        obj.insert("load_duration".into(), util::nanos(self.load_dur).into());
        obj.insert("prompt_eval_count".into(), self.prompt_tokens.into());
        obj.insert(
            "prompt_eval_duration".into(),
            util::nanos(self.prompt_dur).into(),
        );
        obj.insert("eval_count".into(), self.tracker.tokens.into());
        obj.insert("eval_duration".into(), util::nanos(eval).into());
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tracker.tokens,
            "total_tokens": self.prompt_tokens + self.tracker.tokens,
        })
    }

    /// A native chunk (generate or chat) without the trailing newline.
    fn native_chunk(&self, text: &str, done: bool) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("model".into(), self.model.clone().into());
        m.insert("created_at".into(), util::now_rfc3339().into());
        if self.flavor == Flavor::Chat {
            m.insert(
                "message".into(),
                json!({ "role": "assistant", "content": text }),
            );
        } else {
            m.insert("response".into(), text.into());
        }
        m.insert("done".into(), done.into());
        m
    }

    fn oa_chunk(&self, text: &str, finish: Option<&str>) -> Value {
        let choice = if self.flavor == Flavor::OaChat {
            json!({
                "index": 0,
                "delta": { "role": "assistant", "content": text },
                "finish_reason": finish,
            })
        } else {
            json!({ "text": text, "index": 0, "logprobs": null, "finish_reason": finish })
        };
        json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
        })
    }

    fn chunk_object(&self) -> &'static str {
        if self.flavor == Flavor::OaChat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        }
    }

    fn token_frame(&self, text: &str) -> Bytes {
        if self.flavor.openai() {
            sse(&self.oa_chunk(text, None))
        } else {
            line(&Value::Object(self.native_chunk(text, false)))
        }
    }

    /// Mid-stream failure: Ollama sends `{"error":...}` and ends without
    /// `done`. Through `/v1` that line decodes as an empty chunk and the
    /// stream ends without `[DONE]`.
    fn error_frame(&self) -> Bytes {
        if self.flavor.openai() {
            let mut empty = self.oa_chunk("", None);
            empty["model"] = "".into();
            empty["choices"][0]["delta"]["role"] = "".into();
            sse(&empty)
        } else {
            line(&json!({ "error": util::FAKE_FAILURE }))
        }
    }

    fn final_frames(&mut self) {
        if self.flavor.openai() {
            let finish = self.oa_chunk("", Some(self.done_reason()));
            self.pending.push_back(sse(&finish));
            if self.include_usage {
                let usage = json!({
                    "id": self.id,
                    "object": self.chunk_object(),
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [],
                    "usage": self.usage(),
                });
                self.pending.push_back(sse(&usage));
            }
            self.pending
                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        } else {
            let mut m = self.native_chunk("", true);
            self.metrics(&mut m);
            self.pending.push_back(line(&Value::Object(m)));
        }
    }

    /// The single JSON object of a non-streamed answer.
    pub fn full_object(&self, text: &str) -> Value {
        match self.flavor {
            Flavor::Generate | Flavor::Chat => {
                let mut m = self.native_chunk(text, true);
                self.metrics(&mut m);
                Value::Object(m)
            }
            Flavor::OaChat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "fp_ollama",
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": text },
                    "finish_reason": self.done_reason(),
                }],
                "usage": self.usage(),
            }),
            Flavor::OaCompletion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "fp_ollama",
                "choices": [{
                    "text": text,
                    "index": 0,
                    "logprobs": null,
                    "finish_reason": self.done_reason(),
                }],
                "usage": self.usage(),
            }),
        }
    }

    /// Turns a started stream into the HTTP response. The body owns `self`:
    /// when hyper drops it (client gone), the tracker logs `Cancelled`.
    pub fn into_response(self) -> Response<Body> {
        let ctype = if self.flavor.openai() {
            util::SSE
        } else {
            util::NDJSON
        };
        let stream = futures_util::stream::unfold(self, |mut g| async move {
            if g.shape
                .drop_after
                .is_some_and(|n| g.tracker.tokens >= n && !g.ended)
                && g.pending.is_empty()
            {
                // An upstream that dies mid-stream: hyper aborts the connection.
                g.ended = true;
                g.tracker.fail();
                return Some((Err(std::io::Error::other("fake drop")), g));
            }
            let b = g.next_frame().await?;
            Some((Ok::<_, std::io::Error>(Frame::data(b)), g))
        });
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    }
}

/// Runs a generation to its HTTP response.
pub(crate) async fn respond(g: Gen, stream: bool) -> Response<Body> {
    let openai = g.flavor.openai();
    match g.run(stream).await {
        Outcome::Stream(g) => g.into_response(),
        Outcome::Text(g, text) => util::json_response(StatusCode::OK, &g.full_object(&text)),
        Outcome::Failed if openai => {
            util::openai_error(StatusCode::INTERNAL_SERVER_ERROR, util::FAKE_FAILURE)
        }
        Outcome::Failed => {
            util::ollama_error(StatusCode::INTERNAL_SERVER_ERROR, util::FAKE_FAILURE)
        }
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn sse(v: &Value) -> Bytes {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut b, v).unwrap_or_default();
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}
