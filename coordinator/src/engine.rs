//! The engine loop: the sans-IO [`Scheduler`] plus a [`StepExecutor`] that runs its plans, plus
//! the per-sequence text state (incremental detokenizer, stop strings).
//!
//! [`Engine::step`] is one turn of the loop: plan → execute → apply → decode text. It never
//! blocks on anything but the executor, so the command line, the HTTP server and the tests drive
//! the same code. The executor is the seam for tensor parallelism: [`LocalExecutor`] runs the
//! whole model in this process; a remote tensor-parallel group implements the same trait.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lockstep_kernels::{
    merge_shard_samples, Backend, CpuBackend, CpuConfig, Isa, KernelMode, NumericsConfig, SamplingParams,
};
use lockstep_node::config::ModelConfig;
use lockstep_node::model::{Model, ModelOptions, SingleRank, StepError};
use lockstep_node::shard::{auto_reduce_segments, ShardPlan};
use lockstep_node::weights::SafetensorsRepo;
use lockstep_proto::step::{StepPlan, StepResult};

use crate::scheduler::{AddRequestError, FinishReason, Scheduler, SchedulerConfig, SeqEvent, SeqParams};
use crate::tokenizer::{DecodeStream, StopCheck, StopStringMatcher, Tokenizer};

/// Runs one [`StepPlan`] and returns the sampled tokens.
pub trait StepExecutor: Send {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("step failed: {0}")]
    Step(#[from] StepError),
    #[error("{0}")]
    Other(String),
}

/// Where an in-process model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// `cuda:N`; `native` selects the tensor-core numerics (invariant per GPU class) instead of
    /// the portable ones (bit-identical to the CPU).
    Cuda { ordinal: usize, native: bool },
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|ordinal| Device::Cuda { ordinal, native: true })
                .ok_or_else(|| format!("unknown device {s:?} (cpu or cuda:N)")),
        }
    }
}

/// Everything that sizes and configures one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    pub threads: usize,
    pub mode: KernelMode,
    pub isa: Option<Isa>,
    /// `None`: derived from the model shape ([`auto_reduce_segments`]).
    pub reduce_segments: Option<usize>,
    pub kv_chunk: usize,
    pub block_size: usize,
    /// KV cache budget in MiB (all layers, K and V).
    pub kv_cache_mib: usize,
    /// Exact number of KV blocks (overrides `kv_cache_mib`).
    pub num_blocks: Option<usize>,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    pub max_running: usize,
    /// `None`: the model's `max_position_embeddings`, at most 32768.
    pub max_context: Option<usize>,
    pub device: Device,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            mode: KernelMode::Invariant,
            isa: None,
            reduce_segments: None,
            kv_chunk: lockstep_kernels::DEFAULT_KV_CHUNK,
            block_size: 16,
            kv_cache_mib: 512,
            num_blocks: None,
            max_batch_tokens: 2048,
            prefill_chunk: 512,
            max_running: 64,
            max_context: None,
            device: Device::Cpu,
        }
    }
}

/// The backend's name in the determinism fingerprint for these options (for a native-numerics
/// GPU it names the GPU class, so it asks the device).
pub fn backend_fingerprint_name(opts: &EngineOptions) -> anyhow::Result<String> {
    match opts.device {
        Device::Cpu => Ok(CpuBackend::fingerprint_name_for(opts.mode).to_string()),
        Device::Cuda { native: false, .. } => Ok("portable".to_string()),
        Device::Cuda { ordinal, native: true } => cuda_native_name(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn cuda_native_name(ordinal: usize) -> anyhow::Result<String> {
    use lockstep_kernels::cuda::{CudaBackend, CudaConfig, CudaMode};
    let be =
        CudaBackend::new(CudaConfig { device: ordinal, numerics: NumericsConfig::default(), mode: CudaMode::Native })?;
    Ok(be.fingerprint_name())
}

#[cfg(not(feature = "cuda"))]
fn cuda_native_name(_ordinal: usize) -> anyhow::Result<String> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> anyhow::Error {
    anyhow::anyhow!(
        "this lockstep was built without CUDA support: rebuild with `cargo build --release --features cuda`"
    )
}

/// What a loaded model deployment is: its config, tokenizer, numerics and fingerprint.
#[derive(Clone)]
pub struct ModelInfo {
    pub dir: PathBuf,
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: Arc<Tokenizer>,
    pub numerics: NumericsConfig,
    pub max_context: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub system_fingerprint: String,
}

impl ModelInfo {
    /// Read config and tokenizer, resolve the numerics and compute the determinism fingerprint.
    pub fn load(dir: &Path, opts: &EngineOptions, backend_name: &str) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!("model directory {} does not exist", dir.display());
        }
        // Absolute, so node processes started elsewhere find the same files.
        let dir = &dir.canonicalize().map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let config = ModelConfig::from_dir(dir)?;
        let tokenizer = Arc::new(Tokenizer::from_dir(dir)?);
        let reduce_segments = opts.reduce_segments.unwrap_or_else(|| auto_reduce_segments(&config));
        let numerics = NumericsConfig { reduce_segments, kv_chunk: opts.kv_chunk };
        numerics.validate()?;
        let max_context = opts.max_context.unwrap_or(config.max_position_embeddings.min(32768));
        let repo = SafetensorsRepo::open(dir)?;
        let (system_fingerprint, _) = lockstep_node::fingerprint::deployment_fingerprint(
            &repo,
            &config,
            backend_name,
            numerics.reduce_segments,
            numerics.kv_chunk,
        )?;
        let kv_bytes_per_slot = 2 * config.num_hidden_layers * config.kv_dim() * 4;
        let num_blocks =
            opts.num_blocks.unwrap_or((opts.kv_cache_mib << 20) / (kv_bytes_per_slot * opts.block_size).max(1));
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let name = if name == "hf" {
            dir.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or(name)
        } else {
            name
        };
        Ok(ModelInfo {
            dir: dir.to_path_buf(),
            name,
            config,
            tokenizer,
            numerics,
            max_context,
            num_blocks: num_blocks.max(1),
            block_size: opts.block_size,
            system_fingerprint,
        })
    }

    pub fn scheduler_config(&self, opts: &EngineOptions) -> SchedulerConfig {
        SchedulerConfig {
            block_size: self.block_size as u32,
            num_blocks: self.num_blocks as u32,
            max_batch_tokens: opts.max_batch_tokens as u32,
            prefill_chunk: opts.prefill_chunk as u32,
            max_running: opts.max_running as u32,
            max_model_len: self.max_context as u32,
        }
    }
}

pub fn cpu_backend(opts: &EngineOptions, numerics: NumericsConfig) -> anyhow::Result<CpuBackend> {
    Ok(CpuBackend::new(CpuConfig { threads: opts.threads.max(1), isa: opts.isa, mode: opts.mode, numerics })?)
}

impl StepExecutor for Box<dyn StepExecutor> {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        (**self).execute(plan)
    }
}

/// The whole model in this process, on the CPU or on one GPU.
pub struct LocalExecutor {
    model: LocalModel,
}

enum LocalModel {
    Cpu(Model<CpuBackend>),
    #[cfg(feature = "cuda")]
    Cuda(Model<lockstep_kernels::cuda::CudaBackend>),
}

impl LocalExecutor {
    pub fn load(info: &ModelInfo, opts: &EngineOptions) -> anyhow::Result<Self> {
        let plan = ShardPlan::new(&info.config, 0, 1, info.numerics.reduce_segments)?;
        let mopts =
            ModelOptions { num_blocks: info.num_blocks, block_size: info.block_size, max_context: info.max_context };
        let model = match opts.device {
            Device::Cpu => {
                let be = cpu_backend(opts, info.numerics)?;
                LocalModel::Cpu(Model::load(be, &info.dir, info.config.clone(), plan, mopts, Box::new(SingleRank))?)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda { ordinal, native } => {
                use lockstep_kernels::cuda::{CudaBackend, CudaConfig, CudaMode};
                let mode = if native { CudaMode::Native } else { CudaMode::Portable };
                let be = CudaBackend::new(CudaConfig { device: ordinal, numerics: info.numerics, mode })?;
                LocalModel::Cuda(Model::load(be, &info.dir, info.config.clone(), plan, mopts, Box::new(SingleRank))?)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda { .. } => return Err(no_cuda()),
        };
        Ok(LocalExecutor { model })
    }

    /// A description of the backend for benchmark tables.
    pub fn describe(&self) -> String {
        match &self.model {
            LocalModel::Cpu(m) => describe_backend(m.backend()),
            #[cfg(feature = "cuda")]
            LocalModel::Cuda(m) => format!("cuda/{}/{}", m.backend().device_name(), m.backend().fingerprint_name()),
        }
    }
}

impl StepExecutor for LocalExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, ExecError> {
        let samples = match &mut self.model {
            LocalModel::Cpu(m) => m.step(plan)?,
            #[cfg(feature = "cuda")]
            LocalModel::Cuda(m) => m.step(plan)?,
        };
        let sampled = samples.iter().map(|s| (s.seq_id, merge_shard_samples(&[&s.sample], &s.request))).collect();
        Ok(StepResult { step_id: plan.step_id, sampled })
    }
}

/// A generation request after validation: token ids and resolved parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    /// `sampling.seed` is already resolved (drawn when the client gave none).
    pub sampling: SamplingParams,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
}

/// What a sequence produced so far.
#[derive(Debug, Clone, Default)]
pub struct SeqOutput {
    pub prompt_len: usize,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: Option<FinishReason>,
}

struct SeqText {
    out: SeqOutput,
    decode: DecodeStream,
    stop: StopStringMatcher,
}

/// One thing that happened to a sequence during a step.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A generated token and the text it completed (possibly empty: a partial UTF-8 character
    /// or a possible stop-string prefix is held back).
    Token { seq_id: u64, token_id: u32, logprob: f32, text: String, index: u32 },
    /// The sequence ended; `text` is any held-back text released at the end.
    Finished { seq_id: u64, reason: FinishReason, text: String },
}

pub struct Engine<E: StepExecutor> {
    scheduler: Scheduler,
    executor: E,
    tokenizer: Arc<Tokenizer>,
    seqs: HashMap<u64, SeqText>,
    next_id: u64,
    steps: u64,
    last_plan: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Add(#[from] AddRequestError),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

impl<E: StepExecutor> Engine<E> {
    pub fn new(scheduler: SchedulerConfig, executor: E, tokenizer: Arc<Tokenizer>) -> anyhow::Result<Self> {
        Ok(Engine {
            scheduler: Scheduler::new(scheduler)?,
            executor,
            tokenizer,
            seqs: HashMap::new(),
            next_id: 1,
            steps: 0,
            last_plan: Vec::new(),
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }
    pub fn executor(&self) -> &E {
        &self.executor
    }
    /// Steps executed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
    /// Sequences in the most recent step's plan (to see when a request first left the queue).
    pub fn last_plan(&self) -> &[u64] {
        &self.last_plan
    }

    /// Queue a request; it joins the running batch at the next step.
    pub fn add(&mut self, req: GenerateRequest) -> Result<u64, EngineError> {
        let seq_id = self.next_id;
        self.next_id += 1;
        let params = SeqParams {
            sampling: req.sampling,
            max_tokens: req.max_tokens,
            eos_token_ids: self.tokenizer.eos_token_ids().to_vec(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
        };
        self.scheduler.add_request(seq_id, req.prompt_ids.clone(), params)?;
        self.seqs.insert(
            seq_id,
            SeqText {
                out: SeqOutput { prompt_len: req.prompt_ids.len(), ..Default::default() },
                decode: self.tokenizer.decode_stream_after(&req.prompt_ids, req.skip_special_tokens),
                stop: StopStringMatcher::new(req.stop),
            },
        );
        Ok(seq_id)
    }

    /// End a sequence now (client disconnected): frees its KV blocks at once.
    pub fn abort(&mut self, seq_id: u64) -> Option<EngineEvent> {
        let ev = self.scheduler.abort(seq_id, FinishReason::Abort)?;
        self.apply(vec![ev]).pop()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.num_running() + self.scheduler.num_waiting() > 0
    }

    /// Output of a sequence (finished ones stay until taken).
    pub fn output(&self, seq_id: u64) -> Option<&SeqOutput> {
        self.seqs.get(&seq_id).map(|s| &s.out)
    }
    pub fn take_output(&mut self, seq_id: u64) -> Option<SeqOutput> {
        self.seqs.remove(&seq_id).map(|s| s.out)
    }

    /// One turn of the loop. Returns the events of the step (empty when idle).
    pub fn step(&mut self) -> Result<Vec<EngineEvent>, EngineError> {
        let Some(plan) = self.scheduler.schedule() else {
            let evs = self.scheduler.take_events();
            return Ok(self.apply(evs));
        };
        let early = self.scheduler.take_events();
        self.last_plan = plan.chunks.iter().map(|c| c.seq_id).collect();
        let result = match self.executor.execute(&plan) {
            Ok(r) => r,
            Err(e) => {
                self.scheduler.on_step_failed(plan.step_id);
                return Err(e.into());
            }
        };
        self.steps += 1;
        let mut evs = early;
        evs.extend(self.scheduler.on_step_result(result));
        Ok(self.apply(evs))
    }

    /// Fail every running and waiting sequence (the executor is gone).
    pub fn fail_all(&mut self, message: &str) -> Vec<EngineEvent> {
        let ids: Vec<u64> =
            self.seqs.iter().filter(|(_, s)| s.out.finish_reason.is_none()).map(|(&id, _)| id).collect();
        let evs = ids
            .into_iter()
            .filter_map(|id| self.scheduler.abort(id, FinishReason::Error(message.to_string())))
            .collect();
        self.apply(evs)
    }

    fn apply(&mut self, evs: Vec<SeqEvent>) -> Vec<EngineEvent> {
        let mut out = Vec::new();
        for ev in evs {
            match ev {
                SeqEvent::Token { seq_id, token, index } => {
                    let Some(s) = self.seqs.get_mut(&seq_id) else { continue };
                    s.out.token_ids.push(token.id);
                    s.out.logprobs.push(token.logprob);
                    // A decode error cannot happen for ids the model produced within the
                    // tokenizer's vocab; ids beyond it (padded embedding rows) decode to nothing.
                    let piece = s.decode.push(token.id).unwrap_or_default();
                    match s.stop.push(&piece) {
                        StopCheck::Continue { text } => {
                            s.out.text.push_str(&text);
                            out.push(EngineEvent::Token {
                                seq_id,
                                token_id: token.id,
                                logprob: token.logprob,
                                text,
                                index,
                            });
                        }
                        StopCheck::Stopped { text, .. } => {
                            s.out.text.push_str(&text);
                            out.push(EngineEvent::Token {
                                seq_id,
                                token_id: token.id,
                                logprob: token.logprob,
                                text,
                                index,
                            });
                            if let Some(fin) = self.scheduler.abort(seq_id, FinishReason::Stop) {
                                out.extend(self.apply(vec![fin]));
                            }
                        }
                    }
                }
                SeqEvent::Finished { seq_id, reason } => {
                    let Some(s) = self.seqs.get_mut(&seq_id) else { continue };
                    if s.out.finish_reason.is_some() {
                        continue;
                    }
                    let mut tail = String::new();
                    if !s.stop.is_stopped() {
                        let rest = s.decode.flush().unwrap_or_default();
                        let (StopCheck::Continue { text } | StopCheck::Stopped { text, .. }) = s.stop.push(&rest);
                        tail.push_str(&text);
                        if !s.stop.is_stopped() {
                            tail.push_str(&s.stop.finish());
                        }
                    }
                    s.out.text.push_str(&tail);
                    s.out.finish_reason = Some(reason.clone());
                    out.push(EngineEvent::Finished { seq_id, reason, text: tail });
                }
            }
        }
        out
    }
}

/// Run a batch of requests through one engine to completion. Request `(i, r)` joins the engine at
/// step `i × stagger`; `on_event` sees every event with the request's index (for streaming).
/// When the executor fails (a node died), every unfinished request ends with
/// [`FinishReason::Error`] naming the cause, including those that had not arrived yet.
pub fn run_batch<E: StepExecutor>(
    engine: &mut Engine<E>,
    requests: Vec<(usize, GenerateRequest)>,
    stagger: u64,
    mut on_event: impl FnMut(usize, &EngineEvent),
) -> Vec<(usize, SeqOutput)> {
    let mut pending: std::collections::VecDeque<(usize, usize, GenerateRequest)> =
        requests.into_iter().enumerate().map(|(k, (i, r))| (k, i, r)).collect();
    let mut ids: Vec<(usize, u64)> = Vec::new();
    let mut outputs: Vec<(usize, SeqOutput)> = Vec::new();
    let mut failure: Option<String> = None;
    let mut step = 0u64;
    loop {
        while let Some((k, _, _)) = pending.front() {
            if failure.is_none() && *k as u64 * stagger > step {
                break;
            }
            let (_, i, req) = pending.pop_front().expect("front exists");
            match (&failure, engine.add(req)) {
                (None, Ok(id)) => ids.push((i, id)),
                (Some(f), _) => outputs.push((i, failed_output(f.clone()))),
                (None, Err(e)) => outputs.push((i, failed_output(e.to_string()))),
            }
        }
        if !engine.has_work() && pending.is_empty() {
            break;
        }
        let events = match engine.step() {
            Ok(evs) => evs,
            Err(e) => {
                let msg = e.to_string();
                failure = Some(msg.clone());
                engine.fail_all(&msg)
            }
        };
        for ev in &events {
            let seq = match ev {
                EngineEvent::Token { seq_id, .. } | EngineEvent::Finished { seq_id, .. } => *seq_id,
            };
            if let Some(&(i, _)) = ids.iter().find(|(_, id)| *id == seq) {
                on_event(i, ev);
            }
        }
        step += 1;
    }
    for (i, id) in ids {
        if let Some(out) = engine.take_output(id) {
            outputs.push((i, out));
        }
    }
    outputs
}

fn failed_output(message: String) -> SeqOutput {
    SeqOutput { finish_reason: Some(FinishReason::Error(message)), ..Default::default() }
}

/// A seed for a request that gave none: fresh per call, so creative sampling varies, and always
/// reported back so the answer can be replayed.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() >> 11 // 53 bits: survives a round trip through a JSON number in any client
}

/// `backend` accessor used by the bench to report the ISA in use.
pub fn describe_backend(be: &CpuBackend) -> String {
    format!("cpu/{}/{} threads/{}", be.isa().as_str(), be.threads(), be.mode().as_str())
}
