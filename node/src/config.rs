//! Model configuration, parsed from a Hugging Face `config.json`.
//!
//! lockstep runs three architectures, `LlamaForCausalLM` (Llama 2/3, TinyLlama),
//! `Qwen2ForCausalLM` (Qwen2 / Qwen2.5) and `Qwen3ForCausalLM` (Qwen3 dense). All are the same
//! decoder: RMSNorm → GQA attention with rotate-half RoPE → RMSNorm → SwiGLU MLP; Qwen2 adds
//! biases on q/k/v, Qwen3 an RMSNorm over each query and key head (`q_norm` / `k_norm`) before
//! RoPE. GGUF files are turned into the same JSON first (`gguf`). Anything the forward pass
//! does not implement (sliding-window attention, YaRN/dynamic RoPE, MLP biases, activations other
//! than SiLU) is rejected here with an error naming the file, instead of silently computing
//! something else: a wrong answer that is bitwise reproducible is still wrong.
//!
//! Parsing is done by hand over a [`serde_json::Value`] rather than with `#[derive(Deserialize)]`
//! because HF configs are loose (`eos_token_id` is an int or a list, `head_dim` may be `null`,
//! `rope_scaling` spells its kind `type` or `rope_type`, transformers 5 moved `rope_theta` into
//! `rope_parameters`) and because every error must say which key was wrong.
//!
//! The raw JSON is kept: [`ModelConfig::canonical_json`] is part of the determinism fingerprint.

use std::path::{Path, PathBuf};

use lockstep_kernels::{DType, RopeConfig, RopeScaling};
use serde_json::{Map, Value};

use crate::error::{LoadError, Result};

/// The model architectures lockstep implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `LlamaForCausalLM`: optional q/k/v/o biases (`attention_bias`), usually none.
    Llama,
    /// `Qwen2ForCausalLM`: always q/k/v biases, never an o_proj bias.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head q/k RMSNorm before RoPE; q/k/v/o biases with
    /// `attention_bias` (usually none).
    Qwen3,
}

impl Architecture {
    /// The HF `architectures` entry.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// As written in the file (f64); the forward pass rounds it to f32 once.
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// `lm_head` is the token embedding (no `lm_head.weight` is read).
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (always for Qwen2; `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama or Qwen3 with `attention_bias: true` only).
    pub o_bias: bool,
    /// RMSNorm over each query and key head before RoPE (`q_norm` / `k_norm`, Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence id (`eos_token_id` may be an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` (or transformers 5's `dtype`), e.g. `bfloat16`; informational.
    pub torch_dtype: Option<String>,
    /// The file this was read from (for error messages).
    pub source: PathBuf,
    raw: Value,
}

impl ModelConfig {
    /// Read `<dir>/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("config.json"))
    }

    /// Read and validate a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate config JSON text; `source` only names the file in errors.
    pub fn from_json_str(text: &str, source: impl AsRef<Path>) -> Result<Self> {
        let source = source.as_ref().to_path_buf();
        let raw: Value = serde_json::from_str(text).map_err(|e| LoadError::Json { path: source.clone(), source: e })?;
        Parser { file: &source }.parse(&raw).map(|mut cfg| {
            cfg.raw = raw;
            cfg
        })
    }

    /// RoPE parameters for the kernels' table builder.
    pub fn rope_config(&self) -> RopeConfig {
        RopeConfig { head_dim: self.head_dim, theta: self.rope_theta, scaling: self.rope_scaling.clone() }
    }

    /// Width of the concatenated query heads (`num_attention_heads × head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads (`num_key_value_heads × head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The declared storage dtype, if `torch_dtype` names one lockstep reads.
    pub fn declared_dtype(&self) -> Option<DType> {
        match self.torch_dtype.as_deref()? {
            "float32" => Some(DType::F32),
            "bfloat16" => Some(DType::Bf16),
            "float16" => Some(DType::F16),
            _ => None,
        }
    }

    /// The config JSON as parsed, re-serialized compactly with object keys sorted at every
    /// level. Formatting, key order and number spelling (`1e-05` vs `1e-5`) of the file then do
    /// not matter; any change of a value does. This goes into the determinism fingerprint.
    pub fn canonical_json(&self) -> String {
        canonical_json(&self.raw)
    }

    /// The parsed JSON, as read.
    pub fn raw(&self) -> &Value {
        &self.raw
    }
}

/// Serialize `v` compactly with object keys sorted (independent of serde_json's
/// `preserve_order` feature, which another crate in the build may switch on).
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_sorted(v, None, 0, &mut out);
    out
}

/// Like [`canonical_json`], indented by two spaces (for files people read, e.g. the synthetic
/// model's `config.json`), with a trailing newline.
pub fn pretty_sorted_json(v: &Value) -> String {
    let mut out = String::new();
    write_sorted(v, Some(2), 0, &mut out);
    out.push('\n');
    out
}

fn write_sorted(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(w) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', w * depth));
        }
    };
    match v {
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_sorted(&map[k.as_str()], indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_sorted(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        leaf => out.push_str(&leaf.to_string()),
    }
}

/// Field-by-field extraction with errors that name the file and the key.
struct Parser<'a> {
    file: &'a Path,
}

impl Parser<'_> {
    fn invalid(&self, reason: impl Into<String>) -> LoadError {
        LoadError::InvalidConfig { file: self.file.to_path_buf(), reason: reason.into() }
    }

    /// A key that is absent or `null` reads as `None`.
    fn opt<'v>(&self, obj: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
        obj.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
        match self.opt(obj, key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(format!("{key} must be a non-negative integer, got {v}"))),
        }
    }

    /// A size that must be present and positive.
    fn size(&self, obj: &Map<String, Value>, key: &str) -> Result<usize> {
        match self.opt_usize(obj, key)? {
            None => Err(self.invalid(format!("missing {key}"))),
            Some(0) => Err(self.invalid(format!("{key} must be positive"))),
            Some(n) => Ok(n),
        }
    }

    fn opt_f64(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
        match self.opt(obj, key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.invalid(format!("{key} must be a number, got {v}"))),
        }
    }

    fn opt_bool(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
        match self.opt(obj, key) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.invalid(format!("{key} must be true or false, got {v}")))
            }
        }
    }

    fn token_id(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.invalid(format!("{key} must be a token id, got {v}")))
    }

    /// `eos_token_id`-style fields: absent/null, an int, or a list of ints.
    fn token_ids(&self, obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
        match self.opt(obj, key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.token_id(key, v)).collect(),
            Some(v) => Ok(vec![self.token_id(key, v)?]),
        }
    }

    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let obj = raw.as_object().ok_or_else(|| self.invalid("config.json must be a JSON object"))?;

        let arch = self.architecture(obj)?;

        let hidden_size = self.size(obj, "hidden_size")?;
        let intermediate_size = self.size(obj, "intermediate_size")?;
        let num_hidden_layers = self.size(obj, "num_hidden_layers")?;
        let num_attention_heads = self.size(obj, "num_attention_heads")?;
        let vocab_size = self.size(obj, "vocab_size")?;
        let num_key_value_heads = match self.opt_usize(obj, "num_key_value_heads")? {
            None => num_attention_heads,
            Some(0) => return Err(self.invalid("num_key_value_heads must be positive")),
            Some(n) => n,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.invalid(format!(
                "num_attention_heads ({num_attention_heads}) is not divisible by \
                 num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match self.opt_usize(obj, "head_dim")? {
            Some(0) => return Err(self.invalid("head_dim must be positive")),
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(self.invalid(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads \
                         ({num_attention_heads}) and no head_dim is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        // Rotate-half RoPE pairs dimension i with i + head_dim/2.
        if head_dim % 2 != 0 {
            return Err(self.invalid(format!("head_dim ({head_dim}) must be even for RoPE")));
        }

        // Defaults follow transformers' LlamaConfig / Qwen2Config.
        let rms_norm_eps = self.opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(self.invalid(format!("rms_norm_eps must be finite and >= 0, got {rms_norm_eps}")));
        }
        let max_position_embeddings = match self.opt_usize(obj, "max_position_embeddings")? {
            Some(0) => return Err(self.invalid("max_position_embeddings must be positive")),
            Some(n) => n,
            None => match arch {
                Architecture::Llama => 2048,
                Architecture::Qwen2 => 32768,
                Architecture::Qwen3 => 40960,
            },
        };

        let (rope_theta, rope_scaling) = self.rope(obj)?;

        let hidden_act = match self.opt(obj, "hidden_act") {
            None => "silu",
            Some(v) => v.as_str().ok_or_else(|| self.invalid(format!("hidden_act must be a string, got {v}")))?,
        };
        if hidden_act != "silu" {
            return Err(self.invalid(format!("hidden_act {hidden_act:?} is not supported (only silu)")));
        }
        if self.opt_bool(obj, "mlp_bias")?.unwrap_or(false) {
            return Err(self.invalid("mlp_bias: true is not supported"));
        }
        if arch != Architecture::Llama && self.opt_bool(obj, "use_sliding_window")?.unwrap_or(false) {
            return Err(self.invalid("use_sliding_window: true is not supported"));
        }
        let attention_bias = self.opt_bool(obj, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };

        let tie_word_embeddings = self.opt_bool(obj, "tie_word_embeddings")?.unwrap_or(false);
        let bos = self.token_ids(obj, "bos_token_id")?;
        if bos.len() > 1 {
            return Err(self.invalid("bos_token_id must be a single id"));
        }
        let eos_token_ids = self.token_ids(obj, "eos_token_id")?;
        let torch_dtype = match self.opt(obj, "torch_dtype").or_else(|| self.opt(obj, "dtype")) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(self.invalid(format!("torch_dtype must be a string, got {v}"))),
        };

        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            qk_norm: arch == Architecture::Qwen3,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            torch_dtype,
            source: self.file.to_path_buf(),
            raw: Value::Null,
        })
    }

    fn architecture(&self, obj: &Map<String, Value>) -> Result<Architecture> {
        let unsupported = |arch: String| LoadError::UnsupportedArchitecture { file: self.file.to_path_buf(), arch };
        let archs = match self.opt(obj, "architectures") {
            Some(Value::Array(a)) => a,
            Some(v) => return Err(self.invalid(format!("architectures must be a list, got {v}"))),
            None => {
                // Fall back on model_type, which every HF config carries.
                let model_type = self.opt(obj, "model_type").and_then(Value::as_str);
                return match model_type {
                    Some("llama") => Ok(Architecture::Llama),
                    Some("qwen2") => Ok(Architecture::Qwen2),
                    Some("qwen3") => Ok(Architecture::Qwen3),
                    Some(other) => Err(unsupported(format!("model_type {other}"))),
                    None => Err(self.invalid("neither architectures nor model_type is given")),
                };
            }
        };
        match archs.as_slice() {
            [Value::String(s)] => match s.as_str() {
                "LlamaForCausalLM" => Ok(Architecture::Llama),
                "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
                "Qwen3ForCausalLM" => Ok(Architecture::Qwen3),
                other => Err(unsupported(other.to_string())),
            },
            [] => Err(self.invalid("architectures is empty")),
            other => Err(unsupported(Value::Array(other.to_vec()).to_string())),
        }
    }

    /// `rope_theta` + `rope_scaling`, or transformers 5's `rope_parameters` holding both.
    fn rope(&self, obj: &Map<String, Value>) -> Result<(f64, Option<RopeScaling>)> {
        let params = match self.opt(obj, "rope_parameters") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(v) => return Err(self.invalid(format!("rope_parameters must be an object, got {v}"))),
        };
        let theta = match params {
            Some(p) => self.opt_f64(p, "rope_theta")?,
            None => None,
        };
        let theta = match theta {
            Some(t) => t,
            None => self.opt_f64(obj, "rope_theta")?.unwrap_or(10000.0),
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(self.invalid(format!("rope_theta must be positive, got {theta}")));
        }
        let scaling = match (params, self.opt(obj, "rope_scaling")) {
            (_, Some(Value::Object(s))) => self.rope_scaling(s)?,
            (_, Some(v)) => return Err(self.invalid(format!("rope_scaling must be an object or null, got {v}"))),
            (Some(p), None) => self.rope_scaling(p)?,
            (None, None) => None,
        };
        Ok((theta, scaling))
    }

    fn rope_scaling(&self, s: &Map<String, Value>) -> Result<Option<RopeScaling>> {
        let kind = self
            .opt(s, "rope_type")
            .or_else(|| self.opt(s, "type"))
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.invalid(format!("rope_scaling type must be a string, got {v}")))
            })
            .transpose()?;
        let factor = |key: &str| -> Result<f64> {
            let v = self.opt_f64(s, key)?.ok_or_else(|| self.invalid(format!("rope_scaling is missing {key}")))?;
            if !(v.is_finite() && v > 0.0) {
                return Err(self.invalid(format!("rope_scaling {key} must be positive, got {v}")));
            }
            Ok(v)
        };
        match kind.as_deref() {
            None | Some("default") => Ok(None),
            Some("linear") => Ok(Some(RopeScaling::Linear { factor: factor("factor")? })),
            Some("llama3") => {
                let low = factor("low_freq_factor")?;
                let high = factor("high_freq_factor")?;
                if high <= low {
                    return Err(self.invalid(format!(
                        "rope_scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})"
                    )));
                }
                Ok(Some(RopeScaling::Llama3 {
                    factor: factor("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: factor("original_max_position_embeddings")?,
                }))
            }
            Some(other) => {
                Err(LoadError::UnsupportedRopeScaling { file: self.file.to_path_buf(), kind: other.to_string() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, "test/config.json")
    }

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":8,"vocab_size":512}"#;

    fn with(extra: &str) -> String {
        format!("{},{extra}}}", LLAMA.trim_end().trim_end_matches('}'))
    }

    #[test]
    fn stories260k_config() {
        let Some(dir) = lockstep_test_env::stories260k() else { return };
        let c = ModelConfig::from_dir(&dir).unwrap();
        assert_eq!(c.arch, Architecture::Llama);
        assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (64, 172, 5));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (8, 4, 8));
        assert_eq!(c.vocab_size, 512);
        assert!(c.tie_word_embeddings);
        assert!(!c.qkv_bias && !c.o_bias);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.max_position_embeddings, 512);
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
        assert_eq!(c.declared_dtype(), Some(DType::F32));
        assert_eq!(c.gqa_group(), 2);
        assert_eq!((c.q_dim(), c.kv_dim()), (64, 32));
    }

    #[test]
    fn defaults() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(!c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(c.bos_token_id, None);
        assert!(c.eos_token_ids.is_empty());
        let r = c.rope_config();
        assert_eq!((r.head_dim, r.theta, r.scaling), (8, 10000.0, None));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_eos_list() {
        let j = LLAMA.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        let j = format!(
            "{},\"eos_token_id\":[5,6],\"bos_token_id\":null,\"head_dim\":null}}",
            j.trim_end().trim_end_matches('}')
        );
        let c = parse(&j).unwrap();
        assert_eq!(c.arch, Architecture::Qwen2);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert_eq!(c.max_position_embeddings, 32768);
        assert_eq!(c.head_dim, 8);
    }

    #[test]
    fn llama_attention_bias() {
        let c = parse(&with(r#""attention_bias":true"#)).unwrap();
        assert!(c.qkv_bias && c.o_bias);
    }

    #[test]
    fn rope_scaling_kinds() {
        let c = parse(&with(
            r#""rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
               "original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0"#,
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            })
        );
        let c = parse(&with(r#""rope_scaling":{"type":"linear","factor":2}"#)).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let c = parse(&with(r#""rope_scaling":{"rope_type":"default"}"#)).unwrap();
        assert_eq!(c.rope_scaling, None);
        // transformers 5 layout.
        let c = parse(&with(r#""rope_parameters":{"rope_type":"linear","factor":4.0,"rope_theta":1e6}"#)).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));

        let e = parse(&with(r#""rope_scaling":{"rope_type":"yarn","factor":4.0}"#)).unwrap_err();
        assert!(matches!(&e, LoadError::UnsupportedRopeScaling { kind, .. } if kind == "yarn"), "{e}");
        assert!(e.to_string().contains("test/config.json"), "{e}");
        let e = parse(&with(r#""rope_scaling":{"rope_type":"llama3","factor":8.0}"#)).unwrap_err();
        assert!(e.to_string().contains("low_freq_factor"), "{e}");
    }

    #[test]
    fn unknown_architecture_names_file_and_arch() {
        let e = parse(&LLAMA.replace("LlamaForCausalLM", "MistralForCausalLM")).unwrap_err();
        match &e {
            LoadError::UnsupportedArchitecture { file, arch } => {
                assert_eq!(file, Path::new("test/config.json"));
                assert_eq!(arch, "MistralForCausalLM");
            }
            other => panic!("wrong error {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("test/config.json") && msg.contains("MistralForCausalLM"), "{msg}");
    }

    #[test]
    fn invalid_configs() {
        let cases = [
            (with(r#""num_key_value_heads":3"#), "divisible"),
            (with(r#""mlp_bias":true"#), "mlp_bias"),
            (with(r#""hidden_act":"gelu""#), "gelu"),
            (with(r#""head_dim":0"#), "head_dim"),
            (with(r#""rope_theta":-1"#), "rope_theta"),
            (with(r#""eos_token_id":"x""#), "eos_token_id"),
            (LLAMA.replace("\"hidden_size\":64,", ""), "missing hidden_size"),
            (LLAMA.replace("\"vocab_size\":512", "\"vocab_size\":0"), "vocab_size must be positive"),
            (
                LLAMA.replace("LlamaForCausalLM", "Qwen2ForCausalLM").replace('}', ",\"use_sliding_window\":true}"),
                "sliding",
            ),
        ];
        for (json, needle) in cases {
            let e = parse(&json).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, LoadError::InvalidConfig { .. }), "{msg}");
            assert!(msg.contains(needle) && msg.contains("test/config.json"), "{needle}: {msg}");
        }
        let e = parse("{not json").unwrap_err();
        assert!(matches!(e, LoadError::Json { .. }), "{e}");
    }

    #[test]
    fn canonical_json_ignores_formatting_not_values() {
        let a = parse(LLAMA).unwrap();
        let reordered = r#"{ "vocab_size": 512, "num_attention_heads": 8, "num_hidden_layers": 2,
            "intermediate_size": 172, "hidden_size": 64, "architectures": [ "LlamaForCausalLM" ] }"#;
        let b = parse(reordered).unwrap();
        assert_eq!(a.canonical_json(), b.canonical_json());
        assert!(a.canonical_json().starts_with(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64"#));
        let c = parse(&LLAMA.replace("\"vocab_size\":512", "\"vocab_size\":513")).unwrap();
        assert_ne!(a.canonical_json(), c.canonical_json());
        // The pretty form parses back to the same value.
        let back: Value = serde_json::from_str(&pretty_sorted_json(a.raw())).unwrap();
        assert_eq!(&back, a.raw());
    }
}
