//! x86-64 tile kernels: AVX-512 (one zmm = the 16 logical lanes) and AVX2 (two ymm per 16 lanes).
//!
//! Both evaluate exactly the contract order of [`crate::reference::dot`]: per segment, lane `l`
//! accumulates `x[e]·w[e]` for `e ≡ l (mod 16)` with `vfmadd` from +0.0, the lane tree folds
//! `(l, l+8)`, `(l, l+4)`, `(l, l+2)`, `(l, l+1)`, and the segment sums meet in the balanced tree.
//!
//! Block-type weights (GGUF Q8_0/Q4_0/Q4_1) at one x row — the decode case, where every weight is
//! read once per step and widening it is the work — take dedicated tiles ([`decode512`],
//! [`decode256`]): each segment is walked in whole 32-weight blocks so a block's header is widened
//! once, a block cut in two by a segment boundary is widened once and its second half carried
//! into the next segment, and on AVX-512 a 4-bit block's weights are looked up (`vpermps`, the
//! nibble as index) in the table of its 16 possible values.
//!
//! The lane-major tiles ([`lanes512`]) turn the contract around: a register holds lane `l` of 16
//! outputs instead of the 16 lanes of one output — the same fma chains, the lane tree then as
//! vertical adds.

use std::arch::x86_64::*;

use super::linear::{segment_tree_inplace, Tile};
use crate::math::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
use crate::{DType, LANES};

// ---------------------------------------------------------------- AVX-512

/// Widening loads of 16 weights, one type per storage dtype so the tile kernels are
/// monomorphised with no dtype branch in the inner loop.
trait Load512 {
    /// 16 weights from element `col` of `row`.
    unsafe fn full(row: *const u8, col: usize) -> __m512;
    /// Lanes outside `mask` are zero and their addresses are never touched.
    unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512;
    /// Where in a row the bytes of element `col` lie (a block type: its block's start).
    fn byte_offset(col: usize) -> usize;
    /// Whether [`Load512::pair`] saves work (a block type decodes its 32-weight block once).
    const PAIRED: bool = false;
    /// Weights `col..col + 32` (`col` a multiple of 32, all real) as two vectors.
    #[inline(always)]
    unsafe fn pair(row: *const u8, col: usize) -> (__m512, __m512) {
        (Self::full(row, col), Self::full(row, col + 16))
    }
}
struct F32x16;
struct Bf16x16;
struct F16x16;

impl Load512 for F32x16 {
    #[inline(always)]
    fn byte_offset(col: usize) -> usize {
        col * 4
    }
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        _mm512_loadu_ps((row as *const f32).add(col))
    }
    #[inline(always)]
    unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, (row as *const f32).add(col))
    }
}
impl Load512 for Bf16x16 {
    #[inline(always)]
    fn byte_offset(col: usize) -> usize {
        col * 2
    }
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        let h = _mm256_loadu_si256((row as *const u16).add(col) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask, (row as *const i16).add(col) as *const _);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}
impl Load512 for F16x16 {
    #[inline(always)]
    fn byte_offset(col: usize) -> usize {
        col * 2
    }
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256((row as *const u16).add(col) as *const __m256i))
    }
    #[inline(always)]
    unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (row as *const i16).add(col) as *const _))
    }
}

struct Q8_0x16;
struct Q4_0x16;
struct Q4_1x16;

/// The f16 at `p`, widened exactly (F16C, as `half` does) into every lane.
#[inline(always)]
unsafe fn f16_splat512(p: *const u8) -> __m512 {
    let h = std::ptr::read_unaligned(p as *const u16) as i32;
    _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
}

/// A GGUF block type on AVX-512, widened by the [`crate::quant`] formula. The work per block is
/// split so that what depends only on the block's header (`prepare`: its scale, or for the 4-bit
/// types the block's whole table of 16 possible values) is done once per block, and each half of
/// 16 weights then costs one or two vector operations before its fma.
trait Quant512 {
    /// Bytes per block.
    const BYTES: usize;
    /// The per-block vector: `d` in every lane (Q8_0), or the block's 16 widened values indexed by
    /// nibble (Q4_0, Q4_1).
    unsafe fn prepare(blk: *const u8) -> __m512;
    /// Weights `16·HI ..+16` of the block.
    unsafe fn half<const HI: bool>(blk: *const u8, prepared: __m512) -> __m512;
    /// Both halves (one load of a 4-bit block's nibbles serves both).
    #[inline(always)]
    unsafe fn both(blk: *const u8, prepared: __m512) -> (__m512, __m512) {
        (Self::half::<false>(blk, prepared), Self::half::<true>(blk, prepared))
    }
}

impl Quant512 for Q8_0x16 {
    const BYTES: usize = crate::quant::Q8_0_BYTES;
    #[inline(always)]
    unsafe fn prepare(blk: *const u8) -> __m512 {
        f16_splat512(blk)
    }
    /// `f32(q) · d`.
    #[inline(always)]
    unsafe fn half<const HI: bool>(blk: *const u8, d: __m512) -> __m512 {
        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2 + 16 * HI as usize) as *const __m128i));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), d)
    }
}

/// `n` as f32 in lane `n`, and `n − 8`: the nibble values the 4-bit tables are built from.
const NIBBLE_VALUES: [f32; 16] = [0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.];
const NIBBLE_VALUES_MINUS_8: [f32; 16] = [-8., -7., -6., -5., -4., -3., -2., -1., 0., 1., 2., 3., 4., 5., 6., 7.];

/// Both halves of a 4-bit block through its table: the nibble bytes zero-extended to 32-bit lanes
/// hold the low nibble in bits 0–3 and the high one in bits 4–7, and `vpermps` reads only bits
/// 0–3 of each index, so the first half needs no mask and the second one shift.
#[inline(always)]
unsafe fn nibble_lookup<const HI: bool>(qs: *const u8, table: __m512) -> __m512 {
    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
    let idx = if HI { _mm512_srli_epi32::<4>(idx) } else { idx };
    _mm512_permutexvar_ps(idx, table)
}
#[inline(always)]
unsafe fn nibble_lookup_both(qs: *const u8, table: __m512) -> (__m512, __m512) {
    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
    (_mm512_permutexvar_ps(idx, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), table))
}

impl Quant512 for Q4_0x16 {
    const BYTES: usize = crate::quant::Q4_0_BYTES;
    /// Entry `n` is `f32(n − 8) · d`, the formula itself, so a lookup returns its bits.
    #[inline(always)]
    unsafe fn prepare(blk: *const u8) -> __m512 {
        _mm512_mul_ps(_mm512_loadu_ps(NIBBLE_VALUES_MINUS_8.as_ptr()), f16_splat512(blk))
    }
    #[inline(always)]
    unsafe fn half<const HI: bool>(blk: *const u8, table: __m512) -> __m512 {
        nibble_lookup::<HI>(blk.add(2), table)
    }
    #[inline(always)]
    unsafe fn both(blk: *const u8, table: __m512) -> (__m512, __m512) {
        nibble_lookup_both(blk.add(2), table)
    }
}

impl Quant512 for Q4_1x16 {
    const BYTES: usize = crate::quant::Q4_1_BYTES;
    /// Entry `n` is `f32(n) · d + m`. One fma gives the formula's bits: the product `n · d` is
    /// exact (4 integer bits times an 11-bit significand), so rounding it first changes nothing.
    #[inline(always)]
    unsafe fn prepare(blk: *const u8) -> __m512 {
        // `d` and `m` are adjacent f16: widen the pair once (lanes d, m, d, m, …), then spread.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(blk as *const i32)));
        let (d, m) = (_mm512_broadcastss_ps(dm), _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
        _mm512_fmadd_ps(_mm512_loadu_ps(NIBBLE_VALUES.as_ptr()), d, m)
    }
    #[inline(always)]
    unsafe fn half<const HI: bool>(blk: *const u8, table: __m512) -> __m512 {
        nibble_lookup::<HI>(blk.add(4), table)
    }
    #[inline(always)]
    unsafe fn both(blk: *const u8, table: __m512) -> (__m512, __m512) {
        nibble_lookup_both(blk.add(4), table)
    }
}

/// Block types: `col` is a multiple of 16 and rows are whole blocks, so a block of 16 lanes is
/// half of one quantization block — all real or (past the row) all padding.
impl<Q: Quant512> Load512 for Q {
    #[inline(always)]
    fn byte_offset(col: usize) -> usize {
        col / 32 * Q::BYTES
    }
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        let blk = row.add(Self::byte_offset(col));
        if col.is_multiple_of(32) {
            Q::half::<false>(blk, Q::prepare(blk))
        } else {
            Q::half::<true>(blk, Q::prepare(blk))
        }
    }
    #[inline(always)]
    unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512 {
        if mask == 0 {
            _mm512_setzero_ps()
        } else {
            _mm512_maskz_mov_ps(mask, Self::full(row, col))
        }
    }
    const PAIRED: bool = true;
    #[inline(always)]
    unsafe fn pair(row: *const u8, col: usize) -> (__m512, __m512) {
        let blk = row.add(col / 32 * Q::BYTES);
        Q::both(blk, Q::prepare(blk))
    }
}

/// Permutation indices for one level of the transposed lane fold: from a pair of vectors whose
/// lanes form groups of `2g` (one output each), gather the first (`hi = false`) or second half of
/// every group, first vector's groups first.
const fn fold_index(g: usize, hi: bool) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut p = 0;
    while p < 16 {
        let q = p % 8;
        let src = (q / g) * 2 * g + q % g + if hi { g } else { 0 };
        idx[p] = (src + if p >= 8 { 16 } else { 0 }) as i32;
        p += 1;
    }
    idx
}

const FOLD: [[[i32; 16]; 2]; 4] = [
    [fold_index(8, false), fold_index(8, true)],
    [fold_index(4, false), fold_index(4, true)],
    [fold_index(2, false), fold_index(2, true)],
    [fold_index(1, false), fold_index(1, true)],
];

/// Fold 16 accumulators (one output each) into one vector whose lane `j` is output `j`'s lane-tree
/// sum. Level by level, each pair of vectors is split into first/second halves of every group and
/// the halves are added: exactly `(l, l+8)`, then `(l, l+4)`, `(l, l+2)`, `(l, l+1)` per output.
#[inline(always)]
unsafe fn fold16(acc: &mut [__m512; 16]) -> __m512 {
    let mut n = 16;
    for level in FOLD.iter() {
        let lo = _mm512_loadu_si512(level[0].as_ptr() as *const _);
        let hi = _mm512_loadu_si512(level[1].as_ptr() as *const _);
        for i in 0..n / 2 {
            let (a, b) = (acc[2 * i], acc[2 * i + 1]);
            acc[i] = _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
        }
        n /= 2;
    }
    acc[0]
}

/// The segment tree over segment sums that arrive in order, built incrementally: `runs[i]` holds
/// a finished subtree of 2^i segments waiting for its right sibling (like binary carry
/// propagation), so no buffer of all S segment sums is needed. For a power-of-two count this is
/// exactly the pairwise tree; a count of 3·2^k leaves two finished runs (two thirds, one third),
/// added left to right as `reference::tree_reduce` does.
struct SegmentTree512 {
    runs: [__m512; 7],
    depth: usize,
    pushed: usize,
}

impl SegmentTree512 {
    #[inline(always)]
    unsafe fn new() -> Self {
        SegmentTree512 { runs: [_mm512_setzero_ps(); 7], depth: 0, pushed: 0 }
    }
    #[inline(always)]
    unsafe fn push(&mut self, mut v: __m512) {
        self.pushed += 1;
        let mut done = self.pushed;
        while done & 1 == 0 {
            self.depth -= 1;
            v = _mm512_add_ps(self.runs[self.depth], v);
            done >>= 1;
        }
        self.runs[self.depth] = v;
        self.depth += 1;
    }
    #[inline(always)]
    unsafe fn total(&self) -> __m512 {
        let mut total = self.runs[0];
        for &run in &self.runs[1..self.depth] {
            total = _mm512_add_ps(total, run);
        }
        total
    }
}

/// A tile of `MR × NR = 16` outputs (4×4 or 1×16): 16 zmm accumulators, one fold per segment.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn tile512<const MR: usize, const NR: usize, L: Load512>(t: &Tile<'_>, out: &mut [f32; 16]) {
    let xs: [*const f32; MR] = std::array::from_fn(|i| t.xs[i]);
    let ws: [*const u8; NR] = std::array::from_fn(|j| t.ws[j]);
    // Blocks below `full_end` lie wholly inside the real row; the rest are masked (zeros beyond).
    let full_end = t.k_real / 16 * 16;
    // Spread the next tile's prefetches evenly over this tile's blocks.
    let blocks = (t.count * t.seg_len / 16).max(1);
    let lines = t.prefetch.len().div_ceil(64);
    let per_block = lines.div_ceil(blocks);
    let mut next_line = 0usize;
    let mut tree = SegmentTree512::new();
    for s in 0..t.count {
        let mut acc = [_mm512_setzero_ps(); 16];
        let (start, end) = (s * t.seg_len, (s + 1) * t.seg_len);
        // `pair`: columns col..col + 32 at once (a block type decodes its block once); each
        // accumulator still takes its elements col + l, then col + 16 + l, in order.
        let mut block = |col: usize, masked: bool, pair: bool| {
            for _ in 0..per_block * (1 + pair as usize) {
                if next_line < lines {
                    // Into L2, not L1: a 1 × 16 tile's rows fill most of L1 already, and lines prefetched
                    // there evicted the lines this tile was about to read (BENCHMARKS §9.1).
                    _mm_prefetch::<_MM_HINT_T1>(t.prefetch.as_ptr().add(next_line * 64) as *const i8);
                    next_line += 1;
                }
            }
            let mut xv = [_mm512_setzero_ps(); MR];
            for i in 0..MR {
                xv[i] = _mm512_loadu_ps(xs[i].add(col));
            }
            if pair {
                let mut xv1 = [_mm512_setzero_ps(); MR];
                for i in 0..MR {
                    xv1[i] = _mm512_loadu_ps(xs[i].add(col + 16));
                }
                for j in 0..NR {
                    let (w0, w1) = L::pair(ws[j], col);
                    for i in 0..MR {
                        acc[i * NR + j] = _mm512_fmadd_ps(xv[i], w0, acc[i * NR + j]);
                        acc[i * NR + j] = _mm512_fmadd_ps(xv1[i], w1, acc[i * NR + j]);
                    }
                }
                return;
            }
            let rem = t.k_real.saturating_sub(col).min(16);
            let mask = ((1u32 << rem) - 1) as __mmask16;
            // One weight vector live at a time: MR x registers + 16 accumulators + 1 never spill.
            for j in 0..NR {
                let wv = if masked { L::masked(ws[j], col, mask) } else { L::full(ws[j], col) };
                for i in 0..MR {
                    acc[i * NR + j] = _mm512_fmadd_ps(xv[i], wv, acc[i * NR + j]);
                }
            }
        };
        let split = full_end.clamp(start, end);
        let mut col = start;
        while col < split {
            let pair = L::PAIRED && col.is_multiple_of(32) && col + 32 <= split;
            block(col, false, pair);
            col += if pair { 32 } else { 16 };
        }
        for col in (split..end).step_by(16) {
            block(col, true, false);
        }
        tree.push(fold16(&mut acc));
    }
    _mm512_storeu_ps(out.as_mut_ptr(), tree.total());
}

/// `$body` for `$j` = 0, 1, …, 15 written out: the row index of every accumulator is then a
/// constant, so the 16 accumulators stay in registers (a rolled loop over an array of vectors
/// keeps them on the stack).
macro_rules! each_of_16 {
    ($j:ident => $body:block) => {
        each_of_16!(@ $j $body 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    (@ $j:ident $body:block $($n:literal)*) => {
        $({
            let $j: usize = $n;
            $body
        })*
    };
}

/// The decode tile of a block type: one x row times 16 weight rows (`M = 1`, where every weight
/// is read once per call and the widening, not the fma, is the work). Compared with
/// [`tile512`] it walks each segment in whole blocks, and a block that a segment boundary cuts in
/// two is widened once, its second half kept for the next segment — so a block's header is
/// widened (and a 4-bit block's table built) once for 32 weights. It touches only real columns: a row of a block type is whole blocks, so every 16 columns
/// are real or padding entirely, and padding adds `fma(0, 0, acc) = acc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn decode512<Q: Quant512>(t: &Tile<'_>, out: &mut [f32; 16]) {
    let x = t.xs[0];
    let ws: [*const u8; 16] = std::array::from_fn(|j| t.ws[j]);
    // Spread the next tile's prefetches evenly over this tile's steps of 16 columns.
    let lines = t.prefetch.len().div_ceil(64);
    let per_step = lines.div_ceil((t.k_real / 16).max(1));
    let mut next_line = 0usize;
    let mut prefetch = |steps: usize| {
        for _ in 0..per_step * steps {
            if next_line < lines {
                // Into L2, not L1: a 1 × 16 tile's rows fill most of L1 already, and lines prefetched
                // there evicted the lines this tile was about to read (BENCHMARKS §9.1).
                _mm_prefetch::<_MM_HINT_T1>(t.prefetch.as_ptr().add(next_line * 64) as *const i8);
                next_line += 1;
            }
        }
    };
    let mut tree = SegmentTree512::new();
    let mut carry = [_mm512_setzero_ps(); 16];
    for s in 0..t.count {
        let mut acc = [_mm512_setzero_ps(); 16];
        let start = s * t.seg_len;
        let stop = ((s + 1) * t.seg_len).min(t.k_real).max(start);
        let mut col = start;
        if col < stop && !col.is_multiple_of(32) {
            // The segment opens on the second half of a block, which the previous segment
            // widened (a segment can only close on a first half before a real second half).
            let xv = _mm512_loadu_ps(x.add(col));
            each_of_16!(j => {
                acc[j] = _mm512_fmadd_ps(xv, carry[j], acc[j]);
            });
            col += 16;
        }
        while col + 32 <= stop {
            prefetch(2);
            let (x0, x1) = (_mm512_loadu_ps(x.add(col)), _mm512_loadu_ps(x.add(col + 16)));
            each_of_16!(j => {
                let blk = ws[j].add(col / 32 * Q::BYTES);
                let (w0, w1) = Q::both(blk, Q::prepare(blk));
                acc[j] = _mm512_fmadd_ps(x1, w1, _mm512_fmadd_ps(x0, w0, acc[j]));
            });
            col += 32;
        }
        if col < stop {
            // The segment closes on the first half of a block: widen the whole block and keep
            // its second half for the next segment.
            prefetch(2);
            let xv = _mm512_loadu_ps(x.add(col));
            each_of_16!(j => {
                let blk = ws[j].add(col / 32 * Q::BYTES);
                let (w0, w1) = Q::both(blk, Q::prepare(blk));
                acc[j] = _mm512_fmadd_ps(xv, w0, acc[j]);
                carry[j] = w1;
            });
        }
        tree.push(fold16(&mut acc));
    }
    _mm512_storeu_ps(out.as_mut_ptr(), tree.total());
}

/// # Safety
/// AVX-512 F/BW/VL must be available; `t` must describe valid rows (see [`Tile`]).
pub(crate) unsafe fn tile_avx512(t: &Tile<'_>, out: &mut [f32; 16]) {
    match (t.xs.len(), t.ws.len(), t.dtype) {
        (4, 4, DType::F32) => tile512::<4, 4, F32x16>(t, out),
        (4, 4, DType::Bf16) => tile512::<4, 4, Bf16x16>(t, out),
        (4, 4, DType::F16) => tile512::<4, 4, F16x16>(t, out),
        (1, 16, DType::F32) => tile512::<1, 16, F32x16>(t, out),
        (1, 16, DType::Bf16) => tile512::<1, 16, Bf16x16>(t, out),
        (1, 16, DType::F16) => tile512::<1, 16, F16x16>(t, out),
        (4, 4, DType::Q8_0) => tile512::<4, 4, Q8_0x16>(t, out),
        (4, 4, DType::Q4_0) => tile512::<4, 4, Q4_0x16>(t, out),
        (4, 4, DType::Q4_1) => tile512::<4, 4, Q4_1x16>(t, out),
        (1, 16, DType::Q8_0) => decode512::<Q8_0x16>(t, out),
        (1, 16, DType::Q4_0) => decode512::<Q4_0x16>(t, out),
        (1, 16, DType::Q4_1) => decode512::<Q4_1x16>(t, out),
        other => unreachable!("no AVX-512 tile of shape {other:?}"),
    }
}

// ---------------------------------------------------------------- AVX-512, K-blocked 8×3

/// Rows and columns of the K-blocked tile: 24 accumulators, 3 weight vectors and 1 x vector of
/// the 32 zmm registers, and each widened weight vector feeds 8 rows.
pub(crate) const KB_MR: usize = 8;
pub(crate) const KB_NR: usize = 3;
/// Outputs of one K-blocked tile.
pub(crate) const KB_OUTPUTS: usize = KB_MR * KB_NR;
/// Floats of one tile's state between K chunks: its 24 lane accumulators (a segment cut into
/// chunks) and its segment-tree stack of up to 7 finished subtrees (S ≤ 64), each the tile's two
/// folded vectors (an entry of [`push_results`]`::<2>`).
pub(crate) const KB_ACC_FLOATS: usize = KB_OUTPUTS * 16;
pub(crate) const KB_STACK_FLOATS: usize = 2 * 16;
pub(crate) const KB_STATE_FLOATS: usize = KB_ACC_FLOATS + 7 * KB_STACK_FLOATS;

/// One K chunk of one K-blocked tile: columns `begin..end`, either whole segments (several short
/// ones at once, so one call folds each in turn while the next one's FMAs already run) or a piece
/// of one long segment, so a chunk only ever continues the lanes of its own first segment.
pub(crate) struct KChunk<'a> {
    /// The tile's 8 x rows, packed: column `col` of row `i` at `col · 8 + i · 16` (`col` a
    /// multiple of 16, plus its lane), so one 16-column block of all 8 rows is 512 contiguous bytes.
    pub x: *const f32,
    pub ws: &'a [*const u8; KB_NR],
    pub dtype: DType,
    pub k_real: usize,
    pub begin: usize,
    pub end: usize,
    /// Columns per segment: `begin` inside a segment resumes its lanes from the state, and an
    /// `end` inside one leaves them there.
    pub seg_len: usize,
    /// This tile's `KB_STATE_FLOATS` floats.
    pub state: *mut f32,
    /// Weight rows of the tile that runs next over the same columns (to prefetch), or none.
    pub prefetch: Option<&'a [*const u8; KB_NR]>,
}

/// Where [`fold_blend`] leaves output `o`: after its last level, 128-bit lane `q` holds outputs
/// `p, 8 + p, 4 + p, 12 + p` with `p = [0, 2, 1, 3][q]`.
const fn fold_blend_index() -> [i32; 16] {
    let perm = [0, 2, 1, 3];
    let base = [0, 8, 4, 12];
    let mut idx = [0i32; 16];
    let mut q = 0;
    while q < 4 {
        let mut slot = 0;
        while slot < 4 {
            idx[base[slot] + perm[q]] = (4 * q + slot) as i32;
            slot += 1;
        }
        q += 1;
    }
    idx
}
const FOLD_BLEND_INDEX: [i32; 16] = fold_blend_index();

/// [`fold16`] with half the shuffles: each level pairs two vectors as one masked blend (lanes
/// that stay) plus one swapped copy (lanes that move), so a pair costs one shuffle where
/// `fold16` spends two cross-lane permutes. Per output the adds are exactly the lane tree's —
/// `(l, l+8)`, `(l, l+4)`, `(l, l+2)`, `(l, l+1)` — with operands in either order (an IEEE add
/// is commutative). `N` is 16, or 8 (lanes 8–15 of the result then repeat lanes 0–7).
#[inline(always)]
unsafe fn fold_blend<const N: usize>(acc: &mut [__m512; N]) -> __m512 {
    // (l, l+8): [a0..7, b8..15] + [a8..15, b0..7].
    for i in 0..N / 2 {
        let (a, b) = (acc[2 * i], acc[2 * i + 1]);
        acc[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xff00, a, b), _mm512_shuffle_f32x4::<0b01_00_11_10>(a, b));
    }
    // (l, l+4): 128-bit quarters; [a.q0, b.q1, a.q2, b.q3] + swapped [b.q0, a.q1, b.q2, a.q3].
    for i in 0..N / 4 {
        let (a, b) = (acc[2 * i], acc[2 * i + 1]);
        let swapped = _mm512_shuffle_f32x4::<0b10_11_00_01>(
            _mm512_mask_blend_ps(0xf0f0, b, a),
            _mm512_mask_blend_ps(0xf0f0, b, a),
        );
        acc[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xf0f0, a, b), swapped);
    }
    // (l, l+2): 64-bit halves of each quarter, [a0, a1, b2, b3] + [a2, a3, b0, b1].
    for i in 0..(N / 8).max(1) {
        let (a, b) = (acc[2 * i], acc[(2 * i + 1).min(N / 4 - 1)]);
        acc[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xcccc, a, b), _mm512_shuffle_ps::<0b01_00_11_10>(a, b));
    }
    // (l, l+1): [a0, b1, a2, b3] + swapped [a1, b0, a3, b2].
    let (a, b) = (acc[0], acc[(N / 16).min(1)]);
    let swapped = _mm512_permute_ps::<0b10_11_00_01>(_mm512_mask_blend_ps(0xaaaa, b, a));
    let r = _mm512_add_ps(_mm512_mask_blend_ps(0xaaaa, a, b), swapped);
    _mm512_permutexvar_ps(_mm512_loadu_si512(FOLD_BLEND_INDEX.as_ptr() as *const _), r)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn kchunk512<L: Load512>(c: &KChunk<'_>) {
    // The row pointers by value: behind the reference they were reloaded every iteration.
    let (x, ws) = (c.x, *c.ws);
    let lanes = c.state;
    let full_end = c.k_real / 16 * 16;
    let (block_len, block_bytes) = (c.dtype.block_len(), c.dtype.block_bytes());
    let stack = c.state.add(KB_ACC_FLOATS);
    // One piece per segment the chunk touches: the lanes of a piece start at +0.0 where its
    // segment starts (else they resume from the state), and a piece that ends its segment folds
    // and joins the tree stack. The next piece's FMAs do not depend on the fold, so they overlap.
    let mut begin = c.begin;
    while begin < c.end {
        let seg = begin / c.seg_len;
        let seg_end = (seg + 1) * c.seg_len;
        let end = seg_end.min(c.end);
        // Flat and indexed by constants only, so that every accumulator lives in a register.
        let mut acc = [_mm512_setzero_ps(); KB_OUTPUTS];
        if !begin.is_multiple_of(c.seg_len) {
            for o in 0..KB_OUTPUTS {
                acc[o] = _mm512_loadu_ps(lanes.add(o * 16));
            }
        }
        // Same per-block order as `tile512`: lane l of every accumulator takes column col + l,
        // block after block in increasing col (a block type decodes 32 weights at once, in
        // order). One loop body, no closure: a closure would not inherit this function's target
        // features.
        let split = full_end.clamp(begin, end);
        let mut col = begin;
        while col < end {
            if let Some(next) = c.prefetch {
                for &row in next {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(col / block_len * block_bytes) as *const i8);
                }
            }
            let pair = L::PAIRED && col < split && col.is_multiple_of(32) && col + 32 <= split;
            if pair {
                let mut w = [(_mm512_setzero_ps(), _mm512_setzero_ps()); KB_NR];
                for j in 0..KB_NR {
                    w[j] = L::pair(ws[j], col);
                }
                for i in 0..KB_MR {
                    let x0 = _mm512_loadu_ps(x.add(col * KB_MR + i * 16));
                    let x1 = _mm512_loadu_ps(x.add((col + 16) * KB_MR + i * 16));
                    for j in 0..KB_NR {
                        acc[i * KB_NR + j] = _mm512_fmadd_ps(x0, w[j].0, acc[i * KB_NR + j]);
                        acc[i * KB_NR + j] = _mm512_fmadd_ps(x1, w[j].1, acc[i * KB_NR + j]);
                    }
                }
                col += 32;
                continue;
            }
            let mut w = [_mm512_setzero_ps(); KB_NR];
            if col < split {
                for j in 0..KB_NR {
                    w[j] = L::full(ws[j], col);
                }
            } else {
                let rem = c.k_real.saturating_sub(col).min(16);
                let mask = ((1u32 << rem) - 1) as __mmask16;
                for j in 0..KB_NR {
                    w[j] = L::masked(ws[j], col, mask);
                }
            }
            for i in 0..KB_MR {
                let xv = _mm512_loadu_ps(x.add(col * KB_MR + i * 16));
                for j in 0..KB_NR {
                    acc[i * KB_NR + j] = _mm512_fmadd_ps(xv, w[j], acc[i * KB_NR + j]);
                }
            }
            col += 16;
        }
        if end < seg_end {
            // The chunk stops inside this segment (only a long segment's piece does).
            for o in 0..KB_OUTPUTS {
                _mm512_storeu_ps(lanes.add(o * 16), acc[o]);
            }
            return;
        }
        let mut first16 = [_mm512_setzero_ps(); 16];
        let mut last8 = [_mm512_setzero_ps(); 8];
        first16.copy_from_slice(&acc[..16]);
        last8.copy_from_slice(&acc[16..]);
        // The segment tree as in `tile512`, its stack in the state (one entry of the tile's two
        // folded vectors per level).
        let mut folded = [fold_blend(&mut first16), fold_blend(&mut last8)];
        push_results::<2>(stack, seg, &mut folded, true);
        begin = end;
    }
}

/// # Safety
/// AVX-512 F/BW/VL must be available; `c` must describe valid rows and state (see [`KChunk`]).
pub(crate) unsafe fn kchunk_avx512(c: &KChunk<'_>) {
    match c.dtype {
        DType::F32 => kchunk512::<F32x16>(c),
        DType::Bf16 => kchunk512::<Bf16x16>(c),
        DType::F16 => kchunk512::<F16x16>(c),
        DType::Q8_0 => kchunk512::<Q8_0x16>(c),
        DType::Q4_0 => kchunk512::<Q4_0x16>(c),
        DType::Q4_1 => kchunk512::<Q4_1x16>(c),
    }
}

// ---------------------------------------------------------------- AVX-512, lane-major

/// Outputs (weight rows) of a lane-major tile: 3 vectors of 16.
pub(crate) const LM_NR: usize = 48;
const LM_VECS: usize = LM_NR / 16;
/// Accumulators of a lane-major tile: `R` rows × `G` lanes at once × 3 vectors, plus the row
/// broadcasts and one weight vector, of the 32 zmm registers.
const LM_ACC: usize = 24;
/// Levels of a tile's state: the stack of lane groups (4) and the segment-tree stack (7, S ≤ 64),
/// each level one set of the tile's results (`R` rows × 48 outputs).
const LM_LEVELS: usize = 11;
/// Floats of the state of `rows` rows of tiles (of any `R`).
pub(crate) const fn lm_state_floats(rows: usize) -> usize {
    rows * LM_LEVELS * LM_NR
}

/// Rows of a lane-major tile and lanes it runs at once. 4 rows × 2 lanes load 8 broadcasts and 6
/// weight vectors per 24 FMAs where 2 rows × 4 lanes load 8 and 12: 3–8 % faster on Emerald
/// Rapids (BENCHMARKS §22.1), whose two 512-bit FMA ports leave little room beside the loads.
/// Fewer lanes at once store more of the lane tree (8 rows × 1 lane: its stores took ~14 % of
/// the time on Zen 4, BENCHMARKS §19.1, and it ran ~20 % slower than 4 × 2 in §22.1).
const LM_ROWS: usize = 4;
const LM_GROUP: usize = 2;

/// The longest segment lane-major tiles take: a group's panel, `seg_len / 16 × 2 × 48` floats
/// (15 KiB), then leaves room in a 48 KiB L1 for the tiles' x lines and state. Qwen2.5's down
/// projection (608-column segments) takes them: on Emerald Rapids 25–30 % faster than the
/// K-blocked tiles at M = 512 (BENCHMARKS §22.1; on Zen 4's 32 KiB L1 they measured no faster,
/// §19.1). Longer segments keep the K-blocked tiles.
pub(crate) const LM_MAX_SEG: usize = 640;

/// `g` with its lowest `bits` bits reversed: the order lane groups run in, so that groups `2k`
/// and `2k + 1` of that order are the lane tree's pairs at the level above a group's own, runs of
/// four those of the next level, and so on — the tree then folds with a binary-carry stack, like
/// the segment tree. Bit reversal is its own inverse.
const fn bit_reverse(g: usize, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        g.reverse_bits() >> (usize::BITS - bits)
    }
}

/// One task's rows of lane-major tiles over the whole segment range.
pub(crate) struct LaneBlock<'a> {
    /// The packed x of the block's first row (a multiple of 8), 8-row packs `8 · padded` floats
    /// apart, each lane-major: element `e = s · seg_len + 16t + l` of row `i` at
    /// `((s · 16 + l) · steps + t) · 8 + i`.
    pub x: *const f32,
    pub padded: usize,
    /// Rows of the block (a multiple of 8).
    pub rows: usize,
    /// The panel of [`pack_lanes_avx512`] (64-byte aligned).
    pub panel: *const f32,
    pub seg_len: usize,
    pub count: usize,
    /// [`lm_state_floats`]`(rows)` floats of this thread's, 64-byte aligned.
    pub state: *mut f32,
    /// The block's first output row from its first column; rows `n` floats apart, `cols` (≤ 48)
    /// columns of each written.
    pub y: *mut f32,
    pub n: usize,
    pub cols: usize,
    /// Bytes to fetch into L2 while the block computes (weights that will be packed next).
    pub prefetch: &'a [u8],
}

/// 16 vectors (row `j` = 16 consecutive weights of output `j`) transposed in place: vector `l`
/// then holds element `l` of every output, output `j` in lane `j`.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    // Pairs of rows interleaved: per 128-bit quarter q, a[2i] = (r2i, r2i+1) elements 4q, 4q+1.
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Quads: b[4i + e] holds, per quarter q, element 4q + e of rows 4i..4i + 4.
    let mut b = [_mm512_setzero_ps(); 16];
    let pd = |v: __m512| _mm512_castps_pd(v);
    for i in 0..4 {
        b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
        b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
        b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
        b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
    }
    // Quarters: element 4q + e of all 16 rows is quarter q of b[e], b[4 + e], b[8 + e], b[12 + e].
    for e in 0..4 {
        let d0 = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[e], b[4 + e]);
        let d1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(b[e], b[4 + e]);
        let d2 = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[8 + e], b[12 + e]);
        let d3 = _mm512_shuffle_f32x4::<0b11_01_11_01>(b[8 + e], b[12 + e]);
        r[e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(d0, d2);
        r[4 + e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(d1, d3);
        r[8 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(d0, d2);
        r[12 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(d1, d3);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_lanes512<L: Load512, const G: usize>(
    ws: &[*const u8; LM_NR],
    k_real: usize,
    seg_len: usize,
    count: usize,
    panel: *mut f32,
) {
    let (groups, group_bits) = (16 / G, (16 / G).trailing_zeros());
    let steps = seg_len / 16;
    let full_end = k_real / 16 * 16;
    // Where lane `l` of a 16-column block lands from the block's (segment, step) base: its group
    // (bit-reversed), then its place in the group. A table, so the transposed block is stored
    // straight from its registers.
    let lane_at: [usize; 16] = std::array::from_fn(|lane| {
        let (g, q) = (lane % groups, lane / groups);
        (bit_reverse(g, group_bits) * steps * G + q) * LM_NR
    });
    for block in 0..count * steps {
        let (col, seg, step) = (block * 16, block / steps, block % steps);
        let rem = k_real.saturating_sub(col).min(16);
        let mask = ((1u32 << rem) - 1) as __mmask16;
        let base = panel.add((seg * groups * steps + step) * G * LM_NR);
        for jv in 0..LM_VECS {
            let mut r = [_mm512_setzero_ps(); 16];
            for j in 0..16 {
                let row = ws[jv * 16 + j];
                // 48 rows side by side are more streams than the hardware prefetcher follows:
                // each row's line four blocks ahead is fetched by hand (never faults).
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(L::byte_offset(col + 64)) as *const i8);
                r[j] = if col < full_end { L::full(row, col) } else { L::masked(row, col, mask) };
            }
            transpose16(&mut r);
            for (lane, v) in r.iter().enumerate() {
                _mm512_store_ps(base.add(lane_at[lane] + jv * 16), *v);
            }
        }
    }
}

/// Packs weight rows `ws` (clamped to W by the caller) for [`lanes_avx512`]: every weight widened
/// to f32 (a block type by the [`crate::quant`] formula, its rows whole blocks), laid out in the
/// order the tiles read them — segment by segment, lane group by lane group in bit-reversed
/// order, step by step, the group's lanes in turn — with the 48 outputs of one (lane, column) in
/// a row, and zeros past `k_real`. `panel` holds `count × seg_len × 48`
/// floats, 64-byte aligned.
///
/// # Safety
/// AVX-512 F/BW/VL must be available; `ws` are weight rows of `k_real` weights of `dtype`.
pub(crate) unsafe fn pack_lanes_avx512(
    dtype: DType,
    ws: &[*const u8; LM_NR],
    k_real: usize,
    seg_len: usize,
    count: usize,
    panel: *mut f32,
) {
    match dtype {
        DType::F32 => pack_lanes512::<F32x16, LM_GROUP>(ws, k_real, seg_len, count, panel),
        DType::Bf16 => pack_lanes512::<Bf16x16, LM_GROUP>(ws, k_real, seg_len, count, panel),
        DType::F16 => pack_lanes512::<F16x16, LM_GROUP>(ws, k_real, seg_len, count, panel),
        DType::Q8_0 => pack_lanes512::<Q8_0x16, LM_GROUP>(ws, k_real, seg_len, count, panel),
        DType::Q4_0 => pack_lanes512::<Q4_0x16, LM_GROUP>(ws, k_real, seg_len, count, panel),
        DType::Q4_1 => pack_lanes512::<Q4_1x16, LM_GROUP>(ws, k_real, seg_len, count, panel),
    }
}

/// 8 rows of x (`rows`: 8 × `k_real` floats) packed lane-major for [`lanes512`] into `dst`
/// (`8 × count × seg_len` floats): element `e = s · seg_len + 16t + l` of row `i` at
/// `((s · 16 + l) · steps + t) · 8 + i`, zeros past `k_real` — one 16-column block of the 8 rows
/// transposed at a time.
///
/// # Safety
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack_x_lanes_avx512(rows: &[f32], k_real: usize, seg_len: usize, count: usize, dst: &mut [f32]) {
    assert!(rows.len() == 8 * k_real && dst.len() == 8 * count * seg_len);
    let steps = seg_len / 16;
    let (src, out) = (rows.as_ptr(), dst.as_mut_ptr());
    for block in 0..count * steps {
        let (col, seg, step) = (block * 16, block / steps, block % steps);
        let rem = k_real.saturating_sub(col).min(16);
        let mask = ((1u32 << rem) - 1) as __mmask16;
        // Rows 8..16 stay zero: only the low 8 lanes of each transposed vector are stored.
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().take(8).enumerate() {
            *v = _mm512_maskz_loadu_ps(mask, src.wrapping_add(i * k_real + col));
        }
        transpose16(&mut r);
        for (lane, v) in r.iter().enumerate() {
            _mm256_storeu_ps(out.add(((seg * 16 + lane) * steps + step) * 8), _mm512_castps512_ps256(*v));
        }
    }
}

/// Pushes the `index`-th of a run of tile results (`acc[..OUT]`) onto the binary-carry stack at
/// `stack` (one entry of `OUT` vectors per level): before it the stack holds popcount(`index`)
/// finished subtrees, and each trailing one-bit of `index + 1` adds the one below it, left operand
/// first, as [`SegmentTree512::push`] does in registers. The result stays in `acc`; it is stored
/// only if `keep`. The K-blocked tiles' segment tree and the lane-major tiles' lane groups and
/// segment tree all run on it.
#[inline(always)]
unsafe fn push_results<const OUT: usize>(stack: *mut f32, index: usize, acc: &mut [__m512], keep: bool) {
    let mut depth = index.count_ones() as usize;
    let mut done = index + 1;
    while done & 1 == 0 {
        depth -= 1;
        let entry = stack.add(depth * OUT * 16);
        for o in 0..OUT {
            acc[o] = _mm512_add_ps(_mm512_loadu_ps(entry.add(o * 16)), acc[o]);
        }
        done >>= 1;
    }
    if keep {
        let entry = stack.add(depth * OUT * 16);
        for o in 0..OUT {
            _mm512_storeu_ps(entry.add(o * 16), acc[o]);
        }
    }
}

/// The weight lines a [`LaneBlock`] fetches into L2 while it computes, a few per tile.
struct L2Prefetch {
    next_line: usize,
    lines: usize,
    per_tile: usize,
}

/// Group `GK` (in run order) of segment `seg` for every tile of the block: its lanes' chains,
/// folded in registers, then pushed on the tile's lane stack. `GK` is a constant, so the push's
/// depth and carries are known: straight-line adds and stores, no loop on the index's bits
/// (3–5 % at Qwen2.5's 112-column segments, BENCHMARKS §24.1).
#[inline(always)]
unsafe fn lane_group<const R: usize, const G: usize, const OUT: usize, const GK: usize>(
    b: &LaneBlock<'_>,
    seg: usize,
    pf: &mut L2Prefetch,
) {
    let (groups, group_bits) = (16 / G, (16 / G).trailing_zeros());
    let state_floats = LM_LEVELS * OUT * 16;
    let steps = b.seg_len / 16;
    let tiles = b.rows / R;
    let xrow = |r: usize| b.x.add(r / 8 * 8 * b.padded + r % 8);
    let g = bit_reverse(GK, group_bits);
    let panel = b.panel.add((seg * groups + GK) * steps * G * LM_NR);
    let lanes_of = |tile: usize| xrow(tile * R).add((seg * 16 + g) * steps * 8);
    // The first tile of the next group (or segment): the last tile fetches its x lines, so no
    // group starts on a miss.
    let next_group = if GK + 1 < groups {
        xrow(0).add((seg * 16 + bit_reverse(GK + 1, group_bits)) * steps * 8)
    } else {
        xrow(0).add((seg + 1).min(b.count - 1) * 16 * steps * 8)
    };
    for tile in 0..tiles {
        for _ in 0..pf.per_tile {
            if pf.next_line < pf.lines {
                _mm_prefetch::<_MM_HINT_T1>(b.prefetch.as_ptr().add(pf.next_line * 64) as *const i8);
                pf.next_line += 1;
            }
        }
        if GK + 2 == groups && seg + 1 == b.count {
            prefetch_out::<R>(b, tile);
        }
        let x = lanes_of(tile);
        // The next tile's x lines, fetched while this one computes: a tile reads 16 or 32
        // bytes of each, too few in a row for the hardware prefetcher.
        let next = if tile + 1 < tiles { lanes_of(tile + 1) } else { next_group };
        // Accumulator (q, i, j): lane g + 16/G · q, row i, outputs 16j..16j + 16.
        let mut acc = [_mm512_setzero_ps(); LM_ACC];
        let (mut w, mut xp) = (panel, x);
        for step in 0..steps {
            for q in 0..G {
                let run = q * groups * steps * 8;
                _mm_prefetch::<_MM_HINT_T0>(next.add(run + step * 8) as *const i8);
                let lane = xp.add(run);
                let xb: [__m512; R] = std::array::from_fn(|i| _mm512_set1_ps(*lane.add(i)));
                for j in 0..LM_VECS {
                    let wv = _mm512_load_ps(w.add(q * LM_NR + j * 16));
                    for i in 0..R {
                        let a = (q * R + i) * LM_VECS + j;
                        acc[a] = _mm512_fmadd_ps(xb[i], wv, acc[a]);
                    }
                }
            }
            w = w.add(G * LM_NR);
            xp = xp.add(8);
        }
        // The group's own levels of the lane tree: with `G` = 4, (q, q + 2) is
        // (l, l + 8), then (q, q + 1) is (l, l + 4).
        let mut half = G / 2;
        while half >= 1 {
            for q in 0..half {
                for o in 0..OUT {
                    acc[q * OUT + o] = _mm512_add_ps(acc[q * OUT + o], acc[(q + half) * OUT + o]);
                }
            }
            half /= 2;
        }
        let state = b.state.add(tile * state_floats);
        let last_group = GK + 1 == groups;
        push_results::<OUT>(state, GK, &mut acc, !last_group);
        if last_group {
            let stack = state.add(4 * OUT * 16);
            let last_seg = seg + 1 == b.count;
            push_results::<OUT>(stack, seg, &mut acc, !last_seg);
            if last_seg {
                store_total::<R, OUT>(b, tile, stack, &acc);
            }
        }
    }
}

/// Tile `tile`'s output lines, fetched for writing one group before [`store_total`] writes them:
/// a miss there would hold up the stores queued behind it.
#[inline(always)]
unsafe fn prefetch_out<const R: usize>(b: &LaneBlock<'_>, tile: usize) {
    for i in 0..R {
        let row = b.y.wrapping_add((tile * R + i) * b.n);
        let (mut line, end) = (row as usize & !63, row.wrapping_add(b.cols) as usize);
        while line < end {
            _mm_prefetch::<_MM_HINT_ET0>(line as *const i8);
            line += 64;
        }
    }
}

/// Tile `tile`'s outputs, from the last segment's result `acc` (its carries added): the segment
/// stack then holds the earlier runs of the count's binary digits, largest first, and the total
/// adds them left to right and `acc` last, as `reference::tree_reduce` adds its runs. Stored
/// straight from the registers, so no pass over the stacks follows the last group.
#[inline(always)]
unsafe fn store_total<const R: usize, const OUT: usize>(
    b: &LaneBlock<'_>,
    tile: usize,
    stack: *const f32,
    acc: &[__m512],
) {
    let earlier = b.count.count_ones() as usize - 1;
    let mask = (1u64 << b.cols) - 1;
    for i in 0..R {
        let y = b.y.add((tile * R + i) * b.n);
        for j in 0..LM_VECS {
            let o = i * LM_VECS + j;
            let mut total = acc[o];
            if earlier > 0 {
                let mut runs = _mm512_load_ps(stack.add(o * 16));
                for d in 1..earlier {
                    runs = _mm512_add_ps(runs, _mm512_load_ps(stack.add(d * OUT * 16 + o * 16)));
                }
                total = _mm512_add_ps(runs, total);
            }
            _mm512_mask_storeu_ps(y.add(j * 16), (mask >> (j * 16)) as __mmask16, total);
        }
    }
}

/// The outer-product ("lane-major") form of the contract: a zmm holds one lane of 16 outputs
/// rather than the 16 lanes of one output. Lane `l` of a segment is the chain
/// `acc = fma(x[e], w[e], acc)` over `e = l, l + 16, …` from +0.0 — for `R` rows × 48 outputs at
/// once, x broadcast, the panel's 48 weights of column `e` as 3 vectors — so each lane's chain is
/// exactly the contract's, and the lane tree is vertical adds of whole vectors: no shuffles.
/// A tile runs a group of `G` lanes (`g + 16/G · q`) at once and folds them in registers (the
/// tree's lower levels: `(l, l + 8)`, and with four lanes `(l, l + 4)`), and the groups of a
/// segment meet in a binary-carry stack (the upper levels): the stack is what costs — a store of
/// every result that waits for its sibling — and groups of `G` lanes store `G` times less than
/// single lanes would.
/// Every tile of the block runs one group before the next group starts, so that group's panel
/// (`seg_len / 16 × G × 48` floats) stays in L1 while the tiles pass; the groups of a segment
/// are unrolled ([`lane_group`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn lanes512<const R: usize, const G: usize, const OUT: usize>(b: &LaneBlock<'_>) {
    debug_assert!(R * G * LM_VECS == LM_ACC && OUT == R * LM_VECS);
    let groups = 16 / G;
    let tiles = b.rows / R;
    // The prefetch spread evenly over the tile runs.
    let lines = b.prefetch.len().div_ceil(64);
    let mut pf = L2Prefetch { next_line: 0, lines, per_tile: lines.div_ceil(b.count * groups * tiles) };
    for seg in 0..b.count {
        macro_rules! groups {
            ($($gk:literal)*) => {$(
                if $gk < groups {
                    lane_group::<R, G, OUT, $gk>(b, seg, &mut pf);
                }
            )*};
        }
        groups!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    }
}

/// One task's rows in lane-major tiles ([`lanes512`]): [`LM_ROWS`] rows × [`LM_GROUP`] lanes at
/// once.
///
/// # Safety
/// AVX-512 F/BW/VL must be available; `b` must describe valid x, panel (packed by
/// [`pack_lanes_avx512`] for the same segments), state and output rows.
pub(crate) unsafe fn lanes_avx512(b: &LaneBlock<'_>) {
    lanes512::<LM_ROWS, LM_GROUP, { LM_ROWS * LM_VECS }>(b)
}

// ---------------------------------------------------------------- AVX2

/// 16 weights as two ymm (lanes 0–7, 8–15), zero past `k_real`.
#[inline(always)]
unsafe fn load_w256(dtype: DType, row: *const u8, col: usize, k_real: usize) -> (__m256, __m256) {
    if dtype.is_quantized() {
        return load_quant256(dtype, row, col, k_real);
    }
    let rem = k_real.saturating_sub(col);
    let size = dtype.size();
    let mut tmp = [0u8; 64];
    let src = if rem >= 16 {
        row.add(col * size)
    } else {
        std::ptr::copy_nonoverlapping(row.add(col * size), tmp.as_mut_ptr(), rem * size);
        tmp.as_ptr()
    };
    match dtype {
        DType::F32 => (_mm256_loadu_ps(src as *const f32), _mm256_loadu_ps((src as *const f32).add(8))),
        DType::Bf16 => {
            let widen = |p: *const u8| {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                    p as *const __m128i,
                ))))
            };
            (widen(src), widen(src.add(16)))
        }
        DType::F16 => (
            _mm256_cvtph_ps(_mm_loadu_si128(src as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(src.add(16) as *const __m128i)),
        ),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => unreachable!("block types are loaded by load_quant256"),
    }
}

/// 16 weights of a block type as two ymm, by the [`crate::quant`] formula. `col` is a multiple of
/// 16 and rows are whole blocks: past `k_real` everything is padding.
#[inline(always)]
unsafe fn load_quant256(dtype: DType, row: *const u8, col: usize, k_real: usize) -> (__m256, __m256) {
    if col >= k_real {
        return (_mm256_setzero_ps(), _mm256_setzero_ps());
    }
    let blk = row.add(col / 32 * dtype.block_bytes());
    let half = |[w0, w1, w2, w3]: [__m256; 4]| if col.is_multiple_of(32) { (w0, w1) } else { (w2, w3) };
    match dtype {
        DType::Q8_0 => half(Q8_0x16::block256(blk)),
        DType::Q4_0 => half(Q4_0x16::block256(blk)),
        DType::Q4_1 => half(Q4_1x16::block256(blk)),
        DType::F32 | DType::Bf16 | DType::F16 => unreachable!("element types are loaded by load_w256"),
    }
}

/// A GGUF block type on AVX2: the whole block of 32 weights as four ymm (weights 0–7, 8–15,
/// 16–23, 24–31), its header widened once.
trait Quant256 {
    const BYTES: usize;
    unsafe fn block256(blk: *const u8) -> [__m256; 4];
}

/// The f16 at `p`, widened exactly into every lane of a ymm.
#[inline(always)]
unsafe fn f16_splat256(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(p as *const i16)))
}

/// 16 bytes as 32-bit lanes in two ymm (bytes 0–7, 8–15), sign- or zero-extended.
#[inline(always)]
unsafe fn bytes_to_lanes256<const SIGNED: bool>(v: __m128i) -> (__m256i, __m256i) {
    let hi = _mm_srli_si128::<8>(v);
    if SIGNED {
        (_mm256_cvtepi8_epi32(v), _mm256_cvtepi8_epi32(hi))
    } else {
        (_mm256_cvtepu8_epi32(v), _mm256_cvtepu8_epi32(hi))
    }
}

/// A 4-bit block's nibbles as bytes: (first half: low nibbles, second half: high nibbles).
#[inline(always)]
unsafe fn nibble_halves(qs: *const u8) -> (__m128i, __m128i) {
    let v = _mm_loadu_si128(qs as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    (_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16::<4>(v), mask))
}

impl Quant256 for Q8_0x16 {
    const BYTES: usize = crate::quant::Q8_0_BYTES;
    /// `f32(q) · d`.
    #[inline(always)]
    unsafe fn block256(blk: *const u8) -> [__m256; 4] {
        let d = f16_splat256(blk);
        let (a, b) = bytes_to_lanes256::<true>(_mm_loadu_si128(blk.add(2) as *const __m128i));
        let (c, e) = bytes_to_lanes256::<true>(_mm_loadu_si128(blk.add(18) as *const __m128i));
        [a, b, c, e].map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(q), d))
    }
}
impl Quant256 for Q4_0x16 {
    const BYTES: usize = crate::quant::Q4_0_BYTES;
    /// `f32(n − 8) · d`: `n − 8` is taken on the bytes, then sign-extended.
    #[inline(always)]
    unsafe fn block256(blk: *const u8) -> [__m256; 4] {
        let d = f16_splat256(blk);
        let (lo, hi) = nibble_halves(blk.add(2));
        let eight = _mm_set1_epi8(8);
        let (a, b) = bytes_to_lanes256::<true>(_mm_sub_epi8(lo, eight));
        let (c, e) = bytes_to_lanes256::<true>(_mm_sub_epi8(hi, eight));
        [a, b, c, e].map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(q), d))
    }
}
impl Quant256 for Q4_1x16 {
    const BYTES: usize = crate::quant::Q4_1_BYTES;
    /// `f32(n) · d + m` as one fma: the product `n · d` is exact, so rounding it first changes
    /// nothing.
    #[inline(always)]
    unsafe fn block256(blk: *const u8) -> [__m256; 4] {
        let (d, m) = (f16_splat256(blk), f16_splat256(blk.add(2)));
        let (lo, hi) = nibble_halves(blk.add(4));
        let (a, b) = bytes_to_lanes256::<false>(lo);
        let (c, e) = bytes_to_lanes256::<false>(hi);
        [a, b, c, e].map(|n| _mm256_fmadd_ps(_mm256_cvtepi32_ps(n), d, m))
    }
}

/// The lane tree of one output held as (lanes 0–7, lanes 8–15).
#[inline(always)]
unsafe fn lane_tree256(lo: __m256, hi: __m256) -> f32 {
    let v = _mm256_add_ps(lo, hi); // (l, l+8)
    let a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)); // (l, l+4)
    let b = _mm_add_ps(a, _mm_movehl_ps(a, a)); // (l, l+2)
    let c = _mm_add_ss(b, _mm_shuffle_ps::<1>(b, b)); // (l, l+1)
    _mm_cvtss_f32(c)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const NR: usize>(t: &Tile<'_>, out: &mut [f32; 16]) {
    let xp = t.xs[0];
    let mut sums = [[0.0f32; 64]; NR];
    for s in 0..t.count {
        let mut acc = [(_mm256_setzero_ps(), _mm256_setzero_ps()); NR];
        let start = s * t.seg_len;
        for col in (start..start + t.seg_len).step_by(16) {
            let x0 = _mm256_loadu_ps(xp.add(col));
            let x1 = _mm256_loadu_ps(xp.add(col + 8));
            for j in 0..NR {
                let (w0, w1) = load_w256(t.dtype, t.ws[j], col, t.k_real);
                acc[j] = (_mm256_fmadd_ps(x0, w0, acc[j].0), _mm256_fmadd_ps(x1, w1, acc[j].1));
            }
        }
        for j in 0..NR {
            sums[j][s] = lane_tree256(acc[j].0, acc[j].1);
        }
    }
    for j in 0..NR {
        out[j] = segment_tree_inplace(&mut sums[j][..t.count]);
    }
}

/// The AVX2 tile of a block type (one x row, four weight rows): like [`decode512`], each segment
/// is walked in whole blocks, a block cut by a segment boundary is widened once and its second
/// half carried into the next segment, and only real columns are touched.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode256<Q: Quant256>(t: &Tile<'_>, out: &mut [f32; 16]) {
    const NR: usize = 4;
    let xp = t.xs[0];
    let ws: [*const u8; NR] = std::array::from_fn(|j| t.ws[j]);
    let mut sums = [[0.0f32; 64]; NR];
    let mut carry = [(_mm256_setzero_ps(), _mm256_setzero_ps()); NR];
    for s in 0..t.count {
        let mut acc = [(_mm256_setzero_ps(), _mm256_setzero_ps()); NR];
        let start = s * t.seg_len;
        let stop = ((s + 1) * t.seg_len).min(t.k_real).max(start);
        let mut col = start;
        if col < stop && !col.is_multiple_of(32) {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(col)), _mm256_loadu_ps(xp.add(col + 8)));
            for j in 0..NR {
                acc[j] = (_mm256_fmadd_ps(x0, carry[j].0, acc[j].0), _mm256_fmadd_ps(x1, carry[j].1, acc[j].1));
            }
            col += 16;
        }
        while col + 32 <= stop {
            let x: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xp.add(col + 8 * i)));
            for j in 0..NR {
                let [w0, w1, w2, w3] = Q::block256(ws[j].add(col / 32 * Q::BYTES));
                acc[j] = (
                    _mm256_fmadd_ps(x[2], w2, _mm256_fmadd_ps(x[0], w0, acc[j].0)),
                    _mm256_fmadd_ps(x[3], w3, _mm256_fmadd_ps(x[1], w1, acc[j].1)),
                );
            }
            col += 32;
        }
        if col < stop {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(col)), _mm256_loadu_ps(xp.add(col + 8)));
            for j in 0..NR {
                let [w0, w1, w2, w3] = Q::block256(ws[j].add(col / 32 * Q::BYTES));
                acc[j] = (_mm256_fmadd_ps(x0, w0, acc[j].0), _mm256_fmadd_ps(x1, w1, acc[j].1));
                carry[j] = (w2, w3);
            }
        }
        for j in 0..NR {
            sums[j][s] = lane_tree256(acc[j].0, acc[j].1);
        }
    }
    for j in 0..NR {
        out[j] = segment_tree_inplace(&mut sums[j][..t.count]);
    }
}

/// # Safety
/// AVX2, FMA and F16C must be available; `t` must describe valid rows (see [`Tile`]).
pub(crate) unsafe fn tile_avx2(t: &Tile<'_>, out: &mut [f32; 16]) {
    match (t.xs.len(), t.ws.len()) {
        (1, 4) if t.dtype == DType::Q8_0 => decode256::<Q8_0x16>(t, out),
        (1, 4) if t.dtype == DType::Q4_0 => decode256::<Q4_0x16>(t, out),
        (1, 4) if t.dtype == DType::Q4_1 => decode256::<Q4_1x16>(t, out),
        (1, 4) => tile256::<4>(t, out),
        other => unreachable!("no AVX2 tile of shape {other:?}"),
    }
}

// ---------------------------------------------------------------- vector exp (AVX-512)

/// 16 × the contract's `math::exp`, operation for operation: the same rounding to nearest for
/// `n`, the same two fused reduction steps (`fnmadd` = `fma(−n, c, x)`), the same Horner fma
/// chain, the same two-step scaling, and the same edge cases (NaN, overflow, underflow).
#[inline(always)]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(LOG2E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // In range, n is an integer in [−150, 128]: the conversion is exact.
    let ni = _mm512_cvtps_epi32(n);
    let n1 = _mm512_srai_epi32::<1>(ni);
    let n2 = _mm512_sub_epi32(ni, n1);
    let bias = _mm512_set1_epi32(127);
    let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n1, bias)));
    let s2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n2, bias)));
    let mut y = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(EXP_MAX));
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_MIN));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    y = _mm512_mask_blend_ps(over, y, _mm512_set1_ps(f32::INFINITY));
    y = _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
    _mm512_mask_blend_ps(nan, y, x)
}

/// `segment_exp_lanes` on AVX-512: lane `l` of the accumulator is the contract's lane `l`.
/// Lanes past the end load −inf, whose exp adds an exact +0.0 to a non-negative sum.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn segment_exp_lanes_avx512(xs: &[f32], max: f32) -> [f32; LANES] {
    let m = _mm512_set1_ps(max);
    let mut acc = _mm512_setzero_ps();
    for chunk in xs.chunks(16) {
        let mask: __mmask16 = if chunk.len() == 16 { 0xffff } else { ((1u32 << chunk.len()) - 1) as __mmask16 };
        let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, chunk.as_ptr());
        acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(v, m)));
    }
    let mut out = [0.0f32; LANES];
    _mm512_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// `square_lanes` (the CPU ops' sum of squares of `x[lo..hi]`) on AVX-512: lane `l` of the
/// accumulator is the contract's lane `l` (elements `e` with `e % 16 == l`), one fma chain per
/// lane in element order; lanes outside `lo..hi` are masked, neither loaded nor changed.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn square_lanes_avx512(x: &[f32], lo: usize, hi: usize) -> [f32; LANES] {
    debug_assert!(lo <= hi && hi <= x.len());
    let mut acc = _mm512_setzero_ps();
    let mut block = lo / 16 * 16;
    while block < hi {
        let (first, end) = (lo.saturating_sub(block), (hi - block).min(16));
        let mask = (((1u32 << end) - 1) & !((1u32 << first) - 1)) as __mmask16;
        let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(block));
        acc = _mm512_mask3_fmadd_ps(v, v, acc, mask);
        block += 16;
    }
    let mut out = [0.0f32; LANES];
    _mm512_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// `silu(g) · u` on AVX-512, 16 at a time (`g / (1 + exp(−g))` with IEEE division), scalar tail.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let g = _mm512_loadu_ps(gate.as_ptr().add(i));
        let u = _mm512_loadu_ps(up.as_ptr().add(i));
        let neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(i32::MIN)));
        let s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(neg)));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(s, u));
    }
    for i in n..out.len() {
        out[i] = crate::math::silu(gate[i]) * up[i];
    }
}

// ---------------------------------------------------------------- attention (AVX-512)

/// Lanes of head-dimension block `b` that are real (the last block of a `d` not a multiple of 16
/// is masked: zeros in, nothing out).
#[inline(always)]
fn dim_mask(d: usize, b: usize) -> __mmask16 {
    let rem = (d - b * 16).min(16);
    ((1u32 << rem) - 1) as __mmask16
}

/// Largest head_dim of the vector attention (8 zmm per running output); larger ones stay scalar.
pub(crate) const ATTN_MAX_DIM: usize = 128;
/// Largest head_dim at which two or three query heads run side by side
/// ([`attention_heads_avx512`] with `H = 2` or `3`): their queries and running outputs then fit
/// in registers.
pub(crate) const ATTN_PAIR_MAX_DIM: usize = 64;

/// The keys that one query row's heads attend to, and where to read them.
pub(crate) struct AttnKeys<'a> {
    /// `keys[kp]`: the cache offset of key `kp`'s head 0. The first `attended` are the keys the
    /// heads attend to; the rest (the row's later chunks, which another call runs next, most often
    /// on this thread) are only prefetched, with `cold`.
    pub keys: &'a [usize],
    pub attended: usize,
    pub kv_head: usize,
    pub k_cache: &'a [f32],
    pub v_cache: &'a [f32],
    pub kv_chunk: usize,
    pub scale: f32,
    /// Whether the keys are likely out of cache (few query rows, as at decode): the kernel then
    /// prefetches them ahead of use, into the next chunks too.
    pub cold: bool,
    /// This KV head's keys in lanes and values in rows ([`transpose_chunk_avx512`]; chunk `c` at
    /// `c ·` [`lane_chunk_floats`]), where a prefill's many rows share them: the chunks then take
    /// [`attention_chunk_lanes`]. Only with `head_dim ≤ ATTN_PAIR_MAX_DIM`.
    pub lanes: Option<&'a [f32]>,
}

/// How many keys ahead a cold attention pass asks for keys (in the score phase) and values (in
/// the value phase), into L2: a key's vector is 4 lines at head_dim 64, and 16–32 keys ahead keep
/// ~100 lines in flight, more than L1's miss buffers hold. The cache's slots stride `n_kv_heads ·
/// head_dim` floats, so the hardware prefetchers, which stop at 4 KiB boundaries, lose the stream
/// every few keys. Prefetching at 16–32 keys' distance made SmolLM2's 1-thread cold-decode bench
/// row ~20 % cheaper, and 12 to 40 keys price the same (BENCHMARKS §18.1). Each phase asks for
/// what it reads itself: values asked for beside the keys, a whole chunk before their use, doubled
/// the lines in flight while the score phase waited on its keys (§19.2: the value-phase prefetch
/// took the cold rows ~8 % lower).
const ATTN_PREFETCH_KEYS: usize = 24;

/// One chunk of keys (the first `len` of `keys`: the cache offsets of its keys' head 0; the rest
/// follow it in the row and are only prefetched, with `COLD`) for `H` query heads (1, or
/// 2 or 3 that read the same KV head — grouped-query attention), `16 / H` keys at a time (with
/// three heads lane 15 of a fold is unused): each key's score is one 16-lane fma chain over
/// head_dim and the lane tree of [`fold_blend`] (the 16 heads × keys trees side by side), `exp` is
/// [`exp16`] (the contract's exp, lane for lane), and the sums that the contract orders by
/// position — `l_c` and every `o_c` dimension — run key after key in increasing position. With two
/// or three heads each key and value vector is loaded once for all, and their independent `o_c`
/// chains interleave; per head the operations and their order do not change, so neither do the
/// bits. Returns each head's `(m_c, l_c, o_c)`.
#[inline(always)]
unsafe fn attention_chunk<const H: usize, const B: usize, const COLD: bool>(
    q: [[__m512; B]; H],
    (keys, len): (&[usize], usize),
    (kp, vp): (*const f32, *const f32),
    d: usize,
    scale: f32,
    scores: &mut [f32],
) -> ([f32; H], [f32; H], [[__m512; B]; H]) {
    // Keys per fold: head h's score of the group's key i comes out in lane h · per + i.
    let per = 16 / H;
    // Each group's 16 scores stay as the fold left them (`scores[g · 16 ..]`, lane h · per + i),
    // and the chunk maximum runs lane-wise beside them: `max` is exact, so any order gives the
    // contract's `m_c` (NaN scores are skipped, as `f32::max` skips them; the sign of a zero
    // maximum cannot change a bit, since m_c only enters through `exp` of a difference).
    let (upcoming, keys) = (keys, &keys[..len]);
    let mut m_run = _mm512_set1_ps(f32::NEG_INFINITY);
    for (g, group) in keys.chunks(per).enumerate() {
        // Keys `ATTN_PREFETCH_KEYS` ahead of this group (a chunk's first group asks for the
        // whole distance), so the misses of a cold KV cache (at decode the weights' stream evicts
        // it) overlap the arithmetic. Only where few rows run: a prefill's keys are hot, and
        // there the prefetches cost ~10 % of attention.
        if COLD {
            let lo = if g == 0 { 0 } else { g * per + ATTN_PREFETCH_KEYS };
            let hi = ((g + 1) * per + ATTN_PREFETCH_KEYS).min(upcoming.len());
            for &at in upcoming.get(lo..hi).unwrap_or_default() {
                for b in 0..B {
                    _mm_prefetch::<_MM_HINT_T1>(kp.add(at + b * 16) as *const i8);
                }
            }
        }
        // Every lane of the fold is computed (a short group repeats its last key; those lanes
        // are never read), so that the loops unroll and the accumulators stay in registers.
        let mut acc = [_mm512_setzero_ps(); 16];
        for i in 0..per {
            let at = group[i.min(group.len() - 1)];
            for b in 0..B {
                let kv = _mm512_maskz_loadu_ps(dim_mask(d, b), kp.add(at + b * 16));
                for h in 0..H {
                    acc[h * per + i] = _mm512_fmadd_ps(q[h][b], kv, acc[h * per + i]);
                }
            }
        }
        let s = _mm512_mul_ps(fold_blend(&mut acc), _mm512_set1_ps(scale));
        _mm512_storeu_ps(scores.as_mut_ptr().add(g * 16), s);
        let real = (1u32 << group.len()) - 1;
        let lanes = (0..H).fold(0u32, |m, h| m | real << (h * per)) as __mmask16;
        let keep = lanes & _mm512_cmp_ps_mask::<_CMP_ORD_Q>(s, s);
        m_run = _mm512_mask_max_ps(m_run, keep, m_run, s);
    }
    let mut m_c = [f32::NEG_INFINITY; H];
    let mut m_lanes = [0.0f32; 16];
    _mm512_storeu_ps(m_lanes.as_mut_ptr(), m_run);
    for h in 0..H {
        m_c[h] = m_lanes[h * per..(h + 1) * per].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        m_lanes[h * per..(h + 1) * per].fill(m_c[h]);
    }
    let m_lanes = _mm512_loadu_ps(m_lanes.as_ptr());
    let mut l_c = [0.0f32; H];
    let mut o_c = [[_mm512_setzero_ps(); B]; H];
    // Values `ATTN_PREFETCH_KEYS` ahead, as the keys above: the first ones now, then one key's
    // per key.
    if COLD {
        for &at in upcoming.get(..ATTN_PREFETCH_KEYS.min(upcoming.len())).unwrap_or_default() {
            for b in 0..B {
                _mm_prefetch::<_MM_HINT_T1>(vp.add(at + b * 16) as *const i8);
            }
        }
    }
    for (g, group) in keys.chunks(per).enumerate() {
        let mut tmp = [0.0f32; 16];
        let pr = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores.as_ptr().add(g * 16)), m_lanes));
        _mm512_storeu_ps(tmp.as_mut_ptr(), pr);
        for (i, &at) in group.iter().enumerate() {
            if COLD {
                if let Some(&ahead) = upcoming.get(g * per + i + ATTN_PREFETCH_KEYS) {
                    for b in 0..B {
                        _mm_prefetch::<_MM_HINT_T1>(vp.add(ahead + b * 16) as *const i8);
                    }
                }
            }
            let mut pv = [_mm512_setzero_ps(); H];
            for h in 0..H {
                l_c[h] += tmp[h * per + i];
                pv[h] = _mm512_set1_ps(tmp[h * per + i]);
            }
            for b in 0..B {
                let v = _mm512_maskz_loadu_ps(dim_mask(d, b), vp.add(at + b * 16));
                for h in 0..H {
                    o_c[h][b] = _mm512_fmadd_ps(pv[h], v, o_c[h][b]);
                }
            }
        }
    }
    (m_c, l_c, o_c)
}

/// Floats of one chunk of keys in lanes: `⌈kv_chunk / 16⌉` blocks of 16 keys, each `⌈d / 16⌉ · 16`
/// vectors (element `e` of the block's keys, key `j` in lane `j`; padding elements and keys zero).
fn lane_key_floats(kv_chunk: usize, d: usize) -> usize {
    kv_chunk.div_ceil(16) * d.div_ceil(16) * 16 * 16
}

/// Floats of one chunk in lanes: its keys in lanes ([`lane_key_floats`]), then its values in rows
/// (`kv_chunk · d`, key `j`'s at `j · d`).
pub(crate) fn lane_chunk_floats(kv_chunk: usize, d: usize) -> usize {
    lane_key_floats(kv_chunk, d) + kv_chunk * d
}

/// One chunk of keys (cache offsets of their head 0, at most `kv_chunk`) of KV head `kv_head`
/// transposed into lanes at `dst` ([`lane_chunk_floats`] floats): block `j / 16` of key `j`,
/// vector `e` (element `e`), lane `j % 16`, padding lanes and elements zero; then their values
/// one after another. The values' copy is read by every row and head of a prefill in turn: in
/// the cache a KV head's values lie `n_kv_heads · d` floats apart, so a chunk's values use only
/// some of L1's sets and evict each other (and the keys) while rows of a block take turns on it.
///
/// # Safety
/// AVX-512 F/BW/VL must be available; `d ≤ ATTN_MAX_DIM`; `dst` holds the chunk's floats
/// (`keys.len() ≤ kv_chunk`); every `keys[j] + kv_head·d + d` lies inside both caches.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn transpose_chunk_avx512(
    keys: &[usize],
    (k_cache, v_cache): (&[f32], &[f32]),
    (kv_head, d, kv_chunk): (usize, usize, usize),
    dst: &mut [f32],
) {
    let (key_floats, vp) = (lane_key_floats(kv_chunk, d), v_cache.as_ptr().add(kv_head * d));
    for (j, &at) in keys.iter().enumerate() {
        std::ptr::copy_nonoverlapping(vp.add(at), dst.as_mut_ptr().add(key_floats + j * d), d);
    }
    let padded = d.div_ceil(16) * 16;
    let kp = k_cache.as_ptr().add(kv_head * d);
    for (blk, block) in keys.chunks(16).enumerate() {
        let out = dst.as_mut_ptr().add(blk * padded * 16);
        for b in 0..padded / 16 {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, &at) in block.iter().enumerate() {
                r[j] = _mm512_maskz_loadu_ps(dim_mask(d, b), kp.add(at + b * 16));
            }
            transpose16(&mut r);
            for (l, v) in r.iter().enumerate() {
                _mm512_storeu_ps(out.add((b * 16 + l) * 16), *v);
            }
        }
    }
}

/// Lane `l`'s score chains for `H` heads over a block of 16 keys in lanes (`kb`): one key vector
/// per element, shared by the heads, each head's query element broadcast.
#[inline(always)]
unsafe fn lane_chains<const H: usize, const B: usize>(
    q: &[[f32; ATTN_PAIR_MAX_DIM]; H],
    kb: *const f32,
    l: usize,
) -> [__m512; H] {
    let mut acc = [_mm512_setzero_ps(); H];
    for b in 0..B {
        let k = _mm512_loadu_ps(kb.add((b * 16 + l) * 16));
        for h in 0..H {
            acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(q[h][b * 16 + l]), k, acc[h]);
        }
    }
    acc
}

/// The lane tree's first level for lane `l < 8`: `(l, l + 8)`.
#[inline(always)]
unsafe fn lane_pair<const H: usize, const B: usize>(
    q: &[[f32; ATTN_PAIR_MAX_DIM]; H],
    kb: *const f32,
    l: usize,
) -> [__m512; H] {
    add_heads(lane_chains::<H, B>(q, kb, l), lane_chains::<H, B>(q, kb, l + 8))
}

#[inline(always)]
unsafe fn add_heads<const H: usize>(mut x: [__m512; H], y: [__m512; H]) -> [__m512; H] {
    for h in 0..H {
        x[h] = _mm512_add_ps(x[h], y[h]);
    }
    x
}

/// [`attention_chunk`] with the chunk's keys in lanes (`kt`: its [`lane_key_floats`], shared by
/// every row and head of a prefill), for the same bits: per block of 16 keys and head, lane `l`
/// of the contract's score is the fma chain over elements `l, l + 16, …` (the key's element from
/// `kt`'s vector `e`, the query's broadcast), and the lane tree is the same adds — `(l, l+8)`,
/// `(l, l+4)`, `(l, l+2)`, `(l, l+1)` — as plain vector adds, 16 keys at a time, instead of
/// [`fold_blend`]'s shuffles. `q[h]` is head `h`'s query zero-padded to `B · 16` floats (the
/// padding elements' fmas are the contract's zero-padded ones). `scores` holds [`lane_scores`]`(H,
/// len)` floats.
#[inline(always)]
unsafe fn attention_chunk_lanes<const H: usize, const B: usize>(
    q: &[[f32; ATTN_PAIR_MAX_DIM]; H],
    len: usize,
    (kt, vt): (*const f32, *const f32),
    d: usize,
    scale: f32,
    scores: &mut [f32],
) -> ([f32; H], [f32; H], [[__m512; B]; H]) {
    let blocks = len.div_ceil(16);
    let (s_buf, p_buf) = scores.split_at_mut(H * blocks * 16);
    debug_assert!(H <= 4 && p_buf.len() >= blocks * 64);
    let mut m_run = [_mm512_set1_ps(f32::NEG_INFINITY); H];
    for blk in 0..blocks {
        let kb = kt.add(blk * B * 16 * 16);
        // Opaque per block, so the queries' elements are broadcast from memory at each fma (an
        // embedded 4-byte broadcast) rather than hoisted as 64-byte vectors spilled to the stack,
        // which doubled the loads per fma.
        let q = &*std::hint::black_box(q as *const [[f32; ATTN_PAIR_MAX_DIM]; H]);
        // The lane tree in the order of `sampling::lane_tree`'s levels, depth first.
        let v0 = add_heads(
            add_heads(lane_pair::<H, B>(q, kb, 0), lane_pair::<H, B>(q, kb, 4)),
            add_heads(lane_pair::<H, B>(q, kb, 2), lane_pair::<H, B>(q, kb, 6)),
        );
        let v1 = add_heads(
            add_heads(lane_pair::<H, B>(q, kb, 1), lane_pair::<H, B>(q, kb, 5)),
            add_heads(lane_pair::<H, B>(q, kb, 3), lane_pair::<H, B>(q, kb, 7)),
        );
        let s = add_heads(v0, v1);
        let real = (((1u32 << (len - blk * 16).min(16)) - 1) & 0xffff) as __mmask16;
        for h in 0..H {
            let sh = _mm512_mul_ps(s[h], _mm512_set1_ps(scale));
            _mm512_storeu_ps(s_buf.as_mut_ptr().add((h * blocks + blk) * 16), sh);
            let keep = real & _mm512_cmp_ps_mask::<_CMP_ORD_Q>(sh, sh);
            m_run[h] = _mm512_mask_max_ps(m_run[h], keep, m_run[h], sh);
        }
    }
    // `max` is exact, so any order gives the contract's `m_c` (see `attention_chunk`).
    let mut m_c = [0.0f32; H];
    for h in 0..H {
        m_c[h] = _mm512_reduce_max_ps(m_run[h]);
    }
    // The exps key by key, the heads of a key side by side (four lanes, the padding heads zero),
    // so that each head's `l_c` is one lane of a 4-lane sum: one add per key for all heads
    // rather than one scalar add per head, on the ports the fmas need. A block's 16 keys × 4
    // heads take two levels of unpacks, which leave key `j` at `(j % 4) · 16 + (j / 4) · 4`.
    for blk in 0..blocks {
        let mut e = [_mm512_setzero_ps(); 4];
        for h in 0..H {
            let sh = _mm512_loadu_ps(s_buf.as_ptr().add((h * blocks + blk) * 16));
            e[h] = exp16(_mm512_sub_ps(sh, _mm512_set1_ps(m_c[h])));
        }
        let (t0, t1) = (_mm512_unpacklo_ps(e[0], e[1]), _mm512_unpackhi_ps(e[0], e[1]));
        let (t2, t3) = (_mm512_unpacklo_ps(e[2], e[3]), _mm512_unpackhi_ps(e[2], e[3]));
        let pd = |a: __m512, b: __m512, hi: bool| {
            let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
            _mm512_castpd_ps(if hi { _mm512_unpackhi_pd(a, b) } else { _mm512_unpacklo_pd(a, b) })
        };
        let out = p_buf.as_mut_ptr().add(blk * 64);
        _mm512_storeu_ps(out, pd(t0, t2, false));
        _mm512_storeu_ps(out.add(16), pd(t0, t2, true));
        _mm512_storeu_ps(out.add(32), pd(t1, t3, false));
        _mm512_storeu_ps(out.add(48), pd(t1, t3, true));
    }
    let mut l4 = _mm_setzero_ps();
    let mut o_c = [[_mm512_setzero_ps(); B]; H];
    for j in 0..len {
        let at = p_buf.as_ptr().add((j & !15) * 4 + (j & 3) * 16 + (j & 12));
        l4 = _mm_add_ps(l4, _mm_loadu_ps(at));
        let mut pv = [_mm512_setzero_ps(); H];
        for h in 0..H {
            pv[h] = _mm512_set1_ps(*at.add(h));
        }
        for b in 0..B {
            let v = _mm512_maskz_loadu_ps(dim_mask(d, b), vt.add(j * d + b * 16));
            for h in 0..H {
                o_c[h][b] = _mm512_fmadd_ps(pv[h], v, o_c[h][b]);
            }
        }
    }
    let mut l4s = [0.0f32; 4];
    _mm_storeu_ps(l4s.as_mut_ptr(), l4);
    let mut l_c = [0.0f32; H];
    l_c.copy_from_slice(&l4s[..H]);
    (m_c, l_c, o_c)
}

/// Floats of [`attention_chunk_lanes`]' scratch for `heads` heads and `len` keys: each head's
/// scores, then the exps of four heads' (padded) per key.
pub(crate) fn lane_scores(heads: usize, len: usize) -> usize {
    (heads + 4) * len.div_ceil(16) * 16
}

/// `H` query heads against the keys of `keys_in` (see [`crate::reference::attention`]): each
/// chunk by [`attention_chunk`], merged in chunk order as
/// [`super::ops::merge_chunk_weights`] says. `outs[h]` receives `o / l` (`d` floats), or with
/// `partial` the unnormalised state `[m, l, o…]` (`2 + d` floats) for [`super::ops`]' fold of
/// chunk partials (where `key_at` is one chunk's keys, the state is that chunk's `(m_c, l_c,
/// o_c)`).
///
/// # Safety
/// AVX-512 F/BW/VL must be available; every `qs[h]` holds `d` floats and `outs[h]` `d` (or
/// `2 + d`) floats, `B = ⌈d / 16⌉` (`d ≤ ATTN_MAX_DIM`, and `≤ ATTN_PAIR_MAX_DIM` for `H > 1`),
/// `scores` holds 16 floats per group of `16 / H` keys of a chunk (`16 · ⌈kv_chunk / (16 /
/// H)⌉`) and, with keys in lanes, [`lane_scores`]`(H, kv_chunk)`, and every `key_at[kp] +
/// kv_head·d + d` lies inside both caches.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn attention_heads_avx512<const H: usize, const B: usize, const COLD: bool>(
    qs: [&[f32]; H],
    keys_in: &AttnKeys<'_>,
    scores: &mut [f32],
    outs: [&mut [f32]; H],
    partial: bool,
) {
    let AttnKeys { keys: row_keys, attended, kv_head, k_cache, v_cache, kv_chunk, scale, lanes, .. } = *keys_in;
    let d = qs[0].len();
    debug_assert_eq!(d.div_ceil(16), B);
    let mut q = [[_mm512_setzero_ps(); B]; H];
    for h in 0..H {
        for b in 0..B {
            q[h][b] = _mm512_maskz_loadu_ps(dim_mask(d, b), qs[h].as_ptr().add(b * 16));
        }
    }
    // Keys in lanes (B ≤ 4 there): the queries zero-padded, for broadcasts one element at a time.
    let lanes = lanes.filter(|_| B * 16 <= ATTN_PAIR_MAX_DIM);
    let mut q_padded = [[0.0f32; ATTN_PAIR_MAX_DIM]; H];
    if lanes.is_some() {
        for h in 0..H {
            q_padded[h][..d].copy_from_slice(qs[h]);
        }
    }
    let (chunk_floats, key_floats) = (lane_chunk_floats(kv_chunk, d), lane_key_floats(kv_chunk, d));
    let kv = (k_cache.as_ptr().add(kv_head * d), v_cache.as_ptr().add(kv_head * d));
    let mut o = [[_mm512_setzero_ps(); B]; H];
    let (mut m, mut l) = ([f32::NEG_INFINITY; H], [0.0f32; H]);
    for (c, keys) in row_keys[..attended].chunks(kv_chunk).enumerate() {
        let from_chunk = (&row_keys[c * kv_chunk..], keys.len());
        let (m_c, l_c, o_c) = match lanes {
            Some(kt) => {
                let kt = kt[c * chunk_floats..][..chunk_floats].as_ptr();
                attention_chunk_lanes::<H, B>(&q_padded, keys.len(), (kt, kt.add(key_floats)), d, scale, scores)
            }
            None => attention_chunk::<H, B, COLD>(q, from_chunk, kv, d, scale, scores),
        };
        merge_chunk_heads(c, (&mut m, &mut l, &mut o), (m_c, l_c, o_c));
    }
    for (h, out) in outs.into_iter().enumerate() {
        if partial {
            (out[0], out[1]) = (m[h], l[h]);
            for b in 0..B {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(2 + b * 16), dim_mask(d, b), o[h][b]);
            }
        } else {
            store_normalised(out, l[h], o[h], d);
        }
    }
}

/// Chunk `c`'s `(m_c, l_c, o_c)` of `H` heads into their running state (the chunk's own state at
/// `c = 0`), as [`super::ops::merge_chunk_weights`] says: its `2 · H` exps in one [`exp16`] (the
/// contract's exp lane for lane) rather than one scalar exp each, which cost ~5 % of a prefill's
/// attention.
#[inline(always)]
unsafe fn merge_chunk_heads<const H: usize, const B: usize>(
    c: usize,
    (m, l, o): (&mut [f32; H], &mut [f32; H], &mut [[__m512; B]; H]),
    (m_c, l_c, o_c): ([f32; H], [f32; H], [[__m512; B]; H]),
) {
    if c == 0 {
        (*m, *l, *o) = (m_c, l_c, o_c);
        return;
    }
    let mut x = [0.0f32; 16];
    for h in 0..H {
        let mn = m[h].max(m_c[h]);
        (x[h], x[H + h]) = (m[h] - mn, m_c[h] - mn);
        m[h] = mn;
    }
    let mut w = [0.0f32; 16];
    _mm512_storeu_ps(w.as_mut_ptr(), exp16(_mm512_loadu_ps(x.as_ptr())));
    for h in 0..H {
        let (fa, fb) = (w[h], w[H + h]);
        l[h] = l[h] * fa + l_c[h] * fb;
        let (va, vb) = (_mm512_set1_ps(fa), _mm512_set1_ps(fb));
        for b in 0..B {
            o[h][b] = _mm512_add_ps(_mm512_mul_ps(o[h][b], va), _mm512_mul_ps(o_c[h][b], vb));
        }
    }
}

/// One head's output `o / l` (`d` floats).
#[inline(always)]
unsafe fn store_normalised<const B: usize>(out: &mut [f32], l: f32, o: [__m512; B], d: usize) {
    let lv = _mm512_set1_ps(l);
    for b in 0..B {
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(b * 16), dim_mask(d, b), _mm512_div_ps(o[b], lv));
    }
}

/// Most query rows of one [`attention_block_lanes_avx512`] call.
pub(crate) const LANE_BLOCK_MAX_ROWS: usize = 16;

/// One KV head's keys and values for [`attention_block_lanes_avx512`]: the KV head's chunks in
/// lanes (chunk `c` at `c ·` [`lane_chunk_floats`]).
pub(crate) struct AttnLaneKeys<'a> {
    pub lanes: &'a [f32],
    pub kv_chunk: usize,
    pub scale: f32,
}

/// [`attention_heads_avx512`] with keys in lanes for up to [`LANE_BLOCK_MAX_ROWS`] query rows of
/// one sequence at once, chunk by chunk: every row that attends chunk `c` runs it (by
/// [`attention_chunk_lanes`]) before any row moves on, so the chunk's keys and values are read from
/// L1 by all but the first row rather than streamed from L2 per row. Each row's chunks still run
/// in chunk order and merge as in one pass, so no bit changes. `rows(r)` gives row `r`'s queries
/// (`H · d` floats), how many keys it attends, and its output (`H · d` floats, `o / l`).
///
/// # Safety
/// AVX-512 F/BW/VL must be available; `B = ⌈d / 16⌉ ≤ ATTN_PAIR_MAX_DIM / 16`; `n_rows ≤
/// LANE_BLOCK_MAX_ROWS`; `rows` gives pointers to `H · d` readable and writable floats (each output
/// written by no one else meanwhile) and attended counts ≥ 1 within `lanes`' chunks; `scores`
/// holds [`lane_scores`]`(H, kv_chunk)` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn attention_block_lanes_avx512<const H: usize, const B: usize>(
    block: &AttnLaneKeys<'_>,
    d: usize,
    n_rows: usize,
    rows: impl Fn(usize) -> (*const f32, usize, *mut f32),
    scores: &mut [f32],
) {
    debug_assert!(n_rows <= LANE_BLOCK_MAX_ROWS && d.div_ceil(16) == B);
    let AttnLaneKeys { lanes, kv_chunk, scale } = *block;
    let mut q = [[[0.0f32; ATTN_PAIR_MAX_DIM]; H]; LANE_BLOCK_MAX_ROWS];
    let mut attended = [0usize; LANE_BLOCK_MAX_ROWS];
    for r in 0..n_rows {
        let (qp, n, _) = rows(r);
        attended[r] = n;
        for h in 0..H {
            std::ptr::copy_nonoverlapping(qp.add(h * d), q[r][h].as_mut_ptr(), d);
        }
    }
    let mut m = [[f32::NEG_INFINITY; H]; LANE_BLOCK_MAX_ROWS];
    let mut l = [[0.0f32; H]; LANE_BLOCK_MAX_ROWS];
    let mut o = [[[_mm512_setzero_ps(); B]; H]; LANE_BLOCK_MAX_ROWS];
    let (chunk_floats, key_floats) = (lane_chunk_floats(kv_chunk, d), lane_key_floats(kv_chunk, d));
    let chunks = attended[..n_rows].iter().max().map_or(0, |n| n.div_ceil(kv_chunk));
    for c in 0..chunks {
        let kt = lanes[c * chunk_floats..][..chunk_floats].as_ptr();
        for r in 0..n_rows {
            let Some(len) = attended[r].checked_sub(c * kv_chunk).filter(|&n| n > 0) else { continue };
            let part =
                attention_chunk_lanes::<H, B>(&q[r], len.min(kv_chunk), (kt, kt.add(key_floats)), d, scale, scores);
            merge_chunk_heads(c, (&mut m[r], &mut l[r], &mut o[r]), part);
        }
    }
    for r in 0..n_rows {
        let out = rows(r).2;
        for h in 0..H {
            store_normalised(std::slice::from_raw_parts_mut(out.add(h * d), d), l[r][h], o[r][h], d);
        }
    }
}

/// [`attention_heads_avx512`] with `B = ⌈d / 16⌉` and `COLD = keys.cold` chosen at run time (so its head_dim loops are
/// unrolled and its accumulators live in registers).
///
/// # Safety
/// As [`attention_heads_avx512`].
pub(crate) unsafe fn attention_heads_dispatch<const H: usize>(
    qs: [&[f32]; H],
    keys: &AttnKeys<'_>,
    scores: &mut [f32],
    outs: [&mut [f32]; H],
    partial: bool,
) {
    macro_rules! with_blocks {
        ($cold:literal: $($b:literal)*) => {
            match qs[0].len().div_ceil(16) {
                $($b => attention_heads_avx512::<H, $b, $cold>(qs, keys, scores, outs, partial),)*
                blocks => unreachable!("head_dim of {blocks} blocks of 16 is above ATTN_MAX_DIM"),
            }
        };
    }
    if keys.cold {
        with_blocks!(true: 1 2 3 4 5 6 7 8)
    } else {
        with_blocks!(false: 1 2 3 4 5 6 7 8)
    }
}

/// [`attention_block_lanes_avx512`] with `B = ⌈d / 16⌉` chosen at run time.
///
/// # Safety
/// As [`attention_block_lanes_avx512`].
pub(crate) unsafe fn attention_block_lanes_dispatch<const H: usize>(
    block: &AttnLaneKeys<'_>,
    d: usize,
    n_rows: usize,
    rows: impl Fn(usize) -> (*const f32, usize, *mut f32),
    scores: &mut [f32],
) {
    match d.div_ceil(16) {
        1 => attention_block_lanes_avx512::<H, 1>(block, d, n_rows, rows, scores),
        2 => attention_block_lanes_avx512::<H, 2>(block, d, n_rows, rows, scores),
        3 => attention_block_lanes_avx512::<H, 3>(block, d, n_rows, rows, scores),
        4 => attention_block_lanes_avx512::<H, 4>(block, d, n_rows, rows, scores),
        blocks => unreachable!("head_dim of {blocks} blocks of 16 is above ATTN_PAIR_MAX_DIM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// exp16 equals the scalar contract exp bit for bit, edges included.
    #[test]
    fn exp16_matches_scalar_exp_everywhere() {
        if !crate::Isa::Avx512.is_available() {
            eprintln!("SKIPPED: no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            88.72,
            88.7228,
            88.72284,
            88.72285,
            89.0,
            -87.3,
            -100.0,
            -103.97,
            -103.97208,
            -104.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
            1e30,
            -1e30,
            f32::MIN_POSITIVE,
        ];
        let mut b = 0x3f80_0000u32;
        for _ in 0..200_000 {
            b = b.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            xs.push(f32::from_bits(b) % 120.0);
        }
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        for c in xs.chunks(16) {
            let mut out = [0.0f32; 16];
            // SAFETY: the test returned above unless the CPU has AVX-512F; `c` holds 16 values.
            unsafe { check(c, &mut out) };
            for (x, y) in c.iter().zip(out) {
                let want = crate::math::exp(*x);
                assert!(want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()), "exp({x}): {want} vs {y}");
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn check(c: &[f32], out: &mut [f32; 16]) {
        _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr())));
    }
}
