//! Every way an API request can fail, as one enum.
//!
//! [`ApiError`] is the only error type a handler returns. Its [`ApiError::error_type`] is a stable
//! machine-readable name used three times: as the `code` of the OpenAI error object, as the label
//! of the error counter (through [`crate::service::ServiceObserver::on_error`]), and in tests. The
//! HTTP status and the OpenAI `type` class follow from the variant, so a failure cannot be counted
//! under one name and reported under another.
//!
//! Recording happens in one place: [`ApiError::into_response`] tags the response with an
//! [`ErrorTag`] and the router's `record_errors` middleware counts every tagged response. Errors
//! that the serving core already counted itself (admission refusals, engine rejections) are tagged
//! as such and not counted twice.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::RequestError;
use crate::service::SubmitError;
use crate::tokenizer::TokenizerError;

/// The largest request body accepted, in bytes (the router applies the same cap to every route).
pub const MAX_BODY_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("the request body is not valid UTF-8 (byte {valid_up_to} starts an invalid sequence)")]
    InvalidUtf8 { valid_up_to: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("'{param}' must be {expected}")]
    InvalidType { param: String, expected: &'static str },
    #[error("missing required parameter '{param}'")]
    Missing { param: String },
    #[error("invalid value for '{param}': {message}")]
    InvalidValue { param: String, message: String },
    #[error("'{param}' is not supported: {message}")]
    Unsupported { param: String, message: String },
    #[error(
        "this model's maximum context length is {max_context} tokens, but the prompt has {prompt_tokens} tokens; \
         at least one position must remain for the completion"
    )]
    ContextLength { param: &'static str, prompt_tokens: usize, max_context: usize },
    #[error(
        "the request needs up to {needed_blocks} KV cache blocks ({needed_slots} positions) but the whole cache has \
         {num_blocks}; shorten the prompt or lower max_tokens"
    )]
    KvCacheTooSmall { param: &'static str, needed_slots: usize, needed_blocks: usize, num_blocks: usize },
    #[error("{source}")]
    Tokenizer { param: &'static str, source: TokenizerError },
    #[error("the model '{model}' does not exist; this server serves '{served}'")]
    ModelNotFound { model: String, served: String },
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{path} does not accept {method}")]
    MethodNotAllowed { method: String, path: String },
    #[error("this route takes 'Content-Type: application/json', got {content_type}")]
    UnsupportedMediaType { content_type: String },
    #[error("the request body did not arrive within {secs} s")]
    BodyTimeout { secs: u64 },
    #[error(
        "the prompt has {bytes} bytes, more than the {max_context} positions of this model's context can hold \
         ({max_bytes} bytes at the tokenizer's longest token)"
    )]
    PromptTooLong { param: &'static str, bytes: usize, max_bytes: usize, max_context: usize },
    /// The request is valid but no state of the server could ever admit it (so 400, not 429).
    #[error("this request can never be admitted: {reason}")]
    NeverAdmissible { param: &'static str, reason: String },
    #[error("{surface} key invalid or missing: send 'Authorization: Bearer <key>'")]
    InvalidApiKey { surface: KeySurface },
    /// Every connection slot (`--max-connections`) is taken; only `/health` is answered.
    #[error("the server has {max} connections open, its limit; only /health is answered until some close")]
    TooManyConnections { max: usize },
    /// The server is shutting down and its grace period ended before this request did.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A soak report was asked for before one was posted.
    #[error("no soak report has been posted yet (run `lockstep soak`)")]
    NoSoakReport,
    #[error("{0}")]
    Submit(#[from] SubmitError),
    /// The engine refused the request after admission (its own validation, or its replica went
    /// down in between).
    #[error("{0}")]
    Rejected(RequestError),
    /// Generation failed after it started (a replica failure that could not be recovered).
    #[error("generation failed: {0}")]
    Engine(String),
}

/// Which key a route takes: the API's or the ops surface's (they differ only in the challenge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySurface {
    Api,
    Ops,
}

impl std::fmt::Display for KeySurface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySurface::Api => "API",
            KeySurface::Ops => "ops",
        })
    }
}

/// Attached to every error response so the router's middleware can count it by name.
#[derive(Debug, Clone, Copy)]
pub struct ErrorTag {
    pub error_type: &'static str,
    /// The serving core already reported this error to the observer.
    pub already_recorded: bool,
}

impl ApiError {
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidValue { param: param.into(), message: message.into() }
    }
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Unsupported { param: param.into(), message: message.into() }
    }
    pub fn invalid_type(param: impl Into<String>, expected: &'static str) -> Self {
        ApiError::InvalidType { param: param.into(), expected }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound { .. } | ApiError::NotFound { .. } | ApiError::NoSoakReport => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::InvalidApiKey { .. } => StatusCode::UNAUTHORIZED,
            ApiError::TooManyConnections { .. } | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Submit(SubmitError::Overloaded { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Submit(SubmitError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Rejected(e) => match e {
                RequestError::Invalid(_) => StatusCode::BAD_REQUEST,
                RequestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                RequestError::EngineStopped => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Tokenizer { source, .. } => match source {
                // The prompt could not be rendered or encoded: the client's input.
                TokenizerError::ChatTemplate { .. } | TokenizerError::Encode(_) | TokenizerError::Decode(_) => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable name: the error object's `code` and the metrics label.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidUtf8 { .. } => "invalid_utf8",
            ApiError::BodyRead(_) => "invalid_body",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::InvalidType { .. } => "invalid_type",
            ApiError::Missing { .. } => "missing_parameter",
            ApiError::InvalidValue { .. } => "invalid_value",
            ApiError::Unsupported { .. } => "unsupported_parameter",
            ApiError::ContextLength { .. } => "context_length_exceeded",
            ApiError::KvCacheTooSmall { .. } => "kv_cache_too_small",
            ApiError::Tokenizer { source, .. } => source.error_type(),
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::PromptTooLong { .. } => "context_length_exceeded",
            ApiError::NeverAdmissible { .. } => "never_admissible",
            ApiError::InvalidApiKey { .. } => "invalid_api_key",
            ApiError::TooManyConnections { .. } => "too_many_connections",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::NoSoakReport => "no_soak_report",
            ApiError::Submit(e) => e.error_type(),
            ApiError::Rejected(e) => e.error_type(),
            ApiError::Engine(_) => "engine_error",
        }
    }

    /// The OpenAI error class (`type` of the error object), from the status.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            // OpenAI reports unknown models as invalid requests too.
            _ => "invalid_request_error",
        }
    }

    /// The request parameter at fault, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidType { param, .. }
            | ApiError::Missing { param }
            | ApiError::InvalidValue { param, .. }
            | ApiError::Unsupported { param, .. } => Some(param),
            ApiError::ContextLength { param, .. }
            | ApiError::Tokenizer { param, .. }
            | ApiError::KvCacheTooSmall { param, .. }
            | ApiError::PromptTooLong { param, .. }
            | ApiError::NeverAdmissible { param, .. } => Some(param),
            ApiError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// Whether the serving core reported this error to the observer already: admission refusals
    /// are counted by `Service::submit`, and the engine counts the requests it rejects (except
    /// those it turns away because its replica is down).
    fn already_recorded(&self) -> bool {
        match self {
            ApiError::Submit(_) => true,
            // The engine thread counts every request it rejects; a vanished thread counts none.
            ApiError::Rejected(e) => !matches!(e, RequestError::EngineStopped),
            // Counted by the engine loop as an `engine` error.
            ApiError::Engine(_) => true,
            _ => false,
        }
    }

    /// The OpenAI error object.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.error_type(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        match &self {
            ApiError::Submit(SubmitError::Overloaded { retry_after_secs, .. }) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Submit(SubmitError::Unavailable(_)) | ApiError::Rejected(RequestError::Unavailable(_)) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(5u64));
            }
            ApiError::InvalidApiKey { surface } => {
                // A browser opening the dashboard gets a Basic prompt (see `crate::ops`).
                let challenge = match surface {
                    KeySurface::Api => "Bearer realm=\"lockstep\"",
                    KeySurface::Ops => "Basic realm=\"lockstep ops\", charset=\"UTF-8\"",
                };
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            ApiError::TooManyConnections { .. } | ApiError::ShuttingDown => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1u64));
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp.extensions_mut()
            .insert(ErrorTag { error_type: self.error_type(), already_recorded: self.already_recorded() });
        resp
    }
}
