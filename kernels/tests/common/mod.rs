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
