//! What can be proved about the CUDA backend on a machine without a GPU (run with
//! `--features cuda`):
//! * every `.cu` source compiles with NVRTC to PTX for sm_80 and sm_90, with the numerics options,
//!   defines every kernel the backend loads, and holds only correctly rounded float arithmetic
//!   (no `.approx`, no `.ftz`, no contractible `add.f32`/`mul.f32`);
//! * the PTX cache writes and re-reads compiled PTX;
//! * without a driver, `CudaBackend::new` returns the clear "no CUDA driver found" error.
//!
//! `cuda_emulated.rs` runs the kernel sources themselves on the CPU against the reference.
//!
//! NVRTC comes from the `nvidia-cuda-nvrtc` wheel (13.0.x): `.ci/run` installs it and sets
//! `LOCKSTEP_NVRTC_LIB_DIR` (and `LOCKSTEP_REQUIRE_NVRTC`, so a missing library fails there).
//! Elsewhere, without it, the NVRTC tests print `SKIPPED: libnvrtc not found`.
//! Whether the kernels *run* correctly needs a GPU: `deploy/gpu-check.sh`.
#![cfg(feature = "cuda")]

use std::time::Instant;

use lockstep_kernels::cuda::{libs, nvrtc, CudaBackend, CudaConfig, CudaError, CudaMode};

/// NVRTC present: run. Absent: print `SKIPPED: libnvrtc not found` — unless CI said it must be
/// there (`LOCKSTEP_REQUIRE_NVRTC`), where a silent skip would hide a broken install step.
fn nvrtc_or_skip(test: &str) -> bool {
    match libs::require_nvrtc() {
        Ok(()) => true,
        Err(e) if std::env::var_os("LOCKSTEP_REQUIRE_NVRTC").is_some() => {
            panic!("LOCKSTEP_REQUIRE_NVRTC is set but {e}")
        }
        Err(e) => {
            skip(&format!("SKIPPED: libnvrtc not found ({test}): {e}"));
            false
        }
    }
}

/// Float instructions that a later JIT could contract or approximate, as they would appear in PTX.
fn loose_float_ops(ptx: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for line in ptx.lines() {
        let ins = line.trim();
        let mut words = ins.split_whitespace();
        let Some(mut op) = words.next() else { continue };
        if op.starts_with('@') {
            // A guard predicate (`@%p1` / `@!%p1`) comes before the opcode.
            let Some(next) = words.next() else { continue };
            op = next;
        }
        let loose = op.contains(".approx")
            || op.contains(".ftz")
            || ["add.f32", "sub.f32", "mul.f32", "fma.f32", "div.f32", "sqrt.f32", "div.full.f32"].contains(&op);
        if loose {
            bad.push(ins.to_string());
        }
    }
    bad
}

#[test]
fn every_cu_source_compiles_to_ptx_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_cu_source_compiles_to_ptx_for_sm80_and_sm90") {
        return;
    }
    let (major, minor) = nvrtc::nvrtc_version().unwrap();
    println!("NVRTC {major}.{minor}, options {:?}", nvrtc::nvrtc_options(80));
    assert_eq!(major, 13, "CI pins the CUDA 13.0 NVRTC so the PTX loads on driver 580");
    for arch in [80u32, 90] {
        for src in nvrtc::SOURCES {
            let t = Instant::now();
            let ptx = nvrtc::compile_ptx(&src, arch).unwrap_or_else(|e| panic!("{e}"));
            println!("{} compute_{arch}: {} bytes of PTX in {:.2?}", src.file, ptx.len(), t.elapsed());
            assert!(ptx.contains(&format!(".target sm_{arch}")), "{} lacks .target sm_{arch}", src.file);
            for entry in src.entries {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{} compute_{arch} lacks kernel {entry}", src.file);
            }
            let bad = loose_float_ops(&ptx);
            assert!(bad.is_empty(), "{} compute_{arch} has loose float ops: {:?}", src.file, &bad[..bad.len().min(8)]);
            if src.file == "linear_native.cu" {
                assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
                assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
            } else {
                // The contract's order needs fma where it says fma, and nothing else fused.
                assert!(!ptx.contains("mma."), "{} must not use tensor cores", src.file);
            }
        }
    }
}

#[test]
fn ptx_cache_writes_and_reuses_compiled_ptx() {
    if !nvrtc_or_skip("ptx_cache_writes_and_reuses_compiled_ptx") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lockstep-ptx-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = nvrtc::compile_ptx_cached_in(&nvrtc::SAMPLING, 80, Some(dir.clone())).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one cache file: {files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("sampling-compute_80-") && name.ends_with(".ptx"), "{name}");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), first);
    let t = Instant::now();
    let again = nvrtc::compile_ptx_cached_in(&nvrtc::SAMPLING, 80, Some(dir.clone())).unwrap();
    assert_eq!(again, first);
    assert!(t.elapsed().as_millis() < 100, "second lookup should not recompile");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cuda_backend_without_a_driver_is_a_clear_error_not_a_panic() {
    if libs::driver_present() {
        skip("SKIPPED: a CUDA driver is present here; deploy/gpu-check.sh covers this machine");
        return;
    }
    for mode in [CudaMode::Portable, CudaMode::Native] {
        let r = std::panic::catch_unwind(|| CudaBackend::new(CudaConfig { mode, ..Default::default() }));
        let err = match r {
            Ok(Ok(_)) => panic!("a backend started without a driver"),
            Ok(Err(e)) => e,
            Err(_) => panic!("CudaBackend::new panicked without a driver"),
        };
        let msg = err.to_string();
        println!("{mode:?}: {msg}");
        assert!(matches!(err, CudaError::NoDriver(_)), "{err:?}");
        assert!(msg.starts_with("no CUDA driver found: "), "{msg}");
    }
    // Bad numerics are reported before any library is touched.
    let bad = lockstep_kernels::NumericsConfig { reduce_segments: 5, ..Default::default() };
    let err = CudaBackend::new(CudaConfig { numerics: bad, ..Default::default() }).err().unwrap();
    assert!(matches!(err, CudaError::Kernel(_)), "{err:?}");
}

#[test]
fn cuda_mode_parses() {
    assert_eq!("portable".parse::<CudaMode>().unwrap(), CudaMode::Portable);
    assert_eq!("native".parse::<CudaMode>().unwrap(), CudaMode::Native);
    assert!("fast".parse::<CudaMode>().is_err());
    assert_eq!(CudaMode::default().as_str(), "portable");
}

/// A skip line straight to the stderr handle: libtest captures `println!`/`eprintln!` and shows
/// them only for a failing test, and a skip must be seen.
fn skip(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
