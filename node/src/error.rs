//! Errors of model loading.
//!
//! One enum for everything that can go wrong between a model directory on disk and the
//! [`HostWeight`](lockstep_kernels::HostWeight)s the forward pass consumes. Every variant carries
//! the file it is about and, where there is one, the tensor name, because the operator reading the
//! message usually has a directory of several multi-gigabyte shards and needs to know which one
//! to re-download.

use std::path::PathBuf;

use lockstep_kernels::KernelError;

/// Everything that can go wrong reading a model config, its safetensors files or the
/// fingerprint cache.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{}: unsupported architecture {arch:?} (supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM; GGUF llama, qwen2, qwen3)",
        file.display()
    )]
    UnsupportedArchitecture { file: PathBuf, arch: String },
    #[error("{}: invalid model config: {reason}", file.display())]
    InvalidConfig { file: PathBuf, reason: String },
    #[error(
        "{}: unsupported rope_scaling type {kind:?} (supported: default, linear, llama3)",
        file.display()
    )]
    UnsupportedRopeScaling { file: PathBuf, kind: String },
    #[error("{}: no model.safetensors or model.safetensors.index.json in this directory", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: corrupt safetensors header: {reason}", file.display())]
    CorruptHeader { file: PathBuf, reason: String },
    #[error(
        "{}: file is truncated: tensor {name:?} needs bytes up to {needed}, the file has {file_len}",
        file.display()
    )]
    Truncated { file: PathBuf, name: String, needed: u64, file_len: u64 },
    #[error(
        "{}: tensor {name:?} has dtype {dtype} (supported: F32, BF16, F16; in GGUF also Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K)",
        file.display()
    )]
    UnsupportedDType { file: PathBuf, name: String, dtype: String },
    #[error("{}: tensor {name:?} is missing", file.display())]
    MissingTensor { file: PathBuf, name: String },
    #[error("{}: tensor {name:?} has shape {got:?}, expected {expected:?}", file.display())]
    ShapeMismatch { file: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{}: tensor {name:?}: {range} is out of bounds for {len} {what}", file.display())]
    SliceOutOfBounds { file: PathBuf, name: String, what: &'static str, range: String, len: usize },
    #[error("{}: invalid shard index: {reason}", file.display())]
    BadIndex { file: PathBuf, reason: String },
    #[error("{}: not a readable GGUF file: {reason}", file.display())]
    Gguf { file: PathBuf, reason: String },
    #[error("{}: GGUF metadata key {key:?} is missing", file.display())]
    MissingKey { file: PathBuf, key: String },
    #[error("{}: GGUF metadata key {key:?}: {reason}", file.display())]
    BadKey { file: PathBuf, key: String, reason: String },
    #[error("{}: tensor {name:?}: {source}", file.display())]
    Kernel {
        file: PathBuf,
        name: String,
        #[source]
        source: KernelError,
    },
}

impl LoadError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadError::Io { path: path.into(), source }
    }
}

/// Result alias for this crate's loading code.
pub type Result<T, E = LoadError> = std::result::Result<T, E>;
