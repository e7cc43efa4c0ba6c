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
//! Every request is a tokio task talking through [`crate::api::client`] (one worker task per
//! in-flight copy, each on its own kept-alive connection; one task per background request, on a
//! connection of its own so that hanging up cancels just that request). Streams are read with the
//! API's one SSE parser, which decodes whole events only, so a character split across reads cannot
//! show up as a false divergence. A copy whose stream reports an error midway is an error in the
//! report, never a (short) completion.
//!
//! The report counts unique completions (by token ids when the server reports them, else by
//! text), how often each occurred, where every variant first diverges from the most common one
//! (token index, the text just before, both continuations), whether the per-token logprob bits
//! agree, the `system_fingerprint`s seen, throughput and latency, and load over time. It is
//! written as `report.json` and a self-contained `report.html`, summarised on the terminal, and
//! posted to the server's `/ops/soak` for the dashboard. A comparison mode runs the same soak
//! against a second server and says whether the two agree.

mod report;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use http::{Method, StatusCode};
use lockstep_kernels::splitmix::SplitMix64;
use serde_json::{json, Value};
use tokio::task::JoinSet;

pub use self::report::{write_report, Comparison, SoakReport};
use crate::api::client::Client;

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
    /// Longest one request may take, from sending it to the end of its answer.
    pub request_timeout: Duration,
    /// Called with every load sample (every 200 ms) and the number of copies, for a live
    /// progress display (`lockstep soak` draws one on a terminal).
    pub progress: Option<fn(&LoadSample, usize)>,
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
    /// Requests the server moved to another group since the soak began (its
    /// `lockstep_request_migrations_total`; 0 for a server without the metric).
    pub migrations: u64,
}

const COMPLETIONS: &str = "/v1/completions";

struct Shared {
    /// Never connected itself: every task talks through a [`Client::fresh`] copy of it.
    client: Client,
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

/// The soak's tasks run on a runtime of their own, so the callers (the CLI) stay synchronous.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("lockstep-soak").build()?)
}

/// Run one soak against one server.
pub fn run_soak(opts: &SoakOptions) -> Result<SoakReport> {
    runtime()?.block_on(soak(opts))
}

async fn soak(opts: &SoakOptions) -> Result<SoakReport> {
    if opts.prompts.is_empty() || opts.requests == 0 || opts.concurrency_ramp.is_empty() {
        bail!("a soak needs at least one prompt, one request and one concurrency level");
    }
    let client = Client::from_url(&opts.url, opts.api_key.clone())?;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => tokio::time::timeout(Duration::from_secs(30), client.fresh().served_model())
            .await
            .map_err(|_| anyhow!("no answer within 30 s"))
            .and_then(|r| r)
            .with_context(|| format!("asking {} for its model", opts.url))?,
    };
    let shared = Arc::new(Shared {
        client,
        model,
        start: Instant::now(),
        copies_in_flight: AtomicUsize::new(0),
        background_in_flight: AtomicUsize::new(0),
        copies_done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        bg: Mutex::new(BackgroundStats::default()),
    });
    let sampler = tokio::spawn(sample_load(shared.clone(), opts.requests, opts.progress));
    let background =
        (opts.background_per_s > 0.0).then(|| tokio::spawn(background_traffic(shared.clone(), opts.clone())));
    let mut results = Vec::<CopyResult>::with_capacity(opts.requests);
    let phases = opts.concurrency_ramp.len();
    let mut first = 0usize;
    for (p, &conc) in opts.concurrency_ramp.iter().enumerate() {
        let end = (opts.requests * (p + 1)) / phases;
        let next = Arc::new(AtomicUsize::new(first));
        first = end;
        let mut workers = JoinSet::new();
        for _ in 0..conc.max(1) {
            let (s, next, o) = (shared.clone(), next.clone(), opts.clone());
            workers.spawn(async move {
                // Each worker keeps one connection alive across its copies.
                let mut client = s.client.fresh();
                let mut done = Vec::new();
                loop {
                    if o.duration.is_some_and(|d| s.start.elapsed() > d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    let res = one_copy(&s, &o, &mut client, i, conc).await;
                    if res.error.is_some() {
                        // The connection may be mid-answer (a timeout) or gone: start clean.
                        client = s.client.fresh();
                    }
                    s.copies_done.fetch_add(1, Ordering::Relaxed);
                    done.push(res);
                }
                done
            });
        }
        while let Some(done) = workers.join_next().await {
            results.extend(done.context("a soak worker panicked")?);
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(b) = background {
        b.await.context("the background generator panicked")?;
    }
    let load = sampler.await.context("the load sampler panicked")?;
    results.sort_by_key(|r| r.index);
    let bg = shared.bg.lock().expect("lock").clone();
    Ok(SoakReport::build(opts, &shared.model, results, bg, load, shared.start.elapsed().as_secs_f64()))
}

/// Samples the in-flight counts every 200 ms until the copies are done.
async fn sample_load(s: Arc<Shared>, total: usize, progress: Option<fn(&LoadSample, usize)>) -> Vec<LoadSample> {
    let mut load = Vec::new();
    let mut metrics = s.client.fresh();
    let baseline = migrations_total(&mut metrics).await;
    let mut migrations = 0;
    let mut tick = 0u64;
    while !s.stop.load(Ordering::Relaxed) {
        // The server's migration counter, once a second: nodes dying under the soak show up on
        // its timeline.
        if tick.is_multiple_of(5) {
            if let (Some(base), Some(now)) = (baseline, migrations_total(&mut metrics).await) {
                migrations = now.saturating_sub(base);
            }
        }
        tick += 1;
        let sample = LoadSample {
            t: s.start.elapsed().as_secs_f64(),
            copies_in_flight: s.copies_in_flight.load(Ordering::Relaxed),
            background_in_flight: s.background_in_flight.load(Ordering::Relaxed),
            copies_done: s.copies_done.load(Ordering::Relaxed),
            migrations,
        };
        if let Some(show) = progress {
            show(&sample, total);
        }
        load.push(sample);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load
}

/// The server's `lockstep_request_migrations_total`, if it exposes one (a metrics endpoint behind
/// an ops key, or another server, simply has none).
async fn migrations_total(client: &mut Client) -> Option<u64> {
    let (status, _, body) = client.bytes(Method::GET, "/metrics", None).await.ok()?;
    if !status.is_success() {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix("lockstep_request_migrations_total ").and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
}

fn completion_body(
    model: &str,
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    seed: Option<u64>,
    stream: bool,
) -> Value {
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
    b
}

/// Collects a completion from a non-streamed body or from stream chunks.
#[derive(Default)]
struct Collected {
    text: String,
    token_ids: Option<Vec<u64>>,
    logprob_bits: Vec<u32>,
    fingerprint: Option<String>,
    finish: Option<String>,
    /// Seconds from sending to the first chunk with text (streams only).
    ttft_s: Option<f64>,
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

/// Sends one copy and reads its whole answer. A stream that reports an error midway (or ends
/// without `[DONE]`) fails here, so its partial text never counts as a completion.
async fn fetch_copy(client: &mut Client, body: &Value, streamed: bool, sent: Instant) -> Result<Collected> {
    let mut c = Collected::default();
    if streamed {
        let (status, mut sse) = client.post_stream(COMPLETIONS, body).await?;
        if status != StatusCode::OK {
            bail!("HTTP {status}: {}", sse.into_text().await.unwrap_or_default());
        }
        while let Some(v) = sse.next_chunk().await? {
            if c.ttft_s.is_none() && v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                c.ttft_s = Some(sent.elapsed().as_secs_f64());
            }
            c.absorb(&v);
        }
    } else {
        let (status, _, answer) = client.bytes(Method::POST, COMPLETIONS, Some(body)).await?;
        if status != StatusCode::OK {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&answer));
        }
        c.absorb(&serde_json::from_slice(&answer).context("the answer is not JSON")?);
    }
    if c.finish.as_deref() == Some("error") {
        bail!("finished with an error");
    }
    Ok(c)
}

async fn one_copy(s: &Shared, o: &SoakOptions, client: &mut Client, index: usize, conc: usize) -> CopyResult {
    let prompt = index % o.prompts.len();
    let streamed = index % 2 == 1;
    let body = completion_body(&s.model, &o.prompts[prompt], o.max_tokens, o.temperature, o.seed, streamed);
    let started_s = s.start.elapsed().as_secs_f64();
    s.copies_in_flight.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let outcome = tokio::time::timeout(o.request_timeout, fetch_copy(client, &body, streamed, t0))
        .await
        .unwrap_or_else(|_| Err(anyhow!("no whole answer within {:?}", o.request_timeout)));
    s.copies_in_flight.fetch_sub(1, Ordering::Relaxed);
    let latency_s = t0.elapsed().as_secs_f64();
    let result = CopyResult {
        index,
        prompt,
        phase_concurrency: conc,
        streamed,
        error: None,
        text: String::new(),
        token_ids: None,
        logprob_bits: Vec::new(),
        fingerprint: None,
        started_s,
        latency_s,
        ttft_s: None,
    };
    match outcome {
        Ok(c) => CopyResult {
            text: c.text,
            token_ids: c.token_ids,
            logprob_bits: c.logprob_bits,
            fingerprint: c.fingerprint,
            ttft_s: c.ttft_s,
            ..result
        },
        Err(e) => CopyResult { error: Some(format!("{e:#}")), ..result },
    }
}

enum BackgroundOutcome {
    Completed,
    Cancelled,
    Failed,
}

/// Random other requests at Poisson arrivals until the copies are done.
async fn background_traffic(s: Arc<Shared>, o: SoakOptions) {
    let mut rng = SplitMix64::new(0x5eed ^ (o.requests as u64) << 7);
    let mut requests = JoinSet::new();
    while !s.stop.load(Ordering::Relaxed) {
        let wait = -(1.0 - rng.unit_f64()).ln() / o.background_per_s;
        tokio::time::sleep(Duration::from_secs_f64(wait.min(2.0))).await;
        while requests.try_join_next().is_some() {}
        if s.background_in_flight.load(Ordering::Relaxed) >= 96 {
            continue;
        }
        let words = 1 + rng.below(60);
        let prompt: Vec<&str> = (0..words).map(|_| WORDS[rng.below(WORDS.len())]).collect();
        let max_tokens = 1 + rng.below(o.max_tokens.max(8) as usize) as u32;
        let temperature = [0.0f32, 0.7, 1.0][rng.below(3)];
        let stream = rng.below(2) == 0;
        // One in five hangs up midway: a stream after two events, a plain request after a
        // random moment (its answer arrives all at once, so only time can cut it short).
        let hang_up = (rng.below(5) == 0).then(|| Duration::from_secs_f64(0.5 * rng.unit_f64()));
        let body =
            completion_body(&s.model, &prompt.join(" "), max_tokens, temperature, Some(rng.next_u64() >> 11), stream);
        s.background_in_flight.fetch_add(1, Ordering::Relaxed);
        s.bg.lock().expect("lock").sent += 1;
        let (s, timeout) = (s.clone(), o.request_timeout);
        requests.spawn(async move {
            let mut client = s.client.fresh();
            let outcome = tokio::time::timeout(timeout, background_request(&mut client, &body, stream, hang_up))
                .await
                .unwrap_or(BackgroundOutcome::Failed);
            s.background_in_flight.fetch_sub(1, Ordering::Relaxed);
            let mut bg = s.bg.lock().expect("lock");
            match outcome {
                BackgroundOutcome::Completed => bg.completed += 1,
                BackgroundOutcome::Cancelled => bg.cancelled += 1,
                BackgroundOutcome::Failed => bg.failed += 1,
            }
        });
    }
    while requests.join_next().await.is_some() {}
}

async fn background_request(
    client: &mut Client,
    body: &Value,
    stream: bool,
    hang_up: Option<Duration>,
) -> BackgroundOutcome {
    let whole = async {
        if stream {
            let (status, mut sse) = client.post_stream(COMPLETIONS, body).await?;
            if status != StatusCode::OK {
                bail!("HTTP {status}");
            }
            let mut events = 0;
            while sse.next_chunk().await?.is_some() {
                events += 1;
                if hang_up.is_some() && events == 2 {
                    return Ok(BackgroundOutcome::Cancelled); // dropping the stream hangs up
                }
            }
        } else {
            let (status, _, _) = client.bytes(Method::POST, COMPLETIONS, Some(body)).await?;
            if status != StatusCode::OK {
                bail!("HTTP {status}");
            }
        }
        anyhow::Ok(BackgroundOutcome::Completed)
    };
    match hang_up {
        Some(after) if !stream => match tokio::time::timeout(after, whole).await {
            Ok(Ok(_)) | Err(_) => BackgroundOutcome::Cancelled,
            Ok(Err(_)) => BackgroundOutcome::Failed,
        },
        _ => whole.await.unwrap_or(BackgroundOutcome::Failed),
    }
}

/// POST a summary of the report to the server's `/ops/soak` (for the dashboard).
pub fn post_summary(url: &str, ops_key: Option<&str>, report: &SoakReport) -> Result<()> {
    let mut client = Client::from_url(url, ops_key.map(str::to_string))?;
    let summary = report.summary();
    let post = client.bytes(Method::POST, "/ops/soak", Some(&summary));
    let (status, _, answer) = runtime()?
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), post).await })
        .map_err(|_| anyhow!("no answer within 10 s"))??;
    if !status.is_success() {
        bail!("POST /ops/soak answered {status}: {}", String::from_utf8_lossy(&answer));
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
