//! The state every HTTP handler shares: the serving core, metrics, the determinism canary, the
//! API keys and the last soak report.

use std::sync::{Arc, Mutex};

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

pub struct AppState {
    pub service: Arc<Service>,
    pub metrics: Arc<Metrics>,
    pub canary: Arc<Canary>,
    pub auth: Auth,
    /// The last soak report posted to `/ops/soak` (see `lockstep soak`).
    pub soak: Mutex<Option<serde_json::Value>>,
}
