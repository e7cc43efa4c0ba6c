//! Deterministic test data shared by the contract tests, the CUDA checks and benchmarks: a
//! splitmix64 generator and the value distribution the contract tests use (uniform in [−1, 1)
//! with one value in sixteen scaled by 8, so sums mix exponents). Not for sampling — that is
//! Philox in [`crate::sampling`].

/// splitmix64 (Steele, Lea & Flood): tiny, fast, and the same stream on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    // An infinite stream, not an iterator: callers draw from it in several shapes.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// The contract tests' value distribution.
    pub fn f32(&mut self) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        let v = 2.0 * u - 1.0;
        if self.below(16) == 0 {
            v * 8.0
        } else {
            v
        }
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}
