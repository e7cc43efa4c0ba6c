//! Text in, token ids out, and back: the Hugging Face tokenizer of a model directory, its chat
//! template, streaming detokenization and stop strings.
//!
//! * [`Tokenizer`] wraps the `tokenizers` crate (`tokenizer.json`) and reads the pieces of
//!   `tokenizer_config.json` and `generation_config.json` that generation needs: the BOS/EOS
//!   tokens and ids and the chat template. It is cheap to clone (the model is shared).
//! * Chat templates are Jinja; they are rendered with `minijinja` configured like Hugging Face's
//!   renderer (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, and the Python
//!   string/dict methods templates call, such as `.strip()` and `.items()`). A model without a
//!   template gets [`FALLBACK_CHAT_TEMPLATE`].
//! * [`DecodeStream`] turns generated ids into text one id at a time. Decoding ids one by one and
//!   concatenating is wrong for SentencePiece-style tokenizers (leading-space rules) and for byte
//!   fallback (one character split over several byte tokens), so it decodes a small window of ids
//!   and emits only the text that grew, holding back while the window ends in an incomplete
//!   character.
//! * [`StopStringMatcher`] finds stop strings in the streamed text. Text that might be the start
//!   of a stop string is held back until it is clear, so a client never sees half a stop string.
//!
//! Determinism: encoding and decoding are pure functions of the files. A chat template that calls
//! `strftime_now` makes the prompt depend on the date; [`Tokenizer::apply_chat_template_at`] pins
//! the time for replay.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, State};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// The template used when the model directory has none: one `role: content` paragraph per
/// message, preceded by the BOS token (Hugging Face templates emit BOS themselves, so chat
/// prompts are always encoded without adding special tokens; see [`Tokenizer::encode_chat`]).
/// With `add_generation_prompt`, it ends with `assistant:` for the model to continue.
pub const FALLBACK_CHAT_TEMPLATE: &str = "{{ bos_token }}\
{% for message in messages %}{{ message.role }}: {{ message.content }}\n\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

/// How many prompt ids [`Tokenizer::decode_stream_after`] keeps as decoding context: enough for
/// the leading-space rules and for a character split over up to 4 byte tokens.
const PROMPT_CONTEXT_IDS: usize = 6;

/// Everything that can go wrong loading or using a tokenizer. Messages name the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: not found", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: cannot load the tokenizer: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("{}: field `{field}`: {message}", path.display())]
    BadField { path: PathBuf, field: &'static str, message: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("chat template ({origin}): {message}")]
    ChatTemplate { origin: String, message: String },
}

impl TokenizerError {
    /// A stable machine-readable name for API error bodies and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            TokenizerError::NotFound { .. } => "tokenizer_file_not_found",
            TokenizerError::Io { .. } => "tokenizer_io",
            TokenizerError::Json { .. } => "tokenizer_invalid_json",
            TokenizerError::Load { .. } => "tokenizer_load",
            TokenizerError::BadField { .. } => "tokenizer_bad_field",
            TokenizerError::Encode(_) => "tokenizer_encode",
            TokenizerError::Decode(_) => "tokenizer_decode",
            TokenizerError::ChatTemplate { .. } => "chat_template",
        }
    }
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template, or why it would not compile (reported when it is used, so a model
/// with an exotic template can still serve plain completions).
#[derive(Clone)]
struct ChatTemplate {
    /// Where the template came from, for error messages.
    origin: String,
    env: Result<Arc<Environment<'static>>, String>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    fn compile(origin: String, source: String) -> Self {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with these Jinja settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(python_method);
        let env = env.add_template_owned(TEMPLATE_NAME, source).map(|()| Arc::new(env));
        ChatTemplate { origin, env: env.map_err(|e| describe_jinja_error(&e)) }
    }

    fn render(&self, context: Value) -> Result<String> {
        let error = |message| TokenizerError::ChatTemplate { origin: self.origin.clone(), message };
        let env = self.env.as_ref().map_err(|m| error(m.clone()))?;
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| error(describe_jinja_error(&e)))?;
        template.render(context).map_err(|e| error(describe_jinja_error(&e)))
    }
}

/// The context variable holding the render's time for `strftime_now`: the time is an input of the
/// render, not something the template reads from the clock behind the caller's back.
const NOW_VARIABLE: &str = "__lockstep_now_unix_secs";

fn strftime_now(state: &State, format: String) -> Result<String, JinjaError> {
    let now = state
        .lookup(NOW_VARIABLE)
        .and_then(|v| v.as_i64())
        .ok_or_else(|| JinjaError::new(JinjaErrorKind::InvalidOperation, "strftime_now: render time not set"))?;
    Ok(strftime(&format, now))
}

fn describe_jinja_error(e: &JinjaError) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(JinjaErrorKind::InvalidOperation, message))
}

/// The Python `str` and `dict` methods that chat templates call, for values minijinja has no
/// such method on.
fn python_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let () = from_args(args)?;
                state.apply_filter("items", std::slice::from_ref(value))
            }
            "keys" => {
                let () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let () = from_args(args)?;
                let values: Result<Vec<Value>, JinjaError> =
                    value.try_iter()?.map(|key| value.get_item(&key)).collect();
                Ok(Value::from(values?))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let found = value.get_item(&key)?;
                Ok(if found.is_undefined() { default.unwrap_or(Value::from(())) } else { found })
            }
            _ => Err(JinjaError::from(JinjaErrorKind::UnknownMethod)),
        };
    }
    Err(JinjaError::from(JinjaErrorKind::UnknownMethod))
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let strip_set = |chars: Option<String>| {
        move |c: char| match &chars {
            Some(set) => set.contains(c),
            None => c.is_whitespace(),
        }
    };
    // Python's startswith/endswith accept one string or a tuple of them.
    let any_of = |arg: &Value, test: &dyn Fn(&str) -> bool| -> Result<bool, JinjaError> {
        if let Some(one) = arg.as_str() {
            return Ok(test(one));
        }
        for item in arg.try_iter()? {
            if item.as_str().is_some_and(test) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    Ok(match method {
        "strip" => {
            let (chars,): (Option<String>,) = from_args(args)?;
            Value::from(s.trim_matches(strip_set(chars)))
        }
        "lstrip" => {
            let (chars,): (Option<String>,) = from_args(args)?;
            Value::from(s.trim_start_matches(strip_set(chars)))
        }
        "rstrip" => {
            let (chars,): (Option<String>,) = from_args(args)?;
            Value::from(s.trim_end_matches(strip_set(chars)))
        }
        "startswith" => {
            let (prefix,): (Value,) = from_args(args)?;
            Value::from(any_of(&prefix, &|p| s.starts_with(p))?)
        }
        "endswith" => {
            let (suffix,): (Value,) = from_args(args)?;
            Value::from(any_of(&suffix, &|p| s.ends_with(p))?)
        }
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "capitalize" => {
            let mut chars = s.chars();
            let first = chars.next().map(|c| c.to_uppercase().collect::<String>()).unwrap_or_default();
            Value::from(first + &chars.as_str().to_lowercase())
        }
        "title" => {
            let mut out = String::with_capacity(s.len());
            let mut at_word_start = true;
            for c in s.chars() {
                if at_word_start {
                    out.extend(c.to_uppercase());
                } else {
                    out.extend(c.to_lowercase());
                }
                at_word_start = !c.is_alphanumeric();
            }
            Value::from(out)
        }
        "split" => {
            let (sep, maxsplit): (Option<String>, Option<i64>) = from_args(args)?;
            let limit = maxsplit.filter(|&n| n >= 0).map(|n| n as usize + 1);
            let parts: Vec<String> = match (sep, limit) {
                (Some(sep), Some(n)) => s.splitn(n, sep.as_str()).map(String::from).collect(),
                (Some(sep), None) => s.split(sep.as_str()).map(String::from).collect(),
                (None, _) => {
                    // Whitespace split drops empty parts; honour maxsplit by re-joining the tail.
                    let words: Vec<&str> = s.split_whitespace().collect();
                    match limit {
                        Some(n) if words.len() > n => {
                            let mut head: Vec<String> = words[..n - 1].iter().map(|w| w.to_string()).collect();
                            let tail_start = words[n - 1].as_ptr() as usize - s.as_ptr() as usize;
                            head.push(s[tail_start..].trim_end().to_string());
                            head
                        }
                        _ => words.into_iter().map(String::from).collect(),
                    }
                }
            };
            Value::from(parts)
        }
        "replace" => {
            let (old, new, count): (String, String, Option<i64>) = from_args(args)?;
            match count.filter(|&n| n >= 0) {
                Some(n) => Value::from(s.replacen(old.as_str(), &new, n as usize)),
                None => Value::from(s.replace(old.as_str(), &new)),
            }
        }
        "find" => {
            let (needle,): (String,) = from_args(args)?;
            Value::from(s.find(needle.as_str()).map_or(-1, |i| s[..i].chars().count() as i64))
        }
        "count" => {
            let (needle,): (String,) = from_args(args)?;
            Value::from(s.matches(needle.as_str()).count())
        }
        "join" => {
            let (items,): (Value,) = from_args(args)?;
            let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
            Value::from(parts.join(s))
        }
        "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
        _ => return Err(JinjaError::from(JinjaErrorKind::UnknownMethod)),
    })
}

/// Formats a Unix time (UTC) with the strftime directives chat templates use: `%Y %y %m %d %e
/// %j %H %I %M %S %p %a %A %b %B %%`. Other directives are left as written.
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    // 1970-01-01 was a Thursday.
    let weekday = (days + 4).rem_euclid(7) as usize;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match directive {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'j' => format!("{day_of_year:03}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{hour12:02}"),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'b' => MONTHS[month as usize - 1][..3].to_string(),
            'B' => MONTHS[month as usize - 1].to_string(),
            '%' => "%".to_string(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    chat_template: ChatTemplate,
    has_model_chat_template: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("chat_template", &self.chat_template.origin)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenizerError::Io { path: path.to_path_buf(), source }),
    };
    serde_json::from_str(&text).map(Some).map_err(|source| TokenizerError::Json { path: path.to_path_buf(), source })
}

/// A special token as `tokenizer_config.json` writes it: a string, or an object with `content`.
fn special_token(config: &Json, field: &'static str, path: &Path) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::BadField {
                path: path.to_path_buf(),
                field,
                message: "an object special token needs a string `content`".into(),
            }),
        },
        Some(other) => Err(TokenizerError::BadField {
            path: path.to_path_buf(),
            field,
            message: format!("expected a string or {{\"content\": ...}}, got {other}"),
        }),
    }
}

/// A token id field of `generation_config.json`: an integer, a list of them, or absent.
fn token_ids(config: &Json, field: &'static str, path: &Path) -> Result<Vec<u32>> {
    let bad = |v: &Json| TokenizerError::BadField {
        path: path.to_path_buf(),
        field,
        message: format!("expected a token id or a list of token ids, got {v}"),
    };
    let one = |v: &Json| v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| bad(v));
    match config.get(field) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The chat template of a model directory: `tokenizer_config.json`'s `chat_template` (a string,
/// or a list of named templates of which `default` is used), else `chat_template.jinja`, else
/// `chat_template.json`. Returns (origin, source).
fn find_chat_template(dir: &Path, config: &Json, config_path: &Path) -> Result<Option<(String, String)>> {
    let origin = |p: &Path| p.display().to_string();
    match config.get("chat_template") {
        Some(Json::String(s)) => return Ok(Some((origin(config_path), s.clone()))),
        Some(Json::Array(named)) => {
            let template = |t: &Json| t.get("template").and_then(Json::as_str).map(String::from);
            let default = named.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
            return match default.or(named.first()).and_then(template) {
                Some(s) => Ok(Some((origin(config_path), s))),
                None => Err(TokenizerError::BadField {
                    path: config_path.to_path_buf(),
                    field: "chat_template",
                    message: "a list of templates needs {\"name\", \"template\"} objects".into(),
                }),
            };
        }
        None | Some(Json::Null) => {}
        Some(other) => {
            return Err(TokenizerError::BadField {
                path: config_path.to_path_buf(),
                field: "chat_template",
                message: format!("expected a string or a list of named templates, got {other}"),
            })
        }
    }
    let jinja_path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja_path) {
        Ok(s) => return Ok(Some((origin(&jinja_path), s))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TokenizerError::Io { path: jinja_path, source }),
    }
    let json_path = dir.join("chat_template.json");
    if let Some(json) = read_json(&json_path)? {
        return match json.get("chat_template") {
            Some(Json::String(s)) => Ok(Some((origin(&json_path), s.clone()))),
            _ => Err(TokenizerError::BadField {
                path: json_path,
                field: "chat_template",
                message: "expected a string".into(),
            }),
        };
    }
    Ok(None)
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` and `generation_config.json`
    /// (optional) from a Hugging Face model directory.
    ///
    /// EOS ids are `generation_config.json`'s `eos_token_id` (an id or a list) followed by the id
    /// of `tokenizer_config.json`'s `eos_token`, without duplicates. The BOS id is
    /// `generation_config.json`'s `bos_token_id`, else the id of `bos_token`.
    pub fn from_dir(model_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = model_dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(TokenizerError::NotFound { path: tokenizer_path });
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| TokenizerError::Load { path: tokenizer_path.clone(), message: e.to_string() })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Json::Null);
        let special_map_path = dir.join("special_tokens_map.json");
        let special_map = read_json(&special_map_path)?.unwrap_or(Json::Null);
        let special = |field| -> Result<Option<String>> {
            match special_token(&config, field, &config_path)? {
                Some(token) => Ok(Some(token)),
                None => special_token(&special_map, field, &special_map_path),
            }
        };
        let bos_token = special("bos_token")?;
        let eos_token = special("eos_token")?;

        let generation_path = dir.join("generation_config.json");
        let generation = read_json(&generation_path)?.unwrap_or(Json::Null);
        let mut eos_token_ids = token_ids(&generation, "eos_token_id", &generation_path)?;
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let bos_token_id = token_ids(&generation, "bos_token_id", &generation_path)?
            .first()
            .copied()
            .or_else(|| bos_token.as_deref().and_then(|t| inner.token_to_id(t)));

        let found = find_chat_template(dir, &config, &config_path)?;
        let has_model_chat_template = found.is_some();
        let (origin, source) =
            found.unwrap_or_else(|| ("built-in fallback".to_string(), FALLBACK_CHAT_TEMPLATE.to_string()));
        Ok(Tokenizer {
            inner: Arc::new(inner),
            bos_token,
            eos_token,
            bos_token_id,
            eos_token_ids,
            chat_template: ChatTemplate::compile(origin, source),
            has_model_chat_template,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g.
    /// prepends BOS for Llama).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens such as BOS/EOS.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Ids that end generation (may be empty when the model declares none).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether the model directory provides a chat template (otherwise
    /// [`FALLBACK_CHAT_TEMPLATE`] is used).
    pub fn has_chat_template(&self) -> bool {
        self.has_model_chat_template
    }

    /// Renders the conversation with the chat template; `strftime_now` sees the current time.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.apply_chat_template_at(messages, add_generation_prompt, now)
    }

    /// Renders the conversation with the chat template as if the time were `unix_secs` (UTC), so
    /// that a replay of a date-dependent template gives the same prompt.
    pub fn apply_chat_template_at(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        unix_secs: i64,
    ) -> Result<String> {
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
            __lockstep_now_unix_secs => unix_secs,
        };
        self.chat_template.render(context)
    }

    /// Renders the conversation and encodes it without adding special tokens (the template
    /// writes BOS itself where the model wants one).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, false)
    }

    /// A streaming detokenizer for ids generated from nothing.
    pub fn decode_stream(&self, skip_special: bool) -> DecodeStream {
        DecodeStream::new(self.clone(), &[], skip_special)
    }

    /// A streaming detokenizer for ids generated after `prompt_ids`: the last prompt ids are
    /// decoding context (so the first generated word gets its leading space) and are not emitted.
    pub fn decode_stream_after(&self, prompt_ids: &[u32], skip_special: bool) -> DecodeStream {
        DecodeStream::new(self.clone(), prompt_ids, skip_special)
    }
}

/// Incremental detokenizer: push generated ids, get the text each one completes.
///
/// It keeps a window of ids: `ids[..read_offset]` has already been turned into text, and
/// `ids[prefix_offset..read_offset]` is the context decoded again with each new id. The new text
/// is `decode(ids[prefix_offset..]) - decode(ids[prefix_offset..read_offset])`, emitted only when
/// it does not end in U+FFFD (an incomplete UTF-8 character, e.g. the first bytes of a
/// byte-fallback sequence). Each emission slides the window, so the work per id is constant.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream {
    fn new(tokenizer: Tokenizer, prompt_ids: &[u32], skip_special: bool) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_IDS)..];
        DecodeStream { tokenizer, skip_special, ids: context.to_vec(), prefix_offset: 0, read_offset: context.len() }
    }

    /// Adds one generated id; returns the text it completes (often empty while a character or
    /// word is still incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_text = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full_text = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full_text.len() <= prefix_text.len() || full_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new_text = text_after(&full_text, &prefix_text).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Ids before the window will never be decoded again.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(new_text)
    }

    /// Returns the text still held back (an incomplete character at the end of generation is
    /// emitted as U+FFFD) and marks it emitted.
    pub fn flush(&mut self) -> Result<String> {
        let prefix_text = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full_text = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let rest = text_after(&full_text, &prefix_text).to_string();
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(rest)
    }
}

/// The part of `full` after `prefix`. Normally `full` starts with `prefix`; when a decoder
/// rewrites earlier text (it should not, but it must not panic), the part after the longest
/// common prefix, cut at a character boundary.
fn text_after<'a>(full: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let mut common = full.bytes().zip(prefix.bytes()).take_while(|(a, b)| a == b).count();
    while !full.is_char_boundary(common) {
        common -= 1;
    }
    &full[common..]
}

/// What [`StopStringMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop string yet: emit `text` (possibly empty while a partial match is held back).
    Continue { text: String },
    /// Stop string number `stop_index` was found: emit `text` (everything before it) and end the
    /// sequence. The stop string itself is not emitted.
    Stopped { text: String, stop_index: usize },
}

/// Finds stop strings in streamed text.
///
/// Text that could be the beginning of a stop string is held back until the next push decides
/// it, so what is emitted never contains any part of a stop string that ends up matching. When
/// several stop strings match, the one that starts earliest wins (ties: the shortest; then the
/// first listed). After a stop, everything pushed is discarded.
#[derive(Debug, Clone)]
pub struct StopStringMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopStringMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        let stops = stops.into_iter().map(Into::into).filter(|s: &String| !s.is_empty()).collect();
        StopStringMatcher { stops, held: String::new(), stopped: false }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Text held back as a possible partial match.
    pub fn held(&self) -> &str {
        &self.held
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stopped {
            return StopCheck::Continue { text: String::new() };
        }
        self.held.push_str(text);
        if let Some((start, stop_index)) = find_earliest_stop(&self.held, &self.stops) {
            let text = self.held[..start].to_string();
            self.held.clear();
            self.stopped = true;
            return StopCheck::Stopped { text, stop_index };
        }
        let keep = partial_stop_suffix_len(&self.held, &self.stops);
        let emit_len = self.held.len() - keep;
        let text = self.held[..emit_len].to_string();
        self.held.drain(..emit_len);
        StopCheck::Continue { text }
    }

    /// Generation ended without a stop: the held-back text is not a stop string after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The earliest occurrence of any stop string in `text`: (byte offset, index of the stop).
pub fn find_earliest_stop(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .enumerate()
        .filter(|(_, stop)| !stop.is_empty())
        .filter_map(|(i, stop)| text.find(stop.as_str()).map(|at| (at, stop.len(), i)))
        .min()
        .map(|(at, _, i)| (at, i))
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of some stop string
/// (text that must be held back because the next characters could complete a stop).
pub fn partial_stop_suffix_len(text: &str, stops: &[String]) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| {
            let suffix = &text[i..];
            stops.iter().any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
        })
        .map_or(0, |i| text.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stories260K's tokenizer, or `None` when the test is skipped (see `lockstep_test_env`).
    fn stories() -> Option<Tokenizer> {
        let dir = lockstep_test_env::stories260k()?;
        Some(Tokenizer::from_dir(&dir).expect("stories260K tokenizer loads"))
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("lockstep-tokenizer-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, file: &str, contents: &str) {
            std::fs::write(self.0.join(file), contents).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A tiny word-level `tokenizer.json` with ChatML special tokens.
    const CHATML_TOKENIZER_JSON: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 3, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3, "hello": 4, "world": 5}, "unk_token": "<unk>"}
    }"#;

    /// In the style of Qwen2.5's template: default system prompt, role check, `.strip()`.
    const QWEN_STYLE_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content.strip() + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"#;

    fn chatml_dir(name: &str, template: &str) -> TempDir {
        let dir = TempDir::new(name);
        dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
        let config = serde_json::json!({
            "bos_token": null,
            "eos_token": {"content": "<|im_end|>", "special": true},
            "chat_template": template,
        });
        dir.write("tokenizer_config.json", &config.to_string());
        dir.write("generation_config.json", r#"{"eos_token_id": [2, 3], "bos_token_id": null}"#);
        dir
    }

    #[test]
    fn stories_encode_starts_with_bos_and_special_ids_are_read() {
        let Some(tok) = stories() else { return };
        let ids = tok.encode("Once upon a time", true).unwrap();
        assert_eq!(ids[0], 1, "{ids:?}");
        assert!(ids.len() > 2);
        assert_eq!(tok.encode("Once upon a time", false).unwrap(), ids[1..]);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<s>"), Some("</s>")));
        assert_eq!(tok.vocab_size(), 512);
        assert!(!tok.has_chat_template());
    }

    #[test]
    fn stories_decode_encode_round_trips() {
        let Some(tok) = stories() else { return };
        for text in [
            "Once upon a time, there was a little girl named Lily.",
            "Hello, world! 123 + 456 = 579",
            "  two leading spaces and\ttabs\nand newlines",
            "héllo wörld — ñandú",
            "日本語のテキスト",
            "emoji 🦀🎉 and 👩‍👩‍👧",
        ] {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, true).unwrap(), text, "ids {ids:?}");
        }
        // Byte fallback: a character outside the 512-token vocabulary becomes its UTF-8 bytes.
        let crab = tok.encode("🦀", false).unwrap();
        assert!(crab.len() >= 4, "{crab:?}");
    }

    #[test]
    fn stories_decode_stream_never_splits_characters() {
        let Some(tok) = stories() else { return };
        let prompt = tok.encode("Once upon a time", true).unwrap();
        let generated_text = " there was a crab 🦀 named Ünal. The end!";
        let full = tok.encode(&format!("Once upon a time{generated_text}"), true).unwrap();
        assert_eq!(full[..prompt.len()], prompt[..], "prompt tokens are a prefix");
        let generated = &full[prompt.len()..];
        let mut stream = tok.decode_stream_after(&prompt, true);
        let mut pieces = Vec::new();
        for &id in generated {
            pieces.push(stream.push(id).unwrap());
        }
        pieces.push(stream.flush().unwrap());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert!(pieces.iter().any(|p| p.contains('🦀')));
        assert_eq!(pieces.concat(), generated_text);
        // From nothing: the first word has no leading space, as in a plain decode.
        let mut stream = tok.decode_stream(true);
        let text: String = full.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(text + &stream.flush().unwrap(), tok.decode(&full, true).unwrap());
    }

    #[test]
    fn byte_fallback_bytes_are_held_until_the_character_completes() {
        let Some(tok) = stories() else { return };
        let ids = tok.encode("🦀", false).unwrap();
        let mut stream = tok.decode_stream_after(&tok.encode("A", true).unwrap(), true);
        let is_byte = |id: u32| tok.id_to_token(id).is_some_and(|t| t.starts_with("<0x"));
        let first_byte = ids.iter().position(|&id| is_byte(id)).unwrap();
        assert_eq!(ids.len() - first_byte, 4, "🦀 is 4 UTF-8 bytes: {ids:?}");
        let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces[first_byte..], ["", "", "", "🦀"], "{pieces:?}");
        assert_eq!(pieces.concat(), " 🦀");
        // An incomplete character at the end of generation is flushed as a replacement char.
        let mut stream = tok.decode_stream(true);
        assert_eq!(stream.push(ids[first_byte]).unwrap(), "");
        assert_eq!(stream.flush().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stories_fallback_chat_template() {
        let Some(tok) = stories() else { return };
        let messages = [ChatMessage::new("user", "Tell me a story.")];
        let text = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(text, "<s>user: Tell me a story.\n\nassistant:");
        let ids = tok.encode_chat(&messages, true).unwrap();
        assert_eq!(ids[0], 1);
        assert_ne!(ids[1], 1, "BOS once, from the template");
    }

    #[test]
    fn qwen_style_chat_template_renders() {
        let dir = chatml_dir("qwen", QWEN_STYLE_TEMPLATE);
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert!(tok.has_chat_template());
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.eos_token_ids(), &[2, 3]);
        assert_eq!(tok.bos_token_id(), None);
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "  Hi there!\n")];
        assert_eq!(
            tok.apply_chat_template(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
        );
        let messages = [ChatMessage::new("user", "hello world")];
        let text = tok.apply_chat_template(&messages, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        );
        let ids = tok.encode_chat(&messages, false).unwrap();
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&4) && ids.contains(&5) && ids.contains(&2), "{ids:?}");
        // raise_exception surfaces as an error naming the template's file.
        let err = tok.apply_chat_template(&[ChatMessage::new("tool", "x")], true).unwrap_err();
        assert_eq!(err.error_type(), "chat_template");
        let message = err.to_string();
        assert!(message.contains("Unknown role: tool") && message.contains("tokenizer_config.json"), "{message}");
    }

    #[test]
    fn template_helpers_and_python_methods() {
        let template = "{{ eos_token }}|{{ strftime_now('%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I %p') }}|\
            {{ 'a,b,,c'.split(',') | join('/') }}|{{ ' x y  z '.split() | join('/') }}|\
            {{ 'xxhixx'.strip('x') }}|{{ 'Hello'.startswith(('He', 'Zz')) }}|{{ 'Hello'.endswith('x') }}|\
            {{ 'hello world'.title() }}|{{ 'aXa'.replace('a', 'b') }}|{{ {'k': 1}.get('k') }}\
            {{ {'k': 1}.get('z', 7) }}|{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|\
            {{ ', '.join(['p', 'q']) }}";
        let dir = chatml_dir("helpers", template);
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        let text = tok.apply_chat_template_at(&[], false, 1_700_000_000).unwrap();
        assert_eq!(
            text,
            "<|im_end|>|2023-11-14 22:13:20 Tue Tuesday Nov November 318 23 10 PM|a/b//c|x/y/z|hi|True|False|\
             Hello World|bXb|17|a=1|p, q"
        );
        assert_eq!(strftime("%Y-%m-%d %j %a", 951_782_400), "2000-02-29 060 Tue");
        assert_eq!(strftime("%Y-%m-%d %j %a %%", -86_400 * 365), "1969-01-01 001 Wed %");
    }

    #[test]
    fn chat_template_file_and_named_list_are_found() {
        let dir = TempDir::new("jinja-file");
        dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
        dir.write("chat_template.jinja", "{% for m in messages %}[{{ m.content }}]{% endfor %}");
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "q")], true).unwrap(), "[q]");
        assert_eq!(tok.eos_token_ids(), &[] as &[u32]);

        let dir = TempDir::new("named-list");
        dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
        let config = serde_json::json!({
            "eos_token": "<|endoftext|>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "default:{{ messages | length }}"},
            ],
        });
        dir.write("tokenizer_config.json", &config.to_string());
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "q")], true).unwrap(), "default:1");
        assert_eq!(tok.eos_token_ids(), &[3]);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = TempDir::new("errors");
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert_eq!(err.error_type(), "tokenizer_file_not_found");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        dir.write("tokenizer.json", "{not json");
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert_eq!(err.error_type(), "tokenizer_load");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        dir.write("tokenizer.json", CHATML_TOKENIZER_JSON);
        dir.write("tokenizer_config.json", "{\"eos_token\": ");
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert_eq!(err.error_type(), "tokenizer_invalid_json");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

        dir.write("tokenizer_config.json", "{\"eos_token\": 5}");
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert_eq!(err.error_type(), "tokenizer_bad_field");

        dir.write("tokenizer_config.json", "{}");
        dir.write("generation_config.json", "{\"eos_token_id\": \"x\"}");
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert!(err.to_string().contains("generation_config.json"), "{err}");

        // A template that does not compile is reported when used, not at load.
        dir.write("generation_config.json", "{}");
        dir.write("tokenizer_config.json", r#"{"chat_template": "{% for %}"}"#);
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![4, 5]);
        let err = tok.apply_chat_template(&[], true).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }

    fn emitted(checks: &[StopCheck]) -> String {
        checks
            .iter()
            .map(|c| match c {
                StopCheck::Continue { text } | StopCheck::Stopped { text, .. } => text.as_str(),
            })
            .collect()
    }

    #[test]
    fn stop_strings_split_across_pushes_are_found_and_never_emitted() {
        let mut m = StopStringMatcher::new(["END", "\n\n"]);
        let checks: Vec<StopCheck> = ["Hello E", "N", "D? no, ", "EN", "D!"].iter().map(|t| m.push(t)).collect();
        assert_eq!(checks[0], StopCheck::Continue { text: "Hello ".into() });
        assert_eq!(m.held(), "", "after a stop nothing is held");
        assert_eq!(checks[1], StopCheck::Continue { text: String::new() });
        assert_eq!(checks[2], StopCheck::Stopped { text: String::new(), stop_index: 0 });
        assert_eq!(emitted(&checks), "Hello ");
        assert!(m.is_stopped());

        // A partial match that turns out not to be one is released.
        let mut m = StopStringMatcher::new(["END"]);
        assert_eq!(m.push("the EN"), StopCheck::Continue { text: "the ".into() });
        assert_eq!(m.held(), "EN");
        assert_eq!(m.push("TRY"), StopCheck::Continue { text: "ENTRY".into() });
        assert_eq!(m.push("...E"), StopCheck::Continue { text: "...".into() });
        assert_eq!(m.finish(), "E");

        // Earliest start wins, whichever stop is listed first.
        let mut m = StopStringMatcher::new(["world", "lo w", "", "o"]);
        assert_eq!(m.push("hello world"), StopCheck::Stopped { text: "hel".into(), stop_index: 1 });
    }

    #[test]
    fn stop_matcher_handles_multibyte_text() {
        let mut m = StopStringMatcher::new(["🦀!", "日本"]);
        assert_eq!(m.push("crab 🦀"), StopCheck::Continue { text: "crab ".into() });
        assert_eq!(m.push("? 日"), StopCheck::Continue { text: "🦀? ".into() });
        assert_eq!(m.push("本語"), StopCheck::Stopped { text: String::new(), stop_index: 1 });
        assert_eq!(partial_stop_suffix_len("ab🦀", &["🦀x".to_string()]), "🦀".len());
        assert_eq!(find_earliest_stop("abc", &["x".to_string()]), None);
        assert!(StopStringMatcher::new(Vec::<String>::new()).is_empty());
    }
}
