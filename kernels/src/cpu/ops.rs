//! The element-wise and per-row ops of the CPU backend.
//!
//! These are scalar loops in the contract order (they cost O(hidden) per token, against O(hidden²)
//! for the matmuls). On x86 they are compiled a second time with the `fma` target feature, so the
//! contract's `mul_add` becomes one `vfmadd` instruction instead of a call into libm's software
//! `fmaf` — the same IEEE result, much faster (RMSNorm's sum of squares, SwiGLU and the vocabulary
//! log-sum-exp have AVX-512 twins with the same bits). Rows are spread over the backend's threads
//! (with few rows, as at batch-1 decode, attention spreads each row's units of heads — and where
//! those are too few, chunks of keys, whose partials are folded in chunk order afterwards — and
//! sampling each row's vocab segments); each row's bits never depend on which thread ran it. A
//! prefill's rows (16 or more of one sequence) score against their keys transposed into lanes once
//! per call, 16 keys a register, which turns the lane tree into vertical adds ([`LaneKeys`]), and
//! run in blocks of rows that take each chunk of keys in turn ([`attention_lane_blocks`]).

use super::{linear::segment_tree_inplace, CpuBackend, Isa, SharedOut};
use crate::math::{exp, silu};
use crate::sampling::{lane_tree, segment_exp_lanes, shard_sample_on};
use crate::{AttnParams, AttnSeq, KvLayout, SampleRequest, Segmentation, ShardSample, VocabShard, WeightView, LANES};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering::*};

/// Run `$body` (a generic `#[inline(always)]` fn call) through a copy compiled with FMA when the
/// backend's ISA has it.
macro_rules! with_fma {
    ($be:expr, $name:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "fma")]
            unsafe fn fma_copy<R>(f: impl FnOnce() -> R) -> R { f() }
            if $be.isa() != Isa::Scalar {
                // SAFETY: AVX2 and AVX-512 paths are only selected when FMA is present.
                unsafe { fma_copy(|| $name($($arg),*)) }
            } else {
                $name($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $name($($arg),*)
        }
    }};
}

/// The canonical dot product of a real-length slice with itself over a full segmentation,
/// without allocating: the same order as [`crate::reference::dot`]. `lanes(lo, hi)` gives the 16
/// lane sums of the squares of `x[lo..hi]` (lane `e % 16` takes element `e`, an fma chain in
/// element order): [`square_lanes`] or a SIMD twin with its bits.
#[inline(always)]
fn squares_full(x: &[f32], seg: Segmentation, lanes: impl Fn(usize, usize) -> [f32; LANES]) -> f32 {
    let mut sums = [0.0f32; 64];
    for (s, sum) in sums.iter_mut().enumerate().take(seg.segments) {
        // Padding lanes would add fma(0, 0, acc) = acc + 0: the same as skipping them, since
        // every accumulator is either +0.0 or has absorbed a product already (−0 + +0 = +0 is
        // the one case that differs, and it cannot arise from a +0.0 start).
        *sum = lane_tree(lanes((s * seg.seg_len).min(x.len()), ((s + 1) * seg.seg_len).min(x.len())));
    }
    segment_tree_inplace(&mut sums[..seg.segments])
}

/// The lane sums of [`squares_full`], one element at a time.
#[inline(always)]
fn square_lanes(x: &[f32], lo: usize, hi: usize) -> [f32; LANES] {
    let mut acc = [0.0f32; LANES];
    for e in lo..hi {
        acc[e % LANES] = x[e].mul_add(x[e], acc[e % LANES]);
    }
    acc
}

#[inline(always)]
fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, seg: Segmentation, out: &mut [f32], avx512: bool) {
    let n = row.len();
    #[cfg(target_arch = "x86_64")]
    let squares = if avx512 {
        // SAFETY: the caller found AVX-512 on this CPU; the ranges lie inside the row.
        squares_full(row, seg, |lo, hi| unsafe { super::x86::square_lanes_avx512(row, lo, hi) })
    } else {
        squares_full(row, seg, |lo, hi| square_lanes(row, lo, hi))
    };
    #[cfg(not(target_arch = "x86_64"))]
    let squares = {
        let _ = avx512;
        squares_full(row, seg, |lo, hi| square_lanes(row, lo, hi))
    };
    let mean = squares / n as f32;
    let r = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &wi) in out.iter_mut().zip(row).zip(w) {
        *o = (v * r) * wi;
    }
}

pub(crate) fn rms_norm(be: &CpuBackend, x: &[f32], w: WeightView<'_>, eps: f32, out: &mut [f32]) {
    let n = w.rows * w.cols;
    assert!(x.len().is_multiple_of(n) && out.len() == x.len());
    let seg = Segmentation::new(n, be.config().numerics.reduce_segments).expect("validated");
    // An f32 weight is read in place (widening it cost a decode step ~1 % of its time on the step
    // thread); another type is widened once per call, not per element of every row.
    let wide;
    let w = match w.as_f32() {
        Some(values) => values,
        None => {
            wide = w.to_f32();
            wide.as_slice()
        }
    };
    let avx512 = be.isa() == Isa::Avx512;
    be.run_chunks(out, n, |r, o| with_fma!(be, rms_norm_row(&x[r * n..(r + 1) * n], w, eps, seg, o, avx512)));
    prefetch_following(w);
}

/// Asks for the `values.len()` floats after `values` (into L2): the model's vectors lie back to
/// back in load order (`CpuBackend::prepare_weight`), so after a layer's input norm that is its
/// post-attention norm and after that the next layer's input norm, whose loads otherwise each
/// waited on DRAM with the team idle. A hint past any allocation's end is harmless: a prefetch
/// never faults, and no bit depends on it.
fn prefetch_following(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let end = values.as_ptr_range().end as *const i8;
        for line in (0..4 * values.len()).step_by(64) {
            // SAFETY: a prefetch reads nothing architecturally, at any address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(end.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

#[inline(always)]
fn swiglu_slice(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

pub(crate) fn swiglu(be: &CpuBackend, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && out.len() == gate.len());
    const CHUNK: usize = 4096;
    be.run_chunks(out, CHUNK, |i, o| {
        let (g, u) = (&gate[i * CHUNK..][..o.len()], &up[i * CHUNK..][..o.len()]);
        #[cfg(target_arch = "x86_64")]
        if be.isa() == Isa::Avx512 {
            // SAFETY: the AVX-512 path is only selected when the CPU has it.
            return unsafe { super::x86::swiglu_avx512(g, u, o) };
        }
        with_fma!(be, swiglu_slice(g, u, o))
    });
}

/// `y += bias`, the bias repeated over `y`'s rows: [`crate::reference::add_bias`]'s one f32 add
/// per element, without widening element by element where the bias is f32 already (every vector
/// the CPU backend prepared is).
pub(crate) fn add_bias(y: &mut [f32], bias: WeightView<'_>) {
    match bias.as_f32() {
        Some(b) if !b.is_empty() => {
            for row in y.chunks_mut(b.len()) {
                for (v, &add) in row.iter_mut().zip(b) {
                    *v += add;
                }
            }
        }
        _ => crate::reference::add_bias(y, bias),
    }
}

/// Finish the segment tree over `t` partials (rank order), element by element, into `y`.
///
/// The tree runs on [`LANES`] elements at once, each lane its own element's tree with the same
/// adds in the same order as one element alone (f32 adds are neither fused nor reassociated), so
/// no bit changes; `t` is a constant of each instance, so the tree unrolls into vector adds. One
/// element at a time, the tree's setup per element made this the larger part of a TP = 2
/// all-reduce at batch 8: ~35 µs of ~65 for 2 × 7 168 floats (BENCHMARKS §24.2).
pub fn tree_combine(parts: &[&[f32]], y: &mut [f32]) {
    let t = parts.len();
    assert!(crate::is_segment_count(t) && parts.iter().all(|p| p.len() == y.len()));
    match t {
        1 => y.copy_from_slice(parts[0]),
        2 => tree_combine_lanes::<2>(parts, y),
        3 => tree_combine_lanes::<3>(parts, y),
        4 => tree_combine_lanes::<4>(parts, y),
        6 => tree_combine_lanes::<6>(parts, y),
        8 => tree_combine_lanes::<8>(parts, y),
        12 => tree_combine_lanes::<12>(parts, y),
        16 => tree_combine_lanes::<16>(parts, y),
        24 => tree_combine_lanes::<24>(parts, y),
        32 => tree_combine_lanes::<32>(parts, y),
        48 => tree_combine_lanes::<48>(parts, y),
        64 => tree_combine_lanes::<64>(parts, y),
        other => unreachable!("{other} is not a segment count"),
    }
}

fn tree_combine_lanes<const T: usize>(parts: &[&[f32]], y: &mut [f32]) {
    let tree = |v: &mut [[f32; LANES]; T]| {
        crate::reference::tree_reduce(v, |a: [f32; LANES], b| std::array::from_fn(|l| a[l] + b[l]))
    };
    let full = y.len() / LANES * LANES;
    let mut v = [[0.0f32; LANES]; T];
    let (body, tail) = y.split_at_mut(full);
    for (c, out) in body.chunks_exact_mut(LANES).enumerate() {
        for (lanes, p) in v.iter_mut().zip(parts) {
            *lanes = p[c * LANES..][..LANES].try_into().expect("a whole chunk");
        }
        out.copy_from_slice(&tree(&mut v));
    }
    if !tail.is_empty() {
        // The lanes past the tail stay as they were: their sums are not kept.
        for (lanes, p) in v.iter_mut().zip(parts) {
            lanes[..tail.len()].copy_from_slice(&p[full..]);
        }
        let sum = tree(&mut v);
        tail.copy_from_slice(&sum[..tail.len()]);
    }
}

/// One segment's 16-lane dot (the attention score rule: head_dim is one zero-padded segment).
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (e, (&x, &y)) in a.iter().zip(b).enumerate() {
        acc[e % LANES] = x.mul_add(y, acc[e % LANES]);
    }
    lane_tree(acc)
}

/// Query heads that run together (in one pass over the keys): on AVX-512 with `head_dim ≤
/// ATTN_PAIR_MAX_DIM`, up to three heads that read the same KV head (each key and value is then
/// loaded once for all of them), one head otherwise. Units only group work: each head's
/// operations are the same in any unit, so neither the unit shape nor which thread runs a unit
/// changes a bit.
#[derive(Clone, Copy)]
struct HeadUnits {
    /// Query heads per KV head.
    group: usize,
    /// Heads per unit: 3 or 2 (whichever gives a group fewer units, 2 on a tie; the last unit of
    /// a group takes what is left) or 1. Where few rows' tasks at three wide would leave a
    /// thread short of work even split by chunks (SmolLM2 at batch 1 with one chunk of keys: 3
    /// tasks on 2 threads), 2; where every row's keys are in lanes ([`LaneKeys`]), up to 4.
    width: usize,
    /// Units per group.
    per_group: usize,
    /// Whether few rows' tasks are also split by chunk of keys: where (row, unit) tasks at the
    /// widest units would leave a thread short of work (SmolLM2 at batch 1: 3 on 2 threads), so
    /// that a group's keys are still read by one unit. Where there are enough (Qwen2.5's 6),
    /// chunk tasks would only add their partials and fold (its cold-decode bench rows ~+10 %).
    by_chunks: bool,
}

impl HeadUnits {
    /// `few`: rows run as (row, unit) tasks rather than whole rows; `row_chunks`: the chunks of
    /// keys summed over the `rows` rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn new(be: &CpuBackend, p: AttnParams, few: bool, rows: usize, row_chunks: usize) -> Self {
        let group = p.n_heads / p.n_kv_heads;
        let threads = be.threads();
        #[cfg(target_arch = "x86_64")]
        let widest = if be.isa() == Isa::Avx512 && p.head_dim <= super::x86::ATTN_PAIR_MAX_DIM {
            if group.div_ceil(3) < group.div_ceil(2) {
                3
            } else {
                2
            }
        } else {
            1
        };
        #[cfg(not(target_arch = "x86_64"))]
        let widest = 1;
        let short = |tasks: usize| few && threads > 1 && tasks < 2 * threads;
        let by_chunks = short(rows * p.n_kv_heads * group.div_ceil(widest));
        let tasks_per_unit = if by_chunks { row_chunks } else { rows };
        let width = if widest == 3 && short(tasks_per_unit * p.n_kv_heads * group.div_ceil(3)) { 2 } else { widest };
        HeadUnits { group, width, per_group: group.div_ceil(width), by_chunks }
    }

    /// Units of at most `width` heads (a group's last unit takes what is left).
    fn with_width(self, width: usize) -> Self {
        let width = width.min(self.group);
        HeadUnits { width, per_group: self.group.div_ceil(width), ..self }
    }

    fn count(&self, n_heads: usize) -> usize {
        n_heads / self.group * self.per_group
    }

    /// Unit `u`'s heads, `first..first + heads`.
    fn heads(&self, u: usize) -> (usize, usize) {
        let (g, j) = (u / self.per_group, u % self.per_group);
        let first = j * self.width;
        (g * self.group + first, self.width.min(self.group - first))
    }
}

/// Scores of one chunk of keys for the AVX-512 heads: 16 floats per group of `16 / heads` keys
/// (16, 8 or 5). Chunks of up to 128 keys keep them on the stack (zeroed per unit, so it stays
/// small: 2 KiB).
const STACK_SCORES: usize = 512;

/// The first `need` floats of `stack`, or of `heap` grown to them where the stack has too few.
#[cfg(target_arch = "x86_64")]
fn scores_scratch<'a>(stack: &'a mut [f32; STACK_SCORES], heap: &'a mut Vec<f32>, need: usize) -> &'a mut [f32] {
    if need <= STACK_SCORES {
        &mut stack[..need]
    } else {
        heap.resize(need, 0.0);
        heap
    }
}

/// The contract's merge of a chunk's `(m_c, l_c)` into the running `(m, l)` of the chunks before
/// it (chunk order): updates them and returns the weights `(a, b)` of the output merge
/// `o = o · a + o_c · b` (two products and a sum, not an fma). Every merge of attention — in one
/// pass over a row's keys, or folding chunk partials computed apart — runs through here.
#[inline(always)]
pub(super) fn merge_chunk_weights((m, l): (&mut f32, &mut f32), m_c: f32, l_c: f32) -> (f32, f32) {
    let mn = m.max(m_c);
    let (a, b) = (exp(*m - mn), exp(m_c - mn));
    *l = *l * a + l_c * b;
    *m = mn;
    (a, b)
}

/// Merges a chunk's partial `part` (`[m_c, l_c, o_c…]`) into the running state of the chunks
/// before it (`[m, l, o…]`, the same layout), as [`merge_chunk_weights`] says.
#[inline(always)]
fn merge_chunk(state: &mut [f32], part: &[f32]) {
    let (ml, o) = state.split_at_mut(2);
    let (m, l) = ml.split_at_mut(1);
    let (a, b) = merge_chunk_weights((&mut m[0], &mut l[0]), part[0], part[1]);
    for (x, &y) in o.iter_mut().zip(&part[2..]) {
        *x = *x * a + y * b;
    }
}

/// Folds one head's `chunks` chunk partials, in chunk order, into its output: part `c` is `[m_c,
/// l_c, o_c…]` (`2 + d` floats, as [`attention_heads`] writes them with `partial`) at `c ·
/// stride` of `parts`; the first part is the running state, overwritten. `out` receives `o / l`.
/// Plain loops, no iterator adaptors: those are not inlined into the FMA copy of [`with_fma`],
/// and `exp`'s `mul_add` there would call the software `fmaf`.
#[inline(always)]
fn fold_chunk_partials(parts: &mut [f32], stride: usize, chunks: usize, out: &mut [f32]) {
    let width = 2 + out.len();
    let (state, rest) = parts.split_at_mut(width);
    for c in 1..chunks {
        merge_chunk(state, &rest[c * stride - width..][..width]);
    }
    let l = state[1];
    for (dst, &x) in out.iter_mut().zip(&state[2..]) {
        *dst = x / l;
    }
}

/// Heads `first..first + heads` of one query row (see [`crate::reference::attention`] for the
/// rule), one unit of [`HeadUnits`]. `keys[kp]` is the cache offset of key `kp`'s head 0; the
/// first `attended` are the keys attended (all of `0..=pos`, or with `partial` one chunk's) and
/// the rest the row's later keys; `qrow` is the whole row.
/// `out` receives the unit's heads (`heads · head_dim` floats), or with `partial` each head's
/// unnormalised state `[m, l, o…]` (`heads · (2 + head_dim)` floats) for
/// [`fold_chunk_partials`]. `cold`: the keys are likely out of cache (few rows, at decode), so the
/// vector kernel prefetches them, the row's later keys too. `lanes`: the row's sequence's keys in
/// lanes, every KV head's in turn (see [`LaneKeys`]), where it has them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn attention_heads(
    be: &CpuBackend,
    qrow: &[f32],
    (first, heads): (usize, usize),
    (keys, attended): (&[usize], usize),
    k_cache: &[f32],
    v_cache: &[f32],
    p: AttnParams,
    out: &mut [f32],
    partial: bool,
    cold: bool,
    lanes: Option<&[f32]>,
) {
    let d = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let scale = p.scale();
    let out_width = if partial { 2 + d } else { d };
    #[cfg(target_arch = "x86_64")]
    if be.isa() == Isa::Avx512 && d <= super::x86::ATTN_MAX_DIM {
        use super::x86::{attention_heads_dispatch, AttnKeys};
        // 16 floats per group of keys: 16 / heads keys per group; in lanes, `x86::lane_scores`.
        let need = (p.kv_chunk.div_ceil(16 / heads) * 16).max(super::x86::lane_scores(heads, p.kv_chunk));
        let (mut stack, mut heap) = ([0.0f32; STACK_SCORES], Vec::new());
        let scores = scores_scratch(&mut stack, &mut heap, need);
        let (qh, o) = (&qrow[first * d..(first + heads) * d], out);
        let kv_chunk = p.kv_chunk;
        let kv_head = first / group;
        let lanes = lanes.map(|all| {
            let per_head = all.len() / p.n_kv_heads;
            &all[kv_head * per_head..][..per_head]
        });
        let keys = AttnKeys { keys, attended, kv_head, k_cache, v_cache, kv_chunk, scale, cold, lanes };
        // SAFETY: the AVX-512 path is only selected when the CPU has it; d is within bounds
        // (a unit of two or three only where d ≤ ATTN_PAIR_MAX_DIM, all its heads in one KV
        // group), `o` holds `heads · out_width` floats, and every key offset was computed from
        // the layout, whose caches hold every slot.
        unsafe {
            match heads {
                3 => {
                    let (qa, rest) = qh.split_at(d);
                    let (qb, qc) = rest.split_at(d);
                    let (oa, rest) = o.split_at_mut(out_width);
                    let (ob, oc) = rest.split_at_mut(out_width);
                    attention_heads_dispatch::<3>([qa, qb, qc], &keys, scores, [oa, ob, oc], partial);
                }
                2 => {
                    let (qa, qb) = qh.split_at(d);
                    let (oa, ob) = o.split_at_mut(out_width);
                    attention_heads_dispatch::<2>([qa, qb], &keys, scores, [oa, ob], partial);
                }
                4 => {
                    let (qa, rest) = qh.split_at(d);
                    let (qb, rest) = rest.split_at(d);
                    let (qc, qd) = rest.split_at(d);
                    let (oa, rest) = o.split_at_mut(out_width);
                    let (ob, rest) = rest.split_at_mut(out_width);
                    let (oc, od) = rest.split_at_mut(out_width);
                    attention_heads_dispatch::<4>([qa, qb, qc, qd], &keys, scores, [oa, ob, oc, od], partial);
                }
                _ => attention_heads_dispatch::<1>([qh], &keys, scores, [o], partial),
            }
        }
        return;
    }
    let mut scores = vec![0.0f32; p.kv_chunk];
    // One head's running state `[m, l, o…]` and a chunk's partial `[m_c, l_c, o_c…]`.
    let mut state = vec![0.0f32; 2 + d];
    let mut chunk = vec![0.0f32; 2 + d];
    for h in first..first + heads {
        let qh = &qrow[h * d..(h + 1) * d];
        let kvh = h / group;
        for (c, keys) in keys[..attended].chunks(p.kv_chunk).enumerate() {
            let at = |i: usize| keys[i] + kvh * d;
            let mut m_c = f32::NEG_INFINITY;
            for (i, s) in scores[..keys.len()].iter_mut().enumerate() {
                let a = at(i);
                *s = lane_dot(qh, &k_cache[a..a + d]) * scale;
                m_c = m_c.max(*s);
            }
            let part = if c == 0 { &mut state } else { &mut chunk };
            let (ml, o_c) = part.split_at_mut(2);
            o_c.fill(0.0);
            let mut l_c = 0.0f32;
            for (i, &s) in scores[..keys.len()].iter().enumerate() {
                let pr = exp(s - m_c);
                l_c += pr;
                let a = at(i);
                for (acc, &v) in o_c.iter_mut().zip(&v_cache[a..a + d]) {
                    *acc = pr.mul_add(v, *acc);
                }
            }
            (ml[0], ml[1]) = (m_c, l_c);
            if c > 0 {
                merge_chunk(&mut state, &chunk);
            }
        }
        let dst = &mut out[(h - first) * out_width..(h - first + 1) * out_width];
        if partial {
            dst.copy_from_slice(&state);
        } else {
            fold_chunk_partials(&mut state, 0, 1, dst);
        }
    }
}

/// Query rows per thread below which attention splits rows into (row, unit of heads, chunk of
/// keys) tasks rather than running a task per row: one decode row alone would otherwise keep one
/// thread busy while the rest wait.
const ROWS_PER_THREAD_FOR_ROW_TASKS: usize = 4;

/// The split path's scratch (see [`attention`]), kept per calling thread and only grown: each
/// (row, unit, chunk) task's partials, and per (row, unit) how many of its chunks are done.
#[derive(Default)]
struct SplitScratch {
    partials: Vec<f32>,
    done: Vec<AtomicUsize>,
}

/// A call's key index, kept per calling thread and only grown: each sequence's key offsets (the
/// cache offset of each key's head 0: a query row at position `pos` reads its sequence's first
/// `pos + 1`) back to back, rather than a slot lookup with a division per key and row; and per
/// query row `(output row, position, index of its sequence's first offset)`. A decode step's calls
/// (one per layer) used to allocate and collect both, ~4 % of the step thread's time.
///
/// A step's layers call with the same sequences, so the index is rebuilt only when they differ
/// from the last call's (compared by what it is built from: O(blocks), not O(keys)).
#[derive(Default)]
struct KeyIndex {
    offsets: Vec<usize>,
    rows: Vec<(usize, usize, usize)>,
    /// What `offsets` and `rows` were built from: the block size and slot stride, then per
    /// sequence its first query row, query count, first position and the block ids it reads.
    built_from: Vec<usize>,
    /// The same for the current call, before it is compared.
    asked: Vec<usize>,
}

impl KeyIndex {
    fn build(&mut self, seqs: &[AttnSeq<'_>], layout: &KvLayout) {
        let (bs, stride) = (layout.block_size, layout.n_kv_heads * layout.head_dim);
        self.asked.clear();
        self.asked.extend([bs, stride]);
        for s in seqs {
            self.asked.extend([s.q_row, s.n_q, s.first_pos]);
            let blocks = (s.first_pos + s.n_q).div_ceil(bs);
            self.asked.extend(s.block_table.iter().take(blocks).map(|&b| b as usize));
        }
        if self.asked == self.built_from {
            return;
        }
        std::mem::swap(&mut self.asked, &mut self.built_from);
        self.offsets.clear();
        self.rows.clear();
        for s in seqs {
            let first = self.offsets.len();
            let keys = s.first_pos + s.n_q;
            for (i, &b) in s.block_table.iter().take(keys.div_ceil(bs)).enumerate() {
                let base = b as usize * bs;
                for slot in base..base + bs.min(keys - i * bs) {
                    self.offsets.push(slot * stride);
                }
            }
            self.rows.extend((0..s.n_q).map(|i| (s.q_row + i, s.first_pos + i, first)));
        }
    }
}

/// Query rows of one sequence from which its keys are transposed into lanes for the call (a
/// prefill chunk's): the transpose costs about what one row's scores against the keys cost, and a
/// batch of decode rows (one per sequence) keeps the fold.
const LANE_KEYS_MIN_ROWS: usize = 16;

/// Heads per unit where every row's keys are in lanes (Qwen2.5's groups of 7: 4 + 3, rather than
/// the fold's 3 + 3 + 1, whose lone head loads a key vector per fma).
const LANE_UNIT_HEADS: usize = 4;

/// A call's keys in lanes, kept per calling thread and only grown: for each sequence with at
/// least [`LANE_KEYS_MIN_ROWS`] query rows, every KV head's chunks of keys transposed once
/// (`x86::transpose_keys_avx512`) and then read by all its rows and heads, whose scores are then
/// plain vector fmas and adds in the contract's order (`x86::attention_chunk_lanes`).
#[derive(Default)]
struct LaneKeys {
    floats: Vec<f32>,
    seqs: Vec<LaneSeq>,
    /// The call's rows of those sequences in blocks for [`attention_lane_blocks`]: first row, rows
    /// (a block never spans two sequences).
    blocks: Vec<(usize, usize)>,
}

/// One sequence's keys in lanes: KV head `h`'s chunk `c` at `base + (h · chunks + c) ·
/// x86::lane_key_floats`.
#[derive(Clone, Copy)]
struct LaneSeq {
    /// The index of its first key offset (a row's third field in [`KeyIndex::rows`]).
    first: usize,
    keys: usize,
    chunks: usize,
    base: usize,
}

impl LaneKeys {
    /// Transposes the keys of the sequences of `rows` that have enough rows, on the backend's
    /// team; another call's are forgotten. Returns whether every row's sequence has them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn build(
        &mut self,
        be: &CpuBackend,
        rows: &[(usize, usize, usize)],
        offsets: &[usize],
        (k_cache, v_cache): (&[f32], &[f32]),
        p: AttnParams,
    ) -> bool {
        self.seqs.clear();
        self.blocks.clear();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86::{lane_chunk_floats, transpose_chunk_avx512, ATTN_PAIR_MAX_DIM};
            let d = p.head_dim;
            if be.isa() != Isa::Avx512 || d > ATTN_PAIR_MAX_DIM {
                return false;
            }
            let mut every_row = true;
            let chunk_floats = lane_chunk_floats(p.kv_chunk, d);
            let (mut base, mut at) = (0, 0);
            // A sequence's rows are consecutive and in position order (`KeyIndex::build`).
            while at < rows.len() {
                let first = rows[at].2;
                let n_q = rows[at..].iter().take_while(|r| r.2 == first).count();
                let keys = rows[at + n_q - 1].1 + 1;
                if n_q >= LANE_KEYS_MIN_ROWS {
                    let chunks = keys.div_ceil(p.kv_chunk);
                    self.seqs.push(LaneSeq { first, keys, chunks, base });
                    let blocks = (at..at + n_q).step_by(LANE_BLOCK_ROWS);
                    self.blocks.extend(blocks.map(|b| (b, LANE_BLOCK_ROWS.min(at + n_q - b))));
                    base += p.n_kv_heads * chunks * chunk_floats;
                } else {
                    every_row = false;
                }
                at += n_q;
            }
            if self.floats.len() < base {
                self.floats.resize(base, 0.0);
            }
            // One task per (sequence, KV head, chunk), numbered in that order.
            let seqs = &self.seqs;
            let tasks = seqs.iter().map(|s| p.n_kv_heads * s.chunks).sum();
            let dst = SharedOut(self.floats.as_mut_ptr());
            be.run_tasks(tasks, |t| {
                #[allow(clippy::redundant_locals)]
                let dst = dst;
                let (mut s, mut seq_task) = (0, 0);
                while t >= seq_task + p.n_kv_heads * seqs[s].chunks {
                    seq_task += p.n_kv_heads * seqs[s].chunks;
                    s += 1;
                }
                let LaneSeq { first, keys, chunks, base } = seqs[s];
                let (kv_head, c) = ((t - seq_task) / chunks, (t - seq_task) % chunks);
                let chunk = &offsets[first + c * p.kv_chunk..first + ((c + 1) * p.kv_chunk).min(keys)];
                // SAFETY: task `t` alone writes its chunk's floats, inside the buffer (sized
                // above); AVX-512 is present (checked above), d ≤ ATTN_PAIR_MAX_DIM, and every key
                // offset was computed from the layout, whose cache holds every slot.
                unsafe {
                    let out = dst.slice(base + (kv_head * chunks + c) * chunk_floats, chunk_floats);
                    transpose_chunk_avx512(chunk, (k_cache, v_cache), (kv_head, d, p.kv_chunk), out);
                }
            });
            every_row
        }
    }

    /// The keys in lanes of the sequence whose key offsets start at index `first`, if it has them.
    fn of(&self, first: usize, p: AttnParams) -> Option<&[f32]> {
        #[cfg(target_arch = "x86_64")]
        {
            let chunk_floats = super::x86::lane_chunk_floats(p.kv_chunk, p.head_dim);
            let s = self.seqs.iter().find(|s| s.first == first)?;
            Some(&self.floats[s.base..][..p.n_kv_heads * s.chunks * chunk_floats])
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (first, p);
            None
        }
    }
}

/// Query rows of one sequence that run a chunk of keys in lanes one after another
/// (`x86::attention_block_lanes_avx512`), so that the chunk's keys and values stay in L1 for all
/// but the first.
const LANE_BLOCK_ROWS: usize = 16;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(LANE_BLOCK_ROWS <= super::x86::LANE_BLOCK_MAX_ROWS);

/// The rows of a call whose every sequence has its keys in lanes, as tasks of (block of
/// [`LANE_BLOCK_ROWS`] rows of one sequence, unit of heads), the blocks of the latest positions
/// (the longest rows of the causal triangle) first so that the cheap ones even out the threads'
/// ends. A row's heads run the same chunks in the same order as [`attention_heads`], so their
/// bits do too.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn attention_lane_blocks(
    be: &CpuBackend,
    q: &[f32],
    rows: &[(usize, usize, usize)],
    lanes: &LaneKeys,
    p: AttnParams,
    units: HeadUnits,
    out: &mut [f32],
) {
    use super::x86::{attention_block_lanes_dispatch, AttnLaneKeys};
    let (d, width) = (p.head_dim, p.n_heads * p.head_dim);
    let n_units = units.count(p.n_heads);
    let blocks = &lanes.blocks;
    let dst = SharedOut(out.as_mut_ptr());
    be.run_tasks(blocks.len() * n_units, |t| {
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let (start, n_rows) = blocks[blocks.len() - 1 - t / n_units];
        let (first, heads) = units.heads(t % n_units);
        let seq_first = rows[start].2;
        let all = lanes.of(seq_first, p).expect("every row's sequence has its keys in lanes");
        let per_head = all.len() / p.n_kv_heads;
        let kv_head = first / units.group;
        let block =
            AttnLaneKeys { lanes: &all[kv_head * per_head..][..per_head], kv_chunk: p.kv_chunk, scale: p.scale() };
        let row = |r: usize| {
            let (row, pos, _) = rows[start + r];
            let at = row * width + first * d;
            // SAFETY: `at..at + heads · d` lies in `q` and `out` (row `row`'s heads of this unit).
            (unsafe { q.as_ptr().add(at) }, pos + 1, unsafe { dst.0.add(at) })
        };
        let (mut stack, mut heap) = ([0.0f32; STACK_SCORES], Vec::new());
        let scores = scores_scratch(&mut stack, &mut heap, super::x86::lane_scores(heads, p.kv_chunk));
        // SAFETY: AVX-512 and d ≤ ATTN_PAIR_MAX_DIM (the keys are in lanes only then); a block
        // holds at most LANE_BLOCK_ROWS ≤ LANE_BLOCK_MAX_ROWS rows; each (row, unit) is one
        // task's, so no two tasks write the same output; `scores` is sized above; every key offset
        // was computed from the layout, whose caches hold every slot.
        unsafe {
            match heads {
                1 => attention_block_lanes_dispatch::<1>(&block, d, n_rows, row, scores),
                2 => attention_block_lanes_dispatch::<2>(&block, d, n_rows, row, scores),
                3 => attention_block_lanes_dispatch::<3>(&block, d, n_rows, row, scores),
                _ => attention_block_lanes_dispatch::<4>(&block, d, n_rows, row, scores),
            }
        }
    });
}

thread_local! {
    static SPLIT_SCRATCH: RefCell<SplitScratch> = RefCell::new(SplitScratch::default());
    static KEY_INDEX: RefCell<KeyIndex> = RefCell::new(KeyIndex::default());
    static LANE_KEYS: RefCell<LaneKeys> = RefCell::new(LaneKeys::default());
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    be: &CpuBackend,
    q: &[f32],
    seqs: &[AttnSeq<'_>],
    k_cache: &[f32],
    v_cache: &[f32],
    layout: &KvLayout,
    p: AttnParams,
    out: &mut [f32],
) {
    assert!(q.len() == out.len() && q.len().is_multiple_of(p.n_heads * p.head_dim));
    assert!(p.n_kv_heads == layout.n_kv_heads && p.head_dim == layout.head_dim && p.block_size == layout.block_size);
    KEY_INDEX.with_borrow_mut(|index| {
        index.build(seqs, layout);
        attention_rows(be, q, &index.offsets, &index.rows, k_cache, v_cache, p, out)
    })
}

/// [`attention`] over an index that [`KeyIndex::build`] made.
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    be: &CpuBackend,
    q: &[f32],
    offsets: &[usize],
    rows: &[(usize, usize, usize)],
    k_cache: &[f32],
    v_cache: &[f32],
    p: AttnParams,
    out: &mut [f32],
) {
    let (d, width) = (p.head_dim, p.n_heads * p.head_dim);
    // Query row `r`: its output row, its position, and its sequence's key offsets.
    let row_keys = |r: usize| {
        let (row, pos, first) = rows[r];
        (row, pos, &offsets[first..])
    };
    let split = rows.len() < ROWS_PER_THREAD_FOR_ROW_TASKS * be.threads();
    let chunks_of = |pos: usize| pos / p.kv_chunk + 1;
    let row_chunks = rows.iter().map(|&(_, pos, _)| chunks_of(pos)).sum();
    let units = HeadUnits::new(be, p, split, rows.len(), row_chunks);
    let n_units = units.count(p.n_heads);
    let dst = SharedOut(out.as_mut_ptr());
    // Run `(first, heads)` of `rows[r]`; units of one row write disjoint heads, rows disjoint rows.
    let run = |r: usize, (first, heads): (usize, usize), lanes: Option<&[f32]>| {
        // Capture the whole `SharedOut` (Send), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let (row, pos, keys) = row_keys(r);
        // SAFETY: each query row appears once across the sequences, and each (row, head) is in
        // one task only, so no two tasks' slices overlap.
        let o = unsafe { dst.slice(row * width + first * d, heads * d) };
        let (qrow, attended, unit) = (&q[row * width..(row + 1) * width], (&keys[..=pos], pos + 1), (first, heads));
        with_fma!(be, attention_heads(be, qrow, unit, attended, k_cache, v_cache, p, o, false, split, lanes))
    };
    if !split {
        return LANE_KEYS.with_borrow_mut(|lanes| {
            let every_row = lanes.build(be, rows, offsets, (k_cache, v_cache), p);
            let lanes = &*lanes;
            // Keys in lanes are loaded once per element for all of a unit's heads, and the
            // queries' elements are broadcast from memory, so up to four heads fit the registers.
            let units = if every_row { units.with_width(LANE_UNIT_HEADS) } else { units };
            let n_units = units.count(p.n_heads);
            #[cfg(target_arch = "x86_64")]
            if every_row {
                return with_fma!(be, attention_lane_blocks(be, q, rows, lanes, p, units, out));
            }
            be.run_tasks(rows.len(), |r| {
                let row_lanes = lanes.of(rows[r].2, p);
                (0..n_units).for_each(|u| run(r, units.heads(u), row_lanes))
            })
        });
    }
    if !units.by_chunks {
        return be.run_tasks(rows.len() * n_units, |t| run(t / n_units, units.heads(t % n_units), None));
    }
    // Few rows: a task per (row, unit, chunk of keys) — flash-decoding — so a KV group's keys are
    // read once by a three-wide unit and still every thread has work. Each chunk's partial goes
    // to the scratch, and the task that finishes a (row, unit)'s last chunk folds its partials in
    // chunk order with the contract's merge: the same operations in the same order as one pass
    // over the row, so neither the split nor which thread runs or folds changes a bit. Tasks are
    // numbered row by row, unit by unit, chunk by chunk, and a task's partials sit at its number.
    let tasks = n_units * row_chunks;
    let part_width = units.width * (2 + d);
    SPLIT_SCRATCH.with_borrow_mut(|scratch| {
        if scratch.partials.len() < tasks * part_width {
            scratch.partials.resize(tasks * part_width, 0.0);
        }
        if scratch.done.len() < tasks {
            scratch.done.resize_with(tasks, AtomicUsize::default);
        }
        // Reset here (not by the folder) so a task that panicked leaves no stale count behind.
        scratch.done[..tasks].iter().for_each(|c| c.store(0, Relaxed));
        let parts = SharedOut(scratch.partials.as_mut_ptr());
        let done = &scratch.done[..tasks];
        be.run_tasks(tasks, |t| {
            #[allow(clippy::redundant_locals)]
            let (parts, dst) = (parts, dst);
            let (mut r, mut row_first) = (0, 0);
            while t >= row_first + n_units * chunks_of(rows[r].1) {
                row_first += n_units * chunks_of(rows[r].1);
                r += 1;
            }
            let (row, pos, keys) = row_keys(r);
            let chunks = chunks_of(pos);
            let (u, c) = ((t - row_first) / chunks, (t - row_first) % chunks);
            let (first, heads) = units.heads(u);
            if chunks == 1 {
                return run(r, (first, heads), None);
            }
            // This chunk's keys, then the row's later ones (prefetched only).
            let from_chunk = &keys[c * p.kv_chunk..=pos];
            let attended = (from_chunk, p.kv_chunk.min(from_chunk.len()));
            let qrow = &q[row * width..(row + 1) * width];
            // SAFETY: task `t` alone writes partial slot `t`, which lies inside the scratch.
            let part = unsafe { parts.slice(t * part_width, heads * (2 + d)) };
            let unit = (first, heads);
            with_fma!(be, attention_heads(be, qrow, unit, attended, k_cache, v_cache, p, part, true, true, None));
            let unit_first = t - c;
            // AcqRel: the last chunk's task sees every other chunk's partial.
            if done[unit_first].fetch_add(1, AcqRel) + 1 < chunks {
                return;
            }
            // SAFETY: every chunk task of this (row, unit) has finished (counted above) and none
            // reads its slot again; the output heads belong to this unit only.
            let unit_parts = unsafe { parts.slice(unit_first * part_width, chunks * part_width) };
            for h in 0..heads {
                // SAFETY: head `first + h` of `row` belongs to this unit's tasks, and only the
                // last of them (this one) writes it.
                let o = unsafe { dst.slice(row * width + (first + h) * d, d) };
                with_fma!(be, fold_chunk_partials(&mut unit_parts[h * (2 + d)..], part_width, chunks, o));
            }
        });
    });
}

/// One logits row's report, its vocab segments spread over the backend's team.
pub(crate) fn shard_sample(be: &CpuBackend, logits: &[f32], shard: &VocabShard, req: &SampleRequest) -> ShardSample {
    let run = |tasks: usize, task: &(dyn Fn(usize) + Sync)| be.run_tasks(tasks, task);
    #[cfg(target_arch = "x86_64")]
    if be.isa() == Isa::Avx512 {
        // SAFETY: the AVX-512 path is only selected when the CPU has it.
        let lanes = |xs: &[f32], max: f32| unsafe { super::x86::segment_exp_lanes_avx512(xs, max) };
        return with_fma!(be, shard_sample_on(logits, shard, req, lanes, &run));
    }
    with_fma!(be, shard_sample_on(logits, shard, req, segment_exp_lanes, &run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;
    use crate::{reference, CpuConfig, KernelMode, NumericsConfig};

    /// Guards the lane-wise combine: for every segment count (2^k and 3·2^k up to 64) and lengths
    /// around the lane width (a short last chunk), each element has the reference's element-by-
    /// element tree bits, with signed zeros, subnormals, infinities and large cancelling values
    /// among the partials (NaN only as NaN: its payload is not a promise of the contract).
    #[test]
    fn tree_combine_in_lanes_equals_the_element_by_element_reference() {
        let mut rng = SplitMix64::new(11);
        for t in (1..=64).filter(|&t| crate::is_segment_count(t)) {
            for n in [0, 1, 7, 15, 16, 17, 31, 33, 100] {
                let parts: Vec<Vec<f32>> = (0..t)
                    .map(|r| {
                        (0..n)
                            .map(|j| match (r * 31 + j * 7) % 23 {
                                0 => -0.0,
                                1 => f32::from_bits(1 + j as u32),
                                2 if j % 5 == 0 => f32::INFINITY,
                                3 if j % 11 == 0 => f32::NAN,
                                4 => 1e30 * if r % 2 == 0 { 1.0 } else { -1.0 },
                                _ => (rng.unit_f64() as f32 - 0.5) * 10f32.powi((j % 9) as i32 - 4),
                            })
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                let want = if n == 0 { Vec::new() } else { reference::tree_combine(&refs) };
                let mut got = vec![f32::NAN; n];
                tree_combine(&refs, &mut got);
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "t {t} n {n} element {j}: {g} {w}"
                    );
                }
            }
        }
    }

    /// RMSNorm's sum of squares on AVX-512 gives the scalar lanes' bits for every range of a row
    /// (segments start and end anywhere in a 16-lane block), with signed zeros, subnormals,
    /// infinities and NaN among the values.
    #[test]
    fn avx512_square_lanes_equal_the_scalar_lanes_for_every_range() {
        if !Isa::Avx512.is_available() {
            eprintln!("SKIPPED avx512_square_lanes_equal_the_scalar_lanes_for_every_range: no AVX-512 on this CPU");
            return;
        }
        let mut rng = SplitMix64::new(5);
        let mut x: Vec<f32> = (0..70).map(|_| (rng.unit_f64() as f32 - 0.5) * 1e3).collect();
        (x[3], x[17], x[31], x[40], x[41]) = (-0.0, f32::from_bits(1), f32::INFINITY, f32::NAN, 1e-30);
        let bits = |lanes: [f32; LANES]| lanes.map(f32::to_bits);
        for lo in 0..=x.len() {
            for hi in lo..=x.len() {
                // SAFETY: AVX-512 is present (checked above); lo..hi lies inside x.
                let got = bits(unsafe { super::super::x86::square_lanes_avx512(&x, lo, hi) });
                assert_eq!(got, bits(square_lanes(&x, lo, hi)), "x[{lo}..{hi}]");
            }
        }
    }

    /// A logits row's vocab segments run as tasks on the team (batch-1 decode) and combine to the
    /// one-thread sampler's report, bit for bit, at 1 to 4 threads: greedy, Gumbel-max (whose
    /// cutoff skips most tokens), top-k and top-p; rows with ties straddling segments, NaN, ±0
    /// and a segment of −inf only; whole vocabularies and TP shards. The best candidate also
    /// equals a plain scan of every token in id order, which never splits the row.
    #[test]
    fn a_row_sampled_on_the_team_equals_the_serial_sampler_at_1_to_4_threads() {
        use crate::sampling::{gumbel, ranks_before, shard_sample as serial, Candidate};
        use crate::SamplingParams;
        let mut rng = SplitMix64::new(12);
        let vocab = 1000;
        let mut logits: Vec<f32> = (0..vocab).map(|_| (rng.unit_f64() as f32 - 0.5) * 12.0).collect();
        // Ties at the top in three segments (ids 80, 170, 950), NaN, signed zeros, and segment 5
        // (ids 420..504 of 12 segments of 84) all −inf.
        for id in [950, 170, 80] {
            logits[id] = 9.5;
        }
        logits[3] = f32::NAN;
        logits[600] = f32::NAN;
        logits[7] = -0.0;
        logits[8] = 0.0;
        logits[420..504].fill(f32::NEG_INFINITY);
        let params = [
            SamplingParams::greedy(),
            SamplingParams { temperature: 0.8, seed: 42, ..Default::default() },
            SamplingParams { temperature: 40.0, seed: 3, ..Default::default() },
            SamplingParams { temperature: 1.3, top_k: 7, top_p: 1.0, seed: 5 },
            SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.8, seed: 9 },
        ];
        let seg = Segmentation::new(vocab, 12).unwrap();
        let shards: Vec<VocabShard> =
            [(0, 1), (0, 3), (2, 3), (5, 6)].iter().map(|&(r, t)| VocabShard::new(seg.shard(r, t).unwrap())).collect();
        for threads in 1..=4 {
            let be = CpuBackend::new(CpuConfig { threads, ..CpuConfig::default() }).unwrap();
            for shard in &shards {
                let row = &logits[shard.offset..shard.offset + shard.rows];
                for (step, params) in params.iter().enumerate() {
                    let req = SampleRequest { params: *params, step: step as u64 };
                    let got = be.sample_shard_slice(row, *shard, &[req]).remove(0);
                    let want = serial(row, shard, &req);
                    let at = format!("{threads} threads, shard at {}, {params:?}", shard.offset);
                    assert_eq!(format!("{got:?}"), format!("{want:?}"), "{at}");
                    if params.top_k > 0 || params.top_p < 1.0 {
                        continue;
                    }
                    let t = params.temperature;
                    let plain = (0..row.len())
                        .map(|i| {
                            let (id, logit) = ((shard.offset + i) as u32, row[i]);
                            let score = if t > 0.0 { logit / t + gumbel(params.seed, req.step, id) } else { logit };
                            Candidate { id, logit, z: if t > 0.0 { logit / t } else { logit }, score }
                        })
                        .reduce(|a, b| if ranks_before(b.score, b.id, a.score, a.id) { b } else { a });
                    assert_eq!(format!("{:?}", got.best), format!("{plain:?}"), "{at}");
                }
            }
        }
    }

    /// The key index is kept between calls with the same sequences (a step's layers) and rebuilt
    /// when any of what it is built from differs: a block id, a first position, a query count or
    /// row, the block size or the slot stride.
    #[test]
    fn the_key_index_is_rebuilt_when_what_it_is_built_from_changes() {
        let fresh = |seqs: &[AttnSeq<'_>], layout: &KvLayout| {
            let mut index = KeyIndex::default();
            index.build(seqs, layout);
            (index.offsets, index.rows)
        };
        let layout = KvLayout { num_blocks: 8, block_size: 4, n_kv_heads: 2, head_dim: 8 };
        let (t1, t2, t3) = ([3u32, 1, 6], [3u32, 2, 6], [3u32, 1, 6, 5]);
        let seq = |table: &'static [u32], q_row, n_q, first_pos| AttnSeq { block_table: table, q_row, n_q, first_pos };
        let t1: &'static [u32] = Box::leak(Box::new(t1));
        let t2: &'static [u32] = Box::leak(Box::new(t2));
        let t3: &'static [u32] = Box::leak(Box::new(t3));
        let wide = KvLayout { n_kv_heads: 3, ..layout };
        let other_blocks = KvLayout { block_size: 2, num_blocks: 16, ..layout };
        let calls: Vec<(Vec<AttnSeq<'_>>, KvLayout)> = vec![
            (vec![seq(t1, 0, 1, 9)], layout),
            (vec![seq(t1, 0, 1, 9)], layout),
            (vec![seq(t2, 0, 1, 9)], layout),
            (vec![seq(t2, 0, 1, 10)], layout),
            (vec![seq(t3, 0, 1, 12)], layout),
            (vec![seq(t3, 1, 1, 12)], layout),
            (vec![seq(t3, 1, 2, 11)], layout),
            (vec![seq(t3, 0, 1, 9), seq(t1, 1, 1, 5)], layout),
            (vec![seq(t3, 0, 1, 9), seq(t2, 1, 1, 5)], layout),
            (vec![seq(t3, 0, 1, 9), seq(t2, 1, 1, 5)], wide),
            (vec![seq(t3, 0, 1, 5)], other_blocks),
            (vec![seq(t1, 0, 1, 9)], layout),
        ];
        let mut kept = KeyIndex::default();
        for (seqs, layout) in &calls {
            kept.build(seqs, layout);
            let want = fresh(seqs, layout);
            assert_eq!((&kept.offsets, &kept.rows), (&want.0, &want.1), "{:?}", kept.built_from);
        }
    }

    /// Block tables for sequences of `(first position, queries)`: consecutive blocks of the cache
    /// in reverse order, so that slot order differs from position order.
    fn reversed_block_tables(shape: &[(usize, usize)], block_size: usize) -> Vec<Vec<u32>> {
        let mut next_block = 0u32;
        shape
            .iter()
            .map(|&(first, n)| {
                let blocks = (first + n).div_ceil(block_size) as u32;
                let table = (next_block..next_block + blocks).rev().collect();
                next_block += blocks;
                table
            })
            .collect()
    }

    /// The sequences of `shape` over `tables`, their query rows one after another, and the rows.
    fn attn_seqs<'a>(shape: &[(usize, usize)], tables: &'a [Vec<u32>]) -> (Vec<AttnSeq<'a>>, usize) {
        let mut q_row = 0;
        let seqs = shape
            .iter()
            .zip(tables)
            .map(|(&(first_pos, n_q), table)| {
                let s = AttnSeq { block_table: table, q_row, n_q, first_pos };
                q_row += n_q;
                s
            })
            .collect();
        (seqs, q_row)
    }

    /// Every sequence with enough rows for keys in lanes runs in blocks of rows chunk by chunk
    /// (`attention_lane_blocks`); its bits equal the reference's at 1 and 2 threads, for 1–4
    /// heads per unit, head_dim 64 and below (a masked last block), rows of one block that attend
    /// different counts of keys in the same and in different counts of chunks, prefills from
    /// position 0 and after cached keys, and lengths that end mid-chunk and mid-block.
    #[test]
    fn blocks_of_rows_in_lanes_equal_reference() {
        let mut rng = SplitMix64::new(5);
        for (n_heads, n_kv_heads, head_dim) in [(14, 2, 64), (9, 3, 64), (3, 3, 64), (8, 2, 40), (6, 3, 24), (6, 2, 8)]
        {
            let block_size = 16;
            // (first position, queries), every sequence with at least LANE_KEYS_MIN_ROWS rows.
            let shape = [(0usize, 150usize), (40, 37), (129, LANE_KEYS_MIN_ROWS)];
            let layout = KvLayout { num_blocks: 32, block_size, n_kv_heads, head_dim };
            let tables = reversed_block_tables(&shape, block_size);
            let (seqs, q_row) = attn_seqs(&shape, &tables);
            let mut vals = |n: usize| (0..n).map(|_| rng.unit_f64() as f32 * 4.0 - 2.0).collect::<Vec<f32>>();
            let q = vals(q_row * n_heads * head_dim);
            let (k_cache, v_cache) = (vals(layout.floats()), vals(layout.floats()));
            for kv_chunk in [7, 20, 64, 100] {
                let p = AttnParams { n_heads, n_kv_heads, head_dim, block_size, kv_chunk };
                let want: Vec<u32> = reference::attention(&q, &seqs, &k_cache, &v_cache, &layout, p)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                for (isa, threads) in Isa::available().into_iter().flat_map(|isa| [(isa, 1), (isa, 2)]) {
                    let numerics = NumericsConfig::default();
                    let config = CpuConfig { threads, isa: Some(isa), mode: KernelMode::Invariant, numerics };
                    let be = CpuBackend::new(config).unwrap();
                    let mut out = vec![0.0; q.len()];
                    attention(&be, &q, &seqs, &k_cache, &v_cache, &layout, p, &mut out);
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    let what = format!("{isa:?} {threads}t heads={n_heads}/{n_kv_heads} d={head_dim} chunk={kv_chunk}");
                    assert_eq!(got, want, "{what}");
                }
            }
        }
    }

    /// Query heads run two at a time where two read the same KV head and head_dim ≤ 64, one at a
    /// time otherwise: Qwen2.5-0.5B's groups of 7 (three pairs, then one head alone), a pair
    /// straddling two groups (never paired), head_dim 128 (never paired) and several kv chunks
    /// must all give the reference's bits; the key offsets are computed once per sequence.
    #[test]
    fn paired_and_single_attention_heads_equal_reference() {
        let mut rng = SplitMix64::new(3);
        for (n_heads, n_kv_heads, head_dim) in [(14, 2, 64), (3, 3, 64), (4, 2, 128), (6, 2, 24)] {
            let block_size = 16;
            // (first position, queries): a prefill chunk after cached keys, and a decode row.
            let shape = [(40usize, 90usize), (130, 1)];
            let layout = KvLayout { num_blocks: 24, block_size, n_kv_heads, head_dim };
            let tables = reversed_block_tables(&shape, block_size);
            let (seqs, q_row) = attn_seqs(&shape, &tables);
            let mut vals = |n: usize| (0..n).map(|_| rng.unit_f64() as f32 * 4.0 - 2.0).collect::<Vec<f32>>();
            let q = vals(q_row * n_heads * head_dim);
            let (k_cache, v_cache) = (vals(layout.floats()), vals(layout.floats()));
            for kv_chunk in [7, 64] {
                let p = AttnParams { n_heads, n_kv_heads, head_dim, block_size, kv_chunk };
                let want: Vec<u32> = reference::attention(&q, &seqs, &k_cache, &v_cache, &layout, p)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                for isa in Isa::available() {
                    let config = CpuConfig {
                        threads: 2,
                        isa: Some(isa),
                        mode: KernelMode::Invariant,
                        numerics: NumericsConfig::default(),
                    };
                    let be = CpuBackend::new(config).unwrap();
                    let mut out = vec![0.0; q.len()];
                    attention(&be, &q, &seqs, &k_cache, &v_cache, &layout, p, &mut out);
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{isa:?} heads={n_heads}/{n_kv_heads} d={head_dim} chunk={kv_chunk}");
                }
            }
        }
    }
}
