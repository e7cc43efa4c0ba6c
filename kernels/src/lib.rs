//! # lockstep-kernels: the numerics contract
//!
//! Everything lockstep promises ("the same request gives the same bytes") rests on this crate.
//! Every floating-point reduction here has exactly one order, a function of the reduction length
//! only — never of the batch size, the thread count, the SIMD instruction set or the
//! tensor-parallel split. The rules are written down in `docs/DESIGN.md` §2 and, executably, in
//! [`reference`]: plain scalar Rust that *is* the spec. Every other implementation (the SIMD CPU
//! backend in [`cpu`], the portable mode of the CUDA backend in `cuda`) must reproduce the
//! reference bit for bit, and the contract tests compare them with `f32::to_bits`, never with a
//! tolerance.
//!
//! The rules in one place (see [`Segmentation`] and [`reference`] for the code):
//! * **Dot products** over `K`: `K` is zero-padded to a multiple of `S × LANES` (`S =
//!   reduce_segments`, a power of two) and cut into `S` equal segments. Inside a segment, logical
//!   lane `l` accumulates elements `l, l + 16, …` with fused multiply-add starting from `+0.0`; the
//!   16 lanes are summed by the halving tree `(l, l+8)`, `(l, l+4)`, `(l, l+2)`, `(l, l+1)`. The `S`
//!   segment sums are combined by a balanced binary tree of adjacent pairs. A rank holding `S/t`
//!   consecutive segments computes one subtree; [`reference::tree_combine`] finishes the tree.
//!   `S = 3·2^k` is allowed too: the tree is then (first two thirds) + (last third), so three
//!   ranks each hold a subtree ([`is_segment_count`]).
//! * **Quantized weights** (Q8_0, Q4_0, Q4_1) stay in their GGUF blocks; each weight is widened
//!   in registers by candle's dequantization formula ([`quant`]) and then follows the same rule.
//! * **exp / log** are the crate's own ([`math`]), not the platform libm.
//! * **Attention** walks keys in chunks of `kv_chunk` positions counted from position 0 and merges
//!   chunk states in chunk order.
//! * **Sampling** is Gumbel-max with Philox4x32-10 noise keyed by `(seed, step, token id)`.
//!
//! [`Backend`] is the one trait the model code calls; [`cpu::CpuBackend`] implements it and is always
//! built. [`KernelMode::Fast`] swaps the matmul for a conventional, non-invariant GEMM to measure what
//! invariance costs. [`KernelMode::Native`] runs bf16/f16 linears on AMX tiles ([`cpu::amx`]) or
//! AVX512-BF16 ([`cpu::dpbf16`]) and GGUF block-weight linears as int8 × integer dot products on
//! AVX512-VNNI ([`cpu::qdot`]): invariant within the native class, with bits of its own.
//!
//! With the cargo feature `cuda`, `cuda::CudaBackend` implements it on NVIDIA GPUs: *portable*
//! numerics give the reference's bits (the 16 lanes are a half-warp), *native* numerics use tensor
//! cores and are invariant within one GPU class. Nothing CUDA is needed to build it: the driver and
//! NVRTC are loaded at run time and the kernels compiled from embedded sources at start-up.

// Index loops mirror the written contract (lane l, segment s) more plainly than iterator chains.
#![allow(clippy::needless_range_loop)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_sources;
mod fast;
pub mod math;
pub mod quant;
pub mod reference;
pub mod rope;
pub mod sampling;
pub mod splitmix;
mod types;

pub use cpu::{CpuBackend, CpuConfig, Isa};
pub use quant::QUANT_BLOCK;
pub use rope::{RopeConfig, RopeScaling, RopeTables};
pub use sampling::{
    merge_shard_samples, Candidate, LsePartial, SampleRequest, SampledToken, SamplingParams, ShardSample,
};
pub use types::*;

/// Version of the numerics contract. Bump it whenever any rule changes a bit of any output: it is
/// part of the determinism fingerprint, so answers from different contracts never claim equality.
/// Version 2: temperatures below [`sampling::GREEDY_BELOW`] sample greedily (version 1 divided by
/// them); segment counts `3·2^k` and the GGUF block types are admitted (docs/DESIGN.md §2.1).
pub const CONTRACT_VERSION: u32 = 2;

/// Logical lane width of every dot product (one AVX-512 register, half a CUDA warp).
pub const LANES: usize = 16;

/// Default number of reduction segments `S` (a power of two; TP degrees up to `S` are invariant).
/// Segment counts `3·2^k` are allowed too ([`is_segment_count`]) for models split three ways.
pub const DEFAULT_REDUCE_SEGMENTS: usize = 8;

/// Default attention key chunk, in positions counted from position 0.
pub const DEFAULT_KV_CHUNK: usize = 64;

/// Errors of the kernels crate (bad shapes or configuration, never numerics).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    #[error("reduce_segments must be 2^k or 3·2^k between 1 and 64, got {0}")]
    BadSegments(usize),
    #[error("segment range {first}+{count} is not an aligned power-of-two subtree of {segments} segments")]
    BadSegmentRange { first: usize, count: usize, segments: usize },
    #[error("kv_chunk must be at least 1")]
    BadKvChunk,
    #[error("{dtype:?} stores weights in blocks of {QUANT_BLOCK}, but a row has {cols} columns")]
    PartialBlock { cols: usize, dtype: DType },
    #[error("columns {start}..{end} of {cols} do not cut a {dtype:?} matrix on whole blocks")]
    BadColumns { start: usize, end: usize, cols: usize, dtype: DType },
    #[error("weight buffer holds {got} bytes, but {rows}x{cols} {dtype:?} needs {need}")]
    WeightSize { rows: usize, cols: usize, dtype: DType, got: usize, need: usize },
    #[error("instruction set {0:?} is not available on this CPU")]
    IsaUnavailable(Isa),
    #[error("unsupported rope_scaling type {0:?}")]
    UnsupportedRopeScaling(String),
    #[error("position {pos} is beyond the RoPE table ({max} positions)")]
    RopePosition { pos: usize, max: usize },
    #[error("invalid sampling parameters: {0}")]
    BadSampling(String),
    #[error("cpu native numerics need AMX (amx-bf16, amx-tile) with Linux tile-data permission: {0}; use --numerics portable")]
    AmxUnavailable(String),
    #[error("cpu native numerics need AMX (amx-bf16, amx-tile) with Linux tile-data permission, or AVX512-BF16: {0}; use --numerics portable")]
    NativeUnavailable(String),
}

/// Which matmul implementation a backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelMode {
    /// The numerics contract: batch-, thread- and TP-invariant. The default everywhere.
    #[default]
    Invariant,
    /// A conventional GEMM that picks its blocking by shape (for comparison only).
    Fast,
    /// CPU native numerics: bf16/f16 linears on AMX tiles (`cpu::amx`), batch-, thread- and
    /// TP-invariant within the AMX class but not equal to the contract's bits (fingerprint
    /// `native-amx`). Appended last: the wire protocol encodes this enum by variant index.
    Native,
}

impl KernelMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelMode::Invariant => "invariant",
            KernelMode::Fast => "fast",
            KernelMode::Native => "native",
        }
    }
}

impl std::str::FromStr for KernelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "invariant" => Ok(KernelMode::Invariant),
            "fast" => Ok(KernelMode::Fast),
            "native" => Ok(KernelMode::Native),
            other => Err(format!("unknown kernel mode {other:?} (invariant|fast|native)")),
        }
    }
}

/// Deployment-wide numerics parameters; both are part of the determinism fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NumericsConfig {
    pub reduce_segments: usize,
    pub kv_chunk: usize,
}

impl Default for NumericsConfig {
    fn default() -> Self {
        NumericsConfig { reduce_segments: DEFAULT_REDUCE_SEGMENTS, kv_chunk: DEFAULT_KV_CHUNK }
    }
}

impl NumericsConfig {
    pub fn validate(&self) -> Result<(), KernelError> {
        if !is_segment_count(self.reduce_segments) {
            return Err(KernelError::BadSegments(self.reduce_segments));
        }
        if self.kv_chunk == 0 {
            return Err(KernelError::BadKvChunk);
        }
        Ok(())
    }
}

/// One linear of a [`Backend::linear_group`]: `out = x · weightᵀ (+ bias)`.
pub struct GroupLinear<'a, W, Buf> {
    pub weight: &'a W,
    pub bias: Option<&'a W>,
    pub out: &'a mut Buf,
}

/// The one trait the model code calls. Activations live in `Buf` (host memory for the CPU, device
/// memory for a GPU backend), weights in `Weight`, one layer's paged K/V in `KvCache`. Shapes are
/// row-major; an output buffer must already have the exact length (a mismatch is a bug and panics).
pub trait Backend: Send + Sync {
    type Buf: Send + Sync;
    type Weight: Send + Sync;
    type KvCache: Send + Sync;

    /// Backend name as it enters the determinism fingerprint (e.g. `cpu`).
    fn fingerprint_name(&self) -> String;
    fn numerics(&self) -> NumericsConfig;
    fn mode(&self) -> KernelMode;
    /// The thread pool a whole step should run on, if the backend has one. A step entered on a
    /// pool thread hands the pool's work (the CPU backend: weight packing at a weight's first
    /// native call, fast mode's `gemm`; its passes run on its own team) to the pool's other
    /// threads directly; entered from outside, each such call parks the caller and wakes the
    /// pool. Where work runs never changes a bit (outputs are cut into disjoint tiles).
    fn step_pool(&self) -> Option<std::sync::Arc<rayon::ThreadPool>> {
        None
    }

    fn upload(&self, data: &[f32]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn zeros(&self, len: usize) -> Self::Buf;
    fn prepare_weight(&self, w: HostWeight) -> Self::Weight;
    fn alloc_kv(&self, layout: KvLayout) -> Self::KvCache;

    /// `y[m, N] = x[m, K] · Wᵀ (+ bias)` with `W` of shape `[N, K]`.
    fn linear(&self, x: &Self::Buf, m: usize, w: &Self::Weight, bias: Option<&Self::Weight>, y: &mut Self::Buf);
    /// [`Self::linear`] for several weights of the same `K` that read the same `x` (q/k/v,
    /// gate/up): each output gets exactly the bits of its own call. A backend may run them as one
    /// piece of work (the CPU backend: one pass over its threads, `x` prepared once per format).
    fn linear_group(&self, x: &Self::Buf, m: usize, group: &mut [GroupLinear<'_, Self::Weight, Self::Buf>]) {
        for g in group.iter_mut() {
            self.linear(x, m, g.weight, g.bias, g.out);
        }
    }
    /// Row-parallel partial: `x` and `w` hold only the columns of `segs` (segments of `full_k`);
    /// `y` receives the subtree sums (no bias).
    fn linear_partial(&self, x: &Self::Buf, m: usize, w: &Self::Weight, segs: SegmentRange, y: &mut Self::Buf);
    /// Finish the segment tree over `t` partials (t a segment count, in rank order).
    fn tree_combine(&self, partials: &[&Self::Buf], y: &mut Self::Buf);
    /// `y += bias` for each of the rows of `y`.
    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Weight);
    fn embedding(&self, ids: &[u32], table: &Self::Weight, out: &mut Self::Buf);
    fn rms_norm(&self, x: &Self::Buf, weight: &Self::Weight, eps: f32, out: &mut Self::Buf);
    fn rope(&self, x: &mut Self::Buf, n_heads: usize, positions: &[u32], tables: &RopeTables);
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    fn add_assign(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// Copy rows `rows` of `x` (row width `width`) into `out`.
    fn gather_rows(&self, x: &Self::Buf, width: usize, rows: &[u32], out: &mut Self::Buf);
    /// Store token `i`'s K and V rows (`[T, n_kv_heads * head_dim]`) at cache slot `slots[i]`.
    fn write_kv(&self, cache: &mut Self::KvCache, k: &Self::Buf, v: &Self::Buf, slots: &[u32]);
    fn attention(
        &self,
        q: &Self::Buf,
        seqs: &[AttnSeq<'_>],
        cache: &Self::KvCache,
        params: AttnParams,
        out: &mut Self::Buf,
    );
    /// Sampling on one vocab shard: `logits` is `[requests.len(), shard.rows]`.
    fn sample_shard(&self, logits: &Self::Buf, shard: VocabShard, requests: &[SampleRequest]) -> Vec<ShardSample>;
}
