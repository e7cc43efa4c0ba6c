//! Rotary position embedding tables (rotate-half, Hugging Face layout).
//!
//! The tables are built once by a fixed algorithm in f64 with the crate's own `ln`, `exp` and
//! `sincos` (never the platform libm), then each entry is rounded once to f32. So every machine and
//! every backend uses the same bits; a GPU backend uploads these tables rather than computing its own.

use crate::math::{exp_f64, ln_f64, sincos_f64};
use crate::KernelError;

/// `rope_scaling` from a model config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 style: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeConfig {
    pub head_dim: usize,
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// Inverse frequencies `1 / θ^(2i/d)` for `i < d/2`, after scaling, in f64.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let ln_theta = ln_f64(self.theta);
        let base: Vec<f64> = (0..self.head_dim / 2).map(|i| exp_f64(-((2 * i) as f64 / d) * ln_theta)).collect();
        match &self.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// `cos` and `sin` of `pos × inv_freq[i]`, `[max_positions, head_dim / 2]`, rounded to f32.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub head_dim: usize,
    pub max_positions: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTables {
    pub fn new(cfg: &RopeConfig, max_positions: usize) -> Result<Self, KernelError> {
        let half = cfg.head_dim / 2;
        let inv = cfg.inv_freq();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                let (s, c) = sincos_f64(p as f64 * f);
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Ok(RopeTables { head_dim: cfg.head_dim, max_positions, cos, sin })
    }

    /// The `(cos, sin)` rows of position `pos`.
    #[inline]
    pub fn row(&self, pos: usize) -> Result<(&[f32], &[f32]), KernelError> {
        if pos >= self.max_positions {
            return Err(KernelError::RopePosition { pos, max: self.max_positions });
        }
        let h = self.head_dim / 2;
        Ok((&self.cos[pos * h..(pos + 1) * h], &self.sin[pos * h..(pos + 1) * h]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_f64_libm_within_rounding() {
        let cfg = RopeConfig { head_dim: 64, theta: 10000.0, scaling: None };
        let t = RopeTables::new(&cfg, 512).unwrap();
        for p in [0usize, 1, 7, 100, 511] {
            let (c, s) = t.row(p).unwrap();
            for i in 0..32 {
                let a = p as f64 / 10000f64.powf(2.0 * i as f64 / 64.0);
                assert!((c[i] as f64 - a.cos()).abs() < 1e-6 && (s[i] as f64 - a.sin()).abs() < 1e-6);
            }
        }
        assert!(t.row(512).is_err());
    }

    #[test]
    fn llama3_scaling_follows_hf_rule() {
        let plain = RopeConfig { head_dim: 64, theta: 500000.0, scaling: None }.inv_freq();
        let cfg = RopeConfig {
            head_dim: 64,
            theta: 500000.0,
            scaling: Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
        };
        let scaled = cfg.inv_freq();
        // Highest frequency untouched, lowest divided by the factor.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 32.0).abs() < 1e-18);
        assert!(scaled.iter().zip(&plain).all(|(s, p)| s <= p));
    }
}
