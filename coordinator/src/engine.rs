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
use lockstep_node::gguf::is_gguf_path;
use lockstep_node::model::{Model, ModelOptions, SingleRank, StepError};
use lockstep_node::shard::{auto_reduce_segments, ShardPlan};
use lockstep_node::source::{load_config, WeightStore};
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
    /// `dir` is a Hugging Face model directory or a `.gguf` file.
    pub fn load(dir: &Path, opts: &EngineOptions, backend_name: &str) -> anyhow::Result<Self> {
        if is_gguf_path(dir) {
            if !dir.is_file() {
                anyhow::bail!("model file {} does not exist", dir.display());
            }
        } else if !dir.is_dir() {
            anyhow::bail!("model directory {} does not exist", dir.display());
        }
        // Absolute, so node processes started elsewhere find the same files.
        let dir = &dir.canonicalize().map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let config = load_config(dir)?;
        let tokenizer = Arc::new(Tokenizer::load(dir)?);
        let reduce_segments = opts.reduce_segments.unwrap_or_else(|| auto_reduce_segments(&config));
        let numerics = NumericsConfig { reduce_segments, kv_chunk: opts.kv_chunk };
        numerics.validate()?;
        let max_context = opts.max_context.unwrap_or(config.max_position_embeddings.min(32768));
        let repo = WeightStore::open(dir)?;
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
        // A GGUF model is named by its file stem (`SmolLM2-135M-Instruct.Q4_1`).
        let name = if is_gguf_path(dir) { dir.file_stem() } else { dir.file_name() };
        let name = name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
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

// One per process, never moved after load: the variants' sizes (each a whole `Model`) differ by a
// few hundred bytes, which boxing would not make cheaper anywhere.
#[allow(clippy::large_enum_variant)]
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

/// The one identity of a request, from the front end that accepted it to the scheduler's sequence
/// id, the engine's events, the logs and the ops API. The [`crate::service::Service`] hands them
/// out; a request keeps its id when it migrates to another group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
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

/// Why a request never ran, or stopped being served. `error_type` names are stable: the API's
/// error body and the metrics' labels use them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The engine refused the request (empty prompt, too long, does not fit the KV cache, …).
    #[error(transparent)]
    Invalid(#[from] AddRequestError),
    /// No replica can serve it now (every group is down and none formed in time).
    #[error("no replica is available: {0}")]
    Unavailable(String),
    /// The engine thread that held the request is gone.
    #[error("the engine stopped")]
    EngineStopped,
}

impl RequestError {
    pub fn error_type(&self) -> &'static str {
        match self {
            RequestError::Invalid(e) => e.error_type(),
            RequestError::Unavailable(_) => "unavailable",
            RequestError::EngineStopped => "internal",
        }
    }
    /// The client's fault (HTTP 400), as opposed to the server's state (503) or a bug (500).
    pub fn is_client_error(&self) -> bool {
        matches!(self, RequestError::Invalid(_))
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What happened to a request: the one event type from the engine to every front end (HTTP,
/// command line, canary, tests). A request's events are some `Token`s, then exactly one
/// `Finished` or `Rejected`.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Generated token number `index` and the text it completed (possibly empty: a partial UTF-8
    /// character or a possible stop-string prefix is held back).
    Token { id: RequestId, token_id: u32, logprob: f32, text: String, index: u32 },
    /// The request ended; `text` is any held-back text released at the end.
    Finished { id: RequestId, reason: FinishReason, text: String, usage: Usage },
    /// The request never ran (or could not be continued anywhere).
    Rejected { id: RequestId, error: RequestError },
}

impl EngineEvent {
    pub fn id(&self) -> RequestId {
        match self {
            EngineEvent::Token { id, .. } | EngineEvent::Finished { id, .. } | EngineEvent::Rejected { id, .. } => *id,
        }
    }
    /// The request's last event.
    pub fn is_last(&self) -> bool {
        !matches!(self, EngineEvent::Token { .. })
    }
}

/// A request's answer assembled from its events: what the command line prints, the non-streaming
/// API returns and the tests compare. The engine keeps none of this; whoever needs the whole
/// answer collects it here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqOutput {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// The text each token completed (for per-token logprobs).
    pub pieces: Vec<String>,
    pub text: String,
    pub finish_reason: Option<FinishReason>,
    pub usage: Usage,
    pub error: Option<RequestError>,
}

impl SeqOutput {
    pub fn push(&mut self, ev: &EngineEvent) {
        match ev {
            EngineEvent::Token { token_id, logprob, text, .. } => {
                self.token_ids.push(*token_id);
                self.logprobs.push(*logprob);
                self.pieces.push(text.clone());
                self.text.push_str(text);
            }
            EngineEvent::Finished { reason, text, usage, .. } => {
                self.text.push_str(text);
                self.finish_reason = Some(reason.clone());
                self.usage = *usage;
            }
            EngineEvent::Rejected { error, .. } => {
                self.error = Some(error.clone());
                self.finish_reason = Some(FinishReason::Error(error.to_string()));
            }
        }
    }
    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// Everything an engine keeps about one request besides the scheduler's token history: the text
/// state that turns token ids into the client's bytes. It travels with the request when it
/// migrates, so the text continues exactly as it would have.
#[derive(Debug, Clone)]
struct SeqText {
    request: GenerateRequest,
    decode: DecodeStream,
    stop: StopStringMatcher,
    completion_tokens: usize,
    /// Times this request has moved to another engine.
    migrations: u32,
}

/// An unfinished request taken out of an engine whose executor failed ([`Engine::evacuate`]), to be
/// resumed on another engine with [`Engine::resume`]: prompt, tokens so far and text state.
#[derive(Debug, Clone)]
pub struct Migrating {
    pub id: RequestId,
    /// The prompt followed by the generated ids.
    tokens: Vec<u32>,
    prompt_len: usize,
    params: SeqParams,
    text: SeqText,
    /// How many times this request has moved (the service's `--migration-limit`).
    pub migrations: u32,
}

impl Migrating {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A step whose executor failed. The requests stay in the engine (see [`Engine::step`]); `events`
/// are those that happened anyway (requests failed while planning) and must still be delivered.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct StepFailure {
    pub error: ExecError,
    pub events: Vec<EngineEvent>,
}

/// One replica's engine: the sans-IO [`Scheduler`], the [`StepExecutor`] that runs its plans, and
/// each request's text state. [`Engine::step`] is one turn of the loop; the service's engine
/// thread is the only loop that drives it outside tests.
pub struct Engine<E: StepExecutor> {
    scheduler: Scheduler,
    executor: E,
    tokenizer: Arc<Tokenizer>,
    seqs: HashMap<RequestId, SeqText>,
    steps: u64,
    last_plan: Vec<RequestId>,
}

impl<E: StepExecutor> Engine<E> {
    pub fn new(scheduler: SchedulerConfig, executor: E, tokenizer: Arc<Tokenizer>) -> anyhow::Result<Self> {
        Ok(Engine {
            scheduler: Scheduler::new(scheduler)?,
            executor,
            tokenizer,
            seqs: HashMap::new(),
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
    /// Requests in the most recent step's plan (to see when a request first left the queue).
    pub fn last_plan(&self) -> &[RequestId] {
        &self.last_plan
    }

    fn seq_params(&self, req: &GenerateRequest) -> SeqParams {
        SeqParams {
            sampling: req.sampling,
            max_tokens: req.max_tokens,
            eos_token_ids: self.tokenizer.eos_token_ids().to_vec(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
        }
    }

    /// Queue a request under the caller's id; it joins the running batch at the next step.
    pub fn add(&mut self, id: RequestId, req: GenerateRequest) -> Result<(), AddRequestError> {
        let params = self.seq_params(&req);
        self.scheduler.add_request(id.0, req.prompt_ids.clone(), params)?;
        let text = SeqText {
            decode: self.tokenizer.decode_stream_after(&req.prompt_ids, req.skip_special_tokens),
            stop: StopStringMatcher::new(req.stop.clone()),
            completion_tokens: 0,
            migrations: 0,
            request: req,
        };
        self.seqs.insert(id, text);
        Ok(())
    }

    /// Continue a request that another engine started: it is re-prefilled from its prompt and
    /// the tokens already emitted, and its next token is the one the uninterrupted run would
    /// have produced (sampling is keyed by the generated token's index).
    pub fn resume(&mut self, m: Migrating) -> Result<(), Box<(AddRequestError, Migrating)>> {
        if let Err(e) = self.scheduler.resume_request(m.id.0, m.tokens.clone(), m.prompt_len, m.params.clone()) {
            return Err(Box::new((e, m)));
        }
        let mut text = m.text;
        text.migrations = m.migrations;
        self.seqs.insert(m.id, text);
        Ok(())
    }

    /// Take every unfinished request out (the executor failed), oldest first, for
    /// [`Engine::resume`] elsewhere. The engine is empty afterwards.
    pub fn evacuate(&mut self) -> Vec<Migrating> {
        let mut out = Vec::new();
        for s in self.scheduler.evacuate() {
            let id = RequestId(s.seq_id);
            let Some(text) = self.seqs.remove(&id) else { continue };
            let migrations = text.migrations;
            out.push(Migrating { id, tokens: s.tokens, prompt_len: s.prompt_len, params: s.params, text, migrations });
        }
        self.seqs.clear();
        out
    }

    /// End a request now (client disconnected): frees its KV blocks at once.
    pub fn abort(&mut self, id: RequestId) -> Option<EngineEvent> {
        let ev = self.scheduler.abort(id.0, FinishReason::Abort)?;
        self.apply(vec![ev]).pop()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.num_running() + self.scheduler.num_waiting() > 0
    }

    /// Whether a request is still in this engine (waiting or running).
    pub fn contains(&self, id: RequestId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// One turn of the loop. Returns the events of the step (empty when idle). When the
    /// executor fails, the step is forgotten by the scheduler and every request stays queued:
    /// the caller decides whether to fail them ([`Engine::fail_all`]) or move them elsewhere
    /// ([`Engine::evacuate`]).
    pub fn step(&mut self) -> Result<Vec<EngineEvent>, StepFailure> {
        let Some(plan) = self.scheduler.schedule() else {
            let evs = self.scheduler.take_events();
            return Ok(self.apply(evs));
        };
        let early = self.scheduler.take_events();
        // What a failing executor logs names the step it failed on.
        let _step =
            tracing::info_span!("step", step = plan.step_id, sequences = plan.chunks.len(), tokens = plan.num_tokens())
                .entered();
        self.last_plan = plan.chunks.iter().map(|c| RequestId(c.seq_id)).collect();
        let result = match self.executor.execute(&plan) {
            Ok(r) => r,
            Err(error) => {
                self.scheduler.on_step_failed(plan.step_id);
                // Sequences that ended while planning have ended whatever happens next.
                return Err(StepFailure { error, events: self.apply(early) });
            }
        };
        self.steps += 1;
        let mut evs = early;
        evs.extend(self.scheduler.on_step_result(result));
        Ok(self.apply(evs))
    }

    /// Fail every request (the executor is gone and nothing can take them).
    pub fn fail_all(&mut self, message: &str) -> Vec<EngineEvent> {
        let mut ids: Vec<RequestId> = self.seqs.keys().copied().collect();
        ids.sort();
        let evs = ids
            .into_iter()
            .filter_map(|id| self.scheduler.abort(id.0, FinishReason::Error(message.to_string())))
            .collect();
        self.apply(evs)
    }

    fn apply(&mut self, evs: Vec<SeqEvent>) -> Vec<EngineEvent> {
        let mut out = Vec::new();
        for ev in evs {
            match ev {
                SeqEvent::Token { seq_id, token, index } => {
                    let id = RequestId(seq_id);
                    let Some(s) = self.seqs.get_mut(&id) else { continue };
                    s.completion_tokens += 1;
                    // A decode error cannot happen for ids the model produced within the
                    // tokenizer's vocab; ids beyond it (padded embedding rows) decode to nothing.
                    let piece = s.decode.push(token.id).unwrap_or_default();
                    let (StopCheck::Continue { text } | StopCheck::Stopped { text, .. }) = s.stop.push(&piece);
                    let stopped = s.stop.is_stopped();
                    out.push(EngineEvent::Token { id, token_id: token.id, logprob: token.logprob, text, index });
                    if stopped {
                        if let Some(fin) = self.scheduler.abort(seq_id, FinishReason::Stop) {
                            out.extend(self.apply(vec![fin]));
                        }
                    }
                }
                SeqEvent::Finished { seq_id, reason } => {
                    let id = RequestId(seq_id);
                    let Some(mut s) = self.seqs.remove(&id) else { continue };
                    let mut tail = String::new();
                    if !s.stop.is_stopped() {
                        let rest = s.decode.flush().unwrap_or_default();
                        let (StopCheck::Continue { text } | StopCheck::Stopped { text, .. }) = s.stop.push(&rest);
                        tail.push_str(&text);
                        if !s.stop.is_stopped() {
                            tail.push_str(&s.stop.finish());
                        }
                    }
                    let usage =
                        Usage { prompt_tokens: s.request.prompt_ids.len(), completion_tokens: s.completion_tokens };
                    out.push(EngineEvent::Finished { id, reason, text: tail, usage });
                }
            }
        }
        out
    }
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
    // Native numerics are named as the fingerprint names them: the tile unit is what matters.
    let numerics = match be.mode() {
        KernelMode::Native => be.fingerprint_name(),
        mode => mode.as_str().to_string(),
    };
    format!("cpu/{}/{} threads/{numerics}", be.isa().as_str(), be.threads())
}
