//! The fast (non-invariant) matmul, for comparison only.
//!
//! It hands the product to the `gemm` crate, which picks its blocking and its parallel split by
//! the shape — exactly what the numerics contract forbids, and what conventional servers do.
//! bf16, f16 and block-quantized weights stay as stored and are widened one tile of rows at a time
//! inside each call, so fast mode holds the same resident weights as invariant mode.

use gemm::{gemm, Parallelism};

use crate::cpu::CpuBackend;
use crate::WeightView;

/// Output rows (weight rows) widened and multiplied at a time: a 128-row tile of a 4864-wide bf16
/// matrix is 2.4 MiB of f32, so the widened copy stays in cache instead of doubling the resident
/// weights (fast mode used to widen every matrix at load: 3.5× the RSS of invariant mode).
const ROWS_PER_TILE: usize = 128;

pub(crate) fn linear_fast(be: &CpuBackend, x: &[f32], m: usize, w: WeightView<'_>, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    if m == 0 || n == 0 {
        return;
    }
    if let Some(wf) = w.as_f32() {
        let par = if be.threads() > 1 { Parallelism::Rayon(be.threads()) } else { Parallelism::None };
        // SAFETY: y is [m, n], x is [m, k], wf is [n, k]; all cover exactly those extents.
        be.pool().install(|| unsafe { gemm_rows(m, n, k, y.as_mut_ptr(), n, x, wf, par) });
        return;
    }
    // bf16 / f16 / unaligned: widen one tile of weight rows at a time and let each pool thread
    // multiply its own tiles (the tiles write disjoint columns of y).
    let y_ptr = SendPtr(y.as_mut_ptr());
    let tiles = n.div_ceil(ROWS_PER_TILE);
    be.pool().install(|| {
        use rayon::prelude::*;
        (0..tiles).into_par_iter().for_each_init(Vec::new, |wide: &mut Vec<f32>, t| {
            let rows = t * ROWS_PER_TILE..((t + 1) * ROWS_PER_TILE).min(n);
            wide.clear();
            w.widen_rows_into(rows.clone(), wide);
            let y_ptr = &y_ptr;
            // SAFETY: this tile writes columns `rows` of the [m, n] output (row stride n) and no
            // other tile writes them; `wide` is [rows.len(), k].
            unsafe { gemm_rows(m, rows.len(), k, y_ptr.0.add(rows.start), n, x, wide, Parallelism::None) }
        });
    });
}

/// A raw output pointer shared by the tile tasks, each writing its own columns.
struct SendPtr(*mut f32);
// SAFETY: the tasks holding it write disjoint column ranges of one live buffer.
unsafe impl Sync for SendPtr {}

/// `dst[i, j] = Σ x[i, ·] · w[j, ·]` for `m` rows of x ([m, k]) and `n` rows of w ([n, k]), dst
/// row stride `dst_rs`.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `n` columns at row stride `dst_rs`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    x: &[f32],
    w: &[f32],
    par: Parallelism,
) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k);
    // SAFETY: lhs x is [m, k] row-major, rhs is wᵀ: element (kk, j) at w[j·k + kk]; the caller
    // vouches for dst.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
