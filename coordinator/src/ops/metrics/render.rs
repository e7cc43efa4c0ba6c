//! The Prometheus text exposition (format 0.0.4) of a [`Metrics`]: counters and histograms as
//! recorded, gauges of the present read from the service at scrape time. Series with a known set
//! of label values (finish reasons, error types, states) are written at 0 from the start, so
//! `rate()` and alerts see them before the first event.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{HistogramSnapshot, Metrics, FINISH_REASONS};
use crate::cluster::NodeStatus;
use crate::service::{ReplicaStatus, Service};

/// Node and replica states, pre-seeded at 0.
const STATES: &[&str] = &["ready", "down"];

/// What [`Metrics::render`] reads from the service, so rendering can be tested without a model.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub model: String,
    pub system_fingerprint: String,
    pub replicas: Vec<ReplicaStatus>,
    pub nodes: Vec<NodeStatus>,
    /// Requests moved to another replica after theirs failed.
    pub migrations: u64,
    /// Groups that stopped serving and were re-formed (0 without a cluster).
    pub reformations: u64,
    /// Node sessions lost (0 without a cluster).
    pub node_failures: u64,
}

impl ServiceView {
    pub fn of(service: &Service) -> Self {
        ServiceView {
            model: service.info().name.clone(),
            system_fingerprint: service.info().system_fingerprint.clone(),
            replicas: service.replicas(),
            nodes: service.nodes(),
            migrations: service.migrations(),
            reformations: service.cluster().map_or(0, |c| c.counters().reformations.load(Ordering::Relaxed)),
            node_failures: service.cluster().map_or(0, |c| c.counters().node_failures.load(Ordering::Relaxed)),
        }
    }
}

impl Metrics {
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
                let (g, r) = (opt_label(n.group), opt_label(n.rank));
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
            let (g, r) = (opt_label(n.group), opt_label(n.rank));
            sample(
                w,
                "lockstep_node_rtt_seconds",
                &[("node", &n.name), ("group", &g), ("rank", &r)],
                n.rtt_us as f64 / 1e6,
            );
        }

        // Counters since start.
        header(
            w,
            "lockstep_request_migrations_total",
            "counter",
            "Requests moved to another group after theirs failed (they continue with identical bytes).",
        );
        sample(w, "lockstep_request_migrations_total", &[], v.migrations as f64);
        header(w, "lockstep_group_reformations_total", "counter", "Groups that stopped serving and were re-formed.");
        sample(w, "lockstep_group_reformations_total", &[], v.reformations as f64);
        header(w, "lockstep_node_failures_total", "counter", "Node sessions lost (dead, silent, replaced or refused).");
        sample(w, "lockstep_node_failures_total", &[], v.node_failures as f64);
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

/// A group or rank label: the number, or empty for a node in no group.
fn opt_label(x: Option<usize>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::scheduler::FinishReason;
    use crate::service::ServiceObserver;

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
                group: Some(0),
                rank: Some(0),
                ring_addr: "127.0.0.1:1".into(),
                state: "ready".into(),
                detail: "in group 0 rank 0".into(),
                last_heartbeat_ms_ago: Some(250),
                rtt_us: 120,
                fingerprint: "fp_test".into(),
                pid: None,
                session: 1,
            }],
            migrations: 2,
            reformations: 1,
            node_failures: 1,
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
    fn values_format_like_prometheus() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
