//! Synthetic models: real architectures and configs, random weights from a seed.
//!
//! Benchmarks and invariance tests need models of realistic shape (Qwen2.5-0.5B, Llama-3.2-1B)
//! without downloading gigabytes of real weights. [`synth`] writes an ordinary Hugging Face model
//! directory, so lockstep, transformers and any other tool read it the same way:
//!
//! * `config.json` with the real model's hyper-parameters (dtype as asked);
//! * `generation_config.json`;
//! * `model.safetensors`, or shards + `model.safetensors.index.json` ([`SynthOptions::shards`]),
//!   written by hand (header JSON padded with spaces to 8 bytes, `__metadata__.format = "pt"` as
//!   transformers requires) and streamed tensor by tensor, so a 1B model never needs twice its
//!   size in RAM;
//! * a working byte-level BPE `tokenizer.json` (GPT-2 byte alphabet, merges learned from a small
//!   built-in English text, padded with pseudo-word merges up to the real vocabulary size, the
//!   real special tokens at their real ids) and `tokenizer_config.json` with a chat template.
//!
//! **Determinism.** Every byte is a function of (preset, seed, dtype, options). Tensor `name`
//! draws from its own counter-based stream ([`lockstep_kernels::splitmix`] keyed by the seed and an
//! FNV-1a hash of the name), so a value does not depend on the order tensors are written or how
//! they are sharded.
//! JSON is written with sorted keys (or in a fixed order) by our own writer, so the output does
//! not depend on serde_json features either. The tokenizer does not depend on the seed.
//!
//! **Scale.** Weights are approximately normal (Irwin–Hall sum of four uniforms, exact mean 0,
//! variance 1, range ±3.46σ). Every projection has std `1/sqrt(fan_in)`, so with RMS-normalized
//! inputs each projection output has RMS ≈ 1: attention scores `q·k/sqrt(d)` have std ≈ 1 (a
//! softmax that is neither uniform nor one-hot), each sub-layer adds O(1) to the residual stream,
//! which therefore grows like `sqrt(2 × layers)` (≈ 7 after 24 layers) and never blows up,
//! because every sub-layer reads it through an RMSNorm. The embedding has std `1/sqrt(hidden)`
//! (0.033 for Qwen2.5-0.5B, 0.022 for Llama-3.2-1B), which makes the tied `lm_head` give logits of
//! std ≈ 1. Norm weights are `1 + 0.05·N(0,1)` rather than exactly 1 so that a forward pass that
//! forgets to apply them gives different logits; q/k/v biases have std 0.1.
//!
//! The pieces: `presets` holds each model's shapes and the JSON files describing it,
//! `tokenizer` learns and writes the BPE tokenizer, `weights` draws and writes the safetensors.

mod presets;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

use lockstep_kernels::DType;
use serde_json::{json, Value};

use crate::config::pretty_sorted_json;
use crate::error::{LoadError, Result};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

pub use presets::Preset;
use tokenizer::TokenizerSpec;
use weights::{remove_stale_weights, split_into_shards, write_safetensors};

/// Options beyond preset, seed and dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// 1: one `model.safetensors`; n > 1: `model-0000i-of-0000n.safetensors` shards of roughly
    /// equal size plus `model.safetensors.index.json`, as transformers writes large models.
    pub shards: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions { shards: 1 }
    }
}

/// What [`synth`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    pub dir: PathBuf,
    /// Every file written, in writing order.
    pub files: Vec<PathBuf>,
    pub params: u64,
    /// Bytes of tensor data (without headers).
    pub tensor_bytes: u64,
}

/// Write a complete HF model directory for `preset` into `out_dir` (created if needed).
pub fn synth(preset: Preset, seed: u64, dtype: DType, out_dir: impl AsRef<Path>) -> Result<SynthReport> {
    synth_with(preset, seed, dtype, out_dir, &SynthOptions::default())
}

/// [`synth`] with [`SynthOptions`].
pub fn synth_with(
    preset: Preset,
    seed: u64,
    dtype: DType,
    out_dir: impl AsRef<Path>,
    opts: &SynthOptions,
) -> Result<SynthReport> {
    let dir = out_dir.as_ref().to_path_buf();
    let spec = preset.spec();
    let tensors = spec.tensors();
    if dtype.is_quantized() {
        return Err(LoadError::InvalidConfig {
            file: dir.clone(),
            reason: format!("synth writes safetensors, which cannot hold {} blocks", dtype.as_str()),
        });
    }
    if opts.shards == 0 || opts.shards > tensors.len() {
        return Err(LoadError::InvalidConfig {
            file: dir.clone(),
            reason: format!("shards must be between 1 and {} for {preset}, got {}", tensors.len(), opts.shards),
        });
    }
    std::fs::create_dir_all(&dir).map_err(|e| LoadError::io(&dir, e))?;
    remove_stale_weights(&dir)?;

    let mut files = Vec::new();
    let mut write_text = |name: &str, text: &str| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| LoadError::io(&path, e))?;
        files.push(path);
        Ok(())
    };
    write_text("config.json", &pretty_sorted_json(&spec.config_json(dtype)))?;
    write_text("generation_config.json", &pretty_sorted_json(&spec.generation_config()))?;
    let tok = TokenizerSpec::build(&spec);
    write_text("tokenizer.json", &tok.tokenizer_json(&spec))?;
    write_text("tokenizer_config.json", &pretty_sorted_json(&tok.tokenizer_config(&spec)))?;

    let groups = split_into_shards(&tensors, dtype, opts.shards);
    let mut tensor_bytes = 0u64;
    if groups.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        tensor_bytes += write_safetensors(&path, &tensors, seed, dtype)?;
        files.push(path);
    } else {
        let n = groups.len();
        let mut weight_map = serde_json::Map::new();
        for (i, group) in groups.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            let path = dir.join(&name);
            tensor_bytes += write_safetensors(&path, group, seed, dtype)?;
            files.push(path);
            for t in *group {
                weight_map.insert(t.name.clone(), Value::String(name.clone()));
            }
        }
        let index = json!({"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, pretty_sorted_json(&index)).map_err(|e| LoadError::io(&path, e))?;
        files.push(path);
    }
    Ok(SynthReport { dir, files, params: preset.num_params(), tensor_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::weights::tests::TempDir;
    use crate::weights::{LlamaWeights, SafetensorsRepo};

    #[test]
    fn tiny_is_byte_identical_for_a_seed() {
        let (a, b, c) = (TempDir::new("synth-a"), TempDir::new("synth-b"), TempDir::new("synth-c"));
        let ra = synth(Preset::Tiny, 11, DType::Bf16, a.path()).unwrap();
        synth(Preset::Tiny, 11, DType::Bf16, b.path()).unwrap();
        synth(Preset::Tiny, 12, DType::Bf16, c.path()).unwrap();
        let names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", SINGLE_FILE];
        assert_eq!(ra.files.len(), names.len());
        for name in names {
            let (x, y) = (std::fs::read(a.path().join(name)).unwrap(), std::fs::read(b.path().join(name)).unwrap());
            assert!(x == y, "{name} differs between two runs with the same seed");
        }
        let w = |d: &TempDir| std::fs::read(d.path().join(SINGLE_FILE)).unwrap();
        assert_ne!(w(&a), w(&c), "another seed gives other weights");
        assert_eq!(
            std::fs::read(a.path().join("tokenizer.json")).unwrap(),
            std::fs::read(c.path().join("tokenizer.json")).unwrap(),
            "the tokenizer does not depend on the seed"
        );
        // Re-synthesizing into a used directory replaces the weights cleanly.
        synth_with(Preset::Tiny, 11, DType::Bf16, a.path(), &SynthOptions { shards: 3 }).unwrap();
        assert!(!a.path().join(SINGLE_FILE).exists());
        synth(Preset::Tiny, 11, DType::Bf16, a.path()).unwrap();
        assert!(!a.path().join(INDEX_FILE).exists());
        assert!(!a.path().join("model-00001-of-00003.safetensors").exists());
        assert_eq!(w(&a), w(&b));
    }

    #[test]
    fn tiny_models_load_with_sane_weights() {
        for (p, dtype) in [(Preset::Tiny, DType::F32), (Preset::TinyQwen2, DType::F16)] {
            let dir = TempDir::new("synth-load");
            let report = synth(p, 5, dtype, dir.path()).unwrap();
            let cfg = ModelConfig::from_dir(dir.path()).unwrap();
            let repo = SafetensorsRepo::open(dir.path()).unwrap();
            let w = LlamaWeights::load(&repo, &cfg).unwrap();
            assert_eq!(repo.dtypes(), vec![dtype]);
            assert_eq!(report.params, repo.tensor_names().map(|n| repo.info(n).unwrap().numel() as u64).sum::<u64>());
            assert_eq!(report.tensor_bytes, report.params * dtype.size() as u64);
            assert_eq!(w.lm_head_tied, p == Preset::TinyQwen2);
            assert_eq!(w.layers[0].q_bias.is_some(), p == Preset::TinyQwen2);
            // Each projection has std ≈ 1/sqrt(fan_in); norms ≈ 1.
            let std = |x: &[f32]| (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
            let gate = w.layers[1].gate_proj.view().to_f32();
            let want = 1.0 / (cfg.hidden_size as f64).sqrt();
            assert!((std(&gate) / want - 1.0).abs() < 0.05, "{} vs {want}", std(&gate));
            let norm = w.norm.view().to_f32();
            assert!(norm.iter().all(|x| (0.8..1.2).contains(x)));
            assert!(norm.iter().any(|x| *x != 1.0));
            // Different tensors draw from different streams.
            assert_ne!(w.layers[0].gate_proj.bytes.as_slice(), w.layers[0].up_proj.bytes.as_slice());
        }
    }

    /// Time the 0.5B write (not part of the default suite: ~1 GB of disk).
    #[test]
    #[ignore]
    fn qwen25_05b_bf16_timing() {
        let dir = TempDir::new("synth-qwen");
        let t = std::time::Instant::now();
        let r = synth(Preset::Qwen25_05b, 0, DType::Bf16, dir.path()).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("qwen2.5-0.5b bf16: {} params, {} bytes in {secs:.1} s", r.params, r.tensor_bytes);
        let cfg = ModelConfig::from_dir(dir.path()).unwrap();
        let repo = SafetensorsRepo::open(dir.path()).unwrap();
        LlamaWeights::load(&repo, &cfg).unwrap();
    }

    /// Write a model for tools outside Rust (e.g. `deploy/check_synth_transformers.py`):
    /// `LOCKSTEP_SYNTH_OUT=/tmp/x LOCKSTEP_SYNTH_PRESET=tiny cargo test -p lockstep-node --lib
    /// synth::tests::write_for_external_checks -- --ignored` (optional: `LOCKSTEP_SYNTH_DTYPE=
    /// f32|bf16|f16`, `LOCKSTEP_SYNTH_SHARDS=n`).
    #[test]
    #[ignore]
    fn write_for_external_checks() {
        let out = std::env::var("LOCKSTEP_SYNTH_OUT").expect("set LOCKSTEP_SYNTH_OUT");
        let preset: Preset = std::env::var("LOCKSTEP_SYNTH_PRESET").unwrap_or_else(|_| "tiny".into()).parse().unwrap();
        let shards = std::env::var("LOCKSTEP_SYNTH_SHARDS").map_or(1, |s| s.parse().unwrap());
        let dtype = match std::env::var("LOCKSTEP_SYNTH_DTYPE").as_deref() {
            Ok("bf16") => DType::Bf16,
            Ok("f16") => DType::F16,
            _ => DType::F32,
        };
        let r = synth_with(preset, 0, dtype, &out, &SynthOptions { shards }).unwrap();
        eprintln!("wrote {preset} to {}", r.dir.display());
    }
}
