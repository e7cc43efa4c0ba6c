//! `lockstep generate`: complete prompts through the serving core, in-process or on a cluster,
//! and print the answers (text, or one JSON line per prompt).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lockstep_coordinator::engine::{backend_fingerprint_name, fresh_seed, EngineEvent, GenerateRequest, ModelInfo};
use lockstep_coordinator::scheduler::FinishReason;
use lockstep_coordinator::service::SubmitOptions;
use lockstep_kernels::SamplingParams;

use super::{start_service, ClusterArgs, EngineArgs, UNBOUNDED};

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// A prompt (repeatable).
    #[arg(long = "prompt", conflicts_with = "prompts")]
    prompt: Vec<String>,
    /// A file with one prompt per line (a line starting with `"` is a JSON string, for newlines).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sampling seed (default: a fresh one, printed so the run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Render each prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Prompt i arrives at engine step i × N (0: all at once).
    #[arg(long, default_value_t = 0)]
    stagger_steps: u64,
    /// One JSON line per prompt, in input order.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

fn read_prompts(a: &GenerateArgs) -> Result<Vec<String>> {
    let mut prompts = a.prompt.clone();
    if let Some(path) = &a.prompts {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if line.starts_with('"') {
                prompts.push(
                    serde_json::from_str(line)
                        .with_context(|| format!("{}:{}: bad JSON string", path.display(), i + 1))?,
                );
            } else {
                prompts.push(line.to_string());
            }
        }
    }
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT (repeatable) or --prompts FILE");
    }
    Ok(prompts)
}

pub(crate) fn run(a: GenerateArgs) -> Result<()> {
    let prompts = read_prompts(&a)?;
    let opts = a.engine.options()?;
    let info = ModelInfo::load(&a.model, &opts, &backend_fingerprint_name(&opts)?)?;
    let seed = a.seed.unwrap_or_else(fresh_seed);
    let sampling = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed };
    sampling.validate()?;
    // Validate every prompt before any work starts: a bad one fails the command, not the batch.
    let mut requests = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let ids = if a.chat {
            let msgs = [lockstep_coordinator::tokenizer::ChatMessage::new("user", p.as_str())];
            info.tokenizer.encode_chat(&msgs, true)?
        } else {
            info.tokenizer.encode(p, true)?
        };
        if ids.len() >= info.max_context {
            bail!("prompt {} has {} tokens; the context is {} tokens", i + 1, ids.len(), info.max_context);
        }
        let max_tokens = a.max_tokens.min((info.max_context - ids.len()) as u32);
        let req = GenerateRequest {
            prompt_ids: ids,
            sampling,
            max_tokens,
            stop: a.stop.clone(),
            stop_token_ids: Vec::new(),
            ignore_eos: a.ignore_eos,
            skip_special_tokens: true,
        };
        requests.push((req, SubmitOptions { delay_steps: i as u64 * a.stagger_steps }));
    }
    let fingerprint = info.system_fingerprint.clone();
    let service = start_service(&a.model, &a.cluster, &opts, info, UNBOUNDED, None)?;
    let single = prompts.len() == 1 && !a.json;
    let outputs = service.run_blocking(requests, |_, ev| {
        if let (true, EngineEvent::Token { text, .. }) = (single, ev) {
            print!("{text}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        }
    })?;
    let mut failed = 0;
    for (i, out) in outputs.iter().enumerate() {
        let reason = out.finish_reason.as_ref().map(|r| r.as_str()).unwrap_or("unknown");
        let error = match &out.finish_reason {
            Some(FinishReason::Error(m)) => {
                failed += 1;
                Some(m.clone())
            }
            _ => None,
        };
        if a.json {
            let mut line = serde_json::json!({
                "prompt": prompts[i],
                "text": out.text,
                "token_ids": out.token_ids,
                "logprobs": out.logprobs,
                "finish_reason": reason,
                "seed": seed,
                "system_fingerprint": fingerprint,
            });
            if let Some(e) = &error {
                line["error"] = serde_json::json!(e);
            }
            println!("{line}");
        } else if prompts.len() == 1 {
            println!();
            tracing::info!(finish_reason = reason, seed, system_fingerprint = %fingerprint, "generated");
        } else {
            println!("--- prompt {}: {}", i + 1, prompts[i]);
            println!("{}", out.text);
            println!("[finish_reason={reason}]");
        }
        if let Some(e) = error {
            tracing::error!(prompt = i + 1, "prompt {} failed: {e}", i + 1);
        }
    }
    if !a.json && prompts.len() > 1 {
        tracing::info!(prompts = prompts.len(), seed, system_fingerprint = %fingerprint, "generated");
    }
    if failed > 0 {
        bail!("{failed} of {} prompts failed", prompts.len());
    }
    Ok(())
}
