//! `lockstep bench`: prefill and decode throughput per batch size, kernel mode and TP degree,
//! measured through the same serving core that `serve` runs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lockstep_coordinator::cluster::PinNodes;
use lockstep_coordinator::engine::{backend_fingerprint_name, EngineEvent, GenerateRequest, ModelInfo};
use lockstep_coordinator::service::SubmitOptions;
use lockstep_kernels::{DType, KernelMode, SamplingParams};
use lockstep_node::same_host::RingTransportMode;
use lockstep_node::synth::{synth_with, Preset, SynthOptions};

use super::{start_service, synth_cache_dir, ClusterArgs, EngineArgs, UNBOUNDED};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Model directory (default: synthesize qwen2.5-0.5b bf16 into the cache directory).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    new_tokens: u32,
    /// Kernel modes to compare (`invariant`, `fast`, and `native` where the CPU has AMX or
    /// AVX512-BF16).
    #[arg(long, default_value = "invariant,fast", value_delimiter = ',')]
    modes: Vec<KernelMode>,
    /// Tensor-parallel degrees to compare (TP > 1 runs node processes with the machine's cores
    /// split between them, so every row uses the same total cores).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    tps: Vec<usize>,
    /// Run one untimed request (one prompt of --prompt-tokens, 2 new tokens) before the timed
    /// rows of each mode and TP, so the first row does not pay for faulting the weights in (peer
    /// benchmarks such as llama-bench warm up the same way).
    #[arg(long)]
    warmup: bool,
    /// How the TP > 1 rows' node processes link their ring: `auto` (same-host sockets, as
    /// `lockstep serve`) or `quic`.
    #[arg(long, default_value = "auto")]
    ring_transport: RingTransportMode,
    /// Whether the TP > 1 rows' node processes get CPUs of their own (`auto`, as `lockstep
    /// serve`: when they fit) or are left to the scheduler (`off`).
    #[arg(long, value_enum, default_value = "auto")]
    pin_nodes: PinNodes,
    #[command(flatten)]
    engine: EngineArgs,
}

pub(crate) fn run(a: BenchArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let dir = synth_cache_dir("qwen2.5-0.5b-bf16-seed0");
            if !dir.join("config.json").exists() {
                tracing::info!("synthesizing qwen2.5-0.5b (bf16, seed 0) into {} ...", dir.display());
                synth_with(Preset::Qwen25_05b, 0, DType::Bf16, &dir, &SynthOptions::default())?;
            }
            dir
        }
    };
    println!(
        "| mode | TP | batch | prompt tok | new tok | prefill tok/s | decode tok/s | new tok/s incl. prefill | backend |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    // `--numerics native` (or `--kernels native`) with `--modes` that leave native out would
    // quietly measure another mode: `--modes` decides each row's numerics.
    if a.engine.options()?.mode == KernelMode::Native && !a.modes.contains(&KernelMode::Native) {
        anyhow::bail!(
            "--numerics native asks for native numerics but --modes {} leaves them out: use --modes native (each row's mode sets its numerics)",
            a.modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
        );
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for (&mode, &tp) in a.modes.iter().flat_map(|m| a.tps.iter().map(move |t| (m, t))) {
        let mut opts = a.engine.options()?;
        opts.mode = mode;
        let info = ModelInfo::load(&model, &opts, &backend_fingerprint_name(&opts)?)?;
        let node_threads = (opts.threads.min(cores) / tp).max(1);
        // Native numerics are named as the fingerprint names them (the class is what matters).
        let numerics = match mode {
            KernelMode::Native => lockstep_kernels::CpuBackend::fingerprint_name_for(mode),
            mode => mode.as_str(),
        };
        let backend = if tp == 1 {
            format!("cpu/{} threads/{numerics}", opts.threads)
        } else {
            format!("{tp} nodes × {node_threads} threads/{numerics}/ring {}", a.ring_transport)
        };
        let vocab = info.tokenizer.vocab_size().min(info.config.vocab_size) as u32;
        let cluster = ClusterArgs {
            ring_transport: a.ring_transport,
            pin_nodes: a.pin_nodes,
            ..ClusterArgs::embedded(tp, node_threads)
        };
        let service = start_service(&model, &cluster, &opts, info, UNBOUNDED, None)?;
        // Prompts `first..first + b`: distinct, exactly `prompt_tokens` ids, no shared prefix.
        let requests = |first: usize, b: usize, max_tokens: u32| {
            (first..first + b)
                .map(|i| {
                    let prompt_ids = (0..a.prompt_tokens as u32)
                        .map(|t| 3 + (t * 7919 + i as u32 * 104_729) % (vocab - 3))
                        .collect();
                    let req = GenerateRequest {
                        prompt_ids,
                        sampling: SamplingParams::greedy(),
                        max_tokens,
                        stop: vec![],
                        stop_token_ids: vec![],
                        ignore_eos: true,
                        skip_special_tokens: true,
                    };
                    (req, SubmitOptions::default())
                })
                .collect::<Vec<_>>()
        };
        if a.warmup {
            // A prompt no timed row uses, so no cached prefix helps the timed rows.
            service.run_blocking(requests(1000, 1, 2), |_, _| {})?;
        }
        for &b in &a.batch {
            let requests = requests(0, b, a.new_tokens);
            let start = Instant::now();
            let mut first_tokens = 0;
            let mut prefill_done = None;
            let mut generated = 0usize;
            service.run_blocking(requests, |_, ev| {
                if let EngineEvent::Token { index, .. } = ev {
                    generated += 1;
                    if *index == 0 {
                        first_tokens += 1;
                        if first_tokens == b {
                            prefill_done = Some(start.elapsed().as_secs_f64());
                        }
                    }
                }
            })?;
            let total = start.elapsed().as_secs_f64();
            let pre = prefill_done.unwrap_or(total);
            println!(
                "| {} | {tp} | {b} | {} | {} | {:.1} | {:.1} | {:.1} | {backend} |",
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
