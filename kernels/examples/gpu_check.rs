//! `gpu_check`: the CUDA backend on a real GPU (run by `deploy/gpu-check.sh`).
//!
//! Prints one `PASS` / `FAIL` / `SKIP` line per check, timings as plain lines, and closes with
//! `N passed, N failed`; the exit status is non-zero when a check failed.
//! * portable numerics == the CPU reference bit for bit on the contract tests' shapes (linear for
//!   every dtype and segment count, batch invariance, row ops, RoPE, paged attention with prefill
//!   chunking, TP shards + tree, sampling), and == the CPU backend on Qwen2.5-0.5B and
//!   Llama-3.2-1B layer shapes; NCCL all-gather + tree on one rank;
//! * native numerics: rows alone == rows inside batches of 1…256, TP shards + tree == unsplit,
//!   and within 1e-2 of the reference (‖native − ref‖∞ / ‖ref‖∞);
//! * timings: native linear GFLOP/s against cuBLAS bf16 at M = 1, 8, 64, 512, 4096 on both
//!   models' shapes, and portable decode (M = 1) weight-streaming bandwidth as a fraction of the
//!   card's bandwidth (theoretical, and a measured device-to-device copy).
//!
//! `gpu_check --emit-ptx 80 90` compiles the kernels into the PTX cache instead (NVRTC only, no
//! GPU), so a GPU machine without NVRTC can run from `LOCKSTEP_CACHE_DIR`.
//! `--quick` shortens the timings.

use std::fmt::Display;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::DevicePtr;
use lockstep_kernels::cuda::{
    libs, nccl_all_gather_tree, nccl_single_rank_comm, nvrtc, CudaBackend, CudaConfig, CudaMode,
};
use lockstep_kernels::sampling::shard_sample;
use lockstep_kernels::{
    reference, AttnParams, AttnSeq, Backend, CpuBackend, CpuConfig, DType, HostWeight, KvLayout, RopeConfig,
    RopeTables, SampleRequest, SamplingParams, Segmentation, VocabShard,
};

struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl Display) {
        if ok {
            self.passed += 1;
            println!("PASS {name}: {detail}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {detail}");
        }
    }
    fn bits(&mut self, name: &str, got: &[f32], want: &[f32]) {
        let (ok, d) = compare(got, want);
        self.check(name, ok, d);
    }
}

fn compare(got: &[f32], want: &[f32]) -> (bool, String) {
    if got.len() != want.len() {
        return (false, format!("length {} vs {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    match bad.first() {
        None => (true, format!("{} values bit-identical", got.len())),
        Some(&i) => {
            (false, format!("{} of {} differ; first at {i}: {:e} vs {:e}", bad.len(), got.len(), got[i], want[i]))
        }
    }
}

#[path = "../tests/common/mod.rs"]
mod common;
use common::{columns_of, quant_weight, ContractData, Rng};

const DTYPES: [DType; 3] = [DType::F32, DType::Bf16, DType::F16];

/// (name, N, K) of one transformer layer's linears (q/k/v fused, o, gate/up fused, down).
fn model_shapes() -> Vec<(&'static str, usize, usize)> {
    vec![
        ("qwen2.5-0.5b qkv", 896 + 2 * 128, 896),
        ("qwen2.5-0.5b o", 896, 896),
        ("qwen2.5-0.5b gate_up", 2 * 4864, 896),
        ("qwen2.5-0.5b down", 896, 4864),
        ("llama-3.2-1b qkv", 2048 + 2 * 512, 2048),
        ("llama-3.2-1b o", 2048, 2048),
        ("llama-3.2-1b gate_up", 2 * 8192, 2048),
        ("llama-3.2-1b down", 2048, 8192),
    ]
}

/// Median seconds of `f` (after one warm-up), repeated for about `budget`.
fn time(be: &CudaBackend, budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    be.synchronize();
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < budget || samples.len() < 3 {
        let t = Instant::now();
        f();
        be.synchronize();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--emit-ptx") {
        return emit_ptx(&args[1..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut r = Report { passed: 0, failed: 0 };
    let portable = match CudaBackend::new(CudaConfig { mode: CudaMode::Portable, ..Default::default() }) {
        Ok(b) => b,
        Err(e) => {
            r.check("start portable backend", false, e);
            println!("{} passed, {} failed", r.passed, r.failed);
            return ExitCode::FAILURE;
        }
    };
    r.check("start portable backend", true, format!("{} (sm_{})", portable.device_name(), portable.sm()));
    println!("fingerprint name: {}", portable.fingerprint_name());
    match nvrtc::nvrtc_version() {
        Ok((a, b)) => println!("NVRTC {a}.{b}; PTX cache {:?}", nvrtc::ptx_cache_dir()),
        Err(_) => println!("NVRTC absent: kernels came from the PTX cache {:?}", nvrtc::ptx_cache_dir()),
    }
    let cpu = CpuBackend::new(CpuConfig::default()).expect("cpu backend");

    portable_contract(&portable, &mut r);
    portable_models(&portable, &cpu, &mut r);
    nccl_check(&portable, &mut r);
    let native = native_checks(&portable, &cpu, &mut r);
    timings(&portable, native.as_ref(), quick);

    println!("{} passed, {} failed", r.passed, r.failed);
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn emit_ptx(arches: &[String]) -> ExitCode {
    let arches: Vec<u32> = arches.iter().filter_map(|a| a.parse().ok()).collect();
    let Some(dir) = nvrtc::ptx_cache_dir() else {
        println!("FAIL emit-ptx: set LOCKSTEP_CACHE_DIR");
        return ExitCode::FAILURE;
    };
    match nvrtc::emit_ptx_cache(&arches, &dir) {
        Ok(n) => {
            println!("wrote {n} PTX files for {arches:?} to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL emit-ptx: {e}");
            ExitCode::FAILURE
        }
    }
}

fn up(be: &CudaBackend, w: &HostWeight) -> lockstep_kernels::cuda::CudaWeight {
    be.prepare_weight(w.clone())
}

/// The contract tests' shapes, GPU portable against the reference.
fn portable_contract(be: &CudaBackend, r: &mut Report) {
    let mut rng = Rng::new(1);
    // Linear, every dtype and segment count, with bias.
    let (mut bad, mut first) = (0, String::new());
    for case in 0..40 {
        let (m, k, n) = (1 + rng.below(13), 1 + rng.below(300), 1 + rng.below(70));
        let segments = [1, 2, 4, 8, 16][rng.below(5)];
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * k);
        let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
        let b = HostWeight::from_f32(&rng.vec(n), dtype, 1, n);
        let want = reference::linear(&x, m, w.view(), Some(b.view()), segments);
        let segs = Segmentation::new(k, segments).unwrap().full();
        let mut y = be.zeros(m * n);
        be.linear_partial(&be.upload(&x), m, &up(be, &w), segs, &mut y);
        be.add_bias(&mut y, &up(be, &b));
        let (ok, d) = compare(&be.download(&y), &want);
        if !ok {
            bad += 1;
            if first.is_empty() {
                first = format!("m={m} k={k} n={n} S={segments} {dtype:?}: {d}");
            }
        }
    }
    r.check(
        "portable linear == reference (40 shapes, f32/bf16/f16, S=1..16, bias)",
        bad == 0,
        if bad == 0 { "all bit-identical".to_string() } else { format!("{bad} cases differ; {first}") },
    );

    // GGUF block types, widened in registers, with both families of segment counts.
    let (mut bad, mut first) = (0, String::new());
    for case in 0..18 {
        let (m, k, n) = (1 + rng.below(13), 32 * (1 + rng.below(12)), 1 + rng.below(70));
        let segments = [1, 3, 4, 6, 8, 12][case % 6];
        let dtype = [DType::Q8_0, DType::Q4_0, DType::Q4_1][case % 3];
        let x = rng.vec(m * k);
        let w = quant_weight(&mut rng, dtype, n, k);
        let want = reference::linear(&x, m, w.view(), None, segments);
        let segs = Segmentation::new(k, segments).unwrap().full();
        let mut y = be.zeros(m * n);
        be.linear_partial(&be.upload(&x), m, &up(be, &w), segs, &mut y);
        let (ok, d) = compare(&be.download(&y), &want);
        if !ok {
            bad += 1;
            if first.is_empty() {
                first = format!("m={m} k={k} n={n} S={segments} {dtype:?}: {d}");
            }
        }
    }
    r.check(
        "portable quantized linear == reference (18 shapes, q8_0/q4_0/q4_1, S=1..12)",
        bad == 0,
        if bad == 0 { "all bit-identical".to_string() } else { format!("{bad} cases differ; {first}") },
    );

    // Batch invariance, 1..64 rows.
    let (k, n) = (203, 37);
    for dtype in DTYPES {
        let w = up(be, &HostWeight::from_f32(&rng.vec(n * k), dtype, n, k));
        let x = rng.vec(64 * k);
        let alone: Vec<Vec<f32>> = (0..64)
            .map(|i| {
                let mut y = be.zeros(n);
                be.linear(&be.upload(&x[i * k..(i + 1) * k]), 1, &w, None, &mut y);
                be.download(&y)
            })
            .collect();
        let mut ok = true;
        for m in 1..=64 {
            let mut y = be.zeros(m * n);
            be.linear(&be.upload(&x[..m * k]), m, &w, None, &mut y);
            let y = be.download(&y);
            ok &= (0..m).all(|i| compare(&y[i * n..(i + 1) * n], &alone[i]).0);
        }
        r.check(&format!("portable rows alone == rows in batches 1..64 ({dtype:?})"), ok, "k=203 n=37");
    }

    // Row ops.
    let mut ok = true;
    let mut detail = String::from("rms_norm, swiglu, embedding, add_assign, gather_rows");
    for case in 0..12 {
        let (m, n) = (1 + rng.below(9), 1 + rng.below(200));
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * n);
        let g = rng.vec(m * n);
        let w = HostWeight::from_f32(&rng.vec(n), dtype, 1, n);
        let (dx, dg) = (be.upload(&x), be.upload(&g));
        let mut o = be.zeros(m * n);
        be.rms_norm(&dx, &up(be, &w), 1e-5, &mut o);
        let c1 = compare(&be.download(&o), &reference::rms_norm(&x, w.view(), 1e-5, 8));
        be.swiglu(&dx, &dg, &mut o);
        let c2 = compare(&be.download(&o), &reference::swiglu(&x, &g));
        let table = HostWeight::from_f32(&rng.vec(7 * n), dtype, 7, n);
        let ids: Vec<u32> = (0..m).map(|_| rng.below(7) as u32).collect();
        be.embedding(&ids, &up(be, &table), &mut o);
        let c3 = compare(&be.download(&o), &reference::embedding(&ids, table.view()));
        let mut s = be.upload(&x);
        be.add_assign(&mut s, &dg);
        let c4 = compare(&be.download(&s), &reference::add(&x, &g));
        let rows: Vec<u32> = (0..3).map(|_| rng.below(m) as u32).collect();
        let mut gr = be.zeros(3 * n);
        be.gather_rows(&dx, n, &rows, &mut gr);
        let want: Vec<f32> = rows.iter().flat_map(|&i| x[i as usize * n..(i as usize + 1) * n].to_vec()).collect();
        let c5 = compare(&be.download(&gr), &want);
        for (name, (good, d)) in
            [("rms_norm", c1), ("swiglu", c2), ("embedding", c3), ("add_assign", c4), ("gather_rows", c5)]
        {
            if !good && ok {
                detail = format!("{name} n={n} {dtype:?}: {d}");
            }
            ok &= good;
        }
    }
    r.check("portable row ops == reference", ok, detail);

    // RoPE.
    let t = RopeTables::new(&RopeConfig { head_dim: 64, theta: 1_000_000.0, scaling: None }, 4096).unwrap();
    let pos = [0u32, 1, 17, 1000, 4095];
    let x = rng.vec(pos.len() * 4 * 64);
    let mut want = x.clone();
    reference::rope(&mut want, 4, &pos, &t);
    let mut dx = be.upload(&x);
    be.rope(&mut dx, 4, &pos, &t);
    r.bits("portable rope == reference", &be.download(&dx), &want);

    attention_checks(be, r, &mut rng);
    tp_checks(be, r, &mut rng, "portable");
    sampling_checks(be, r, &mut rng);
}

fn attention_checks(be: &CudaBackend, r: &mut Report, rng: &mut Rng) {
    let shape = [(0usize, 9usize), (30, 1), (5, 3), (0, 1), (70, 2), (200, 1)];
    let mut ok = true;
    let mut detail = "4 head layouts × kv_chunk 1, 5, 64".to_string();
    for (n_heads, n_kv, d) in [(4, 2, 16), (8, 4, 8), (2, 2, 20), (14, 2, 64)] {
        let block_size = 4;
        let blocks: usize = shape.iter().map(|&(f, n)| (f + n).div_ceil(block_size)).sum();
        let layout = KvLayout { num_blocks: blocks + 5, block_size, n_kv_heads: n_kv, head_dim: d };
        let mut free: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let mut tables = Vec::new();
        let mut meta = Vec::new();
        let mut row = 0;
        for &(first, n_q) in &shape {
            tables.push(
                (0..(first + n_q).div_ceil(block_size))
                    .map(|_| free.swap_remove(rng.below(free.len())))
                    .collect::<Vec<u32>>(),
            );
            meta.push((row, n_q, first));
            row += n_q;
        }
        let seqs: Vec<AttnSeq> = meta
            .iter()
            .zip(&tables)
            .map(|(&(q_row, n_q, first_pos), t)| AttnSeq { block_table: t, q_row, n_q, first_pos })
            .collect();
        let q = rng.vec(row * n_heads * d);
        let (kc, vc) = (rng.vec(layout.floats()), rng.vec(layout.floats()));
        // Fill the device cache through write_kv (every slot, in order).
        let mut cache = be.alloc_kv(layout);
        let slots: Vec<u32> = (0..layout.slots() as u32).collect();
        be.write_kv(&mut cache, &be.upload(&kc), &be.upload(&vc), &slots);
        for kv_chunk in [1, 5, 64] {
            let p = AttnParams { n_heads, n_kv_heads: n_kv, head_dim: d, block_size, kv_chunk };
            let want = reference::attention(&q, &seqs, &kc, &vc, &layout, p);
            let mut o = be.zeros(q.len());
            be.attention(&be.upload(&q), &seqs, &cache, p, &mut o);
            let (good, dd) = compare(&be.download(&o), &want);
            if !good && ok {
                detail = format!("heads={n_heads}/{n_kv} d={d} chunk={kv_chunk}: {dd}");
            }
            ok &= good;
        }
    }
    r.check("portable paged attention == reference", ok, detail);

    // Prefill chunking: one 100-token sequence written by chunks of 1, 3, 16, 64 == whole prompt.
    let (n_heads, n_kv, d, len) = (4, 2, 64, 100);
    let qs = rng.vec(len * n_heads * d);
    let ks = rng.vec(len * n_kv * d);
    let vs = rng.vec(len * n_kv * d);
    let layout = KvLayout { num_blocks: 40, block_size: 4, n_kv_heads: n_kv, head_dim: d };
    let p = AttnParams { n_heads, n_kv_heads: n_kv, head_dim: d, block_size: 4, kv_chunk: 16 };
    let run = |chunk: usize, seed: u64| -> Vec<u32> {
        let mut rng = Rng::new(seed);
        let mut cache = be.alloc_kv(layout);
        let mut free: Vec<u32> = (0..40).collect();
        let table: Vec<u32> = (0..len.div_ceil(4)).map(|_| free.swap_remove(rng.below(free.len()))).collect();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < len {
            let n = chunk.min(len - pos);
            let slots: Vec<u32> = (pos..pos + n).map(|i| table[i / 4] * 4 + (i % 4) as u32).collect();
            let w = n_kv * d;
            be.write_kv(
                &mut cache,
                &be.upload(&ks[pos * w..(pos + n) * w]),
                &be.upload(&vs[pos * w..(pos + n) * w]),
                &slots,
            );
            let q = &qs[pos * n_heads * d..(pos + n) * n_heads * d];
            let seqs = [AttnSeq { block_table: &table, q_row: 0, n_q: n, first_pos: pos }];
            let mut o = be.zeros(q.len());
            be.attention(&be.upload(q), &seqs, &cache, p, &mut o);
            out.extend(be.download(&o).iter().map(|v| v.to_bits()));
            pos += n;
        }
        out
    };
    let whole = run(len, 1);
    let ok = [(1, 2), (3, 3), (16, 4), (64, 5)].iter().all(|&(c, s)| run(c, s) == whole);
    r.check("portable attention: prefill chunks 1/3/16/64 == whole prompt", ok, "100 tokens, random block placement");
}

fn tp_checks(be: &CudaBackend, r: &mut Report, rng: &mut Rng, label: &str) {
    let mut ok = true;
    let mut detail = "t = 2, 4, 8 over 8 segments".to_string();
    for case in 0..6 {
        let (m, k, n) = (1 + rng.below(6), 64 + rng.below(900), 1 + rng.below(96));
        let dtype = [DType::Bf16, DType::F16, DType::F32][case % 3];
        let x = rng.vec(m * k);
        let wf = rng.vec(n * k);
        let w = HostWeight::from_f32(&wf, dtype, n, k);
        let seg = Segmentation::new(k, 8).unwrap();
        let mut full = be.zeros(m * n);
        be.linear_partial(&be.upload(&x), m, &up(be, &w), seg.full(), &mut full);
        let full = be.download(&full);
        for t in [2, 4, 8] {
            let mut parts = Vec::new();
            for rank in 0..t {
                let segs = seg.shard(rank, t).unwrap();
                let cols = segs.real_range();
                let xs: Vec<f32> = columns_of(&x, k, cols.clone());
                let ws: Vec<f32> = (0..n).flat_map(|j| wf[j * k + cols.start..j * k + cols.end].to_vec()).collect();
                let mut p = be.zeros(m * n);
                be.linear_partial(
                    &be.upload(&xs),
                    m,
                    &up(be, &HostWeight::from_f32(&ws, dtype, n, cols.len())),
                    segs,
                    &mut p,
                );
                parts.push(p);
            }
            let refs: Vec<_> = parts.iter().collect();
            let mut y = be.zeros(m * n);
            be.tree_combine(&refs, &mut y);
            let (good, d) = compare(&be.download(&y), &full);
            if !good && ok {
                detail = format!("t={t} k={k} {dtype:?}: {d}");
            }
            ok &= good;
        }
    }
    r.check(&format!("{label} TP shards + tree_combine == unsplit"), ok, detail);
}

fn sampling_checks(be: &CudaBackend, r: &mut Report, rng: &mut Rng) {
    let params = [
        SamplingParams { temperature: 0.0, ..Default::default() },
        SamplingParams { temperature: 0.8, seed: 42, ..Default::default() },
        SamplingParams { temperature: 1.3, top_k: 7, top_p: 1.0, seed: 5 },
        SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.8, seed: 9 },
    ];
    let mut ok = true;
    let mut detail = "vocab 17..151936, shards 1/2/8, greedy / Gumbel / top-k / top-p".to_string();
    for vocab in [17usize, 4099, 151_936] {
        let reqs: Vec<SampleRequest> =
            params.iter().flat_map(|&p| [0u64, 5].map(|step| SampleRequest { params: p, step })).collect();
        let rows: Vec<Vec<f32>> = (0..reqs.len()).map(|_| rng.vec(vocab).iter().map(|v| v * 6.0).collect()).collect();
        let seg = Segmentation::new(vocab, 8).unwrap();
        for t in [1, 2, 8] {
            for rank in 0..t {
                let shard = VocabShard::new(seg.shard(rank, t).unwrap());
                let logits: Vec<f32> =
                    rows.iter().flat_map(|l| l[shard.offset..shard.offset + shard.rows].to_vec()).collect();
                let got = be.sample_shard(&be.upload(&logits), shard, &reqs);
                for (i, req) in reqs.iter().enumerate() {
                    let want = shard_sample(&logits[i * shard.rows..(i + 1) * shard.rows], &shard, req);
                    let good = format!("{:?}", got[i]) == format!("{want:?}")
                        && got[i].lse.max.to_bits() == want.lse.max.to_bits()
                        && got[i].lse.sum.to_bits() == want.lse.sum.to_bits();
                    if !good && ok {
                        detail = format!("vocab={vocab} shard {rank}/{t} {req:?}: {:?} vs {want:?}", got[i].lse);
                    }
                    ok &= good;
                }
            }
        }
    }
    r.check("portable sample_shard == CPU shard_sample", ok, detail);
}

/// Qwen2.5-0.5B / Llama-3.2-1B layer shapes: GPU portable == CPU backend (itself == reference).
fn portable_models(be: &CudaBackend, cpu: &CpuBackend, r: &mut Report) {
    let mut rng = Rng::new(3);
    for (name, n, k) in model_shapes() {
        let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
        let dw = up(be, &w);
        for m in [1, 7] {
            let x = rng.vec(m * k);
            let mut want = vec![0.0; m * n];
            cpu.linear(&x, m, &w, None, &mut want);
            let mut y = be.zeros(m * n);
            be.linear(&be.upload(&x), m, &dw, None, &mut y);
            r.bits(&format!("portable {name} M={m} == CPU backend"), &be.download(&y), &want);
        }
    }
}

fn nccl_check(be: &CudaBackend, r: &mut Report) {
    if !libs::nccl_present() {
        println!("SKIP nccl all-gather + tree: libnccl not found on this machine");
        return;
    }
    let comm = match nccl_single_rank_comm(be) {
        Ok(c) => c,
        Err(e) => {
            r.check("nccl single-rank communicator", false, e);
            return;
        }
    };
    let x: Vec<f32> = Rng::new(4).vec(4099);
    let part = be.upload(&x);
    let mut y = be.zeros(x.len());
    match nccl_all_gather_tree(be, &comm, &part, &mut y) {
        Ok(()) => r.bits("nccl all-gather + tree (1 rank) == the partial", &be.download(&y), &x),
        Err(e) => r.check("nccl all-gather + tree", false, e),
    }
}

fn native_checks(portable: &CudaBackend, cpu: &CpuBackend, r: &mut Report) -> Option<CudaBackend> {
    if portable.sm() < 80 {
        println!("SKIP native numerics: sm_{} has no bf16 tensor cores", portable.sm());
        return None;
    }
    let be = match CudaBackend::new(CudaConfig { mode: CudaMode::Native, ..Default::default() }) {
        Ok(b) => b,
        Err(e) => {
            r.check("start native backend", false, e);
            return None;
        }
    };
    r.check("start native backend", true, be.fingerprint_name());
    let mut rng = Rng::new(5);
    // Rows alone == rows inside batches of 1..256 (Qwen qkv shape).
    let (n, k) = (1152, 896);
    for dtype in [DType::Bf16, DType::F16] {
        let w = up(&be, &HostWeight::from_f32(&rng.vec(n * k), dtype, n, k));
        let x = rng.vec(256 * k);
        let alone: Vec<Vec<f32>> = (0..256)
            .map(|i| {
                let mut y = be.zeros(n);
                be.linear(&be.upload(&x[i * k..(i + 1) * k]), 1, &w, None, &mut y);
                be.download(&y)
            })
            .collect();
        let mut bad = Vec::new();
        for m in 1..=256 {
            let mut y = be.zeros(m * n);
            be.linear(&be.upload(&x[..m * k]), m, &w, None, &mut y);
            let y = be.download(&y);
            if !(0..m).all(|i| compare(&y[i * n..(i + 1) * n], &alone[i]).0) {
                bad.push(m);
            }
        }
        r.check(
            &format!("native rows alone == rows in batches 1..256 ({dtype:?})"),
            bad.is_empty(),
            if bad.is_empty() {
                "k=896 n=1152".to_string()
            } else {
                format!("differs at M in {:?}", &bad[..bad.len().min(10)])
            },
        );
    }
    tp_checks(&be, r, &mut rng, "native");
    // Accuracy against the reference (the CPU backend gives the reference's bits, faster).
    for (name, n, k) in model_shapes() {
        let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
        let m = 8;
        let x = rng.vec(m * k);
        let mut want = vec![0.0; m * n];
        cpu.linear(&x, m, &w, None, &mut want);
        let mut y = be.zeros(m * n);
        be.linear(&be.upload(&x), m, &up(&be, &w), None, &mut y);
        let y = be.download(&y);
        let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        let rel = err / scale.max(f32::MIN_POSITIVE);
        r.check(&format!("native {name} within 1e-2 of reference"), rel <= 1e-2, format!("‖Δ‖∞/‖ref‖∞ = {rel:.2e}"));
    }
    Some(be)
}

fn timings(portable: &CudaBackend, native: Option<&CudaBackend>, quick: bool) {
    let budget = Duration::from_millis(if quick { 50 } else { 300 });
    let ctx = portable.context();
    let attr = |a| ctx.attribute(a).unwrap_or(0) as f64;
    let clock_khz = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
    let bus_bits = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
    let peak = 2.0 * clock_khz * 1e3 * bus_bits / 8.0 / 1e9;
    // Measured: a 1 GiB device-to-device copy (reads + writes count).
    let n = 256 << 20;
    let src = portable.zeros(n);
    let mut dst = portable.zeros(n);
    let t = time(portable, budget, || {
        portable.stream().memcpy_dtod(src.slice(), dst.slice_mut()).expect("dtod");
    });
    let copy = 2.0 * (n * 4) as f64 / t / 1e9;
    println!("memory bandwidth: theoretical {peak:.0} GB/s, measured copy {copy:.0} GB/s");

    println!("portable decode (M=1, bf16 weights): weight bytes / time");
    let mut rng = Rng::new(7);
    for (name, n, k) in model_shapes() {
        let w = portable.prepare_weight(HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k));
        let x = portable.upload(&rng.vec(k));
        let mut y = portable.zeros(n);
        let t = time(portable, budget, || portable.linear(&x, 1, &w, None, &mut y));
        let gbs = (n * k * 2) as f64 / t / 1e9;
        println!(
            "  {name:24} {:8.1} us  {gbs:7.0} GB/s  = {:.2} of theoretical, {:.2} of measured copy",
            t * 1e6,
            gbs / peak.max(1.0),
            gbs / copy.max(1.0)
        );
    }

    let blas = if libs::cublas_present() { CudaBlas::new(portable.stream().clone()).ok() } else { None };
    if blas.is_none() {
        println!("SKIP cuBLAS baseline: libcublas not found on this machine");
    }
    println!("linear GFLOP/s (bf16 weights): native (incl. x→bf16) | cuBLAS bf16 GemmEx (f32 accumulate) | portable");
    for (name, n, k) in model_shapes() {
        let wh = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
        for m in [1usize, 8, 64, 512, 4096] {
            let flops = 2.0 * (m * n * k) as f64;
            let x = rng.vec(m * k);
            let dx = portable.upload(&x);
            let mut y = portable.zeros(m * n);
            let nat = native.map(|be| {
                let w = be.prepare_weight(wh.clone());
                let dx = be.upload(&x);
                let mut y = be.zeros(m * n);
                flops / time(be, budget, || be.linear(&dx, m, &w, None, &mut y)) / 1e9
            });
            let cub = blas.as_ref().map(|b| {
                let xb = HostWeight::from_f32(&x, DType::Bf16, m, k);
                let dxb = portable.prepare_weight(xb);
                let dw = portable.prepare_weight(wh.clone());
                let (alpha, beta) = (1.0f32, 0.0f32);
                flops
                    / time(portable, budget, || {
                        let (wp, _g1) = dw.slice().device_ptr(portable.stream());
                        let (xp, _g2) = dxb.slice().device_ptr(portable.stream());
                        let (yp, _g3) = y.slice().device_ptr(portable.stream());
                        // SAFETY: W is [n, k] bf16 (column-major k×n, lda = k, transposed), X is
                        // [m, k] bf16 (column-major k×m), Y is [m, n] f32 (column-major n×m).
                        unsafe {
                            blas::gemm_ex(
                                *b.handle(),
                                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                                n as i32,
                                m as i32,
                                k as i32,
                                (&alpha) as *const f32 as *const _,
                                wp as *const _,
                                blas_sys::cudaDataType::CUDA_R_16BF,
                                k as i32,
                                xp as *const _,
                                blas_sys::cudaDataType::CUDA_R_16BF,
                                k as i32,
                                (&beta) as *const f32 as *const _,
                                yp as *mut _,
                                blas_sys::cudaDataType::CUDA_R_32F,
                                n as i32,
                                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                            )
                        }
                        .expect("cublasGemmEx");
                    })
                    / 1e9
            });
            let w = portable.prepare_weight(wh.clone());
            let port = flops / time(portable, budget, || portable.linear(&dx, m, &w, None, &mut y)) / 1e9;
            let show = |v: Option<f64>| v.map(|g| format!("{g:9.0}")).unwrap_or_else(|| "        -".into());
            println!("  {name:24} M={m:5}  {} | {} | {port:9.0}", show(nat), show(cub));
        }
    }
}
