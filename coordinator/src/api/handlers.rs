//! The route handlers. Each one reads the body through [`JsonBody`], validates it with
//! [`crate::api::request`], and returns `Result<Response, ApiError>`; nothing else produces an
//! error response.
//!
//! Work is ordered cheapest refusal first: media type, declared length and the body timeout
//! ([`read_json_body`]); then, on the bounded blocking pool ([`AppState::off_runtime`]),
//! validation, whose own cheap checks (`n`, `max_tokens`, prompt bytes against the context) come
//! before tokenizing; then whether the request could ever be admitted
//! ([`crate::service::Service::admissible`]: a 400, never a 429 that clients retry forever);
//! only then admission.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::api::error::{ApiError, MAX_BODY_BYTES};
use crate::api::generate::{collect, Choices, Endpoint, Meta, SseBody, StreamCut};
use crate::api::request::{detokenize_tokens, TokenizeInput, ValidChat, ValidCompletion, ValidGeneration};
use crate::state::AppState;

/// A request body that is `application/json`, at most [`MAX_BODY_BYTES`], arrived within the
/// body timeout, valid UTF-8 and valid JSON (see [`read_json_body`]).
pub struct JsonBody(pub Value);

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        read_json_body(req, MAX_BODY_BYTES, state.limits.body_timeout).await.map(JsonBody)
    }
}

/// Reads a POST body, cheapest refusal first: a `Content-Type` other than `application/json` is
/// 415 (so a cross-site form or `text/plain` "simple request" cannot reach a route); a declared
/// `Content-Length` over `limit` is 413 before a byte is read; a body without one is read through
/// a limit, so an endless body costs at most `limit`; a body still incomplete after `timeout` is
/// 408.
pub async fn read_json_body(req: Request, limit: usize, timeout: Duration) -> Result<Value, ApiError> {
    let content_type =
        req.headers().get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = content_type.as_deref().and_then(|c| c.split(';').next()).map(str::trim);
    if !essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")) {
        return Err(ApiError::UnsupportedMediaType { content_type: content_type.unwrap_or_else(|| "none".into()) });
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    let bytes = match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => return Err(ApiError::BodyTimeout { secs: timeout.as_secs() }),
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(ApiError::BodyTooLarge { limit }),
        Ok(Err(e)) => return Err(ApiError::BodyRead(e.to_string())),
    };
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(ApiError::InvalidUtf8 { valid_up_to: e.valid_up_to() });
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

pub async fn completions(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let state = st.clone();
    let v = st.off_runtime(move || ValidCompletion::parse(&body, state.service.info(), &state.validation)).await?;
    run(&st, v.gen, Endpoint::Completion { logprobs: v.logprobs }).await
}

pub async fn chat_completions(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let state = st.clone();
    let v = st.off_runtime(move || ValidChat::parse(&body, state.service.info(), &state.validation)).await?;
    run(&st, v.gen, Endpoint::Chat { logprobs: v.logprobs }).await
}

async fn run(st: &AppState, gen: ValidGeneration, endpoint: Endpoint) -> Result<Response, ApiError> {
    st.service.admissible(&gen.requests).map_err(|reason| ApiError::NeverAdmissible { param: "n", reason })?;
    let meta = Meta::new(endpoint, &gen, &st.service.info().system_fingerprint);
    let stream = gen.stream;
    let choices = Choices::submit(&st.service, gen.requests)?;
    let cut = StreamCut::new(st.cut_streams.subscribe());
    if stream {
        Ok(SseBody::new(choices, meta, cut).into_response())
    } else {
        collect(choices, &meta, cut).await
    }
}

fn model_card(st: &AppState) -> Value {
    let info = st.service.info();
    let created = std::time::SystemTime::now()
        .checked_sub(st.service.uptime())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    json!({
        "id": info.name,
        "object": "model",
        "created": created,
        "owned_by": "lockstep",
        "max_model_len": info.max_context,
        "system_fingerprint": info.system_fingerprint,
    })
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_card(&st)]})).into_response()
}

pub async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let info = st.service.info();
    if id != info.name {
        return Err(ApiError::ModelNotFound { model: id, served: info.name.clone() });
    }
    Ok(Json(model_card(&st)).into_response())
}

pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    let reason = st.service.unhealthy_reason();
    let status = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if reason.is_none() { "ok" } else { "unavailable" },
        "reason": reason,
        "replicas": st.service.replicas(),
    });
    (status, Json(body)).into_response()
}

pub async fn version(State(st): State<Arc<AppState>>) -> Response {
    let info = st.service.info();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "contract_version": lockstep_kernels::CONTRACT_VERSION,
        "model": info.name,
        "system_fingerprint": info.system_fingerprint,
    }))
    .into_response()
}

pub async fn tokenize(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let state = st.clone();
    let work = move || {
        let info = state.service.info();
        let tokens = match TokenizeInput::parse(&body, info)? {
            TokenizeInput::Prompt { text, add_special_tokens } => info
                .tokenizer
                .encode(&text, add_special_tokens)
                .map_err(|source| ApiError::Tokenizer { param: "prompt", source })?,
            TokenizeInput::Messages { messages, add_generation_prompt } => info
                .tokenizer
                .encode_chat(&messages, add_generation_prompt)
                .map_err(|source| ApiError::Tokenizer { param: "messages", source })?,
        };
        Ok::<_, ApiError>(json!({"count": tokens.len(), "tokens": tokens, "max_model_len": info.max_context}))
    };
    Ok(Json(st.off_runtime(work).await?).into_response())
}

pub async fn detokenize(State(st): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let info = st.service.info();
    let tokens = detokenize_tokens(&body, info)?;
    let prompt =
        info.tokenizer.decode(&tokens, false).map_err(|source| ApiError::Tokenizer { param: "tokens", source })?;
    Ok(Json(json!({ "prompt": prompt })).into_response())
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound { method: method.to_string(), path: uri.path().to_string() }
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}
