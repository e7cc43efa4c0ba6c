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
//! Layers: one authentication rule for every route ([`auth`]: `/v1/*`, `/tokenize` and
//! `/detokenize` take `Auth::api_keys`, the ops routes `Auth::ops_keys`); bodies are capped at
//! [`MAX_BODY_BYTES`] and POST bodies must be `application/json`; every error response —
//! unknown routes (404) and methods (405) included — is an OpenAI error object counted once by
//! its [`ApiError::error_type`](error::ApiError::error_type); every request runs in an `http`
//! tracing span named by its request id, which every response carries as `x-request-id` (the
//! client's own when it sent a sane one); and HTTP/1.1 responses advertise the HTTP/3 endpoint
//! with `Alt-Svc: h3=":PORT"; ma=86400`.
//!
//! ## The edge under abuse
//!
//! HTTP/1.1 connections are served by hyper directly (not `axum::serve`) so that each one has a
//! header timeout (`--header-timeout-s`, which also closes idle keep-alive connections: the timer
//! runs while the server waits for the next request's head) and the body a timeout of its own
//! (`--body-timeout-s`, 408). At most `--max-connections` connections (HTTP/1.1 and HTTP/3
//! together) are served; past the cap a few more ([`OVERFLOW_CONNECTIONS`]) are accepted for one
//! request each with a short header timeout and answer only `/health` (anything else is 503
//! `too_many_connections`), so a monitor still sees the server while a flood holds every slot;
//! connections past those are closed at once.
//!
//! Shutdown ([`Server::shutdown`]): stop accepting, let requests in flight finish for the grace
//! period (HTTP/3 connections get GOAWAY), then end every stream still running with an error
//! event, `[DONE]` and a clean end of body (HTTP/1.1: the chunked terminator; HTTP/3: a stream
//! finish), and close what is left.
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

pub mod auth;
pub mod client;
pub mod error;
pub mod generate;
pub mod h3;
pub mod handlers;
pub mod loadgen;
pub mod request;
pub mod sse;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tower::ServiceExt as _;
use tracing::Instrument as _;

use crate::state::AppState;
pub use error::{ApiError, ErrorTag, MAX_BODY_BYTES};
pub use h3::TlsSource;

/// Connections accepted past `--max-connections`, each for one `/health` request.
pub const OVERFLOW_CONNECTIONS: usize = 32;
/// Header timeout of an overflow connection.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// After the grace period, how long cut streams get to write their last events.
const CUT_FLUSH: Duration = Duration::from_secs(2);
/// Longest client-sent `x-request-id` echoed (longer or non-printable ones are replaced).
const MAX_REQUEST_ID_LEN: usize = 128;

/// The whole HTTP surface: the API routes, the ops routes, the body limit and error accounting.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{*id}", get(handlers::model))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route("/health", get(handlers::health))
        .route("/version", get(handlers::version))
        .merge(crate::ops::ops_router())
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn(refuse_overflow))
        .layer(middleware::from_fn_with_state(state.clone(), record_errors))
        .layer(middleware::from_fn(trace_requests))
        .with_state(state)
}

/// The one authentication check ([`auth::check`]), before any handler reads a body.
async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match auth::check(req.uri().path(), req.headers(), &st.auth) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Marks a request that came on a connection past `--max-connections`.
#[derive(Debug, Clone, Copy)]
struct Overflow {
    max: usize,
}

/// A connection past the cap gets `/health` only.
async fn refuse_overflow(req: Request, next: Next) -> Response {
    match req.extensions().get::<Overflow>() {
        Some(o) if req.uri().path() != "/health" => ApiError::TooManyConnections { max: o.max }.into_response(),
        _ => next.run(req).await,
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

/// The request id of an HTTP request: the client's `x-request-id` when it is printable ASCII
/// of at most [`MAX_REQUEST_ID_LEN`] bytes, else `lockstep-N` (N counts this process's requests).
fn request_id(req: &Request) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let given = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::trim);
    match given {
        Some(id) if !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) => {
            id.to_string()
        }
        _ => format!("lockstep-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
    }
}

/// One span per HTTP request, on both transports, named by the request's id (which the response
/// carries as `x-request-id`): method, path and id from the start, the engine's sequence ids once
/// the request is submitted ([`generate::Choices::submit`] records them), so every event of the
/// request names it; the status at debug level when the response is ready.
async fn trace_requests(req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = req.uri().path(),
        request_id = %id,
        sequences = tracing::field::Empty
    );
    async move {
        let mut resp = next.run(req).await;
        tracing::debug!(status = resp.status().as_u16(), "responded");
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }
    .instrument(span)
    .await
}

/// `--header-timeout-s` default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `--max-connections` default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// `lockstep serve`'s shutdown grace.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Limits of the connection layer (the body timeout is the handlers', in [`AppState::limits`]).
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// A request head must arrive whole this long after the connection is ready for it (idle
    /// keep-alive connections included).
    pub header_timeout: Duration,
    /// Most connections served at once, HTTP/1.1 and HTTP/3 together.
    pub max_connections: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits { header_timeout: DEFAULT_HEADER_TIMEOUT, max_connections: DEFAULT_MAX_CONNECTIONS }
    }
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// HTTP/1.1 (TCP) address.
    pub listen: SocketAddr,
    /// HTTP/3; `None` serves HTTP/1.1 only.
    pub h3: Option<H3Options>,
    pub edge: EdgeLimits,
}

#[derive(Debug, Clone)]
pub struct H3Options {
    /// UDP address; `None`: the HTTP/1.1 address's IP and port, on UDP.
    pub listen: Option<SocketAddr>,
    pub tls: TlsSource,
}

/// Counts what is in flight — HTTP/1.1 connections, HTTP/3 requests — by handing each a clone,
/// so a shutdown can wait for them.
#[derive(Clone, Default)]
pub struct Inflight(Arc<()>);

impl Inflight {
    pub fn count(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }
}

/// The connection slots of one server: `--max-connections` of them, and the overflow ones.
#[derive(Clone)]
pub struct ConnectionSlots {
    pub max: usize,
    normal: Arc<Semaphore>,
    overflow: Arc<Semaphore>,
}

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        ConnectionSlots {
            max,
            normal: Arc::new(Semaphore::new(max)),
            overflow: Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS)),
        }
    }

    /// A slot for a new connection: `(permit, false)` within the cap, `(permit, true)` for an
    /// overflow connection, `None` when it must be closed at once.
    fn take(&self) -> Option<(tokio::sync::OwnedSemaphorePermit, bool)> {
        if let Ok(p) = self.normal.clone().try_acquire_owned() {
            return Some((p, false));
        }
        self.overflow.clone().try_acquire_owned().ok().map(|p| (p, true))
    }

    /// A slot within the cap only (HTTP/3, which has no overflow path).
    pub(crate) fn take_normal(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.normal.clone().try_acquire_owned().ok()
    }

    fn open(&self) -> usize {
        (self.max - self.normal.available_permits()) + (OVERFLOW_CONNECTIONS - self.overflow.available_permits())
    }
}

/// Resolves once `stop` is set (or its sender is gone); holds no borrow of the value across
/// an await, so the futures that select on it stay `Send`.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves HTTP/1.1 on `listener` with `app` until `stop` is set, then asks every connection to
/// close after its request in flight; returns the listener.
async fn serve_http1(
    listener: TcpListener,
    app: Router,
    edge: EdgeLimits,
    slots: ConnectionSlots,
    connections: Inflight,
    mut stop: watch::Receiver<bool>,
) -> TcpListener {
    loop {
        let tcp = tokio::select! {
            // Once stopped, accept nothing more: connections waiting in the backlog stay there for
            // whoever gets the listener next (a stepping-down leader hands it to its standby).
            biased;
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors (or similar): let connections close rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((permit, overflow)) = slots.take() else {
            drop(tcp);
            continue;
        };
        // Every token event is written as soon as it exists: without TCP_NODELAY, Nagle's
        // algorithm and delayed ACKs hold small SSE writes back for ~40 ms.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop.clone();
        let max = slots.max;
        let connection = connections.clone();
        tokio::spawn(async move {
            let _connection = connection;
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                if overflow {
                    req.extensions_mut().insert(Overflow { max });
                }
                app.clone().oneshot(req)
            });
            // A connection accepted just before the stop is answered once, not closed unread.
            let accepted_at_stop = *stop.borrow();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(if overflow {
                    OVERFLOW_HEADER_TIMEOUT.min(edge.header_timeout)
                } else {
                    edge.header_timeout
                })
                .keep_alive(!overflow && !accepted_at_stop);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            if accepted_at_stop {
                let _ = conn.await;
            } else {
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            drop(permit);
        });
    }
    listener
}

/// A running server (both transports).
pub struct Server {
    pub http_addr: SocketAddr,
    pub h3_addr: Option<SocketAddr>,
    /// The PEM of the self-signed HTTP/3 certificate, when one was generated.
    pub cert_pem: Option<std::path::PathBuf>,
    state: Arc<AppState>,
    slots: ConnectionSlots,
    stop: watch::Sender<bool>,
    http: JoinHandle<TcpListener>,
    h3: Option<(quinn::Endpoint, JoinHandle<()>, Inflight)>,
    /// HTTP/1.1 connections open.
    connections: Inflight,
}

impl Server {
    /// Binds both transports and starts serving `state` (inside a tokio runtime).
    pub async fn start(state: Arc<AppState>, opts: ServeOptions) -> Result<Server> {
        let listener =
            TcpListener::bind(opts.listen).await.with_context(|| format!("binding HTTP on tcp {}", opts.listen))?;
        Self::start_on(listener, state, opts).await
    }

    /// [`Server::start`] on a listener already bound (the one [`InterimServer`] answered on).
    pub async fn start_on(listener: TcpListener, state: Arc<AppState>, opts: ServeOptions) -> Result<Server> {
        let http_addr = listener.local_addr()?;
        let app = router(state.clone());
        let slots = ConnectionSlots::new(opts.edge.max_connections.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let (mut h3, mut h3_addr, mut cert_pem) = (None, None, None);
        if let Some(h) = &opts.h3 {
            let addr = h.listen.unwrap_or(http_addr);
            let tls = h3::TlsMaterial::load(&h.tls, addr)?;
            let endpoint = h3::bind(addr, &tls)?;
            h3_addr = Some(endpoint.local_addr()?);
            cert_pem = tls.generated_pem;
            let inflight = Inflight::default();
            let bridge = h3::Bridge { router: app.clone(), state: state.clone(), inflight: inflight.clone() };
            let task = tokio::spawn(h3::serve(endpoint.clone(), bridge, slots.clone(), stop_rx.clone()));
            h3 = Some((endpoint, task, inflight));
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
        let connections = Inflight::default();
        let http = tokio::spawn(serve_http1(listener, h1_app, opts.edge, slots.clone(), connections.clone(), stop_rx));
        Ok(Server { http_addr, h3_addr, cert_pem, state, slots, stop, http, h3, connections })
    }

    /// What `lockstep serve` logs once it listens (scripts wait for `listening on http://`).
    pub fn banner(&self) -> String {
        match self.h3_addr {
            Some(a) => format!("listening on http://{} (HTTP/3 on udp {a})", self.http_addr),
            None => format!("listening on http://{} (HTTP/3 off)", self.http_addr),
        }
    }

    /// Connections open now (both transports, overflow ones included).
    pub fn open_connections(&self) -> usize {
        self.slots.open()
    }

    /// No HTTP/1.1 connection and no HTTP/3 request is left (idle HTTP/3 connections are the
    /// clients' to close).
    fn drained(&self) -> bool {
        self.connections.count() == 0 && self.h3.as_ref().is_none_or(|(_, _, inflight)| inflight.count() == 0)
    }

    async fn wait_drained(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.drained() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops accepting on both transports, lets requests in flight finish for up to `grace`,
    /// then ends every stream still running with an error event and `[DONE]` (a clean end of
    /// body on either transport), and drops whatever is left (which aborts its sequences).
    pub async fn shutdown(self, grace: Duration) {
        drop(self.shutdown_keeping_listener(grace).await);
    }

    /// [`Server::shutdown`], handing the HTTP/1.1 listener back instead of closing it, so clients
    /// that connect meanwhile wait in its backlog for the next server on it (a leader that steps
    /// down hands it to its standby) rather than being refused.
    pub async fn shutdown_keeping_listener(self, grace: Duration) -> Option<TcpListener> {
        let _ = self.stop.send(true);
        if !self.wait_drained(grace).await {
            tracing::warn!("the shutdown grace ran out: ending the streams still running");
            let _ = self.state.cut_streams.send(true);
            self.wait_drained(CUT_FLUSH).await;
        }
        // The accept loop returned the listener as soon as the stop was sent.
        let listener = self.http.await.ok();
        if let Some((endpoint, task, _)) = &self.h3 {
            // Closing discards what a client has received but not yet read: give clients the
            // flush time to read their last events and close first.
            let _ = tokio::time::timeout(CUT_FLUSH, endpoint.wait_idle()).await;
            endpoint.close(0u32.into(), b"server shutting down");
            task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        listener
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(state: Arc<AppState>, opts: ServeOptions) -> Result<()> {
    let listener =
        TcpListener::bind(opts.listen).await.with_context(|| format!("binding HTTP on tcp {}", opts.listen))?;
    run_on(listener, state, opts).await
}

/// [`run`] on a listener already bound.
pub async fn run_on(listener: TcpListener, state: Arc<AppState>, opts: ServeOptions) -> Result<()> {
    let server = Server::start_on(listener, state, opts).await?;
    if let Some(p) = &server.cert_pem {
        tracing::info!("HTTP/3 uses a self-signed certificate; trust {} to connect", p.display());
    }
    tracing::info!(http_addr = %server.http_addr, "{}", server.banner());
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown(DEFAULT_SHUTDOWN_GRACE).await;
    Ok(())
}

/// What answers on the HTTP address while the serving core is not there: a static cluster waiting
/// for its nodes ([`forming_app`]) or an etcd standby (`lockstep serve --membership etcd`). It has
/// the real server's connection limits and timeouts, and hands its listener over to
/// [`Server::start_on`] so the address never refuses a connection in between.
pub struct InterimServer {
    stop: watch::Sender<bool>,
    task: JoinHandle<TcpListener>,
    pub http_addr: SocketAddr,
}

impl InterimServer {
    pub async fn start(listen: SocketAddr, app: Router, edge: EdgeLimits) -> Result<InterimServer> {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("binding HTTP on tcp {listen}"))?;
        Self::start_on(listener, app, edge)
    }

    pub fn start_on(listener: TcpListener, app: Router, edge: EdgeLimits) -> Result<InterimServer> {
        let http_addr = listener.local_addr()?;
        let app = app.layer(middleware::from_fn(trace_requests));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve_http1(
            listener,
            app,
            edge,
            ConnectionSlots::new(edge.max_connections.max(1)),
            Inflight::default(),
            rx,
        ));
        Ok(InterimServer { stop, task, http_addr })
    }

    /// Stops answering and hands the listener over (to [`Server::start_on`]).
    pub async fn into_listener(self) -> Result<TcpListener> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}

/// The interim app of a server that is starting: `/health` is 503 `{"status": "forming", …}`,
/// everything else 503 `unavailable` with `Retry-After`, so monitors and clients see a server that
/// is starting, not a refused connection.
pub fn forming_app(reason: String) -> Router {
    let reason: Arc<str> = reason.into();
    let health_reason = reason.clone();
    Router::new()
        .route(
            "/health",
            get(move || {
                let reason = health_reason.clone();
                async move {
                    let body = serde_json::json!({"status": "forming", "reason": &*reason, "replicas": []});
                    (StatusCode::SERVICE_UNAVAILABLE, Json(body))
                }
            }),
        )
        .fallback(move || {
            let reason = reason.clone();
            async move { ApiError::Submit(crate::service::SubmitError::Unavailable(reason.to_string())) }
        })
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
