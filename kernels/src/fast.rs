//! The fast (non-invariant) matmul, for comparison only.
//!
//! It hands the product to the `gemm` crate, which picks its blocking and its parallel split by
//! the shape — exactly what the numerics contract forbids, and what conventional servers do. Weights
//! are widened to f32 once at load time by [`crate::Backend::prepare_weight`] in fast mode.

use gemm::{gemm, Parallelism};

use crate::cpu::CpuBackend;
use crate::{DType, WeightView};

pub(crate) fn linear_fast(be: &CpuBackend, x: &[f32], m: usize, w: WeightView<'_>, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    if m == 0 || n == 0 {
        return;
    }
    let widened;
    // SAFETY: every bit pattern is a valid f32, and `align_to` hands out only the aligned middle.
    let as_f32 = unsafe { w.bytes.align_to::<f32>() };
    let wf: &[f32] = match (w.dtype, as_f32) {
        (DType::F32, ([], mid, [])) => mid,
        _ => {
            widened = w.to_f32();
            &widened
        }
    };
    let par = if be.threads() > 1 { Parallelism::Rayon(be.threads()) } else { Parallelism::None };
    be.pool().install(|| {
        // SAFETY: dst is [m, n] row-major, lhs x is [m, k] row-major, rhs is Wᵀ: element (kk, j)
        // at wf[j·k + kk]; all pointers cover exactly those extents.
        unsafe {
            gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                wf.as_ptr(),
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
    });
}
