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
mod tests;
