//! GGUF model files (llama.cpp, Ollama): one file holding the config, the tokenizer and the
//! tensors.
//!
//! The file is read with candle-core's `quantized::gguf_file` (header, metadata, tensor table)
//! over a memory map, so no hand-written parser decides what a GGUF file means; candle's
//! dequantization is the reference for every quantized type. What lockstep adds:
//!
//! * **Metadata → [`ModelConfig`].** The `<arch>.*` keys are written into the JSON a Hugging Face
//!   `config.json` would hold and parsed by the same validating parser, so a GGUF model and its HF
//!   twin get the same config (and every check the HF path has). Architectures: `llama`, `qwen2`,
//!   `qwen3`. The weights hash covers the whole file (metadata and tensor bytes), and the config
//!   JSON covers the metadata used, so the fingerprint covers both.
//! * **Tensors under Hugging Face names** ([`GgufModel`]), so the forward pass loads a GGUF and a
//!   safetensors model through one code path ([`crate::source::WeightStore`]). GGUF stores dims
//!   innermost first (candle reverses them to `[rows, cols]`).
//! * **Dtypes.** F32, F16 and BF16 tensors, and the block types Q8_0, Q4_0 and Q4_1, are used in
//!   place in the map (zero-copy): the kernels widen each block weight in registers by candle's
//!   own formula (DESIGN §2.1), so a kept-quantized weight multiplies exactly as candle's
//!   dequantized matrix would. Every other quantized type (Q5_*, the K-quants) goes through ONE
//!   function, [`dequantize`], which widens it with candle's dequantization and rounds to
//!   [`DEQUANTIZED_DTYPE`]. Q8_1 and Q8_K are llama.cpp's activation formats, never stored
//!   weights, and are refused with the tensor's name.
//! * **RoPE layout.** llama.cpp's converter permutes the rows of `attn_q` / `attn_k` of the
//!   `llama` architecture inside each head (it rotates interleaved pairs `(2i, 2i+1)`, HF rotates
//!   halves `(i, i + d/2)`); [`unpermute_heads`] undoes it so the rotate-half RoPE of the kernels
//!   sees the HF layout. `qwen2` / `qwen3` are stored unpermuted (llama.cpp uses NeoX RoPE there).
//! * **Tokenizer metadata** ([`GgufTokenizer`]): the `tokenizer.ggml.*` keys and
//!   `tokenizer.chat_template`, read here and built into a `tokenizers` tokenizer by the
//!   coordinator.
//!
//! Errors name the file and the key or tensor: a truncated file (the first tensor cut off), an
//! unknown architecture, an unsupported tensor type, a missing or mistyped key.

use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use lockstep_kernels::{DType, HostWeight, SharedBytes};
use memmap2::Mmap;
use serde_json::{json, Map, Value as Json};

use crate::config::{pretty_sorted_json, Architecture, ModelConfig};
use crate::error::{LoadError, Result};
use crate::weights::{copy_cols, WeightFile};

/// What a quantized tensor the kernels cannot keep ([`kept_dtype`]) is widened to at load.
pub const DEQUANTIZED_DTYPE: DType = DType::Bf16;

/// The kernels' dtype for a GGUF tensor type they multiply in place, if any.
pub fn kept_dtype(t: GgmlDType) -> Option<DType> {
    match t {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::Bf16),
        GgmlDType::Q8_0 => Some(DType::Q8_0),
        GgmlDType::Q4_0 => Some(DType::Q4_0),
        GgmlDType::Q4_1 => Some(DType::Q4_1),
        _ => None,
    }
}

/// Whether `path` names a GGUF file (by its extension, as llama.cpp and Ollama name them).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// One memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    len: u64,
    map: Arc<Mmap>,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Map the file, read its header and check that every tensor lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| LoadError::io(&path, e))?;
        let len = file.metadata().map_err(|e| LoadError::io(&path, e))?.len();
        // SAFETY: the map is read-only and model files are treated as immutable while served
        // (as for safetensors, see `weights`); every tensor range is checked against `len`.
        let map = unsafe { crate::weights::map_model_file(&file) }.map_err(|e| LoadError::io(&path, e))?;
        let content = Content::read(&mut Cursor::new(&map[..]))
            .map_err(|e| LoadError::Gguf { file: path.clone(), reason: e.to_string() })?;
        let gguf = GgufFile { path, len, map: Arc::new(map), content };
        // Report the first tensor (in file order) that a truncated download cut off.
        let mut by_offset: Vec<(&String, &TensorInfo)> = gguf.content.tensor_infos.iter().collect();
        by_offset.sort_by_key(|(_, t)| t.offset);
        for (name, info) in by_offset {
            let range = gguf.byte_range(name, info)?;
            if range.end as u64 > len {
                return Err(LoadError::Truncated {
                    file: gguf.path.clone(),
                    name: name.clone(),
                    needed: range.end as u64,
                    file_len: len,
                });
            }
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file with its size (what the weights hash covers).
    pub fn weight_file(&self) -> WeightFile {
        WeightFile { path: self.path.clone(), size: self.len }
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names as stored (GGUF names such as `blk.0.attn_q.weight`).
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    fn byte_range(&self, name: &str, info: &TensorInfo) -> Result<Range<usize>> {
        let elems = info.shape.elem_count();
        let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        if !elems.is_multiple_of(block) {
            return Err(self.corrupt(format!(
                "tensor {name:?} has {elems} elements, not a multiple of the {:?} block of {block}",
                info.ggml_dtype
            )));
        }
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let end = start.saturating_add((elems / block * size) as u64);
        Ok(usize::try_from(start).unwrap_or(usize::MAX)..usize::try_from(end).unwrap_or(usize::MAX))
    }

    fn corrupt(&self, reason: String) -> LoadError {
        LoadError::Gguf { file: self.path.clone(), reason }
    }

    fn missing_key(&self, key: &str) -> LoadError {
        LoadError::MissingKey { file: self.path.clone(), key: key.to_string() }
    }

    fn bad_key(&self, key: &str, reason: impl Into<String>) -> LoadError {
        LoadError::BadKey { file: self.path.clone(), key: key.to_string(), reason: reason.into() }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// An unsigned integer key of any integer width.
    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| int_value(v).ok_or_else(|| self.bad_key(key, type_error("an integer", v)))).transpose()
    }

    fn u64_key(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing_key(key))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| match v {
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                other => int_value(other).map(|n| n as f64).ok_or_else(|| self.bad_key(key, type_error("a number", v))),
            })
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad_key(key, type_error("a string", other))),
            })
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => Err(self.bad_key(key, type_error("a bool", other))),
            })
            .transpose()
    }

    fn opt_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(items) => Ok(items.as_slice()),
                other => Err(self.bad_key(key, type_error("an array", other))),
            })
            .transpose()
    }

    fn array<T>(&self, key: &str, what: &str, each: impl Fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(items) = self.opt_array(key)? else { return Ok(None) };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| each(v).ok_or_else(|| self.bad_key(key, format!("element {i} is not {what}"))))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    /// `general.architecture`, one of the three lockstep runs.
    pub fn architecture(&self) -> Result<Architecture> {
        let key = "general.architecture";
        let name = self.opt_str(key)?.ok_or_else(|| self.missing_key(key))?;
        match name {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            other => {
                Err(LoadError::UnsupportedArchitecture { file: self.path.clone(), arch: format!("{key} = {other}") })
            }
        }
    }

    /// The model config: the `<arch>.*` keys written as the HF `config.json` they stand for,
    /// then validated by [`ModelConfig::from_json_str`].
    pub fn config(&self) -> Result<ModelConfig> {
        let json = self.config_json()?;
        ModelConfig::from_json_str(&pretty_sorted_json(&json), &self.path)
    }

    fn config_json(&self) -> Result<Json> {
        let arch = self.architecture()?;
        let prefix = match arch {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        };
        let k = |s: &str| format!("{prefix}.{s}");
        let mut c = Map::new();
        c.insert("architectures".into(), json!([arch.hf_name()]));
        let required = [
            ("hidden_size", "embedding_length"),
            ("intermediate_size", "feed_forward_length"),
            ("num_hidden_layers", "block_count"),
            ("num_attention_heads", "attention.head_count"),
        ];
        for (hf, key) in required {
            c.insert(hf.into(), self.u64_key(&k(key))?.into());
        }
        let optional = [
            ("num_key_value_heads", "attention.head_count_kv"),
            ("head_dim", "attention.key_length"),
            ("max_position_embeddings", "context_length"),
        ];
        for (hf, key) in optional {
            if let Some(n) = self.opt_u64(&k(key))? {
                c.insert(hf.into(), n.into());
            }
        }
        if let Some(v) = self.opt_u64(&k("attention.value_length"))? {
            let key_length = self.opt_u64(&k("attention.key_length"))?;
            if key_length.is_some_and(|kl| kl != v) {
                return Err(self.bad_key(&k("attention.value_length"), "differs from attention.key_length"));
            }
        }
        let eps_key = k("attention.layer_norm_rms_epsilon");
        let eps = self.opt_f64(&eps_key)?.ok_or_else(|| self.missing_key(&eps_key))?;
        c.insert("rms_norm_eps".into(), eps.into());
        if let Some(theta) = self.opt_f64(&k("rope.freq_base"))? {
            c.insert("rope_theta".into(), theta.into());
        }
        match self.opt_str(&k("rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") => {
                let factor_key = k("rope.scaling.factor");
                let factor = self.opt_f64(&factor_key)?.ok_or_else(|| self.missing_key(&factor_key))?;
                c.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": factor}));
            }
            Some(other) => {
                return Err(LoadError::UnsupportedRopeScaling { file: self.path.clone(), kind: other.to_string() })
            }
        }
        // llama.cpp stores Llama 3.1-style frequency scaling as a tensor of factors, which the
        // kernels' table builder does not take.
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(LoadError::UnsupportedRopeScaling {
                file: self.path.clone(),
                kind: "rope_freqs.weight (per-frequency factors)".into(),
            });
        }
        if self.opt_u64(&k("attention.sliding_window"))?.is_some() {
            return Err(self.bad_key(&k("attention.sliding_window"), "sliding-window attention is not supported"));
        }
        let embed = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| LoadError::MissingTensor { file: self.path.clone(), name: "token_embd.weight".into() })?;
        let vocab = embed.shape.dims().first().copied().unwrap_or(0);
        c.insert("vocab_size".into(), vocab.into());
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        c.insert("tie_word_embeddings".into(), (!has("output.weight")).into());
        if arch != Architecture::Qwen2 {
            c.insert("attention_bias".into(), has("blk.0.attn_q.bias").into());
        }
        if let Some(id) = self.opt_u64("tokenizer.ggml.bos_token_id")? {
            c.insert("bos_token_id".into(), id.into());
        }
        if let Some(id) = self.opt_u64("tokenizer.ggml.eos_token_id")? {
            c.insert("eos_token_id".into(), id.into());
        }
        Ok(Json::Object(c))
    }

    /// The tokenizer keys (see [`GgufTokenizer`]).
    pub fn tokenizer(&self) -> Result<GgufTokenizer> {
        let model_key = "tokenizer.ggml.model";
        let model = self.opt_str(model_key)?.ok_or_else(|| self.missing_key(model_key))?.to_string();
        let kind = match model.as_str() {
            "gpt2" => GgufTokenizerKind::Gpt2,
            "llama" => GgufTokenizerKind::Llama,
            other => {
                return Err(self.bad_key(model_key, format!("tokenizer model {other:?} is not supported (gpt2, llama)")))
            }
        };
        let string = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        };
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens = self.array(tokens_key, "a string", string)?.ok_or_else(|| self.missing_key(tokens_key))?;
        let scores = self.array("tokenizer.ggml.scores", "a number", |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })?;
        let token_types = self
            .array("tokenizer.ggml.token_type", "an integer", |v| int_value(v).and_then(|n| i32::try_from(n).ok()))?;
        let merges = self.array("tokenizer.ggml.merges", "a string", string)?;
        match kind {
            GgufTokenizerKind::Gpt2 if merges.is_none() => return Err(self.missing_key("tokenizer.ggml.merges")),
            GgufTokenizerKind::Llama if scores.is_none() => return Err(self.missing_key("tokenizer.ggml.scores")),
            _ => {}
        }
        for (key, len) in [
            ("tokenizer.ggml.scores", scores.as_ref().map(Vec::len)),
            ("tokenizer.ggml.token_type", token_types.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len.filter(|&n| n != tokens.len()) {
                return Err(self.bad_key(key, format!("has {len} entries for {} tokens", tokens.len())));
            }
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match self.opt_u64(key)? {
                Some(id) if id as usize >= tokens.len() => {
                    Err(self.bad_key(key, format!("id {id} is outside the {} tokens", tokens.len())))
                }
                other => Ok(other.map(|id| id as u32)),
            }
        };
        Ok(GgufTokenizer {
            kind,
            pre: self.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            add_bos_token: self.opt_bool("tokenizer.ggml.add_bos_token")?,
            add_eos_token: self.opt_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: self.opt_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: self.opt_str("tokenizer.chat_template")?.map(str::to_string),
            tokens,
            scores,
            token_types,
            merges,
            source: self.path.clone(),
        })
    }
}

fn int_value(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(n) => Some(n as u64),
        Value::U16(n) => Some(n as u64),
        Value::U32(n) => Some(n as u64),
        Value::U64(n) => Some(n),
        Value::I8(n) => u64::try_from(n).ok(),
        Value::I16(n) => u64::try_from(n).ok(),
        Value::I32(n) => u64::try_from(n).ok(),
        Value::I64(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

fn type_error(want: &str, got: &Value) -> String {
    format!("expected {want}, got a {:?}", got.value_type())
}

/// The split regex of Qwen2's (and Qwen3's) byte-level BPE: llama.cpp's `tokenizer.ggml.pre`
/// `qwen2`. Letters keep one leading non-letter, digits stand alone. The GGUF tokenizer builds it
/// for `qwen2` files, and `model synth` writes it into its Qwen tokenizers, so both tokenize as
/// llama.cpp does.
pub const QWEN2_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The two tokenizer families GGUF files carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufTokenizerKind {
    /// `gpt2`: byte-level BPE with `tokenizer.ggml.merges`.
    Gpt2,
    /// `llama`: SentencePiece BPE with `tokenizer.ggml.scores` (merge priority) and byte fallback.
    Llama,
}

/// The tokenizer as a GGUF file describes it (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    pub kind: GgufTokenizerKind,
    /// `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer (e.g. `smollm`, `qwen2`).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `"left right"` pairs, highest priority first.
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
    /// The file (for error messages).
    pub source: PathBuf,
}

/// Widen a quantized tensor with candle's dequantization and round it to [`DEQUANTIZED_DTYPE`]:
/// the one place a quantized type the kernels do not keep ([`kept_dtype`]) becomes floats.
pub fn dequantize(
    file: &Path,
    name: &str,
    dtype: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<HostWeight> {
    let values =
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![rows, cols], &candle_core::Device::Cpu)
            .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| LoadError::Gguf { file: file.to_path_buf(), reason: format!("tensor {name:?}: {e}") })?;
    Ok(HostWeight::from_f32(&values, DEQUANTIZED_DTYPE, rows, cols))
}

/// Undo llama.cpp's per-head row permutation of `attn_q` / `attn_k`: stored row `h·d + 2i + j`
/// is HF row `h·d + j·d/2 + i` (`i < d/2`, `j ∈ {0, 1}`). Works on whole rows of any dtype.
pub fn unpermute_heads(bytes: &[u8], row_bytes: usize, heads: usize, head_dim: usize) -> Vec<u8> {
    assert_eq!(bytes.len(), heads * head_dim * row_bytes, "unpermute_heads: shape");
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * row_bytes;
                let dst = (h * head_dim + j * half + i) * row_bytes;
                out[dst..dst + row_bytes].copy_from_slice(&bytes[src..src + row_bytes]);
            }
        }
    }
    out
}

/// A GGUF model's tensors under Hugging Face names, with the RoPE permutation undone and the
/// quantized types the kernels do not keep dequantized.
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    arch: Architecture,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// The GGUF name of a Hugging Face tensor name of the Llama / Qwen family.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

impl GgufModel {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let cfg = file.config()?;
        Ok(GgufModel {
            arch: cfg.arch,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            file,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn locate(&self, hf: &str) -> Result<(String, &TensorInfo)> {
        let missing = |name: String| LoadError::MissingTensor { file: self.file.path.clone(), name };
        let name = gguf_tensor_name(hf).ok_or_else(|| missing(hf.to_string()))?;
        match self.file.content.tensor_infos.get(&name) {
            Some(info) => Ok((name, info)),
            None => Err(missing(name)),
        }
    }

    /// The `[rows, cols]`-style shape of a tensor, by HF name (1-D tensors stay 1-D).
    pub fn shape(&self, hf: &str) -> Result<Vec<usize>> {
        Ok(self.locate(hf)?.1.shape.dims().to_vec())
    }

    /// The dtype a tensor has once loaded.
    fn loaded_dtype(&self, name: &str, t: GgmlDType) -> Result<DType> {
        if let Some(kept) = kept_dtype(t) {
            return Ok(kept);
        }
        match t {
            GgmlDType::Q8_1 | GgmlDType::Q8K => Err(LoadError::UnsupportedDType {
                file: self.file.path.clone(),
                name: name.to_string(),
                dtype: format!("{t:?} (an activation format, not a weight type)"),
            }),
            _ => Ok(DEQUANTIZED_DTYPE),
        }
    }

    /// The distinct dtypes of the tensors once loaded, sorted `f32 < bf16 < f16 < q8_0 < q4_0 <
    /// q4_1` (the fingerprint names them).
    pub fn dtypes(&self) -> Result<Vec<DType>> {
        let mut seen = Vec::new();
        for (name, info) in &self.file.content.tensor_infos {
            seen.push(self.loaded_dtype(name, info.ggml_dtype)?);
        }
        let order = [DType::F32, DType::Bf16, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];
        Ok(order.into_iter().filter(|d| seen.contains(d)).collect())
    }

    /// Heads of a tensor whose rows llama.cpp permuted for interleaved RoPE.
    fn permuted_heads(&self, hf: &str) -> Option<usize> {
        if self.arch != Architecture::Llama {
            return None;
        }
        if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
            Some(self.heads)
        } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
            Some(self.kv_heads)
        } else {
            None
        }
    }

    /// A whole tensor by HF name: in place for the types the kernels keep, else dequantized;
    /// RoPE rows unpermuted for `llama`.
    pub fn get(&self, hf: &str) -> Result<HostWeight> {
        let (name, info) = self.locate(hf)?;
        let range = self.file.byte_range(&name, info)?;
        let dims = info.shape.dims();
        let (rows, cols) = match dims {
            [] => (1, 1),
            [n] => (1, *n),
            [lead @ .., last] => (lead.iter().product(), *last),
        };
        let dtype = self.loaded_dtype(&name, info.ggml_dtype)?;
        let kernel = |e| LoadError::Kernel { file: self.file.path.clone(), name: name.clone(), source: e };
        let weight = match kept_dtype(info.ggml_dtype) {
            Some(_) => HostWeight::new(dtype, SharedBytes::file_mapped(self.file.map.clone(), range), rows, cols)
                .map_err(kernel)?,
            None => dequantize(&self.file.path, &name, info.ggml_dtype, &self.file.map[range], rows, cols)?,
        };
        let Some(heads) = self.permuted_heads(hf) else { return Ok(weight) };
        // A 1-D bias is one row of `heads × head_dim` elements: permute elements, not rows (and
        // elements of a block type have no bytes of their own).
        let (n_rows, row_bytes) = if weight.rows > 1 {
            (weight.rows, weight.view().row_bytes())
        } else if !dtype.is_quantized() {
            (weight.cols, dtype.size())
        } else {
            return Err(LoadError::UnsupportedDType {
                file: self.file.path.clone(),
                name,
                dtype: format!("{} in a 1-D tensor (a bias is f32, f16 or bf16)", dtype.as_str()),
            });
        };
        if n_rows != heads * self.head_dim {
            return Err(LoadError::ShapeMismatch {
                file: self.file.path.clone(),
                name,
                expected: vec![heads * self.head_dim, weight.cols],
                got: dims.to_vec(),
            });
        }
        let bytes = unpermute_heads(weight.bytes.as_slice(), row_bytes, heads, self.head_dim);
        HostWeight::new(dtype, SharedBytes::from_vec(bytes), weight.rows, weight.cols).map_err(kernel)
    }

    /// Rows `rows` of a matrix (a column-parallel shard).
    pub fn get_rows(&self, hf: &str, rows: Range<usize>) -> Result<HostWeight> {
        let w = self.get(hf)?;
        self.check_range(hf, "rows", &rows, w.rows)?;
        let row_bytes = w.view().row_bytes();
        let bytes = w.bytes.as_slice()[rows.start * row_bytes..rows.end * row_bytes].to_vec();
        self.rebuild(hf, w.dtype, bytes, rows.len(), w.cols)
    }

    /// Columns `cols` of every row (a row-parallel shard; also slices a 1-D bias).
    pub fn get_cols(&self, hf: &str, cols: Range<usize>) -> Result<HostWeight> {
        let w = self.get(hf)?;
        self.check_range(hf, "columns", &cols, w.cols)?;
        if w.dtype.is_quantized() {
            // Whole blocks only: the shard plan cuts rows on multiples of 32 for block types.
            return w.columns(cols).map_err(|e| LoadError::Kernel {
                file: self.file.path.clone(),
                name: hf.to_string(),
                source: e,
            });
        }
        let bytes = copy_cols(w.bytes.as_slice(), w.dtype.size(), w.cols, w.rows, &cols);
        self.rebuild(hf, w.dtype, bytes, w.rows, cols.len())
    }

    fn rebuild(&self, hf: &str, dtype: DType, bytes: Vec<u8>, rows: usize, cols: usize) -> Result<HostWeight> {
        HostWeight::new(dtype, SharedBytes::from_vec(bytes), rows, cols).map_err(|e| LoadError::Kernel {
            file: self.file.path.clone(),
            name: hf.to_string(),
            source: e,
        })
    }

    fn check_range(&self, hf: &str, what: &'static str, r: &Range<usize>, len: usize) -> Result<()> {
        if r.start > r.end || r.end > len {
            return Err(LoadError::SliceOutOfBounds {
                file: self.file.path.clone(),
                name: hf.to_string(),
                what,
                range: format!("{}..{}", r.start, r.end),
                len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
