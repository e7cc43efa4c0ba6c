//! CPU native numerics for block-quantized weights (Q8_0, Q4_0, Q4_1): integer block dot products
//! on AVX512-VNNI (`VPDPBUSD`), batch-, thread- and TP-invariant. Both CPU native classes
//! (`native-amx`, `native-avx512bf16`) run this rule for block weights; the fingerprint names its
//! revision ([`QDOT_RULE`]).
//!
//! # Why
//!
//! The contract widens every 4-bit weight to f32 and spends one f32 FMA per weight: on a small
//! core count that is compute-bound, far from the memory bandwidth a quantized decode step could
//! stream at. Multiplying int8-quantized activations by the weights' integers does 4 products per
//! 32-bit lane per instruction, exactly.
//!
//! # The rule (docs/DESIGN.md §2.2, "CPU native, block weights")
//!
//! * **Activations**, per row and per 32-column block (blocks start at column 0 of the row, as the
//!   weights' do), row-locally — a row's bits never depend on M or on other rows:
//!   `amax = max |x_j|` (compared as the integers `bits & 0x7fffffff`);
//!   a block with a NaN or an infinity has `dx = NaN` and `q = 0`; a block with `amax < 2⁻⁶⁴`
//!   (zero included) has `dx = 0` and `q = 0`; otherwise `dx = amax / 127`,
//!   `inv = 127 / amax` (f32 divisions, round to nearest even) and
//!   `q_j = clamp(roundTiesEven(f32(x_j · inv)), −127, 127)`. `Σq` is the block's exact i32 sum.
//! * **Per (row, output, block)** the exact integer `isum = Σ_j q_j · w_j` with `w_j` the weight's
//!   integer: Q8_0 `q`, Q4_0 `n − 8`, Q4_1 `n` (`n` the nibble). 32 products of 8-bit values fit
//!   an i32 with room to spare, so every route to this integer gives the same value.
//! * **Per output**, within each of the contract's segments, ONE f32 accumulator from +0 over the
//!   segment's blocks in increasing order: `acc = fma(f32(dx · d), f32(isum), acc)` and, for Q4_1,
//!   then `acc = fma(f32(dx · m), f32(Σq), acc)` (`d`, `m` the block's f16 scale and minimum,
//!   widened exactly; the products rounded to f32). A block belongs to the segment that holds its
//!   first column (segments need not fall on multiples of 32; a segment may hold no block and
//!   then sums to +0). The segment sums meet in the contract's segment tree, so a row-parallel
//!   rank, which holds whole segments cut on whole blocks ([`crate::HostWeight::columns`]), computes
//!   a subtree and `tree_combine` finishes the unsplit bits.
//! * **Denormals** cannot occur: a nonzero `dx` is at least 2⁻⁷¹ and an f16 scale at least 2⁻²⁴,
//!   so every product and sum is zero or a multiple of 2⁻¹¹⁸ — normal. DAZ/FTZ would change no bit;
//!   the kernels leave MXCSR as it is.
//!
//! # One rule, two executors
//!
//! [`QdotExec::Model`] is the rule written out in scalar Rust over the weights as stored: it is
//! the definition and runs on any CPU. [`QdotExec::Hardware`] runs `VPDPBUSD` over a packed copy
//! of the weights and must give the model's bits (tests: `kernels/tests/native_quant.rs`). On a
//! CPU without AVX512-VNNI (none of the CPUs that have either native class is known to lack it)
//! native mode runs the model: the same bits, slowly.
//!
//! # Layout
//!
//! `VPDPBUSD` multiplies the 4 unsigned bytes of each 32-bit lane of one operand by the 4 signed
//! bytes of the same lane of the other and adds them to the lane. The 16 lanes are 16 *outputs*
//! (weight rows, a panel); the x bytes are broadcast. Per panel and block the packing holds, for
//! lane `r` (row `r` of the panel):
//! * Q4_0 / Q4_1: 4 vectors, dword `v` of lane `r` = the block's nibble bytes `4v..4v+4` as stored
//!   (low nibbles: columns `4v..4v+4`, high nibbles: columns `16+4v..`), the unsigned operand
//!   after a mask or a shift; `isum = Σ q·n − 8·Σq` for Q4_0.
//! * Q8_0: 8 vectors of the block's bytes `4v..4v+4`, each XOR 0x80 (`q + 128` as u8);
//!   `isum = Σ q_x·(q_w + 128) − 128·Σq`.
//! * then the 16 rows' f16 `d` (and for Q4_1 the 16 `m`): 32 bytes each.
//!
//! so the packed copy is exactly as large as the file's blocks. Panels come in groups of four
//! (the last may be short), interleaved block by block: block `b` of the group's panel `j` lies at
//! `(b · width + j)` packed blocks into the group. A decode task reads one group (4 panels, or
//! 2 or 1 of one on small weights), so its tiles read ONE ascending stream of memory, which the
//! hardware prefetchers follow; panel after panel, a 1 × 4 tile read four short streams 5.8 KB
//! apart (SmolLM2, K = 576) and needed a software prefetch 48 KB ahead to reach 17–22 GB/s on one
//! thread, where the interleaved stream without any software prefetch reaches 23–28 (BENCHMARKS
//! §17.1; a software prefetch of any distance over it lost 5–20 %).

use std::ops::Range;

use rayon::prelude::*;

use super::{CpuBackend, SharedOut};
use crate::quant::{nibble, QUANT_BLOCK};
use crate::{DType, SegmentRange, WeightView};

/// The rule's revision, part of a native deployment's fingerprint: a node without it (or with
/// another revision) computes other bits for block weights and must not join.
pub const QDOT_RULE: &str = "qdot-1";

/// Outputs per panel: one zmm of i32 / f32.
pub const PANEL_ROWS: usize = 16;

/// Below this `amax` (2⁻⁶⁴) a block quantizes to zero: it keeps `127 / amax` finite.
const TINY_AMAX_BITS: u32 = 0x1f80_0000;

/// Whether the weight type runs this rule in native mode.
pub fn takes(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
}

/// Whether this CPU can run `VPDPBUSD` on zmm registers (with the AVX-512 F/BW the tiles use).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Who executes the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QdotExec {
    /// `VPDPBUSD` over packed panels; needs [`vnni_available`].
    Hardware,
    /// The scalar definition over the weights as stored: slow, runs anywhere.
    Model,
}

impl QdotExec {
    /// The hardware where the CPU has it, else the model.
    pub fn best() -> QdotExec {
        if vnni_available() {
            QdotExec::Hardware
        } else {
            QdotExec::Model
        }
    }
}

// ---------------------------------------------------------------- activations

/// Activation rows quantized per block: `q` `[m, blocks·32]`, `dx` and `sum` `[m, blocks]`.
pub struct QuantRows {
    q: Vec<i8>,
    dx: Vec<f32>,
    sum: Vec<i32>,
    blocks: usize,
}

/// One block of 32 activations: its `q` (written), `dx` and `Σq` (see the module comment).
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    debug_assert!(x.len() == QUANT_BLOCK && q.len() == QUANT_BLOCK);
    let amax_bits = x.iter().map(|v| v.to_bits() & 0x7fff_ffff).max().unwrap_or(0);
    if !(TINY_AMAX_BITS..0x7f80_0000).contains(&amax_bits) {
        q.fill(0);
        return (if amax_bits >= 0x7f80_0000 { f32::NAN } else { 0.0 }, 0);
    }
    let amax = f32::from_bits(amax_bits);
    let (dx, inv) = (amax / 127.0, 127.0 / amax);
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = ((v * inv).round_ties_even() as i32).clamp(-127, 127);
        *o = r as i8;
        sum += r;
    }
    (dx, sum)
}

/// [`quantize_block`] with AVX-512: the same formula (`VCVTPS2DQ` rounds to nearest even under
/// the default MXCSR, which Rust code runs with, and `|x · inv| ≤ 127.00002` never saturates), so
/// the same bits (`the_vector_quantizer_gives_the_models_bits`). `roundTiesEven` alone, scalar,
/// is a libm call on the x86-64 baseline: 5 % of a SmolLM2 decode step.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() == QUANT_BLOCK && q.len() == QUANT_BLOCK);
    let (a, b) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let amax_bits = _mm512_reduce_max_epu32(_mm512_max_epu32(
        _mm512_and_si512(_mm512_castps_si512(a), abs),
        _mm512_and_si512(_mm512_castps_si512(b), abs),
    )) as u32;
    if !(TINY_AMAX_BITS..0x7f80_0000).contains(&amax_bits) {
        q.fill(0);
        return (if amax_bits >= 0x7f80_0000 { f32::NAN } else { 0.0 }, 0);
    }
    let amax = f32::from_bits(amax_bits);
    let (dx, inv) = (amax / 127.0, 127.0 / amax);
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    let round = |v: __m512| {
        _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv))), lo), hi)
    };
    let (qa, qb) = (round(a), round(b));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
    (dx, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
}

/// One block by the fastest route this CPU has (every route gives [`quantize_block`]'s bits).
#[inline]
fn quantize_block_fast(x: &[f32], q: &mut [i8], avx512: bool) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller found AVX-512 F on this CPU.
        return unsafe { quantize_block_avx512(x, q) };
    }
    let _ = avx512;
    quantize_block(x, q)
}

/// The buffers of a [`QuantRows`]: `q`, `dx`, `sum`.
type RowBuffers = (Vec<i8>, Vec<f32>, Vec<i32>);

thread_local! {
    /// Buffers of dropped [`QuantRows`], for the next ones made on this thread: a decode step
    /// quantizes x four times per layer, and allocating (and zeroing) three vectors each time cost
    /// SmolLM2's batch-1 step ~3 % of its time on the step's thread, with the team waiting.
    static SPARE_ROWS: std::cell::RefCell<Vec<RowBuffers>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers kept per thread: more than a step holds at once.
const SPARE_ROWS_KEPT: usize = 4;

impl Drop for QuantRows {
    fn drop(&mut self) {
        let buffers = (std::mem::take(&mut self.q), std::mem::take(&mut self.dx), std::mem::take(&mut self.sum));
        // A thread being torn down has no spares to keep.
        let _ = SPARE_ROWS.try_with(|spare| {
            if let Ok(mut spare) = spare.try_borrow_mut() {
                if spare.len() < SPARE_ROWS_KEPT {
                    spare.push(buffers);
                }
            }
        });
    }
}

impl QuantRows {
    /// `m` rows of `k` (a multiple of 32) activations, rows split among the team's threads when
    /// there are many.
    pub fn new(be: &CpuBackend, x: &[f32], m: usize, k: usize) -> QuantRows {
        let blocks = k / QUANT_BLOCK;
        let (q, dx, sum) = SPARE_ROWS.with_borrow_mut(Vec::pop).unwrap_or_default();
        let mut out = QuantRows { q, dx, sum, blocks };
        // Every element is written below; the zeros only make the lengths.
        out.q.clear();
        out.q.resize(m * k, 0);
        out.dx.clear();
        out.dx.resize(m * blocks, 0.0);
        out.sum.clear();
        out.sum.resize(m * blocks, 0);
        if blocks == 0 {
            return out;
        }
        #[cfg(target_arch = "x86_64")]
        let avx512 = is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let avx512 = false;
        type RowParts<'a> = (((&'a mut [i8], &'a mut [f32]), &'a mut [i32]), &'a [f32]);
        let row = |(((q, dx), sum), xr): RowParts<'_>| {
            for (b, (xb, qb)) in xr.chunks_exact(QUANT_BLOCK).zip(q.chunks_exact_mut(QUANT_BLOCK)).enumerate() {
                (dx[b], sum[b]) = quantize_block_fast(xb, qb, avx512);
            }
        };
        let (q, dx, sum) = (&mut out.q, &mut out.dx, &mut out.sum);
        if m >= 16 && be.threads() > 1 {
            let (dx, sum) = (SharedOut(dx.as_mut_ptr()), SharedOut(sum.as_mut_ptr()));
            // SAFETY: row `r`'s scales and sums belong to the task of row `r` only.
            let parts = |r: usize| unsafe { (dx.slice(r * blocks, blocks), sum.slice(r * blocks, blocks)) };
            be.run_chunks(q, k, |r, q| {
                let (dx, sum) = parts(r);
                row((((q, dx), sum), &x[r * k..(r + 1) * k]))
            });
        } else {
            q.chunks_exact_mut(k)
                .zip(dx.chunks_exact_mut(blocks))
                .zip(sum.chunks_exact_mut(blocks))
                .zip(x.chunks_exact(k))
                .for_each(row);
        }
        out
    }
}

/// `x` prepared once for every block-weight linear of a group that reads it (the same `x`, `m`
/// and segment range): its rows quantized and each segment's blocks.
pub(crate) struct PreparedX {
    rows: QuantRows,
    segs: Vec<Range<usize>>,
    m: usize,
}

impl PreparedX {
    pub(crate) fn new(be: &CpuBackend, x: &[f32], m: usize, k: usize, segs: SegmentRange) -> PreparedX {
        let rows = QuantRows::new(be, x, m, k);
        let segs = segment_blocks(segs, rows.blocks);
        PreparedX { rows, segs, m }
    }
}

/// Each segment's blocks (relative to the range's first column): block `b` belongs to the
/// segment holding its first column `32b`.
fn segment_blocks(segs: SegmentRange, blocks: usize) -> Vec<Range<usize>> {
    let seg_len = segs.seg.seg_len;
    let first_block = |s: usize| (s * seg_len).div_ceil(QUANT_BLOCK).min(blocks);
    (0..segs.count).map(|s| first_block(s)..first_block(s + 1)).collect()
}

// ---------------------------------------------------------------- the model

/// The weight integers, scale and minimum of block `b` of a stored row.
fn weight_block(dtype: DType, row: &[u8], b: usize) -> ([i32; QUANT_BLOCK], f32, f32) {
    let blk = crate::quant::block(row, b * QUANT_BLOCK, dtype.block_bytes());
    let f16 = |at: usize| half::f16::from_bits(u16::from_le_bytes([blk[at], blk[at + 1]])).to_f32();
    let mut w = [0i32; QUANT_BLOCK];
    match dtype {
        DType::Q8_0 => w.iter_mut().enumerate().for_each(|(j, v)| *v = blk[2 + j] as i8 as i32),
        DType::Q4_0 => w.iter_mut().enumerate().for_each(|(j, v)| *v = nibble(&blk[2..], j) as i32 - 8),
        DType::Q4_1 => w.iter_mut().enumerate().for_each(|(j, v)| *v = nibble(&blk[4..], j) as i32),
        other => unreachable!("{other:?} is not a block type"),
    }
    let m = if dtype == DType::Q4_1 { f16(2) } else { 0.0 };
    (w, f16(0), m)
}

/// The model's outputs: rows `rows` × outputs `outs`, straight from the rule.
fn model_block(job: &Job<'_>, w: WeightView<'_>, rows: Range<usize>, outs: Range<usize>) {
    let xq = &job.x.rows;
    let mut sums = vec![0f32; job.x.segs.len()];
    for o in outs {
        let row = w.row(o);
        for i in rows.clone() {
            for (sum, blocks) in sums.iter_mut().zip(&job.x.segs) {
                let mut acc = 0.0f32;
                for b in blocks.clone() {
                    let (wi, d, m) = weight_block(w.dtype, row, b);
                    let xb = &xq.q[(i * xq.blocks + b) * QUANT_BLOCK..][..QUANT_BLOCK];
                    let isum: i32 = xb.iter().zip(&wi).map(|(&q, &v)| q as i32 * v).sum();
                    let (dx, qsum) = (xq.dx[i * xq.blocks + b], xq.sum[i * xq.blocks + b]);
                    acc = (dx * d).mul_add(isum as f32, acc);
                    if w.dtype == DType::Q4_1 {
                        acc = (dx * m).mul_add(qsum as f32, acc);
                    }
                }
                *sum = acc;
            }
            // SAFETY: blocks of the output are disjoint between tasks (see `Job`).
            unsafe { *job.out.0.add(i * job.n + o) = super::linear::segment_tree_inplace(&mut sums) };
        }
    }
}

// ---------------------------------------------------------------- packing

/// A block weight packed for `VPDPBUSD` (see the module comment): `ceil(rows / 16)` panels of
/// `blocks` packed blocks each; rows past the weight are zero.
pub struct QPanels {
    words: super::pack_arena::PackedWords,
    dtype: DType,
    rows: usize,
    cols: usize,
    blocks: usize,
}

/// Panels per group, interleaved block by block (see the module comment): a task's panels (as
/// many, or 2 or 1 on small weights, always inside one group) are one sequential stream.
const GROUP_PANELS: usize = 4;

/// Where panel `nb` of a packing of `panels` panels of `panel_bytes` each finds its group: the
/// group's first byte, its width (panels; the last group may be short) and the panel's place in
/// it. Block `b` of the panel lies at `start + (b · width + place) ·` [`packed_block_bytes`].
fn group_of(panels: usize, panel_bytes: usize, nb: usize) -> (usize, usize, usize) {
    let first = nb / GROUP_PANELS * GROUP_PANELS;
    (first * panel_bytes, GROUP_PANELS.min(panels - first), nb - first)
}

/// Bytes of the quant vectors of one packed block (16 rows).
fn quant_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q8_0 => 8 * 64,
        _ => 4 * 64,
    }
}

/// Bytes of one packed block: quant vectors, then 16 f16 `d`, then (Q4_1) 16 f16 `m`.
fn packed_block_bytes(dtype: DType) -> usize {
    quant_bytes(dtype) + if dtype == DType::Q4_1 { 64 } else { 32 }
}

impl QPanels {
    /// Packs `w` on the backend's threads.
    pub(crate) fn pack(be: &CpuBackend, w: WeightView<'_>, purpose: super::PackFor) -> QPanels {
        let (dtype, blocks) = (w.dtype, w.cols / QUANT_BLOCK);
        let pbb = packed_block_bytes(dtype);
        let panel_words = blocks * pbb / 4;
        let panels = w.rows.div_ceil(PANEL_ROWS);
        let mut words = be.packed_words(panels * panel_words, purpose);
        // Where the quants start in a stored block (after `d`, and for Q4_1 `m`).
        let qoff = if dtype == DType::Q4_1 { 4 } else { 2 };
        let pack_group = |(g, group): (usize, &mut [u32])| {
            // SAFETY: the u32 group viewed as its bytes (any bit pattern is valid in both).
            let group = unsafe { std::slice::from_raw_parts_mut(group.as_mut_ptr() as *mut u8, group.len() * 4) };
            let (_, width, _) = group_of(panels, blocks * pbb, g * GROUP_PANELS);
            for (j, nb) in (g * GROUP_PANELS..g * GROUP_PANELS + width).enumerate() {
                for r in 0..PANEL_ROWS.min(w.rows - nb * PANEL_ROWS) {
                    let row = w.row(nb * PANEL_ROWS + r);
                    for b in 0..blocks {
                        let blk = crate::quant::block(row, b * QUANT_BLOCK, dtype.block_bytes());
                        let at = (b * width + j) * pbb;
                        let dst = &mut group[at..at + pbb];
                        let quants = &blk[qoff..];
                        for (v, four) in quants.chunks_exact(4).enumerate() {
                            for (t, &byte) in four.iter().enumerate() {
                                dst[v * 64 + r * 4 + t] = if dtype == DType::Q8_0 { byte ^ 0x80 } else { byte };
                            }
                        }
                        let qb = quant_bytes(dtype);
                        dst[qb + 2 * r..qb + 2 * r + 2].copy_from_slice(&blk[0..2]);
                        if dtype == DType::Q4_1 {
                            dst[qb + 32 + 2 * r..qb + 32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                        }
                    }
                }
            }
        };
        if panel_words > 0 {
            be.pool().install(|| words.par_chunks_mut(GROUP_PANELS * panel_words).enumerate().for_each(pack_group));
        }
        QPanels { words, dtype, rows: w.rows, cols: w.cols, blocks }
    }
    fn panel_bytes(&self) -> usize {
        self.blocks * packed_block_bytes(self.dtype)
    }
    /// [`group_of`] for this packing's panel `nb`.
    fn group_of(&self, nb: usize) -> (usize, usize, usize) {
        group_of(self.rows.div_ceil(PANEL_ROWS), self.panel_bytes(), nb)
    }
    /// Whether this packing is of a weight of `w`'s type and shape.
    pub(crate) fn fits(&self, w: WeightView<'_>) -> bool {
        (self.dtype, self.rows, self.cols) == (w.dtype, w.rows, w.cols)
    }
}

// ---------------------------------------------------------------- the hardware tile

#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::x86_64::*;

    use super::{packed_block_bytes, quant_bytes, Job};
    use crate::DType;

    /// Weight kinds as const parameters of the tile.
    pub(super) const Q8_0: u8 = 0;
    pub(super) const Q4_0: u8 = 1;
    pub(super) const Q4_1: u8 = 2;

    fn dtype_of(kind: u8) -> DType {
        match kind {
            Q8_0 => DType::Q8_0,
            Q4_0 => DType::Q4_0,
            _ => DType::Q4_1,
        }
    }

    /// Tile `MR` rows (`i0..`) × `NB` panels (`nb0..`): per segment every accumulator runs the
    /// segment's blocks, then per output block the segment tree, lane-wise.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW and VNNI; rows and panels lie inside the job; no other task
    /// writes this block of the output.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const KIND: u8, const MR: usize, const NB: usize>(
        job: &Job<'_>,
        i0: usize,
        nb0: usize,
        sums: &mut [__m512],
    ) {
        let dtype = dtype_of(KIND);
        let pw = job.packed.expect("hardware runs on packed panels");
        let (bb, qb) = (packed_block_bytes(dtype), quant_bytes(dtype));
        let (start, width, place) = pw.group_of(nb0);
        debug_assert!(place + NB <= width, "a tile stays inside its panels' group");
        let base = (pw.words.as_ptr() as *const u8).add(start + place * bb);
        let stride = width * bb;
        let xq = &job.x.rows;
        let count = job.x.segs.len();
        let bias = match KIND {
            Q8_0 => 128,
            Q4_0 => 8,
            _ => 0,
        };
        crate::cpu::prefetch_tile_outputs::<MR, NB>(job.out.0, job.n, i0, nb0);
        let low = _mm512_set1_epi8(0x0f);
        for (s, blocks) in job.x.segs.iter().enumerate() {
            let mut acc = [[_mm512_setzero_ps(); NB]; MR];
            for b in blocks.clone() {
                for j in 0..NB {
                    let wp = base.add(b * stride + j * bb);
                    let mut wv = [_mm512_setzero_si512(); 8];
                    if KIND == Q8_0 {
                        for (v, wvv) in wv.iter_mut().enumerate() {
                            *wvv = _mm512_loadu_si512(wp.add(64 * v) as *const _);
                        }
                    } else {
                        for v in 0..4 {
                            let raw = _mm512_loadu_si512(wp.add(64 * v) as *const _);
                            wv[v] = _mm512_and_si512(raw, low);
                            wv[v + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                        }
                    }
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(qb) as *const _));
                    let mins = if KIND == Q4_1 {
                        _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(qb + 32) as *const _))
                    } else {
                        _mm512_setzero_ps()
                    };
                    for (i, a) in acc.iter_mut().enumerate() {
                        let r = (i0 + i) * xq.blocks + b;
                        let xd = xq.q.as_ptr().add(r * 32) as *const i32;
                        let mut s0 = _mm512_setzero_si512();
                        let mut s1 = _mm512_setzero_si512();
                        for g in 0..4 {
                            s0 = _mm512_dpbusd_epi32(s0, wv[g], _mm512_set1_epi32(xd.add(g).read_unaligned()));
                            s1 = _mm512_dpbusd_epi32(s1, wv[g + 4], _mm512_set1_epi32(xd.add(g + 4).read_unaligned()));
                        }
                        let qsum = *xq.sum.get_unchecked(r);
                        let mut isum = _mm512_add_epi32(s0, s1);
                        if bias != 0 {
                            isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(bias * qsum));
                        }
                        let dx = _mm512_set1_ps(*xq.dx.get_unchecked(r));
                        a[j] = _mm512_fmadd_ps(_mm512_mul_ps(dx, d), _mm512_cvtepi32_ps(isum), a[j]);
                        if KIND == Q4_1 {
                            a[j] = _mm512_fmadd_ps(_mm512_mul_ps(dx, mins), _mm512_set1_ps(qsum as f32), a[j]);
                        }
                    }
                }
            }
            crate::cpu::keep_segment_sums(&acc, sums, count, s);
        }
        crate::cpu::store_tile_outputs::<MR, NB>(sums, count, job.out.0, job.n, i0, nb0, MR);
    }

    pub(super) type TileFn = unsafe fn(&Job<'_>, usize, usize);

    macro_rules! tiles {
        ($($mr:literal: [$($nb:literal),*]),*) => {
            /// The tile function for weight kind `kind`, `mr` rows × `nb` panels.
            pub(super) fn tile_fn(kind: u8, mr: usize, nb: usize) -> TileFn {
                fn one<const KIND: u8, const MR: usize, const NB: usize>(job: &Job<'_>, i0: usize, nb0: usize) {
                    // SAFETY: as for `tile`, which the caller of the tile function promises.
                    crate::cpu::with_tile_sums(MR * NB * job.x.segs.len(), |sums| unsafe {
                        tile::<KIND, MR, NB>(job, i0, nb0, sums)
                    })
                }
                match (kind, mr, nb) {
                    $($((Q8_0, $mr, $nb) => one::<Q8_0, $mr, $nb>,
                       (Q4_0, $mr, $nb) => one::<Q4_0, $mr, $nb>,
                       (Q4_1, $mr, $nb) => one::<Q4_1, $mr, $nb>,)*)*
                    _ => unreachable!("no {mr}×{nb} tile"),
                }
            }
        };
    }
    tiles!(1: [1, 2, 3, 4], 2: [1, 2, 3, 4], 3: [1, 2, 3, 4], 4: [1, 2, 3, 4], 5: [1, 2], 6: [1, 2], 7: [1, 2], 8: [1, 2]);
}

// ---------------------------------------------------------------- the linear

/// One block-weight linear cut into tasks that own disjoint blocks of its output.
pub(crate) struct Job<'a> {
    x: &'a PreparedX,
    w: WeightView<'a>,
    /// The weight's packing (the hardware executor's input).
    packed: Option<&'a QPanels>,
    exec: QdotExec,
    n: usize,
    out: SharedOut,
    /// Panels per hardware task (the model's tasks are one panel each).
    nb: usize,
    tasks: usize,
}

/// Rows per tile and panels per tile for `m` rows.
fn tile_shape(m: usize) -> (usize, usize) {
    match m {
        1..=4 => (m, 4),
        5..=7 => (m, 2),
        _ => (8, 2),
    }
}

impl<'a> Job<'a> {
    /// Row-parallel partial of a block-weight linear in the native numerics: `x` prepared for
    /// `w`'s columns (the columns of its segment range), `w` the `[n, k_real]` weight as stored,
    /// `packed` its packing (needed by the hardware executor); `y` `[m, n]` receives the subtree
    /// sums. `pass_panels`: the 16-output panels of every linear in this pass over the pool (this
    /// one's alone, or its group's), which sizes the tasks.
    pub(crate) fn new(
        be: &CpuBackend,
        exec: QdotExec,
        x: &'a PreparedX,
        w: WeightView<'a>,
        packed: Option<&'a QPanels>,
        pass_panels: usize,
        y: &mut [f32],
    ) -> Job<'a> {
        let n = w.rows;
        assert_eq!(x.rows.blocks, w.cols / QUANT_BLOCK, "x prepared for another K");
        let panels = n.div_ceil(PANEL_ROWS);
        let (nb, tasks) = match exec {
            // One task per 16 outputs, every row.
            QdotExec::Model => (1, panels),
            QdotExec::Hardware => {
                let packed = packed.expect("the hardware executor runs on packed panels");
                assert!(packed.fits(w), "packing of another weight");
                let nb = be.panels_per_task(pass_panels.max(panels), tile_shape(x.m.max(1)).1, 1);
                // Tasks start on multiples of `nb`: a task's tiles stay inside one group.
                assert_eq!(GROUP_PANELS % nb, 0, "a task's panels lie inside one group");
                (nb, panels.div_ceil(nb))
            }
        };
        let tasks = if x.m == 0 { 0 } else { tasks };
        Job { x, w, packed, exec, n, out: SharedOut(y.as_mut_ptr()), nb, tasks }
    }

    pub(crate) fn tasks(&self) -> usize {
        self.tasks
    }

    /// Task `t`: panels `t·nb..` over every row.
    pub(crate) fn run(&self, t: usize) {
        let (m, n, nb) = (self.x.m, self.n, self.nb);
        match self.exec {
            QdotExec::Model => model_block(self, self.w, 0..m, t * PANEL_ROWS..((t + 1) * PANEL_ROWS).min(n)),
            #[cfg(target_arch = "x86_64")]
            QdotExec::Hardware => {
                let kind = match self.w.dtype {
                    DType::Q8_0 => hw::Q8_0,
                    DType::Q4_0 => hw::Q4_0,
                    _ => hw::Q4_1,
                };
                let mr = tile_shape(m).0;
                let cols = t * nb..((t + 1) * nb).min(n.div_ceil(PANEL_ROWS));
                for i0 in (0..m).step_by(mr) {
                    let f = hw::tile_fn(kind, mr.min(m - i0), cols.len());
                    // SAFETY: the backend picks `Hardware` only where VNNI exists; the tile lies
                    // inside the job and tasks own disjoint panels.
                    unsafe { f(self, i0, cols.start) }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            QdotExec::Hardware => unreachable!("no AVX512-VNNI outside x86-64"),
        }
    }
}

/// Row-parallel partial of a block-weight linear in the native numerics (see [`Job::new`]), `x`
/// `[m, k_real]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_native(
    be: &CpuBackend,
    exec: QdotExec,
    x: &[f32],
    m: usize,
    w: WeightView<'_>,
    packed: Option<&QPanels>,
    segs: SegmentRange,
    y: &mut [f32],
) {
    if m == 0 || w.rows == 0 {
        return;
    }
    let xq = PreparedX::new(be, x, m, w.cols, segs);
    let job = Job::new(be, exec, &xq, w, packed, w.rows.div_ceil(PANEL_ROWS), y);
    be.run_tasks(job.tasks(), |t| job.run(t));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_blocks_quantize_by_the_rule_including_zero_tiny_and_non_finite_blocks() {
        let mut q = [0i8; 32];
        let mut x = [0f32; 32];
        x[3] = -2.0;
        x[7] = 1.0;
        x[9] = 0.0078125;
        let (dx, sum) = quantize_block(&x, &mut q);
        assert_eq!(dx, 2.0 / 127.0);
        assert_eq!((q[3], q[7], q[9]), (-127, 64, 0)); // 63.5 rounds to even: 64; 0.496 → 0
        assert_eq!(sum, -63);
        assert_eq!(quantize_block(&[0.0; 32], &mut q), (0.0, 0));
        assert_eq!(quantize_block(&[1e-20; 32], &mut q), (0.0, 0));
        assert!(q.iter().all(|&v| v == 0));
        x[0] = f32::INFINITY;
        let (dx, sum) = quantize_block(&x, &mut q);
        assert!(dx.is_nan() && sum == 0 && q.iter().all(|&v| v == 0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_quantizer_gives_the_models_bits() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED the_vector_quantizer_gives_the_models_bits: no AVX-512 on this CPU");
            return;
        }
        let mut rng = crate::splitmix::SplitMix64::new(0x853c_49e6);
        let mut rnd = move || rng.next_u64();
        let (mut qm, mut qv) = ([0i8; 32], [0i8; 32]);
        for round in 0..50_000 {
            let e = (rnd() % 80) as i32 - 60;
            let mut x: [f32; 32] = std::array::from_fn(|_| ((rnd() % 2_000_001) as f32 - 1e6) * 2f32.powi(e - 20));
            // Ties: values that land exactly on k + 0.5 after scaling, and edge blocks.
            if round % 7 == 1 {
                x.iter_mut().enumerate().for_each(|(j, v)| *v = (j as f32 - 15.5) * 0.5);
                x[0] = 127.0 * 0.5;
            }
            if round % 11 == 2 {
                x[(rnd() % 32) as usize] = [f32::NAN, f32::INFINITY, -f32::INFINITY, 1e-30][(rnd() % 4) as usize];
            }
            let model = quantize_block(&x, &mut qm);
            // SAFETY: AVX-512 F checked above.
            let vector = unsafe { quantize_block_avx512(&x, &mut qv) };
            assert_eq!((model.0.to_bits(), model.1, qm), (vector.0.to_bits(), vector.1, qv), "round {round}: {x:?}");
        }
    }

    /// The interleaved layout puts every (panel, block) of a packing in its own place, together
    /// exactly the packing's bytes, and each group's blocks as one ascending stream: block by
    /// block, the group's panels in order.
    #[test]
    fn grouped_panels_tile_the_packing_exactly_in_block_major_order() {
        for (panels, blocks) in [(1, 1), (3, 2), (4, 18), (5, 3), (7, 1), (9, 4), (13, 18)] {
            let bb = packed_block_bytes(DType::Q8_0);
            let mut seen = Vec::new();
            for first in (0..panels).step_by(GROUP_PANELS) {
                let (start, width, place) = group_of(panels, blocks * bb, first);
                assert_eq!((start, place), (first * blocks * bb, 0));
                assert_eq!(width, GROUP_PANELS.min(panels - first));
                for b in 0..blocks {
                    for nb in first..first + width {
                        let (s, w, p) = group_of(panels, blocks * bb, nb);
                        assert_eq!((s, w), (start, width), "panel {nb} lies in the group of panel {first}");
                        seen.push(s + (b * w + p) * bb);
                    }
                }
            }
            let stream: Vec<usize> = (0..panels * blocks).map(|i| i * bb).collect();
            assert_eq!(seen, stream, "{panels} panels × {blocks} blocks");
        }
    }

    #[test]
    fn blocks_belong_to_the_segment_holding_their_first_column() {
        // K = 576 in 8 segments of 80 columns: blocks start at 0, 32, 64 | 96, 128 | 160, 192, …
        let seg = crate::Segmentation::new(576, 8).unwrap();
        let got = segment_blocks(seg.full(), 18);
        assert_eq!(got, [0..3, 3..5, 5..8, 8..10, 10..13, 13..15, 15..18, 18..18]);
        // A shard of the last 4 segments (columns 320..576: 8 blocks) sees the same cut, shifted.
        assert_eq!(segment_blocks(seg.shard(1, 2).unwrap(), 8), [0..3, 3..5, 5..8, 8..8]);
    }
}
