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
//! `Authorization: Bearer KEY` or as HTTP Basic credentials with the key as password. Basic is
//! there for people: a browser opening `/dashboard` gets a `WWW-Authenticate: Basic` challenge,
//! asks once, and then sends the same credentials on the page's own polling requests. Opened as
//! `http://ops:KEY@host/dashboard` (scripts, kiosks), the page itself sends the key it was opened
//! with. A refusal is a 401 with an OpenAI-style error body.
//!
//! The dashboard reads `/metrics` itself (and the JSON routes) rather than a private stats route,
//! so what operators see is exactly what Prometheus scrapes; a test checks that every metric name
//! the page reads is exported.

pub mod canary;
pub mod metrics;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

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

/// Proof that the request carries an ops key (or that none is configured).
pub struct OpsAuth;

impl FromRequestParts<Arc<AppState>> for OpsAuth {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        if authorized(&parts.headers, &state.auth.ops_keys) {
            Ok(OpsAuth)
        } else {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "Incorrect or missing ops key: send `Authorization: Bearer KEY`.",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"lockstep ops\", charset=\"UTF-8\""),
            );
            Err(r)
        }
    }
}

/// True when `keys` is empty, or the request presents one of them as a bearer token or as the
/// password of Basic credentials.
pub fn authorized(headers: &HeaderMap, keys: &[String]) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let presented = if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        match base64_decode(rest.trim()) {
            Some(creds) => match creds.iter().position(|&b| b == b':') {
                Some(i) => creds[i + 1..].to_vec(),
                None => creds,
            },
            None => return false,
        }
    } else {
        return false;
    };
    // Compare against every key in full so timing says nothing about which prefix matched.
    keys.iter().fold(false, |ok, k| ok | constant_time_eq(k.as_bytes(), &presented))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 with optional padding (all Basic credentials need).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// An OpenAI-style error response.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = if status == StatusCode::UNAUTHORIZED { "authentication_error" } else { "invalid_request_error" };
    (status, Json(json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })))
        .into_response()
}

async fn metrics_text(_: OpsAuth, State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.service);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn canary_status(_: OpsAuth, State(state): State<Arc<AppState>>) -> Response {
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

async fn cluster(_: OpsAuth, State(state): State<Arc<AppState>>) -> Response {
    Json(cluster_json(&state)).into_response()
}

async fn soak_get(_: OpsAuth, State(state): State<Arc<AppState>>) -> Response {
    match state.soak.lock().expect("soak lock").clone() {
        Some(v) => Json(v).into_response(),
        None => {
            error(StatusCode::NOT_FOUND, "no_soak_report", "No soak report has been posted yet (run `lockstep soak`).")
        }
    }
}

async fn soak_post(_: OpsAuth, State(state): State<Arc<AppState>>, body: Body) -> Response {
    let bytes = match axum::body::to_bytes(body, SOAK_MAX_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("A soak report may be at most {SOAK_MAX_BYTES} bytes."),
            )
        }
    };
    let mut v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", &format!("The soak report is not JSON: {e}")),
    };
    let Some(obj) = v.as_object_mut() else {
        return error(StatusCode::BAD_REQUEST, "invalid_type", "The soak report must be a JSON object.");
    };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    obj.insert("received_unix".into(), json!(now));
    *state.soak.lock().expect("soak lock") = Some(v);
    (StatusCode::OK, Json(json!({ "stored": true }))).into_response()
}

async fn dashboard(_: OpsAuth) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], Html(DASHBOARD_HTML))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn ops_keys_are_accepted_as_bearer_or_basic_password() {
        let keys = vec!["s3cret".to_string(), "other".to_string()];
        assert!(authorized(&HeaderMap::new(), &[]), "no keys configured: open");
        assert!(!authorized(&HeaderMap::new(), &keys));
        assert!(authorized(&headers("Bearer s3cret"), &keys));
        assert!(authorized(&headers("bearer other"), &keys));
        assert!(!authorized(&headers("Bearer s3cre"), &keys));
        // "ops:s3cret" and "s3cret" (no user part).
        assert!(authorized(&headers("Basic b3BzOnMzY3JldA=="), &keys));
        assert!(authorized(&headers("Basic czNjcmV0"), &keys));
        assert!(!authorized(&headers("Basic b3BzOndyb25n"), &keys)); // ops:wrong
        assert!(!authorized(&headers("Basic !!!"), &keys));
        assert!(!authorized(&headers("Token s3cret"), &keys));
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

    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(base64_decode("b3BzOnMzY3JldA==").unwrap(), b"ops:s3cret");
        assert_eq!(base64_decode("b3BzOnMzY3JldA").unwrap(), b"ops:s3cret");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("YQ").unwrap(), b"a");
        assert!(base64_decode("Y").is_none());
    }
}
