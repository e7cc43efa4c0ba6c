//! How a model is cut across `t` tensor-parallel ranks so that the answer keeps every bit.
//!
//! * **Column-parallel** (q/k/v, gate/up, lm_head): a rank holds some output rows; its outputs are
//!   exactly a slice of the unsplit outputs, whatever `t` is.
//! * **Row-parallel** (o_proj, down_proj): a rank holds some columns — the reduction dimension — and
//!   they must be whole segments of the canonical segmentation, so the rank computes one subtree
//!   of the segment tree and the all-reduce finishes the same tree ([`lockstep_kernels::reference::dot`]).
//! * Attention heads go whole to ranks (KV heads too), so attention needs no cross-rank reduction.
//!   For o_proj, a rank's input columns are its heads' outputs, so the head split and the segment
//!   split of `q_dim` must coincide: `q_dim` a multiple of `S × 16`, or the plan is refused.
//! * The MLP's intermediate features follow the segments of `intermediate_size` (uneven tails are
//!   fine: padding is exact zeros), and the vocabulary follows the segments of `vocab_size`.
//!
//! `reduce_segments` is part of the determinism fingerprint, so it must not depend on `t`:
//! [`auto_reduce_segments`] derives it from the model shape alone.

use std::ops::Range;

use lockstep_kernels::{SegmentRange, Segmentation, VocabShard, DEFAULT_REDUCE_SEGMENTS, LANES};

use crate::config::ModelConfig;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ShardError {
    #[error("tensor-parallel degree {tp} must be a power of two between 1 and reduce_segments = {segments}")]
    BadDegree { tp: usize, segments: usize },
    #[error("rank {rank} is not below the tensor-parallel degree {tp}")]
    BadRank { rank: usize, tp: usize },
    #[error("{what} = {count} is not divisible by the tensor-parallel degree {tp}")]
    HeadsNotDivisible { what: &'static str, count: usize, tp: usize },
    #[error(
        "q_dim = {q_dim} is not a multiple of reduce_segments × {LANES} = {unit}: o_proj cannot be split by heads along whole segments (use a smaller --reduce-segments)"
    )]
    HeadsNotSegmentAligned { q_dim: usize, unit: usize },
}

/// Largest power of two `S ≤ 8` such that every tensor-parallel split up to `S` is possible for
/// this model: `q_dim` a multiple of `S × 16`, and head counts divisible by `S` (or else only as
/// large as the KV head count allows — a smaller `S` still bounds the usable TP degrees).
pub fn auto_reduce_segments(cfg: &ModelConfig) -> usize {
    let mut s = DEFAULT_REDUCE_SEGMENTS;
    while s > 1 && !cfg.q_dim().is_multiple_of(s * LANES) {
        s /= 2;
    }
    s
}

/// Rank `rank` of a `tp`-way split of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub rank: usize,
    pub tp: usize,
    pub segments: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rows of q_proj (and columns of o_proj) held.
    pub q_rows: Range<usize>,
    /// Rows of k_proj and v_proj held.
    pub kv_rows: Range<usize>,
    /// Segments of `q_dim` held for o_proj (equal to `q_rows` by construction).
    pub o_segs: SegmentRange,
    /// Segments of `intermediate_size` held (gate/up rows, down_proj columns).
    pub mlp_segs: SegmentRange,
    pub vocab: VocabShard,
}

impl ShardPlan {
    pub fn new(cfg: &ModelConfig, rank: usize, tp: usize, segments: usize) -> Result<Self, ShardError> {
        if !tp.is_power_of_two() || tp > segments {
            return Err(ShardError::BadDegree { tp, segments });
        }
        if rank >= tp {
            return Err(ShardError::BadRank { rank, tp });
        }
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        if nh % tp != 0 {
            return Err(ShardError::HeadsNotDivisible { what: "num_attention_heads", count: nh, tp });
        }
        if nkv % tp != 0 {
            return Err(ShardError::HeadsNotDivisible { what: "num_key_value_heads", count: nkv, tp });
        }
        let seg = |len| Segmentation::new(len, segments).expect("segments validated by the caller");
        let q_dim = cfg.q_dim();
        let o_segs = seg(q_dim).shard(rank, tp).map_err(|_| ShardError::BadDegree { tp, segments })?;
        let q_rows = rank * q_dim / tp..(rank + 1) * q_dim / tp;
        if tp > 1 && o_segs.real_range() != q_rows {
            return Err(ShardError::HeadsNotSegmentAligned { q_dim, unit: segments * LANES });
        }
        let kv_dim = cfg.kv_dim();
        Ok(ShardPlan {
            rank,
            tp,
            segments,
            n_heads: nh / tp,
            n_kv_heads: nkv / tp,
            head_dim: hd,
            q_rows,
            kv_rows: rank * kv_dim / tp..(rank + 1) * kv_dim / tp,
            o_segs,
            mlp_segs: seg(cfg.intermediate_size).shard(rank, tp).expect("checked above"),
            vocab: VocabShard::new(seg(cfg.vocab_size).shard(rank, tp).expect("checked above")),
        })
    }

    /// Intermediate features held (rows of gate/up, columns of down_proj).
    pub fn mlp_rows(&self) -> Range<usize> {
        self.mlp_segs.real_range()
    }
    /// Vocabulary ids held (rows of lm_head).
    pub fn vocab_rows(&self) -> Range<usize> {
        self.vocab.offset..self.vocab.offset + self.vocab.rows
    }
}
