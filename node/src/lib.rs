//! # lockstep-node
//!
//! Everything a node needs to turn a Hugging Face model directory or a GGUF file ([`gguf`]) into answers: the model config
//! ([`config`]), memory-mapped safetensors weights handed out zero-copy and shape-checked
//! ([`weights`]), the determinism fingerprint that names which runs promise identical bits
//! ([`fingerprint`]), and a generator of synthetic models with real shapes for tests and
//! benchmarks ([`synth`]). The forward pass and the paged KV cache build on these.
//!
//! Loading never guesses: an unsupported architecture, dtype or RoPE variant, a corrupt or
//! truncated file, a missing tensor or a wrong shape is a [`LoadError`] naming the file and the
//! tensor, because a model that loads "almost right" gives wrong answers bit-reproducibly.

pub mod affinity;
pub mod config;
pub mod control;
pub mod error;
pub mod fingerprint;
pub mod gguf;
pub mod model;
pub mod quic_ring;
pub mod ring;
pub mod same_host;
pub mod server;
pub mod shard;
pub mod source;
pub mod synth;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::LoadError;
pub use source::WeightStore;
pub use weights::{LayerWeights, LlamaWeights, SafetensorsRepo};
