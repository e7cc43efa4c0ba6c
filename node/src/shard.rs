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
//! [`auto_reduce_segments`] derives it from the model shape alone. A row-parallel shard must be a
//! subtree of the segment tree, so `S = 2^k` allows `t ∈ {1, 2, 4, …, S}` and `S = 3·2^k` allows
//! `t ∈ {1, 3, 6, …, S}` ([`Segmentation::tp_degrees`]); the family is the one whose degrees reach
//! further for the model's head counts (SmolLM2-135M, 9 query / 3 KV heads: `S = 12`, TP 1 or 3).
//!
//! Quantized (GGUF block) weights: a row-parallel rank holds whole blocks of 32 columns, so its
//! cut `r · (S/t) · seg_len` must be a multiple of 32 — always true for `t < S` (`S/t` is even and
//! `seg_len` a multiple of 16), and for `t = S` when `seg_len` is a multiple of 32
//! (`HostWeight::columns` refuses any other cut).

use std::ops::Range;

use lockstep_kernels::{SegmentRange, Segmentation, VocabShard, DEFAULT_REDUCE_SEGMENTS, LANES};

use crate::config::ModelConfig;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ShardError {
    #[error(
        "tensor-parallel degree {tp} does not cut reduce_segments = {segments} into subtrees of the segment tree (S = 2^k allows 1, 2, 4, …, S; S = 3·2^k allows 1, 3, 6, …, S)"
    )]
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

/// `reduce_segments` for a model: in each family — `S ∈ {8, 4, 2, 1}` and `S ∈ {12, 6, 3}` — the
/// largest `S` with `q_dim` a multiple of `S × 16` (so o_proj splits by whole heads along whole
/// segments); of the two, the one whose usable TP degrees (subtree degrees that divide both head
/// counts) reach the higher degree, powers of two on a tie.
pub fn auto_reduce_segments(cfg: &ModelConfig) -> usize {
    let fits = |s: usize| cfg.q_dim().is_multiple_of(s * LANES);
    let largest = |family: &[usize]| family.iter().copied().find(|&s| fits(s)).unwrap_or(1);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let reach = |s: usize| {
        Segmentation::tp_degrees(s).into_iter().filter(|&t| nh.is_multiple_of(t) && nkv.is_multiple_of(t)).max()
    };
    let powers = largest(&[DEFAULT_REDUCE_SEGMENTS, 4, 2, 1]);
    let threes = largest(&[12, 6, 3]);
    if reach(threes) > reach(powers) {
        threes
    } else {
        powers
    }
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
        if !Segmentation::tp_degrees(segments).contains(&tp) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(hidden: usize, inter: usize, heads: usize, kv: usize, vocab: usize) -> ModelConfig {
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":{hidden},"intermediate_size":{inter},
            "num_hidden_layers":2,"num_attention_heads":{heads},"num_key_value_heads":{kv},"vocab_size":{vocab},
            "max_position_embeddings":2048,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true}}"#
        );
        ModelConfig::from_json_str(&json, "config.json").unwrap()
    }

    /// SmolLM2-135M: 9 query / 3 KV heads of 64, hidden 576, intermediate 1536, vocab 49152.
    #[test]
    fn smollm2_heads_get_twelve_segments_and_split_three_ways_on_whole_heads_and_blocks() {
        let cfg = llama(576, 1536, 9, 3, 49152);
        let s = auto_reduce_segments(&cfg);
        assert_eq!(s, 12);
        let plans: Vec<ShardPlan> = (0..3).map(|r| ShardPlan::new(&cfg, r, 3, s).unwrap()).collect();
        for (r, p) in plans.iter().enumerate() {
            assert_eq!((p.n_heads, p.n_kv_heads), (3, 1));
            assert_eq!(p.q_rows, r * 192..(r + 1) * 192);
            assert_eq!(p.o_segs.real_range(), p.q_rows);
            assert_eq!(p.mlp_rows(), r * 512..(r + 1) * 512);
            // Quantized o_proj / down_proj shares are whole 32-weight blocks.
            assert!(p.q_rows.start % 32 == 0 && p.mlp_rows().start % 32 == 0);
        }
        assert_eq!(plans[2].vocab_rows().end, 49152);
        assert!(ShardPlan::new(&cfg, 0, 1, s).is_ok());
        assert_eq!(ShardPlan::new(&cfg, 0, 2, s), Err(ShardError::BadDegree { tp: 2, segments: 12 }));
    }

    #[test]
    fn power_of_two_head_counts_keep_power_of_two_segments() {
        // stories260K (8/4 heads, q_dim 64), Qwen2.5-0.5B (14/2, 896), Llama-3.2-1B (32/8, 2048).
        assert_eq!(auto_reduce_segments(&llama(64, 172, 8, 4, 512)), 4);
        assert_eq!(auto_reduce_segments(&llama(896, 4864, 14, 2, 151936)), 8);
        assert_eq!(auto_reduce_segments(&llama(2048, 8192, 32, 8, 128256)), 8);
        // 12 / 6 heads: TP 6 beats TP 2, so the three-way family.
        assert_eq!(auto_reduce_segments(&llama(768, 2048, 12, 6, 1000)), 12);
        // 24 / 8 heads: TP 3 is impossible (8 KV heads), so powers of two.
        assert_eq!(auto_reduce_segments(&llama(1536, 4096, 24, 8, 1000)), 8);
        let cfg = llama(128, 344, 8, 8, 512);
        assert_eq!(ShardPlan::new(&cfg, 0, 3, 8), Err(ShardError::BadDegree { tp: 3, segments: 8 }));
    }
}
