//! Launch geometry and the host half of sampling, as pure functions.
//!
//! The backend launches every kernel through these, and the SIMT-emulator test
//! (`kernels/tests/cuda_nvrtc.rs`) runs the same kernel sources on the CPU with the same
//! geometry, so what the emulator proves is about the launches the backend really makes.

use crate::{Candidate, LsePartial, SamplingParams, ShardSample};

/// Grid, block size (threads along x) and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

impl Launch {
    pub fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig { grid_dim: self.grid, block_dim: (self.block, 1, 1), shared_mem_bytes: self.smem }
    }
}

#[track_caller]
fn dim(x: usize, limit: usize, what: &str) -> u32 {
    assert!(x >= 1 && x <= limit, "{what}: {x} blocks is outside the CUDA grid limit {limit}");
    x as u32
}

/// One thread per element, 256 per block.
pub fn elementwise(n: usize) -> Launch {
    Launch { grid: (dim(n.div_ceil(256).max(1), i32::MAX as usize, "elementwise"), 1, 1), block: 256, smem: 0 }
}

/// Portable linear over `m` rows, `n` outputs, `count` segments: `(MT, launch)` where MT is the
/// number of x rows each half-warp carries (a speed choice only: it never changes an output's
/// order). Blocks are 16 half-warps covering `16 / min(count, 16)` output rows.
pub fn linear_portable(m: usize, n: usize, count: usize) -> (usize, Launch) {
    let mt = match m {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    };
    let rows_per_block = 16 / count.min(16);
    let grid = (
        dim(n.div_ceil(rows_per_block), i32::MAX as usize, "linear_portable x"),
        dim(m.div_ceil(mt), 65_535, "linear_portable y"),
        1,
    );
    (mt, Launch { grid, block: 256, smem: 0 })
}

/// Native (tensor-core) linear: 64×64 outputs per 128-thread block, for every shape.
pub fn linear_native(m: usize, n: usize) -> Launch {
    let grid =
        (dim(n.div_ceil(64), i32::MAX as usize, "linear_native x"), dim(m.div_ceil(64), 65_535, "linear_native y"), 1);
    Launch { grid, block: 128, smem: 0 }
}

/// One 256-thread block per row.
pub fn rms_norm(rows: usize) -> Launch {
    Launch { grid: (dim(rows, i32::MAX as usize, "rms_norm"), 1, 1), block: 256, smem: 0 }
}

/// Attention: one warp per (query row, head), up to four heads per block, `kv_chunk` floats of
/// shared memory per warp (≤ 48 KiB per block). Returns `(warps per block, launch)`.
pub fn attention(n_rows: usize, n_heads: usize, kv_chunk: usize) -> (usize, Launch) {
    let warps = (49_152 / (kv_chunk * 4)).clamp(1, 4);
    let grid = (dim(n_rows, i32::MAX as usize, "attention x"), dim(n_heads.div_ceil(warps), 65_535, "attention y"), 1);
    (warps, Launch { grid, block: 32 * warps as u32, smem: (warps * kv_chunk * 4) as u32 })
}

/// Sampling partials: one 256-thread block per (segment of the shard, request).
pub fn sample(count: usize, requests: usize) -> Launch {
    let grid = (dim(count, 64, "sample x"), dim(requests, 65_535, "sample y"), 1);
    Launch { grid, block: 256, smem: 0 }
}

/// `temperature > 0 && (top_k > 0 || top_p < 1)`: such rows need the sorted candidate list, which
/// the host computes with `sampling::shard_sample`.
pub fn filters_on(p: &SamplingParams) -> bool {
    let p = p.effective();
    p.temperature > 0.0 && (p.top_k > 0 || p.top_p < 1.0)
}

/// Row `i`'s report from the kernel's per-segment outputs (`pf`: 5 floats, `pu`: 2 words per
/// (row, segment)): the segments' LSE partials joined by the contract's pairwise tree, and the
/// best candidate over the segments (a total order, so any order gives the same winner).
pub fn assemble_sample(pf: &[f32], pu: &[u32], i: usize, count: usize) -> ShardSample {
    let mut parts = Vec::with_capacity(count);
    let mut best: Option<Candidate> = None;
    for s in 0..count {
        let o = i * count + s;
        parts.push(LsePartial { max: pf[o * 5], sum: pf[o * 5 + 1] });
        if pu[o * 2] != 0 {
            let c = Candidate { id: pu[o * 2 + 1], logit: pf[o * 5 + 2], z: pf[o * 5 + 3], score: pf[o * 5 + 4] };
            if best.is_none_or(|b| crate::sampling::ranks_before(c.score, c.id, b.score, b.id)) {
                best = Some(c);
            }
        }
    }
    ShardSample { lse: crate::sampling::lse_tree(&parts), lse_scaled: None, best, candidates: Vec::new() }
}
