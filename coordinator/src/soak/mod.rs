//! `lockstep soak`: the "1000 completions" experiment against a running cluster.
//!
//! Thinking Machines' experiment: send the same request many times while the server is busy with
//! other traffic, and count the distinct answers. A conventional server gives dozens; lockstep
//! must give exactly one, with identical logprob bits. The soak sends `N` copies of a request
//! under a concurrency ramp (each phase of the ramp keeps `C` copies in flight) while a
//! background generator keeps the cluster busy with random other requests — random lengths,
//! random arrival times, some streaming, some cancelled midway — so the copies land in batches of
//! every size and position. Copies alternate between streaming and non-streaming.
//!
//! The report counts unique completions (by token ids when the server reports them, else by
//! text), how often each occurred, where every variant first diverges from the most common one
//! (token index, the text just before, both continuations), whether the per-token logprob bits
//! agree, the `system_fingerprint`s seen, throughput and latency, and load over time. It is
//! written as `report.json` and a self-contained `report.html`, summarised on the terminal, and
//! posted to the server's `/ops/soak` for the dashboard. A comparison mode runs the same soak
//! against a second server and says whether the two agree.

pub mod http;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lockstep_kernels::splitmix::SplitMix64;
use serde_json::{json, Value};

use self::http::{request, BaseUrl};
pub use self::report::{write_report, Comparison, SoakReport};

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub url: String,
    pub api_key: Option<String>,
    /// Model name to send (default: the first of `/v1/models`).
    pub model: Option<String>,
    pub prompts: Vec<String>,
    pub requests: usize,
    pub max_tokens: u32,
    pub temperature: f32,
    pub seed: Option<u64>,
    /// Copies in flight per phase; the copies are split evenly over the phases.
    pub concurrency_ramp: Vec<usize>,
    /// Background requests per second (0: none).
    pub background_per_s: f64,
    /// Stop issuing copies after this long.
    pub duration: Option<Duration>,
    pub request_timeout: Duration,
    /// Show a live progress line on stderr.
    pub progress: bool,
}

/// One copy's answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyResult {
    pub index: usize,
    pub prompt: usize,
    pub phase_concurrency: usize,
    pub streamed: bool,
    pub error: Option<String>,
    pub text: String,
    pub token_ids: Option<Vec<u64>>,
    /// The chosen tokens' logprobs as f32 bit patterns.
    pub logprob_bits: Vec<u32>,
    pub fingerprint: Option<String>,
    pub started_s: f64,
    pub latency_s: f64,
    pub ttft_s: Option<f64>,
}

/// Background traffic counters.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BackgroundStats {
    pub sent: usize,
    pub completed: usize,
    pub cancelled: usize,
    pub failed: usize,
}

/// In-flight counts sampled over the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadSample {
    pub t: f64,
    pub copies_in_flight: usize,
    pub background_in_flight: usize,
    pub copies_done: usize,
}

struct Shared {
    base: BaseUrl,
    key: Option<String>,
    model: String,
    start: Instant,
    copies_in_flight: AtomicUsize,
    background_in_flight: AtomicUsize,
    copies_done: AtomicUsize,
    stop: AtomicBool,
    bg: Mutex<BackgroundStats>,
}

const WORDS: &[&str] = &[
    "the", "little", "dog", "ran", "to", "park", "and", "saw", "a", "big", "red", "ball", "said", "happy", "sun",
    "tree", "friend", "mom", "cat", "jumped", "over", "fence", "played", "all", "day", "girl", "boy", "house", "bird",
    "sky",
];

/// The model the server serves (first of `/v1/models`).
pub fn served_model(base: &BaseUrl, key: Option<&str>) -> Result<String> {
    let mut r = request(base, "GET", "/v1/models", None, key, Duration::from_secs(30))?;
    let body = r.body_string()?;
    if r.status != 200 {
        bail!("GET /v1/models answered {}: {body}", r.status);
    }
    let v: Value = serde_json::from_str(&body)?;
    v["data"][0]["id"].as_str().map(str::to_string).context("GET /v1/models lists no model")
}

/// Run one soak against one server.
pub fn run_soak(opts: &SoakOptions) -> Result<SoakReport> {
    if opts.prompts.is_empty() || opts.requests == 0 || opts.concurrency_ramp.is_empty() {
        bail!("a soak needs at least one prompt, one request and one concurrency level");
    }
    let base = BaseUrl::parse(&opts.url)?;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => served_model(&base, opts.api_key.as_deref())
            .with_context(|| format!("asking {} for its model", opts.url))?,
    };
    let shared = Arc::new(Shared {
        base,
        key: opts.api_key.clone(),
        model,
        start: Instant::now(),
        copies_in_flight: AtomicUsize::new(0),
        background_in_flight: AtomicUsize::new(0),
        copies_done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        bg: Mutex::new(BackgroundStats::default()),
    });
    let load = Arc::new(Mutex::new(Vec::<LoadSample>::new()));
    let sampler = {
        let (s, load, total, progress) = (shared.clone(), load.clone(), opts.requests, opts.progress);
        std::thread::spawn(move || sample_load(&s, &load, total, progress))
    };
    let background = (opts.background_per_s > 0.0).then(|| {
        let (s, o) = (shared.clone(), opts.clone());
        std::thread::spawn(move || background_traffic(&s, &o))
    });
    let results = Arc::new(Mutex::new(Vec::<CopyResult>::with_capacity(opts.requests)));
    let phases = opts.concurrency_ramp.len();
    let mut next = 0usize;
    for (p, &conc) in opts.concurrency_ramp.iter().enumerate() {
        let end = (opts.requests * (p + 1)) / phases;
        let queue: Arc<Mutex<std::ops::Range<usize>>> = Arc::new(Mutex::new(next..end));
        next = end;
        let workers: Vec<_> = (0..conc.max(1))
            .map(|_| {
                let (s, q, r, o) = (shared.clone(), queue.clone(), results.clone(), opts.clone());
                std::thread::spawn(move || loop {
                    if s.stop.load(Ordering::Relaxed) || o.duration.is_some_and(|d| s.start.elapsed() > d) {
                        return;
                    }
                    let Some(i) = q.lock().expect("lock").next() else { return };
                    let res = one_copy(&s, &o, i, conc);
                    s.copies_done.fetch_add(1, Ordering::Relaxed);
                    r.lock().expect("lock").push(res);
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(b) = background {
        let _ = b.join();
    }
    let _ = sampler.join();
    if opts.progress {
        eprintln!();
    }
    let mut results = Arc::try_unwrap(results).map(|m| m.into_inner().expect("lock")).unwrap_or_default();
    results.sort_by_key(|r| r.index);
    let bg = shared.bg.lock().expect("lock").clone();
    let load = load.lock().expect("lock").clone();
    Ok(SoakReport::build(opts, &shared.model, results, bg, load, shared.start.elapsed().as_secs_f64()))
}

fn sample_load(s: &Shared, load: &Mutex<Vec<LoadSample>>, total: usize, progress: bool) {
    while !s.stop.load(Ordering::Relaxed) {
        let sample = LoadSample {
            t: s.start.elapsed().as_secs_f64(),
            copies_in_flight: s.copies_in_flight.load(Ordering::Relaxed),
            background_in_flight: s.background_in_flight.load(Ordering::Relaxed),
            copies_done: s.copies_done.load(Ordering::Relaxed),
        };
        if progress {
            let width = 30;
            let filled = (sample.copies_done * width) / total.max(1);
            eprint!(
                "\r[soak] [{}{}] {}/{} copies | in flight {:>3} copies, {:>3} background | {:.1}s   ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                sample.copies_done,
                total,
                sample.copies_in_flight,
                sample.background_in_flight,
                sample.t
            );
        }
        load.lock().expect("lock").push(sample);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn completion_body(
    model: &str,
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    seed: Option<u64>,
    stream: bool,
) -> String {
    let mut b = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "logprobs": 1,
        "stream": stream,
    });
    if let Some(s) = seed {
        b["seed"] = json!(s);
    }
    b.to_string()
}

/// Collects a completion from a non-streamed body or from stream chunks.
#[derive(Default)]
struct Collected {
    text: String,
    token_ids: Option<Vec<u64>>,
    logprob_bits: Vec<u32>,
    fingerprint: Option<String>,
    finish: Option<String>,
}

impl Collected {
    fn absorb(&mut self, v: &Value) {
        if let Some(fp) = v["system_fingerprint"].as_str() {
            self.fingerprint = Some(fp.to_string());
        }
        let c = &v["choices"][0];
        if let Some(t) = c["text"].as_str() {
            self.text.push_str(t);
        }
        if let Some(ids) = c["token_ids"].as_array() {
            self.token_ids.get_or_insert_with(Vec::new).extend(ids.iter().filter_map(Value::as_u64));
        }
        if let Some(lps) = c["logprobs"]["token_logprobs"].as_array() {
            // The server prints f32 values exactly; parsing them back is exact (serde_json's
            // float_roundtrip), so the bits compare as the server computed them.
            self.logprob_bits.extend(lps.iter().map(|x| (x.as_f64().unwrap_or(f64::NAN) as f32).to_bits()));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
    }
}

fn one_copy(s: &Shared, o: &SoakOptions, index: usize, conc: usize) -> CopyResult {
    let prompt = index % o.prompts.len();
    let streamed = index % 2 == 1;
    let body = completion_body(&s.model, &o.prompts[prompt], o.max_tokens, o.temperature, o.seed, streamed);
    let started = s.start.elapsed().as_secs_f64();
    s.copies_in_flight.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut ttft = None;
    let outcome = (|| -> Result<Collected> {
        let mut r = request(&s.base, "POST", "/v1/completions", Some(&body), s.key.as_deref(), o.request_timeout)?;
        if r.status != 200 {
            let status = r.status;
            bail!("HTTP {status}: {}", r.body_string().unwrap_or_default());
        }
        let mut c = Collected::default();
        if streamed {
            let mut bad = None;
            r.for_each_event(|d| {
                if d == "[DONE]" {
                    return false;
                }
                match serde_json::from_str::<Value>(d) {
                    Ok(v) => {
                        if ttft.is_none() && v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                            ttft = Some(t0.elapsed().as_secs_f64());
                        }
                        c.absorb(&v);
                        true
                    }
                    Err(e) => {
                        bad = Some(e.to_string());
                        false
                    }
                }
            })?;
            if let Some(e) = bad {
                bail!("bad stream chunk: {e}");
            }
        } else {
            c.absorb(&serde_json::from_str(&r.body_string()?)?);
        }
        if c.finish.as_deref() == Some("error") {
            bail!("finished with an error");
        }
        Ok(c)
    })();
    s.copies_in_flight.fetch_sub(1, Ordering::Relaxed);
    let latency_s = t0.elapsed().as_secs_f64();
    match outcome {
        Ok(c) => CopyResult {
            index,
            prompt,
            phase_concurrency: conc,
            streamed,
            error: None,
            text: c.text,
            token_ids: c.token_ids,
            logprob_bits: c.logprob_bits,
            fingerprint: c.fingerprint,
            started_s: started,
            latency_s,
            ttft_s: ttft,
        },
        Err(e) => CopyResult {
            index,
            prompt,
            phase_concurrency: conc,
            streamed,
            error: Some(e.to_string()),
            text: String::new(),
            token_ids: None,
            logprob_bits: Vec::new(),
            fingerprint: None,
            started_s: started,
            latency_s,
            ttft_s: None,
        },
    }
}

/// Random other requests at Poisson arrivals until the copies are done.
fn background_traffic(s: &Arc<Shared>, o: &SoakOptions) {
    let mut rng = SplitMix64::new(0x5eed ^ (o.requests as u64) << 7);
    let mut handles = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        let wait = -(1.0 - rng.unit_f64()).ln() / o.background_per_s;
        std::thread::sleep(Duration::from_secs_f64(wait.min(2.0)));
        if s.background_in_flight.load(Ordering::Relaxed) >= 96 {
            continue;
        }
        let words = 1 + rng.below(60);
        let prompt: Vec<&str> = (0..words).map(|_| WORDS[rng.below(WORDS.len())]).collect();
        let max_tokens = 1 + rng.below(o.max_tokens.max(8) as usize) as u32;
        let temperature = [0.0f32, 0.7, 1.0][rng.below(3)];
        let stream = rng.below(2) == 0;
        let cancel = rng.below(5) == 0;
        let body =
            completion_body(&s.model, &prompt.join(" "), max_tokens, temperature, Some(rng.next_u64() >> 11), stream);
        let s2 = s.clone();
        let timeout = o.request_timeout;
        s.background_in_flight.fetch_add(1, Ordering::Relaxed);
        s.bg.lock().expect("lock").sent += 1;
        handles.push(std::thread::spawn(move || {
            let r = request(&s2.base, "POST", "/v1/completions", Some(&body), s2.key.as_deref(), timeout);
            let outcome = match r {
                Ok(mut resp) if cancel => {
                    // Hang up midway: after two events when streaming, else right away.
                    let mut n = 0;
                    if stream {
                        let _ = resp.for_each_event(|_| {
                            n += 1;
                            n < 2
                        });
                    }
                    drop(resp);
                    "cancelled"
                }
                Ok(mut resp) => {
                    if resp.status == 200 && resp.body_string().is_ok() {
                        "completed"
                    } else {
                        "failed"
                    }
                }
                Err(_) => "failed",
            };
            s2.background_in_flight.fetch_sub(1, Ordering::Relaxed);
            let mut bg = s2.bg.lock().expect("lock");
            match outcome {
                "completed" => bg.completed += 1,
                "cancelled" => bg.cancelled += 1,
                _ => bg.failed += 1,
            }
        }));
        handles.retain(|h| !h.is_finished());
    }
    for h in handles {
        let _ = h.join();
    }
}

/// POST a summary of the report to the server's `/ops/soak` (for the dashboard).
pub fn post_summary(url: &str, ops_key: Option<&str>, report: &SoakReport) -> Result<()> {
    let base = BaseUrl::parse(url)?;
    let body = serde_json::to_string(&report.summary())?;
    let mut r = request(&base, "POST", "/ops/soak", Some(&body), ops_key, Duration::from_secs(10))?;
    let answer = r.body_string().unwrap_or_default();
    if !(200..300).contains(&r.status) {
        bail!("POST /ops/soak answered {}: {answer}", r.status);
    }
    Ok(())
}

/// Per-prompt groups of identical answers, most common first (ties: earliest copy).
pub(crate) fn group_variants(results: &[CopyResult], prompt: usize) -> Vec<Vec<&CopyResult>> {
    let mut groups: BTreeMap<(Option<Vec<u64>>, String), Vec<&CopyResult>> = BTreeMap::new();
    for r in results.iter().filter(|r| r.prompt == prompt && r.error.is_none()) {
        groups.entry((r.token_ids.clone(), r.text.clone())).or_default().push(r);
    }
    let mut v: Vec<Vec<&CopyResult>> = groups.into_values().collect();
    v.sort_by_key(|g| (std::cmp::Reverse(g.len()), g[0].index));
    v
}

/// Where to write the report.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from(format!(
        "soak-{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    ))
}
