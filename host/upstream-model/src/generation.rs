//! Token generation shared by the native and OpenAI endpoints: slot, prompt
//! delay, per-token delay, failure injection, and the wire format of every
//! chunk. What each token says (thinking, a tool call, text) comes from the
//! request's [`Script`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};

use crate::content::{Asks, Piece, Script};
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
    /// `options.num_ctx` (native API only): another context than the one
    /// the model is loaded with reloads it.
    pub num_ctx: Option<u64>,
    script: Script,
    /// A `/v1` chat stream names the role in its first chunk only.
    role_sent: bool,
    /// A tool call went out (`finish_reason: "tool_calls"` on `/v1`).
    called: bool,
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
    Token(Piece),
    Fail,
    Done,
}

/// A whole answer, gathered from its pieces.
#[derive(Default)]
pub(crate) struct Whole {
    thinking: String,
    text: String,
    calls: Vec<usize>,
}

impl Whole {
    fn add(&mut self, p: Piece) {
        match p {
            Piece::Thinking(t) => self.thinking.push_str(&t),
            Piece::Text(t) => self.text.push_str(&t),
            Piece::Call(k) => self.calls.push(k),
        }
    }

    fn of(p: &Piece) -> Whole {
        let mut w = Whole::default();
        w.add(p.clone());
        w
    }
}

/// What [`Gen::run`] ended with.
pub(crate) enum Outcome {
    /// A streaming response, first frame ready.
    Stream(Gen),
    /// The complete (non-streamed) answer.
    Text(Gen, Whole),
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
        asks: Asks,
    ) -> Self {
        let id = match flavor {
            Flavor::OaChat => format!("chatcmpl-{}", tracker.req()),
            _ => format!("cmpl-{}", tracker.req()),
        };
        // Prefill grows with the prompt (a resumed chat's answer so far
        // included).
        let mut timing = shape.timing;
        let per_word = tracker.state().cfg.prompt_token_delay;
        timing.prompt = timing.prompt.saturating_add(
            per_word.saturating_mul(u32::try_from(prompt_tokens).unwrap_or(u32::MAX)),
        );
        let plan = Plan {
            timing,
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
            num_ctx: None,
            script: Script::new(asks, n),
            role_sent: false,
            called: false,
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

    /// The answer continues `words` tokens of text already given (a chat
    /// with a trailing assistant message).
    pub fn continuing(mut self, words: u64) -> Self {
        self.script = self.script.continuing(words);
        self
    }

    /// Takes a slot, waits out the prompt delay, and then either produces the
    /// first frame of a stream or the whole text.
    pub async fn run(mut self, stream: bool) -> Outcome {
        // The model first (its load time if it is not loaded), then a slot.
        let state = self.tracker.state().clone();
        state
            .load(&self.model, self.keep_alive.as_ref(), self.num_ctx)
            .await;
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
            let mut whole = Whole::default();
            loop {
                match self.step().await {
                    Step::Token(p) => whole.add(p),
                    Step::Fail => {
                        self.tracker.fail();
                        return Outcome::Failed;
                    }
                    Step::Done => {
                        self.ended = true;
                        self.tracker.finish();
                        self.unload_if_asked();
                        return Outcome::Text(self, whole);
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
        Step::Token(self.script.piece(i))
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
            Step::Token(p) => Some(self.token_frame(&p)),
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

    /// `/v1`'s finish reason: a stop after a tool call is `tool_calls`.
    fn finish_reason(&self, called: bool) -> &'static str {
        match self.done_reason() {
            "stop" if called => "tool_calls",
            r => r,
        }
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

    /// A native object (generate or chat) saying `w`: a chunk, or with
    /// `done` and the metrics the whole answer. Empty thinking and no tool
    /// calls are left out, as Go's `omitempty` does.
    fn native_chunk(&self, w: &Whole, done: bool) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("model".into(), self.model.clone().into());
        m.insert("created_at".into(), util::now_rfc3339().into());
        if self.flavor == Flavor::Chat {
            let mut msg = json!({ "role": "assistant", "content": w.text });
            if !w.thinking.is_empty() {
                msg["thinking"] = w.thinking.clone().into();
            }
            if !w.calls.is_empty() {
                let calls: Vec<Value> = w
                    .calls
                    .iter()
                    .map(|k| self.script.native_call(*k))
                    .collect();
                msg["tool_calls"] = calls.into();
            }
            m.insert("message".into(), msg);
        } else {
            m.insert("response".into(), w.text.clone().into());
            if !w.thinking.is_empty() {
                m.insert("thinking".into(), w.thinking.clone().into());
            }
        }
        m.insert("done".into(), done.into());
        m
    }

    /// A `/v1` message (`delta` false) or delta saying `w`, as Ollama's
    /// `openai.Message` / `openai.Delta` write it.
    fn oa_message(&self, w: &Whole, role: bool) -> Value {
        let mut msg = json!({ "content": w.text });
        if role {
            msg["role"] = "assistant".into();
        }
        if !w.thinking.is_empty() {
            msg["reasoning"] = w.thinking.clone().into();
        }
        if !w.calls.is_empty() {
            let calls: Vec<Value> = w
                .calls
                .iter()
                .map(|k| self.script.openai_call(*k))
                .collect();
            msg["tool_calls"] = calls.into();
        }
        msg
    }

    /// A `/v1` chunk saying `w`; `finish` makes it the finish chunk, whose
    /// chat delta is empty.
    fn oa_chunk(&mut self, w: &Whole, finish: Option<&str>) -> Value {
        let choice = if self.flavor == Flavor::OaChat {
            let delta = if finish.is_some() {
                json!({})
            } else {
                let d = self.oa_message(w, !self.role_sent);
                self.role_sent = true;
                self.called |= !w.calls.is_empty();
                d
            };
            json!({ "index": 0, "delta": delta, "finish_reason": finish })
        } else {
            json!({ "text": w.text, "index": 0, "finish_reason": finish })
        };
        let mut c = json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
        });
        if self.flavor == Flavor::OaCompletion && self.include_usage {
            // Ollama's completions stream puts an all-zero usage on every
            // chunk when asked for usage; the real one comes last.
            c["usage"] = json!({ "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 });
        }
        c
    }

    fn chunk_object(&self) -> &'static str {
        if self.flavor == Flavor::OaChat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        }
    }

    fn token_frame(&mut self, p: &Piece) -> Bytes {
        let w = Whole::of(p);
        if self.flavor.openai() {
            sse(&self.oa_chunk(&w, None))
        } else {
            line(&Value::Object(self.native_chunk(&w, false)))
        }
    }

    /// Mid-stream failure: Ollama sends `{"error":...}` and ends without
    /// `done`. Through `/v1` that line decodes as an empty chunk and the
    /// stream ends without `[DONE]`.
    fn error_frame(&mut self) -> Bytes {
        if self.flavor.openai() {
            let mut empty = self.oa_chunk(&Whole::default(), None);
            empty["model"] = "".into();
            sse(&empty)
        } else {
            line(&json!({ "error": util::FAKE_FAILURE }))
        }
    }

    fn final_frames(&mut self) {
        if self.flavor.openai() {
            let reason = self.finish_reason(self.called);
            let finish = self.oa_chunk(&Whole::default(), Some(reason));
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
            let mut m = self.native_chunk(&Whole::default(), true);
            self.metrics(&mut m);
            self.pending.push_back(line(&Value::Object(m)));
        }
    }

    /// The single JSON object of a non-streamed answer.
    pub fn full_object(&self, w: &Whole) -> Value {
        match self.flavor {
            Flavor::Generate | Flavor::Chat => {
                let mut m = self.native_chunk(w, true);
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
                    "message": self.oa_message(w, true),
                    "finish_reason": self.finish_reason(!w.calls.is_empty()),
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
                    "text": w.text,
                    "index": 0,
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
///
/// With [`crate::ModelConfig::ignore_disconnect_non_streaming`], a
/// non-streamed generation runs in a task of its own, which a client that
/// goes away does not stop (llama-server's habit): it holds its slot to the
/// end, logged as `Orphaned` meanwhile. Streamed ones stop at once either way.
pub(crate) async fn respond(g: Gen, stream: bool) -> Response<Body> {
    let openai = g.flavor.openai();
    if stream || !g.tracker.state().cfg.ignore_disconnect_non_streaming {
        return answer(g, stream).await;
    }
    let orphaning = g.tracker.orphaning();
    let r = tokio::spawn(answer(g, false)).await;
    orphaning.attended();
    match r {
        Ok(r) => r,
        Err(_) if openai => {
            util::openai_error(StatusCode::INTERNAL_SERVER_ERROR, util::FAKE_FAILURE)
        }
        Err(_) => util::ollama_error(StatusCode::INTERNAL_SERVER_ERROR, util::FAKE_FAILURE),
    }
}

async fn answer(g: Gen, stream: bool) -> Response<Body> {
    let openai = g.flavor.openai();
    match g.run(stream).await {
        Outcome::Stream(g) => g.into_response(),
        Outcome::Text(g, whole) if openai => {
            util::oa_json_response(StatusCode::OK, &g.full_object(&whole))
        }
        Outcome::Text(g, whole) => util::json_response(StatusCode::OK, &g.full_object(&whole)),
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
