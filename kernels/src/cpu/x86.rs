//! x86-64 tile kernels: AVX-512 (one zmm = the 16 logical lanes) and AVX2 (two ymm per 16 lanes).
//!
//! Both evaluate exactly the contract order of [`crate::reference::dot`]: per segment, lane `l`
//! accumulates `x[e]·w[e]` for `e ≡ l (mod 16)` with `vfmadd` from +0.0, the lane tree folds
//! `(l, l+8)`, `(l, l+4)`, `(l, l+2)`, `(l, l+1)`, and the segment sums meet in the balanced tree.

use std::arch::x86_64::*;

use super::linear::{segment_tree_inplace, Tile};
use crate::DType;

// ---------------------------------------------------------------- AVX-512

/// Widening loads of 16 weights, one type per storage dtype so the tile kernels are
/// monomorphised with no dtype branch in the inner loop.
trait Load512 {
    /// 16 weights from element `col` of `row`.
    unsafe fn full(row: *const u8, col: usize) -> __m512;
    /// Lanes outside `mask` are zero and their addresses are never touched.
    unsafe fn masked(row: *const u8, col: usize, mask: __mmask16) -> __m512;
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
    // The segment tree, built incrementally: `stack[i]` holds a finished subtree of 2^i segments
    // waiting for its right sibling (like binary carry propagation), so no per-tile buffer of
    // all S segment sums is needed. For a power-of-two count this is exactly the pairwise tree.
    let mut stack = [_mm512_setzero_ps(); 7];
    let mut depth = 0usize;
    for s in 0..t.count {
        let mut acc = [_mm512_setzero_ps(); 16];
        let (start, end) = (s * t.seg_len, (s + 1) * t.seg_len);
        let mut block = |col: usize, masked: bool| {
            let mut xv = [_mm512_setzero_ps(); MR];
            for i in 0..MR {
                xv[i] = _mm512_loadu_ps(xs[i].add(col));
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
        for col in (start..split).step_by(16) {
            block(col, false);
        }
        for col in (split..end).step_by(16) {
            block(col, true);
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
    debug_assert_eq!(depth, 1, "segment count is a power of two");
    _mm512_storeu_ps(out.as_mut_ptr(), stack[0]);
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
        other => unreachable!("no AVX-512 tile of shape {other:?}"),
    }
}

// ---------------------------------------------------------------- AVX2

/// 16 weights as two ymm (lanes 0–7, 8–15), zero past `k_real`.
#[inline(always)]
unsafe fn load_w256(dtype: DType, row: *const u8, col: usize, k_real: usize) -> (__m256, __m256) {
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
