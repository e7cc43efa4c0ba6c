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
//!
//! The lock-free building blocks (histograms, the per-second ring) are in `types`, the
//! Prometheus text exposition in `render`; this module is the registry the engines write to.

mod render;
mod types;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::scheduler::FinishReason;
use crate::service::{Service, ServiceObserver};

pub use render::ServiceView;
pub use types::{Histogram, HistogramSnapshot};
use types::{SecondRing, RING_SECS};

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
}
