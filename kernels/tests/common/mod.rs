//! Test data shared by the contract tests, the CUDA checks and the `gpu_check` example (which
//! includes this file by path): the workspace's splitmix64 and the value distribution the contract
//! tests use. It stays out of the kernels crate's API: it is a property of the tests, not of the
//! kernels.

pub use lockstep_kernels::splitmix::SplitMix64 as Rng;

/// The contract tests' values: uniform in [−1, 1) with one value in sixteen scaled by 8, so that
/// sums mix exponents and rounding order shows in the bits.
pub trait ContractData {
    fn f32(&mut self) -> f32;
    fn vec(&mut self, n: usize) -> Vec<f32>;
}

impl ContractData for Rng {
    fn f32(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let v = 2.0 * u - 1.0;
        if self.below(16) == 0 {
            v * 8.0
        } else {
            v
        }
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// A random `[rows, cols]` matrix of a GGUF block type (`cols` a multiple of 32), as a model file
/// would hold it: every quant byte random; scales (and Q4_1 minimums) from the contract values
/// divided by 16, rounded to f16, with one block in eight given an edge scale (±0, an f16
/// subnormal, the largest f16) so the widening's corner cases are covered.
#[allow(dead_code)] // not every test file that includes this module builds block matrices
pub fn quant_weight(
    rng: &mut Rng,
    dtype: lockstep_kernels::DType,
    rows: usize,
    cols: usize,
) -> lockstep_kernels::HostWeight {
    use lockstep_kernels::{HostWeight, SharedBytes, QUANT_BLOCK};
    let edges = [0x0000u16, 0x8000, 0x0001, 0x83ff, 0x7bff, 0xfbff];
    let scale = |rng: &mut Rng| {
        if rng.below(8) == 0 {
            edges[rng.below(edges.len())]
        } else {
            half::f16::from_f32(rng.f32() / 16.0).to_bits()
        }
    };
    let header = dtype.block_bytes() - QUANT_BLOCK / if dtype == lockstep_kernels::DType::Q8_0 { 1 } else { 2 };
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / QUANT_BLOCK {
        for _ in 0..header / 2 {
            bytes.extend_from_slice(&scale(rng).to_le_bytes());
        }
        for _ in header..dtype.block_bytes() {
            bytes.push(rng.next_u64() as u8);
        }
    }
    HostWeight::new(dtype, SharedBytes::from_vec(bytes), rows, cols).expect("whole blocks")
}

/// Columns `cols` of each row of a row-major `[rows, k]` matrix: a row-parallel rank's share.
#[allow(dead_code)] // not every file that includes this module shards activations
pub fn columns_of(x: &[f32], k: usize, cols: std::ops::Range<usize>) -> Vec<f32> {
    x.chunks_exact(k).flat_map(|row| row[cols.clone()].to_vec()).collect()
}

/// Batch invariance of one backend's linear: each of the first 64 rows of `x` (`k` wide) gives
/// the same output bits alone (M = 1) as inside every batch M = 1…64. `label` names the case in
/// a failure.
#[allow(dead_code)] // the bench and the GPU check include this module without it
pub fn assert_rows_alone_equal_batched(
    be: &lockstep_kernels::cpu::CpuBackend,
    w: &lockstep_kernels::HostWeight,
    x: &[f32],
    k: usize,
    label: &str,
) {
    use lockstep_kernels::Backend;
    let n = w.rows;
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    let alone: Vec<Vec<u32>> = (0..64)
        .map(|i| {
            let mut y = vec![0.0; n];
            be.linear(&x[i * k..(i + 1) * k].to_vec(), 1, w, None, &mut y);
            bits(&y)
        })
        .collect();
    for m in 1..=64 {
        let mut y = vec![0.0; m * n];
        be.linear(&x[..m * k].to_vec(), m, w, None, &mut y);
        for i in 0..m {
            assert_eq!(bits(&y[i * n..(i + 1) * n]), alone[i], "{label} row {i} of M={m}");
        }
    }
}
