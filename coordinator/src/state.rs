//! The state every HTTP handler shares: the serving core, metrics, the determinism canary, the
//! API keys, the last soak report, and what the HTTP edge needs to protect itself — its limits,
//! the bounded pool that tokenizes, and the signal that ends the streams still running when a
//! shutdown's grace runs out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::api::request::Validation;
use crate::ops::canary::Canary;
use crate::ops::metrics::Metrics;
use crate::service::Service;

/// Bearer keys. Empty lists mean "no authentication" for that surface.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Keys accepted on `/v1/*` (and `/tokenize`, `/detokenize`).
    pub api_keys: Vec<String>,
    /// Keys accepted on `/ops/*`, `/metrics` and `/dashboard`.
    pub ops_keys: Vec<String>,
}

/// `--body-timeout-s` default.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Limits the handlers apply.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request body must have arrived whole this long after its headers (else 408).
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { body_timeout: DEFAULT_BODY_TIMEOUT }
    }
}

pub struct AppState {
    pub service: Arc<Service>,
    pub metrics: Arc<Metrics>,
    pub canary: Arc<Canary>,
    pub auth: Auth,
    /// The last soak report posted to `/ops/soak` (see `lockstep soak`).
    pub soak: Mutex<Option<serde_json::Value>>,
    pub limits: Limits,
    /// The prompt bound validation applies (derived from the model once).
    pub validation: Validation,
    /// Tokenization and validation run on tokio's blocking threads, at most this many at once
    /// (one per core), so huge prompts never stall the runtime that answers `/health`.
    pub work_slots: Arc<Semaphore>,
    /// Set to `true` when a shutdown's grace has run out: every stream still running ends with
    /// an error event and `[DONE]` (see [`crate::api::generate::SseBody`]).
    pub cut_streams: watch::Sender<bool>,
}

impl AppState {
    pub fn new(service: Arc<Service>, metrics: Arc<Metrics>, canary: Arc<Canary>, auth: Auth) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        AppState {
            validation: Validation::new(service.info()),
            service,
            metrics,
            canary,
            auth,
            soak: Mutex::new(None),
            limits: Limits::default(),
            work_slots: Arc::new(Semaphore::new(cores)),
            cut_streams: watch::channel(false).0,
        }
    }

    /// Runs `work` (tokenizing, validating) on the bounded blocking pool.
    pub async fn off_runtime<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let _slot = self.work_slots.acquire().await.expect("the work semaphore is never closed");
        match tokio::task::spawn_blocking(work).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
