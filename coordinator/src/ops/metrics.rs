//! Prometheus metrics.
//!
//! [`Metrics`] is the [`ServiceObserver`] of the serving core: engine threads call its hooks on
//! every token, so every hot-path update is a relaxed atomic (counters, histogram buckets, the
//! per-second throughput ring). Nothing an engine thread touches takes a lock; the only mutex
//! guards the `error_type` → count map, which is written on errors only.
//!
//! Names keep **vLLM's meanings** under a `lockstep_` prefix (`vllm:num_requests_running` is
//! `lockstep_num_requests_running`, and so on), so existing vLLM dashboards and alerts port by a
//! rename. Prometheus reserves `:` for recording rules, hence the underscore. Gauges that describe
//! the present (running, waiting, KV blocks, nodes) are not kept here at all: [`Metrics::render`]
//! reads them from [`Service::replicas`] and [`Service::nodes`] at scrape time, so they can never
//! drift from what the engines report.
//!
//! Histogram buckets are fixed at compile time. They follow vLLM's bounds extended downwards,
//! because a CPU cluster serving a small model answers in milliseconds, not seconds.
//!
//! Tokens per second for the ops API come from a ring of per-second slots filled by
//! [`ServiceObserver::on_generation_tokens`]; each slot packs (second, count) into one `AtomicU64`
//! so a slot is reset and incremented by one compare-and-swap, never a lock.
//!
//! The dashboard's charts need the recent past of the gauges and of the latency quantiles, not
//! just the present: [`Metrics::record`] keeps one sample per second (load, and a snapshot of the
//! histograms) for two minutes, and [`Metrics::history`] turns it into points with quantiles
//! over a sliding window — PromQL's `histogram_quantile(rate(...[30s]))`, computed server-side.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cluster::NodeStatus;
use crate::scheduler::FinishReason;
use crate::service::{ReplicaStatus, Service, ServiceObserver};

/// Time to first token, seconds (vLLM's bounds with finer steps below 10 ms).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];
/// Gap between two tokens of one sequence, seconds.
pub const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
];
/// Whole-request latency and queue time, seconds.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// Every `finished_reason` label value ([`FinishReason::as_str`]), exported at 0 from the start
/// so that `rate()` and the dashboard see a series before the first such finish.
pub const FINISH_REASONS: &[&str] = &["stop", "eos", "length", "abort", "error"];

/// Error types the serving core and API report, pre-seeded at 0 for the same reason. Others are
/// added when first seen.
pub const KNOWN_ERROR_TYPES: &[&str] = &["overloaded", "unavailable", "replica_down", "engine"];

/// Node and replica states, pre-seeded at 0.
const STATES: &[&str] = &["ready", "down"];

/// Per-second slots kept for throughput (a little over two minutes of history).
const RING_SECS: usize = 128;

/// A Prometheus histogram with fixed upper bounds (`le`), lock-free.
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, *not* cumulative (the last one is `+Inf`); cumulated at render.
    counts: Box<[AtomicU64]>,
    /// The sum as `f64` bits, updated by compare-and-swap.
    sum_bits: AtomicU64,
}

/// A consistent-enough copy of a histogram: cumulative counts read once, so `_count` always
/// equals the `+Inf` bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Cumulative: `cumulative[i]` observations were `<= bounds[i]`; the last entry is `+Inf`.
    pub cumulative: Vec<u64>,
    pub sum: f64,
}

impl HistogramSnapshot {
    /// The observations made since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative: self
                .cumulative
                .iter()
                .zip(earlier.cumulative.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum: self.sum - earlier.sum,
        }
    }

    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The `q` quantile by linear interpolation inside the bucket, like PromQL's
    /// `histogram_quantile` (the dashboard does the same over windowed deltas). `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let i = self.cumulative.iter().position(|&c| c as f64 >= rank)?;
        if i >= self.bounds.len() {
            // In the +Inf bucket: the best honest answer is the highest finite bound.
            return self.bounds.last().copied();
        }
        let (lo, below) = if i == 0 { (0.0, 0) } else { (self.bounds[i - 1], self.cumulative[i - 1]) };
        let in_bucket = self.cumulative[i] - below;
        let frac = if in_bucket == 0 { 1.0 } else { (rank - below as f64) / in_bucket as f64 };
        Some(lo + (self.bounds[i] - lo) * frac)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds must increase");
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        // Bucket `le` semantics: the first bound with v <= bound.
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.sum_bits.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0u64;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                acc += c.load(Ordering::Relaxed);
                acc
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative,
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

/// Counts per second over the last [`RING_SECS`] seconds. Slot `s % RING_SECS` holds
/// `(s << 32) | count` for second `s` since the ring was made.
struct SecondRing {
    slots: Box<[AtomicU64]>,
}

impl SecondRing {
    fn new() -> Self {
        SecondRing { slots: (0..RING_SECS).map(|_| AtomicU64::new(u64::MAX)).collect() }
    }

    fn add(&self, sec: u64, n: u64) {
        let slot = &self.slots[(sec % RING_SECS as u64) as usize];
        let tag = sec & 0xffff_ffff;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == tag && cur != u64::MAX {
                cur + n.min(0xffff_ffff - (cur & 0xffff_ffff))
            } else {
                (tag << 32) | n.min(0xffff_ffff)
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn get(&self, sec: u64) -> u64 {
        let v = self.slots[(sec % RING_SECS as u64) as usize].load(Ordering::Relaxed);
        if v != u64::MAX && v >> 32 == sec & 0xffff_ffff {
            v & 0xffff_ffff
        } else {
            0
        }
    }
}

/// Tokens and finished requests per second, for the ops API and the dashboard's charts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Throughput {
    /// Generated tokens per second over the last `window_secs` complete seconds.
    pub tokens_per_sec: f64,
    /// Finished requests per second over the same window.
    pub requests_per_sec: f64,
    pub window_secs: u64,
    /// One point per complete second, oldest first.
    pub history: Vec<ThroughputPoint>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputPoint {
    pub unix: u64,
    pub tokens: u64,
    pub requests: u64,
}

/// One second's sample of the present state.
struct Tick {
    sec: u64,
    unix: f64,
    running: usize,
    waiting: usize,
    kv_usage: f64,
    ttft: HistogramSnapshot,
    itl: HistogramSnapshot,
    e2e: HistogramSnapshot,
}

/// A point of the dashboard's charts: load at that second, and latency quantiles over the
/// window before it (`None` where nothing was observed in the window).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryPoint {
    pub unix: f64,
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub ttft_p50: Option<f64>,
    pub ttft_p95: Option<f64>,
    pub itl_p50: Option<f64>,
    pub itl_p95: Option<f64>,
    pub e2e_p50: Option<f64>,
}

/// What [`Metrics::render`] reads from the service, so rendering can be tested without a model.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub model: String,
    pub system_fingerprint: String,
    pub replicas: Vec<ReplicaStatus>,
    pub nodes: Vec<NodeStatus>,
}

impl ServiceView {
    pub fn of(service: &Service) -> Self {
        ServiceView {
            model: service.info().name.clone(),
            system_fingerprint: service.info().system_fingerprint.clone(),
            replicas: service.replicas(),
            nodes: service.nodes(),
        }
    }
}

/// The result of one determinism-canary check, as counted by the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryResult {
    Match,
    Mismatch,
    /// The check could not run (overloaded, no replica, the request failed): not a verdict on
    /// determinism either way.
    Error,
}

impl CanaryResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CanaryResult::Match => "match",
            CanaryResult::Mismatch => "mismatch",
            CanaryResult::Error => "error",
        }
    }
}

/// Every counter and histogram of a coordinator.
pub struct Metrics {
    created: Instant,
    created_unix: f64,
    admitted: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    /// Indexed like [`FINISH_REASONS`].
    finished: [AtomicU64; 5],
    /// Rare: a lock here costs nothing, and error types are open-ended strings.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Indexed by [`CanaryResult`] as `match`, `mismatch`, `error`.
    canary_checks: [AtomicU64; 3],
    /// f64 bits; 0 until the first check.
    canary_last_check_bits: AtomicU64,
    canary_last_batch_running: AtomicU64,
    tokens_ring: SecondRing,
    /// One sample per second of the present state, for the charts (see [`Metrics::record`]).
    ticks: Mutex<VecDeque<Tick>>,
    requests_ring: SecondRing,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            created: Instant::now(),
            created_unix: unix_now(),
            admitted: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_BUCKETS),
            queue: Histogram::new(REQUEST_BUCKETS),
            finished: Default::default(),
            errors: Mutex::new(KNOWN_ERROR_TYPES.iter().map(|t| (t.to_string(), 0)).collect()),
            canary_checks: Default::default(),
            canary_last_check_bits: AtomicU64::new(0f64.to_bits()),
            canary_last_batch_running: AtomicU64::new(0),
            tokens_ring: SecondRing::new(),
            requests_ring: SecondRing::new(),
            ticks: Mutex::new(VecDeque::new()),
        }
    }

    fn second(&self) -> u64 {
        self.created.elapsed().as_secs()
    }

    /// Count an error the serving core did not see (e.g. a request the HTTP layer refused).
    pub fn record_error(&self, error_type: &str) {
        *self.errors.lock().expect("metrics lock").entry(error_type.to_string()).or_insert(0) += 1;
    }

    /// Record one determinism-canary check.
    pub fn record_canary(&self, result: CanaryResult, unix: f64, batch_running: usize) {
        let i = match result {
            CanaryResult::Match => 0,
            CanaryResult::Mismatch => 1,
            CanaryResult::Error => 2,
        };
        self.canary_checks[i].fetch_add(1, Ordering::Relaxed);
        self.canary_last_check_bits.store(unix.to_bits(), Ordering::Relaxed);
        self.canary_last_batch_running.store(batch_running as u64, Ordering::Relaxed);
    }

    pub fn generation_tokens_total(&self) -> u64 {
        self.generation_tokens.load(Ordering::Relaxed)
    }
    pub fn prompt_tokens_total(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    pub fn requests_finished_total(&self) -> u64 {
        self.finished.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().expect("metrics lock").clone()
    }
    pub fn time_to_first_token(&self) -> HistogramSnapshot {
        self.ttft.snapshot()
    }
    pub fn inter_token_latency(&self) -> HistogramSnapshot {
        self.itl.snapshot()
    }
    pub fn e2e_request_latency(&self) -> HistogramSnapshot {
        self.e2e.snapshot()
    }
    pub fn request_queue_time(&self) -> HistogramSnapshot {
        self.queue.snapshot()
    }

    /// Throughput over the last `window_secs` complete seconds plus `history_secs` of history
    /// (both capped by the ring).
    pub fn throughput(&self, window_secs: u64, history_secs: u64) -> Throughput {
        let now = self.second();
        let now_unix = unix_now().floor() as u64;
        // Only complete seconds: the current one is still filling and would read low.
        let complete = now; // seconds 0..now are complete
        let window = window_secs.clamp(1, RING_SECS as u64 - 2).min(complete.max(1));
        let first = complete.saturating_sub(window);
        let (mut tokens, mut requests) = (0, 0);
        for s in first..complete {
            tokens += self.tokens_ring.get(s);
            requests += self.requests_ring.get(s);
        }
        let span = (complete - first).max(1) as f64;
        let history_len = history_secs.min(RING_SECS as u64 - 2).min(complete);
        let history = (complete - history_len..complete)
            .map(|s| ThroughputPoint {
                unix: now_unix - (now - s),
                tokens: self.tokens_ring.get(s),
                requests: self.requests_ring.get(s),
            })
            .collect();
        Throughput {
            tokens_per_sec: tokens as f64 / span,
            requests_per_sec: requests as f64 / span,
            window_secs: complete - first,
            history,
        }
    }

    /// Take this second's sample of the present state (idempotent within a second). The canary
    /// thread calls it several times a second, and so does every `/metrics` or `/ops/cluster`
    /// request, so a dashboard opened now already shows the last two minutes.
    pub fn record(&self, service: &Service) {
        let sec = self.second();
        if self.ticks.lock().expect("metrics lock").back().is_some_and(|t| t.sec == sec) {
            return;
        }
        let replicas = service.replicas();
        let kv_total: usize = replicas.iter().map(|r| r.kv_total_blocks).sum();
        let kv_used: usize = replicas.iter().map(|r| r.kv_used_blocks).sum();
        let tick = Tick {
            sec,
            unix: unix_now(),
            running: replicas.iter().map(|r| r.running).sum(),
            waiting: replicas.iter().map(|r| r.waiting).sum(),
            kv_usage: if kv_total == 0 { 0.0 } else { kv_used as f64 / kv_total as f64 },
            ttft: self.ttft.snapshot(),
            itl: self.itl.snapshot(),
            e2e: self.e2e.snapshot(),
        };
        let mut ticks = self.ticks.lock().expect("metrics lock");
        if ticks.back().is_some_and(|t| t.sec == sec) {
            return; // another caller won the race for this second
        }
        ticks.push_back(tick);
        while ticks.len() > RING_SECS {
            ticks.pop_front();
        }
    }

    /// The recorded samples of the last `secs` seconds, oldest first, with latency quantiles
    /// over the `window_secs` before each sample.
    pub fn history(&self, secs: u64, window_secs: u64) -> Vec<HistoryPoint> {
        let ticks = self.ticks.lock().expect("metrics lock");
        let Some(last) = ticks.back().map(|t| t.sec) else { return Vec::new() };
        let q = |now: &HistogramSnapshot, then: Option<&HistogramSnapshot>, q: f64| match then {
            Some(then) => now.since(then).quantile(q),
            None => None,
        };
        ticks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.sec + secs > last)
            .map(|(i, t)| {
                // The oldest sample inside the window (not this one) is the baseline.
                let base = ticks.iter().take(i).find(|b| b.sec + window_secs >= t.sec);
                HistoryPoint {
                    unix: t.unix,
                    running: t.running,
                    waiting: t.waiting,
                    kv_usage: t.kv_usage,
                    ttft_p50: q(&t.ttft, base.map(|b| &b.ttft), 0.5),
                    ttft_p95: q(&t.ttft, base.map(|b| &b.ttft), 0.95),
                    itl_p50: q(&t.itl, base.map(|b| &b.itl), 0.5),
                    itl_p95: q(&t.itl, base.map(|b| &b.itl), 0.95),
                    e2e_p50: q(&t.e2e, base.map(|b| &b.e2e), 0.5),
                }
            })
            .collect()
    }

    /// The Prometheus text exposition (format 0.0.4) of everything, reading the present state
    /// (running, waiting, KV, nodes) from `service`.
    pub fn render(&self, service: &Service) -> String {
        self.record(service);
        self.render_view(&ServiceView::of(service))
    }

    pub fn render_view(&self, v: &ServiceView) -> String {
        let mut out = String::with_capacity(16 << 10);
        let w = &mut out;

        header(
            w,
            "lockstep_build_info",
            "gauge",
            "Build and deployment: 1, labelled with the version, model and determinism fingerprint.",
        );
        sample(
            w,
            "lockstep_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("model_name", &v.model),
                ("system_fingerprint", &v.system_fingerprint),
            ],
            1.0,
        );
        header(
            w,
            "lockstep_start_time_seconds",
            "gauge",
            "When the coordinator's metrics started, in seconds since the Unix epoch.",
        );
        sample(w, "lockstep_start_time_seconds", &[], self.created_unix);

        // The present, from the engines.
        let running: usize = v.replicas.iter().map(|r| r.running).sum();
        let waiting: usize = v.replicas.iter().map(|r| r.waiting).sum();
        let kv_used: usize = v.replicas.iter().map(|r| r.kv_used_blocks).sum();
        let kv_total: usize = v.replicas.iter().map(|r| r.kv_total_blocks).sum();
        let steps: u64 = v.replicas.iter().map(|r| r.steps).sum();
        header(w, "lockstep_num_requests_running", "gauge", "Number of requests in model execution batches.");
        sample(w, "lockstep_num_requests_running", &[], running as f64);
        header(w, "lockstep_num_requests_waiting", "gauge", "Number of requests waiting to be processed.");
        sample(w, "lockstep_num_requests_waiting", &[], waiting as f64);
        header(w, "lockstep_kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.");
        sample(
            w,
            "lockstep_kv_cache_usage_perc",
            &[],
            if kv_total == 0 { 0.0 } else { kv_used as f64 / kv_total as f64 },
        );
        header(w, "lockstep_kv_cache_used_blocks", "gauge", "KV-cache blocks in use, all replicas.");
        sample(w, "lockstep_kv_cache_used_blocks", &[], kv_used as f64);
        header(w, "lockstep_kv_cache_capacity_blocks", "gauge", "KV-cache blocks in all, all replicas.");
        sample(w, "lockstep_kv_cache_capacity_blocks", &[], kv_total as f64);
        header(w, "lockstep_engine_steps_total", "counter", "Engine steps executed, all replicas.");
        sample(w, "lockstep_engine_steps_total", &[], steps as f64);

        header(w, "lockstep_replicas", "gauge", "Replicas (tensor-parallel groups) by state.");
        for s in states(v.replicas.iter().map(|r| r.state)) {
            let n = v.replicas.iter().filter(|r| r.state == s).count();
            sample(w, "lockstep_replicas", &[("state", s.as_str())], n as f64);
        }
        header(w, "lockstep_nodes", "gauge", "Node processes by state.");
        for s in states(v.nodes.iter().map(|n| n.state.as_str())) {
            let n = v.nodes.iter().filter(|n| n.state == s).count();
            sample(w, "lockstep_nodes", &[("state", s.as_str())], n as f64);
        }
        header(w, "lockstep_node_heartbeat_age_seconds", "gauge", "Seconds since each node last answered a heartbeat.");
        for n in &v.nodes {
            if let Some(ms) = n.last_heartbeat_ms_ago {
                let (g, r) = (n.group.to_string(), n.rank.to_string());
                sample(
                    w,
                    "lockstep_node_heartbeat_age_seconds",
                    &[("node", &n.name), ("group", &g), ("rank", &r)],
                    ms as f64 / 1e3,
                );
            }
        }
        header(w, "lockstep_node_rtt_seconds", "gauge", "QUIC round-trip time to each node, seconds.");
        for n in &v.nodes {
            let (g, r) = (n.group.to_string(), n.rank.to_string());
            sample(
                w,
                "lockstep_node_rtt_seconds",
                &[("node", &n.name), ("group", &g), ("rank", &r)],
                n.rtt_us as f64 / 1e6,
            );
        }

        // Counters since start.
        header(w, "lockstep_requests_admitted_total", "counter", "Requests accepted into the serving queue.");
        sample(w, "lockstep_requests_admitted_total", &[], self.admitted.load(Ordering::Relaxed) as f64);
        header(w, "lockstep_prompt_tokens_total", "counter", "Number of prefill tokens processed.");
        sample(w, "lockstep_prompt_tokens_total", &[], self.prompt_tokens_total() as f64);
        header(w, "lockstep_generation_tokens_total", "counter", "Number of generation tokens processed.");
        sample(w, "lockstep_generation_tokens_total", &[], self.generation_tokens_total() as f64);
        header(w, "lockstep_request_success_total", "counter", "Count of finished requests, by finish reason.");
        for (i, r) in FINISH_REASONS.iter().enumerate() {
            sample(
                w,
                "lockstep_request_success_total",
                &[("finished_reason", r)],
                self.finished[i].load(Ordering::Relaxed) as f64,
            );
        }
        header(w, "lockstep_request_errors_total", "counter", "Count of request errors, by error type.");
        for (t, n) in self.errors() {
            sample(w, "lockstep_request_errors_total", &[("error_type", t.as_str())], n as f64);
        }

        histogram(
            w,
            "lockstep_time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &self.ttft.snapshot(),
        );
        histogram(
            w,
            "lockstep_inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &self.itl.snapshot(),
        );
        histogram(
            w,
            "lockstep_e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            &self.e2e.snapshot(),
        );
        histogram(
            w,
            "lockstep_request_queue_time_seconds",
            "Histogram of time spent waiting in the queue in seconds.",
            &self.queue.snapshot(),
        );

        header(
            w,
            "lockstep_canary_checks_total",
            "counter",
            "Determinism canary checks: the fixed request in the live batch against its reference bits.",
        );
        for (i, r) in ["match", "mismatch", "error"].iter().enumerate() {
            sample(
                w,
                "lockstep_canary_checks_total",
                &[("result", r)],
                self.canary_checks[i].load(Ordering::Relaxed) as f64,
            );
        }
        header(
            w,
            "lockstep_canary_last_check_timestamp_seconds",
            "gauge",
            "When the canary last ran, in seconds since the Unix epoch (0: never).",
        );
        sample(
            w,
            "lockstep_canary_last_check_timestamp_seconds",
            &[],
            f64::from_bits(self.canary_last_check_bits.load(Ordering::Relaxed)),
        );
        header(
            w,
            "lockstep_canary_last_batch_running",
            "gauge",
            "Sequences running (all replicas) while the last canary check ran.",
        );
        sample(
            w,
            "lockstep_canary_last_batch_running",
            &[],
            self.canary_last_batch_running.load(Ordering::Relaxed) as f64,
        );
        out
    }
}

/// The states to export: the usual ones (so their series exist at 0) plus any other seen.
fn states<'a>(seen: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = STATES.iter().map(|s| s.to_string()).collect();
    for s in seen {
        if !v.iter().any(|x| x == s) {
            v.push(s.to_string());
        }
    }
    v
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    // HELP text escapes only backslash and newline.
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(w: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    w.push_str(name);
    if !labels.is_empty() {
        w.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                w.push(',');
            }
            let _ = write!(w, "{k}=\"{}\"", escape_label(v));
        }
        w.push('}');
    }
    w.push(' ');
    w.push_str(&format_value(value));
    w.push('\n');
}

fn histogram(w: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    header(w, name, "histogram", help);
    let bucket = format!("{name}_bucket");
    for (i, c) in h.cumulative.iter().enumerate() {
        let le = h.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| format_value(*b));
        sample(w, &bucket, &[("le", &le)], *c as f64);
    }
    sample(w, &format!("{name}_sum"), &[], h.sum);
    sample(w, &format!("{name}_count"), &[], h.count() as f64);
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Go's `strconv.FormatFloat(v, 'g', -1, 64)` spirit: integers without a fraction, the shortest
/// round-trip form otherwise, and Prometheus' spellings of the specials.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl ServiceObserver for Metrics {
    fn on_admitted(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }
    fn on_queue_time(&self, secs: f64) {
        self.queue.observe(secs);
    }
    fn on_first_token(&self, ttft_secs: f64) {
        self.ttft.observe(ttft_secs);
    }
    fn on_inter_token(&self, secs: f64) {
        self.itl.observe(secs);
    }
    fn on_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn on_generation_tokens(&self, n: usize) {
        self.generation_tokens.fetch_add(n as u64, Ordering::Relaxed);
        self.tokens_ring.add(self.second(), n as u64);
    }
    fn on_finished(&self, reason: &FinishReason, e2e_secs: f64) {
        let i = FINISH_REASONS.iter().position(|r| *r == reason.as_str()).unwrap_or(FINISH_REASONS.len() - 1);
        self.finished[i].fetch_add(1, Ordering::Relaxed);
        self.e2e.observe(e2e_secs);
        self.requests_ring.add(self.second(), 1);
    }
    fn on_error(&self, error_type: &str) {
        self.record_error(error_type);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ServiceView {
        ServiceView {
            model: "stories\"260K\"".into(),
            system_fingerprint: "fp_test".into(),
            replicas: vec![ReplicaStatus {
                group: 0,
                state: "ready",
                down_reason: None,
                running: 3,
                waiting: 2,
                kv_used_blocks: 10,
                kv_total_blocks: 40,
                generated_tokens: 100,
                steps: 7,
            }],
            nodes: vec![NodeStatus {
                name: "node-0".into(),
                group: 0,
                rank: 0,
                ring_addr: "127.0.0.1:1".into(),
                state: "ready".into(),
                last_heartbeat_ms_ago: Some(250),
                rtt_us: 120,
                fingerprint: "fp_test".into(),
            }],
        }
    }

    /// Parse the exposition strictly enough to catch format mistakes: every sample belongs to a
    /// family declared by HELP then TYPE, names and label syntax are valid, values parse.
    pub(crate) fn parse(text: &str) -> BTreeMap<String, (String, Vec<(String, f64)>)> {
        let mut families: BTreeMap<String, (String, Vec<(String, f64)>)> = BTreeMap::new();
        let mut help_for: Option<String> = None;
        let mut current: Option<(String, String)> = None;
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(valid_name(name), "bad name {name}");
                assert!(!families.contains_key(name), "family {name} declared twice");
                help_for = Some(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                assert_eq!(help_for.take().as_deref(), Some(name), "TYPE {name} must follow its HELP");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{kind}");
                families.insert(name.into(), (kind.into(), vec![]));
                current = Some((name.into(), kind.into()));
            } else {
                let (series, value) = line.rsplit_once(' ').expect("sample line");
                let value: f64 = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
                };
                let name = series.split('{').next().unwrap();
                let (family, kind) = current.clone().expect("sample before TYPE");
                let ok = match kind.as_str() {
                    "histogram" => [format!("{family}_bucket"), format!("{family}_sum"), format!("{family}_count")]
                        .contains(&name.to_string()),
                    "counter" => name == family && family.ends_with("_total"),
                    _ => name == family,
                };
                assert!(ok, "sample {name} does not belong to {kind} {family}");
                if let Some(l) = series.strip_prefix(name) {
                    if !l.is_empty() {
                        assert!(l.starts_with('{') && l.ends_with('}'), "labels in {line}");
                    }
                }
                families.get_mut(&family).unwrap().1.push((series.to_string(), value));
            }
        }
        families
    }

    #[test]
    fn exposition_is_valid_and_histograms_are_cumulative() {
        let m = Metrics::new();
        for v in [0.0004, 0.003, 0.003, 0.2, 5000.0] {
            m.on_first_token(v);
        }
        m.on_finished(&FinishReason::Length, 0.5);
        m.on_error("prompt_too_long");
        let text = m.render_view(&view());
        let fams = parse(&text);
        for name in [
            "lockstep_num_requests_running",
            "lockstep_num_requests_waiting",
            "lockstep_kv_cache_usage_perc",
            "lockstep_prompt_tokens_total",
            "lockstep_generation_tokens_total",
            "lockstep_time_to_first_token_seconds",
            "lockstep_inter_token_latency_seconds",
            "lockstep_e2e_request_latency_seconds",
            "lockstep_request_queue_time_seconds",
            "lockstep_request_success_total",
            "lockstep_request_errors_total",
            "lockstep_canary_checks_total",
            "lockstep_canary_last_check_timestamp_seconds",
            "lockstep_nodes",
            "lockstep_build_info",
        ] {
            assert!(fams.contains_key(name), "{name} missing from\n{text}");
        }
        for (name, (kind, samples)) in &fams {
            if kind != "histogram" {
                continue;
            }
            let buckets: Vec<f64> = samples.iter().filter(|(s, _)| s.contains("_bucket{")).map(|(_, v)| *v).collect();
            assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{name} buckets not cumulative");
            let inf = samples.iter().find(|(s, _)| s.contains("le=\"+Inf\"")).expect("+Inf bucket").1;
            let count = samples.iter().find(|(s, _)| s.ends_with("_count")).expect("_count").1;
            assert_eq!(inf, count, "{name}: +Inf bucket must equal _count");
            assert!(samples.iter().any(|(s, _)| s.ends_with("_sum")), "{name}: _sum");
        }
        assert!(text.contains("lockstep_time_to_first_token_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("lockstep_time_to_first_token_seconds_bucket{le=\"0.005\"} 3\n"));
        assert!(text.contains("lockstep_time_to_first_token_seconds_bucket{le=\"2560\"} 4\n"));
        assert!(text.contains("lockstep_time_to_first_token_seconds_count 5\n"));
        assert!(text.contains("lockstep_num_requests_running 3\n"));
        assert!(text.contains("lockstep_kv_cache_usage_perc 0.25\n"));
        assert!(text.contains("lockstep_request_success_total{finished_reason=\"length\"} 1\n"));
        assert!(text.contains("lockstep_request_success_total{finished_reason=\"stop\"} 0\n"));
        assert!(text.contains("lockstep_request_errors_total{error_type=\"prompt_too_long\"} 1\n"));
        assert!(text.contains("lockstep_request_errors_total{error_type=\"overloaded\"} 0\n"));
        assert!(text.contains("lockstep_nodes{state=\"ready\"} 1\n"));
        assert!(text.contains("lockstep_nodes{state=\"down\"} 0\n"));
        assert!(text.contains("model_name=\"stories\\\"260K\\\"\""), "label values are escaped");
        assert!(text.contains("lockstep_node_rtt_seconds{node=\"node-0\",group=\"0\",rank=\"0\"} 0.00012\n"));
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        assert_eq!(h.snapshot().quantile(0.5), None);
        for v in [0.5, 1.5, 1.5, 3.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![1, 3, 4, 4]);
        assert_eq!(s.sum, 6.5);
        // Rank 2 of 4 lies halfway through the (1, 2] bucket.
        assert_eq!(s.quantile(0.5), Some(1.5));
        assert_eq!(s.quantile(1.0), Some(4.0));
        h.observe(100.0);
        assert_eq!(h.snapshot().quantile(1.0), Some(4.0), "+Inf bucket reports the highest finite bound");
    }

    #[test]
    fn throughput_counts_complete_seconds_only() {
        let m = Metrics::new();
        let ring = &m.tokens_ring;
        ring.add(3, 10);
        ring.add(3, 5);
        ring.add(3 + RING_SECS as u64, 1); // the same slot, a later lap: resets it
        assert_eq!(ring.get(3), 0);
        assert_eq!(ring.get(3 + RING_SECS as u64), 1);
        m.on_generation_tokens(7);
        // The current second is incomplete, so it is not in the window yet.
        let t = m.throughput(5, 60);
        assert!(t.history.iter().all(|p| p.tokens == 0));
        assert_eq!(m.generation_tokens_total(), 7);
    }

    #[test]
    fn history_quantiles_cover_the_window_before_each_point() {
        let m = Metrics::new();
        let snap = |h: &Histogram| h.snapshot();
        let tick = |sec: u64, m: &Metrics| Tick {
            sec,
            unix: 1000.0 + sec as f64,
            running: sec as usize,
            waiting: 0,
            kv_usage: 0.5,
            ttft: snap(&m.ttft),
            itl: snap(&m.itl),
            e2e: snap(&m.e2e),
        };
        m.ticks.lock().unwrap().push_back(tick(0, &m));
        for _ in 0..10 {
            m.on_first_token(0.3); // before second 1: in (0.25, 0.5]
        }
        m.ticks.lock().unwrap().push_back(tick(1, &m));
        for _ in 0..10 {
            m.on_first_token(0.003); // in (0.0025, 0.005]
        }
        m.ticks.lock().unwrap().push_back(tick(40, &m));
        let h = m.history(120, 30);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].ttft_p50, None, "no baseline before the first sample");
        assert!((0.25..=0.5).contains(&h[1].ttft_p50.unwrap()), "{:?}", h[1]);
        // Second 40's window starts after second 1's sample: only the fast ones count... but no
        // sample lies inside (10, 40), so there is no baseline and no quantile.
        assert_eq!(h[2].ttft_p50, None);
        m.ticks.lock().unwrap().push_back(tick(41, &m));
        let h = m.history(120, 30);
        assert_eq!(h[3].ttft_p50, None, "nothing observed between 40 and 41");
        assert_eq!(h[3].running, 41);
        assert_eq!(m.history(1, 30).len(), 1, "only the last `secs` seconds");
    }

    #[test]
    fn values_format_like_prometheus() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
