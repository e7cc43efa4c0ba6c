//! Text in, token ids out, and back: the Hugging Face tokenizer of a model directory, its chat
//! template, streaming detokenization and stop strings.
//!
//! * [`Tokenizer`] wraps the `tokenizers` crate (`tokenizer.json`) and reads the pieces of
//!   `tokenizer_config.json` and `generation_config.json` that generation needs: the BOS/EOS
//!   tokens and ids and the chat template. It is cheap to clone (the model is shared). A GGUF
//!   file carries all of that in its metadata ([`gguf`] builds the same tokenizer from it).
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
//!
//! Modules: [`chat`] renders chat templates, [`decode`] detokenizes a stream of ids, [`gguf`]
//! builds a tokenizer from GGUF metadata, [`stop`] matches stop strings; this module loads the
//! files and ties them together.

mod chat;
mod decode;
mod gguf;
mod stop;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use chat::ChatTemplate;
pub use chat::{ChatMessage, FALLBACK_CHAT_TEMPLATE};
pub use decode::DecodeStream;
pub use stop::{find_earliest_stop, partial_stop_suffix_len, StopCheck, StopStringMatcher};

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
    /// The tokenizer of the model at `path`: a `.gguf` file ([`Tokenizer::from_gguf`]) or a
    /// Hugging Face directory ([`Tokenizer::from_dir`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if lockstep_node::gguf::is_gguf_path(path) {
            Self::from_gguf(path)
        } else {
            Self::from_dir(path)
        }
    }

    /// The tokenizer, special tokens and chat template (`tokenizer.chat_template`, else
    /// [`FALLBACK_CHAT_TEMPLATE`]) of a GGUF file.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let load_error =
            |e: lockstep_node::LoadError| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() };
        let meta = lockstep_node::gguf::GgufFile::open(path).and_then(|f| f.tokenizer()).map_err(load_error)?;
        let inner = gguf::build(&meta)?;
        let token = |id: Option<u32>| id.map(|id| meta.tokens[id as usize].clone());
        let has_model_chat_template = meta.chat_template.is_some();
        let origin = format!("{} tokenizer.chat_template", path.display());
        let (origin, source) = match meta.chat_template.clone() {
            Some(source) => (origin, source),
            None => ("built-in fallback".to_string(), FALLBACK_CHAT_TEMPLATE.to_string()),
        };
        Ok(Tokenizer {
            inner: Arc::new(inner),
            bos_token: token(meta.bos_token_id),
            eos_token: token(meta.eos_token_id),
            bos_token_id: meta.bos_token_id,
            eos_token_ids: meta.eos_token_id.into_iter().collect(),
            chat_template: ChatTemplate::compile(origin, source),
            has_model_chat_template,
        })
    }

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
        let (bos, eos) = (self.bos_token.as_deref().unwrap_or(""), self.eos_token.as_deref().unwrap_or(""));
        self.chat_template.render(messages, add_generation_prompt, bos, eos, unix_secs)
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

#[cfg(test)]
mod tests;
