//! The OpenAI-compatible HTTP API, over HTTP/1.1 and HTTP/3, and the server behind `lockstep serve`.
//!
//! Routes (one axum [`Router`], served on both transports):
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/completions` | text completions (`prompt`: string, strings, token ids) |
//! | `POST /v1/chat/completions` | chat completions through the model's chat template |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the served model |
//! | `POST /tokenize`, `POST /detokenize` | the model's tokenizer |
//! | `GET /health` | 200 while a replica can serve, else 503 |
//! | `GET /version` | version, kernel contract version, fingerprint |
//! | `/metrics`, `/ops/*`, `/dashboard` | the ops surface ([`crate::ops::ops_router`]) |
//!
//! Layers: `/v1/*`, `/tokenize` and `/detokenize` need a bearer key when `Auth::api_keys` is not
//! empty (the ops routes check `Auth::ops_keys` themselves); bodies are capped at
//! [`MAX_BODY_BYTES`]; every error response is counted once by its
//! [`ApiError::error_type`](error::ApiError::error_type); every request runs in an `http` tracing
//! span that carries its request id once it has one; and HTTP/1.1 responses advertise the HTTP/3
//! endpoint with `Alt-Svc: h3=":PORT"; ma=86400`.
//!
//! Determinism at the API: every response and every chunk carries `system_fingerprint`, and every
//! response (and the first chunk of a stream) carries the request's `seed` — the client's, or the
//! one drawn for it — so any answer can be replayed bit for bit. Each choice has an extension
//! field `token_ids`. See [`request`] for how the choices of `n > 1` get their seeds.
//!
//! Modules: [`request`] validates (once), [`generate`] runs and renders, [`handlers`] ties them to
//! routes, [`error`] is the one error type, [`h3`] is the HTTP/3 transport, [`client`] is the one
//! HTTP/1.1 client (for `lockstep loadgen`, `lockstep soak` and tests), [`sse`] its stream parser,
//! and [`loadgen`] the load generator.

pub mod client;
pub mod error;
pub mod generate;
pub mod h3;
pub mod handlers;
pub mod loadgen;
pub mod request;
pub mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::state::AppState;
pub use error::{ApiError, ErrorTag, MAX_BODY_BYTES};
pub use h3::TlsSource;

/// The whole HTTP surface: the API routes, the ops routes, the body limit and error accounting.
pub fn router(state: Arc<AppState>) -> Router {
    let keyed = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{*id}", get(handlers::model))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let open = Router::new().route("/health", get(handlers::health)).route("/version", get(handlers::version));
    Router::new()
        .merge(keyed)
        .merge(open)
        .merge(crate::ops::ops_router())
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), record_errors))
        .layer(middleware::from_fn(trace_requests))
        .with_state(state)
}

/// Whether `headers` carry `Authorization: Bearer K` for one of `keys` (always true when `keys`
/// is empty). The comparison takes the same time wherever the first differing byte is.
pub fn bearer_ok(headers: &HeaderMap, keys: &[String]) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(token) = given.strip_prefix("Bearer ").or_else(|| given.strip_prefix("bearer ")) else { return false };
    let token = token.trim().as_bytes();
    keys.iter().fold(false, |ok, k| {
        let k = k.as_bytes();
        let same = k.len() == token.len() && k.iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        ok | same
    })
}

async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if bearer_ok(req.headers(), &st.auth.api_keys) {
        next.run(req).await
    } else {
        ApiError::InvalidApiKey.into_response()
    }
}

/// Counts every error response once, by its error type.
async fn record_errors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if let Some(tag) = resp.extensions().get::<ErrorTag>() {
        if !tag.already_recorded {
            st.service.observer().on_error(tag.error_type);
        }
    }
    resp
}

/// One span per HTTP request, on both transports: method and path from the start, the request
/// id(s) once the request is submitted ([`generate::Choices::submit`] records them), so every
/// event of the request names it; the status at debug level when the response is ready.
async fn trace_requests(req: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = req.uri().path(),
        request_id = tracing::field::Empty
    );
    async move {
        let resp = next.run(req).await;
        tracing::debug!(status = resp.status().as_u16(), "responded");
        resp
    }
    .instrument(span)
    .await
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// HTTP/1.1 (TCP) address.
    pub listen: SocketAddr,
    /// HTTP/3; `None` serves HTTP/1.1 only.
    pub h3: Option<H3Options>,
}

#[derive(Debug, Clone)]
pub struct H3Options {
    /// UDP address; `None`: the HTTP/1.1 address's IP and port, on UDP.
    pub listen: Option<SocketAddr>,
    pub tls: TlsSource,
}

/// A running server (both transports).
pub struct Server {
    pub http_addr: SocketAddr,
    pub h3_addr: Option<SocketAddr>,
    /// The PEM of the self-signed HTTP/3 certificate, when one was generated.
    pub cert_pem: Option<std::path::PathBuf>,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    h3: Option<(quinn::Endpoint, JoinHandle<()>)>,
}

impl Server {
    /// Binds both transports and starts serving `state` (inside a tokio runtime).
    pub async fn start(state: Arc<AppState>, opts: ServeOptions) -> Result<Server> {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("binding HTTP on tcp {}", opts.listen))?;
        let http_addr = listener.local_addr()?;
        let app = router(state);
        let (mut h3, mut h3_addr, mut cert_pem) = (None, None, None);
        if let Some(h) = &opts.h3 {
            let addr = h.listen.unwrap_or(http_addr);
            let tls = h3::TlsMaterial::load(&h.tls, addr)?;
            let endpoint = h3::bind(addr, &tls)?;
            h3_addr = Some(endpoint.local_addr()?);
            cert_pem = tls.generated_pem;
            let task = tokio::spawn(h3::serve(endpoint.clone(), app.clone()));
            h3 = Some((endpoint, task));
        }
        let h1_app = match h3_addr {
            Some(a) => {
                let value = HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", a.port()))?;
                app.layer(tower::util::MapResponseLayer::new(move |mut r: Response| {
                    r.headers_mut().insert(header::ALT_SVC, value.clone());
                    r
                }))
            }
            None => app,
        };
        let (shutdown, mut rx) = watch::channel(false);
        // Every token event is written as soon as it exists: without TCP_NODELAY, Nagle's
        // algorithm and delayed ACKs hold small SSE writes back for ~40 ms.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let http = tokio::spawn(async move {
            axum::serve(listener, h1_app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
        });
        Ok(Server { http_addr, h3_addr, cert_pem, shutdown, http, h3 })
    }

    /// What `lockstep serve` logs once it listens (scripts wait for `listening on http://`).
    pub fn banner(&self) -> String {
        match self.h3_addr {
            Some(a) => format!("listening on http://{} (HTTP/3 on udp {a})", self.http_addr),
            None => format!("listening on http://{} (HTTP/3 off)", self.http_addr),
        }
    }

    /// Stops accepting, lets requests in flight finish for up to `grace`, then drops the rest
    /// (which aborts their sequences).
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        if let Some((endpoint, task)) = &self.h3 {
            endpoint.close(0u32.into(), b"server shutting down");
            task.abort();
        }
        let mut http = self.http;
        if tokio::time::timeout(grace, &mut http).await.is_err() {
            http.abort();
        }
        if let Some((endpoint, _)) = self.h3 {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(state: Arc<AppState>, opts: ServeOptions) -> Result<()> {
    let server = Server::start(state, opts).await?;
    if let Some(p) = &server.cert_pem {
        tracing::info!("HTTP/3 uses a self-signed certificate; trust {} to connect", p.display());
    }
    tracing::info!(http_addr = %server.http_addr, "{}", server.banner());
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
