//! The continuous-batching scheduler, as a sans-IO state machine.
//!
//! The scheduler owns every request's token history and the KV-cache block accounting; it knows
//! nothing of threads, clocks, sockets or models. The engine loop drives it:
//!
//! ```text
//! add_request / abort  ──▶  schedule() ──StepPlan──▶ engine ──StepResult──▶ on_step_result()
//!                                ▲                                            │
//!                                └────────────── SeqEvents (tokens, finishes) ◀┘
//! ```
//!
//! Tests drive the same calls directly, which is how the policy below is checked without a model.
//!
//! # Policy (vLLM-style, first come first served)
//!
//! * **One step in flight.** [`Scheduler::schedule`] hands out a plan and returns `None` until the
//!   matching [`Scheduler::on_step_result`] (or [`Scheduler::on_step_failed`]) arrives. A
//!   sequence's computed length is advanced when it is planned, so the next plan continues where
//!   this one ends.
//! * **Each step:** first every running sequence that is decoding gets its one token; then running
//!   sequences still prefilling get chunks of at most `prefill_chunk` tokens, in arrival order;
//!   then waiting sequences are admitted from the front of the queue while the token budget
//!   (`max_batch_tokens`), `max_running` and the free blocks allow. A waiting sequence is admitted
//!   only when its whole first chunk fits in the free blocks, so a new arrival does not take the
//!   last blocks that running sequences are about to need.
//! * **Blocks** are allocated on demand as a sequence grows and freed the moment it finishes, is
//!   aborted or is preempted. A running prefill whose chunk does not fit is first shrunk to the
//!   free space; only when not even one token fits does preemption start.
//! * **Preemption** evicts the most recently arrived running sequence: its blocks are freed and it
//!   goes back to the *front* of the waiting queue. When readmitted it re-prefills its prompt and
//!   the tokens it already generated (recompute); because sampling noise is keyed by the index of
//!   the generated token ([`SampleRequest::step`]), the recomputed sequence samples exactly what it
//!   would have sampled without preemption, and its already-emitted tokens are not emitted again.
//!   No waiting sequence is admitted in a step that preempted, so an evicted sequence is not
//!   immediately readmitted into the memory pressure that evicted it.
//! * **No deadlock.** [`Scheduler::add_request`] rejects requests whose longest possible sequence
//!   cannot fit in the whole cache. Should a sequence still outgrow the cache while alone (the
//!   check is the contract, this is the safety net), it is failed with
//!   [`FinishReason::Error`] instead of being preempted forever. The earliest-arrived running
//!   sequence is never a preemption victim unless it runs alone, so every step makes progress.
//!
//! Sequence order, block choice (lowest free id first) and step ids are all deterministic, so a
//! given sequence of calls always yields the same plans. Numerics never depend on that anyway (KV
//! placement and batch composition are invisible to the batch-invariant kernels), but it keeps
//! failures reproducible.

use std::collections::{BTreeSet, HashMap, VecDeque};

use lockstep_kernels::{SampleRequest, SampledToken, SamplingParams};
use lockstep_proto::step::{SeqChunk, StepPlan, StepResult};
use serde::{Deserialize, Serialize};

/// Sizes and limits of one scheduler (one model replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// KV slots per block.
    pub block_size: u32,
    /// Blocks in the KV cache.
    pub num_blocks: u32,
    /// Most tokens (decode tokens plus prefill chunk tokens) in one step.
    pub max_batch_tokens: u32,
    /// Most prompt (or recompute) tokens of one sequence in one step.
    pub prefill_chunk: u32,
    /// Most sequences in the running batch.
    pub max_running: u32,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub max_model_len: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            block_size: 16,
            num_blocks: 1024,
            max_batch_tokens: 512,
            prefill_chunk: 256,
            max_running: 64,
            max_model_len: 2048,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fields = [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_batch_tokens", self.max_batch_tokens),
            ("prefill_chunk", self.prefill_chunk),
            ("max_running", self.max_running),
            ("max_model_len", self.max_model_len),
        ];
        if let Some((field, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Zero { field });
        }
        // Every running sequence may be decoding at once; each needs one token of budget.
        if self.max_batch_tokens < self.max_running {
            return Err(ConfigError::BudgetBelowMaxRunning {
                max_batch_tokens: self.max_batch_tokens,
                max_running: self.max_running,
            });
        }
        if (self.block_size as u64) * (self.num_blocks as u64) > u32::MAX as u64 {
            return Err(ConfigError::CacheTooLarge { block_size: self.block_size, num_blocks: self.num_blocks });
        }
        Ok(())
    }
}

/// A [`SchedulerConfig`] the scheduler cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("scheduler config: {field} must be positive")]
    Zero { field: &'static str },
    #[error(
        "scheduler config: max_batch_tokens ({max_batch_tokens}) must be at least max_running \
         ({max_running}) so that every running sequence can decode in every step"
    )]
    BudgetBelowMaxRunning { max_batch_tokens: u32, max_running: u32 },
    #[error("scheduler config: block_size ({block_size}) × num_blocks ({num_blocks}) overflows u32 KV slots")]
    CacheTooLarge { block_size: u32, num_blocks: u32 },
}

impl ConfigError {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            ConfigError::Zero { .. } => "config_zero_value",
            ConfigError::BudgetBelowMaxRunning { .. } => "config_budget_below_max_running",
            ConfigError::CacheTooLarge { .. } => "config_cache_too_large",
        }
    }
}

/// The per-request knobs the scheduler acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqParams {
    pub sampling: SamplingParams,
    /// Most tokens to generate; generation also stops at `max_model_len`.
    pub max_tokens: u32,
    /// Tokens that end the sequence with [`FinishReason::Eos`] (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Tokens that end the sequence with [`FinishReason::Stop`], even with `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

impl SeqParams {
    /// Greedy decoding of at most `max_tokens` tokens, with no end tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        SeqParams {
            sampling: SamplingParams::greedy(),
            max_tokens,
            eos_token_ids: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why [`Scheduler::add_request`] refused a request. Nothing is changed when it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddRequestError {
    #[error("sequence id {seq_id} is already in use")]
    DuplicateSeqId { seq_id: u64 },
    #[error("the prompt is empty; at least one token is needed")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_len} tokens but the model's maximum length is {max_model_len}; \
         at least one position must remain for generation"
    )]
    PromptTooLong { prompt_len: usize, max_model_len: u32 },
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    #[error(
        "the request needs up to {needed_blocks} KV blocks ({needed_slots} tokens) but the whole \
         cache has {num_blocks}; shorten the prompt or lower max_tokens"
    )]
    KvCacheTooSmall { needed_slots: u32, needed_blocks: u32, num_blocks: u32 },
}

impl AddRequestError {
    /// A stable machine-readable name for API error bodies and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            AddRequestError::DuplicateSeqId { .. } => "duplicate_seq_id",
            AddRequestError::EmptyPrompt => "empty_prompt",
            AddRequestError::PromptTooLong { .. } => "prompt_too_long",
            AddRequestError::ZeroMaxTokens => "invalid_max_tokens",
            AddRequestError::InvalidSampling(_) => "invalid_sampling_params",
            AddRequestError::KvCacheTooSmall { .. } => "kv_cache_too_small",
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// `max_tokens` generated, or the sequence reached `max_model_len`.
    Length,
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop token id was generated, or the caller found a stop string.
    Stop,
    /// The caller gave up on it (client disconnect, cancellation).
    Abort,
    /// The scheduler could not run it.
    Error(String),
}

impl FinishReason {
    /// A stable short name for logs and metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
            FinishReason::Error(_) => "error",
        }
    }
}

/// What happened to a sequence, in the order it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SeqEvent {
    /// The sequence's generated token number `index` (0 for the first). Each index is emitted
    /// exactly once, even when the sequence is preempted and recomputed.
    Token { seq_id: u64, token: SampledToken, index: u32 },
    /// The sequence is over and its blocks are free. Always the last event of a sequence.
    Finished { seq_id: u64, reason: FinishReason },
}

impl SeqEvent {
    pub fn seq_id(&self) -> u64 {
        match self {
            SeqEvent::Token { seq_id, .. } | SeqEvent::Finished { seq_id, .. } => *seq_id,
        }
    }
}

/// A sequence taken out of a scheduler by [`Scheduler::evacuate`], ready to be resumed elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct EvacuatedSeq {
    pub seq_id: u64,
    pub prompt_len: usize,
    /// The prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub params: SeqParams,
}

/// The KV cache's blocks: a free list and one block table per sequence.
///
/// Allocation takes the lowest free block id, so placement is a deterministic function of the call
/// sequence. Growing a table is all-or-nothing.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: u32,
    num_blocks: u32,
    free: BTreeSet<u32>,
    tables: HashMap<u64, Vec<u32>>,
}

/// Not enough free blocks for the requested growth; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: need {needed} more, {free} free")]
pub struct OutOfBlocks {
    pub needed: u32,
    pub free: u32,
}

impl BlockAllocator {
    pub fn new(block_size: u32, num_blocks: u32) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        BlockAllocator { block_size, num_blocks, free: (0..num_blocks).collect(), tables: HashMap::new() }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn total_blocks(&self) -> u32 {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn used_blocks(&self) -> u32 {
        self.num_blocks - self.free_blocks()
    }

    /// Blocks needed to hold `num_tokens` positions.
    pub fn blocks_for(&self, num_tokens: u32) -> u32 {
        num_tokens.div_ceil(self.block_size)
    }

    /// The sequence's block table (empty for a sequence holding no blocks).
    pub fn block_table(&self, seq_id: u64) -> &[u32] {
        self.tables.get(&seq_id).map_or(&[], Vec::as_slice)
    }

    /// Positions the sequence's current blocks can hold.
    pub fn capacity(&self, seq_id: u64) -> u32 {
        self.block_table(seq_id).len() as u32 * self.block_size
    }

    /// Grows the sequence's table to hold `num_tokens` positions, or allocates nothing.
    pub fn ensure_capacity(&mut self, seq_id: u64, num_tokens: u32) -> Result<(), OutOfBlocks> {
        let have = self.block_table(seq_id).len() as u32;
        let needed = self.blocks_for(num_tokens).saturating_sub(have);
        if needed > self.free_blocks() {
            return Err(OutOfBlocks { needed, free: self.free_blocks() });
        }
        if needed == 0 {
            return Ok(());
        }
        let table = self.tables.entry(seq_id).or_default();
        for _ in 0..needed {
            let block = self.free.pop_first().expect("free count was checked");
            table.push(block);
        }
        Ok(())
    }

    /// Returns every block of the sequence to the free list; returns how many.
    pub fn free_sequence(&mut self, seq_id: u64) -> u32 {
        let Some(table) = self.tables.remove(&seq_id) else {
            return 0;
        };
        for &block in &table {
            let was_free = !self.free.insert(block);
            assert!(!was_free, "block {block} of sequence {seq_id} was already free");
        }
        table.len() as u32
    }
}

/// A snapshot of the scheduler for metrics and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub used_blocks: u32,
    pub total_blocks: u32,
    pub preemptions: u64,
    pub ignored_results: u64,
    pub step_in_flight: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqState {
    Waiting,
    Running,
}

#[derive(Debug, Clone)]
struct Sequence {
    /// Distinguishes this sequence from an earlier one that used the same id, so a late result
    /// for an aborted sequence never lands on its successor. Also the FCFS priority.
    arrival: u64,
    /// The prompt followed by the generated tokens.
    tokens: Vec<u32>,
    prompt_len: u32,
    /// The length at which generation stops: prompt + max_tokens, capped at max_model_len.
    max_len: u32,
    /// Leading tokens whose KV is in the cache, counting the step in flight.
    num_computed: u32,
    state: SeqState,
    params: SeqParams,
}

impl Sequence {
    fn len(&self) -> u32 {
        self.tokens.len() as u32
    }

    fn num_generated(&self) -> u32 {
        self.len() - self.prompt_len
    }

    /// Known tokens whose KV is not computed yet: 1 when decoding, more when (re)prefilling.
    fn remaining(&self) -> u32 {
        self.len() - self.num_computed
    }
}

#[derive(Debug, Clone)]
struct InFlightChunk {
    seq_id: u64,
    arrival: u64,
    first_pos: u32,
    samples: bool,
}

#[derive(Debug, Clone)]
struct InFlightStep {
    step_id: u64,
    chunks: Vec<InFlightChunk>,
}

/// The continuous-batching scheduler. See the module docs for the policy.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockAllocator,
    seqs: HashMap<u64, Sequence>,
    /// FCFS queue; preempted sequences re-enter at the front.
    waiting: VecDeque<u64>,
    /// Sorted by arrival, so the last one is the preemption victim.
    running: Vec<u64>,
    next_arrival: u64,
    next_step_id: u64,
    in_flight: Option<InFlightStep>,
    /// Events raised outside [`Scheduler::on_step_result`] (sequences failed while scheduling).
    pending_events: Vec<SeqEvent>,
    preemptions: u64,
    ignored_results: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Scheduler {
            config,
            blocks: BlockAllocator::new(config.block_size, config.num_blocks),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            next_step_id: 0,
            in_flight: None,
            pending_events: Vec::new(),
            preemptions: 0,
            ignored_results: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request. It may join the running batch at the next [`Scheduler::schedule`].
    pub fn add_request(
        &mut self,
        seq_id: u64,
        prompt_tokens: Vec<u32>,
        params: SeqParams,
    ) -> Result<(), AddRequestError> {
        let prompt_len = prompt_tokens.len();
        self.insert_request(seq_id, prompt_tokens, prompt_len, params, true)
    }

    /// Queues a sequence that already generated tokens elsewhere (a request migrated from a failed
    /// group): `tokens` is the prompt (`prompt_len` ids) followed by the generated ids. It is
    /// recomputed like a preempted sequence, and because sampling noise is keyed by the generated
    /// token's index, it continues exactly where the uninterrupted run would have; the tokens it
    /// brings are not emitted again.
    pub fn resume_request(
        &mut self,
        seq_id: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SeqParams,
    ) -> Result<(), AddRequestError> {
        self.insert_request(seq_id, tokens, prompt_len, params, true)
    }

    /// Removes every sequence, oldest arrival first, with its tokens and parameters, so they can
    /// be resumed on another scheduler ([`Scheduler::resume_request`]). The step in flight is
    /// forgotten (its result will be ignored) and every block is freed.
    pub fn evacuate(&mut self) -> Vec<EvacuatedSeq> {
        let mut seqs: Vec<(u64, Sequence)> = self.seqs.drain().collect();
        seqs.sort_by_key(|(_, s)| s.arrival);
        for (seq_id, _) in &seqs {
            self.blocks.free_sequence(*seq_id);
        }
        self.running.clear();
        self.waiting.clear();
        self.in_flight = None;
        seqs.into_iter()
            .map(|(seq_id, s)| EvacuatedSeq {
                seq_id,
                prompt_len: s.prompt_len as usize,
                tokens: s.tokens,
                params: s.params,
            })
            .collect()
    }

    fn insert_request(
        &mut self,
        seq_id: u64,
        prompt_tokens: Vec<u32>,
        prompt_len: usize,
        params: SeqParams,
        check_capacity: bool,
    ) -> Result<(), AddRequestError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(AddRequestError::DuplicateSeqId { seq_id });
        }
        if prompt_len == 0 || prompt_tokens.is_empty() {
            return Err(AddRequestError::EmptyPrompt);
        }
        let max_model_len = self.config.max_model_len;
        if prompt_len >= max_model_len as usize {
            return Err(AddRequestError::PromptTooLong { prompt_len, max_model_len });
        }
        if params.max_tokens == 0 {
            return Err(AddRequestError::ZeroMaxTokens);
        }
        params.sampling.validate().map_err(|e| AddRequestError::InvalidSampling(e.to_string()))?;
        let prompt_len = prompt_len.min(prompt_tokens.len()) as u32;
        let max_len = (prompt_len as u64 + params.max_tokens as u64).min(max_model_len as u64) as u32;
        // The last generated token is never fed back, so it needs no KV slot.
        let needed_slots = max_len - 1;
        let needed_blocks = self.blocks.blocks_for(needed_slots);
        if check_capacity && needed_blocks > self.config.num_blocks {
            return Err(AddRequestError::KvCacheTooSmall {
                needed_slots,
                needed_blocks,
                num_blocks: self.config.num_blocks,
            });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            seq_id,
            Sequence {
                arrival,
                tokens: prompt_tokens,
                prompt_len,
                max_len,
                num_computed: 0,
                state: SeqState::Waiting,
                params,
            },
        );
        self.waiting.push_back(seq_id);
        Ok(())
    }

    /// Ends a sequence at the caller's request (client gone, stop string found) and frees its
    /// blocks at once. Returns the `Finished` event, or `None` for an unknown (or already
    /// finished) id. A result for it still in flight is dropped when it arrives.
    pub fn abort(&mut self, seq_id: u64, reason: FinishReason) -> Option<SeqEvent> {
        self.seqs.contains_key(&seq_id).then(|| self.finish(seq_id, reason))
    }

    /// Plans the next step, or returns `None` when there is nothing to run or a step is still in
    /// flight. Call [`Scheduler::take_events`] afterwards: planning can fail a sequence.
    pub fn schedule(&mut self) -> Option<StepPlan> {
        if self.in_flight.is_some() {
            return None;
        }
        let preemptions_before = self.preemptions;
        let mut budget = self.config.max_batch_tokens;
        let mut planned: Vec<(u64, u32)> = Vec::new();

        // Decodes first: they are one token each and keep every stream moving. Then the running
        // prefills, earliest arrival first.
        let (decoding, prefilling): (Vec<u64>, Vec<u64>) =
            self.running.iter().copied().partition(|id| self.seqs[id].remaining() == 1);
        for seq_id in decoding.into_iter().chain(prefilling) {
            if budget == 0 {
                break;
            }
            // An earlier candidate may have evicted this one.
            if self.seqs.get(&seq_id).is_none_or(|s| s.state != SeqState::Running) {
                continue;
            }
            let seq = &self.seqs[&seq_id];
            let want = seq.remaining().min(self.config.prefill_chunk).min(budget);
            if let Some(n) = self.fit_running(seq_id, want, &mut planned, &mut budget) {
                planned.push((seq_id, n));
                budget -= n;
            }
        }

        if self.preemptions == preemptions_before {
            self.admit_waiting(&mut planned, &mut budget);
        }

        if planned.is_empty() {
            return None;
        }
        let step_id = self.next_step_id;
        self.next_step_id += 1;
        let mut chunks = Vec::with_capacity(planned.len());
        let mut in_flight = Vec::with_capacity(planned.len());
        for (seq_id, n) in planned {
            let seq = self.seqs.get_mut(&seq_id).expect("planned sequences exist");
            let first_pos = seq.num_computed;
            let end = first_pos + n;
            let samples = end == seq.len();
            let sample =
                samples.then(|| SampleRequest { params: seq.params.sampling, step: seq.num_generated() as u64 });
            seq.num_computed = end;
            in_flight.push(InFlightChunk { seq_id, arrival: seq.arrival, first_pos, samples });
            chunks.push(SeqChunk {
                seq_id,
                tokens: seq.tokens[first_pos as usize..end as usize].to_vec(),
                first_pos,
                block_table: self.blocks.block_table(seq_id).to_vec(),
                sample,
            });
        }
        self.in_flight = Some(InFlightStep { step_id, chunks: in_flight });
        Some(StepPlan { step_id, chunks })
    }

    /// Finds room for up to `want` tokens of a running sequence, evicting later arrivals if not
    /// even one token fits. Returns the tokens granted (blocks already allocated), or `None` when
    /// the sequence itself was preempted or failed.
    fn fit_running(&mut self, seq_id: u64, want: u32, planned: &mut Vec<(u64, u32)>, budget: &mut u32) -> Option<u32> {
        loop {
            let num_computed = self.seqs[&seq_id].num_computed;
            let room = self.blocks.capacity(seq_id) - num_computed + self.blocks.free_blocks() * self.config.block_size;
            let n = want.min(room);
            if n > 0 {
                self.blocks.ensure_capacity(seq_id, num_computed + n).expect("room was computed from the free blocks");
                return Some(n);
            }
            let victim = *self.running.last().expect("seq_id itself is running");
            if victim != seq_id {
                if let Some(i) = planned.iter().position(|&(id, _)| id == victim) {
                    *budget += planned.remove(i).1;
                }
                self.preempt(victim);
                continue;
            }
            if self.running.len() == 1 {
                let capacity = self.config.num_blocks as u64 * self.config.block_size as u64;
                let reason = FinishReason::Error(format!(
                    "sequence needs more than the {capacity} token slots of the whole KV cache \
                     ({} blocks of {})",
                    self.config.num_blocks, self.config.block_size
                ));
                let event = self.finish(seq_id, reason);
                self.pending_events.push(event);
            } else {
                self.preempt(seq_id);
            }
            return None;
        }
    }

    /// Moves sequences from the front of the waiting queue into the running batch while the
    /// budget, `max_running` and the free blocks allow; FCFS, so a head that does not fit blocks
    /// the queue.
    fn admit_waiting(&mut self, planned: &mut Vec<(u64, u32)>, budget: &mut u32) {
        while *budget > 0 && self.running.len() < self.config.max_running as usize {
            let Some(&seq_id) = self.waiting.front() else {
                break;
            };
            let seq = &self.seqs[&seq_id];
            let want = seq.remaining().min(self.config.prefill_chunk).min(*budget);
            if self.blocks.ensure_capacity(seq_id, want).is_err() {
                if self.running.is_empty() {
                    // The cache is empty and the first chunk still does not fit: the sequence
                    // can never complete.
                    self.waiting.pop_front();
                    let reason = FinishReason::Error(format!(
                        "sequence needs more than the {} KV blocks of {} slots of the whole cache",
                        self.config.num_blocks, self.config.block_size
                    ));
                    let event = self.finish(seq_id, reason);
                    self.pending_events.push(event);
                    continue;
                }
                break;
            }
            self.waiting.pop_front();
            let arrival = seq.arrival;
            self.seqs.get_mut(&seq_id).expect("waiting sequences exist").state = SeqState::Running;
            let at = self.running.partition_point(|id| self.seqs[id].arrival < arrival);
            self.running.insert(at, seq_id);
            planned.push((seq_id, want));
            *budget -= want;
        }
    }

    /// Evicts a running sequence: frees its blocks and queues it first for recompute.
    fn preempt(&mut self, seq_id: u64) {
        self.running.retain(|&id| id != seq_id);
        self.blocks.free_sequence(seq_id);
        let seq = self.seqs.get_mut(&seq_id).expect("preempted sequences exist");
        seq.num_computed = 0;
        seq.state = SeqState::Waiting;
        self.waiting.push_front(seq_id);
        self.preemptions += 1;
    }

    /// Removes a sequence wherever it is, frees its blocks, and returns its `Finished` event.
    fn finish(&mut self, seq_id: u64, reason: FinishReason) -> SeqEvent {
        if let Some(seq) = self.seqs.remove(&seq_id) {
            match seq.state {
                SeqState::Running => self.running.retain(|&id| id != seq_id),
                SeqState::Waiting => self.waiting.retain(|&id| id != seq_id),
            }
        }
        self.blocks.free_sequence(seq_id);
        SeqEvent::Finished { seq_id, reason }
    }

    /// Applies the engine's answer to the step in flight: appends sampled tokens, finishes
    /// sequences that hit a limit or an end token (freeing their blocks), and returns the events,
    /// preceded by any still pending from [`Scheduler::schedule`].
    ///
    /// A result whose `step_id` is not the step in flight (a duplicate or a stale delivery) is
    /// ignored and counted; the step stays in flight. A sampling chunk the result has no token for
    /// is recomputed in a later step.
    pub fn on_step_result(&mut self, result: StepResult) -> Vec<SeqEvent> {
        let mut events = std::mem::take(&mut self.pending_events);
        let step = match self.in_flight.take() {
            Some(step) if step.step_id == result.step_id => step,
            other => {
                self.in_flight = other;
                self.ignored_results += 1;
                return events;
            }
        };
        let sampled: HashMap<u64, SampledToken> = result.sampled.into_iter().collect();
        for chunk in step.chunks.iter().filter(|c| c.samples) {
            let Some(seq) = self.seqs.get_mut(&chunk.seq_id) else {
                continue;
            };
            if seq.arrival != chunk.arrival {
                continue;
            }
            let Some(&token) = sampled.get(&chunk.seq_id) else {
                seq.num_computed = chunk.first_pos;
                continue;
            };
            let index = seq.num_generated();
            seq.tokens.push(token.id);
            events.push(SeqEvent::Token { seq_id: chunk.seq_id, token, index });
            let params = &seq.params;
            let reason = if params.stop_token_ids.contains(&token.id) {
                Some(FinishReason::Stop)
            } else if !params.ignore_eos && params.eos_token_ids.contains(&token.id) {
                Some(FinishReason::Eos)
            } else if seq.len() >= seq.max_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                events.push(self.finish(chunk.seq_id, reason));
            }
        }
        events
    }

    /// The engine could not run the step in flight (e.g. a node died): its chunks are planned
    /// again by the next [`Scheduler::schedule`]. Returns whether `step_id` was in flight.
    pub fn on_step_failed(&mut self, step_id: u64) -> bool {
        let step = match self.in_flight.take() {
            Some(step) if step.step_id == step_id => step,
            other => {
                self.in_flight = other;
                return false;
            }
        };
        for chunk in &step.chunks {
            if let Some(seq) = self.seqs.get_mut(&chunk.seq_id) {
                if seq.arrival == chunk.arrival {
                    seq.num_computed = chunk.first_pos;
                }
            }
        }
        true
    }

    /// Events raised while planning (sequences failed because they can never fit). They are
    /// also prepended to the next [`Scheduler::on_step_result`]'s events if not taken here.
    pub fn take_events(&mut self) -> Vec<SeqEvent> {
        std::mem::take(&mut self.pending_events)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn used_blocks(&self) -> u32 {
        self.blocks.used_blocks()
    }

    pub fn free_blocks(&self) -> u32 {
        self.blocks.free_blocks()
    }

    pub fn total_blocks(&self) -> u32 {
        self.blocks.total_blocks()
    }

    /// Preemptions since start (a sequence evicted twice counts twice).
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Step results dropped because they did not answer the step in flight.
    pub fn num_ignored_results(&self) -> u64 {
        self.ignored_results
    }

    /// The id of the step awaiting its result, if any.
    pub fn step_in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|s| s.step_id)
    }

    /// Whether any sequence is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn contains(&self, seq_id: u64) -> bool {
        self.seqs.contains_key(&seq_id)
    }

    /// The KV block allocator, read-only.
    pub fn block_allocator(&self) -> &BlockAllocator {
        &self.blocks
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.num_running(),
            waiting: self.num_waiting(),
            used_blocks: self.used_blocks(),
            total_blocks: self.total_blocks(),
            preemptions: self.preemptions,
            ignored_results: self.ignored_results,
            step_in_flight: self.in_flight.is_some(),
        }
    }
}

#[cfg(test)]
impl Scheduler {
    /// Queues a request without the whole-cache check, to exercise the run-time safety net.
    fn add_request_unchecked_capacity(
        &mut self,
        seq_id: u64,
        prompt_tokens: Vec<u32>,
        params: SeqParams,
    ) -> Result<(), AddRequestError> {
        let prompt_len = prompt_tokens.len();
        self.insert_request(seq_id, prompt_tokens, prompt_len, params, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn cfg(
        block_size: u32,
        num_blocks: u32,
        max_batch_tokens: u32,
        prefill_chunk: u32,
        max_running: u32,
    ) -> SchedulerConfig {
        SchedulerConfig { block_size, num_blocks, max_batch_tokens, prefill_chunk, max_running, max_model_len: 256 }
    }

    fn tok(id: u32) -> SampledToken {
        SampledToken { id, logprob: -1.0 }
    }

    fn prompt(seq_id: u64, len: u32) -> Vec<u32> {
        (0..len).map(|i| (seq_id as u32 * 31 + i * 7) % 100 + 3).collect()
    }

    /// Answers every sampling chunk of `plan` with `token`.
    fn answer_all(plan: &StepPlan, token: u32) -> StepResult {
        let sampled = plan.chunks.iter().filter(|c| c.sample.is_some()).map(|c| (c.seq_id, tok(token))).collect();
        StepResult { step_id: plan.step_id, sampled }
    }

    /// Checks that the free list and the block tables partition the cache exactly.
    fn assert_blocks_partitioned(s: &Scheduler) {
        let a = &s.blocks;
        let mut seen: HashSet<u32> = a.free.iter().copied().collect();
        assert_eq!(seen.len(), a.free.len());
        for (seq_id, table) in &a.tables {
            assert!(s.seqs.contains_key(seq_id), "blocks held by unknown sequence {seq_id}");
            for &b in table {
                assert!(b < a.num_blocks, "block {b} out of range");
                assert!(seen.insert(b), "block {b} allocated twice (seq {seq_id})");
            }
        }
        assert_eq!(seen.len() as u32, a.num_blocks, "blocks leaked");
        for id in &s.waiting {
            assert!(a.block_table(*id).is_empty(), "waiting sequence {id} holds blocks");
        }
    }

    /// A model stand-in that uses the KV cache for real: each chunk writes `(seq, pos, token)`
    /// into the slots its block table names, and sampling reads the whole prefix back through the
    /// table. The sampled token is a hash of `(seed, step, prefix)`, so any wrong position, slot,
    /// block sharing or sample step changes the output.
    struct FakeEngine {
        block_size: u32,
        num_blocks: u32,
        vocab: u32,
        kv: HashMap<u32, (u64, u32, u32)>,
        next_pos: HashMap<u64, u32>,
    }

    impl FakeEngine {
        fn new(config: &SchedulerConfig, vocab: u32) -> Self {
            FakeEngine {
                block_size: config.block_size,
                num_blocks: config.num_blocks,
                vocab,
                kv: HashMap::new(),
                next_pos: HashMap::new(),
            }
        }

        fn run(&mut self, plan: &StepPlan) -> StepResult {
            plan.validate(self.block_size, self.num_blocks).unwrap();
            let mut sampled = Vec::new();
            for chunk in &plan.chunks {
                let seq = chunk.seq_id;
                let next = self.next_pos.get(&seq).copied().unwrap_or(0);
                assert!(chunk.first_pos <= next, "seq {seq}: chunk at {} skips {next}", chunk.first_pos);
                for (pos, &token) in chunk.positions().zip(&chunk.tokens) {
                    self.kv.insert(chunk.slot(pos, self.block_size).unwrap(), (seq, pos, token));
                }
                self.next_pos.insert(seq, chunk.end_pos());
                if let Some(req) = chunk.sample {
                    let prefix: Vec<u32> = (0..chunk.end_pos())
                        .map(|pos| {
                            let slot = chunk.slot(pos, self.block_size).unwrap();
                            let (s, p, t) = self.kv[&slot];
                            assert_eq!((s, p), (seq, pos), "KV slot {slot} holds another position");
                            t
                        })
                        .collect();
                    let id = fake_sample(&prefix, &req, self.vocab);
                    sampled.push((seq, SampledToken { id, logprob: -(id as f32) / 64.0 }));
                }
            }
            StepResult { step_id: plan.step_id, sampled }
        }
    }

    fn fake_sample(prefix: &[u32], req: &SampleRequest, vocab: u32) -> u32 {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ req.params.seed ^ (req.step << 32);
        for &t in prefix {
            h = (h ^ t as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 29;
        (h % vocab as u64) as u32
    }

    /// Collected events, checked as they arrive: indices contiguous, nothing after `Finished`.
    #[derive(Default)]
    struct Outputs {
        tokens: HashMap<u64, Vec<u32>>,
        finished: HashMap<u64, FinishReason>,
    }

    impl Outputs {
        fn apply(&mut self, events: Vec<SeqEvent>) {
            for event in events {
                let seq_id = event.seq_id();
                assert!(!self.finished.contains_key(&seq_id), "event after Finished: {event:?}");
                match event {
                    SeqEvent::Token { token, index, .. } => {
                        let tokens = self.tokens.entry(seq_id).or_default();
                        assert_eq!(index as usize, tokens.len(), "seq {seq_id}: index out of order");
                        tokens.push(token.id);
                    }
                    SeqEvent::Finished { reason, .. } => {
                        self.finished.insert(seq_id, reason);
                    }
                }
            }
        }

        fn tokens(&self, seq_id: u64) -> Vec<u32> {
            self.tokens.get(&seq_id).cloned().unwrap_or_default()
        }
    }

    /// Runs the scheduler against the fake engine until nothing is left; checks the block
    /// partition and the sample steps at every step. Returns the outputs and the number of steps.
    fn run_to_completion(s: &mut Scheduler, engine: &mut FakeEngine, max_steps: usize) -> (Outputs, usize) {
        continue_to_completion(s, engine, Outputs::default(), max_steps)
    }

    /// [`run_to_completion`] for sequences whose earlier tokens are already in `out`.
    fn continue_to_completion(
        s: &mut Scheduler,
        engine: &mut FakeEngine,
        mut out: Outputs,
        max_steps: usize,
    ) -> (Outputs, usize) {
        for steps in 0..max_steps {
            let plan = s.schedule();
            out.apply(s.take_events());
            assert_blocks_partitioned(s);
            let Some(plan) = plan else {
                assert!(!s.has_unfinished(), "scheduler stalled with unfinished sequences");
                return (out, steps);
            };
            check_plan(s, &plan, &out);
            let result = engine.run(&plan);
            out.apply(s.on_step_result(result));
            assert_blocks_partitioned(s);
        }
        panic!("did not terminate within {max_steps} steps");
    }

    fn check_plan(s: &Scheduler, plan: &StepPlan, out: &Outputs) {
        let c = s.config();
        assert!(!plan.chunks.is_empty());
        assert!(plan.num_tokens() <= c.max_batch_tokens as usize, "token budget exceeded");
        assert!(plan.chunks.len() <= c.max_running as usize);
        assert!(s.num_running() <= c.max_running as usize);
        for chunk in &plan.chunks {
            assert!(chunk.len() <= c.prefill_chunk.max(1) as usize);
            if let Some(req) = chunk.sample {
                let emitted = out.tokens.get(&chunk.seq_id).map_or(0, Vec::len);
                assert_eq!(req.step as usize, emitted, "seq {}: sample step", chunk.seq_id);
            }
        }
    }

    #[test]
    fn config_validation_rejects_bad_values() {
        assert_eq!(SchedulerConfig::default().validate(), Ok(()));
        let mut c = cfg(4, 8, 16, 8, 4);
        c.block_size = 0;
        assert_eq!(Scheduler::new(c).unwrap_err(), ConfigError::Zero { field: "block_size" });
        let c = cfg(4, 8, 3, 8, 4);
        let err = Scheduler::new(c).unwrap_err();
        assert_eq!(err.error_type(), "config_budget_below_max_running");
        let c = cfg(1 << 16, 1 << 16, 16, 8, 4);
        assert_eq!(c.validate().unwrap_err().error_type(), "config_cache_too_large");
    }

    #[test]
    fn add_request_rejects_invalid_requests() {
        let mut c = cfg(4, 3, 16, 8, 4);
        c.max_model_len = 16;
        let mut s = Scheduler::new(c).unwrap();
        let err =
            |s: &mut Scheduler, id, len, params| s.add_request(id, prompt(id, len), params).unwrap_err().error_type();
        assert_eq!(err(&mut s, 1, 0, SeqParams::greedy(3)), "empty_prompt");
        assert_eq!(err(&mut s, 1, 16, SeqParams::greedy(3)), "prompt_too_long");
        assert_eq!(err(&mut s, 1, 4, SeqParams::greedy(0)), "invalid_max_tokens");
        // 10 + 100 is capped at max_model_len 16: 15 KV slots = 4 blocks > 3.
        let e = s.add_request(1, prompt(1, 10), SeqParams::greedy(100)).unwrap_err();
        assert_eq!(e, AddRequestError::KvCacheTooSmall { needed_slots: 15, needed_blocks: 4, num_blocks: 3 });
        let mut bad = SeqParams::greedy(3);
        bad.sampling.temperature = -1.0;
        assert_eq!(err(&mut s, 1, 4, bad), "invalid_sampling_params");
        assert_eq!(s.num_waiting(), 0, "rejected requests leave no trace");
        // 10 + 3 = 13 tokens, 12 slots = exactly the whole cache.
        s.add_request(1, prompt(1, 10), SeqParams::greedy(3)).unwrap();
        assert_eq!(err(&mut s, 1, 4, SeqParams::greedy(3)), "duplicate_seq_id");
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn chunked_prefill_boundaries_and_sample_steps() {
        let mut s = Scheduler::new(cfg(4, 16, 64, 4, 4)).unwrap();
        let p = prompt(1, 10);
        s.add_request(1, p.clone(), SeqParams::greedy(3)).unwrap();
        let expect = [(0u32, 4u32, None, 1usize), (4, 4, None, 2), (8, 2, Some(0u64), 3)];
        for (first_pos, len, step, table_len) in expect {
            let plan = s.schedule().unwrap();
            assert_eq!(plan.chunks.len(), 1);
            let c = &plan.chunks[0];
            assert_eq!((c.first_pos, c.len() as u32), (first_pos, len));
            assert_eq!(c.tokens, p[first_pos as usize..(first_pos + len) as usize]);
            assert_eq!(c.sample.map(|r| r.step), step);
            assert_eq!(c.block_table.len(), table_len);
            assert_eq!(
                s.on_step_result(answer_all(&plan, 50)),
                match step {
                    None => vec![],
                    Some(_) => vec![SeqEvent::Token { seq_id: 1, token: tok(50), index: 0 }],
                }
            );
        }
        // Decodes: the previous token at the next position, sample step = generated index.
        for (pos, index) in [(10u32, 1u32), (11, 2)] {
            let plan = s.schedule().unwrap();
            let c = &plan.chunks[0];
            assert_eq!((c.first_pos, c.tokens.clone()), (pos, vec![50 + index - 1]));
            assert_eq!(c.sample.unwrap().step, index as u64);
            let events = s.on_step_result(answer_all(&plan, 50 + index));
            assert_eq!(events[0], SeqEvent::Token { seq_id: 1, token: tok(50 + index), index });
        }
        assert!(!s.has_unfinished());
        assert_eq!(s.used_blocks(), 0);
        assert!(s.schedule().is_none());
    }

    #[test]
    fn token_budget_is_respected_and_decodes_come_first() {
        let mut s = Scheduler::new(cfg(4, 64, 10, 6, 8)).unwrap();
        for id in 0..5 {
            s.add_request(id, prompt(id, 2 + 5 * id as u32), SeqParams::greedy(6)).unwrap();
        }
        let mut decoding: HashSet<u64> = HashSet::new();
        let mut out = Outputs::default();
        while let Some(plan) = s.schedule() {
            assert!(plan.num_tokens() <= 10);
            let mut seen_prefill = false;
            for c in &plan.chunks {
                let is_decode = decoding.contains(&c.seq_id);
                assert!(!(is_decode && seen_prefill), "decode after a prefill chunk: {plan:?}");
                seen_prefill |= !is_decode;
                assert!(c.len() <= 6);
                if is_decode {
                    assert_eq!(c.len(), 1);
                }
            }
            let planned: HashSet<u64> = plan.chunks.iter().map(|c| c.seq_id).collect();
            assert!(decoding.is_subset(&planned), "a decoding sequence was skipped");
            let events = s.on_step_result(answer_all(&plan, 99));
            for e in &events {
                match e {
                    SeqEvent::Token { seq_id, .. } => decoding.insert(*seq_id),
                    SeqEvent::Finished { seq_id, .. } => decoding.remove(seq_id),
                };
            }
            out.apply(events);
        }
        assert_eq!(out.finished.len(), 5);
        assert!(out.finished.values().all(|r| *r == FinishReason::Length));
        assert_eq!(s.num_preemptions(), 0);
    }

    #[test]
    fn arrival_mid_run_joins_the_batch() {
        let mut s = Scheduler::new(cfg(4, 32, 32, 8, 4)).unwrap();
        s.add_request(1, prompt(1, 3), SeqParams::greedy(10)).unwrap();
        for _ in 0..3 {
            let plan = s.schedule().unwrap();
            assert_eq!(plan.chunks.len(), 1);
            s.on_step_result(answer_all(&plan, 7));
        }
        s.add_request(2, prompt(2, 5), SeqParams::greedy(2)).unwrap();
        let plan = s.schedule().unwrap();
        let summary: Vec<_> =
            plan.chunks.iter().map(|c| (c.seq_id, c.first_pos, c.len(), c.sample.map(|r| r.step))).collect();
        assert_eq!(summary, vec![(1, 5, 1, Some(3)), (2, 0, 5, Some(0))]);
        assert_eq!(s.num_running(), 2);
    }

    #[test]
    fn end_tokens_and_max_tokens_finish_and_free_blocks() {
        let mut s = Scheduler::new(cfg(4, 32, 32, 8, 4)).unwrap();
        let params = |ignore_eos| SeqParams {
            sampling: SamplingParams::greedy(),
            max_tokens: 3,
            eos_token_ids: vec![7],
            stop_token_ids: vec![9],
            ignore_eos,
        };
        s.add_request(1, prompt(1, 5), params(false)).unwrap();
        s.add_request(2, prompt(2, 5), params(true)).unwrap();
        s.add_request(3, prompt(3, 5), params(true)).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(s.used_blocks(), 6);
        let events = s
            .on_step_result(StepResult { step_id: plan.step_id, sampled: vec![(1, tok(7)), (2, tok(7)), (3, tok(9))] });
        assert_eq!(
            events,
            vec![
                SeqEvent::Token { seq_id: 1, token: tok(7), index: 0 },
                SeqEvent::Finished { seq_id: 1, reason: FinishReason::Eos },
                SeqEvent::Token { seq_id: 2, token: tok(7), index: 0 },
                SeqEvent::Token { seq_id: 3, token: tok(9), index: 0 },
                SeqEvent::Finished { seq_id: 3, reason: FinishReason::Stop },
            ]
        );
        assert_eq!(s.used_blocks(), 2, "finished sequences free their blocks at once");
        for _ in 0..2 {
            let plan = s.schedule().unwrap();
            s.on_step_result(answer_all(&plan, 7));
        }
        assert!(!s.contains(2));
        assert_eq!(s.used_blocks(), 0);
    }

    #[test]
    fn max_model_len_caps_generation() {
        let mut c = cfg(4, 32, 32, 8, 4);
        c.max_model_len = 8;
        let mut s = Scheduler::new(c).unwrap();
        s.add_request(1, prompt(1, 5), SeqParams::greedy(100)).unwrap();
        let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&c, 64), 100);
        assert_eq!(out.tokens(1).len(), 3);
        assert_eq!(out.finished[&1], FinishReason::Length);
    }

    #[test]
    fn abort_frees_blocks_and_drops_in_flight_results() {
        let mut s = Scheduler::new(cfg(4, 32, 32, 8, 4)).unwrap();
        assert_eq!(s.abort(42, FinishReason::Abort), None);
        for id in 1..=3 {
            s.add_request(id, prompt(id, 6), SeqParams::greedy(10)).unwrap();
        }
        // Waiting sequence.
        assert_eq!(
            s.abort(3, FinishReason::Abort),
            Some(SeqEvent::Finished { seq_id: 3, reason: FinishReason::Abort })
        );
        s.add_request(3, prompt(3, 6), SeqParams::greedy(10)).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(s.used_blocks(), 6);
        // Aborted while its step is in flight (a stop string found by the caller), then the id is
        // reused at once: the late result must land on neither.
        assert_eq!(s.abort(2, FinishReason::Stop), Some(SeqEvent::Finished { seq_id: 2, reason: FinishReason::Stop }));
        assert_eq!(s.used_blocks(), 4);
        s.add_request(2, prompt(2, 4), SeqParams::greedy(10)).unwrap();
        let events = s.on_step_result(answer_all(&plan, 11));
        let ids: Vec<u64> = events.iter().map(SeqEvent::seq_id).collect();
        assert_eq!(ids, vec![1, 3]);
        let plan = s.schedule().unwrap();
        let c2 = plan.chunks.iter().find(|c| c.seq_id == 2).unwrap();
        assert_eq!((c2.first_pos, c2.len()), (0, 4), "the reused id starts afresh");
    }

    #[test]
    fn preemption_recomputes_with_correct_positions_and_steps() {
        // 4 blocks of 2 slots. A and B (3-token prompts, 3 new tokens each) fill the cache after
        // their first step; A's third token needs a fifth block.
        let mut s = Scheduler::new(cfg(2, 4, 16, 16, 4)).unwrap();
        s.add_request(1, vec![10, 11, 12], SeqParams::greedy(3)).unwrap();
        s.add_request(2, vec![20, 21, 22], SeqParams::greedy(3)).unwrap();
        let mut out = Outputs::default();
        for (a, b) in [(30, 40), (31, 41)] {
            let plan = s.schedule().unwrap();
            assert_eq!(plan.chunks.len(), 2);
            out.apply(s.on_step_result(StepResult { step_id: plan.step_id, sampled: vec![(1, tok(a)), (2, tok(b))] }));
        }
        assert_eq!(s.free_blocks(), 0);
        // A needs a block: B, the later arrival, is evicted before it is planned.
        let plan = s.schedule().unwrap();
        assert_eq!(s.num_preemptions(), 1);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        assert_eq!(plan.chunks.len(), 1);
        let c = &plan.chunks[0];
        assert_eq!((c.seq_id, c.first_pos, c.tokens.clone()), (1, 4, vec![31]));
        assert_eq!(c.sample.unwrap().step, 2);
        out.apply(s.on_step_result(answer_all(&plan, 32)));
        assert_eq!(out.finished[&1], FinishReason::Length);
        // B is recomputed from position 0 over prompt + its two generated tokens, and samples
        // generated index 2; its first two tokens are not emitted again.
        let plan = s.schedule().unwrap();
        let c = &plan.chunks[0];
        assert_eq!((c.seq_id, c.first_pos, c.tokens.clone()), (2, 0, vec![20, 21, 22, 40, 41]));
        assert_eq!(c.sample.unwrap().step, 2);
        let events = s.on_step_result(answer_all(&plan, 42));
        assert_eq!(
            events,
            vec![
                SeqEvent::Token { seq_id: 2, token: tok(42), index: 2 },
                SeqEvent::Finished { seq_id: 2, reason: FinishReason::Length },
            ]
        );
        out.apply(events);
        assert_eq!(out.tokens(2), vec![40, 41, 42]);
        assert_eq!(s.used_blocks(), 0);
    }

    #[test]
    fn earlier_prefill_evicts_a_later_decode_already_planned() {
        // 6 blocks of 2 slots, 2-token prefill chunks. A (long prompt) arrives first, B (short)
        // second; B decodes while A is still prefilling, until A's chunk finds no free block.
        let c = cfg(2, 6, 4, 2, 2);
        let mut s = Scheduler::new(c).unwrap();
        s.add_request(1, prompt(1, 10), SeqParams::greedy(1)).unwrap();
        s.add_request(2, prompt(2, 2), SeqParams::greedy(8)).unwrap();
        let mut engine = FakeEngine::new(&c, SOLO_VOCAB);
        let mut out = Outputs::default();
        let mut shapes = Vec::new();
        while let Some(plan) = s.schedule() {
            assert_blocks_partitioned(&s);
            check_plan(&s, &plan, &out);
            shapes.push(plan.chunks.iter().map(|c| (c.seq_id, c.first_pos)).collect::<Vec<_>>());
            out.apply(s.on_step_result(engine.run(&plan)));
        }
        // Step 3: B's decode (planned first) is withdrawn and B evicted so A can continue.
        assert_eq!(shapes[2], vec![(2, 3), (1, 4)]);
        assert_eq!(shapes[3], vec![(1, 6)]);
        assert_eq!(s.num_preemptions(), 1);
        // A's last chunk frees nothing yet, but there is room to readmit B: it recomputes from 0.
        assert_eq!(shapes[4], vec![(1, 8), (2, 0)]);
        assert_eq!(shapes[5], vec![(2, 2)]);
        for a in [
            Arrival { step: 0, seq_id: 1, prompt: prompt(1, 10), params: SeqParams::greedy(1) },
            Arrival { step: 0, seq_id: 2, prompt: prompt(2, 2), params: SeqParams::greedy(8) },
        ] {
            assert_eq!((out.tokens(a.seq_id), out.finished[&a.seq_id].clone()), solo_output(&c, &a));
        }
    }

    fn sampled_params(seed: u64, max_tokens: u32) -> SeqParams {
        SeqParams {
            sampling: SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed },
            ..SeqParams::greedy(max_tokens)
        }
    }

    #[test]
    fn preempted_output_equals_unpreempted_output() {
        let run = |config: SchedulerConfig| {
            let mut s = Scheduler::new(config).unwrap();
            for id in 0..6 {
                s.add_request(id, prompt(id, 3 + 4 * id as u32), sampled_params(id, 12)).unwrap();
            }
            let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&config, 97), 10_000);
            (out, s.num_preemptions())
        };
        let (tight, preemptions) = run(cfg(2, 20, 16, 5, 6));
        assert!(preemptions > 0, "the tight cache must preempt");
        let (ample, none) = run(cfg(2, 200, 64, 64, 6));
        assert_eq!(none, 0);
        for id in 0..6 {
            assert_eq!(tight.tokens(id), ample.tokens(id), "seq {id}");
            assert_eq!(tight.tokens(id).len(), 12);
            assert_eq!(tight.finished[&id], FinishReason::Length);
        }
    }

    #[test]
    fn sequence_too_large_for_the_cache_fails_without_looping() {
        let c = cfg(2, 3, 16, 4, 4);
        let mut s = Scheduler::new(c).unwrap();
        let e = s.add_request(9, prompt(9, 3), SeqParams::greedy(10)).unwrap_err();
        assert_eq!(e.error_type(), "kv_cache_too_small");
        // Past the admission check (the safety net): it grows until it is alone and still needs
        // more than the cache, then fails; the small request ahead of it completes.
        s.add_request(1, prompt(1, 2), SeqParams::greedy(2)).unwrap();
        s.add_request_unchecked_capacity(9, prompt(9, 3), SeqParams::greedy(10)).unwrap();
        let (out, steps) = run_to_completion(&mut s, &mut FakeEngine::new(&c, 64), 1000);
        assert!(steps < 50);
        assert_eq!(out.finished[&1], FinishReason::Length);
        assert!(matches!(out.finished[&9], FinishReason::Error(_)));
        assert_eq!(out.tokens(9).len(), 4, "6 slots hold 3 prompt + 3 fed-back tokens");
        // A first chunk that does not fit even in the empty cache fails at admission.
        s.add_request_unchecked_capacity(10, prompt(10, 4), SeqParams::greedy(1)).unwrap();
        let mut c = c;
        c.prefill_chunk = 16;
        let mut s2 = Scheduler::new(c).unwrap();
        s2.add_request_unchecked_capacity(10, prompt(10, 8), SeqParams::greedy(1)).unwrap();
        s2.add_request(11, prompt(11, 2), SeqParams::greedy(1)).unwrap();
        let plan = s2.schedule().unwrap();
        let events = s2.take_events();
        assert!(matches!(&events[..], [SeqEvent::Finished { seq_id: 10, reason: FinishReason::Error(_) }]));
        assert_eq!(plan.chunks.iter().map(|c| c.seq_id).collect::<Vec<_>>(), vec![11]);
    }

    #[test]
    fn max_running_limits_the_batch() {
        let c = cfg(4, 64, 64, 16, 2);
        let mut s = Scheduler::new(c).unwrap();
        for id in 0..5 {
            s.add_request(id, prompt(id, 4), SeqParams::greedy(3)).unwrap();
        }
        let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&c, 64), 100);
        assert_eq!(out.finished.len(), 5);
    }

    #[test]
    fn stale_results_are_ignored_and_failed_steps_recomputed() {
        let mut s = Scheduler::new(cfg(4, 32, 32, 4, 4)).unwrap();
        s.add_request(1, prompt(1, 6), SeqParams::greedy(4)).unwrap();
        let first = s.schedule().unwrap();
        assert!(s.schedule().is_none(), "one step in flight at a time");
        assert!(s.on_step_result(StepResult { step_id: 99, sampled: vec![] }).is_empty());
        assert_eq!((s.num_ignored_results(), s.step_in_flight()), (1, Some(first.step_id)));
        assert!(!s.on_step_failed(99));
        assert!(s.on_step_failed(first.step_id));
        let again = s.schedule().unwrap();
        assert_eq!(again.step_id, first.step_id + 1);
        assert_eq!(again.chunks, first.chunks, "the failed step is planned again unchanged");
        s.on_step_result(answer_all(&again, 5));
        let second = s.schedule().unwrap();
        assert_eq!(second.chunks[0].sample.unwrap().step, 0);
        // A result that forgets a sampling chunk: the chunk is recomputed, nothing is emitted.
        assert!(s.on_step_result(StepResult { step_id: second.step_id, sampled: vec![] }).is_empty());
        let third = s.schedule().unwrap();
        assert_eq!(third.chunks, second.chunks);
    }

    #[test]
    fn block_allocator_is_lowest_first_and_all_or_nothing() {
        let mut a = BlockAllocator::new(4, 5);
        a.ensure_capacity(1, 5).unwrap();
        a.ensure_capacity(2, 4).unwrap();
        assert_eq!((a.block_table(1), a.block_table(2)), (&[0, 1][..], &[2][..]));
        assert_eq!(a.ensure_capacity(2, 17), Err(OutOfBlocks { needed: 4, free: 2 }));
        assert_eq!(a.block_table(2), &[2], "a failed growth allocates nothing");
        assert_eq!(a.free_sequence(1), 2);
        a.ensure_capacity(2, 12).unwrap();
        assert_eq!(a.block_table(2), &[2, 0, 1]);
        assert_eq!((a.used_blocks(), a.free_blocks(), a.capacity(2)), (3, 2, 12));
        assert_eq!(a.free_sequence(7), 0);
    }

    /// xorshift64*: enough randomness for workloads, no dependency, reproducible by seed.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform-ish in `lo..=hi`.
        fn range(&mut self, lo: u32, hi: u32) -> u32 {
            lo + (self.next() % (hi - lo + 1) as u64) as u32
        }

        fn chance(&mut self, percent: u32) -> bool {
            self.range(0, 99) < percent
        }
    }

    struct Arrival {
        step: usize,
        seq_id: u64,
        prompt: Vec<u32>,
        params: SeqParams,
    }

    /// The fake engine's vocabulary in runs compared with [`solo_output`].
    const SOLO_VOCAB: u32 = 41;

    /// The sequence's output when it runs alone in an ample cache.
    fn solo_output(config: &SchedulerConfig, a: &Arrival) -> (Vec<u32>, FinishReason) {
        let ample = SchedulerConfig { num_blocks: 4096, max_batch_tokens: 4096, ..*config };
        let mut s = Scheduler::new(ample).unwrap();
        s.add_request(a.seq_id, a.prompt.clone(), a.params.clone()).unwrap();
        let (out, _) = run_to_completion(&mut s, &mut FakeEngine::new(&ample, SOLO_VOCAB), 10_000);
        (out.tokens(a.seq_id), out.finished[&a.seq_id].clone())
    }

    #[test]
    fn randomized_workloads_never_double_allocate_and_always_terminate() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut total_preemptions = 0;
        for round in 0..300 {
            let max_running = rng.range(1, 6);
            let config = SchedulerConfig {
                block_size: rng.range(1, 8),
                num_blocks: rng.range(1, 40),
                max_batch_tokens: rng.range(max_running, max_running + 24),
                prefill_chunk: rng.range(1, 12),
                max_running,
                max_model_len: rng.range(8, 64),
            };
            let arrivals: Vec<Arrival> = (0..rng.range(1, 12) as u64)
                .map(|seq_id| Arrival {
                    step: rng.range(0, 30) as usize,
                    seq_id,
                    prompt: (0..rng.range(1, 24)).map(|_| rng.range(0, 40)).collect(),
                    params: SeqParams {
                        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: rng.next() },
                        max_tokens: rng.range(1, 24),
                        eos_token_ids: if rng.chance(50) { vec![rng.range(0, 40)] } else { vec![] },
                        stop_token_ids: vec![],
                        ignore_eos: false,
                    },
                })
                .collect();
            let mut s = Scheduler::new(config).unwrap();
            let mut engine = FakeEngine::new(&config, SOLO_VOCAB);
            let mut out = Outputs::default();
            let mut accepted: Vec<&Arrival> = Vec::new();
            let mut aborted: HashSet<u64> = HashSet::new();
            let mut step = 0usize;
            loop {
                assert!(step < 20_000, "round {round}: no termination ({config:?})");
                for a in arrivals.iter().filter(|a| a.step == step) {
                    match s.add_request(a.seq_id, a.prompt.clone(), a.params.clone()) {
                        Ok(()) => accepted.push(a),
                        Err(e) => assert!(
                            matches!(e.error_type(), "prompt_too_long" | "kv_cache_too_small"),
                            "round {round}: {e}"
                        ),
                    }
                }
                if rng.chance(3) {
                    let live: Vec<u64> = accepted.iter().map(|a| a.seq_id).filter(|id| s.contains(*id)).collect();
                    if !live.is_empty() {
                        let id = live[rng.range(0, live.len() as u32 - 1) as usize];
                        out.apply(s.abort(id, FinishReason::Abort).into_iter().collect());
                        aborted.insert(id);
                    }
                }
                let plan = s.schedule();
                out.apply(s.take_events());
                assert_blocks_partitioned(&s);
                step += 1;
                match plan {
                    Some(plan) => {
                        check_plan(&s, &plan, &out);
                        out.apply(s.on_step_result(engine.run(&plan)));
                        assert_blocks_partitioned(&s);
                    }
                    None => {
                        assert!(!s.has_unfinished(), "round {round}: stalled ({config:?})");
                        if arrivals.iter().all(|a| a.step < step) {
                            break;
                        }
                    }
                }
            }
            assert_eq!((s.num_running(), s.num_waiting(), s.used_blocks()), (0, 0, 0));
            total_preemptions += s.num_preemptions();
            for a in &accepted {
                let (solo_tokens, solo_reason) = solo_output(&config, a);
                let tokens = out.tokens(a.seq_id);
                if aborted.contains(&a.seq_id) && out.finished[&a.seq_id] == FinishReason::Abort {
                    assert!(solo_tokens.starts_with(&tokens), "round {round} seq {}", a.seq_id);
                } else {
                    assert_eq!(tokens, solo_tokens, "round {round} seq {} ({config:?})", a.seq_id);
                    assert_eq!(out.finished[&a.seq_id], solo_reason);
                }
            }
        }
        assert!(total_preemptions > 0, "the workloads should exercise preemption");
    }

    /// Guards request migration (a failed group's requests continue on another): sequences
    /// evacuated mid-run — with a step in flight, some mid-prefill, some decoding — and resumed on
    /// a scheduler with another cache shape emit exactly the tokens of an uninterrupted run, and
    /// never re-emit the ones they bring.
    #[test]
    fn evacuated_and_resumed_sequences_continue_as_if_uninterrupted() {
        let ample = cfg(2, 200, 64, 64, 6);
        let mut whole = Scheduler::new(ample).unwrap();
        for id in 0..6 {
            whole.add_request(id, prompt(id, 3 + 4 * id as u32), sampled_params(id, 12)).unwrap();
        }
        let (reference, _) = run_to_completion(&mut whole, &mut FakeEngine::new(&ample, 97), 10_000);
        for cut in [1usize, 2, 3, 5, 8, 11] {
            let first = cfg(4, 40, 24, 7, 4);
            let mut a = Scheduler::new(first).unwrap();
            for id in 0..6 {
                a.add_request(id, prompt(id, 3 + 4 * id as u32), sampled_params(id, 12)).unwrap();
            }
            let mut engine = FakeEngine::new(&first, 97);
            let mut out = Outputs::default();
            for _ in 0..cut {
                let Some(plan) = a.schedule() else { break };
                out.apply(a.take_events());
                out.apply(a.on_step_result(engine.run(&plan)));
            }
            // A step in flight whose result never arrives: the group died mid-step.
            let _lost = a.schedule();
            let moved = a.evacuate();
            assert_eq!(a.num_running() + a.num_waiting(), 0);
            assert_eq!(a.used_blocks(), 0, "evacuation frees every block");
            let second = cfg(2, 60, 16, 5, 3);
            let mut b = Scheduler::new(second).unwrap();
            for m in moved {
                let brought = m.tokens.len() - m.prompt_len;
                assert_eq!(out.tokens(m.seq_id).len(), brought, "seq {}: tokens brought", m.seq_id);
                b.resume_request(m.seq_id, m.tokens, m.prompt_len, m.params).unwrap();
            }
            let (all, _) = continue_to_completion(&mut b, &mut FakeEngine::new(&second, 97), out, 10_000);
            for id in 0..6 {
                assert_eq!(all.tokens(id), reference.tokens(id), "cut {cut}, seq {id}");
                assert_eq!(all.finished.get(&id), Some(&reference.finished[&id]), "cut {cut}, seq {id}");
            }
        }
    }
}
