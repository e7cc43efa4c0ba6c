//! The CUDA backend (cargo feature `cuda`): the numerics contract on NVIDIA GPUs.
//!
//! # Two numerics modes
//!
//! * **Portable** ([`CudaMode::Portable`]) follows `docs/DESIGN.md` §2.1 to the bit, so a GPU
//!   answer equals [`crate::reference`] and the CPU backend. The contract was written for this: its
//!   16 logical lanes are a half-warp. Every dot product (linear, RMSNorm, attention scores) gives
//!   one half-warp one segment, physical lane `l` playing logical lane `l` (elements `l, l+16, …`,
//!   `fma` from `+0.0`), folds the lanes with `__shfl_xor_sync` 8, 4, 2, 1 — which leaves the
//!   contract's `a[0]` in every lane, addition being commutative — and combines segment sums with
//!   the pairwise tree. exp / ln / SiLU / Philox are the crate's own ([`crate::math`],
//!   [`crate::sampling`]) transcribed into `kernels/cuda/common.cuh` with explicit round-to-nearest
//!   intrinsics. The fingerprint name is `portable`: the bits do not depend on the device.
//! * **Native** ([`CudaMode::Native`]) runs the linear on tensor cores (`mma.sync` m16n8k16, bf16
//!   or f16 inputs, f32 accumulation; f32 weights stay on the portable kernel). The tensor core's
//!   internal summation order is not the contract's, so the bits differ from the CPU's, but they are
//!   still batch- and TP-invariant within one GPU class: one 64×64 tile configuration for every
//!   shape, no split-K, K walked in the contract's `reduce_segments` segments joined by the same
//!   pairwise tree. Everything except the linear stays portable. The fingerprint name is
//!   `cuda-native-sm_XY`.
//!
//! # Run-time loading, clear errors
//!
//! Nothing CUDA is linked at build time: cudarc opens `libcuda`, `libnvrtc` (and `libnccl` for
//! [`nccl_all_gather_tree`]) when first used, and kernels are compiled from the embedded `.cu`
//! sources by NVRTC at start-up ([`nvrtc`]). cudarc panics when a library is missing, so
//! [`CudaBackend::new`] checks first ([`libs`]) and returns [`CudaError::NoDriver`] ("no CUDA
//! driver found: …") on a machine without a GPU driver.
//!
//! # What is verified where
//!
//! Without a GPU (CI): every `.cu` file compiles with NVRTC 13.0 for sm_80 and sm_90 into PTX
//! holding only correctly rounded float instructions (`tests/cuda_nvrtc.rs`); the kernel sources
//! run on a CPU SIMT emulator with the backend's own launch geometry ([`plan`]) and equal
//! [`crate::reference`] bit for bit, the tensor-core kernel against a model of `mma.sync`
//! (`tests/cuda_emulated.rs`); without a driver, [`CudaBackend::new`] returns the clear error.
//! On a GPU only: real hardware behaviour, the native kernel's actual bits and invariance, and
//! speed — `deploy/gpu-check.sh` (`examples/gpu_check.rs`).
//!
//! # Buffers
//!
//! Activations are device `f32` buffers ([`CudaBuf`]); weights are uploaded in their stored dtype
//! and widened exactly inside the kernels ([`CudaWeight`]); the paged KV cache is two device `f32`
//! arrays ([`CudaKvCache`]). All work runs on one stream, in call order; `download` waits for it.
//! The [`Backend`](crate::Backend) methods have no error channel: a CUDA failure after start-up
//! (out of memory, a lost device) panics with the driver's message, as a shape mismatch does on
//! the CPU.

mod backend;
pub mod libs;
mod nccl;
pub mod nvrtc;
pub mod plan;

pub use backend::{CudaBackend, CudaBuf, CudaKvCache, CudaWeight};
pub use nccl::{nccl_all_gather_tree, nccl_single_rank_comm};

use crate::{KernelError, NumericsConfig};

/// Which numerics the CUDA backend runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CudaMode {
    /// Bit-identical to the CPU and the reference.
    #[default]
    Portable,
    /// Tensor-core linear: invariant within one GPU class, not equal to the CPU.
    Native,
}

impl CudaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CudaMode::Portable => "portable",
            CudaMode::Native => "native",
        }
    }
}

impl std::str::FromStr for CudaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "portable" => Ok(CudaMode::Portable),
            "native" => Ok(CudaMode::Native),
            other => Err(format!("unknown CUDA numerics mode {other:?} (portable|native)")),
        }
    }
}

/// How to start a [`CudaBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaConfig {
    /// Device ordinal (`cuda:N`).
    pub device: usize,
    pub numerics: NumericsConfig,
    pub mode: CudaMode,
}

/// Largest `kv_chunk` the attention kernel takes: one warp keeps a chunk's scores in 48 KiB of
/// shared memory.
pub const MAX_KV_CHUNK: usize = 12_288;

/// Largest `head_dim` the attention kernel takes (q lives in 16 registers per lane).
pub const MAX_HEAD_DIM: usize = 256;

/// Why the CUDA backend could not start or finish a collective.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver found: {0}")]
    NoDriver(String),
    #[error("NVRTC not found: {0}")]
    NoNvrtc(String),
    #[error("NCCL not found: {0}")]
    NoNccl(String),
    #[error("CUDA device {device} not available: {detail}")]
    NoDevice { device: usize, detail: String },
    #[error("CUDA driver call {op} failed: {detail}")]
    Driver { op: String, detail: String },
    #[error("NVRTC could not compile {file} for compute_{arch}:\n{log}")]
    Compile { file: &'static str, arch: u32, log: String },
    #[error("NCCL call {op} failed: {detail}")]
    Nccl { op: String, detail: String },
    #[error("not supported by the CUDA backend: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl CudaError {
    pub(crate) fn driver(op: impl Into<String>, e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver { op: op.into(), detail: format!("{e}") }
    }
}
