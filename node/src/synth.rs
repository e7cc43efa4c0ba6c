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
//! draws from its own counter-based stream (splitmix64 keyed by the seed and an FNV-1a hash of the
//! name), so a value does not depend on the order tensors are written or how they are sharded.
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

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lockstep_kernels::DType;
use serde_json::{json, Value};

use crate::config::pretty_sorted_json;
use crate::error::{LoadError, Result};
use crate::weights::{layer_tensor, INDEX_FILE, SINGLE_FILE};

/// The model shapes [`synth`] can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// A tiny Llama: hidden 128, intermediate 344, 2 layers, 8 heads = 8 KV heads of 16 dims, vocab
    /// 512, untied `lm_head`. `q_dim = 128 = 8 × 16` lanes, so `reduce_segments` is 8 and tensor
    /// parallelism 1/2/4/8 all split it along whole heads and whole segments.
    Tiny,
    /// A tiny Qwen2: hidden 64, intermediate 176, 2 layers, 8 heads, 4 KV heads, vocab 512, tied
    /// embeddings and q/k/v biases (the Qwen2.5 code paths at test size).
    TinyQwen2,
    /// Qwen2.5-0.5B's shapes: hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads,
    /// vocab 151936, tied embeddings, q/k/v biases.
    Qwen25_05b,
    /// Llama-3.2-1B's shapes: hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads,
    /// vocab 128256, tied embeddings, llama3 RoPE scaling.
    Llama32_1b,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::TinyQwen2, Preset::Qwen25_05b, Preset::Llama32_1b];

    /// The name used on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::TinyQwen2 => "tiny-qwen2",
            Preset::Qwen25_05b => "qwen2.5-0.5b",
            Preset::Llama32_1b => "llama-3.2-1b",
        }
    }

    fn spec(self) -> Spec {
        match self {
            Preset::Tiny => Spec {
                family: Family::Llama,
                hidden: 128,
                intermediate: 344,
                layers: 2,
                heads: 8,
                kv_heads: 8,
                head_dim: 16,
                vocab: 512,
                tied: false,
                rope_theta: 10000.0,
                llama3_rope: false,
                max_pos: 2048,
                eps: 1e-5,
                specials: SpecialSet::Llama3Short,
            },
            Preset::TinyQwen2 => Spec {
                family: Family::Qwen2,
                hidden: 64,
                intermediate: 176,
                layers: 2,
                heads: 8,
                kv_heads: 4,
                head_dim: 8,
                vocab: 512,
                tied: true,
                rope_theta: 1_000_000.0,
                llama3_rope: false,
                max_pos: 4096,
                eps: 1e-6,
                specials: SpecialSet::QwenShort,
            },
            Preset::Qwen25_05b => Spec {
                family: Family::Qwen2,
                hidden: 896,
                intermediate: 4864,
                layers: 24,
                heads: 14,
                kv_heads: 2,
                head_dim: 64,
                vocab: 151936,
                tied: true,
                rope_theta: 1_000_000.0,
                llama3_rope: false,
                max_pos: 32768,
                eps: 1e-6,
                specials: SpecialSet::Qwen,
            },
            Preset::Llama32_1b => Spec {
                family: Family::Llama,
                hidden: 2048,
                intermediate: 8192,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                head_dim: 64,
                vocab: 128256,
                tied: true,
                rope_theta: 500000.0,
                llama3_rope: true,
                max_pos: 131072,
                eps: 1e-5,
                specials: SpecialSet::Llama3,
            },
        }
    }

    /// Number of parameters written (the tied `lm_head` counted once).
    pub fn num_params(self) -> u64 {
        self.spec().tensors().iter().map(|t| t.numel() as u64).sum()
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Preset::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("unknown preset {s:?} (one of {})", names.join(", "))
        })
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

/// Weights from an earlier synth into the same directory would shadow or mix with the new ones
/// (a leftover `model.safetensors` wins over a new index), so remove exactly those file names.
fn remove_stale_weights(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SINGLE_FILE || name == INDEX_FILE || is_shard_name(&name) {
            std::fs::remove_file(entry.path()).map_err(|e| LoadError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// `model-DDDDD-of-DDDDD.safetensors`
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name.strip_prefix("model-").and_then(|s| s.strip_suffix(".safetensors")) else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(mid.split_once("-of-"), Some((a, b)) if digits(a) && digits(b))
}

/// Cut the tensor list (in model order) into `n` consecutive groups of roughly equal bytes.
fn split_into_shards(tensors: &[TensorSpec], dtype: DType, n: usize) -> Vec<&[TensorSpec]> {
    let bytes = |t: &TensorSpec| (t.numel() * dtype.size()) as u64;
    let total: u64 = tensors.iter().map(bytes).sum();
    let mut groups = Vec::with_capacity(n);
    let (mut start, mut acc) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        acc += bytes(t);
        let left_tensors = tensors.len() - (i + 1);
        let left_groups = n - groups.len() - 1;
        // Close a group once it reaches its share, keeping at least one tensor per later group.
        let reached = acc * n as u64 >= total * (groups.len() as u64 + 1);
        if left_groups > 0 && (reached || left_tensors == left_groups) {
            groups.push(&tensors[start..=i]);
            start = i + 1;
        }
    }
    groups.push(&tensors[start..]);
    groups
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecialSet {
    /// Llama 3's 256 reserved ids at the top of the vocabulary.
    Llama3,
    /// The five Llama 3 tokens a chat needs, at the top of a small vocabulary.
    Llama3Short,
    /// Qwen2.5's 22 added tokens, starting at 151643.
    Qwen,
    /// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` at the top of a small vocabulary.
    QwenShort,
}

struct Spec {
    family: Family,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tied: bool,
    rope_theta: f64,
    llama3_rope: bool,
    max_pos: usize,
    eps: f64,
    specials: SpecialSet,
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// `std × N(0, 1)`
    Normal(f32),
    /// `1 + std × N(0, 1)`
    AroundOne(f32),
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorSpec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Spec {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Every tensor in model order (the order they are written in).
    fn tensors(&self) -> Vec<TensorSpec> {
        let (h, inter, v) = (self.hidden, self.intermediate, self.vocab);
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let fan_in = |n: usize| Init::Normal(1.0 / (n as f32).sqrt());
        let norm = Init::AroundOne(0.05);
        let bias = Init::Normal(0.1);
        let t = |name: String, shape: Vec<usize>, init: Init| TensorSpec { name, shape, init };
        let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, h], fan_in(h))];
        for i in 0..self.layers {
            let l = |s: &str| layer_tensor(i, s);
            out.push(t(l("input_layernorm.weight"), vec![h], norm));
            out.push(t(l("self_attn.q_proj.weight"), vec![q, h], fan_in(h)));
            out.push(t(l("self_attn.k_proj.weight"), vec![kv, h], fan_in(h)));
            out.push(t(l("self_attn.v_proj.weight"), vec![kv, h], fan_in(h)));
            if self.family == Family::Qwen2 {
                out.push(t(l("self_attn.q_proj.bias"), vec![q], bias));
                out.push(t(l("self_attn.k_proj.bias"), vec![kv], bias));
                out.push(t(l("self_attn.v_proj.bias"), vec![kv], bias));
            }
            out.push(t(l("self_attn.o_proj.weight"), vec![h, q], fan_in(q)));
            out.push(t(l("post_attention_layernorm.weight"), vec![h], norm));
            out.push(t(l("mlp.gate_proj.weight"), vec![inter, h], fan_in(h)));
            out.push(t(l("mlp.up_proj.weight"), vec![inter, h], fan_in(h)));
            out.push(t(l("mlp.down_proj.weight"), vec![h, inter], fan_in(inter)));
        }
        out.push(t("model.norm.weight".into(), vec![h], norm));
        if !self.tied {
            out.push(t("lm_head.weight".into(), vec![v, h], fan_in(h)));
        }
        out
    }

    fn config_json(&self, dtype: DType) -> Value {
        let torch_dtype = match dtype {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
        };
        let specials = self.special_tokens();
        let id = |name: &str| specials.iter().find(|(_, n)| n == name).map(|(i, _)| *i).expect("special token");
        let mut c = json!({
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_pos,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "torch_dtype": torch_dtype,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": true,
        });
        let extra = match self.family {
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "head_dim": self.head_dim,
                "attention_bias": false,
                "mlp_bias": false,
                "pretraining_tp": 1,
                "bos_token_id": id("<|begin_of_text|>"),
                "eos_token_id": self.eos_ids(),
                "rope_scaling": if self.llama3_rope {
                    json!({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"})
                } else {
                    Value::Null
                },
            }),
            Family::Qwen2 => json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "bos_token_id": id("<|endoftext|>"),
                "eos_token_id": id("<|im_end|>"),
                "max_window_layers": self.layers,
                "sliding_window": self.max_pos,
                "use_sliding_window": false,
                "rope_scaling": Value::Null,
            }),
        };
        let obj = c.as_object_mut().expect("object");
        obj.extend(extra.as_object().expect("object").clone());
        c
    }

    /// Token ids that end generation.
    fn eos_ids(&self) -> Vec<u32> {
        let specials = self.special_tokens();
        let names: &[&str] = match self.family {
            Family::Llama => &["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
            Family::Qwen2 => &["<|im_end|>", "<|endoftext|>"],
        };
        names.iter().filter_map(|n| specials.iter().find(|(_, s)| s == n).map(|(i, _)| *i)).collect()
    }

    fn generation_config(&self) -> Value {
        let specials = self.special_tokens();
        let bos = match self.family {
            Family::Llama => "<|begin_of_text|>",
            Family::Qwen2 => "<|endoftext|>",
        };
        let bos = specials.iter().find(|(_, s)| s == bos).map(|(i, _)| *i);
        json!({"bos_token_id": bos, "eos_token_id": self.eos_ids(), "do_sample": false})
    }

    /// `(id, content)` of every added special token; ids are the top of the tokenizer's range.
    fn special_tokens(&self) -> Vec<(u32, String)> {
        let from = |first: u32, names: &[&str]| -> Vec<(u32, String)> {
            names.iter().enumerate().map(|(i, n)| (first + i as u32, n.to_string())).collect()
        };
        match self.specials {
            SpecialSet::Llama3 => {
                // Llama 3's layout: 128000.. with named tokens among numbered reserved ones.
                let named: HashMap<u32, &str> = [
                    (128000, "<|begin_of_text|>"),
                    (128001, "<|end_of_text|>"),
                    (128004, "<|finetune_right_pad_id|>"),
                    (128006, "<|start_header_id|>"),
                    (128007, "<|end_header_id|>"),
                    (128008, "<|eom_id|>"),
                    (128009, "<|eot_id|>"),
                    (128010, "<|python_tag|>"),
                ]
                .into_iter()
                .collect();
                let mut reserved = 0;
                (128000..128256u32)
                    .map(|id| match named.get(&id) {
                        Some(n) => (id, n.to_string()),
                        None => {
                            reserved += 1;
                            (id, format!("<|reserved_special_token_{}|>", reserved - 1))
                        }
                    })
                    .collect()
            }
            SpecialSet::Llama3Short => from(
                self.vocab as u32 - 5,
                &["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            ),
            SpecialSet::Qwen => from(
                151643,
                &[
                    "<|endoftext|>",
                    "<|im_start|>",
                    "<|im_end|>",
                    "<|object_ref_start|>",
                    "<|object_ref_end|>",
                    "<|box_start|>",
                    "<|box_end|>",
                    "<|quad_start|>",
                    "<|quad_end|>",
                    "<|vision_start|>",
                    "<|vision_end|>",
                    "<|vision_pad|>",
                    "<|image_pad|>",
                    "<|video_pad|>",
                    "<tool_call>",
                    "</tool_call>",
                    "<|fim_prefix|>",
                    "<|fim_middle|>",
                    "<|fim_suffix|>",
                    "<|fim_pad|>",
                    "<|repo_name|>",
                    "<|file_sep|>",
                ],
            ),
            SpecialSet::QwenShort => from(self.vocab as u32 - 3, &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers

/// splitmix64 (Steele, Lea, Flood 2014): a counter-based generator, value `i` of a stream is a
/// pure function of (key, i); tiny, fast, and good enough for initial weights.
#[derive(Clone)]
struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    fn new(key: u64) -> Self {
        SplitMix64 { state: key }
    }

    #[inline]
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Approximately N(0, 1): the sum of four 16-bit uniforms, centred and scaled to unit
    /// variance (Irwin–Hall, n = 4). One 64-bit draw per value.
    #[inline]
    fn next_normal(&mut self) -> f32 {
        let r = self.next_u64();
        let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        // Each (u + 0.5) / 65536 is uniform on (0, 1) with mean 1/2: the sum has mean 2 and
        // variance 4/12, hence the centring at 2 and the factor sqrt(3).
        let s = (sum as f64 + 2.0) / 65536.0;
        ((s - 2.0) * 3f64.sqrt()) as f32
    }
}

/// FNV-1a over a name, to key each tensor's stream.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

fn tensor_stream(seed: u64, name: &str) -> SplitMix64 {
    // Mix once so that nearby seeds do not give related streams.
    let mut k = SplitMix64::new(seed ^ fnv1a(name));
    SplitMix64::new(k.next_u64())
}

// ---------------------------------------------------------------------------------------------
// Safetensors writer

/// Write one safetensors file holding `tensors`; returns the bytes of tensor data.
fn write_safetensors(path: &Path, tensors: &[TensorSpec], seed: u64, dtype: DType) -> Result<u64> {
    let io = |e| LoadError::io(path, e);
    // The header, in writing order, by hand: fixed layout whatever serde_json's features.
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for t in tensors {
        let len = t.numel() * dtype.size();
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            r#","{}":{{"dtype":"{}","shape":[{}],"data_offsets":[{},{}]}}"#,
            t.name,
            dtype.safetensors_tag(),
            shape.join(","),
            offset,
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    // Pad with spaces so the data starts 8-byte aligned (8 + header length is a multiple of 8).
    let padded = header.len().next_multiple_of(8);
    header.extend(std::iter::repeat_n(' ', padded - header.len()));

    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    // Stream each tensor in chunks: memory stays at one chunk whatever the model size.
    const CHUNK: usize = 1 << 20;
    let mut buf = Vec::with_capacity(CHUNK * 4);
    for t in tensors {
        let mut rng = tensor_stream(seed, &t.name);
        let mut left = t.numel();
        while left > 0 {
            let n = left.min(CHUNK);
            buf.clear();
            fill(&mut buf, &mut rng, t.init, n, dtype);
            w.write_all(&buf).map_err(io)?;
            left -= n;
        }
    }
    // No fsync: a crash mid-write leaves a file the loader reports as truncated.
    w.flush().map_err(io)?;
    Ok(offset as u64)
}

fn fill(buf: &mut Vec<u8>, rng: &mut SplitMix64, init: Init, n: usize, dtype: DType) {
    let value = |rng: &mut SplitMix64| match init {
        Init::Normal(std) => std * rng.next_normal(),
        Init::AroundOne(std) => 1.0 + std * rng.next_normal(),
    };
    // Monomorphic loops per dtype: this is the hot path of a multi-gigabyte write.
    match dtype {
        DType::F32 => (0..n).for_each(|_| buf.extend_from_slice(&value(rng).to_le_bytes())),
        DType::Bf16 => (0..n).for_each(|_| buf.extend_from_slice(&half::bf16::from_f32(value(rng)).to_le_bytes())),
        DType::F16 => (0..n).for_each(|_| buf.extend_from_slice(&half::f16::from_f32(value(rng)).to_le_bytes())),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// Original English text the BPE merges are learned from (written for this purpose).
const CORPUS: &str = "\
Once upon a time, in a small town near the river, there lived a baker who got up before the sun \
every morning. She made bread, cakes and cookies for the people of the town, and everyone said \
that her bread was the best in the whole country. The children would stop at the window on their \
way to school and look at the sweet things inside. One day a little boy named Tom came into the \
shop with his sister. They had only one coin between them, but they wanted to buy something for \
their mother, who was not feeling well.
\"What can we get for this?\" asked Tom. The baker looked at the coin and then at the two \
children. She smiled and said, \"For you, I think this coin is enough for the biggest cake in \
the shop.\" The children were so happy that they ran all the way home, holding the cake between \
them like a treasure. Their mother laughed when she saw it, and she felt better that very day.
The next morning, the children came back with flowers from their garden. They gave them to the \
baker and thanked her again. From then on, they were good friends, and the children often helped \
in the shop after school. They learned how to make bread, how to mix the flour and the water, and \
how long to wait for the dough to rise. Years later, when the baker was old, Tom and his sister \
took over the shop, and they always kept one cake for any child who came in with only one coin.
This is a simple story, but it shows something important about people and the world we live in. \
Small acts of kindness can change the life of another person in ways we cannot see at first. \
The time we spend helping others is never lost. When you think about your own day, you may find \
that there are many chances to be kind: to listen, to share, to say thank you, or to help someone \
who has a problem. These things do not cost much, but they make the world a better place for \
everyone.
Learning is also part of a good life. We read books, we ask questions, and we try new things. \
Some of them work and some of them do not, and that is how we grow. A scientist tests an idea many \
times before she believes it. A student writes and rewrites an answer until it is clear. A team \
of engineers builds a system, measures it, and then makes it faster and more reliable. The same \
request should always give the same answer, and a good system should explain what it does and why.
In 2024 and 2025 there were 12 months in each year, 365 or 366 days, and 24 hours in every day. \
The numbers 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 are the first ten counting numbers. Water boils at \
100 degrees and freezes at 0 degrees. These facts are the same for everyone, everywhere.
";

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_to_char() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("in range")
        };
    }
    map
}

/// Split text roughly like GPT-2's pre-tokenizer regex: a word, number or punctuation run with
/// at most one leading space, or a run of whitespace. (Only used to learn merges; the real
/// pre-tokenization is done by the `ByteLevel` pre-tokenizer the tokenizer file declares.)
fn pretokenize(text: &str) -> Vec<&str> {
    #[derive(PartialEq)]
    enum Class {
        Letter,
        Digit,
        Other,
        Space,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = chars[i].0;
        let mut j = i;
        if chars[i].1 == ' ' && i + 1 < chars.len() && class(chars[i + 1].1) != Class::Space {
            j += 1;
        }
        let c = class(chars[j].1);
        let mut k = j + 1;
        while k < chars.len() && class(chars[k].1) == c {
            k += 1;
        }
        // A whitespace run gives its last space to the following word.
        if c == Class::Space && k < chars.len() && k - j > 1 && chars[k - 1].1 == ' ' {
            k -= 1;
        }
        let end = chars.get(k).map_or(text.len(), |c| c.0);
        pieces.push(&text[start..end]);
        i = k;
    }
    pieces
}

/// The tokenizer's regular vocabulary (byte tokens + merge results) and its merges.
struct TokenizerSpec {
    tokens: Vec<String>,
    merges: Vec<(u32, u32)>,
    specials: Vec<(u32, String)>,
}

impl TokenizerSpec {
    fn build(spec: &Spec) -> Self {
        let specials = spec.special_tokens();
        let regular = specials.iter().map(|(id, _)| *id as usize).min().expect("specials");
        let mut tokens: Vec<String> = byte_to_char().iter().map(|c| c.to_string()).collect();
        let mut ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut merges = Vec::new();
        learn_merges(&mut tokens, &mut ids, &mut merges, regular);
        pad_with_pseudo_words(&mut tokens, &mut ids, &mut merges, regular);
        TokenizerSpec { tokens, merges, specials }
    }

    fn tokenizer_json(&self, spec: &Spec) -> String {
        let s = |x: &str| Value::String(x.to_string()).to_string();
        let added: Vec<String> = self
            .specials
            .iter()
            .map(|(id, content)| {
                format!(
                    r#"    {{"id": {id}, "content": {}, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#,
                    s(content)
                )
            })
            .collect();
        let byte_level = r#"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}"#;
        let post = match spec.family {
            // Llama 3 prepends <|begin_of_text|> to every encoding with special tokens on.
            Family::Llama => {
                let (bos_id, bos) = self.specials.iter().find(|(_, n)| n == "<|begin_of_text|>").expect("bos");
                let b = s(bos);
                format!(
                    r#"{{"type": "Sequence", "processors": [{{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}}, {{"type": "TemplateProcessing", "single": [{{"SpecialToken": {{"id": {b}, "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}], "pair": [{{"SpecialToken": {{"id": {b}, "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": {b}, "type_id": 1}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}], "special_tokens": {{{b}: {{"id": {b}, "ids": [{bos_id}], "tokens": [{b}]}}}}}}]}}"#
                )
            }
            Family::Qwen2 => {
                r#"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}"#
                    .to_string()
            }
        };
        let mut out = String::with_capacity(self.tokens.len() * 40);
        out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
        out.push_str(&format!("  \"added_tokens\": [\n{}\n  ],\n", added.join(",\n")));
        out.push_str("  \"normalizer\": null,\n");
        out.push_str(&format!("  \"pre_tokenizer\": {byte_level},\n"));
        out.push_str(&format!("  \"post_processor\": {post},\n"));
        out.push_str(
            "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true},\n",
        );
        out.push_str(
            "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n    \
             \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": false,\n    \
             \"byte_fallback\": false,\n    \"ignore_merges\": false,\n    \"vocab\": {\n",
        );
        for (i, t) in self.tokens.iter().enumerate() {
            let sep = if i + 1 < self.tokens.len() { "," } else { "" };
            out.push_str(&format!("      {}: {i}{sep}\n", s(t)));
        }
        out.push_str("    },\n    \"merges\": [\n");
        for (i, (a, b)) in self.merges.iter().enumerate() {
            let sep = if i + 1 < self.merges.len() { "," } else { "" };
            let m = format!("{} {}", self.tokens[*a as usize], self.tokens[*b as usize]);
            out.push_str(&format!("      {}{sep}\n", s(&m)));
        }
        out.push_str("    ]\n  }\n}\n");
        out
    }

    fn tokenizer_config(&self, spec: &Spec) -> Value {
        let mut decoder = serde_json::Map::new();
        for (id, content) in &self.specials {
            decoder.insert(
                id.to_string(),
                json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": true}),
            );
        }
        let (bos, eos, pad, template) = match spec.family {
            Family::Llama => (Value::from("<|begin_of_text|>"), "<|eot_id|>", Value::Null, LLAMA3_CHAT_TEMPLATE),
            Family::Qwen2 => (Value::Null, "<|im_end|>", Value::from("<|endoftext|>"), CHATML_TEMPLATE),
        };
        json!({
            "added_tokens_decoder": decoder,
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "chat_template": template,
            "clean_up_tokenization_spaces": false,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": spec.max_pos,
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
    }
}

/// Llama 3's chat format (without the date/tools preamble of the official template).
const LLAMA3_CHAT_TEMPLATE: &str = "{{- bos_token }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// Qwen2.5's ChatML format with its default system message (without the tools branch).
const CHATML_TEMPLATE: &str = "\
{%- if messages | length == 0 or messages[0]['role'] != 'system' %}\
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\
{%- endif %}\
{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Plain BPE training on [`CORPUS`]: repeatedly merge the most frequent adjacent pair (ties to
/// the lowest ids) until `limit` tokens exist or no pair occurs twice.
fn learn_merges(tokens: &mut Vec<String>, ids: &mut HashMap<String, u32>, merges: &mut Vec<(u32, u32)>, limit: usize) {
    let chars = byte_to_char();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for piece in pretokenize(CORPUS) {
        *counts.entry(piece).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, usize)> = counts
        .into_iter()
        .map(|(w, n)| (w.bytes().map(|b| ids[&chars[b as usize].to_string()]).collect(), n))
        .collect();
    words.sort();
    while tokens.len() < limit {
        let mut pairs: HashMap<(u32, u32), usize> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        // Highest count, then lowest pair: a total order, so HashMap iteration order is moot.
        let Some((&(a, b), &n)) = pairs.iter().max_by_key(|(p, n)| (**n, std::cmp::Reverse(**p))) else {
            break;
        };
        if n < 2 {
            break;
        }
        let merged = format!("{}{}", tokens[a as usize], tokens[b as usize]);
        let new = *ids.entry(merged.clone()).or_insert_with(|| {
            tokens.push(merged);
            tokens.len() as u32 - 1
        });
        merges.push((a, b));
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(new);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
}

/// Fill the vocabulary up to `limit` with pseudo-words, each the merge of an existing word-like
/// token and a short letter token, so that every id of a random model decodes to text and every
/// vocabulary entry stays reachable by merges (a valid BPE, as real tokenizers are).
fn pad_with_pseudo_words(
    tokens: &mut Vec<String>,
    ids: &mut HashMap<String, u32>,
    merges: &mut Vec<(u32, u32)>,
    limit: usize,
) {
    let space = byte_to_char()[b' ' as usize];
    let letters = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic());
    let word_like = |s: &str| letters(s.strip_prefix(space).unwrap_or(s));
    let mut stems: Vec<u32> = (0..tokens.len() as u32).filter(|&i| word_like(&tokens[i as usize])).collect();
    let suffixes: Vec<u32> =
        (0..tokens.len() as u32).filter(|&i| letters(&tokens[i as usize]) && tokens[i as usize].len() <= 4).collect();
    // Fixed key: the tokenizer is the same for every weights seed.
    let mut rng = SplitMix64::new(0x746f_6b65_6e69_7a65);
    while tokens.len() < limit {
        let a = stems[(rng.next_u64() % stems.len() as u64) as usize];
        let b = suffixes[(rng.next_u64() % suffixes.len() as u64) as usize];
        let merged = format!("{}{}", tokens[a as usize], tokens[b as usize]);
        if merged.chars().count() > 16 || ids.contains_key(&merged) {
            continue;
        }
        let id = tokens.len() as u32;
        ids.insert(merged.clone(), id);
        tokens.push(merged);
        merges.push((a, b));
        stems.push(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, ModelConfig};
    use crate::weights::tests::TempDir;
    use crate::weights::{LlamaWeights, SafetensorsRepo};
    use lockstep_kernels::RopeScaling;

    #[test]
    fn normal_generator_moments() {
        let mut r = SplitMix64::new(42);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.next_normal() as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        assert!(xs.iter().all(|x| x.abs() <= 3.47));
    }

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
    fn presets_parse_back_with_real_configs() {
        let dir = TempDir::new("synth-configs");
        for p in Preset::ALL {
            let spec = p.spec();
            let path = dir.path().join(format!("{}.json", p.name()));
            std::fs::write(&path, pretty_sorted_json(&spec.config_json(DType::Bf16))).unwrap();
            let c = ModelConfig::from_file(&path).unwrap();
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            assert_eq!(c.declared_dtype(), Some(DType::Bf16));
            assert!(c.vocab_size > spec.special_tokens().last().unwrap().0 as usize);
            match p {
                Preset::Qwen25_05b => {
                    assert_eq!(c.arch, Architecture::Qwen2);
                    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (896, 4864, 24));
                    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (14, 2, 64));
                    assert_eq!((c.vocab_size, c.max_position_embeddings), (151936, 32768));
                    assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_bias);
                    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(151643), vec![151645]));
                    // ~494M parameters, like the real model.
                    assert_eq!(p.num_params(), 494_032_768);
                }
                Preset::Llama32_1b => {
                    assert_eq!(c.arch, Architecture::Llama);
                    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (2048, 8192, 16));
                    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (32, 8, 64));
                    assert_eq!((c.vocab_size, c.max_position_embeddings), (128256, 131072));
                    assert!(c.tie_word_embeddings && !c.qkv_bias);
                    assert_eq!((c.rope_theta, c.rms_norm_eps), (500000.0, 1e-5));
                    assert_eq!(
                        c.rope_scaling,
                        Some(RopeScaling::Llama3 {
                            factor: 32.0,
                            low_freq_factor: 1.0,
                            high_freq_factor: 4.0,
                            original_max_position_embeddings: 8192.0
                        })
                    );
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(128000), vec![128001, 128008, 128009]));
                    assert_eq!(p.num_params(), 1_235_814_400);
                }
                Preset::Tiny => {
                    assert_eq!(
                        (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size),
                        (8, 8, 16, 128)
                    );
                    assert!(!c.tie_word_embeddings);
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(507), vec![508, 511]));
                }
                Preset::TinyQwen2 => {
                    assert_eq!(c.arch, Architecture::Qwen2);
                    assert!(c.tie_word_embeddings && c.qkv_bias);
                    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(509), vec![511]));
                }
            }
        }
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

    #[test]
    fn shard_split_is_balanced_and_complete() {
        let tensors = Preset::Tiny.spec().tensors();
        for n in [1, 2, 3, 5, tensors.len()] {
            let groups = split_into_shards(&tensors, DType::F32, n);
            assert_eq!(groups.len(), n);
            assert!(groups.iter().all(|g| !g.is_empty()));
            assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), tensors.len());
        }
        assert!(is_shard_name("model-00001-of-00002.safetensors"));
        assert!(!is_shard_name("model-1-of-2.safetensors"));
        let dir = TempDir::new("synth-badshards");
        let e = synth_with(Preset::Tiny, 1, DType::F32, dir.path(), &SynthOptions { shards: 0 }).unwrap_err();
        assert!(e.to_string().contains("shards"), "{e}");
    }

    #[test]
    fn pretokenize_keeps_every_byte() {
        let text = "Hello,  world!  It's 2025.\n\n  Done";
        let pieces = pretokenize(text);
        assert_eq!(pieces.concat(), text);
        assert_eq!(&pieces[..4], &["Hello", ",", " ", " world"]);
    }

    fn load_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
    }

    fn check_round_trip(tok: &tokenizers::Tokenizer, text: &str) -> usize {
        let enc = tok.encode(text, false).unwrap();
        let decoded = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(decoded, text);
        enc.get_ids().len()
    }

    #[test]
    fn tiny_tokenizers_load_and_round_trip() {
        for p in [Preset::Tiny, Preset::TinyQwen2] {
            let dir = TempDir::new("synth-tok");
            synth(p, 1, DType::F32, dir.path()).unwrap();
            let tok = load_tokenizer(dir.path());
            assert_eq!(tok.get_vocab_size(true), 512, "{p}");
            let text = "Once upon a time, there was a little girl who loved to read books.";
            let n = check_round_trip(&tok, text);
            assert!(n * 2 < text.len(), "{p}: {n} tokens for {} bytes", text.len());
            for t in ["naïve café, 日本語 🎉\n\ttabs  and   spaces", "", " ", "x", "\u{0}\u{7f}"] {
                check_round_trip(&tok, t);
            }
            let config: Value =
                serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
            let eos = config["eos_token"].as_str().unwrap();
            let eos_id = tok.token_to_id(eos).unwrap();
            let enc = tok.encode(format!("hi{eos}"), false).unwrap();
            assert_eq!(enc.get_ids().last(), Some(&eos_id), "{p}: special tokens are single ids");
            let with_special = tok.encode("hi", true).unwrap();
            match p {
                Preset::Tiny => assert_eq!(with_special.get_ids()[0], 507, "BOS is prepended"),
                _ => assert_eq!(with_special.get_ids(), tok.encode("hi", false).unwrap().get_ids()),
            }
            // Every id decodes (random models emit any id).
            for id in 0..512u32 {
                assert!(tok.id_to_token(id).is_some(), "{p}: id {id}");
            }
        }
    }

    #[test]
    fn full_size_tokenizers_fill_the_vocabulary() {
        for (p, first_special, last) in [(Preset::Qwen25_05b, 151643, 151664), (Preset::Llama32_1b, 128000, 128255)] {
            let spec = p.spec();
            let tok_spec = TokenizerSpec::build(&spec);
            assert_eq!(tok_spec.tokens.len(), first_special as usize);
            let dir = TempDir::new("synth-bigtok");
            std::fs::write(dir.path().join("tokenizer.json"), tok_spec.tokenizer_json(&spec)).unwrap();
            let tok = load_tokenizer(dir.path());
            assert_eq!(tok.get_vocab_size(true), last as usize + 1);
            assert!(tok.get_vocab_size(true) <= spec.vocab);
            let text = "The same request should always give the same answer.";
            assert!(check_round_trip(&tok, text) * 3 < text.len());
            assert!(tok.id_to_token(first_special - 1).is_some());
            let decoded = tok.decode(&[1000, 50_000, first_special - 1], false).unwrap();
            assert!(!decoded.is_empty());
        }
        let qwen = Preset::Qwen25_05b.spec().special_tokens();
        assert_eq!(qwen[2], (151645, "<|im_end|>".to_string()));
        let llama = Preset::Llama32_1b.spec().special_tokens();
        assert_eq!(llama[9], (128009, "<|eot_id|>".to_string()));
        assert_eq!(llama[255], (128255, "<|reserved_special_token_247|>".to_string()));
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
