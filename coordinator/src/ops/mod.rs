//! Operations: Prometheus metrics, the ops API, the determinism canary and the dashboard.
//!
//! [`ops_router`] is merged into the HTTP server next to the OpenAI API. Its routes:
//!
//! | route | what |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text exposition ([`metrics::Metrics::render`]) |
//! | `GET /ops/cluster` | JSON: fingerprint, model, numerics, groups, nodes (with their shards), KV, load, tokens/s |
//! | `GET /ops/canary` | JSON: the determinism canary's [`canary::CanaryStatus`] |
//! | `GET /ops/soak`, `POST /ops/soak` | the last soak report (posted by `lockstep soak`), at most [`SOAK_MAX_BYTES`] |
//! | `GET /dashboard` | the live dashboard, one self-contained HTML page (no CDN) |
//!
//! All of them take the ops keys ([`crate::state::Auth::ops_keys`]) when any are configured, as
//! `Authorization: Bearer KEY` or as HTTP Basic credentials with the key as password, checked by
//! the one authentication rule of [`crate::api::auth`] (the router applies it to every route).
//! Opened as `http://ops:KEY@host/dashboard` (scripts, kiosks), the page itself sends the key it
//! was opened with. Every error is an [`ApiError`], so it has the OpenAI error body and is counted.
//!
//! `POST /ops/soak` takes `Content-Type: application/json` (like every POST route: a cross-site
//! form or `text/plain` "simple request" cannot overwrite the report) and checks the types of the
//! fields the dashboard renders ([`validate_soak_report`]); the dashboard in turn renders whatever
//! it receives without throwing.
//!
//! The dashboard reads `/metrics` itself (and the JSON routes) rather than a private stats route,
//! so what operators see is exactly what Prometheus scrapes; a test checks that every metric name
//! the page reads is exported.

pub mod canary;
pub mod metrics;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::api::handlers::read_json_body;
use crate::state::AppState;

/// The dashboard page, embedded so the binary is all an operator needs.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// Largest soak report `POST /ops/soak` keeps (the soak tool posts a summary of a few KiB).
pub const SOAK_MAX_BYTES: usize = 256 << 10;

/// Window for the tokens/s figure, and history length for the throughput chart, seconds.
const THROUGHPUT_WINDOW_SECS: u64 = 5;
const THROUGHPUT_HISTORY_SECS: u64 = 120;
/// Latency quantiles in the history are over this many seconds before each point.
const LATENCY_WINDOW_SECS: u64 = 30;

/// The ops surface: `/metrics`, `/ops/*` and `/dashboard`.
pub fn ops_router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/ops/cluster", get(cluster))
        .route("/ops/canary", get(canary_status))
        .route("/ops/soak", get(soak_get).post(soak_post))
        .route("/dashboard", get(dashboard))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.service);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn canary_status(State(state): State<Arc<AppState>>) -> Response {
    Json(state.canary.status()).into_response()
}

/// The state of the cluster as one JSON document (see the module docs).
pub fn cluster_json(state: &AppState) -> Value {
    let svc = &state.service;
    let info = svc.info();
    let cfg = &info.config;
    let replicas = svc.replicas();
    let nodes = svc.nodes();
    state.metrics.record(svc);
    let throughput = state.metrics.throughput(THROUGHPUT_WINDOW_SECS, THROUGHPUT_HISTORY_SECS);
    let history = state.metrics.history(THROUGHPUT_HISTORY_SECS, LATENCY_WINDOW_SECS);
    let segments = info.numerics.reduce_segments;
    let groups: Vec<Value> = replicas
        .iter()
        .map(|r| {
            let members: Vec<&str> =
                nodes.iter().filter(|n| n.group == Some(r.group)).map(|n| n.name.as_str()).collect();
            json!({
                "group": r.group,
                "state": r.state,
                "down_reason": r.down_reason,
                "tp": members.len().max(1),
                "nodes": members,
                "running": r.running,
                "waiting": r.waiting,
                "kv_used_blocks": r.kv_used_blocks,
                "kv_total_blocks": r.kv_total_blocks,
                "generated_tokens": r.generated_tokens,
                "steps": r.steps,
            })
        })
        .collect();
    let nodes_json: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let tp = if n.group.is_some() { nodes.iter().filter(|m| m.group == n.group).count().max(1) } else { 0 };
            // The node's shard, recomputed from the model and the numerics exactly as the
            // registrar assigned it (the plan is a pure function of them).
            let plan = n.rank.and_then(|rank| lockstep_node::shard::ShardPlan::new(cfg, rank, tp, segments).ok());
            let shard = plan.map(|p| {
                json!({
                    "q_heads": [p.q_rows.start / p.head_dim, p.q_rows.end / p.head_dim],
                    "kv_heads": [p.kv_rows.start / p.head_dim, p.kv_rows.end / p.head_dim],
                    "mlp_segments": [p.mlp_segs.first, p.mlp_segs.first + p.mlp_segs.count],
                    "vocab_rows": [p.vocab.offset, p.vocab.offset + p.vocab.rows],
                    "reduce_segments": [p.o_segs.first, p.o_segs.first + p.o_segs.count],
                })
            });
            json!({
                "name": n.name,
                "group": n.group,
                "rank": n.rank,
                "tp": tp,
                "state": n.state,
                "ring_addr": n.ring_addr,
                "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
                "rtt_us": n.rtt_us,
                "fingerprint": n.fingerprint,
                "fingerprint_matches": n.fingerprint == info.system_fingerprint,
                "shard": shard,
                "detail": n.detail,
                "pid": n.pid,
                "session": n.session,
            })
        })
        .collect();
    let kv_used: usize = replicas.iter().map(|r| r.kv_used_blocks).sum();
    let kv_total: usize = replicas.iter().map(|r| r.kv_total_blocks).sum();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "system_fingerprint": info.system_fingerprint,
        "healthy": svc.healthy(),
        "unhealthy_reason": svc.unhealthy_reason(),
        "migrations": svc.migrations(),
        "events": svc.cluster().map(|c| c.events()).unwrap_or_default(),
        // `--membership etcd`: this coordinator's election and whether etcd answers.
        "discovery": svc.cluster().and_then(|c| c.discovery()),
        "uptime_secs": svc.uptime().as_secs_f64(),
        "now_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "model": {
            "name": info.name,
            "architecture": cfg.arch.hf_name(),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            "max_context": info.max_context,
            "dtype": cfg.torch_dtype,
        },
        "numerics": {
            "contract_version": lockstep_kernels::CONTRACT_VERSION,
            "reduce_segments": info.numerics.reduce_segments,
            "kv_chunk": info.numerics.kv_chunk,
        },
        "groups": groups,
        "nodes": nodes_json,
        "kv_cache": {
            "used_blocks": kv_used,
            "total_blocks": kv_total,
            "block_size": info.block_size,
            "usage": if kv_total == 0 { 0.0 } else { kv_used as f64 / kv_total as f64 },
        },
        "requests": {
            "running": replicas.iter().map(|r| r.running).sum::<usize>(),
            "waiting": replicas.iter().map(|r| r.waiting).sum::<usize>(),
        },
        "throughput": throughput,
        "history": history,
        "generated_tokens_total": replicas.iter().map(|r| r.generated_tokens).sum::<u64>(),
    })
}

async fn cluster(State(state): State<Arc<AppState>>) -> Response {
    Json(cluster_json(&state)).into_response()
}

async fn soak_get(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    match state.soak.lock().expect("soak lock").clone() {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::NoSoakReport),
    }
}

async fn soak_post(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Result<Response, ApiError> {
    let mut v = read_json_body(req, SOAK_MAX_BYTES, state.limits.body_timeout).await?;
    validate_soak_report(&v)?;
    let obj = v.as_object_mut().expect("validated as an object");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    obj.insert("received_unix".into(), json!(now));
    *state.soak.lock().expect("soak lock") = Some(v);
    Ok((StatusCode::OK, Json(json!({ "stored": true }))).into_response())
}

/// The soak report's schema, as far as the dashboard reads it: every field may be absent, but a
/// present one has the type `lockstep soak` writes (other fields are kept as they are).
pub fn validate_soak_report(v: &Value) -> Result<(), ApiError> {
    let Value::Object(obj) = v else {
        return Err(ApiError::InvalidJson("the soak report must be a JSON object".into()));
    };
    const NUMBERS: &[&str] = &[
        "finished_unix",
        "requests",
        "completed",
        "errors",
        "migrations",
        "max_tokens",
        "temperature",
        "logprob_bit_mismatches",
        "completion_tokens_per_s",
        "latency_p50_s",
        "latency_p99_s",
    ];
    const STRINGS: &[&str] = &["url", "model", "verdict"];
    for (k, v) in obj {
        let ok = match k.as_str() {
            k if NUMBERS.contains(&k) => v.is_number() || v.is_null(),
            k if STRINGS.contains(&k) => v.is_string() || v.is_null(),
            "seed" => v.is_u64() || v.is_null(),
            "concurrency_ramp" | "unique_completions" => {
                v.as_array().is_some_and(|a| a.iter().all(Value::is_number)) || v.is_null()
            }
            "fingerprints" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) || v.is_null(),
            _ => true,
        };
        if !ok {
            let expected = match k.as_str() {
                k if STRINGS.contains(&k) => "a string",
                "seed" => "a non-negative integer",
                "concurrency_ramp" | "unique_completions" => "a list of numbers",
                "fingerprints" => "a list of strings",
                _ => "a number",
            };
            return Err(ApiError::invalid_type(k.as_str(), expected));
        }
    }
    Ok(())
}

async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], Html(DASHBOARD_HTML))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_reports_with_a_wrong_type_are_refused() {
        assert!(validate_soak_report(&json!({"requests": 100, "unique_completions": [1], "verdict": "ok"})).is_ok());
        assert!(validate_soak_report(&json!({"pad": "anything"})).is_ok(), "unknown fields are kept");
        let e = validate_soak_report(&json!({"completion_tokens_per_s": "fast"})).unwrap_err();
        assert_eq!((e.error_type(), e.param()), ("invalid_type", Some("completion_tokens_per_s")));
        assert!(validate_soak_report(&json!({"fingerprints": [1]})).is_err());
        assert!(validate_soak_report(&json!([1, 2])).is_err());
    }

    /// The dashboard keeps every metric name it reads in one `METRICS` table; each must be a
    /// family of the exposition (the integration test checks the same against a live service).
    #[test]
    fn the_dashboard_reads_only_exported_metrics() {
        let m = metrics::Metrics::new();
        let view = metrics::ServiceView {
            model: "m".into(),
            system_fingerprint: "fp".into(),
            replicas: vec![],
            nodes: vec![],
            migrations: 0,
            reformations: 0,
            node_failures: 0,
        };
        let text = m.render_view(&view);
        let table = DASHBOARD_HTML.split("const METRICS = {").nth(1).and_then(|t| t.split("};").next()).unwrap();
        let names: Vec<&str> = table.split('"').skip(1).step_by(2).collect();
        assert!(names.len() >= 8, "{names:?}");
        for n in names {
            assert!(text.contains(&format!("# TYPE {n} ")), "the dashboard reads {n}, which is not exported");
        }
        // And no metric name appears in the page outside that table.
        let outside = DASHBOARD_HTML.replace(table, "");
        assert!(!outside.contains("lockstep_"), "metric names belong in the METRICS table");
    }
}
