//! NVRTC and the PTX cache for the kernel sources of [`crate::cuda_sources`] (re-exported here).
//!
//! The `.cu` files of `kernels/cuda/` are embedded with `include_str!` and compiled when a backend
//! starts, for the device's own virtual architecture (`compute_XY`), with the options that pin the
//! numerics: `--fmad=false --ftz=false --prec-div=true --prec-sqrt=true`. (The sources also spell
//! every contract operation with an explicit `_rn` intrinsic, so the PTX holds `fma.rn`, `add.rn`,
//! `mul.rn`, `div.rn`, `sqrt.rn`, which no later JIT may fuse or flush.)
//!
//! PTX is cached per (file, architecture, hash of the expanded source + options): in memory for
//! the process, and on disk under `$LOCKSTEP_CACHE_DIR/ptx`, else `$XDG_CACHE_HOME/lockstep/ptx`,
//! else `$HOME/.cache/lockstep/ptx`. A cache that cannot be read or written is skipped silently —
//! it only saves start-up time. The NVRTC version is not part of the key on purpose: every
//! contract operation is an explicit `.rn` instruction in the PTX, so PTX from another NVRTC
//! computes the same bits, and a machine with a filled cache (see [`emit_ptx_cache`]) needs no
//! NVRTC at all.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use super::{libs, CudaError};

use crate::cuda_sources::fnv1a;
pub use crate::cuda_sources::{
    expand, nvrtc_options, KernelSource, ATTENTION, COMMON_CUH, LINEAR_NATIVE, LINEAR_PORTABLE, NORM_ROPE_SWIGLU,
    NUMERICS_FLAGS, SAMPLING, SOURCES,
};

/// NVRTC's version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    libs::require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::NoNvrtc(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// Compile one file to PTX for `compute_{arch}`, without any cache.
pub fn compile_ptx(src: &KernelSource, arch: u32) -> Result<String, CudaError> {
    libs::require_nvrtc()?;
    let opts = CompileOptions { options: nvrtc_options(arch), name: Some(src.file.to_string()), ..Default::default() };
    let ptx = compile_ptx_with_opts(expand(src), opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            CudaError::Compile { file: src.file, arch, log: log.to_string_lossy().trim().to_string() }
        }
        other => CudaError::Compile { file: src.file, arch, log: format!("{other:?}") },
    })?;
    Ok(ptx.to_src())
}

/// Where compiled PTX is kept between runs, if anywhere.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env("LOCKSTEP_CACHE_DIR") {
        return Some(d.join("ptx"));
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return Some(d.join("lockstep").join("ptx"));
    }
    env("HOME").map(|h| h.join(".cache").join("lockstep").join("ptx"))
}

/// [`compile_ptx`] behind the memory cache and the disk cache of [`ptx_cache_dir`].
pub fn compile_ptx_cached(src: &KernelSource, arch: u32) -> Result<String, CudaError> {
    compile_ptx_cached_in(src, arch, ptx_cache_dir())
}

/// [`compile_ptx`] behind the memory cache and a disk cache in `dir` (none when `None`).
pub fn compile_ptx_cached_in(src: &KernelSource, arch: u32, dir: Option<PathBuf>) -> Result<String, CudaError> {
    static MEMORY: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let text = expand(src);
    let opts = nvrtc_options(arch).join(" ");
    let hash = fnv1a(&[text.as_bytes(), opts.as_bytes()]);
    let stem = src.file.trim_end_matches(".cu");
    let key = format!("{stem}-compute_{arch}-{hash:016x}");
    let memory = MEMORY.get_or_init(Default::default);
    if let Some(ptx) = memory.lock().expect("ptx cache lock").get(&key) {
        return Ok(ptx.clone());
    }
    let file = dir.map(|d| d.join(format!("{key}.ptx")));
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .filter(|p| src.entries.iter().all(|e| p.contains(&format!(".entry {e}("))));
    let ptx = match cached {
        Some(p) => p,
        None => {
            let p = compile_ptx(src, arch)?;
            if let Some(f) = &file {
                // Write-then-rename: a concurrent reader never sees half a file.
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                let ok = f.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
                    && std::fs::write(&tmp, &p).is_ok()
                    && std::fs::rename(&tmp, f).is_ok();
                if !ok {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            p
        }
    };
    memory.lock().expect("ptx cache lock").insert(key, ptx.clone());
    Ok(ptx)
}

/// Compile every kernel file for each of `arches` into the disk cache `dir` (needs NVRTC, not a
/// GPU): a GPU machine without NVRTC then starts from `LOCKSTEP_CACHE_DIR` = the parent of `dir`.
pub fn emit_ptx_cache(arches: &[u32], dir: &std::path::Path) -> Result<usize, CudaError> {
    let mut n = 0;
    for &arch in arches {
        for src in SOURCES {
            if src.file == LINEAR_NATIVE.file && arch < 80 {
                continue; // bf16 mma needs sm_80
            }
            compile_ptx_cached_in(&src, arch, Some(dir.to_path_buf()))?;
            n += 1;
        }
    }
    Ok(n)
}
