//! The crate's own transcendental functions.
//!
//! The platform libm differs between glibc, musl, macOS and CUDA, so no output bit may depend on it.
//! Every function here is a fixed sequence of IEEE-754 operations (add, mul, fused multiply-add,
//! correctly rounded division, round-to-nearest-even), which every backend can replay exactly.
//! The f32 functions are on the hot path and have SIMD twins in [`crate::cpu`]; the f64 functions
//! only build tables (RoPE) and are never vectorised.

// The f64 constants are quoted digit for digit from fdlibm so they can be checked against it.
#![allow(clippy::excessive_precision)]

/// `log2(e)` rounded to f32.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two (Cephes): `LN2_HI` has few significant bits so `n × LN2_HI` is exact.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Above this `exp` overflows to +inf; below `EXP_MIN` it underflows to 0.
pub(crate) const EXP_MAX: f32 = 88.722_84;
pub(crate) const EXP_MIN: f32 = -103.972_08;
/// Taylor coefficients of e^r, highest degree first (Horner order).
pub(crate) const EXP_POLY: [f32; 8] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `2^n` for `n` in the normal exponent range `[-126, 127]`.
#[inline(always)]
pub(crate) fn pow2i(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// e^x, the contract's exp.
///
/// `n = rne(x·log2 e)`, `r = x − n·ln2` (two fused steps), `p = Σ rᵏ/k!` for k ≤ 7 by Horner with
/// fma, then `p · 2^⌊n/2⌋ · 2^(n−⌊n/2⌋)` so both scale factors stay normal down to the subnormal
/// range. NaN → NaN, x > 88.72284 → +inf, x < −103.97208 → +0.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_MAX {
        return f32::INFINITY;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let ni = n as i32;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    p * pow2i(n1) * pow2i(n2)
}

/// SiLU as the contract defines it: `x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `sqrt(2)` rounded to f32: the mantissa split point of [`ln`].
const SQRT2: f32 = std::f32::consts::SQRT_2;
/// `1/(2k+1)` for the atanh series of [`ln`], highest degree first.
const LN_POLY: [f32; 6] = [1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0];

/// Natural logarithm, the contract's log.
///
/// `x = 2^e · f` with `f ∈ (√2/2, √2]`, `u = (f−1)/(f+1)`, `ln f = 2u · Σ u^(2k)/(2k+1)` (k ≤ 5, Horner
/// with fma), `ln x = e·LN2_HI + (e·LN2_LO + ln f)` by two fused steps.
#[inline]
pub fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let (mut bits, mut e) = (x.to_bits(), 0i32);
    if x < f32::MIN_POSITIVE {
        bits = (x * 8_388_608.0).to_bits(); // 2^23: exact, brings subnormals to normal
        e = -23;
    }
    e += ((bits >> 23) & 0xff) as i32 - 127;
    let mut f = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if f > SQRT2 {
        f *= 0.5;
        e += 1;
    }
    let u = (f - 1.0) / (f + 1.0);
    let u2 = u * u;
    let mut q = LN_POLY[0];
    for &c in &LN_POLY[1..] {
        q = q.mul_add(u2, c);
    }
    let lnf = (u + u) * q;
    let ef = e as f32;
    ef.mul_add(LN2_HI, ef.mul_add(LN2_LO, lnf))
}

// ---- f64 helpers for tables (fixed algorithms, plain IEEE operations only) ----

const LN2_HI_F64: f64 = 6.931_471_803_691_238_164_90e-1;
const LN2_LO_F64: f64 = 1.908_214_929_270_587_700_02e-10;

/// Natural log in f64 for positive finite normal `x` (atanh series, 13 terms).
pub(crate) fn ln_f64(x: f64) -> f64 {
    assert!(x.is_finite() && x >= f64::MIN_POSITIVE, "ln_f64 domain: {x}");
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut f = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if f > std::f64::consts::SQRT_2 {
        f *= 0.5;
        e += 1;
    }
    let u = (f - 1.0) / (f + 1.0);
    let u2 = u * u;
    let mut q = 0.0f64;
    for k in (0..13).rev() {
        q = q * u2 + 1.0 / (2 * k + 1) as f64;
    }
    let ef = e as f64;
    ef * LN2_HI_F64 + (ef * LN2_LO_F64 + 2.0 * u * q)
}

/// e^x in f64 for |x| < 700 (range reduction by ln 2, Taylor series to degree 16).
pub(crate) fn exp_f64(x: f64) -> f64 {
    assert!(x.abs() < 700.0, "exp_f64 domain: {x}");
    let n = (x / std::f64::consts::LN_2).round_ties_even();
    let r = (x - n * LN2_HI_F64) - n * LN2_LO_F64;
    let mut p = 1.0f64;
    for k in (1..=16).rev() {
        p = 1.0 + p * r / k as f64;
    }
    p * f64::from_bits(((n as i64 + 1023) as u64) << 52)
}

const PIO2_1: f64 = 1.570_796_326_734_125_614_17e0;
const PIO2_2: f64 = 6.077_100_506_506_192_249_32e-11;
const PIO2_3: f64 = 2.022_266_248_711_166_455_80e-21;

/// (sin x, cos x) in f64 for 0 ≤ x < 2^20 (three-part Cody–Waite reduction by π/2, fdlibm kernels).
pub(crate) fn sincos_f64(x: f64) -> (f64, f64) {
    assert!((0.0..1_048_576.0).contains(&x), "sincos_f64 domain: {x}");
    let k = (x * std::f64::consts::FRAC_2_PI).round_ties_even();
    let r = ((x - k * PIO2_1) - k * PIO2_2) - k * PIO2_3;
    let z = r * r;
    let s = r + r
        * z
        * (-1.666_666_666_666_663_243_48e-1
            + z * (8.333_333_333_322_489_461_24e-3
                + z * (-1.984_126_982_985_794_931_34e-4
                    + z * (2.755_731_370_707_006_767_89e-6
                        + z * (-2.505_076_025_340_686_341_95e-8 + z * 1.589_690_995_211_550_102_21e-10)))));
    let c = 1.0 - 0.5 * z
        + z * z
            * (4.166_666_666_666_660_190_37e-2
                + z * (-1.388_888_888_887_410_957_49e-3
                    + z * (2.480_158_728_947_672_941_78e-5
                        + z * (-2.755_731_435_139_066_330_35e-7
                            + z * (2.087_572_321_298_174_827_90e-9 + z * -1.135_964_755_778_819_482_65e-11)))));
    match (k as i64) & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_handles_edges() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 4e-7, "exp relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-100.0) > 0.0, "subnormal range is kept");
    }

    #[test]
    fn ln_is_accurate_and_handles_edges() {
        let mut worst = 0.0f64;
        for i in 1..200_000u32 {
            let x = f32::from_bits(i.wrapping_mul(21_467) % 0x7f00_0000 + 0x0080_0000);
            let got = ln(x) as f64;
            let want = (x as f64).ln();
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        assert!(worst < 3e-7, "ln error {worst}");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
        assert!((ln(1e-40) as f64 - (1e-40f64).ln()).abs() < 1e-4);
    }

    #[test]
    fn f64_helpers_match_libm_closely() {
        for i in 0..2000 {
            let x = i as f64 * 37.17 + 0.001;
            let (s, c) = sincos_f64(x);
            assert!((s - x.sin()).abs() < 1e-12 && (c - x.cos()).abs() < 1e-12, "x={x}");
        }
        for &x in &[1e-300, 0.5, 1.0, 2.0, 10000.0, 500000.0, 1e300] {
            assert!((ln_f64(x) - x.ln()).abs() <= 1e-15 * x.ln().abs().max(1.0), "ln {x}");
        }
        for &x in &[-50.0, -1.0, 0.0, 0.3, 1.0, 20.0, 600.0] {
            assert!(((exp_f64(x) - x.exp()) / x.exp()).abs() < 1e-15, "exp {x}");
        }
    }
}
