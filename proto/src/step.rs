//! One step of generation: what the scheduler asks the engine to compute, and what comes back.
//!
//! A [`StepPlan`] is the whole contract between the coordinator's scheduler and the engine for one
//! forward pass. It is deliberately explicit: every chunk names its tokens, the absolute position of
//! its first token, the full KV block table of its sequence and, when the chunk reaches the end of
//! the sequence's known tokens, what to sample. The engine therefore keeps no scheduling state of
//! its own, which is what lets a step be replayed on another node (or a sequence be recomputed after
//! preemption) and give the same bits: the numerics depend only on positions and tokens, never on
//! where the KV landed or which other chunks share the step.
//!
//! The slot of position `p` is `block_table[p / block_size] * block_size + p % block_size`; the
//! block size is a property of the engine's KV cache, agreed on at start-up, so it does not travel
//! with every step. [`StepPlan::validate`] checks a plan against the cache before anything runs.
//!
//! Between the coordinator and its nodes a plan travels as a delta against what the node already
//! holds ([`crate::session`]); the node expands it back, so the engine always sees a whole plan.

use lockstep_kernels::{SampleRequest, SampledToken};
use serde::{Deserialize, Serialize};

/// A run of consecutive tokens of one sequence, processed in one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqChunk {
    pub seq_id: u64,
    /// The tokens at positions `first_pos .. first_pos + tokens.len()`.
    pub tokens: Vec<u32>,
    pub first_pos: u32,
    /// The sequence's KV blocks, in position order. Covers at least every position up to the last
    /// token of this chunk; attention over earlier positions reads the same table.
    pub block_table: Vec<u32>,
    /// `Some` exactly when this chunk ends at the end of the sequence's known tokens: the logits of
    /// the last position are then sampled. `step` is the index of the generated token (0 for the
    /// first), so a sequence recomputed after preemption draws the same noise.
    pub sample: Option<SampleRequest>,
}

impl SeqChunk {
    /// Number of tokens in the chunk.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// One past the last position of the chunk: the sequence length the KV cache holds once the
    /// chunk has run.
    pub fn end_pos(&self) -> u32 {
        self.first_pos + self.tokens.len() as u32
    }

    /// The absolute positions the chunk covers.
    pub fn positions(&self) -> std::ops::Range<u32> {
        self.first_pos..self.end_pos()
    }

    /// The KV slot of position `pos`, or `None` when the block table does not reach it.
    pub fn slot(&self, pos: u32, block_size: u32) -> Option<u32> {
        let block = *self.block_table.get((pos / block_size) as usize)?;
        Some(block * block_size + pos % block_size)
    }
}

/// Everything one forward pass computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Monotonic per scheduler; a [`StepResult`] answers the plan with the same id.
    pub step_id: u64,
    pub chunks: Vec<SeqChunk>,
}

impl StepPlan {
    /// Total number of tokens processed in the step (the batch's row count).
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(SeqChunk::len).sum()
    }

    /// Number of chunks whose last position is sampled.
    pub fn num_samples(&self) -> usize {
        self.chunks.iter().filter(|c| c.sample.is_some()).count()
    }

    /// Checks the plan against a KV cache of `num_blocks` blocks of `block_size` slots: no empty
    /// chunk, no sequence twice, every position covered by the block table, every block in range,
    /// and no KV slot written twice in the step. The engine calls this before touching the cache so
    /// that a bad plan is an error, not silent corruption of another sequence's KV.
    pub fn validate(&self, block_size: u32, num_blocks: u32) -> Result<(), StepPlanError> {
        if block_size == 0 {
            return Err(StepPlanError::ZeroBlockSize);
        }
        let mut seen_seqs = std::collections::HashSet::new();
        let mut written_slots = std::collections::HashSet::new();
        for chunk in &self.chunks {
            let seq_id = chunk.seq_id;
            if chunk.is_empty() {
                return Err(StepPlanError::EmptyChunk { seq_id });
            }
            if !seen_seqs.insert(seq_id) {
                return Err(StepPlanError::DuplicateSequence { seq_id });
            }
            if let Some(&block) = chunk.block_table.iter().find(|&&b| b >= num_blocks) {
                return Err(StepPlanError::BlockOutOfRange { seq_id, block, num_blocks });
            }
            let last_pos = chunk
                .first_pos
                .checked_add(chunk.tokens.len() as u32 - 1)
                .ok_or(StepPlanError::PositionOverflow { seq_id })?;
            let covered = chunk.block_table.len() as u64 * block_size as u64;
            if last_pos as u64 >= covered {
                return Err(StepPlanError::BlockTableTooShort { seq_id, last_pos, covered });
            }
            for pos in chunk.positions() {
                // Covered was checked above, so the slot exists.
                let slot = chunk.slot(pos, block_size).unwrap_or(u32::MAX);
                if !written_slots.insert(slot) {
                    return Err(StepPlanError::SlotWrittenTwice { seq_id, slot });
                }
            }
        }
        Ok(())
    }
}

/// What the engine returns for one [`StepPlan`]: the sampled token of every chunk that asked for
/// one, keyed by sequence id, in plan order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub step_id: u64,
    pub sampled: Vec<(u64, SampledToken)>,
}

/// Why a [`StepPlan`] cannot run against a given KV cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepPlanError {
    #[error("KV block size must be positive")]
    ZeroBlockSize,
    #[error("sequence {seq_id}: chunk has no tokens")]
    EmptyChunk { seq_id: u64 },
    #[error("sequence {seq_id} appears in more than one chunk of the step")]
    DuplicateSequence { seq_id: u64 },
    #[error("sequence {seq_id}: block {block} is out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { seq_id: u64, block: u32, num_blocks: u32 },
    #[error("sequence {seq_id}: chunk positions overflow u32")]
    PositionOverflow { seq_id: u64 },
    #[error("sequence {seq_id}: block table covers {covered} positions but the chunk reaches position {last_pos}")]
    BlockTableTooShort { seq_id: u64, last_pos: u32, covered: u64 },
    #[error("sequence {seq_id}: KV slot {slot} is written twice in one step")]
    SlotWrittenTwice { seq_id: u64, slot: u32 },
}

impl StepPlanError {
    /// A stable machine-readable name for logs and metrics labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            StepPlanError::ZeroBlockSize => "zero_block_size",
            StepPlanError::EmptyChunk { .. } => "empty_chunk",
            StepPlanError::DuplicateSequence { .. } => "duplicate_sequence",
            StepPlanError::BlockOutOfRange { .. } => "block_out_of_range",
            StepPlanError::PositionOverflow { .. } => "position_overflow",
            StepPlanError::BlockTableTooShort { .. } => "block_table_too_short",
            StepPlanError::SlotWrittenTwice { .. } => "slot_written_twice",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::SamplingParams;

    fn chunk(seq_id: u64, first_pos: u32, len: u32, table: Vec<u32>, sample: bool) -> SeqChunk {
        SeqChunk {
            seq_id,
            tokens: (0..len).collect(),
            first_pos,
            block_table: table,
            sample: sample.then(|| SampleRequest { params: SamplingParams::greedy(), step: 0 }),
        }
    }

    #[test]
    fn slots_follow_the_block_table() {
        let c = chunk(7, 5, 3, vec![9, 2], true);
        assert_eq!(c.slot(0, 4), Some(36));
        assert_eq!(c.slot(5, 4), Some(9));
        assert_eq!(c.slot(7, 4), Some(11));
        assert_eq!(c.slot(8, 4), None);
        assert_eq!(c.positions(), 5..8);
        assert_eq!(c.end_pos(), 8);
    }

    #[test]
    fn plan_counts_tokens_and_samples() {
        let plan =
            StepPlan { step_id: 3, chunks: vec![chunk(1, 0, 4, vec![0], false), chunk(2, 9, 1, vec![1, 2, 3], true)] };
        assert_eq!(plan.num_tokens(), 5);
        assert_eq!(plan.num_samples(), 1);
        assert_eq!(plan.validate(4, 4), Ok(()));
    }

    #[test]
    fn validate_rejects_bad_plans() {
        let plan = |chunks| StepPlan { step_id: 0, chunks };
        let err = |p: StepPlan| p.validate(4, 4).unwrap_err().error_type();
        assert_eq!(err(plan(vec![chunk(1, 0, 0, vec![0], false)])), "empty_chunk");
        assert_eq!(
            err(plan(vec![chunk(1, 0, 1, vec![0], false), chunk(1, 1, 1, vec![0], false)])),
            "duplicate_sequence"
        );
        assert_eq!(err(plan(vec![chunk(1, 0, 1, vec![4], false)])), "block_out_of_range");
        assert_eq!(err(plan(vec![chunk(1, 2, 3, vec![0], false)])), "block_table_too_short");
        assert_eq!(
            err(plan(vec![chunk(1, 0, 2, vec![0], false), chunk(2, 1, 1, vec![0], false)])),
            "slot_written_twice"
        );
        assert_eq!(plan(vec![]).validate(0, 4).unwrap_err().error_type(), "zero_block_size");
    }

    #[test]
    fn messages_round_trip_through_serde() {
        let plan = StepPlan { step_id: 1, chunks: vec![chunk(1, 0, 2, vec![3], true)] };
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<StepPlan>(&json).unwrap(), plan);
        let result = StepResult { step_id: 1, sampled: vec![(1, SampledToken { id: 5, logprob: -0.5 })] };
        let json = serde_json::to_string(&result).unwrap();
        assert_eq!(serde_json::from_str::<StepResult>(&json).unwrap(), result);
    }
}
