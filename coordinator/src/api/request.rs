//! Validation, once: a JSON body becomes a [`ValidCompletion`] or a [`ValidChat`] here and nowhere
//! else.
//!
//! The body is parsed to a `serde_json::Value` first and each field is then read by name, so a
//! wrong type names the parameter at fault (`param` of the OpenAI error object) instead of a serde
//! position. Parameters are handled in three ways:
//!
//! * supported ones are type- and range-checked and resolved (defaults filled in, `max_tokens`
//!   capped to the context left after the prompt, the seed drawn when absent);
//! * parameters lockstep does not implement are accepted only at their neutral value (a zero
//!   `presence_penalty`, an empty `logit_bias`, `response_format: {"type": "text"}`, …) and
//!   refused with `unsupported_parameter` otherwise, never silently ignored: an answer that looks
//!   right but ignored part of the request is worse than an error;
//! * unknown parameters are refused the same way, except a few that carry no semantics
//!   (`user`, `metadata`, `store`, `service_tier`).
//!
//! Cheap checks come first: every scalar parameter is read before any prompt is looked at, and a
//! prompt string with more bytes than the context could hold even at the tokenizer's longest
//! token ([`Validation::max_prompt_bytes`]) is refused (`context_length_exceeded`) before it is
//! tokenized — tokenizing megabytes only to refuse them is the expensive path an attacker wants.
//!
//! Sampling parameters are checked as the `f32` the engine will use, so what validation accepts
//! the engine accepts too; `top_k` above [`MAX_CANDIDATES`] is refused, never clamped; and a
//! temperature below [`lockstep_kernels::sampling::GREEDY_BELOW`] samples greedily (the numerics
//! contract's rule, applied by the kernels).
//!
//! The result holds one fully resolved [`GenerateRequest`] per choice, so running a request is a
//! loop over them.
//!
//! ## Seeds of several choices
//!
//! With `n > 1`, the choices of one prompt must be different samples, yet each must be replayable.
//! Choice `i` samples with `seed_i = seed` for `i = 0` and `seed_i = splitmix64(seed ^ i) >> 11`
//! for `i > 0` ([`choice_seed`]): choice 0 is what the same request with `n = 1` returns, and every
//! derived seed stays below 2^53 like a drawn one, so `seed_i` can itself be sent as `seed` to
//! replay choice `i` alone. The request's `seed` (given or drawn) is returned in the response.

use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::engine::{fresh_seed, GenerateRequest, ModelInfo};
use crate::tokenizer::ChatMessage;
use lockstep_kernels::sampling::MAX_CANDIDATES;
use lockstep_kernels::splitmix::SplitMix64;
use lockstep_kernels::SamplingParams;

/// Most choices (`n`) per prompt.
pub const MAX_N: u64 = 16;
/// Most choices per request, over all prompts of a batched completions request.
pub const MAX_CHOICES: usize = 64;
/// Most stop strings / stop token ids.
pub const MAX_STOP: usize = 16;
/// `max_tokens` of a completions request that gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u64 = 16;

/// What validation needs beyond the model: derived once per server (see [`Validation::new`]).
#[derive(Debug, Clone, Copy)]
pub struct Validation {
    /// Most bytes a prompt string may have: the context at the tokenizer's longest token. A
    /// longer prompt cannot fit, whatever it tokenizes to.
    pub max_prompt_bytes: usize,
}

impl Validation {
    pub fn new(info: &ModelInfo) -> Self {
        Validation { max_prompt_bytes: info.max_context.saturating_mul(longest_token_bytes(&info.tokenizer).max(1)) }
    }

    /// Refuses `bytes` of prompt text that no tokenization could fit into the context.
    fn check_prompt_bytes(&self, param: &'static str, bytes: usize, info: &ModelInfo) -> Result<(), ApiError> {
        if bytes > self.max_prompt_bytes {
            return Err(ApiError::PromptTooLong {
                param,
                bytes,
                max_bytes: self.max_prompt_bytes,
                max_context: info.max_context,
            });
        }
        Ok(())
    }
}

/// The longest token's text in bytes, over the whole vocabulary (added tokens included). Token
/// strings are the vocabulary's own spelling (`▁` for a space, byte-level marks), never shorter
/// than the input bytes they stand for, so the bound is conservative.
pub fn longest_token_bytes(tokenizer: &crate::tokenizer::Tokenizer) -> usize {
    (0..tokenizer.vocab_size() as u32).filter_map(|id| tokenizer.id_to_token(id)).map(|t| t.len()).max().unwrap_or(1)
}

/// Parameters that change nothing about the answer and are accepted and ignored.
const IGNORED: &[&str] = &["user", "metadata", "store", "service_tier"];

/// Everything a generation request resolves to, shared by both endpoints.
#[derive(Debug, Clone)]
pub struct ValidGeneration {
    /// The served model name (what the client asked for).
    pub model: String,
    /// Prompt length of each prompt.
    pub prompt_tokens: Vec<usize>,
    /// Choices per prompt.
    pub n: usize,
    /// One request per choice, prompt-major: choice index `p * n + i` is prompt `p`, sample `i`.
    pub requests: Vec<GenerateRequest>,
    /// The request's seed: the client's, or the one drawn for it.
    pub seed: u64,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
}

/// A validated `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct ValidCompletion {
    pub gen: ValidGeneration,
    /// `logprobs`: `None`, `Some(0)` (chosen tokens' logprobs) or `Some(1)` (also the top-1 list,
    /// which only greedy decoding can report exactly).
    pub logprobs: Option<u32>,
}

/// A validated `/v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub gen: ValidGeneration,
    pub logprobs: bool,
}

/// What `/tokenize` is asked to encode.
#[derive(Debug, Clone)]
pub enum TokenizeInput {
    Prompt { text: String, add_special_tokens: bool },
    Messages { messages: Vec<ChatMessage>, add_generation_prompt: bool },
}

/// The seed of choice `index` of a request whose seed is `seed` (see the module docs).
pub fn choice_seed(seed: u64, index: u64) -> u64 {
    if index == 0 {
        seed
    } else {
        SplitMix64::mix(seed ^ index) >> 11
    }
}

/// The request body as an object, with typed accessors that name the parameter on failure.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Prefix of parameter names in errors (e.g. `messages[2].`).
    prefix: String,
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Fields { map, prefix: String::new() }),
            _ => Err(ApiError::InvalidJson("the request body must be a JSON object".into())),
        }
    }

    fn nested(map: &'a Map<String, Value>, prefix: String) -> Self {
        Fields { map, prefix }
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    /// The field, with an explicit `null` read as absent (OpenAI clients send `null` for unset).
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub fn bool(&self, field: &str) -> Result<Option<bool>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid_type(self.name(field), "a boolean")),
        }
    }

    pub fn number(&self, field: &str) -> Result<Option<f64>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err(ApiError::invalid_type(self.name(field), "a number")),
        }
    }

    /// An integer of any sign; range checks are the caller's (with its own message).
    pub fn int(&self, field: &str) -> Result<Option<i128>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => int_value(v).map(Some).ok_or_else(|| ApiError::invalid_type(self.name(field), "an integer")),
        }
    }

    pub fn str(&self, field: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid_type(self.name(field), "a string")),
        }
    }

    /// Refuses any field not in `known` (or [`IGNORED`]) that is not `null`.
    fn reject_unknown(&self, known: &[&str]) -> Result<(), ApiError> {
        for (k, v) in self.map {
            if v.is_null() || known.contains(&k.as_str()) || (self.prefix.is_empty() && IGNORED.contains(&k.as_str())) {
                continue;
            }
            return Err(ApiError::unsupported(self.name(k), "unknown parameter"));
        }
        Ok(())
    }

    /// Refuses a number parameter unless it is absent or equal to `neutral`.
    fn neutral_number(&self, field: &str, neutral: f64, why: &str) -> Result<(), ApiError> {
        match self.number(field)? {
            Some(x) if x != neutral => Err(ApiError::unsupported(self.name(field), why)),
            _ => Ok(()),
        }
    }

    /// Refuses a parameter unless it is absent, `null`, `false`, or an empty string, list or object.
    fn neutral_empty(&self, field: &str, why: &str) -> Result<(), ApiError> {
        let empty = match self.get(field) {
            None | Some(Value::Bool(false)) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        if empty {
            Ok(())
        } else {
            Err(ApiError::unsupported(self.name(field), why))
        }
    }
}

fn int_value(v: &Value) -> Option<i128> {
    match v {
        Value::Number(n) => n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)),
        _ => None,
    }
}

/// Parameters both endpoints share, read but not yet resolved against a prompt.
struct Common {
    model: String,
    n: u64,
    max_tokens: Option<u64>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    skip_special_tokens: bool,
    stream: bool,
    include_usage: bool,
}

/// Fields handled by [`read_common`] (with the neutral-only ones).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "stream",
    "stream_options",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "best_of",
];

fn read_common(f: &Fields<'_>, info: &ModelInfo, max_tokens_field: &'static str) -> Result<Common, ApiError> {
    let model = match f.str("model")? {
        None => info.name.clone(),
        Some(m) if m == info.name => m.to_string(),
        Some(m) => return Err(ApiError::ModelNotFound { model: m.to_string(), served: info.name.clone() }),
    };

    let n = match f.int("n")? {
        None => 1,
        Some(n) if n < 1 => return Err(ApiError::invalid_value("n", format!("must be at least 1, got {n}"))),
        Some(n) if n > MAX_N as i128 => {
            return Err(ApiError::unsupported("n", format!("at most {MAX_N} choices per request, got {n}")))
        }
        Some(n) => n as u64,
    };
    match f.int("best_of")? {
        None => {}
        Some(b) if b == n as i128 || b == 1 && n == 1 => {}
        Some(_) => {
            return Err(ApiError::unsupported("best_of", "best_of other than n is not supported; use n"));
        }
    }

    let max_tokens = match f.int(max_tokens_field)? {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_value(max_tokens_field, format!("must be at least 1, got {m}")));
        }
        // Anything larger than the context is capped to the context later.
        Some(m) => Some(u64::try_from(m).unwrap_or(u64::MAX)),
    };

    // OpenAI's default temperature is 1.
    // OpenAI's default temperature is 1. Every tiny positive value is fine: the kernels sample
    // below `GREEDY_BELOW` greedily (a value under f32's range reads as 0, greedy too).
    let temperature = match f.number("temperature")? {
        None => 1.0,
        Some(t) if (0.0..=2.0).contains(&t) => t,
        Some(t) => return Err(ApiError::invalid_value("temperature", format!("must be between 0 and 2, got {t}"))),
    };
    // Checked as the f32 the sampler uses: 1e-50 is a positive f64 but an f32 zero.
    let top_p = match f.number("top_p")? {
        None => 1.0,
        Some(p) if p as f32 > 0.0 && p <= 1.0 => p,
        Some(p) => {
            return Err(ApiError::invalid_value("top_p", format!("must be greater than 0 and at most 1, got {p}")))
        }
    };
    let top_k = match f.int("top_k")? {
        // -1 means "off" in vLLM's API; 0 means "off" in lockstep's.
        None | Some(-1) | Some(0) => 0,
        Some(k) if k < 0 => {
            return Err(ApiError::invalid_value("top_k", format!("must be -1, 0 or positive, got {k}")))
        }
        Some(k) if k > MAX_CANDIDATES as i128 => {
            return Err(ApiError::unsupported(
                "top_k",
                format!("at most {MAX_CANDIDATES} (the sampler's candidate set), got {k}; use -1 for no top-k"),
            ))
        }
        Some(k) => k as u32,
    };
    let seed = match f.int("seed")? {
        None => fresh_seed(),
        Some(s) if (0..=u64::MAX as i128).contains(&s) => s as u64,
        Some(s) => return Err(ApiError::invalid_value("seed", format!("must be a non-negative integer, got {s}"))),
    };

    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, v) in items.iter().enumerate() {
                match v {
                    Value::String(s) => out.push(s.clone()),
                    _ => return Err(ApiError::invalid_type(format!("stop[{i}]"), "a string")),
                }
            }
            out
        }
        Some(_) => return Err(ApiError::invalid_type("stop", "a string or a list of strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid_value("stop", format!("at most {MAX_STOP} stop strings, got {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_value("stop", "stop strings must not be empty"));
    }

    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(v) => token_list(v, "stop_token_ids", info.config.vocab_size)?,
    };
    if stop_token_ids.len() > MAX_STOP {
        return Err(ApiError::invalid_value("stop_token_ids", format!("at most {MAX_STOP} ids")));
    }

    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid_value("stream_options", "only allowed when 'stream' is true"));
            }
            let so = Fields::nested(o, "stream_options.".into());
            so.reject_unknown(&["include_usage", "continuous_usage_stats"])?;
            so.neutral_empty("continuous_usage_stats", "per-chunk usage is not supported")?;
            so.bool("include_usage")?.unwrap_or(false)
        }
        Some(_) => return Err(ApiError::invalid_type("stream_options", "an object")),
    };

    f.neutral_number("frequency_penalty", 0.0, "penalties are not supported")?;
    f.neutral_number("presence_penalty", 0.0, "penalties are not supported")?;
    f.neutral_number("repetition_penalty", 1.0, "penalties are not supported")?;
    f.neutral_number("min_p", 0.0, "min_p sampling is not supported")?;
    f.neutral_empty("logit_bias", "logit_bias is not supported")?;

    Ok(Common {
        model,
        n,
        max_tokens,
        sampling: SamplingParams { temperature: temperature as f32, top_k, top_p: top_p as f32, seed },
        stop,
        stop_token_ids,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        skip_special_tokens: f.bool("skip_special_tokens")?.unwrap_or(true),
        stream,
        include_usage,
    })
}

/// A list of token ids below `vocab`.
fn token_list(v: &Value, param: &str, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let Value::Array(items) = v else { return Err(ApiError::invalid_type(param, "a list of token ids")) };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| match int_value(t) {
            Some(id) if id >= 0 && id < vocab as i128 => Ok(id as u32),
            Some(id) => {
                Err(ApiError::invalid_value(format!("{param}[{i}]"), format!("token id {id} is outside 0..{vocab}")))
            }
            None => Err(ApiError::invalid_type(format!("{param}[{i}]"), "a token id (integer)")),
        })
        .collect()
}

/// Resolves the shared parameters against the prompts: one [`GenerateRequest`] per choice.
fn resolve(
    c: Common,
    prompts: Vec<Vec<u32>>,
    prompt_param: &'static str,
    default_max_tokens: Option<u64>,
    max_tokens_param: &'static str,
    info: &ModelInfo,
) -> Result<ValidGeneration, ApiError> {
    let choices = prompts.len() * c.n as usize;
    if choices > MAX_CHOICES {
        return Err(ApiError::unsupported(
            prompt_param,
            format!("at most {MAX_CHOICES} choices per request (prompts × n), got {choices}"),
        ));
    }
    let block = info.block_size.max(1);
    let mut requests = Vec::with_capacity(choices);
    let mut prompt_tokens = Vec::with_capacity(prompts.len());
    for ids in prompts {
        if ids.is_empty() {
            return Err(ApiError::invalid_value(prompt_param, "the prompt is empty"));
        }
        if ids.len() >= info.max_context {
            return Err(ApiError::ContextLength {
                param: prompt_param,
                prompt_tokens: ids.len(),
                max_context: info.max_context,
            });
        }
        let remaining = (info.max_context - ids.len()) as u64;
        // The scheduler admits a sequence only if its longest possible length fits the whole KV
        // cache (the last token needs no slot). A default max_tokens shrinks to fit; an explicit
        // one that cannot fit is the client's to lower.
        let fit = (info.num_blocks * block + 1).saturating_sub(ids.len()) as u64;
        let max_tokens = match c.max_tokens {
            Some(m) => m.min(remaining),
            None => default_max_tokens.unwrap_or(u64::MAX).min(remaining).min(fit.max(1)),
        };
        let needed_slots = ids.len() + max_tokens as usize - 1;
        let needed_blocks = needed_slots.div_ceil(block);
        if needed_blocks > info.num_blocks {
            return Err(ApiError::KvCacheTooSmall {
                param: max_tokens_param,
                needed_slots,
                needed_blocks,
                num_blocks: info.num_blocks,
            });
        }
        prompt_tokens.push(ids.len());
        for i in 0..c.n {
            requests.push(GenerateRequest {
                prompt_ids: ids.clone(),
                sampling: SamplingParams { seed: choice_seed(c.sampling.seed, i), ..c.sampling },
                max_tokens: max_tokens.min(u32::MAX as u64) as u32,
                stop: c.stop.clone(),
                stop_token_ids: c.stop_token_ids.clone(),
                ignore_eos: c.ignore_eos,
                skip_special_tokens: c.skip_special_tokens,
            });
        }
    }
    Ok(ValidGeneration {
        model: c.model,
        prompt_tokens,
        n: c.n as usize,
        requests,
        seed: c.sampling.seed,
        stream: c.stream,
        include_usage: c.include_usage,
    })
}

impl ValidCompletion {
    pub fn parse(body: &Value, info: &ModelInfo, limits: &Validation) -> Result<Self, ApiError> {
        let f = Fields::new(body)?;
        let mut known = COMMON_FIELDS.to_vec();
        known.extend(["prompt", "echo", "suffix"]);
        f.reject_unknown(&known)?;
        let common = read_common(&f, info, "max_tokens")?;
        f.neutral_empty("echo", "echo is not supported")?;
        f.neutral_empty("suffix", "suffix (insertion) is not supported")?;
        let logprobs = match f.get("logprobs") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(0),
            Some(v) => match int_value(v) {
                Some(k @ 0..=1) => Some(k as u32),
                Some(k @ 2..=5) => {
                    return Err(ApiError::unsupported(
                        "logprobs",
                        format!(
                            "logprobs={k} asks for the top {k} alternatives; lockstep reports only the chosen \
                             token's logprob (use 0 or 1)"
                        ),
                    ))
                }
                Some(k) => {
                    return Err(ApiError::invalid_value("logprobs", format!("must be between 0 and 5, got {k}")))
                }
                None => return Err(ApiError::invalid_type("logprobs", "an integer")),
            },
        };
        let prompts = match f.get("prompt") {
            None => return Err(ApiError::Missing { param: "prompt".into() }),
            Some(p) => completion_prompts(p, info, limits)?,
        };
        let gen = resolve(common, prompts, "prompt", Some(DEFAULT_COMPLETION_MAX_TOKENS), "max_tokens", info)?;
        Ok(ValidCompletion { gen, logprobs })
    }
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids.
fn completion_prompts(p: &Value, info: &ModelInfo, limits: &Validation) -> Result<Vec<Vec<u32>>, ApiError> {
    // Every string's length is checked before any of them is tokenized.
    if let Value::Array(items) = p {
        for s in items.iter().filter_map(Value::as_str) {
            limits.check_prompt_bytes("prompt", s.len(), info)?;
        }
    }
    let encode = |text: &str| {
        limits.check_prompt_bytes("prompt", text.len(), info)?;
        info.tokenizer.encode(text, true).map_err(|source| ApiError::Tokenizer { param: "prompt", source })
    };
    let vocab = info.config.vocab_size;
    match p {
        Value::String(s) => Ok(vec![encode(s)?]),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid_value("prompt", "the prompt list is empty")),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => encode(s),
                    _ => Err(ApiError::invalid_type(format!("prompt[{i}]"), "a string like the first item")),
                })
                .collect(),
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(_) => token_list(v, &format!("prompt[{i}]"), vocab),
                    _ => Err(ApiError::invalid_type(format!("prompt[{i}]"), "a list of token ids like the first item")),
                })
                .collect(),
            _ => Ok(vec![token_list(p, "prompt", vocab)?]),
        },
        _ => Err(ApiError::invalid_type("prompt", "a string, a list of strings, or a list of token ids")),
    }
}

impl ValidChat {
    pub fn parse(body: &Value, info: &ModelInfo, limits: &Validation) -> Result<Self, ApiError> {
        let f = Fields::new(body)?;
        let mut known = COMMON_FIELDS.to_vec();
        known.extend([
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "response_format",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "parallel_tool_calls",
            "modalities",
            "add_generation_prompt",
        ]);
        f.reject_unknown(&known)?;
        // max_completion_tokens replaces the deprecated max_tokens; either works, the new one wins.
        let max_field = if f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
        let common = read_common(&f, info, max_field)?;
        let logprobs = f.bool("logprobs")?.unwrap_or(false);
        match f.int("top_logprobs")? {
            None | Some(0) => {}
            Some(k) if (1..=20).contains(&k) => {
                return Err(ApiError::unsupported(
                    "top_logprobs",
                    "lockstep reports only the chosen token's logprob; top_logprobs > 0 is not supported",
                ))
            }
            Some(k) => {
                return Err(ApiError::invalid_value("top_logprobs", format!("must be between 0 and 20, got {k}")))
            }
        }
        f.neutral_empty("tools", "tool calling is not supported")?;
        f.neutral_empty("functions", "function calling is not supported")?;
        match f.get("tool_choice").or(f.get("function_call")) {
            None => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => return Err(ApiError::unsupported("tool_choice", "tool calling is not supported")),
        }
        match f.get("response_format") {
            None => {}
            Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("text") => {}
            Some(_) => {
                return Err(ApiError::unsupported("response_format", "only {\"type\": \"text\"} is supported"));
            }
        }
        match f.get("modalities") {
            None => {}
            Some(Value::Array(m)) if m.iter().all(|x| x.as_str() == Some("text")) => {}
            Some(_) => return Err(ApiError::unsupported("modalities", "only text output is supported")),
        }
        let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
        let messages = match f.get("messages") {
            None => return Err(ApiError::Missing { param: "messages".into() }),
            Some(v) => chat_messages(v)?,
        };
        limits.check_prompt_bytes("messages", messages.iter().map(|m| m.content.len()).sum(), info)?;
        let ids = info
            .tokenizer
            .encode_chat(&messages, add_generation_prompt)
            .map_err(|source| ApiError::Tokenizer { param: "messages", source })?;
        // Chat has no output limit by default: everything the context has left.
        let gen = resolve(common, vec![ids], "messages", None, max_field, info)?;
        Ok(ValidChat { gen, logprobs })
    }
}

/// `messages`: a non-empty list of `{role, content}`; content is a string, a list of text parts,
/// or null.
pub fn chat_messages(v: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = v else { return Err(ApiError::invalid_type("messages", "a list of messages")) };
    if items.is_empty() {
        return Err(ApiError::invalid_value("messages", "at least one message is needed"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let Value::Object(obj) = m else {
            return Err(ApiError::invalid_type(format!("messages[{i}]"), "an object with 'role' and 'content'"));
        };
        let f = Fields::nested(obj, format!("messages[{i}]."));
        f.reject_unknown(&["role", "content", "name", "refusal", "annotations"])?;
        let role = f.str("role")?.ok_or_else(|| ApiError::Missing { param: format!("messages[{i}].role") })?;
        let content = match f.get("content") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let param = format!("messages[{i}].content[{j}]");
                    let Value::Object(p) = part else { return Err(ApiError::invalid_type(param, "a content part")) };
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some("text"), _) => return Err(ApiError::invalid_type(format!("{param}.text"), "a string")),
                        _ => return Err(ApiError::unsupported(param, "only text content parts are supported")),
                    }
                }
                text
            }
            Some(_) => {
                return Err(ApiError::invalid_type(format!("messages[{i}].content"), "a string or a list of parts"))
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

impl TokenizeInput {
    pub fn parse(body: &Value, info: &ModelInfo) -> Result<Self, ApiError> {
        let f = Fields::new(body)?;
        f.reject_unknown(&["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"])?;
        if let Some(m) = f.str("model")? {
            if m != info.name {
                return Err(ApiError::ModelNotFound { model: m.to_string(), served: info.name.clone() });
            }
        }
        match (f.get("prompt"), f.get("messages")) {
            (Some(_), Some(_)) => Err(ApiError::invalid_value("messages", "give either 'prompt' or 'messages'")),
            (Some(_), None) => Ok(TokenizeInput::Prompt {
                text: f.str("prompt")?.unwrap_or_default().to_string(),
                add_special_tokens: f.bool("add_special_tokens")?.unwrap_or(true),
            }),
            (None, Some(m)) => Ok(TokenizeInput::Messages {
                messages: chat_messages(m)?,
                add_generation_prompt: f.bool("add_generation_prompt")?.unwrap_or(true),
            }),
            (None, None) => Err(ApiError::Missing { param: "prompt".into() }),
        }
    }
}

/// `/detokenize`'s `tokens`.
pub fn detokenize_tokens(body: &Value, info: &ModelInfo) -> Result<Vec<u32>, ApiError> {
    let f = Fields::new(body)?;
    f.reject_unknown(&["model", "tokens"])?;
    if let Some(m) = f.str("model")? {
        if m != info.name {
            return Err(ApiError::ModelNotFound { model: m.to_string(), served: info.name.clone() });
        }
    }
    match f.get("tokens") {
        None => Err(ApiError::Missing { param: "tokens".into() }),
        Some(v) => token_list(v, "tokens", info.tokenizer.vocab_size()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_seeds_are_distinct_replayable_and_keep_choice_zero() {
        assert_eq!(choice_seed(42, 0), 42);
        let seeds: std::collections::HashSet<u64> = (0..16).map(|i| choice_seed(42, i)).collect();
        assert_eq!(seeds.len(), 16);
        assert!((1..16).all(|i| choice_seed(42, i) < 1 << 53));
    }
}
