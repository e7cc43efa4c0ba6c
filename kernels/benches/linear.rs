//! `cargo bench -p lockstep-kernels`: GFLOP/s of the linear at the Qwen2.5-0.5B shapes, invariant
//! vs fast, f32 and bf16 weights, 1 and 2 threads; plus this machine's FMA peak and memory read
//! bandwidth as the physical limits. A second table streams GGUF block weights (Q8_0, Q4_0, Q4_1,
//! kept quantized) at M = 1 and 8 — decode — at SmolLM2-135M's and Qwen2.5-0.5B's shapes, in
//! GB/s of weight bytes and as a share of the measured read bandwidth. A third streams one whole
//! batch-1 decode step's linears (every layer's own weights: Qwen2.5-0.5B bf16, ~1 GB, and
//! SmolLM2-135M Q4_1, ~84 MB, so from DRAM as in a real
//! step, unlike the tables above whose weights stay cached between calls) on 4 KiB and 2 MiB
//! pages (filter `decode step`). A fourth prices one pass over the thread pool and what grouping
//! q/k/v (gate/up) into one pass saves (filter `pool pass`). A fifth times attention (filter
//! `attention`): one decode row against every layer's own KV cache (as a decode step reads them;
//! `cold decode` cycles through enough copies of the layers' caches, > 64 MB, that every call reads
//! its keys from DRAM, as a real step does once the weights' stream has evicted them) and one
//! prefill sequence's rows against one layer. Prints Markdown tables (numbers, never assertions).
//!
//! Environment: `LOCKSTEP_BENCH_FILTER=substring` runs only matching rows (`peak`: only the
//! machine's limits, no tables);
//! `LOCKSTEP_BENCH_SECONDS` sets the time per row (default 0.4); `LOCKSTEP_BENCH_ISA`
//! (`scalar`, `avx2`, `avx512`) forces the ISA path of the block-type table; `LOCKSTEP_BENCH_SEGMENTS` the
//! segment count of the first table (default: the deployment default); `LOCKSTEP_BENCH_CLOCK=cpu` times
//! calls by the CPU time of all the process's threads instead of the wall clock and runs only
//! 1-thread rows (with more, idle pool threads spinning would count): on a machine loaded by
//! other jobs, preemption then stops inflating the numbers, though shared caches still can;
//! `LOCKSTEP_BENCH_CLOCK=min` takes each row's fastest call on the wall clock instead.

use std::time::{Duration, Instant};

use lockstep_kernels::splitmix::SplitMix64;

// The contract tests' data helpers (random GGUF blocks), shared by path like `gpu_check` does.
#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;
use lockstep_kernels::{Backend, CpuBackend, CpuConfig, DType, HostWeight, Isa, KernelMode, NumericsConfig};

fn seconds() -> f64 {
    std::env::var("LOCKSTEP_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0.4)
}

/// `LOCKSTEP_BENCH_SEGMENTS=S` runs the first table with `S` segments instead of the default
/// (to see what the per-segment lane trees cost).
fn bench_numerics() -> NumericsConfig {
    let segments = std::env::var("LOCKSTEP_BENCH_SEGMENTS").ok().and_then(|s| s.parse().ok());
    let default = NumericsConfig::default();
    NumericsConfig { reduce_segments: segments.unwrap_or(default.reduce_segments), ..default }
}

/// `LOCKSTEP_BENCH_CLOCK=min`: the fastest call's wall time instead of the median — the least
/// disturbed call, for comparing kernels on a machine that other jobs share.
fn min_clock() -> bool {
    std::env::var("LOCKSTEP_BENCH_CLOCK").is_ok_and(|c| c == "min")
}

fn cpu_clock() -> bool {
    std::env::var("LOCKSTEP_BENCH_CLOCK").is_ok_and(|c| c == "cpu")
}

/// Seconds the process's threads have run on a CPU (Linux: the first field of each
/// `/proc/self/task/*/schedstat`, in nanoseconds).
fn process_cpu_seconds() -> f64 {
    let tasks = std::fs::read_dir("/proc/self/task").expect("LOCKSTEP_BENCH_CLOCK=cpu needs Linux");
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Median (or fastest) wall seconds per call (or, with the CPU clock, mean CPU seconds) over repeated calls
/// lasting about `seconds()` in total.
fn time<F: FnMut()>(mut f: F) -> f64 {
    f(); // warm-up (page in weights, fill caches)
    let budget = Duration::from_secs_f64(seconds());
    let start = Instant::now();
    let mut samples = Vec::new();
    if cpu_clock() {
        // The kernel's schedstat clock advances in scheduler ticks: the mean over the whole
        // budget is exact where one short call's difference would not be.
        let (c, mut calls) = (process_cpu_seconds(), 0);
        while start.elapsed() < budget || calls < 3 {
            f();
            calls += 1;
        }
        return (process_cpu_seconds() - c) / calls as f64;
    }
    while start.elapsed() < budget || samples.len() < 3 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if min_clock() {
        return samples[0];
    }
    samples[samples.len() / 2]
}

#[cfg(target_arch = "x86_64")]
fn fma_peak_gflops(threads: usize) -> f64 {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    unsafe fn spin512(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 12];
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn spin256(iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 12];
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        out[0]
    }
    let wide = Isa::Avx512.is_available();
    if !wide && !Isa::Avx2.is_available() {
        return f64::NAN;
    }
    let lanes = if wide { 16.0 } else { 8.0 };
    let iters = 20_000_000;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            // SAFETY: spin512 runs only with AVX-512F present, spin256 only with AVX2 and FMA.
            s.spawn(move || unsafe { std::hint::black_box(if wide { spin512(iters) } else { spin256(iters) }) });
        }
    });
    (threads * iters * 12) as f64 * lanes * 2.0 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak_gflops(_threads: usize) -> f64 {
    f64::NAN
}

/// Sum of a buffer with 8 independent vector accumulators: a pure streaming read. Every
/// accumulator reaches the result: with only one of them returned, the compiler dropped the other
/// seven's loads, the probe read one cache line in four and reported about twice the machine's
/// bandwidth (the 69–75 GB/s of docs/BENCHMARKS.md before 2026-11-30's correction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_sum(part: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in part.chunks_exact(64) {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(c.as_ptr().add(8 * i)));
        }
    }
    let mut sum = acc[0];
    for a in &acc[1..] {
        sum = _mm256_add_ps(sum, *a);
    }
    let mut out = [0.0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out.iter().sum()
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn stream_sum(part: &[f32]) -> f32 {
    part.iter().sum()
}

/// The machine's streaming read bandwidth on `threads` threads: 1 GiB read once per call, each
/// thread summing its own contiguous part; the better of 4 KiB and 2 MiB pages (the weights'
/// native packings ask for 2 MiB pages; in a VM a guest huge page helps most where the host
/// backs it with one too, which varies from allocation to allocation).
fn read_bandwidth_gbs(threads: usize) -> f64 {
    if cfg!(target_arch = "x86_64") && !Isa::Avx2.is_available() {
        return f64::NAN;
    }
    let len = 256 << 20; // 1 GiB of f32
    let mut best = 0.0f64;
    for huge in [false, true] {
        let mut bytes: Vec<u8> = Vec::with_capacity(len * 4);
        advise_pages(&bytes, huge);
        bytes.resize(len * 4, 0x3f);
        // SAFETY: every bit pattern is an f32 (0x3f3f3f3f: 0.747); the aligned middle of the
        // bytes, without a second gigabyte.
        let (_, buf, _) = unsafe { bytes.align_to::<f32>() };
        let chunk = buf.len().div_ceil(threads);
        let run = || {
            std::thread::scope(|s| {
                for part in buf.chunks(chunk) {
                    // SAFETY: on x86-64 the function returned above unless the CPU has AVX2.
                    s.spawn(move || std::hint::black_box(unsafe { stream_sum(part) }));
                }
            })
        };
        best = best.max((buf.len() * 4) as f64 / time(run) / 1e9);
    }
    best
}

fn main() {
    let filter = std::env::var("LOCKSTEP_BENCH_FILTER").unwrap_or_default();
    println!("# lockstep-kernels linear benchmark");
    println!("isa: {:?}, available: {:?}", Isa::best(), Isa::available());
    if filter.is_empty() || filter.contains("peak") {
        for t in [1, 2] {
            println!(
                "threads {t}: FMA peak {:.0} GFLOP/s, memory read {:.1} GB/s",
                fma_peak_gflops(t),
                read_bandwidth_gbs(t)
            );
        }
        if filter == "peak" {
            // Only the machine's limits (bench/peers.sh asks for them).
            return;
        }
    }
    println!();
    println!("| shape K→N | M | weights | threads | invariant GFLOP/s | fast GFLOP/s | inv/fast | invariant GB/s (weights) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut rng = SplitMix64::new(1);
    let dtypes = [DType::F32, DType::Bf16];
    side_by_side(
        &filter,
        &mut rng,
        &SHAPES,
        &[1, 8, 16, 32, 64, 128, 512],
        &dtypes,
        [KernelMode::Invariant, KernelMode::Fast],
        "",
    );
    quantized_decode(&filter, &mut rng);
    native_linear(&filter, &mut rng);
    decode_step(&filter, &mut rng);
    pool_pass(&filter, &mut rng);
    attention(&filter, &mut rng);
}

/// Qwen2.5-0.5B's linear shapes (K, N, name) for the side-by-side tables.
const SHAPES: [(usize, usize, &str); 4] =
    [(896, 4864, "gate/up"), (4864, 896, "down"), (896, 1152, "qkv"), (896, 151936, "lm_head")];

/// Qwen2.5-0.5B's linear shapes for the native table (issue #11): q/k/v fused, o, gate/up, down.
const NATIVE_SHAPES: [(usize, usize, &str); 4] =
    [(896, 1152, "qkv"), (896, 896, "o"), (896, 4864, "gate/up"), (4864, 896, "down")];

/// Times the two modes on every shape × dtype × thread count × M in `ms`, the same
/// pseudo-random weights for both, and prints a row each: `| K→N (name) | M | dtype | threads |`,
/// then the first mode's GFLOP/s, the second's, first ÷ second in speed, and the first's GB/s of
/// weights (the caller prints the header naming the modes). A row runs when `filter` is empty or
/// in its head followed by `tag`.
fn side_by_side(
    filter: &str,
    rng: &mut SplitMix64,
    shapes: &[(usize, usize, &str)],
    ms: &[usize],
    dtypes: &[DType],
    modes: [KernelMode; 2],
    tag: &str,
) {
    for &(k, n, name) in shapes {
        for &dtype in dtypes {
            // Only rows the filter selects are built: generating an unselected shape's weights
            // (lm_head: 136 M floats) would dominate a filtered run.
            let selected = |threads: usize, m: usize| {
                let row = format!("| {k}→{n} ({name}) | {m} | {} | {threads} |{tag}", dtype.as_str());
                filter.is_empty() || row.contains(filter)
            };
            if !(1..=2).any(|t| ms.iter().any(|&m| selected(t, m))) {
                continue;
            }
            // Deterministic pseudo-random weights, uniform in ±0.05.
            let vals: Vec<f32> = (0..n * k).map(|_| (rng.unit_f64() as f32 - 0.5) * 0.1).collect();
            let w = HostWeight::from_f32(&vals, dtype, n, k);
            drop(vals);
            for threads in [1, 2] {
                if threads > 1 && cpu_clock() {
                    continue;
                }
                let mk =
                    |mode| CpuBackend::new(CpuConfig { threads, isa: None, mode, numerics: bench_numerics() }).unwrap();
                let bes = modes.map(mk);
                let ws = [bes[0].prepare_weight(w.clone()), bes[1].prepare_weight(w.clone())];
                for &m in ms {
                    if !selected(threads, m) {
                        continue;
                    }
                    let row = format!("| {k}→{n} ({name}) | {m} | {} | {threads} |", dtype.as_str());
                    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
                    let mut y = vec![0.0f32; m * n];
                    let [t0, t1] = [0, 1].map(|i| time(|| bes[i].linear(&x, m, &ws[i], None, &mut y)));
                    let (flops, bytes) = (2.0 * (m * n * k) as f64, (n * k * dtype.size()) as f64);
                    println!(
                        "{row} {:.1} | {:.1} | {:.2} | {:.1} |",
                        flops / t0 / 1e9,
                        flops / t1 / 1e9,
                        t1 / t0,
                        bytes / t0 / 1e9
                    );
                }
            }
        }
    }
}

/// bf16 linears in CPU native numerics (the class this CPU runs: AMX or AVX512-BF16) beside the
/// invariant contract, same shapes, same run.
fn native_linear(filter: &str, rng: &mut SplitMix64) {
    let Ok(class) = lockstep_kernels::cpu::native_exec() else {
        println!("\nnative: skipped, this CPU has neither AMX nor AVX512-BF16");
        return;
    };
    println!();
    println!(
        "| shape K→N | M | weights | threads | {} GFLOP/s | invariant GFLOP/s | native/inv | native GB/s (weights) |",
        class.fingerprint_name()
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    side_by_side(
        filter,
        rng,
        &NATIVE_SHAPES,
        &[1, 16, 128, 512],
        &[DType::Bf16],
        [KernelMode::Native, KernelMode::Invariant],
        " native",
    );
    if lockstep_kernels::cpu::amx::amx_available().is_ok() && (filter.is_empty() || filter.contains("native")) {
        for threads in [1, 2] {
            println!(
                "AMX peak, {threads} thread(s): {:.0} GFLOP/s (independent TDPBF16PS on resident tiles)",
                amx_peak_gflops(threads)
            );
        }
    }
}

/// The tile unit's bf16 throughput: each thread runs rounds of four independent `TDPBF16PS`
/// (16 × 16 × 32 multiply-adds each) on tiles that stay in their registers.
fn amx_peak_gflops(threads: usize) -> f64 {
    let rounds = 2_000_000;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || lockstep_kernels::cpu::amx::dot_throughput_probe(rounds).expect("AMX available"));
        }
    });
    (threads * rounds * 4 * 16 * 16 * 32 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// One model's batch-1 decode step for [`decode_step`]: every layer's linears (K, N), then the
/// lm-head, in `dtype`.
struct StepModel {
    name: &'static str,
    dtype: DType,
    layers: usize,
    layer_shapes: [(usize, usize); 7],
    lm_head: (usize, usize),
}

const STEP_MODELS: [StepModel; 3] = [
    StepModel {
        name: "Qwen2.5-0.5B decode step (24 layers + lm_head)",
        dtype: DType::Bf16,
        layers: 24,
        layer_shapes: [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)],
        lm_head: (896, 151936),
    },
    // Qwen2.5-0.5B's shapes quantized to Q8_0 (~530 MB, as llama.cpp's converter writes it): the
    // quantized decode step whose weights can never sit in a last-level cache.
    StepModel {
        name: "Qwen2.5-0.5B Q8_0 decode step (24 layers + lm_head)",
        dtype: DType::Q8_0,
        layers: 24,
        layer_shapes: [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)],
        lm_head: (896, 151936),
    },
    // SmolLM2-135M's shapes, every weight Q4_1 (the real file's tied embedding, its lm-head, is Q8_0).
    StepModel {
        name: "SmolLM2-135M decode step (30 layers + lm_head)",
        dtype: DType::Q4_1,
        layers: 30,
        layer_shapes: [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)],
        lm_head: (576, 49152),
    },
];

/// GB/s of one batch-1 decode step's linears over every layer of a model (distinct weights per
/// layer, in one buffer, as a model file is one mapping): unlike the tables above, whose weights
/// of one shape stay in the last-level cache from call to call, every weight here comes from DRAM,
/// as in a real step (Qwen2.5-0.5B bf16: ~1 GB; SmolLM2-135M Q4_1: ~84 MB, still well over the
/// last-level cache). Once with the buffer on 4 KiB pages and once on 2 MiB pages (where the
/// kernel grants them), to show what TLB misses cost a step; a native class packs the weights
/// into memory of its own (on 2 MiB pages) at the first call, so its two rows differ only by noise.
fn decode_step(filter: &str, rng: &mut SplitMix64) {
    // Native rows (`native-…` numerics: the weights packed into the class's layout at the first
    // call, in memory of their own) where the CPU has a native class.
    let native = lockstep_kernels::cpu::native_exec().ok().map(|c| c.fingerprint_name());
    let modes: Vec<(KernelMode, &str)> = std::iter::once((KernelMode::Invariant, "invariant"))
        .chain(native.map(|name| (KernelMode::Native, name)))
        .collect();
    let mut header = false;
    let mut bandwidth = [f64::NAN; 3];
    for model in &STEP_MODELS {
        let row = |huge: bool, threads: usize, numerics: &str| {
            let pages = if huge { "2 MiB" } else { "4 KiB" };
            let row =
                format!("| {}, {pages} pages | 1 | {} | {threads} | {numerics} |", model.name, model.dtype.as_str());
            ((filter.is_empty() || row.contains(filter)) && !(threads > 1 && cpu_clock())).then_some(row)
        };
        let any = |huge: bool, t: usize| modes.iter().any(|&(_, name)| row(huge, t, name).is_some());
        if ![false, true].iter().any(|&huge| [1, 2].iter().any(|&t| any(huge, t))) {
            continue;
        }
        if !header {
            header = true;
            println!();
            println!("one decode step's linears from DRAM");
            println!("| linears | M | weights | threads | numerics | GB/s (weights) | share of read bandwidth | ms per step |");
            println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        }
        let shapes: Vec<(usize, usize)> =
            (0..model.layers).flat_map(|_| model.layer_shapes).chain([model.lm_head]).collect();
        // One random tensor per shape, copied per layer: the bytes do not matter, their addresses do.
        let samples: Vec<((usize, usize), Vec<u8>)> = model
            .layer_shapes
            .iter()
            .chain(&[model.lm_head])
            .map(|&(k, n)| {
                let w = if model.dtype.is_quantized() {
                    common::quant_weight(rng, model.dtype, n, k)
                } else {
                    let vals: Vec<f32> = (0..n * k).map(|_| (rng.unit_f64() as f32 - 0.5) * 0.1).collect();
                    HostWeight::from_f32(&vals, model.dtype, n, k)
                };
                ((k, n), w.bytes.as_slice().to_vec())
            })
            .collect();
        let bytes_of = |&(k, n): &(usize, usize)| n * model.dtype.row_bytes(k).expect("whole blocks");
        let total: usize = shapes.iter().map(bytes_of).sum();
        for huge in [false, true] {
            let mut buf: Vec<u8> = Vec::with_capacity(total);
            advise_pages(&buf, huge);
            for shape in &shapes {
                buf.extend_from_slice(&samples.iter().find(|(s, _)| s == shape).expect("a sample per shape").1);
            }
            let buf: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(buf);
            let mut offset = 0;
            let weights: Vec<HostWeight> = shapes
                .iter()
                .map(|shape @ &(k, n)| {
                    let len = bytes_of(shape);
                    let bytes = lockstep_kernels::SharedBytes::new(buf.clone(), offset..offset + len);
                    offset += len;
                    HostWeight::new(model.dtype, bytes, n, k).unwrap()
                })
                .collect();
            let mut io: Vec<(Vec<f32>, Vec<f32>)> = shapes
                .iter()
                .map(|&(k, n)| ((0..k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect(), vec![0.0f32; n]))
                .collect();
            for (threads, &(mode, name)) in [1, 2].into_iter().flat_map(|t| modes.iter().map(move |m| (t, m))) {
                let Some(row) = row(huge, threads, name) else { continue };
                if bandwidth[threads].is_nan() {
                    bandwidth[threads] = read_bandwidth_gbs(threads);
                }
                let be = CpuBackend::new(CpuConfig { threads, isa: None, mode, numerics: NumericsConfig::default() })
                    .unwrap();
                // Fresh clones: a native packing is kept with the weight, and each row packs its own.
                let prepared: Vec<_> = weights
                    .iter()
                    .map(|w| be.prepare_weight(HostWeight::new(w.dtype, w.bytes.clone(), w.rows, w.cols).unwrap()))
                    .collect();
                // Inside the backend's pool, as a model step runs (entered from outside, every
                // call would also time a hand-off to the workers and back).
                let pool = be.step_pool().expect("the CPU backend has a step pool");
                let secs = time(|| {
                    pool.install(|| {
                        for (w, (x, y)) in prepared.iter().zip(io.iter_mut()) {
                            be.linear(x, 1, w, None, y);
                        }
                    })
                });
                let gbs = total as f64 / secs / 1e9;
                println!("{row} {gbs:.1} | {:.0} % | {:.2} |", 100.0 * gbs / bandwidth[threads], secs * 1e3);
            }
        }
    }
}

/// Ask for 2 MiB pages (or refuse them) for `buf`'s allocation before its first write faults it in.
#[cfg(target_os = "linux")]
fn advise_pages(buf: &Vec<u8>, huge: bool) {
    let page = 4096;
    let start = (buf.as_ptr() as usize).next_multiple_of(page);
    let end = (buf.as_ptr() as usize + buf.capacity()) / page * page;
    let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
    // SAFETY: a hint over whole pages inside the buffer's own allocation; it changes no contents.
    unsafe { libc::madvise(start as *mut libc::c_void, end.saturating_sub(start), advice) };
}
#[cfg(not(target_os = "linux"))]
fn advise_pages(_buf: &Vec<u8>, _huge: bool) {}

/// GB/s of quantized weights streamed by the invariant linear at M = 1 and 8 (and 512, prefill),
/// beside the native rule in the same run where the CPU has a native class (block types: the
/// integer rule, `cpu::qdot`; bf16: the class's own).
fn quantized_decode(filter: &str, rng: &mut SplitMix64) {
    let shapes = [
        (576usize, 1536usize, "SmolLM2 gate/up"),
        (1536, 576, "SmolLM2 down"),
        (576, 49152, "SmolLM2 lm_head"),
        (896, 4864, "Qwen2.5 gate/up"),
        (4864, 896, "Qwen2.5 down"),
        (896, 151936, "Qwen2.5 lm_head"),
    ];
    let mut bandwidth = [f64::NAN; 3];
    let isa: Option<Isa> = std::env::var("LOCKSTEP_BENCH_ISA").ok().map(|s| s.parse().expect("LOCKSTEP_BENCH_ISA"));
    println!();
    println!("block types at M = 1 and 8, isa {:?}", isa.unwrap_or_else(Isa::best));
    let native = lockstep_kernels::cpu::native_exec().is_ok();
    println!("| shape K→N | M | weights | threads | invariant GB/s (weights) | share of read bandwidth | native GB/s | native share | native/inv |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (k, n, name) in shapes {
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Bf16] {
            let w = if dtype.is_quantized() {
                common::quant_weight(rng, dtype, n, k)
            } else {
                let vals: Vec<f32> = (0..n * k).map(|_| (rng.unit_f64() as f32 - 0.5) * 0.1).collect();
                HostWeight::from_f32(&vals, dtype, n, k)
            };
            // M = 8: a decode batch, where the multi-row tiles share each widened weight.
            // M = 512: a prefill chunk.
            for (m, threads) in [(1, 1), (1, 2), (8, 1), (8, 2), (512, 2)] {
                let row = format!("| {k}→{n} ({name}) | {m} | {} | {threads} |", dtype.as_str());
                if (!filter.is_empty() && !row.contains(filter)) || (threads > 1 && cpu_clock()) {
                    continue;
                }
                if bandwidth[threads].is_nan() {
                    bandwidth[threads] = read_bandwidth_gbs(threads);
                }
                let mk = |mode| {
                    CpuBackend::new(CpuConfig { threads, isa, mode, numerics: NumericsConfig::default() }).unwrap()
                };
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
                let mut y = vec![0.0f32; m * n];
                let share = |secs: f64| {
                    let gbs = w.bytes.len() as f64 / secs / 1e9;
                    format!("{gbs:.1} | {:.0} %", 100.0 * gbs / bandwidth[threads])
                };
                let be = mk(KernelMode::Invariant);
                let secs = time(|| be.linear(&x, m, &w, None, &mut y));
                if native {
                    // A fresh clone: the native packing is kept with the weight.
                    let wn = HostWeight::new(w.dtype, w.bytes.clone(), w.rows, w.cols).unwrap();
                    let be = mk(KernelMode::Native);
                    let native_secs = time(|| be.linear(&x, m, &wn, None, &mut y));
                    println!("{row} {} | {} | {:.2} |", share(secs), share(native_secs), secs / native_secs);
                } else {
                    println!("{row} {} | – | – | – |", share(secs));
                }
            }
        }
    }
}

/// What one pass over a 2-thread pool costs a decode step, entered from the pool's own worker as a
/// step is: short busy tasks split by rayon's adaptive `par_iter` (what `CpuBackend::run_tasks` did
/// before the team), by a static split into one contiguous chunk per thread (`join`) and by the
/// backend's team (`CpuBackend::run_tasks`); then SmolLM2-135M's
/// q/k/v (576→576, 192, 192) and gate/up (576→1536 twice), Q4_1, native and portable numerics,
/// M = 1 and 8, as separate calls and as one `linear_group` (weights small enough to stay cached: the difference is the
/// per-call cost).
fn pool_pass(filter: &str, rng: &mut SplitMix64) {
    let rows = ["par_iter", "join", "team", "q/k/v", "gate/up"];
    let wanted = filter.is_empty() || "pool pass".contains(filter) || rows.iter().any(|r| r.contains(filter));
    if !wanted {
        return;
    }
    let threads = 2;
    let cfg = CpuConfig { threads, isa: None, mode: KernelMode::Native, numerics: NumericsConfig::default() };
    let Ok(be) = CpuBackend::new(cfg) else {
        println!("\npool pass: skipped (no native class on this CPU)");
        return;
    };
    let pool = be.step_pool().expect("the CPU backend has a pool");
    println!();
    println!("one pass over the pool (2 threads, entered from a worker as a step is)");
    println!("| what | tasks | µs per pass or call |");
    println!("| --- | --- | --- |");
    const REPS: usize = 200;
    // Tasks of 2 µs each (a small decode linear's share): long enough that the second thread
    // steals, as in a step; the table shows the pass's time over the ideal `tasks · 2 µs / 2`.
    const TASK_US: f64 = 2.0;
    let busy = |_: usize| {
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < TASK_US * 1e-6 {
            std::hint::spin_loop();
        }
    };
    // `REPS` passes, timed on the pool's worker.
    let passes = |pass: &(dyn Fn() + Sync)| pool.install(|| time(|| (0..REPS).for_each(|_| pass())));
    for tasks in [2usize, 8, 32] {
        let adaptive = passes(&|| {
            use rayon::prelude::*;
            (0..tasks).into_par_iter().for_each(busy)
        });
        let halves = passes(&|| {
            rayon::join(|| (0..tasks / 2).for_each(busy), || (tasks / 2..tasks).for_each(busy));
        });
        let team = passes(&|| be.run_tasks(tasks, busy));
        let ideal = tasks as f64 * TASK_US / threads as f64;
        for (how, secs) in [("par_iter", adaptive), ("join of two halves", halves), ("team (run_tasks)", team)] {
            let us = secs / REPS as f64 * 1e6;
            println!("| {TASK_US} µs tasks, {how} | {tasks} | {us:.2} ({:+.2} over ideal) |", us - ideal);
        }
    }
    let k = 576;
    let portable = CpuBackend::new(CpuConfig { mode: KernelMode::Invariant, ..cfg }).expect("portable");
    for (name, widths) in [("q/k/v", &[576usize, 192, 192][..]), ("gate/up", &[1536, 1536][..])] {
        let ws: Vec<HostWeight> = widths.iter().map(|&n| common::quant_weight(rng, DType::Q4_1, n, k)).collect();
        for (numerics, be) in [("native", &be), ("portable", &portable)] {
            // Each backend has its own pool; run on it, as a step would.
            let pool = be.step_pool().expect("the CPU backend has a pool");
            for m in [1usize, 8] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
                let mut ys: Vec<Vec<f32>> = widths.iter().map(|&n| vec![0.0; m * n]).collect();
                let separate = pool.install(|| {
                    time(|| {
                        for (w, y) in ws.iter().zip(ys.iter_mut()) {
                            be.linear(&x, m, w, None, y);
                        }
                    })
                });
                let grouped = pool.install(|| {
                    time(|| {
                        let mut group: Vec<lockstep_kernels::GroupLinear<'_, HostWeight, Vec<f32>>> = ws
                            .iter()
                            .zip(ys.iter_mut())
                            .map(|(weight, out)| lockstep_kernels::GroupLinear { weight, bias: None, out })
                            .collect();
                        be.linear_group(&x, m, &mut group);
                    })
                });
                let calls = widths.len();
                println!("| SmolLM2 {name} M={m} Q4_1 {numerics}, {calls} calls | - | {:.2} |", separate * 1e6);
                println!("| SmolLM2 {name} M={m} Q4_1 {numerics}, one group | - | {:.2} |", grouped * 1e6);
            }
        }
    }
}

/// Attention at SmolLM2-135M's and Qwen2.5-0.5B's head shapes: a batch-1 decode step (one query
/// row at position `keys − 1` in each layer, every layer with a cache of its own; these stay in
/// L3 between steps), the same from DRAM (`cold decode`: the layers' caches repeated past 64 MB,
/// each call reading a copy not touched for > 64 MB of other reads, as a real step finds its KV
/// after streaming the weights) and a prefill of one sequence (`keys` rows from position 0, one
/// layer), timed inside the backend's pool as a step runs. Prints µs per call (per decode step's
/// layers) and ns per (query row, head, key) score.
fn attention(filter: &str, rng: &mut SplitMix64) {
    use lockstep_kernels::cpu::KvFloats;
    use lockstep_kernels::{AttnParams, AttnSeq, KvLayout};
    // (name, layers, n_heads, n_kv_heads, head_dim)
    let models = [("SmolLM2-135M", 30usize, 9usize, 3usize, 64usize), ("Qwen2.5-0.5B", 24, 14, 2, 64)];
    // (what, query rows, keys): decode rows at the two lengths of the engine bench, prefill rows.
    let cases = [
        ("decode", 1usize, 144usize),
        ("decode", 1, 512),
        ("cold decode", 1, 144),
        ("cold decode", 1, 512),
        ("prefill", 128, 128),
        ("prefill", 512, 512),
    ];
    let mut header = false;
    // One backend per thread count for every row: a dropped backend's pool threads exit while the
    // next row runs, and with `LOCKSTEP_BENCH_CLOCK=cpu` their CPU time would leave the total.
    let backends = [1, 2].map(|threads| {
        let config = CpuConfig { threads, isa: None, mode: KernelMode::Invariant, numerics: NumericsConfig::default() };
        CpuBackend::new(config).unwrap()
    });
    for (name, layers, n_heads, n_kv_heads, head_dim) in models {
        for (what, rows, keys) in cases {
            for threads in [1, 2] {
                let row = format!("| attention {what} {name} ({n_heads}/{n_kv_heads} heads × {head_dim}) | {rows} | {keys} | {threads} |");
                if (!filter.is_empty() && !row.contains(filter)) || (threads > 1 && cpu_clock()) {
                    continue;
                }
                if !header {
                    println!();
                    println!("attention (kv_chunk {})", lockstep_kernels::DEFAULT_KV_CHUNK);
                    println!("| attention | query rows | keys | threads | µs per call (all layers at decode) | ns per score |");
                    println!("| --- | --- | --- | --- | --- | --- |");
                    header = true;
                }
                let block_size = 16;
                let layout = KvLayout { num_blocks: keys.div_ceil(block_size), block_size, n_kv_heads, head_dim };
                let table: Vec<u32> = (0..layout.num_blocks as u32).collect();
                // Copies of a step's caches: one, or for `cold decode` enough to pass 64 MB.
                let step_bytes = layers * 2 * layout.floats() * 4;
                let steps = if what == "cold decode" { (64usize << 20).div_ceil(step_bytes) } else { 1 };
                let layer_caches = if what == "prefill" { 1 } else { layers * steps };
                let mut vals = |n: usize| (0..n).map(|_| rng.unit_f64() as f32 * 2.0 - 1.0).collect::<Vec<f32>>();
                // In the backend's KV memory (2 MiB pages from the first slot), as a step reads it.
                let caches: Vec<(KvFloats, KvFloats)> =
                    (0..layer_caches).map(|_| (vals(layout.floats()).into(), vals(layout.floats()).into())).collect();
                let q = vals(rows * n_heads * head_dim);
                let mut out = vec![0.0f32; q.len()];
                let seqs = [AttnSeq { block_table: &table, q_row: 0, n_q: rows, first_pos: keys - rows }];
                let p = AttnParams {
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    block_size,
                    kv_chunk: lockstep_kernels::DEFAULT_KV_CHUNK,
                };
                let be = &backends[threads - 1];
                // Inside the pool, as a model step runs (entering it per call would time the
                // hand-off to the pool's workers, which a step pays once).
                let pool = be.step_pool().expect("the CPU backend has a step pool");
                let secs = pool.install(|| {
                    time(|| {
                        for (k, v) in &caches {
                            be.attention_into(&q, &seqs, k, v, &layout, p, &mut out);
                        }
                    })
                });
                // Row i (position keys − rows + i) scores keys − rows + i + 1 keys per head.
                let scores = layer_caches * n_heads * (0..rows).map(|i| keys - rows + i + 1).sum::<usize>();
                println!("{row} {:.1} | {:.2} |", secs * 1e6 / steps as f64, secs * 1e9 / scores as f64);
            }
        }
    }
}
