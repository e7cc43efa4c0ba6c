//! Finding the CUDA libraries at run time.
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libnccl` with `dlopen` by bare file name (its candidate
//! list is [`cudarc::get_lib_name_candidates`]: `libnvrtc.so`, …, `libnvrtc.so.13`), so the
//! dynamic linker's search path decides: `LD_LIBRARY_PATH` (read once, when the process starts),
//! then the system cache. When a library is missing, cudarc *panics* on first use, so every entry
//! point of this backend asks [`cudarc::driver::sys::is_culib_present`] and friends first and
//! turns a miss into a [`CudaError`].
//!
//! NVRTC ships as a Python wheel (`nvidia-cuda-nvrtc`, files in `site-packages/nvidia/cu13/lib`),
//! which is nowhere on the search path. `LOCKSTEP_NVRTC_LIB_DIR` names such a directory: its
//! `libnvrtc-builtins.so.*` and `libnvrtc.so.*` are opened here by full path and kept open. glibc's
//! `dlopen` matches a bare name against the `DT_SONAME` of libraries already loaded, so cudarc's
//! later `dlopen("libnvrtc.so.13")` — and libnvrtc's own `dlopen("libnvrtc-builtins.so.13.0")` at
//! compile time — find them without touching `LD_LIBRARY_PATH`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::CudaError;

/// Environment variable naming a directory that holds `libnvrtc.so.*` (and its builtins).
pub const NVRTC_DIR_ENV: &str = "LOCKSTEP_NVRTC_LIB_DIR";

fn candidates(lib: &str) -> String {
    cudarc::get_lib_name_candidates(lib).join(", ")
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: loads and unloads the library; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NCCL (`libnccl.so`) can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded (only the GPU check's baseline uses it).
pub fn cublas_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// `Ok` when the driver library loads; otherwise the "no CUDA driver found" error.
pub fn require_driver() -> Result<(), CudaError> {
    if driver_present() {
        Ok(())
    } else {
        Err(CudaError::NoDriver(format!(
            "the NVIDIA driver library could not be loaded (tried {}); install the NVIDIA driver \
             (580 or newer) or put the directory holding libcuda.so.1 on LD_LIBRARY_PATH",
            candidates("cuda")
        )))
    }
}

/// Whether libnvrtc can be loaded (after honouring [`NVRTC_DIR_ENV`]).
pub fn nvrtc_present() -> bool {
    require_nvrtc().is_ok()
}

/// `Ok` when libnvrtc loads (after honouring [`NVRTC_DIR_ENV`]); otherwise a clear error.
pub fn require_nvrtc() -> Result<(), CudaError> {
    preload_nvrtc_dir()?;
    // SAFETY: loads and unloads the library; no symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoNvrtc(format!(
            "libnvrtc could not be loaded (tried {}); install the CUDA 13.0 NVRTC (for example \
             `pip install nvidia-cuda-nvrtc==13.0.88`) and set {NVRTC_DIR_ENV} to its lib directory \
             (site-packages/nvidia/cu13/lib) or add that directory to LD_LIBRARY_PATH",
            candidates("nvrtc")
        )))
    }
}

/// `Ok` when NCCL loads; otherwise a clear error.
pub fn require_nccl() -> Result<(), CudaError> {
    if nccl_present() {
        Ok(())
    } else {
        Err(CudaError::NoNccl(format!(
            "libnccl could not be loaded (tried {}); install NCCL 2.x (e.g. `pip install \
             nvidia-nccl-cu13`) and add its lib directory to LD_LIBRARY_PATH",
            candidates("nccl")
        )))
    }
}

/// Open the NVRTC libraries of `$LOCKSTEP_NVRTC_LIB_DIR` once, by full path, and keep them open.
fn preload_nvrtc_dir() -> Result<(), CudaError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| match std::env::var_os(NVRTC_DIR_ENV) {
        None => Ok(()),
        Some(dir) => preload_from(Path::new(&dir)),
    })
    .clone()
    .map_err(CudaError::NoNvrtc)
}

fn preload_from(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{NVRTC_DIR_ENV}={}: {e}", dir.display()))?;
    let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    let pick = |prefix: &str| {
        names
            .iter()
            .find(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // The wheel also carries `.alt.` builds (another C++ ABI); the plain ones are the
                // libraries NVRTC itself looks for.
                n.starts_with(prefix) && !n.contains(".alt.")
            })
            .cloned()
    };
    let nvrtc =
        pick("libnvrtc.so").ok_or_else(|| format!("{NVRTC_DIR_ENV}={} holds no libnvrtc.so*", dir.display()))?;
    // The builtins first: libnvrtc opens them by name when it compiles.
    for path in pick("libnvrtc-builtins.so").into_iter().chain(std::iter::once(nvrtc)) {
        // SAFETY: loading NVIDIA's library runs its initialisers, which is what cudarc would do too.
        let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("{}: {e}", path.display()))?;
        // Kept open for the life of the process, so the soname stays registered for cudarc.
        std::mem::forget(lib);
    }
    Ok(())
}
