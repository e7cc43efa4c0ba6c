//! `lockstep`: the command line of the lockstep inference cluster.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lockstep_coordinator::cluster::{Cluster, ClusterOptions, NodesMode};
use lockstep_coordinator::engine::{
    backend_fingerprint_name, fresh_seed, run_batch, Device, Engine, EngineEvent, EngineOptions, GenerateRequest,
    LocalExecutor, ModelInfo, StepExecutor,
};
use lockstep_coordinator::scheduler::FinishReason;
use lockstep_kernels::{DType, Isa, KernelMode, SamplingParams};
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
    /// Run a node: join a coordinator, load one shard, serve steps.
    Node(NodeArgs),
    /// Serve the OpenAI-compatible API over HTTP/1.1 and HTTP/3 until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Closed-loop streaming load against a running server: requests/s, tokens/s, TTFT, ITL.
    Loadgen(LoadgenArgs),
    /// The "1000 completions" determinism soak against a running server.
    Soak(SoakArgs),
    /// Cluster certificates (mutual TLS with a cluster CA).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// A self-contained demonstration on loopback: the same prompts alone, batched with other
    /// traffic and on other thread counts, showing identical bytes.
    Demo(DemoArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// Coordinator address (`host:port`).
    #[arg(long)]
    coordinator: String,
    /// Directory with `ca.pem` and this node's `NAME.pem` / `NAME.key`.
    #[arg(long)]
    tls_dir: PathBuf,
    /// This node's name (its certificate's name).
    #[arg(long, default_value = "node")]
    name: String,
    /// Where to accept the ring predecessor.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Kernel threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Force a SIMD path (never changes a bit).
    #[arg(long)]
    isa: Option<Isa>,
    /// Where this node finds the model (default: the path the coordinator assigns).
    #[arg(long)]
    model: Option<PathBuf>,
    /// For tests only: sleep this many milliseconds before every step, so a test can act while a
    /// group generates (tests/tests/cluster.rs kills a node mid-generation).
    #[arg(long, hide = true)]
    step_delay_ms: Option<u64>,
}

#[derive(Args)]
struct SoakArgs {
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

#[derive(Args)]
struct ServeArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// HTTP/1.1 address (TCP).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// HTTP/3 address (UDP). Default: the --listen address and port, on UDP.
    #[arg(long)]
    h3_listen: Option<std::net::SocketAddr>,
    /// Serve HTTP/1.1 only.
    #[arg(long, conflicts_with = "h3_listen")]
    no_h3: bool,
    /// Where to write the self-signed HTTP/3 certificate's PEM when --tls-dir has no
    /// server.pem/server.key (default: a file in the temp directory, printed at start-up).
    #[arg(long)]
    h3_cert_out: Option<PathBuf>,
    /// A bearer key accepted on /v1/*, /tokenize and /detokenize (repeatable; none: no auth).
    #[arg(long = "api-key")]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// A bearer key accepted on /metrics, /ops/* and /dashboard (repeatable; none: no auth).
    #[arg(long = "ops-key")]
    ops_key: Vec<String>,
    /// Most requests waiting for a running slot before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// The model name clients use (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds between determinism canary checks (0: no canary).
    #[arg(long, default_value_t = 30)]
    canary_every: u64,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Args)]
struct LoadgenArgs {
    /// Server base URL (`http://host:port`).
    #[arg(long)]
    url: String,
    #[arg(long)]
    api_key: Option<String>,
    /// Model name (default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels, run one after the other.
    #[arg(long, default_value = "1,8,32,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Tokens generated per request (`ignore_eos`: exactly this many unless the context ends).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// A prompt (repeatable; used round-robin).
    #[arg(long = "prompt")]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Print one JSON object per level instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create the cluster CA (`ca.pem`, `ca.key`) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the cluster CA for a node or the coordinator.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Model directory (default: ../shared/models/stories260K/hf when present, else a synthesized
    /// tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
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
    /// Exact number of KV cache blocks (overrides --kv-cache-mib).
    #[arg(long)]
    num_blocks: Option<usize>,
    /// KV cache block size in positions.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Longest context (default: the model's, at most 32768).
    #[arg(long)]
    max_context: Option<usize>,
    /// Where the in-process model runs: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// GPU numerics: `portable` (bit-identical to the CPU) or `native` (tensor cores; the GPU default).
    #[arg(long, default_value = "native")]
    numerics: GpuNumerics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GpuNumerics {
    Portable,
    Native,
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
            num_blocks: self.num_blocks,
            max_batch_tokens: self.max_batch_tokens,
            prefill_chunk: self.prefill_chunk,
            max_running: self.max_running,
            max_context: self.max_context,
            device: match self.device {
                Device::Cuda { ordinal, .. } => Device::Cuda { ordinal, native: self.numerics == GpuNumerics::Native },
                Device::Cpu => Device::Cpu,
            },
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
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Where the model runs: in this process, or on a tensor-parallel cluster of node processes.
#[derive(Args, Clone)]
struct ClusterArgs {
    /// Tensor-parallel degree (a power of two dividing the head counts and ≤ reduce_segments).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Number of tensor-parallel groups; requests are spread across them.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Run on node processes even at TP 1 with one replica.
    #[arg(long)]
    cluster: bool,
    /// `embedded`: spawn the nodes on loopback; `static`: wait for `lockstep node` processes.
    #[arg(long, value_enum, default_value = "embedded")]
    nodes: NodesMode,
    /// Coordinator address for nodes (QUIC).
    #[arg(long, default_value = "127.0.0.1:0")]
    cluster_listen: std::net::SocketAddr,
    /// Cluster CA and certificates (see `lockstep certs`); embedded mode makes a throwaway one.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Kernel threads per node process (default: this machine's cores ÷ nodes, at least 1).
    #[arg(long)]
    node_threads: Option<usize>,
    /// Seconds to wait for every group to become ready.
    #[arg(long, default_value_t = 300)]
    join_timeout: u64,
}

impl ClusterArgs {
    /// One embedded group of `tp` local node processes with `node_threads` kernel threads each
    /// (TP 1: the model runs in-process).
    fn embedded(tp: usize, node_threads: usize) -> Self {
        ClusterArgs {
            tp,
            replicas: 1,
            cluster: false,
            nodes: NodesMode::Embedded,
            cluster_listen: "127.0.0.1:0".parse().expect("a valid address"),
            tls_dir: None,
            node_threads: Some(node_threads),
            join_timeout: 300,
        }
    }

    fn wants_cluster(&self) -> bool {
        self.cluster || self.tp > 1 || self.replicas > 1 || self.nodes == NodesMode::Static
    }
}

/// One step executor per replica, and the cluster they run on (if any), which must outlive them.
type Executors = (Vec<Box<dyn StepExecutor>>, Option<Cluster>);

/// The step executors to run on: the whole model in-process, or one per cluster group (the
/// returned cluster must outlive them).
fn executors(model: &std::path::Path, c: &ClusterArgs, opts: &EngineOptions, info: &ModelInfo) -> Result<Executors> {
    if !c.wants_cluster() {
        return Ok((vec![Box::new(LocalExecutor::load(info, opts)?)], None));
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cluster = Cluster::start(ClusterOptions {
        model_dir: model.to_path_buf(),
        tp: c.tp,
        replicas: c.replicas,
        listen: c.cluster_listen,
        nodes: c.nodes,
        tls_dir: c.tls_dir.clone(),
        engine: opts.clone(),
        node_threads: c.node_threads.unwrap_or((cores / (c.tp * c.replicas)).max(1)),
        join_timeout: std::time::Duration::from_secs(c.join_timeout),
    })?;
    if cluster.info.system_fingerprint != info.system_fingerprint {
        bail!("cluster fingerprint {} differs from {}", cluster.info.system_fingerprint, info.system_fingerprint);
    }
    let execs = (0..cluster.groups().len()).map(|g| Box::new(cluster.executor(g)) as Box<dyn StepExecutor>).collect();
    Ok((execs, Some(cluster)))
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
    /// Tensor-parallel degrees to compare (TP > 1 runs node processes with the machine's cores
    /// split between them, so every row uses the same total cores).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    tps: Vec<usize>,
    #[command(flatten)]
    engine: EngineArgs,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line; no backtrace noise for user errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
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
        Command::Demo(a) => demo(a),
        Command::Serve(a) => serve(a),
        Command::Loadgen(a) => loadgen(a),
        Command::Soak(a) => soak(a),
        Command::Node(a) => {
            lockstep_node::server::run_node(lockstep_node::server::NodeOptions {
                coordinator: a.coordinator,
                tls_dir: a.tls_dir,
                name: a.name,
                listen: a.listen,
                threads: a.threads.unwrap_or_else(|| EngineOptions::default().threads),
                isa: a.isa,
                model_override: a.model,
                step_delay: a.step_delay_ms.map(std::time::Duration::from_millis),
            })?;
            Ok(())
        }
        Command::Certs { cmd: CertsCmd::Init { dir } } => {
            lockstep_node::certs::init_ca(&dir)?;
            eprintln!("created the cluster CA in {}", dir.display());
            Ok(())
        }
        Command::Certs { cmd: CertsCmd::Issue { dir, name } } => {
            lockstep_node::certs::issue(&dir, &name)?;
            eprintln!("issued {}/{name}.pem", dir.display());
            Ok(())
        }
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

fn generate(a: GenerateArgs) -> Result<()> {
    let prompts = read_prompts(&a)?;
    let opts = a.engine.options();
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
    let (executors, _cluster) = executors(&a.model, &a.cluster, &opts, &info)?;
    let replicas = executors.len();
    let single = prompts.len() == 1 && !a.json;
    let mut by_replica: Vec<Vec<(usize, GenerateRequest)>> = vec![Vec::new(); replicas];
    for (i, r) in requests.into_iter().enumerate() {
        by_replica[i % replicas].push((i, r));
    }
    let sched = info.scheduler_config(&opts);
    let mut outputs: Vec<(usize, lockstep_coordinator::engine::SeqOutput)> = std::thread::scope(|s| {
        let handles: Vec<_> = executors
            .into_iter()
            .zip(by_replica)
            .map(|(exec, reqs)| {
                let tokenizer = info.tokenizer.clone();
                let stagger = a.stagger_steps;
                s.spawn(move || -> Result<Vec<_>> {
                    let mut engine = Engine::new(sched, exec, tokenizer)?;
                    Ok(run_batch(&mut engine, reqs, stagger, |_, ev| {
                        if let (true, EngineEvent::Token { text, .. }) = (single, ev) {
                            print!("{text}");
                            let _ = std::io::Write::flush(&mut std::io::stdout());
                        }
                    }))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("engine thread")).collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    outputs.sort_by_key(|(i, _)| *i);
    let mut failed = 0;
    for (i, out) in &outputs {
        let i = *i;
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
                "system_fingerprint": info.system_fingerprint,
            });
            if let Some(e) = &error {
                line["error"] = serde_json::json!(e);
            }
            println!("{line}");
        } else if prompts.len() == 1 {
            println!();
            eprintln!("[finish_reason={reason} seed={seed} system_fingerprint={}]", info.system_fingerprint);
        } else {
            println!("--- prompt {}: {}", i + 1, prompts[i]);
            println!("{}", out.text);
            println!("[finish_reason={reason}]");
        }
        if let Some(e) = error {
            eprintln!("error: prompt {}: {e}", i + 1);
        }
    }
    if !a.json && prompts.len() > 1 {
        eprintln!("[seed={seed} system_fingerprint={}]", info.system_fingerprint);
    }
    if failed > 0 {
        bail!("{failed} of {} prompts failed", prompts.len());
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let dir = synth_cache_dir("qwen2.5-0.5b-bf16-seed0");
            if !dir.join("config.json").exists() {
                eprintln!("synthesizing qwen2.5-0.5b (bf16, seed 0) into {} ...", dir.display());
                synth_with(Preset::Qwen25_05b, 0, DType::Bf16, &dir, &SynthOptions::default())?;
            }
            dir
        }
    };
    println!(
        "| mode | TP | batch | prompt tok | new tok | prefill tok/s | decode tok/s | new tok/s incl. prefill | backend |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for (&mode, &tp) in a.modes.iter().flat_map(|m| a.tps.iter().map(move |t| (m, t))) {
        let mut opts = a.engine.options();
        opts.mode = mode;
        let info = ModelInfo::load(&model, &opts, &backend_fingerprint_name(&opts)?)?;
        let cluster_args = ClusterArgs::embedded(tp, (opts.threads.min(cores) / tp).max(1));
        let (mut execs, _cluster) = executors(&model, &cluster_args, &opts, &info)?;
        let executor = execs.remove(0);
        let backend = if tp == 1 {
            format!("cpu/{} threads/{}", opts.threads, mode.as_str())
        } else {
            format!("{tp} nodes × {} threads/{}", (opts.threads.min(cores) / tp).max(1), mode.as_str())
        };
        let mut engine = Engine::new(info.scheduler_config(&opts), executor, info.tokenizer.clone())?;
        let vocab = info.tokenizer.vocab_size().min(info.config.vocab_size) as u32;
        for &b in &a.batch {
            for i in 0..b {
                // Distinct prompts of exactly `prompt_tokens` ids, no shared prefix.
                let prompt_ids =
                    (0..a.prompt_tokens as u32).map(|t| 3 + (t * 7919 + i as u32 * 104_729) % (vocab - 3)).collect();
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

/// The synthesized-model cache directory (`$LOCKSTEP_CACHE_DIR`, `$XDG_CACHE_HOME/lockstep`,
/// `~/.cache/lockstep`, else the temp dir) for `name`.
fn synth_cache_dir(name: &str) -> PathBuf {
    lockstep_node::fingerprint::HashCache::from_env()
        .dir()
        .map(|d| d.join("synth"))
        .unwrap_or_else(|| std::env::temp_dir().join("lockstep-synth"))
        .join(name)
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
        eprintln!("../shared/models/stories260K/hf not found: synthesizing a tiny model into {}", dir.display());
        synth_with(Preset::Tiny, 0, DType::F32, &dir, &SynthOptions::default())?;
    }
    Ok(dir)
}

fn demo(a: DemoArgs) -> Result<()> {
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
        let cluster_args = ClusterArgs::embedded(tp, 1);
        let (mut execs, cluster) = executors(&model, &cluster_args, &opts, &info)?;
        if let Some(c) = &cluster {
            println!(
                "\ncoordinator listening for nodes on {} (QUIC, mutual TLS); node pids {:?}",
                c.addr,
                c.node_pids()
            );
        }
        let exec = execs.remove(0);
        let mut engine = Engine::new(info.scheduler_config(&opts), exec, info.tokenizer.clone())?;
        let mut ids = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            for s in sampling {
                // Background traffic arrives before, between and after the demo prompts.
                for j in 0..others / prompts.len() {
                    let text = format!("{} {}", prompts[(i + j) % prompts.len()], "and then ".repeat(j));
                    engine.add(GenerateRequest {
                        prompt_ids: info.tokenizer.encode(&text, true)?,
                        sampling: SamplingParams { seed: j as u64, ..s },
                        max_tokens: 8 + 5 * j as u32,
                        stop: vec![],
                        stop_token_ids: vec![],
                        ignore_eos: false,
                        skip_special_tokens: true,
                    })?;
                    engine.step()?;
                }
                ids.push(engine.add(GenerateRequest {
                    prompt_ids: info.tokenizer.encode(p, true)?,
                    sampling: s,
                    max_tokens: a.max_tokens,
                    stop: vec![],
                    stop_token_ids: vec![],
                    ignore_eos: false,
                    skip_special_tokens: true,
                })?);
            }
        }
        while engine.has_work() {
            engine.step()?;
        }
        println!("\n== {label} (system_fingerprint {})", info.system_fingerprint);
        let mut answers = Vec::new();
        for (k, id) in ids.into_iter().enumerate() {
            let out = engine.take_output(id).expect("finished");
            let mode = if k % 2 == 0 { "greedy" } else { "T=0.8 seed 42" };
            println!("[{}] {:?} → {:?}", mode, prompts[k / 2], out.text);
            answers.push((out.token_ids, out.logprobs.iter().map(|l| l.to_bits()).collect(), out.text));
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

fn soak(a: SoakArgs) -> Result<()> {
    use lockstep_coordinator::soak::{post_summary, run_soak, write_report, Comparison, SoakOptions};
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
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let out = a.out.clone().unwrap_or_else(lockstep_coordinator::soak::default_out_dir);
    let first = run_soak(&opts)?;
    let deterministic = match &a.compare_url {
        None => {
            first.print();
            write_report(&out, &[&first], None)?;
            first.is_deterministic()
        }
        Some(url) => {
            let second = run_soak(&SoakOptions { url: url.clone(), model: None, ..opts.clone() })?;
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
            eprintln!("note: could not post the summary to {}/ops/soak: {e}", a.url);
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

fn serve(a: ServeArgs) -> Result<()> {
    use lockstep_coordinator::api::{self, H3Options, ServeOptions, TlsSource};
    use lockstep_coordinator::ops::{canary::Canary, metrics::Metrics};
    use lockstep_coordinator::service::{Service, ServiceOptions};
    use lockstep_coordinator::state::{AppState, Auth};

    let mut api_keys = a.api_key.clone();
    if let Some(path) = &a.api_key_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        api_keys
            .extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
        if api_keys.is_empty() {
            bail!("{}: no API keys in the file", path.display());
        }
    }
    let opts = a.engine.options();
    let mut info = ModelInfo::load(&a.model, &opts, &backend_fingerprint_name(&opts)?)?;
    if let Some(name) = &a.served_model_name {
        info.name = name.clone();
    }
    let (executors, cluster) = executors(&a.model, &a.cluster, &opts, &info)?;
    let metrics = Arc::new(Metrics::new());
    let sched = info.scheduler_config(&opts);
    let service = Service::start(
        info,
        executors,
        cluster,
        sched,
        ServiceOptions { max_waiting: a.max_waiting },
        metrics.clone(),
    )?;
    let service = Arc::new(service);
    let canary = match a.canary_every {
        0 => Arc::new(Canary::new()),
        secs => Canary::start(service.clone(), metrics.clone(), std::time::Duration::from_secs(secs)),
    };
    let state = Arc::new(AppState {
        service,
        metrics,
        canary,
        auth: Auth { api_keys, ops_keys: a.ops_key.clone() },
        soak: std::sync::Mutex::new(None),
    });
    let h3 = (!a.no_h3).then(|| {
        let pem_out = a.h3_cert_out.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("lockstep-serve-{}", std::process::id())).join("h3-cert.pem")
        });
        H3Options {
            listen: a.h3_listen,
            tls: TlsSource::from_dir_or_self_signed(a.cluster.tls_dir.as_deref(), pem_out),
        }
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("lockstep-http").build()?;
    runtime.block_on(api::run(state, ServeOptions { listen: a.listen, h3 }))
}

fn loadgen(a: LoadgenArgs) -> Result<()> {
    use lockstep_coordinator::api::loadgen::{run, table, LoadgenOptions};
    let prompts = if a.prompt.is_empty() { vec!["Once upon a time".to_string()] } else { a.prompt.clone() };
    let opts = LoadgenOptions {
        url: a.url.clone(),
        api_key: a.api_key.clone(),
        model: a.model.clone(),
        concurrency: a.concurrency.clone(),
        requests: a.requests,
        max_tokens: a.max_tokens,
        prompts,
        temperature: a.temperature,
        request_timeout: std::time::Duration::from_secs(600),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let reports = runtime.block_on(run(&opts))?;
    if a.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", table(&reports));
    }
    Ok(())
}
