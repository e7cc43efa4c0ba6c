//! splitmix64 (Steele, Lea & Flood 2014): the workspace's one generator of reproducible
//! pseudo-random numbers that are not sampling noise (sampling noise is Philox, keyed by
//! `(seed, step, token id)` as the numerics contract requires; see [`crate::sampling`]).
//!
//! It serves everything that needs "random but the same every time": synthetic model weights and
//! their tokenizer (node), the seeds of a request's extra choices (coordinator API), the soak
//! tool's background traffic, and the data of the kernel contract tests, CUDA checks and
//! benchmarks. A stream is a pure function of its seed — a 64-bit counter stepped by the golden
//! gamma and passed through a bijective mixer — so it is the same on every platform and in every
//! build. That is the point, and why it lives here rather than as a dependency: changing any output
//! would silently change synthetic weights and the seeds of `n > 1` API choices, so the tests below
//! pin known values.

/// Added to the state at every step: 2⁶⁴ divided by the golden ratio, odd.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// A splitmix64 stream. Value `i` of the stream seeded with `s` is `mix(s + i·γ)`: counter-based,
/// so streams keyed by different seeds never share state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 uniformly distributed bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The first value of the stream seeded with `x`: a stateless, bijective 64-bit mixer, for
    /// deriving one seed from another.
    pub fn mix(x: u64) -> u64 {
        SplitMix64::new(x).next_u64()
    }

    /// Uniform in `0..n` (by remainder: the bias is below `n / 2⁶⁴`). Panics if `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`, 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately N(0, 1): the sum of four 16-bit uniforms, centred and scaled to unit variance
    /// (Irwin–Hall, n = 4): exact mean 0 and variance 1, range ±3.46σ. One 64-bit draw per value.
    #[inline]
    pub fn normal_f32(&mut self) -> f32 {
        let r = self.next_u64();
        let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        // Each (u + 0.5) / 65536 is uniform on (0, 1) with mean 1/2: the sum has mean 2 and
        // variance 4/12, hence the centring at 2 and the factor sqrt(3).
        let s = (sum as f64 + 2.0) / 65536.0;
        ((s - 2.0) * 3f64.sqrt()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_implementation() {
        // The first outputs of Vigna's splitmix64.c seeded with 1234567.
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
        );
        assert_eq!(SplitMix64::mix(1234567), got[0]);
    }

    #[test]
    fn derived_values_are_pinned() {
        // Synthetic weights, API choice seeds and soak traffic are made from these: a change here
        // changes every synthetic model and the seeds of n > 1 choices. (Values from an
        // independent implementation of the same formulas.)
        assert_eq!(SplitMix64::new(42).below(1000), 413);
        assert_eq!(SplitMix64::new(7).unit_f64(), 0.3898297483912715);
        let mut r = SplitMix64::new(0);
        let normals: Vec<f32> = (0..3).map(|_| r.normal_f32()).collect();
        assert_eq!(normals, [1.4286195, 0.13914867, -1.4532249]);
        let bits: Vec<u32> = normals.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, [1068948737, 1041136893, 3216638790]);
    }

    #[test]
    fn normal_generator_moments() {
        let mut r = SplitMix64::new(42);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal_f32() as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        assert!(xs.iter().all(|x| x.abs() <= 3.47));
    }
}
