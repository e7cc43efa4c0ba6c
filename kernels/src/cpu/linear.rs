//! The invariant linear: tiling, threading and the portable lane loop.
//!
//! A *tile* is `MR` rows of `x` times `NR` rows of `W`; its kernel computes every one of the
//! `MR × NR` dot products in the contract order (16 lanes → lane tree per segment → segment tree),
//! so the tile shape — chosen by `M` and the ISA — never changes a result bit. `x` is first copied
//! into a zero-padded buffer so kernels read whole 16-lane blocks of it; weight rows are read in
//! place and the block that crosses the end of the real row is loaded with a mask (zeros beyond).

use rayon::prelude::*;

use super::{CpuBackend, Isa, SharedOut};
use crate::sampling::lane_tree;
use crate::{DType, SegmentRange, WeightView, LANES};

/// Shape of one tile call: pointers to `MR` padded x rows and `NR` weight rows.
pub(crate) struct Tile<'a> {
    pub xs: &'a [*const f32],
    pub ws: &'a [*const u8],
    pub dtype: DType,
    /// Real elements per weight row (beyond: zeros).
    pub k_real: usize,
    pub seg_len: usize,
    pub count: usize,
    /// Bytes of weights the *next* tile will read (contiguous rows), to prefetch while this one
    /// computes: a decode step streams every weight once, and rows are too short for the
    /// hardware prefetcher to ramp up on its own.
    pub prefetch: &'a [u8],
}

/// Rows of output per task and columns per task: small enough that a task's x and W blocks stay
/// in L2, numerous enough to balance two to eight threads.
const TASK_ROWS: usize = 64;
const TASK_COLS: usize = 64;

pub(crate) fn linear_invariant(
    be: &CpuBackend,
    x: &[f32],
    m: usize,
    w: WeightView<'_>,
    segs: SegmentRange,
    y: &mut [f32],
) {
    let k_real = w.cols;
    let n = w.rows;
    if m == 0 || n == 0 {
        return;
    }
    let padded = segs.padded_len();
    let mut xp = vec![0.0f32; m * padded];
    for i in 0..m {
        xp[i * padded..i * padded + k_real].copy_from_slice(&x[i * k_real..(i + 1) * k_real]);
    }
    let isa = be.isa();
    // (MR, NR) of the multi-row tile and NR of the single-row tile, per ISA.
    let (mr, nr, nr1) = match isa {
        Isa::Avx512 => (4, 4, 16),
        Isa::Avx2 => (1, 4, 4),
        Isa::Scalar => (1, 1, 1),
    };
    let row_blocks = m.div_ceil(TASK_ROWS);
    let col_blocks = n.div_ceil(TASK_COLS);
    let out = SharedOut(y.as_mut_ptr());
    let row_bytes = w.row_bytes();
    let wbase = w.bytes.as_ptr() as usize;
    let xbase = xp.as_ptr() as usize;
    let task = |t: usize| {
        // Capture the whole `SharedOut` (Send), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let out = out;
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let (r0, r1) = (rb * TASK_ROWS, ((rb + 1) * TASK_ROWS).min(m));
        let (c0, c1) = (cb * TASK_COLS, ((cb + 1) * TASK_COLS).min(n));
        let xrow = |i: usize| (xbase as *const f32).wrapping_add(i * padded);
        // Past the last real column, tiles read the last row again and drop the results.
        let wrow = |j: usize| (wbase as *const u8).wrapping_add(j.min(n - 1) * row_bytes);
        // The bytes of weight rows `first..first + rows` (clamped to W): contiguous in row-major W.
        let next_rows = |first: usize, rows: usize| -> &[u8] {
            let (a, b) = (first.min(n), (first + rows).min(n));
            // SAFETY: rows `a..b` lie inside W, which outlives this call.
            unsafe { std::slice::from_raw_parts((wbase as *const u8).add(a * row_bytes), (b - a) * row_bytes) }
        };
        let mut res = [0.0f32; 16];
        let multi_end = if mr > 1 { r0 + (r1 - r0) / mr * mr } else { r0 };
        for rq in (r0..multi_end).step_by(mr) {
            for cq in (c0..c1).step_by(nr) {
                let mut xs = [std::ptr::null(); 4];
                let mut ws = [std::ptr::null(); 16];
                (0..mr).for_each(|i| xs[i] = xrow(rq + i));
                (0..nr).for_each(|j| ws[j] = wrow(cq + j));
                // The first row quad meets each weight row first: prefetch the next quad's rows.
                let prefetch = if rq == r0 { next_rows(cq + nr, nr) } else { &[][..] };
                run_tile(
                    isa,
                    &Tile {
                        xs: &xs[..mr],
                        ws: &ws[..nr],
                        dtype: w.dtype,
                        k_real,
                        seg_len: segs.seg.seg_len,
                        count: segs.count,
                        prefetch,
                    },
                    &mut res,
                );
                for i in 0..mr {
                    for j in 0..nr.min(c1 - cq) {
                        // SAFETY: (rq+i, cq+j) is inside this task's block; blocks are disjoint.
                        unsafe { *out.0.add((rq + i) * n + cq + j) = res[i * nr + j] };
                    }
                }
            }
        }
        for r in multi_end..r1 {
            for cq in (c0..c1).step_by(nr1) {
                let xs = [xrow(r)];
                let mut ws = [std::ptr::null(); 16];
                (0..nr1).for_each(|j| ws[j] = wrow(cq + j));
                let prefetch = next_rows(cq + nr1, nr1);
                run_tile(
                    isa,
                    &Tile {
                        xs: &xs,
                        ws: &ws[..nr1],
                        dtype: w.dtype,
                        k_real,
                        seg_len: segs.seg.seg_len,
                        count: segs.count,
                        prefetch,
                    },
                    &mut res,
                );
                for j in 0..nr1.min(c1 - cq) {
                    // SAFETY: as above.
                    unsafe { *out.0.add(r * n + cq + j) = res[j] };
                }
            }
        }
    };
    let tasks = row_blocks * col_blocks;
    if be.threads() == 1 || tasks == 1 {
        (0..tasks).for_each(task);
    } else {
        be.pool().install(|| (0..tasks).into_par_iter().for_each(task));
    }
}

fn run_tile(isa: Isa, t: &Tile<'_>, out: &mut [f32; 16]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the backend only selects an ISA that `Isa::is_available` confirmed.
        Isa::Avx512 => unsafe { super::x86::tile_avx512(t, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::x86::tile_avx2(t, out) },
        _ => tile_scalar(t, out),
    }
}

/// The portable lane loop: one output at a time, 16 accumulators in an array.
fn tile_scalar(t: &Tile<'_>, out: &mut [f32; 16]) {
    let row_bytes = t.dtype.row_bytes(t.k_real).expect("a weight row is whole blocks");
    for (i, &xp) in t.xs.iter().enumerate() {
        for (j, &wp) in t.ws.iter().enumerate() {
            // SAFETY: a w row holds k_real weights in `row_bytes` bytes.
            let row = unsafe { std::slice::from_raw_parts(wp, row_bytes) };
            let mut sums = [0.0f32; 64];
            for (s, sum) in sums.iter_mut().enumerate().take(t.count) {
                let mut acc = [0.0f32; LANES];
                for e in s * t.seg_len..(s + 1) * t.seg_len {
                    // SAFETY: x rows are padded to count × seg_len elements, and e < count × seg_len.
                    let xv = unsafe { *xp.add(e) };
                    let wv = if e < t.k_real { t.dtype.widen_at(row, e) } else { 0.0 };
                    acc[e % LANES] = xv.mul_add(wv, acc[e % LANES]);
                }
                *sum = lane_tree(acc);
            }
            out[i * t.ws.len() + j] = segment_tree_inplace(&mut sums[..t.count]);
        }
    }
}

/// The canonical segment tree, in place (no allocation on the hot path).
#[inline(always)]
pub(crate) fn segment_tree_inplace(v: &mut [f32]) -> f32 {
    crate::reference::tree_reduce(v, |a, b| a + b)
}
