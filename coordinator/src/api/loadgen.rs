//! `lockstep loadgen`: closed-loop load against a running server's `/v1/completions`, streaming.
//!
//! For each concurrency level `c`, `c` clients (each on its own kept-alive connection) send
//! `requests` requests in total, each starting as soon as its client's previous one ended. Every
//! request streams (`ignore_eos`, so each generates exactly `max_tokens` tokens unless the context
//! ends first) and is timed per token: TTFT is the time from sending to the first token event,
//! ITL the gap between consecutive token events of one request. Reported per level: requests/s and
//! generated tokens/s over the level's wall time, TTFT and ITL p50/p99, and failures.
//!
//! Seeds are the request index, so two runs send the same requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::api::client::Client;

#[derive(Debug, Clone)]
pub struct LoadgenOptions {
    pub url: String,
    pub api_key: Option<String>,
    /// `None`: the first model of `/v1/models`.
    pub model: Option<String>,
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level.
    pub requests: usize,
    pub max_tokens: u32,
    /// Prompts, used round-robin.
    pub prompts: Vec<String>,
    pub temperature: f32,
    /// Longest a single request may take.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub wall_secs: f64,
    pub requests_per_sec: f64,
    pub tokens_per_sec: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
}

/// What one request measured.
struct Sample {
    ttft: Duration,
    itls: Vec<Duration>,
    tokens: usize,
}

pub async fn run(opts: &LoadgenOptions) -> Result<Vec<LevelReport>> {
    if opts.prompts.is_empty() {
        bail!("no prompts");
    }
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => Client::from_url(&opts.url, opts.api_key.clone())?.served_model().await?,
    };
    let mut reports = Vec::new();
    for &c in &opts.concurrency {
        reports.push(level(opts, &model, c.max(1)).await?);
    }
    Ok(reports)
}

async fn level(opts: &LoadgenOptions, model: &str, concurrency: usize) -> Result<LevelReport> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, opts, model) = (next.clone(), opts.clone(), model.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::from_url(&opts.url, opts.api_key.clone())?;
            let mut samples = Vec::new();
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.requests {
                    break;
                }
                let body = json!({
                    "model": model,
                    "prompt": opts.prompts[i % opts.prompts.len()],
                    "max_tokens": opts.max_tokens,
                    "temperature": opts.temperature,
                    "seed": i,
                    "ignore_eos": true,
                    "stream": true,
                });
                match tokio::time::timeout(opts.request_timeout, one(&mut client, &body)).await {
                    Ok(Ok(s)) => samples.push(s),
                    _ => failed += 1,
                }
            }
            anyhow::Ok((samples, failed))
        }));
    }
    let mut samples = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (s, f) = t.await??;
        samples.extend(s);
        failed += f;
    }
    let wall = start.elapsed().as_secs_f64();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.itls.iter().map(|d| d.as_secs_f64() * 1e3)).collect();
    Ok(LevelReport {
        concurrency,
        requests: samples.len(),
        failed,
        wall_secs: wall,
        requests_per_sec: samples.len() as f64 / wall,
        tokens_per_sec: tokens as f64 / wall,
        ttft_p50_ms: percentile(&mut ttft, 50.0),
        ttft_p99_ms: percentile(&mut ttft, 99.0),
        itl_p50_ms: percentile(&mut itl, 50.0),
        itl_p99_ms: percentile(&mut itl, 99.0),
    })
}

/// One streamed request, timed per token event.
async fn one(client: &mut Client, body: &Value) -> Result<Sample> {
    let sent = Instant::now();
    let (status, mut sse) = client.post_stream("/v1/completions", body).await?;
    if !status.is_success() {
        bail!("status {status}");
    }
    let (mut first, mut last) = (None, None);
    let mut itls = Vec::new();
    let mut tokens = 0;
    while let Some(v) = sse.next_chunk().await? {
        let n: usize = v["choices"]
            .as_array()
            .map(|cs| cs.iter().map(|c| c["token_ids"].as_array().map_or(0, Vec::len)).sum())
            .unwrap_or(0);
        if n == 0 {
            continue;
        }
        let now = Instant::now();
        tokens += n;
        match last {
            None => first = Some(now - sent),
            Some(t) => itls.push(now - t),
        }
        last = Some(now);
    }
    let ttft = first.ok_or_else(|| anyhow!("no token"))?;
    Ok(Sample { ttft, itls, tokens })
}

/// Nearest-rank percentile (NaN when empty); sorts `xs`.
pub fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

/// A Markdown table of the reports.
pub fn table(reports: &[LevelReport]) -> String {
    let mut s = String::from(
        "| concurrency | requests | failed | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in reports {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
            r.concurrency,
            r.requests,
            r.failed,
            r.requests_per_sec,
            r.tokens_per_sec,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let mut xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut xs, 50.0), 50.0);
        assert_eq!(percentile(&mut xs, 99.0), 99.0);
        assert_eq!(percentile(&mut [3.0], 99.0), 3.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }
}
