//! `lockstep demo`: the README's main job — the same prompts in-process alone, then on a TP=2
//! cluster of node processes on loopback among other traffic, with identical bytes.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use lockstep_coordinator::engine::{backend_fingerprint_name, EngineOptions, GenerateRequest, ModelInfo};
use lockstep_coordinator::service::SubmitOptions;
use lockstep_kernels::{DType, SamplingParams};
use lockstep_node::synth::{synth_with, Preset, SynthOptions};

use super::{start_service, synth_cache_dir, ClusterArgs, UNBOUNDED};

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Model directory (default: ../shared/models/stories260K/hf when present, else a synthesized
    /// tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
}

fn demo_model(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = arg {
        return Ok(m);
    }
    let shared = std::env::current_dir()?.join("../shared/models/stories260K/hf");
    if shared.join("config.json").exists() {
        return Ok(shared);
    }
    let dir = synth_cache_dir("tiny-f32-seed0");
    if !dir.join("model.safetensors").exists() {
        tracing::info!("../shared/models/stories260K/hf not found: synthesizing a tiny model into {}", dir.display());
        synth_with(Preset::Tiny, 0, DType::F32, &dir, &SynthOptions::default())?;
    }
    Ok(dir)
}

pub(crate) fn run(a: DemoArgs) -> Result<()> {
    let model = demo_model(a.model)?;
    let prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park"];
    let sampling = [SamplingParams::greedy(), SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 42 }];
    println!("lockstep demo — model {}", model.display());
    // Per answer: token ids, logprob bits, text.
    type Answer = (Vec<u32>, Vec<u32>, String);
    let mut first: Option<Vec<Answer>> = None;
    let runs = [
        ("in-process, TP 1, alone, 1 thread", 1usize, 1usize, 0usize),
        ("TP 2 cluster on loopback, with 12 other requests", 2, 2, 12),
    ];
    for (label, tp, threads, others) in runs {
        let opts = EngineOptions { threads, ..EngineOptions::default() };
        let info = ModelInfo::load(&model, &opts, &backend_fingerprint_name(&opts)?)?;
        let fingerprint = info.system_fingerprint.clone();
        let request = |prompt: &str, sampling: SamplingParams, max_tokens: u32| -> Result<GenerateRequest> {
            Ok(GenerateRequest {
                prompt_ids: info.tokenizer.encode(prompt, true)?,
                sampling,
                max_tokens,
                stop: vec![],
                stop_token_ids: vec![],
                ignore_eos: false,
                skip_special_tokens: true,
            })
        };
        // Background traffic arrives before, between and after the demo prompts, one engine
        // turn apart, so the demo prompts land in batches of every shape.
        let mut requests = Vec::new();
        let mut demo_slots = Vec::new();
        let mut turn = 0u64;
        for (i, p) in prompts.iter().enumerate() {
            for s in sampling {
                for j in 0..others / prompts.len() {
                    let text = format!("{} {}", prompts[(i + j) % prompts.len()], "and then ".repeat(j));
                    let req = request(&text, SamplingParams { seed: j as u64, ..s }, 8 + 5 * j as u32)?;
                    requests.push((req, SubmitOptions { delay_steps: turn }));
                    turn += 1;
                }
                demo_slots.push(requests.len());
                requests.push((request(p, s, a.max_tokens)?, SubmitOptions { delay_steps: turn }));
            }
        }
        let service = start_service(&model, &ClusterArgs::embedded(tp, 1), &opts, info, UNBOUNDED, None)?;
        if let Some(c) = service.cluster() {
            println!(
                "\ncoordinator listening for nodes on {} (QUIC, mutual TLS); node pids {:?}",
                c.addr,
                c.node_pids()
            );
        }
        let outputs = service.run_blocking(requests, |_, _| {})?;
        println!("\n== {label} (system_fingerprint {fingerprint})");
        let mut answers = Vec::new();
        for (k, &slot) in demo_slots.iter().enumerate() {
            let out = &outputs[slot];
            if let Some(e) = &out.error {
                bail!("demo prompt {:?} failed: {e}", prompts[k / 2]);
            }
            let mode = if k % 2 == 0 { "greedy" } else { "T=0.8 seed 42" };
            println!("[{}] {:?} → {:?}", mode, prompts[k / 2], out.text);
            answers.push((out.token_ids.clone(), out.logprobs.iter().map(|l| l.to_bits()).collect(), out.text.clone()));
        }
        match &first {
            None => first = Some(answers),
            Some(f) => {
                let same = f.iter().zip(&answers).filter(|(x, y)| x == y).count();
                println!("\nidentical token ids, logprob bits and text: {same}/{} answers", answers.len());
                if same != answers.len() {
                    bail!("determinism violated");
                }
            }
        }
    }
    Ok(())
}
