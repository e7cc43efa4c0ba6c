//! The scalar reference: the numerics contract as plain, slow, obvious Rust.
//!
//! This module *is* the spec. Every backend is tested against it bit for bit, so nothing here may
//! be "optimised": each function spells out the order of every rounding. `f32::mul_add` is the
//! IEEE fused multiply-add (one rounding) on every platform, and Rust never contracts `a * b + c`
//! into an fma by itself, so the code means exactly what it says.
//!
//! Weights enter every formula through [`WeightView::get`]: an exact widening for f32/bf16/f16,
//! and for the GGUF block types the one formula of [`crate::quant`] (candle's dequantization) —
//! part of this spec like the orders below.

use crate::math::{exp, silu};
use crate::sampling::{lane_tree, shard_sample};
use crate::{
    AttnParams, AttnSeq, KvLayout, RopeTables, SampleRequest, SegmentRange, Segmentation, ShardSample, VocabShard,
    WeightView, LANES,
};

/// One segment's dot product: 16 logical lanes, lane `l` accumulating elements `l, l+16, …` with
/// fma from +0.0, then [`lane_tree`]. Elements past the end of `x`/`w` (up to `padded`) are zeros.
pub fn segment_dot(x: &[f32], w: &[f32], padded: usize) -> f32 {
    debug_assert!(padded.is_multiple_of(LANES) && x.len() == w.len() && x.len() <= padded);
    let mut acc = [0.0f32; LANES];
    for i in 0..padded {
        let (a, b) = if i < x.len() { (x[i], w[i]) } else { (0.0, 0.0) };
        acc[i % LANES] = a.mul_add(b, acc[i % LANES]);
    }
    lane_tree(acc)
}

/// The canonical tree over `n` values in order (segment sums, rank partials, vocabulary LSE
/// partials): `n` is cut by its binary digits, highest first, into runs of `2^j` values; each run
/// is a balanced tree of adjacent pairs, `((v0+v1)+(v2+v3))+…`, and the runs are added left to
/// right. For `n = 2^k` that is the balanced tree; for `n = 3·2^k` it is
/// `(tree(first 2^(k+1)) + tree(last 2^k))` = `(T0 + T1) + T2` over the three thirds, so every
/// third — and every aligned power-of-two run — is a subtree.
///
/// Always inlined, so a SIMD kernel's `add` (an intrinsic under its `target_feature`) is inlined
/// with it rather than called once per add.
#[inline(always)]
pub fn tree_reduce<T: Copy>(values: &mut [T], add: impl Fn(T, T) -> T) -> T {
    assert!(!values.is_empty(), "tree over no values");
    let mut start = 0;
    let mut total: Option<T> = None;
    while start < values.len() {
        let left = values.len() - start;
        let run = 1usize << (usize::BITS - 1 - left.leading_zeros());
        let v = &mut values[start..start + run];
        let mut n = run;
        while n > 1 {
            for i in 0..n / 2 {
                v[i] = add(v[2 * i], v[2 * i + 1]);
            }
            n /= 2;
        }
        total = Some(match total {
            None => v[0],
            Some(t) => add(t, v[0]),
        });
        start += run;
    }
    total.expect("at least one run")
}

/// The canonical tree ([`tree_reduce`]) over f32 sums.
pub fn segment_tree(values: &[f32]) -> f32 {
    tree_reduce(&mut values.to_vec(), |a, b| a + b)
}

/// The canonical dot product of the real elements `x`, `w` of a segment range (the subtree sum).
pub fn dot(x: &[f32], w: &[f32], segs: SegmentRange) -> f32 {
    let real = segs.real_range();
    assert!(x.len() == real.len() && w.len() == real.len());
    let seg_len = segs.seg.seg_len;
    let sums: Vec<f32> = (0..segs.count)
        .map(|s| {
            // This segment's real elements, relative to the start of the range.
            let lo = (s * seg_len).min(x.len());
            let hi = ((s + 1) * seg_len).min(x.len());
            segment_dot(&x[lo..hi], &w[lo..hi], seg_len)
        })
        .collect();
    segment_tree(&sums)
}

/// Row-parallel partial: `y[m, n]` = subtree sums over `segs` of `x[m, real cols] · w[n, real cols]`.
pub fn linear_partial(x: &[f32], m: usize, w: WeightView<'_>, segs: SegmentRange) -> Vec<f32> {
    let k = segs.real_range().len();
    assert_eq!(w.cols, k, "weight columns must equal the range's real length");
    assert_eq!(x.len(), m * k);
    let wf: Vec<Vec<f32>> = (0..w.rows).map(|r| (0..k).map(|c| w.get(r, c)).collect()).collect();
    let mut y = Vec::with_capacity(m * w.rows);
    for i in 0..m {
        for wr in &wf {
            y.push(dot(&x[i * k..(i + 1) * k], wr, segs));
        }
    }
    y
}

/// `y = x · Wᵀ (+ bias)`: the full segment range, then one add of the bias.
pub fn linear(x: &[f32], m: usize, w: WeightView<'_>, bias: Option<WeightView<'_>>, segments: usize) -> Vec<f32> {
    let segs = Segmentation::new(w.cols, segments).expect("segments").full();
    let mut y = linear_partial(x, m, w, segs);
    if let Some(b) = bias {
        add_bias(&mut y, b);
    }
    y
}

pub fn add_bias(y: &mut [f32], bias: WeightView<'_>) {
    let n = bias.rows * bias.cols;
    for (j, v) in y.iter_mut().enumerate() {
        *v += bias.get(0, j % n);
    }
}

/// Finish the segment tree over `t` partials in rank order, element by element.
pub fn tree_combine(partials: &[&[f32]]) -> Vec<f32> {
    let n = partials[0].len();
    (0..n).map(|j| segment_tree(&partials.iter().map(|p| p[j]).collect::<Vec<_>>())).collect()
}

/// RMSNorm of each row: `ss = dot(x, x)` in the canonical order over `segments`, `mean = ss / n`,
/// `r = 1 / sqrt(mean + eps)` (correctly rounded sqrt and division), `out = (x · r) · w`.
pub fn rms_norm(x: &[f32], w: WeightView<'_>, eps: f32, segments: usize) -> Vec<f32> {
    let n = w.cols * w.rows;
    let segs = Segmentation::new(n, segments).expect("segments").full();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let mean = dot(row, row, segs) / n as f32;
        let r = 1.0 / (mean + eps).sqrt();
        out.extend(row.iter().enumerate().map(|(i, &v)| (v * r) * w.get(0, i)));
    }
    out
}

/// Rotate-half RoPE on `[T, n_heads * head_dim]`: for `i < d/2`,
/// `out[i] = x[i]·cos − x[i+d/2]·sin` and `out[i+d/2] = x[i+d/2]·cos + x[i]·sin`, each product
/// rounded, then one add (no fma).
pub fn rope(x: &mut [f32], n_heads: usize, positions: &[u32], t: &RopeTables) {
    let d = t.head_dim;
    let h = d / 2;
    for (row, &pos) in x.chunks_exact_mut(n_heads * d).zip(positions) {
        let (cos, sin) = t.row(pos as usize).expect("position within rope table");
        for head in row.chunks_exact_mut(d) {
            for i in 0..h {
                let (a, b) = (head[i], head[i + h]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + h] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
}

/// Rows of the embedding table, widened exactly to f32.
pub fn embedding(ids: &[u32], table: WeightView<'_>) -> Vec<f32> {
    ids.iter().flat_map(|&id| (0..table.cols).map(move |c| table.get(id as usize, c))).collect()
}

pub fn add(y: &[f32], x: &[f32]) -> Vec<f32> {
    y.iter().zip(x).map(|(a, b)| a + b).collect()
}

/// Cache offset of (slot, kv head).
fn kv_at(layout: &KvLayout, slot: usize, head: usize) -> usize {
    (slot * layout.n_kv_heads + head) * layout.head_dim
}

/// Paged causal attention with GQA. For each query (absolute position `pos`) and head: keys at
/// positions `0..=pos` in chunks `[c·C, (c+1)·C)`; per chunk `s_p = dot16(q, k_p) · scale`,
/// `m_c = max s_p`, `l_c = Σ exp(s_p − m_c)` and `o_c = Σ exp(s_p − m_c) · v_p` (fma), both
/// accumulated in ascending position; chunk states merged in chunk order by
/// `m = max(m, m_c)`, `l = l·e^(m_old−m) + l_c·e^(m_c−m)`, `o` likewise; finally `o / l`.
pub fn attention(
    q: &[f32],
    seqs: &[AttnSeq<'_>],
    k_cache: &[f32],
    v_cache: &[f32],
    layout: &KvLayout,
    p: AttnParams,
) -> Vec<f32> {
    let d = p.head_dim;
    let width = p.n_heads * d;
    let group = p.n_heads / p.n_kv_heads;
    let scale = p.scale();
    let padded = d.div_ceil(LANES) * LANES;
    let rows = seqs.iter().map(|s| s.q_row + s.n_q).max().unwrap_or(0);
    let mut out = vec![0.0f32; rows * width];
    for s in seqs {
        for i in 0..s.n_q {
            let pos = s.first_pos + i;
            let row = s.q_row + i;
            for h in 0..p.n_heads {
                let qh = &q[row * width + h * d..row * width + (h + 1) * d];
                let kvh = h / group;
                let mut state: Option<(f32, f32, Vec<f32>)> = None;
                for c in 0..=pos / p.kv_chunk {
                    let keys = c * p.kv_chunk..((c + 1) * p.kv_chunk).min(pos + 1);
                    let slot = |kp: usize| s.block_table[kp / p.block_size] as usize * p.block_size + kp % p.block_size;
                    let scores: Vec<f32> = keys
                        .clone()
                        .map(|kp| {
                            let o = kv_at(layout, slot(kp), kvh);
                            segment_dot(qh, &k_cache[o..o + d], padded) * scale
                        })
                        .collect();
                    let m_c = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut l_c = 0.0f32;
                    let mut o_c = vec![0.0f32; d];
                    for (kp, &sc) in keys.clone().zip(&scores) {
                        let pr = exp(sc - m_c);
                        l_c += pr;
                        let o = kv_at(layout, slot(kp), kvh);
                        for (acc, &v) in o_c.iter_mut().zip(&v_cache[o..o + d]) {
                            *acc = pr.mul_add(v, *acc);
                        }
                    }
                    state = Some(match state {
                        None => (m_c, l_c, o_c),
                        Some((m, l, o)) => {
                            let mn = m.max(m_c);
                            let (a, b) = (exp(m - mn), exp(m_c - mn));
                            let o = o.iter().zip(&o_c).map(|(&x, &y)| x * a + y * b).collect();
                            (mn, l * a + l_c * b, o)
                        }
                    });
                }
                let (_, l, o) = state.expect("at least one key");
                for (j, v) in o.iter().enumerate() {
                    out[row * width + h * d + j] = v / l;
                }
            }
        }
    }
    out
}

/// Sampling reports of one vocab shard for each row of `logits` (`[requests.len(), shard.rows]`).
pub fn sample_shard(logits: &[f32], shard: VocabShard, requests: &[SampleRequest]) -> Vec<ShardSample> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| shard_sample(&logits[i * shard.rows..(i + 1) * shard.rows], &shard, r))
        .collect()
}
