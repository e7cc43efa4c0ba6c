//! CPU native numerics, class `native-avx512bf16`: bf16 and f16 linears on AVX512-BF16
//! (`VDPBF16PS`), batch-, thread- and TP-invariant within that class. The native class of CPUs
//! without AMX (AMD Zen 4 and later, Intel Cooper Lake; on a CPU with AMX, [`super::amx`] is
//! chosen first).
//!
//! # The numerics (docs/DESIGN.md §2.2, "CPU native (AVX512-BF16)")
//!
//! * Activations are rounded to bf16 (round to nearest even) and the weights are bf16 as stored;
//!   an f16 weight is split exactly into two bf16 planes `hi`, `lo` (as for AMX:
//!   [`super::amx::weight_planes`]).
//! * The contract's segments are kept. Within a segment, every output runs ONE f32 accumulator
//!   from +0 through the segment's column pairs `(2p, 2p + 1)` in increasing `p`, over the real
//!   columns only (a pair cut by the end of the row has a zero in its second half; pairs wholly
//!   past the row are not executed). Per pair and per weight plane (f16: `hi`, then `lo`) the
//!   accumulator takes one `VDPBF16PS` lane: `acc = fma(x[2p], w[2p], fma(x[2p+1], w[2p+1], acc))`
//!   (odd product first, as Intel's SDM pseudo-code says), f32, round to nearest even, denormal
//!   inputs read as zero, denormal results flushed to zero. The segment sums meet in the
//!   contract's segment tree; a row-parallel rank holds whole segments, so its partial is a
//!   subtree.
//! * There is no lane tree: the 16 lanes of a register are 16 *outputs* (weight rows), each with
//!   its own sequential chain. A weight row's packed pairs are broadcast against one x pair, so an
//!   output depends on its own x row and weight row only: M, the other rows, the tile shape, the
//!   thread count and the TP degree cannot change a bit.
//!
//! # Layout
//!
//! The instruction pairs lane `i` of one operand with lane `i` of the other, so weights are packed
//! once (lazily, at a weight's first native call, cached in the [`HostWeight`](crate::HostWeight)):
//! panels of 16 weight rows, per column pair `p` one 64-byte vector holding the 16 rows' pairs
//! (f16: the `hi` vector, then the `lo` vector). An x row is packed per call into bf16 pairs; one
//! pair is broadcast to all 16 lanes. A tile is `MR` x rows × `NB` panels: `MR·NB` accumulators.
//!
//! # One rule, two executors
//!
//! [`Dpbf16Exec::Hardware`] issues the instruction (`_mm512_dpbf16_ps`); [`Dpbf16Exec::Model`] is
//! a scalar, bit-exact model of it (the SDM pseudo-code, checked against Zen 4 silicon on random
//! and denormal inputs) over the same packing, so the tests check the packing and the order on any
//! machine, and the hardware against the model where the instruction exists.

use rayon::prelude::*;
use std::ops::Range;

use super::amx::{bf16_bits, bf16_f32, flush, planes, weight_planes};
use super::{CpuBackend, SharedOut};
use crate::{DType, SegmentRange, WeightView};

/// Outputs per panel: one zmm of f32.
pub const PANEL_ROWS: usize = 16;

/// Whether this CPU can run `VDPBF16PS` on zmm registers.
pub fn avx512bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Who executes the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dpbf16Exec {
    /// The CPU's `VDPBF16PS`; needs [`avx512bf16_available`].
    Hardware,
    /// The bit-exact scalar model: slow, runs anywhere.
    Model,
}

/// A weight packed for the instruction: `panels = ceil(rows / 16)` panels, each `pairs × planes`
/// vectors of 16 dwords; rows past the weight and the second half of a pair past the row are
/// zero.
pub struct PairPanels {
    words: super::pack_arena::PackedWords,
    rows: usize,
    cols: usize,
    pairs: usize,
    planes: usize,
}

impl PairPanels {
    /// Packs `w` on the backend's threads.
    pub(crate) fn pack(be: &CpuBackend, w: WeightView<'_>, purpose: super::PackFor) -> PairPanels {
        let planes = planes(w.dtype);
        let pairs = w.cols.div_ceil(2);
        let panels = w.rows.div_ceil(PANEL_ROWS);
        let panel_words = pairs * planes * PANEL_ROWS;
        let mut words = be.packed_words(panels * panel_words, purpose);
        // A shard whose columns all lie past the row (`cols` 0) has empty panels.
        let pack_panel = |(nb, panel): (usize, &mut [u32])| {
            for j in 0..PANEL_ROWS.min(w.rows - nb * PANEL_ROWS) {
                let row = w.row(nb * PANEL_ROWS + j);
                if w.dtype == DType::Bf16 {
                    // A bf16 pair is the row's next four bytes, as stored: a strided copy.
                    let whole = w.cols / 2;
                    for (p, b) in row.chunks_exact(4).take(whole).enumerate() {
                        panel[p * PANEL_ROWS + j] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    if whole < pairs {
                        panel[whole * PANEL_ROWS + j] = u16::from_le_bytes([row[4 * whole], row[4 * whole + 1]]) as u32;
                    }
                    continue;
                }
                for p in 0..pairs {
                    let c = 2 * p;
                    let lo_col = weight_planes(w.dtype, row, c);
                    let hi_col = if c + 1 < w.cols { weight_planes(w.dtype, row, c + 1) } else { [0, 0] };
                    for (q, (&a, &b)) in lo_col.iter().zip(&hi_col).take(planes).enumerate() {
                        panel[(p * planes + q) * PANEL_ROWS + j] = a as u32 | (b as u32) << 16;
                    }
                }
            }
        };
        be.pool().install(|| words.par_chunks_mut(panel_words.max(1)).enumerate().for_each(pack_panel));
        PairPanels { words, rows: w.rows, cols: w.cols, pairs, planes }
    }
    fn panel_words(&self) -> usize {
        self.pairs * self.planes * PANEL_ROWS
    }
    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL_ROWS)
    }
}

/// `x` prepared once for every bf16/f16 linear of a group that reads it (the same `x`, `m` and
/// segment range): its rows as bf16 pairs and each segment's pairs.
pub(crate) struct PreparedX {
    pairs: Vec<u32>,
    segs: Vec<Range<usize>>,
    m: usize,
    k: usize,
}

impl PreparedX {
    pub(crate) fn new(be: &CpuBackend, x: &[f32], m: usize, k: usize, segs: SegmentRange) -> PreparedX {
        PreparedX { pairs: pack_x(be, x, m, k), segs: segment_pairs(segs, k), m, k }
    }
}

/// x rows as bf16 pairs, `pairs` dwords a row (the second half of a pair past the row is zero),
/// rows split among the team's threads when there are many.
fn pack_x(be: &CpuBackend, x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    if pairs == 0 {
        return out;
    }
    let row = |(dst, xr): (&mut [u32], &[f32])| pack_x_row(xr, dst);
    if m >= 16 && be.threads() > 1 {
        be.run_chunks(&mut out, pairs, |r, dst| row((dst, &x[r * k..(r + 1) * k])));
    } else {
        out.chunks_exact_mut(pairs).zip(x.chunks_exact(k)).for_each(row);
    }
    out
}

/// One x row as bf16 pairs: `half`'s round to nearest even (NaN kept quiet), 16 at a time where
/// AVX-512 exists — the same integer formula, so the same bits.
pub(super) fn pack_x_row(xr: &[f32], dst: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F is present; the function reads and writes whole pairs in bounds.
        done = unsafe { hw::pack_pairs(xr, dst) };
    }
    for p in done..dst.len() {
        let lo = bf16_bits(xr[2 * p]) as u32;
        let hi = if 2 * p + 1 < xr.len() { bf16_bits(xr[2 * p + 1]) as u32 } else { 0 };
        dst[p] = lo | hi << 16;
    }
}

/// Each segment's pairs (relative to the range's first column): the real columns only.
fn segment_pairs(segs: SegmentRange, k_real: usize) -> Vec<Range<usize>> {
    let seg_len = segs.seg.seg_len;
    (0..segs.count)
        .map(|s| {
            let lo = (s * seg_len).min(k_real);
            let hi = ((s + 1) * seg_len).min(k_real);
            // Segments start at even columns (`seg_len` is a multiple of 16), so only the row's
            // end can cut a pair; a segment wholly past the row has none.
            if lo < hi {
                lo / 2..hi.div_ceil(2)
            } else {
                0..0
            }
        })
        .collect()
}

// ---------------------------------------------------------------- the model

/// One `VDPBF16PS` lane (Intel SDM): the odd product, then the even one, each an f32 fma with
/// denormal inputs read as zero and a denormal result flushed to zero, round to nearest even.
#[inline]
pub fn dp_lane(acc: f32, x: u32, w: u32) -> f32 {
    let (x0, x1) = (flush(bf16_f32(x & 0xffff)), flush(bf16_f32(x >> 16)));
    let (w0, w1) = (flush(bf16_f32(w & 0xffff)), flush(bf16_f32(w >> 16)));
    let odd = flush(x1.mul_add(w1, flush(acc)));
    flush(x0.mul_add(w0, odd))
}

/// The model's output block: rows `rows` × panels `panels` of the job, scalar.
fn model_block(job: &Job<'_>, rows: Range<usize>, panels: Range<usize>) {
    let (pp, n) = (job.w, job.n);
    let mut sums = vec![0f32; job.x.segs.len()];
    for nb in panels {
        let panel = &pp.words[nb * pp.panel_words()..(nb + 1) * pp.panel_words()];
        for i in rows.clone() {
            let xr = &job.x.pairs[i * pp.pairs..(i + 1) * pp.pairs];
            for j in 0..PANEL_ROWS.min(n - nb * PANEL_ROWS) {
                for (sum, prs) in sums.iter_mut().zip(&job.x.segs) {
                    let mut acc = 0.0f32;
                    for p in prs.clone() {
                        for q in 0..pp.planes {
                            acc = dp_lane(acc, xr[p], panel[(p * pp.planes + q) * PANEL_ROWS + j]);
                        }
                    }
                    *sum = acc;
                }
                // SAFETY: blocks of the output are disjoint between tasks (see `Job`).
                unsafe { *job.out.0.add(i * n + nb * PANEL_ROWS + j) = super::linear::segment_tree_inplace(&mut sums) };
            }
        }
    }
}

// ---------------------------------------------------------------- the hardware tile

#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::x86_64::*;

    use super::{Job, PANEL_ROWS};

    /// How far ahead (in column pairs, 64 bytes each) a decode tile prefetches each panel.
    const PREFETCH_PAIRS: usize = 16;

    /// Tile `MR` rows (`i0..`) × `NB` panels (`nb0..`): per segment every accumulator runs the
    /// segment's pairs, then per output block the segment tree, lane-wise (16 outputs at once:
    /// the same adds in the same order for each).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; rows and panels lie inside the job; no other task writes
    /// this block of the output.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const MR: usize, const NB: usize>(
        job: &Job<'_>,
        i0: usize,
        nb0: usize,
        sums: &mut [__m512],
    ) {
        let pp = job.w;
        let (pairs, planes, pw) = (pp.pairs, pp.planes, pp.panel_words());
        let w0 = pp.words.as_ptr().add(nb0 * pw);
        let x0 = job.x.pairs.as_ptr().add(i0 * pairs);
        let count = job.x.segs.len();
        crate::cpu::prefetch_tile_outputs::<MR, NB>(job.out.0, job.n, i0, nb0);
        for (s, prs) in job.x.segs.iter().enumerate() {
            let mut acc = [[_mm512_setzero_ps(); NB]; MR];
            if planes == 1 {
                for p in prs.clone() {
                    let mut wv = [_mm512_setzero_si512(); NB];
                    for (j, v) in wv.iter_mut().enumerate() {
                        let at = w0.add(j * pw + p * PANEL_ROWS);
                        if MR <= 2 {
                            // Decode streams each weight once: ask for the panel's bytes a
                            // few lines ahead, into L2 (a hint: no bit depends on it).
                            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PREFETCH_PAIRS * PANEL_ROWS) as *const i8);
                        }
                        *v = _mm512_loadu_si512(at as *const _);
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xb = _mm512_set1_epi32(*x0.add(i * pairs + p) as i32);
                        for (j, aj) in a.iter_mut().enumerate() {
                            *aj = _mm512_dpbf16_ps(*aj, m512bh(xb), m512bh(wv[j]));
                        }
                    }
                }
            } else {
                for p in prs.clone() {
                    for q in 0..planes {
                        let mut wv = [_mm512_setzero_si512(); NB];
                        for (j, v) in wv.iter_mut().enumerate() {
                            *v = _mm512_loadu_si512(w0.add(j * pw + (p * planes + q) * PANEL_ROWS) as *const _);
                        }
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xb = _mm512_set1_epi32(*x0.add(i * pairs + p) as i32);
                            for (j, aj) in a.iter_mut().enumerate() {
                                *aj = _mm512_dpbf16_ps(*aj, m512bh(xb), m512bh(wv[j]));
                            }
                        }
                    }
                }
            }
            crate::cpu::keep_segment_sums(&acc, sums, count, s);
        }
        crate::cpu::store_tile_outputs::<MR, NB>(sums, count, job.out.0, job.n, i0, nb0, MR);
    }

    /// Pairs of `xr` (16 pairs, 32 floats, at a time, the last block masked) rounded to bf16 as
    /// `half` does: NaN → its top half with the quiet bit set; otherwise
    /// `(bits + 0x7fff + lsb) >> 16`, the lsb being bit 16 (round to nearest even); the second
    /// half of a pair past the row is zero. Returns how many pairs it wrote. The masked last block
    /// matters: a segment is rarely a multiple of 32 columns (Qwen2.5's 112 leaves 16), and the
    /// scalar rounding of those was about a sixth of native prefill's A packing (BENCHMARKS §21.1).
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_pairs(xr: &[f32], dst: &mut [u32]) -> usize {
        let whole = (xr.len() / 32).min(dst.len() / 16);
        let round = |v: __m512i| {
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
            let rne = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(0x7fff)), lsb));
            let abs = _mm512_and_si512(v, _mm512_set1_epi32(0x7fff_ffff));
            let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(0x40));
            _mm512_mask_blend_epi32(nan, rne, quiet)
        };
        // Elements 2p (low half) and 2p + 1 (high half) of each pair: even and odd dwords of the
        // 32 rounded values, packed as lo | hi << 16.
        let pack = |a: __m512i, c: __m512i| {
            let even = _mm512_permutex2var_epi32(
                a,
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                c,
            );
            let odd = _mm512_permutex2var_epi32(
                a,
                _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
                c,
            );
            _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
        };
        for b in 0..whole {
            let src = xr.as_ptr().add(32 * b) as *const __m512i;
            let pairs = pack(round(_mm512_loadu_si512(src)), round(_mm512_loadu_si512(src.add(1))));
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * b) as *mut __m512i, pairs);
        }
        let tail = dst.len() - 16 * whole;
        if tail == 0 || tail > 16 {
            return 16 * whole;
        }
        // The last pairs: floats past the row load as +0.0, which rounds to a zero half.
        let floats = (xr.len() - 32 * whole).min(2 * tail);
        let mask = |n: usize| if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 };
        let src = xr.as_ptr().add(32 * whole) as *const i32;
        let a = _mm512_maskz_loadu_epi32(mask(floats), src);
        let c = _mm512_maskz_loadu_epi32(mask(floats.saturating_sub(16)), src.add(16));
        _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(16 * whole) as *mut i32, mask(tail), pack(round(a), round(c)));
        16 * whole + tail
    }

    #[inline(always)]
    fn m512bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 512 bits of plain data.
        unsafe { std::mem::transmute(v) }
    }

    pub(super) type TileFn = unsafe fn(&Job<'_>, usize, usize);

    macro_rules! tiles {
        ($($mr:literal: [$($nb:literal),*]),*) => {
            /// The tile function for `mr` rows × `nb` panels (`mr·nb ≤ 24` accumulators).
            pub(super) fn tile_fn(mr: usize, nb: usize) -> TileFn {
                match (mr, nb) {
                    $($(($mr, $nb) => |job, i0, nb0| {
                        // SAFETY: as for `tile`, which the caller promises.
                        crate::cpu::with_tile_sums($mr * $nb * job.x.segs.len(), |s| unsafe {
                            tile::<$mr, $nb>(job, i0, nb0, s)
                        })
                    },)*)*
                    _ => unreachable!("no {mr}×{nb} tile"),
                }
            }
        };
    }
    tiles!(1: [1, 2, 3, 4, 5, 6, 7, 8], 2: [1, 2, 3, 4, 5, 6], 3: [1, 2, 3, 4, 5, 6], 4: [1, 2, 3, 4, 5, 6],
        5: [1, 2, 3, 4], 6: [1, 2, 3, 4], 7: [1, 2, 3], 8: [1, 2, 3]);
}

// ---------------------------------------------------------------- the linear

/// One bf16/f16 linear cut into tasks that own disjoint blocks of its output.
pub(crate) struct Job<'a> {
    x: &'a PreparedX,
    w: &'a PairPanels,
    exec: Dpbf16Exec,
    n: usize,
    out: SharedOut,
    /// Panels per task.
    nb: usize,
    tasks: usize,
}

/// Rows per tile and panels per tile for `m` rows: `MR·NB ≤ 24` accumulators plus `NB` weight
/// vectors and one broadcast fit the 32 zmm registers.
fn tile_shape(m: usize) -> (usize, usize) {
    match m {
        1 => (1, 8),
        2..=4 => (m, 6),
        5 | 6 => (m, 4),
        7 => (7, 3),
        _ => (8, 3),
    }
}

impl<'a> Job<'a> {
    /// Row-parallel partial of a bf16/f16 linear in the `native-avx512bf16` numerics: `x`
    /// prepared for the weight's columns (those of its segment range), `panels` the packed
    /// `[n, k_real]` weight; `y` `[m, n]` receives the subtree sums. `pass_panels`: the 16-output
    /// panels of every linear in this pass over the pool (this one's alone, or its group's), which
    /// sizes the tasks.
    pub(crate) fn new(
        be: &CpuBackend,
        exec: Dpbf16Exec,
        x: &'a PreparedX,
        panels: &'a PairPanels,
        pass_panels: usize,
        y: &mut [f32],
    ) -> Job<'a> {
        assert_eq!(x.k, panels.cols, "x prepared for another K");
        let total = panels.panels();
        // q/k/v at decode have 8–56 panels.
        let nb = be.panels_per_task(pass_panels.max(total), tile_shape(x.m.max(1)).1, 2);
        let tasks = if x.m == 0 { 0 } else { total.div_ceil(nb) };
        Job { x, w: panels, exec, n: panels.rows, out: SharedOut(y.as_mut_ptr()), nb, tasks }
    }

    pub(crate) fn tasks(&self) -> usize {
        self.tasks
    }

    /// Task `t`: `nb` panels (one tile column) over every row, so its weight panels are read
    /// from memory once and meet all of M from cache.
    pub(crate) fn run(&self, t: usize) {
        let (m, nb) = (self.x.m, self.nb);
        let cols = t * nb..((t + 1) * nb).min(self.w.panels());
        match self.exec {
            Dpbf16Exec::Model => model_block(self, 0..m, cols),
            #[cfg(target_arch = "x86_64")]
            Dpbf16Exec::Hardware => {
                let mr = tile_shape(m).0;
                for i0 in (0..m).step_by(mr) {
                    let f = hw::tile_fn(mr.min(m - i0), cols.len());
                    // SAFETY: the backend picks `Hardware` only where AVX512-BF16 exists; the
                    // tile lies inside the job and tasks own disjoint columns.
                    unsafe { f(self, i0, cols.start) }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Dpbf16Exec::Hardware => unreachable!("no AVX512-BF16 outside x86-64"),
        }
    }
}

/// Row-parallel partial of a bf16/f16 linear in the `native-avx512bf16` numerics (see
/// [`Job::new`]), `x` `[m, k_real]`.
pub(crate) fn linear_native(
    be: &CpuBackend,
    exec: Dpbf16Exec,
    x: &[f32],
    m: usize,
    panels: &PairPanels,
    segs: SegmentRange,
    y: &mut [f32],
) {
    if m == 0 || panels.rows == 0 {
        return;
    }
    let xp = PreparedX::new(be, x, m, panels.cols, segs);
    let job = Job::new(be, exec, &xp, panels, panels.panels(), y);
    be.run_tasks(job.tasks(), |t| job.run(t));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_adds_the_odd_product_first_and_flushes_denormals() {
        let pair = |lo: f32, hi: f32| bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16;
        // The order shows with a cancelling pair: acc 2^24, odd product −2^24, even product 1 →
        // (2^24 − 2^24) + 1 = 1; even first would give (2^24 + 1 → 2^24) − 2^24 = 0.
        let acc = 2f32.powi(24);
        assert_eq!(dp_lane(acc, pair(1.0, -1.0), pair(1.0, 2f32.powi(24))), 1.0);
        // A denormal result is flushed (to zero of its sign), and a denormal input reads as zero.
        assert_eq!(dp_lane(0.0, pair(2f32.powi(-70), 0.0), pair(-(2f32.powi(-70)), 0.0)).to_bits(), 0x8000_0000);
        assert_eq!(dp_lane(1.0, pair(2f32.powi(-130), 0.0), pair(2f32.powi(100), 0.0)), 1.0);
    }

    #[test]
    fn packed_x_pairs_round_like_half_including_nan_ties_and_denormals() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u32
        };
        let specials = [
            0x7fc0_0001u32,
            0xff80_0001,
            0x7f80_0000,
            0x0000_8000,
            0x0001_8000,
            0x0000_7fff,
            0x3f80_8000,
            0x3f81_8000,
            0x807f_ffff,
            0x7f7f_ffff,
        ];
        for k in [1usize, 31, 32, 33, 95, 130] {
            let xr: Vec<f32> =
                (0..k).map(|i| f32::from_bits(if i < specials.len() { specials[i] } else { rnd() })).collect();
            let mut dst = vec![0u32; k.div_ceil(2)];
            pack_x_row(&xr, &mut dst);
            for (p, &v) in dst.iter().enumerate() {
                let lo = bf16_bits(xr[2 * p]) as u32;
                let hi = if 2 * p + 1 < k { bf16_bits(xr[2 * p + 1]) as u32 } else { 0 };
                assert_eq!(
                    v,
                    lo | hi << 16,
                    "k={k} pair {p}: {:#010x} {:#010x}",
                    xr[2 * p].to_bits(),
                    xr.get(2 * p + 1).map_or(0, |x| x.to_bits())
                );
            }
        }
    }

    /// Every row length 0..=100 (each size of the masked last block, odd and even, and a
    /// destination one pair short of the row) packs the pairs `half` rounds, the specials and
    /// ties landing in the last block too; nothing past the destination is written.
    #[test]
    fn packed_x_pairs_vector_tail_rounds_like_half_for_every_length() {
        let specials = [0x7fc0_0001u32, 0xff80_0001, 0x7f80_0000, 0x0000_8000, 0x0001_8000, 0x3f80_8000, 0x807f_ffff];
        let mut rng = crate::splitmix::SplitMix64::new(41);
        for k in 0..=100usize {
            let xr: Vec<f32> = (0..k)
                .map(|i| {
                    // The last block's values: specials at its end, random bits elsewhere.
                    let from_end = k - 1 - i;
                    f32::from_bits(specials.get(from_end).copied().unwrap_or(rng.next_u64() as u32))
                })
                .collect();
            for pairs in [k.div_ceil(2), (k / 2).saturating_sub(1)] {
                let mut dst = vec![0xdead_beefu32; pairs + 1];
                pack_x_row(&xr, &mut dst[..pairs]);
                for (p, &v) in dst[..pairs].iter().enumerate() {
                    let lo = bf16_bits(xr[2 * p]) as u32;
                    let hi = if 2 * p + 1 < k { bf16_bits(xr[2 * p + 1]) as u32 } else { 0 };
                    assert_eq!(v, lo | hi << 16, "k={k} pairs={pairs} pair {p}");
                }
                assert_eq!(dst[pairs], 0xdead_beef, "k={k} pairs={pairs}: wrote past the destination");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_instruction_agrees_with_the_model_on_random_and_denormal_lanes() {
        use std::arch::x86_64::*;
        if !avx512bf16_available() {
            use std::io::Write;
            let _ =
                writeln!(std::io::stderr(), "SKIPPED the_instruction_agrees_with_the_model: CPU has no AVX512-BF16");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn hardware(acc: &[f32; 16], x: &[u32; 16], w: &[u32; 16]) -> [f32; 16] {
            let r = _mm512_dpbf16_ps(
                _mm512_loadu_ps(acc.as_ptr()),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x.as_ptr() as *const _)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.as_ptr() as *const _)),
            );
            let mut o = [0f32; 16];
            _mm512_storeu_ps(o.as_mut_ptr(), r);
            o
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for it in 0..20_000 {
            let (mut acc, mut x, mut w) = ([0f32; 16], [0u32; 16], [0u32; 16]);
            for l in 0..16 {
                // Values over a wide exponent range; every few rounds denormal inputs and
                // cancellations that leave tiny (flushed) results.
                let e = (rnd() % 60) as i32 - 30;
                acc[l] = ((rnd() % 2_000_001) as f32 - 1e6) * 2f32.powi(e - 20);
                x[l] = rnd() as u32;
                w[l] = rnd() as u32;
                if it % 5 == 1 {
                    x[l] &= 0x807f_807f; // exponent 0: denormal or zero bf16
                    acc[l] = f32::from_bits(rnd() as u32 & 0x807f_ffff);
                }
                if it % 5 == 2 {
                    let v = bf16_bits(2f32.powi(-64 - (rnd() % 8) as i32)) as u32;
                    x[l] = v | v << 16;
                    w[l] = x[l];
                    acc[l] = 0.0;
                }
            }
            // NaN and infinity inputs are outside the comparison (they propagate alike but their
            // payload bits are not the rule's business).
            let finite = |b: u32| (b & 0x7f80) != 0x7f80 && (b >> 16 & 0x7f80) != 0x7f80;
            // SAFETY: the CPU has AVX512-BF16 (checked above).
            let h = unsafe { hardware(&acc, &x, &w) };
            for l in 0..16 {
                if !(finite(x[l]) && finite(w[l]) && h[l].is_finite()) {
                    continue;
                }
                assert_eq!(
                    h[l].to_bits(),
                    dp_lane(acc[l], x[l], w[l]).to_bits(),
                    "lane {l} of round {it}: acc {:e}, x {:#010x}, w {:#010x}",
                    acc[l],
                    x[l],
                    w[l]
                );
            }
        }
    }
}
