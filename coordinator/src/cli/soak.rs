//! `lockstep soak`: the determinism soak against a running server.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lockstep_coordinator::soak::{
    post_summary, run_soak, write_report, Comparison, LoadSample, SoakOptions, SoakReport,
};

#[derive(Args)]
pub(crate) struct SoakArgs {
    /// Server base URL (`http://host:port`).
    #[arg(long)]
    url: String,
    /// A second server to soak the same way and compare against.
    #[arg(long)]
    compare_url: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    /// Ops key for posting the summary to `/ops/soak`.
    #[arg(long)]
    ops_key: Option<String>,
    /// Model name (default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    #[arg(long = "prompt", conflicts_with = "prompts")]
    prompt: Vec<String>,
    /// One prompt per line (copies cycle through them).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Copies of the request.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Copies in flight (one phase).
    #[arg(long, conflicts_with = "concurrency_ramp")]
    concurrency: Option<usize>,
    /// Phases of copies in flight, e.g. 1,8,32,64.
    #[arg(long, value_delimiter = ',')]
    concurrency_ramp: Option<Vec<usize>>,
    /// Background requests per second.
    #[arg(long, default_value_t = 0.0)]
    background: f64,
    /// Stop issuing copies after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Report directory (report.json, report.html).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not post the summary to the server's /ops/soak.
    #[arg(long)]
    no_post: bool,
}

pub(crate) fn run(a: SoakArgs) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(p) = &a.prompts {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        prompts.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT or --prompts FILE");
    }
    let ramp = a.concurrency_ramp.clone().unwrap_or_else(|| vec![a.concurrency.unwrap_or(8)]);
    let opts = SoakOptions {
        url: a.url.clone(),
        api_key: a.api_key.clone(),
        model: a.model.clone(),
        prompts,
        requests: a.requests,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        concurrency_ramp: ramp,
        background_per_s: a.background,
        duration: a.duration.map(std::time::Duration::from_secs_f64),
        request_timeout: std::time::Duration::from_secs(600),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr())
            .then_some(draw_progress as fn(&LoadSample, usize)),
    };
    let out = a.out.clone().unwrap_or_else(lockstep_coordinator::soak::default_out_dir);
    let first = soak_once(&opts)?;
    let deterministic = match &a.compare_url {
        None => {
            first.print();
            write_report(&out, &[&first], None)?;
            first.is_deterministic()
        }
        Some(url) => {
            let second = soak_once(&SoakOptions { url: url.clone(), model: None, ..opts.clone() })?;
            let c = Comparison::new(first.clone(), second.clone());
            c.print();
            write_report(&out, &[&first, &second], Some(&c))?;
            if !a.no_post {
                let _ = post_summary(url, a.ops_key.as_deref(), &second);
            }
            first.is_deterministic() && second.is_deterministic()
        }
    };
    if !a.no_post {
        if let Err(e) = post_summary(&a.url, a.ops_key.as_deref(), &first) {
            tracing::warn!("could not post the summary to {}/ops/soak: {e}", a.url);
        }
    }
    println!("report: {}/report.json and report.html", out.display());
    if !deterministic {
        // A soak that finds nondeterminism is a successful measurement, not a tool failure;
        // the exit code still says so for scripts.
        std::process::exit(2);
    }
    Ok(())
}

/// One soak, ending its progress line (if it drew one) so what follows starts on a new line.
fn soak_once(opts: &SoakOptions) -> Result<SoakReport> {
    let report = run_soak(opts);
    if opts.progress.is_some() {
        eprintln!();
    }
    report
}

/// The live progress line, redrawn in place on the terminal every sample.
fn draw_progress(sample: &LoadSample, total: usize) {
    let width = 30;
    let filled = (sample.copies_done * width) / total.max(1);
    eprint!(
        "\r[soak] [{}{}] {}/{} copies | in flight {:>3} copies, {:>3} background | {} migrations | {:.1}s   ",
        "#".repeat(filled),
        "-".repeat(width - filled),
        sample.copies_done,
        total,
        sample.copies_in_flight,
        sample.background_in_flight,
        sample.migrations,
        sample.t
    );
}
