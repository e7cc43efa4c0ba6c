//! The GPU form of the fixed-order all-reduce: NCCL all-gather of the partials, then the
//! contract's tree on every rank.
//!
//! NCCL's own all-reduce sums in an order chosen by its algorithm (ring, tree, NVLS) and the
//! number of ranks — exactly the kind of reduction the contract forbids. So partials are only
//! *moved* by NCCL (`ncclAllGather`, bitwise copies, rank order), and each rank finishes the
//! pairwise segment tree itself with the `tree_combine` kernel: every rank ends with identical
//! bits, equal to the single-GPU result (`docs/DESIGN.md` §2, "All-reduce").

use std::sync::Arc;

use cudarc::driver::DevicePtr;
use cudarc::nccl::{Comm, Id};

use super::{libs, CudaBackend, CudaBuf, CudaError};

fn nccl_err(op: &str, e: cudarc::nccl::result::NcclError) -> CudaError {
    CudaError::Nccl { op: op.to_string(), detail: format!("{:?}", e.0) }
}

/// A communicator of one rank on the backend's own stream (a single-GPU deployment, and the GPU
/// check).
pub fn nccl_single_rank_comm(be: &CudaBackend) -> Result<Comm, CudaError> {
    libs::require_nccl()?;
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Comm::from_rank(Arc::clone(be.stream()), 0, 1, id).map_err(|e| nccl_err("ncclCommInitRank", e))
}

/// All-gather every rank's `partial` (a row-parallel layer's subtree sums, rank order) and combine
/// them with the segment tree into `y`, on every rank. The world size must be a segment count (2^k or 3·2^k, ≤ 64).
/// `comm` may use any stream of the backend's device; the backend stream waits for it.
pub fn nccl_all_gather_tree(
    be: &CudaBackend,
    comm: &Comm,
    partial: &CudaBuf,
    y: &mut CudaBuf,
) -> Result<(), CudaError> {
    let t = comm.world_size();
    if !crate::is_segment_count(t) {
        return Err(CudaError::Unsupported(format!("world size {t}: the segment tree needs 2^k or 3·2^k ≤ 64")));
    }
    let n = partial.len();
    if y.len() != n {
        return Err(CudaError::Unsupported(format!("output holds {} floats, the partial {n}", y.len())));
    }
    if n == 0 {
        return Ok(());
    }
    let drv = |op: &'static str| move |e| CudaError::driver(op, e);
    let mut gathered = be.stream().alloc_zeros::<f32>(t * n).map_err(drv("alloc"))?;
    let comm_stream = comm.stream();
    // The partial was written on the backend stream; the gather must see it.
    let ready = be.stream().record_event(None).map_err(drv("cuEventRecord"))?;
    comm_stream.wait(&ready).map_err(drv("cuStreamWaitEvent"))?;
    comm.all_gather(&partial.slice().slice(0..n), &mut gathered).map_err(|e| nccl_err("ncclAllGather", e))?;
    let done = comm_stream.record_event(None).map_err(drv("cuEventRecord"))?;
    be.stream().wait(&done).map_err(drv("cuStreamWaitEvent"))?;
    let (base, _guard) = gathered.device_ptr(be.stream());
    let ptrs: Vec<u64> = (0..t).map(|r| base + (r * n * 4) as u64).collect();
    be.tree_combine_ptrs(&ptrs, n, y);
    Ok(())
}
