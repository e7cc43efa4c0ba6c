//! `lockstep`: the command line of the lockstep inference cluster.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lockstep_coordinator::engine::{
    describe_backend, fresh_seed, Engine, EngineEvent, EngineOptions, GenerateRequest, LocalExecutor, ModelInfo,
};
use lockstep_kernels::{CpuBackend, DType, Isa, KernelMode, SamplingParams};
use lockstep_node::synth::{synth_with, Preset, SynthOptions};

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Bitwise-reproducible LLM inference")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate completions for one or more prompts, all batched through the scheduler together.
    Generate(GenerateArgs),
    /// Model utilities.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Prefill and decode throughput at batch 1, 8 and 32, invariant vs fast.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Write a synthetic Hugging Face model directory with deterministic random weights.
    Synth {
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
        dtype: DType,
        #[arg(long)]
        out: PathBuf,
        /// Split the weights into this many safetensors shards (with an index file).
        #[arg(long, default_value_t = 1)]
        shards: usize,
    },
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::Bf16),
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        o => Err(format!("unknown dtype {o:?} (bf16|f16|f32)")),
    }
}

/// Options shared by every command that runs a model.
#[derive(Args, Clone)]
struct EngineArgs {
    /// Numerics of the matmuls: the invariant contract, or a conventional GEMM for comparison.
    #[arg(long, default_value = "invariant")]
    kernels: KernelMode,
    /// CPU threads of the kernels (never changes a bit).
    #[arg(long)]
    threads: Option<usize>,
    /// Force a SIMD path (scalar|avx2|avx512; never changes a bit).
    #[arg(long)]
    isa: Option<Isa>,
    /// Reduction segments S (power of two; part of the fingerprint). Default: from the model shape.
    #[arg(long)]
    reduce_segments: Option<usize>,
    /// Attention key chunk in positions (part of the fingerprint).
    #[arg(long, default_value_t = lockstep_kernels::DEFAULT_KV_CHUNK)]
    kv_chunk: usize,
    /// Most prompt tokens of one sequence per step.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Token budget of one step (decode tokens + prefill chunks).
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Most sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    /// KV cache block size in positions.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Longest context (default: the model's, at most 32768).
    #[arg(long)]
    max_context: Option<usize>,
}

impl EngineArgs {
    fn options(&self) -> EngineOptions {
        let d = EngineOptions::default();
        EngineOptions {
            threads: self.threads.unwrap_or(d.threads),
            mode: self.kernels,
            isa: self.isa,
            reduce_segments: self.reduce_segments,
            kv_chunk: self.kv_chunk,
            block_size: self.block_size,
            kv_cache_mib: self.kv_cache_mib,
            max_batch_tokens: self.max_batch_tokens,
            prefill_chunk: self.prefill_chunk,
            max_running: self.max_running,
            max_context: self.max_context,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
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
}

#[derive(Args)]
struct BenchArgs {
    /// Model directory (default: synthesize qwen2.5-0.5b bf16 into the cache directory).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    new_tokens: u32,
    /// Kernel modes to compare.
    #[arg(long, default_value = "invariant,fast", value_delimiter = ',')]
    modes: Vec<KernelMode>,
    #[command(flatten)]
    engine: EngineArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Generate(a) => generate(a),
        Command::Model { cmd: ModelCmd::Synth { preset, seed, dtype, out, shards } } => {
            let t = Instant::now();
            let r = synth_with(preset, seed, dtype, &out, &SynthOptions { shards })?;
            eprintln!(
                "wrote {} ({} parameters, {} files, {:.1} s)",
                r.dir.display(),
                r.params,
                r.files.len(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Bench(a) => bench(a),
    }
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
                    serde_json::from_str(line).with_context(|| format!("{}:{}: bad JSON string", path.display(), i + 1))?,
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

fn generate(a: GenerateArgs) -> Result<()> {
    let prompts = read_prompts(&a)?;
    let opts = a.engine.options();
    let info = ModelInfo::load(&a.model, &opts, CpuBackend::fingerprint_name_for(opts.mode))?;
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
        requests.push(GenerateRequest {
            prompt_ids: ids,
            sampling,
            max_tokens,
            stop: a.stop.clone(),
            stop_token_ids: Vec::new(),
            ignore_eos: a.ignore_eos,
            skip_special_tokens: true,
        });
    }
    let executor = LocalExecutor::load(&info, &opts)?;
    let mut engine = Engine::new(info.scheduler_config(&opts), executor, info.tokenizer.clone())?;
    let mut ids = vec![None; requests.len()];
    let mut pending: std::collections::VecDeque<(usize, GenerateRequest)> = requests.into_iter().enumerate().collect();
    let mut step = 0u64;
    loop {
        while let Some((i, _)) = pending.front() {
            if *i as u64 * a.stagger_steps > step {
                break;
            }
            let (i, req) = pending.pop_front().expect("front exists");
            ids[i] = Some(engine.add(req)?);
        }
        if !engine.has_work() && pending.is_empty() {
            break;
        }
        for ev in engine.step()? {
            if let (false, EngineEvent::Token { text, seq_id, .. }) = (a.json, &ev) {
                if prompts.len() == 1 && Some(*seq_id) == ids[0] {
                    print!("{text}");
                }
            }
        }
        step += 1;
    }
    for (i, id) in ids.iter().enumerate() {
        let out = engine.take_output(id.expect("every prompt was added")).expect("finished output");
        let reason = out.finish_reason.as_ref().map(|r| r.as_str()).unwrap_or("unknown");
        if a.json {
            let line = serde_json::json!({
                "prompt": prompts[i],
                "text": out.text,
                "token_ids": out.token_ids,
                "logprobs": out.logprobs,
                "finish_reason": reason,
                "seed": seed,
                "system_fingerprint": info.system_fingerprint,
            });
            println!("{line}");
        } else if prompts.len() == 1 {
            println!();
            eprintln!("[finish_reason={reason} seed={seed} system_fingerprint={}]", info.system_fingerprint);
        } else {
            println!("--- prompt {}: {}", i + 1, prompts[i]);
            println!("{}", out.text);
            println!("[finish_reason={reason}]");
        }
    }
    if !a.json && prompts.len() > 1 {
        eprintln!("[seed={seed} system_fingerprint={}]", info.system_fingerprint);
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let dir = lockstep_node::fingerprint::HashCache::from_env()
                .dir()
                .map(|d| d.join("synth"))
                .unwrap_or_else(|| std::env::temp_dir().join("lockstep-synth"))
                .join("qwen2.5-0.5b-bf16-seed0");
            if !dir.join("config.json").exists() {
                eprintln!("synthesizing qwen2.5-0.5b (bf16, seed 0) into {} ...", dir.display());
                synth_with(Preset::Qwen25_05b, 0, DType::Bf16, &dir, &SynthOptions::default())?;
            }
            dir
        }
    };
    println!("| mode | batch | prompt tok | new tok | prefill tok/s | decode tok/s | new tok/s incl. prefill | backend |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for &mode in &a.modes {
        let mut opts = a.engine.options();
        opts.mode = mode;
        let info = ModelInfo::load(&model, &opts, CpuBackend::fingerprint_name_for(mode))?;
        let executor = LocalExecutor::load(&info, &opts)?;
        let backend = describe_backend(executor.backend());
        let mut engine = Engine::new(info.scheduler_config(&opts), executor, info.tokenizer.clone())?;
        let vocab = info.tokenizer.vocab_size().min(info.config.vocab_size) as u32;
        for &b in &a.batch {
            for i in 0..b {
                // Distinct prompts of exactly `prompt_tokens` ids, no shared prefix.
                let prompt_ids = (0..a.prompt_tokens as u32).map(|t| 3 + (t * 7919 + i as u32 * 104_729) % (vocab - 3)).collect();
                engine.add(GenerateRequest {
                    prompt_ids,
                    sampling: SamplingParams::greedy(),
                    max_tokens: a.new_tokens,
                    stop: vec![],
                    stop_token_ids: vec![],
                    ignore_eos: true,
                    skip_special_tokens: true,
                })?;
            }
            let start = Instant::now();
            let mut first_tokens = 0;
            let mut prefill_done = None;
            let mut generated = 0usize;
            while engine.has_work() {
                for ev in engine.step()? {
                    if let EngineEvent::Token { index, .. } = ev {
                        generated += 1;
                        if index == 0 {
                            first_tokens += 1;
                        }
                    }
                }
                if prefill_done.is_none() && first_tokens == b {
                    prefill_done = Some(start.elapsed().as_secs_f64());
                }
            }
            let total = start.elapsed().as_secs_f64();
            let pre = prefill_done.unwrap_or(total);
            println!(
                "| {} | {b} | {} | {} | {:.1} | {:.1} | {:.1} | {backend} |",
                mode.as_str(),
                a.prompt_tokens,
                a.new_tokens,
                (b * a.prompt_tokens) as f64 / pre,
                (generated - b) as f64 / (total - pre).max(1e-9),
                generated as f64 / total,
            );
        }
    }
    Ok(())
}
