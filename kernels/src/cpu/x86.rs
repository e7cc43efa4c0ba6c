//! x86-64 tile kernels: AVX-512 (one zmm = the 16 logical lanes) and AVX2 (two ymm per 16 lanes).
//!
//! Both evaluate exactly the contract order of [`crate::reference::dot`]: per segment, lane `l`
//! accumulates `x[e]·w[e]` for `e ≡ l (mod 16)` with `vfmadd` from +0.0, the lane tree folds
//! `(l, l+8)`, `(l, l+4)`, `(l, l+2)`, `(l, l+1)`, and the segment sums meet in the balanced tree.

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
    _mm512_cvtph_ps(_mm256_set1_epi16(std::ptr::read_unaligned(p as *const i16)))
}

/// The 16 nibbles of weights `col % 32 ..+16` of a 32-weight nibble array, as u8 (low nibbles hold
/// the block's first half, high nibbles its second).
#[inline(always)]
unsafe fn nibbles16(qs: *const u8, col: usize) -> __m128i {
    let v = _mm_loadu_si128(qs as *const __m128i);
    let v = if col.is_multiple_of(32) { v } else { _mm_srli_epi16::<4>(v) };
    _mm_and_si128(v, _mm_set1_epi8(0x0f))
}

/// Block types: `col` is a multiple of 16 and rows are whole blocks, so a block of 16 lanes is
/// half of one quantization block — all real or (past the row) all padding.
macro_rules! quant_masked {
    () => {
        #[inline(always)]
        unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512 {
            if mask == 0 {
                _mm512_setzero_ps()
            } else {
                _mm512_maskz_mov_ps(mask, Self::full(row, col))
            }
        }
    };
}

impl Load512 for Q8_0x16 {
    /// `f32(q) · d`.
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        let blk = row.add(col / 32 * crate::quant::Q8_0_BYTES);
        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2 + col % 32) as *const __m128i));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), f16_splat512(blk))
    }
    quant_masked!();
    const PAIRED: bool = true;
    #[inline(always)]
    unsafe fn pair(row: *const u8, col: usize) -> (__m512, __m512) {
        let blk = row.add(col / 32 * crate::quant::Q8_0_BYTES);
        let d = f16_splat512(blk);
        let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2) as *const __m128i));
        let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18) as *const __m128i));
        (_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d))
    }
}

/// Both nibble halves of a 32-weight nibble array, as 16 u32 each (first half, second half).
#[inline(always)]
unsafe fn nibble_pair(qs: *const u8) -> (__m512i, __m512i) {
    let v = _mm_loadu_si128(qs as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    (_mm512_cvtepu8_epi32(_mm_and_si128(v, mask)), _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(v), mask)))
}

impl Load512 for Q4_0x16 {
    /// `f32(n − 8) · d`.
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        let blk = row.add(col / 32 * crate::quant::Q4_0_BYTES);
        let q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles16(blk.add(2), col)), _mm512_set1_epi32(8));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), f16_splat512(blk))
    }
    quant_masked!();
    const PAIRED: bool = true;
    #[inline(always)]
    unsafe fn pair(row: *const u8, col: usize) -> (__m512, __m512) {
        let blk = row.add(col / 32 * crate::quant::Q4_0_BYTES);
        let d = f16_splat512(blk);
        let (lo, hi) = nibble_pair(blk.add(2));
        let eight = _mm512_set1_epi32(8);
        (
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)), d),
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)), d),
        )
    }
}
impl Load512 for Q4_1x16 {
    /// `f32(n) · d + m`, two roundings (no fma).
    #[inline(always)]
    unsafe fn full(row: *const u8, col: usize) -> __m512 {
        let blk = row.add(col / 32 * crate::quant::Q4_1_BYTES);
        let q = _mm512_cvtepu8_epi32(nibbles16(blk.add(4), col));
        _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), f16_splat512(blk)), f16_splat512(blk.add(2)))
    }
    quant_masked!();
    const PAIRED: bool = true;
    #[inline(always)]
    unsafe fn pair(row: *const u8, col: usize) -> (__m512, __m512) {
        let blk = row.add(col / 32 * crate::quant::Q4_1_BYTES);
        let (d, m) = (f16_splat512(blk), f16_splat512(blk.add(2)));
        let (lo, hi) = nibble_pair(blk.add(4));
        (
            _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m),
            _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m),
        )
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
    // The segment tree, built incrementally: `stack[i]` holds a finished subtree of 2^i segments
    // waiting for its right sibling (like binary carry propagation), so no per-tile buffer of
    // all S segment sums is needed. For a power-of-two count this is exactly the pairwise tree.
    let mut stack = [_mm512_setzero_ps(); 7];
    let mut depth = 0usize;
    for s in 0..t.count {
        let mut acc = [_mm512_setzero_ps(); 16];
        let (start, end) = (s * t.seg_len, (s + 1) * t.seg_len);
        // `pair`: columns col..col + 32 at once (a block type decodes its block once); each
        // accumulator still takes its elements col + l, then col + 16 + l, in order.
        let mut block = |col: usize, masked: bool, pair: bool| {
            for _ in 0..per_block * (1 + pair as usize) {
                if next_line < lines {
                    _mm_prefetch::<_MM_HINT_T0>(t.prefetch.as_ptr().add(next_line * 64) as *const i8);
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
        let mut v = fold16(&mut acc);
        let mut done = s + 1;
        while done & 1 == 0 {
            depth -= 1;
            v = _mm512_add_ps(stack[depth], v);
            done >>= 1;
        }
        stack[depth] = v;
        depth += 1;
    }
    // A count of 3·2^k leaves two finished runs (two thirds, one third): added left to right,
    // as `reference::tree_reduce` does.
    let mut total = stack[0];
    for &run in &stack[1..depth] {
        total = _mm512_add_ps(total, run);
    }
    _mm512_storeu_ps(out.as_mut_ptr(), total);
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
        (1, 16, DType::Q8_0) => tile512::<1, 16, Q8_0x16>(t, out),
        (1, 16, DType::Q4_0) => tile512::<1, 16, Q4_0x16>(t, out),
        (1, 16, DType::Q4_1) => tile512::<1, 16, Q4_1x16>(t, out),
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
/// chunks) and its segment-tree stack of up to 7 finished subtrees (S ≤ 64), 32 floats each.
pub(crate) const KB_ACC_FLOATS: usize = KB_OUTPUTS * 16;
pub(crate) const KB_STACK_FLOATS: usize = 32;
pub(crate) const KB_STATE_FLOATS: usize = KB_ACC_FLOATS + 7 * KB_STACK_FLOATS;

/// One K chunk of one K-blocked tile: columns `begin..end` of segment `seg`, never crossing a
/// segment boundary, so a chunk only ever continues the lanes of its own segment.
pub(crate) struct KChunk<'a> {
    /// The tile's 8 x rows, packed: column `col` of row `i` at `col · 8 + i · 16` (`col` a
    /// multiple of 16, plus its lane), so one 16-column block of all 8 rows is 512 contiguous bytes.
    pub x: *const f32,
    pub ws: &'a [*const u8; KB_NR],
    pub dtype: DType,
    pub k_real: usize,
    pub begin: usize,
    pub end: usize,
    /// The chunk starts its segment: lanes start at +0.0 (else they resume from the state).
    pub first: bool,
    /// The chunk ends its segment: lane trees, then the segment joins the tree stack.
    pub last: bool,
    pub seg: usize,
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
    let (x, ws) = (c.x, c.ws);
    let lanes = c.state;
    // Flat and indexed by constants only, so that every accumulator lives in a register.
    let mut acc = [_mm512_setzero_ps(); KB_OUTPUTS];
    if !c.first {
        for o in 0..KB_OUTPUTS {
            acc[o] = _mm512_loadu_ps(lanes.add(o * 16));
        }
    }
    let full_end = c.k_real / 16 * 16;
    let (block_len, block_bytes) = (c.dtype.block_len(), c.dtype.block_bytes());
    // Same per-block order as `tile512`: lane l of every accumulator takes column col + l, block
    // after block in increasing col (a block type decodes 32 weights at once, in order). One loop
    // body, no closure: a closure would not inherit this function's target features.
    let split = full_end.clamp(c.begin, c.end);
    let mut col = c.begin;
    while col < c.end {
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
    if !c.last {
        for o in 0..KB_OUTPUTS {
            _mm512_storeu_ps(lanes.add(o * 16), acc[o]);
        }
        return;
    }
    let mut first16 = [_mm512_setzero_ps(); 16];
    let mut last8 = [_mm512_setzero_ps(); 8];
    first16.copy_from_slice(&acc[..16]);
    last8.copy_from_slice(&acc[16..]);
    let (mut v0, mut v1) = (fold_blend(&mut first16), fold_blend(&mut last8));
    // The segment tree as in `tile512`: before segment `seg` the stack holds popcount(seg)
    // finished subtrees; each trailing one-bit of seg + 1 is a carry into the one below it.
    let stack = c.state.add(KB_ACC_FLOATS);
    let mut depth = c.seg.count_ones() as usize;
    let mut done = c.seg + 1;
    while done & 1 == 0 {
        depth -= 1;
        let entry = stack.add(depth * KB_STACK_FLOATS);
        v0 = _mm512_add_ps(_mm512_loadu_ps(entry), v0);
        v1 = _mm512_add_ps(_mm512_loadu_ps(entry.add(16)), v1);
        done >>= 1;
    }
    let entry = stack.add(depth * KB_STACK_FLOATS);
    _mm512_storeu_ps(entry, v0);
    _mm512_storeu_ps(entry.add(16), v1);
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
    let splat = |p: *const u8| _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(p as *const i16)));
    let d = splat(blk);
    let halves = |q: __m128i, signed: bool| {
        let hi = _mm_srli_si128::<8>(q);
        if signed {
            (_mm256_cvtepi8_epi32(q), _mm256_cvtepi8_epi32(hi))
        } else {
            (_mm256_cvtepu8_epi32(q), _mm256_cvtepu8_epi32(hi))
        }
    };
    match dtype {
        DType::Q8_0 => {
            let (a, b) = halves(_mm_loadu_si128(blk.add(2 + col % 32) as *const __m128i), true);
            (_mm256_mul_ps(_mm256_cvtepi32_ps(a), d), _mm256_mul_ps(_mm256_cvtepi32_ps(b), d))
        }
        DType::Q4_0 => {
            let (a, b) = halves(nibbles16(blk.add(2), col), false);
            let eight = _mm256_set1_epi32(8);
            (
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a, eight)), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(b, eight)), d),
            )
        }
        DType::Q4_1 => {
            let (a, b) = halves(nibbles16(blk.add(4), col), false);
            let m = splat(blk.add(2));
            (
                _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), d), m),
                _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(b), d), m),
            )
        }
        DType::F32 | DType::Bf16 | DType::F16 => unreachable!("element types are loaded by load_w256"),
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

/// # Safety
/// AVX2, FMA and F16C must be available; `t` must describe valid rows (see [`Tile`]).
pub(crate) unsafe fn tile_avx2(t: &Tile<'_>, out: &mut [f32; 16]) {
    match (t.xs.len(), t.ws.len()) {
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

/// One query head against keys `0..=pos` (see [`crate::reference::attention`]), 16 keys at a time:
/// each key's score is one 16-lane fma chain over head_dim and the lane tree of [`fold16`] (the
/// 16 keys' trees side by side), `exp` is [`exp16`] (the contract's exp, lane for lane), and the
/// sums that the contract orders by position — `l_c` and every `o_c` dimension — run key after
/// key in increasing position. `key_at[kp]` is the cache offset of key `kp`'s head 0.
///
/// # Safety
/// AVX-512 F/BW/VL must be available; `qh` holds `d ≤ ATTN_MAX_DIM` floats, `out` too, and every
/// `key_at[kp] + kv_head·d + d` lies inside both caches.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_head_avx512(
    qh: &[f32],
    key_at: &[usize],
    kv_head: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    kv_chunk: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = qh.len();
    let blocks = d.div_ceil(16);
    let mut q = [_mm512_setzero_ps(); ATTN_MAX_DIM / 16];
    for (b, qb) in q.iter_mut().enumerate().take(blocks) {
        *qb = _mm512_maskz_loadu_ps(dim_mask(d, b), qh.as_ptr().add(b * 16));
    }
    let (kp, vp) = (k_cache.as_ptr().add(kv_head * d), v_cache.as_ptr().add(kv_head * d));
    let keys_total = key_at.len();
    let mut o = [_mm512_setzero_ps(); ATTN_MAX_DIM / 16];
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    for (c, first) in (0..keys_total).step_by(kv_chunk).enumerate() {
        let keys = &key_at[first..(first + kv_chunk).min(keys_total)];
        for (g, group) in keys.chunks(16).enumerate() {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (a, &at) in acc.iter_mut().zip(group) {
                for b in 0..blocks {
                    let kv = _mm512_maskz_loadu_ps(dim_mask(d, b), kp.add(at + b * 16));
                    *a = _mm512_fmadd_ps(q[b], kv, *a);
                }
            }
            let s = _mm512_mul_ps(fold16(&mut acc), _mm512_set1_ps(scale));
            let mut tmp = [0.0f32; 16];
            _mm512_storeu_ps(tmp.as_mut_ptr(), s);
            scores[g * 16..g * 16 + group.len()].copy_from_slice(&tmp[..group.len()]);
        }
        let scores = &mut scores[..keys.len()];
        let m_c = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut l_c = 0.0f32;
        let mut o_c = [_mm512_setzero_ps(); ATTN_MAX_DIM / 16];
        for (g, chunk) in scores.chunks_mut(16).enumerate() {
            let mut tmp = [0.0f32; 16];
            tmp[..chunk.len()].copy_from_slice(chunk);
            let pr = exp16(_mm512_sub_ps(_mm512_loadu_ps(tmp.as_ptr()), _mm512_set1_ps(m_c)));
            _mm512_storeu_ps(tmp.as_mut_ptr(), pr);
            for (&p, &at) in tmp.iter().zip(&keys[g * 16..g * 16 + chunk.len()]) {
                l_c += p;
                let pv = _mm512_set1_ps(p);
                for b in 0..blocks {
                    let v = _mm512_maskz_loadu_ps(dim_mask(d, b), vp.add(at + b * 16));
                    o_c[b] = _mm512_fmadd_ps(pv, v, o_c[b]);
                }
            }
        }
        if c == 0 {
            (m, l, o) = (m_c, l_c, o_c);
        } else {
            let mn = m.max(m_c);
            let (fa, fb) = (crate::math::exp(m - mn), crate::math::exp(m_c - mn));
            l = l * fa + l_c * fb;
            let (va, vb) = (_mm512_set1_ps(fa), _mm512_set1_ps(fb));
            for b in 0..blocks {
                o[b] = _mm512_add_ps(_mm512_mul_ps(o[b], va), _mm512_mul_ps(o_c[b], vb));
            }
            m = mn;
        }
    }
    let lv = _mm512_set1_ps(l);
    for b in 0..blocks {
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(b * 16), dim_mask(d, b), _mm512_div_ps(o[b], lv));
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
