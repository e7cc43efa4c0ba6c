//! Running a validated request: submit one sequence per choice, then collect the answers into one
//! response or stream them as server-sent events.
//!
//! [`Choices`] owns every [`Submission`] of a request. Whatever ends the request early — the
//! client disconnecting (hyper or the HTTP/3 bridge drops the response body), an error in one
//! choice, the handler future being cancelled — drops it, and dropping an unfinished submission
//! aborts its sequence and frees its KV blocks at once. No task is spawned per request, so there
//! is nothing that could outlive the client.
//!
//! The streaming body ([`SseBody`]) is a hand-written `http_body::Body` that polls the choices'
//! channels directly: one `data: {...}` event per generated token (so a client can time every
//! token), the held-back text and `finish_reason` in a last event per choice, an optional usage
//! event, then `data: [DONE]`. The text of a choice is the concatenation of its token texts and
//! its final text, in both modes, so a stream and a non-stream answer to the same request are the
//! same bytes.
//!
//! A shutdown whose grace runs out ends what still runs through [`StreamCut`]: a stream gets an
//! error event (`shutting_down`), `[DONE]` and a clean end of body; a non-streamed request a 503.
//!
//! Logprobs are the engine's f32 values written as the f64 of exactly the same value, so a client
//! that parses them as doubles and rounds to f32 gets the engine's bits back.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Frame;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::api::error::ApiError;
use crate::api::request::ValidGeneration;
use crate::engine::{fresh_seed, EngineEvent, GenerateRequest, RequestError, SeqOutput};
use crate::scheduler::FinishReason;
use crate::service::{Service, Submission};

/// Which API shapes the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`; `logprobs` as validated (`Some(0)` or `Some(1)`).
    Completion { logprobs: Option<u32> },
    /// `/v1/chat/completions`.
    Chat { logprobs: bool },
}

/// The request's submissions, one per choice (index = choice index).
pub struct Choices {
    subs: Vec<Option<Submission>>,
    /// Where the next poll starts, so that one busy choice cannot starve the others.
    next: usize,
}

impl Choices {
    /// Submits every choice; if one is refused, the ones already submitted are aborted (dropped).
    pub fn submit(service: &Service, requests: Vec<GenerateRequest>) -> Result<Self, ApiError> {
        let mut subs = Vec::with_capacity(requests.len());
        for r in requests {
            subs.push(Some(service.submit(r)?));
        }
        // The HTTP request's span (see `api::trace_requests`) learns which engine requests it is.
        let span = tracing::Span::current();
        if !span.is_disabled() {
            let ids: Vec<String> = subs.iter().flatten().map(|s| s.id.to_string()).collect();
            span.record("sequences", ids.join(","));
        }
        Ok(Choices { subs, next: 0 })
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// The next update of any choice; `None` once every choice has ended.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, EngineEvent)>> {
        let n = self.subs.len();
        let mut live = false;
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(sub) = self.subs[i].as_mut() else { continue };
            live = true;
            match sub.events.poll_recv(cx) {
                Poll::Ready(Some(u)) => {
                    if u.is_last() {
                        sub.disarm();
                        self.subs[i] = None;
                    }
                    self.next = (i + 1) % n;
                    return Poll::Ready(Some((i, u)));
                }
                Poll::Ready(None) => {
                    // The engine thread dropped the channel without a last word.
                    let Some(mut s) = self.subs[i].take() else { continue };
                    s.disarm();
                    let u = EngineEvent::Rejected { id: s.id, error: RequestError::EngineStopped };
                    return Poll::Ready(Some((i, u)));
                }
                Poll::Pending => {}
            }
        }
        if live {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    pub async fn next(&mut self) -> Option<(usize, EngineEvent)> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// What every response and chunk of one request carries.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub seed: u64,
    pub endpoint: Endpoint,
    /// Greedy decoding: the chosen token is the most likely one, so a top-1 list is exact.
    pub greedy: bool,
    pub prompt_tokens: usize,
    pub include_usage: bool,
}

impl Meta {
    pub fn new(endpoint: Endpoint, gen: &ValidGeneration, system_fingerprint: &str) -> Self {
        static BOOT: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let boot = *BOOT.get_or_init(|| fresh_seed() & 0xffff_ffff);
        let prefix = match endpoint {
            Endpoint::Completion { .. } => "cmpl",
            Endpoint::Chat { .. } => "chatcmpl",
        };
        Meta {
            id: format!("{prefix}-{boot:08x}{:08x}", COUNTER.fetch_add(1, Ordering::Relaxed)),
            created: unix_now(),
            model: gen.model.clone(),
            system_fingerprint: system_fingerprint.to_string(),
            seed: gen.seed,
            endpoint,
            greedy: gen.requests.first().is_some_and(|r| r.sampling.effective().temperature == 0.0),
            prompt_tokens: gen.prompt_tokens.iter().sum(),
            include_usage: gen.include_usage,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completion { .. }, _) => "text_completion",
            (Endpoint::Chat { .. }, false) => "chat.completion",
            (Endpoint::Chat { .. }, true) => "chat.completion.chunk",
        }
    }

    /// The envelope around `choices`.
    fn envelope(&self, chunk: bool, choices: Vec<Value>, with_seed: bool) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), self.object(chunk).into());
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m.insert("system_fingerprint".into(), self.system_fingerprint.clone().into());
        if with_seed {
            m.insert("seed".into(), self.seed.into());
        }
        m.insert("choices".into(), choices.into());
        m
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    /// Logprobs of the tokens `pieces` (their texts) in the endpoint's shape; `offset` is the
    /// completion text's length in characters before the first of them.
    fn logprobs(&self, pieces: &[String], logprobs: &[f32], mut offset: usize) -> Value {
        match self.endpoint {
            Endpoint::Completion { logprobs: Some(k) } => {
                let mut offsets = Vec::with_capacity(pieces.len());
                for p in pieces {
                    offsets.push(offset);
                    offset += p.chars().count();
                }
                let top = if k >= 1 && self.greedy {
                    pieces.iter().zip(logprobs).map(|(p, lp)| json!({ p.as_str(): exact(*lp) })).collect()
                } else {
                    Value::Null
                };
                json!({
                    "tokens": pieces,
                    "token_logprobs": logprobs.iter().map(|l| exact(*l)).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
            Endpoint::Chat { logprobs: true } => {
                let content: Vec<Value> = pieces
                    .iter()
                    .zip(logprobs)
                    .map(
                        |(p, lp)| json!({"token": p, "logprob": exact(*lp), "bytes": p.as_bytes(), "top_logprobs": []}),
                    )
                    .collect();
                json!({ "content": content, "refusal": null })
            }
            _ => Value::Null,
        }
    }

    /// One choice of a chunk or a response.
    fn choice(
        &self,
        chunk: bool,
        index: usize,
        text: &str,
        logprobs: Value,
        finish: Option<&str>,
        ids: &[u32],
    ) -> Value {
        let mut c = serde_json::Map::new();
        c.insert("index".into(), index.into());
        match (self.endpoint, chunk) {
            (Endpoint::Completion { .. }, _) => {
                c.insert("text".into(), text.into());
            }
            (Endpoint::Chat { .. }, false) => {
                c.insert("message".into(), json!({"role": "assistant", "content": text}));
            }
            (Endpoint::Chat { .. }, true) => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({ "content": text }) };
                c.insert("delta".into(), delta);
            }
        }
        c.insert("logprobs".into(), logprobs);
        c.insert("finish_reason".into(), finish.map_or(Value::Null, Value::from));
        // Extension: the generated token ids, so any answer can be compared id for id.
        c.insert("token_ids".into(), ids.into());
        Value::Object(c)
    }
}

/// An f32 as the JSON number of exactly its value (non-finite values become `null`).
fn exact(x: f32) -> Value {
    serde_json::Number::from_f64(x as f64).map_or(Value::Null, Value::Number)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The OpenAI `finish_reason` of an ended sequence, or the failure.
fn finish_reason(r: &FinishReason) -> Result<&'static str, String> {
    match r {
        FinishReason::Length => Ok("length"),
        FinishReason::Eos | FinishReason::Stop => Ok("stop"),
        FinishReason::Abort => Ok("abort"),
        FinishReason::Error(m) => Err(m.clone()),
    }
}

/// The error of a choice that was refused or failed.
fn choice_error(u: EngineEvent) -> Option<ApiError> {
    match u {
        EngineEvent::Rejected { error, .. } => Some(ApiError::Rejected(error)),
        EngineEvent::Finished { reason: FinishReason::Error(m), .. } => Some(ApiError::Engine(m)),
        _ => None,
    }
}

/// Resolves once a shutdown's grace has run out: what still runs then ends with
/// [`ApiError::ShuttingDown`] — a stream with an error event and `[DONE]`, so the client sees a
/// clean end rather than a cut connection.
pub struct StreamCut(Pin<Box<dyn Future<Output = ()> + Send>>);

impl StreamCut {
    /// Watches `rx` (the server's [`crate::state::AppState::cut_streams`]).
    pub fn new(mut rx: watch::Receiver<bool>) -> Self {
        StreamCut(Box::pin(async move {
            // A server dropped without a shutdown cuts nothing: its connections go with it.
            if rx.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        }))
    }

    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// Runs every choice to its end and renders the whole response.
pub async fn collect(mut choices: Choices, meta: &Meta, mut cut: StreamCut) -> Result<Response, ApiError> {
    let mut outs = vec![SeqOutput::default(); choices.len()];
    loop {
        let next = std::future::poll_fn(|cx| match cut.poll_cut(cx) {
            Poll::Ready(()) => Poll::Ready(Err(ApiError::ShuttingDown)),
            Poll::Pending => choices.poll_next(cx).map(Ok),
        });
        let Some((i, u)) = next.await? else { break };
        if let Some(e) = choice_error(u.clone()) {
            return Err(e);
        }
        outs[i].push(&u);
    }
    let completion_tokens = outs.iter().map(|o| o.token_ids.len()).sum();
    let rendered = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let lp = meta.logprobs(&o.pieces, &o.logprobs, 0);
            let finish = o.finish_reason.as_ref().and_then(|r| finish_reason(r).ok());
            meta.choice(false, i, &o.text, lp, finish, &o.token_ids)
        })
        .collect();
    let mut body = meta.envelope(false, rendered, true);
    body.insert("usage".into(), meta.usage(completion_tokens));
    Ok(axum::Json(Value::Object(body)).into_response())
}

/// A streamed answer: server-sent events, ending with `data: [DONE]`.
pub struct SseBody {
    choices: Option<Choices>,
    cut: StreamCut,
    meta: Meta,
    queue: VecDeque<Bytes>,
    /// Characters streamed so far per choice (for completions' `text_offset`).
    offsets: Vec<usize>,
    completion_tokens: usize,
    seed_sent: bool,
    done: bool,
}

impl SseBody {
    pub fn new(choices: Choices, meta: Meta, cut: StreamCut) -> Self {
        let n = choices.len();
        let mut body = SseBody {
            choices: Some(choices),
            cut,
            meta,
            queue: VecDeque::new(),
            offsets: vec![0; n],
            completion_tokens: 0,
            seed_sent: false,
            done: false,
        };
        if let Endpoint::Chat { .. } = body.meta.endpoint {
            // Chat streams open every choice with the assistant role, as OpenAI's do.
            for i in 0..n {
                let mut c = body.meta.choice(true, i, "", Value::Null, None, &[]);
                c["delta"] = json!({"role": "assistant", "content": ""});
                body.push_chunk(vec![c]);
            }
        }
        body
    }

    pub fn into_response(self) -> Response {
        let mut resp = axum::body::Body::new(self).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    fn push_event(&mut self, json: &Value) {
        self.queue.push_back(Bytes::from(format!("data: {json}\n\n")));
    }

    fn push_chunk(&mut self, choices: Vec<Value>) {
        let with_seed = !self.seed_sent;
        self.seed_sent = true;
        let env = Value::Object(self.meta.envelope(true, choices, with_seed));
        self.push_event(&env);
    }

    fn on_update(&mut self, i: usize, u: EngineEvent) {
        match u {
            EngineEvent::Token { token_id, logprob, text, .. } => {
                self.completion_tokens += 1;
                let pieces = [text];
                let lp = self.meta.logprobs(&pieces, &[logprob], self.offsets[i]);
                self.offsets[i] += pieces[0].chars().count();
                let c = self.meta.choice(true, i, &pieces[0], lp, None, &[token_id]);
                self.push_chunk(vec![c]);
            }
            EngineEvent::Finished { reason: FinishReason::Error(m), .. } => self.fail(ApiError::Engine(m)),
            EngineEvent::Finished { reason, text, .. } => {
                let finish = finish_reason(&reason).unwrap_or("stop");
                let c = self.meta.choice(true, i, &text, Value::Null, Some(finish), &[]);
                self.push_chunk(vec![c]);
            }
            EngineEvent::Rejected { error, .. } => self.fail(ApiError::Rejected(error)),
        }
    }

    /// Ends the stream with an error event: the other choices are aborted (dropped).
    fn fail(&mut self, e: ApiError) {
        self.choices = None;
        self.push_event(&e.body());
        self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }

    fn finish(&mut self) {
        self.choices = None;
        if self.meta.include_usage {
            let mut env = self.meta.envelope(true, Vec::new(), !self.seed_sent);
            env.insert("usage".into(), self.meta.usage(self.completion_tokens));
            self.push_event(&Value::Object(env));
        }
        self.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.cut.poll_cut(cx).is_ready() {
                this.fail(ApiError::ShuttingDown);
                continue;
            }
            let Some(choices) = this.choices.as_mut() else { return Poll::Ready(None) };
            match choices.poll_next(cx) {
                Poll::Ready(Some((i, u))) => this.on_update(i, u),
                Poll::Ready(None) => this.finish(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queue.is_empty()
    }
}
